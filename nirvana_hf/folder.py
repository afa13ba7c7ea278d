"""A Nirvana model as a folder in the form models are shared in: model.safetensors + config.json.

    save_pretrained(model, "hf_model", tokenizer="data/pydoc/tok.model")   # writes the whole folder
    model = load_pretrained("hf_model")                                     # a Nirvana, bit-equal weights
    export_checkpoint("out/nirvana-tiny/ckpt.pt", "hf_model")               # a train.py checkpoint -> folder

The folder also holds what `transformers` needs to load it with trust_remote_code=True: the code named in
config.json's auto_map (configuration_nirvana.py, modeling_nirvana.py, tokenization_nirvana.py) and the files
they import (nirvana.py, tokenizer.py), and the tokenizer (tokenizer_config.json, plus tokenizer.model for a
sentencepiece tokenizer or the ranks file for a tiktoken one). Nothing here imports transformers.

model.safetensors holds Nirvana.state_dict() under its own names (token_embedding.weight, blocks.0...).
config.json holds every NirvanaConfig field, "tokenizer" (a spec relative to the folder) and the keys
transformers reads (model_type, architectures, auto_map). The backend is written as "torch" (the reference
code, which runs anywhere); load_pretrained(folder, backend="triton") picks the kernels.
"""

import dataclasses
import json
import os
import shutil

from cli import write_atomically, write_json_atomically

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
SENTENCEPIECE_NAME = "tokenizer.model"
# The code a folder carries: (source, name in the folder). trust_remote_code copies the files of auto_map and,
# following their relative imports, nirvana.py and tokenizer.py. The torch backend needs no kernels/.
MODEL_CODE = {
    name: os.path.join(PACKAGE_DIR, name) for name in ("configuration_nirvana.py", "modeling_nirvana.py")
}
MODEL_CODE["nirvana.py"] = os.path.join(REPO_DIR, "nirvana.py")
TOKENIZER_CODE = {
    "tokenization_nirvana.py": os.path.join(PACKAGE_DIR, "tokenization_nirvana.py"),
    "tokenizer.py": os.path.join(REPO_DIR, "tokenizer.py"),
    "cli.py": os.path.join(REPO_DIR, "cli.py"),  # tokenizer.py's errors
}
AUTO_MAP = {
    "AutoConfig": "configuration_nirvana.NirvanaHFConfig",
    "AutoModelForCausalLM": "modeling_nirvana.NirvanaForCausalLM",
}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_nirvana.NirvanaTokenizer", None]}


def save_pretrained(model, folder, tokenizer):
    """Writes model (a Nirvana) and its tokenizer (a spec: 'bytes', '<path>.model', 'tiktoken:<path>') into
    folder; -> folder."""
    return save_state_dict(model.state_dict(), model.config, tokenizer, folder)


def save_state_dict(state, config, tokenizer, folder):
    """save_pretrained from a Nirvana state dict and its NirvanaConfig (what train.py's checkpoints hold):
    each file written atomically, the weights in their dtype, contiguous, on the CPU."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    folder_spec = save_tokenizer(tokenizer, folder)
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}

    def write_weights(tmp):
        save_file(state, tmp, metadata={"format": "pt"})
        umask = os.umask(0)  # safetensors creates the file readable by its owner alone
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the usual permissions, as for any file we write

    write_atomically(os.path.join(folder, WEIGHTS_NAME), write_weights)
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    hf_keys = {
        "model_type": "nirvana",
        "architectures": ["NirvanaForCausalLM"],
        "auto_map": AUTO_MAP,
        "tie_word_embeddings": False,
        "use_cache": False,
        "dtype": dtype,
    }
    write_json_atomically(
        os.path.join(folder, CONFIG_NAME),
        {**dataclasses.asdict(config), "backend": "torch", "tokenizer": folder_spec, **hf_keys},
    )
    copy_files(MODEL_CODE, folder)
    return folder


def save_tokenizer(spec, folder):
    """Writes the tokenizer of spec into folder as AutoTokenizer loads it (trust_remote_code=True): its file,
    tokenizer_config.json and the code. -> the spec relative to the folder."""
    os.makedirs(folder, exist_ok=True)
    folder_spec = copy_tokenizer_file(spec, folder)
    copy_files(TOKENIZER_CODE, folder)
    write_json_atomically(
        os.path.join(folder, TOKENIZER_CONFIG_NAME),
        {"tokenizer_class": "NirvanaTokenizer", "auto_map": TOKENIZER_AUTO_MAP, "spec": folder_spec},
    )
    return folder_spec


def copy_tokenizer_file(spec, folder):
    """Copies the tokenizer's file into folder; -> its spec relative to the folder."""
    from tokenizer import BYTES_SPEC, TIKTOKEN_PREFIX

    if not isinstance(spec, str):
        raise TypeError(f"tokenizer spec must be a string such as 'bytes', got {spec!r}")
    if spec == BYTES_SPEC:
        return spec
    source, prefix, name = spec, "", SENTENCEPIECE_NAME
    if spec.startswith(TIKTOKEN_PREFIX):  # the file name picks tiktoken's regex: kept
        source = spec[len(TIKTOKEN_PREFIX) :]
        prefix, name = TIKTOKEN_PREFIX, os.path.basename(source)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"tokenizer file '{source}' (of spec '{spec}') not found")
    target = os.path.join(folder, name)
    if os.path.abspath(source) != os.path.abspath(target):
        write_atomically(target, lambda tmp: shutil.copyfile(source, tmp))
    return prefix + name


