"""transformers' view of NirvanaConfig: every NirvanaConfig field as an attribute of a PretrainedConfig.

This file is copied into every saved folder (nirvana_hf/folder.py); transformers loads it from there with
trust_remote_code=True, so it imports nirvana.py relatively when it sits beside it.
"""

import dataclasses

from transformers import PretrainedConfig

try:  # in a saved folder, nirvana.py sits beside this file
    from .nirvana import NirvanaConfig
except ImportError:  # in the repository
    from nirvana import NirvanaConfig

NIRVANA_FIELDS = {f.name: f.default for f in dataclasses.fields(NirvanaConfig)}


class NirvanaHFConfig(PretrainedConfig):
    model_type = "nirvana"

    def __init__(self, **kwargs):
        for name, default in NIRVANA_FIELDS.items():
            setattr(self, name, kwargs.pop(name, default))
        kwargs.setdefault("tie_word_embeddings", False)  # Nirvana's LM head is its own matrix
        kwargs.setdefault("use_cache", False)  # generate() recomputes the prefix (modeling_nirvana.py)
        super().__init__(**kwargs)

    def nirvana_config(self):
        """The NirvanaConfig these attributes describe (checked by NirvanaConfig itself)."""
        return NirvanaConfig.from_dict({name: getattr(self, name) for name in NIRVANA_FIELDS})
