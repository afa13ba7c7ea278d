"""Our tokenizer (tokenizer.py: bytes, sentencepiece or tiktoken) behind transformers' tokenizer interface:
AutoTokenizer.from_pretrained(folder, trust_remote_code=True). The ids are exactly tokenizer.py's, and
nothing is added to the text (no BOS, no EOS).

Tokens are shown as strings: a byte as <0x41>, a sentencepiece id as its piece, a tiktoken id as its bytes
in hex; <eos> (the id text ends with) is the one special token.
"""

import os
import shutil

from transformers import PreTrainedTokenizer

try:  # in a saved folder, tokenizer.py sits beside this file
    from .tokenizer import BYTES_SPEC, TIKTOKEN_PREFIX, load_tokenizer
except ImportError:  # in the repository
    from tokenizer import BYTES_SPEC, TIKTOKEN_PREFIX, load_tokenizer


class NirvanaTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"sentencepiece_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, spec=BYTES_SPEC, sentencepiece_file=None, eos_id=None, **kwargs):
        folder = kwargs.get("name_or_path") or "."
        if spec == BYTES_SPEC:
            self.inner = load_tokenizer(spec)
        elif spec.startswith(TIKTOKEN_PREFIX):  # the ranks file, named as saved, in the folder
            self.inner = load_tokenizer(TIKTOKEN_PREFIX + os.path.join(folder, spec[len(TIKTOKEN_PREFIX) :]))
        else:
            self.inner = load_tokenizer(sentencepiece_file or os.path.join(folder, spec))
        self.spec = spec
        self.id_to_token = [self.token_string(i) for i in range(self.inner.vocab_size)]
        self.token_to_id = {token: i for i, token in enumerate(self.id_to_token)}
        super().__init__(
            eos_token=self.id_to_token[self.inner.eos_id],
            spec=spec,
            eos_id=self.inner.eos_id,
            special_tokens_pattern="none",
            **kwargs,
        )

    def token_string(self, index):
        if index == self.inner.eos_id:
            return "<eos>"
        if hasattr(self.inner, "sp"):
            return self.inner.sp.id_to_piece(index)
        if hasattr(self.inner, "enc"):
            try:
                return self.inner.enc.decode_single_token_bytes(index).hex()
            except KeyError:  # an id tiktoken's ranks leave unused
                return f"<unused{index}>"
        return f"<0x{index:02X}>"

    @property
    def vocab_size(self):
        return self.inner.vocab_size

    def get_vocab(self):
        return dict(self.token_to_id)

    def _tokenize(self, text, **kwargs):
        return [self.id_to_token[i] for i in self.inner.encode(text)]

    def _convert_token_to_id(self, token):
        return self.token_to_id[token]

    def _convert_id_to_token(self, index):
        return self.id_to_token[index]

    def convert_tokens_to_string(self, tokens):
        return self.inner.decode([self.token_to_id[t] for t in tokens])

    def save_vocabulary(self, save_directory, filename_prefix=None):
        """Copies the tokenizer's file (none for bytes) under the name `spec` gives it."""
        if self.spec == BYTES_SPEC:
            return ()
        source = self.inner.spec.removeprefix(TIKTOKEN_PREFIX)
        name = self.spec.removeprefix(TIKTOKEN_PREFIX) if self.spec.startswith(TIKTOKEN_PREFIX) else self.spec
        target = os.path.join(save_directory, (filename_prefix or "") + name)
        if os.path.abspath(source) != os.path.abspath(target):
            shutil.copyfile(source, target)
        return (target,)