def load_tokenizer_spec(spec, folder):
    """The tokenizer of a spec stored in a folder (file names relative to it)."""
    from tokenizer import BYTES_SPEC, TIKTOKEN_PREFIX, load_tokenizer

    if spec == BYTES_SPEC:
        return load_tokenizer(spec)
    if spec.startswith(TIKTOKEN_PREFIX):
        return load_tokenizer(TIKTOKEN_PREFIX + os.path.join(folder, spec[len(TIKTOKEN_PREFIX) :]))
    return load_tokenizer(os.path.join(folder, spec))


def copy_files(sources, folder):
    """sources: {name in folder: source path}."""
    for name, source in sources.items():
        write_atomically(os.path.join(folder, name), lambda tmp, source=source: shutil.copyfile(source, tmp))


def read_config(folder):
    """config.json of a saved folder, with a clear error for a missing or foreign folder."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
        raise FileNotFoundError(
            f"'{folder}' is not a saved Nirvana folder: it needs {CONFIG_NAME} and "
            f"{WEIGHTS_NAME} (write one with save_pretrained or `python eval.py export`)"
        )
    with open(path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
    if config.get("model_type") != "nirvana":
        raise ValueError(f"{path} describes model_type {config.get('model_type')!r}, not 'nirvana'")
    return config


def load_pretrained(folder, map_location="cpu", **overrides):
    """The Nirvana saved in folder, its weights loaded bit-equal and in their saved dtype; overrides replace
    config fields (e.g. backend="triton")."""
    from safetensors.torch import load_file

    from nirvana import Nirvana, NirvanaConfig

    config = read_config(folder)
    known = {f.name for f in dataclasses.fields(NirvanaConfig)}
    model = Nirvana(NirvanaConfig.from_dict({k: v for k, v in config.items() if k in known} | overrides))
    try:
        state = load_file(os.path.join(folder, WEIGHTS_NAME), device=str(map_location))
    except Exception as error:
        raise ValueError(f"cannot read {os.path.join(folder, WEIGHTS_NAME)}: {error}") from error
    model.load_state_dict(state, assign=True)  # assign: the parameters take the stored tensors' dtypes
    return model


def pretrained_tokenizer(folder):
    """The tokenizer a saved folder names (our tokenizer.py object, not a transformers one)."""
    config = read_config(folder)
    if config.get("tokenizer") is None:
        raise ValueError(f"{os.path.join(folder, CONFIG_NAME)} names no tokenizer (key 'tokenizer')")
    return load_tokenizer_spec(config["tokenizer"], folder)


def export_checkpoint(checkpoint, folder, tokenizer=None):
    """A train.py checkpoint (ckpt.pt) -> a saved folder; tokenizer: a spec overriding the checkpoint's.
    A missing, corrupt or foreign checkpoint, or one that names no tokenizer, is a cli.UserError."""
    from cli import load_model

    model, tok = load_model(checkpoint, device="cpu", dtype="float32", tokenizer=tokenizer)
    return save_pretrained(model, folder, tok.spec)
