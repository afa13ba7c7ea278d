"""Nirvana as a transformers causal LM: AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).

The wrapper holds a Nirvana under `model` and adds nothing to its computation: logits are Nirvana's. HF
generate() runs through it, re-reading the whole sequence at every step (no cache: Nirvana's own decode
caches are not bridged to transformers' cache classes), so it costs O(T^2); Nirvana's O(1)-per-token
decoding is `wrapper.model.generate(...)`. Padding is not supported: every attention_mask entry must be 1.
"""

import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

try:  # in a saved folder, these files sit beside this one
    from .configuration_nirvana import NirvanaHFConfig
    from .nirvana import Nirvana
except ImportError:  # in the repository
    from nirvana import Nirvana
    from nirvana_hf.configuration_nirvana import NirvanaHFConfig


class NirvanaForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NirvanaHFConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        self.model = Nirvana(config.nirvana_config())
        self.post_init()

    def _init_weights(self, module):
        """Nirvana initialises its own weights (GPT-2 style, see nirvana.py); nothing to add."""

    def get_input_embeddings(self):
        return self.model.token_embedding

    def set_input_embeddings(self, value):
        self.model.token_embedding = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        """input_ids (B, T) -> logits (B, T, vocab); labels (B, T) give the HF loss: the mean cross-entropy of
        token t+1 given tokens <= t, -100 ignored."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "NirvanaForCausalLM does not support padding: every attention_mask entry must be 1 "
                "(batch sequences of equal length, or run them one by one)"
            )
        logits, _ = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}
