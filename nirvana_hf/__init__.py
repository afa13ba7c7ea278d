"""Nirvana in the forms the field shares models in: a folder with model.safetensors and config.json
(folder.py, plain PyTorch + safetensors) that transformers also loads with trust_remote_code=True
(configuration_nirvana.py, modeling_nirvana.py and tokenization_nirvana.py import transformers;
this file does not).
"""

from nirvana_hf.folder import (
    export_checkpoint,
    load_pretrained,
    pretrained_tokenizer,
    save_pretrained,
    save_tokenizer,
)

__all__ = [
    "export_checkpoint",
    "load_pretrained",
    "pretrained_tokenizer",
    "save_pretrained",
    "save_tokenizer",
]
