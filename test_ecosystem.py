"""Tests of nirvana_hf: model.safetensors + config.json folders (bit-equal round trips, train.py's export,
`eval.py export`) and the transformers wrapper loaded from such a folder with trust_remote_code=True in a
fresh process outside the repository, offline: its logits, its greedy generate() and its tokenizer equal ours.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as ev
import train
from cli import UserError
from nirvana import Nirvana, NirvanaConfig
from nirvana_hf import (
    export_checkpoint,
    load_pretrained,
    pretrained_tokenizer,
    save_pretrained,
    save_tokenizer,
)
from prepare import builtin_documents, prepare
from tokenizer import load_tokenizer, train_sentencepiece

REPO = os.path.dirname(os.path.abspath(__file__))
TEXT = "The quick brown fox jumps over the lazy dog. Fortune favours the bold. " * 3


def tiny_model(variant="nirvana", seed=0):
    torch.manual_seed(seed)
    return Nirvana(NirvanaConfig.from_preset(f"{variant}-tiny", vocab_size=257)).eval()


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def save_checkpoint(model, path):
    torch.save(
        {"config": dataclasses.asdict(model.config), "model": model.state_dict(), "tokenizer": "bytes"}, path
    )
    return str(path)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def folder(model, tmp_path_factory):
    return save_pretrained(model, str(tmp_path_factory.mktemp("hf") / "tiny"), "bytes")


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    return train_sentencepiece(
        iter(builtin_documents()[:4]), str(tmp_path_factory.mktemp("sp") / "sp"), vocab_size=400
    )


# ----------------------------------------------------------------------------------------------- safetensors


def test_folder_holds_what_the_field_shares(folder):
    names = set(os.listdir(folder))
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer_config.json",
        "configuration_nirvana.py",
        "modeling_nirvana.py",
        "tokenization_nirvana.py",
        "cli.py",
        "nirvana.py",
        "tokenizer.py",
    } == names
    config = json.loads((Path(folder) / "config.json").read_text())
    assert config["model_type"] == "nirvana" and config["tokenizer"] == "bytes" and config["d_model"] == 64
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nirvana.NirvanaForCausalLM"
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        assert {"token_embedding.weight", "lm_head.weight"} <= set(f.keys())
    modes = {name: os.stat(os.path.join(folder, name)).st_mode for name in names}
    assert modes["model.safetensors"] == modes["config.json"]  # readable like any file we write


@pytest.mark.parametrize("variant,dtype", [("nirvana", torch.float32), ("transformer", torch.bfloat16)])
def test_safetensors_round_trip_is_bit_equal(variant, dtype, tmp_path):
    model = tiny_model(variant, seed=3).to(dtype)
    loaded = load_pretrained(save_pretrained(model, str(tmp_path), "bytes"))
    assert loaded.config == model.config
    assert_same_weights(model, loaded)
    assert pretrained_tokenizer(str(tmp_path)).spec == "bytes"
    assert load_pretrained(str(tmp_path), context_length=512).config.context_length == 512  # overrides


def test_export_of_a_checkpoint_and_errors(model, tmp_path):
    checkpoint = save_checkpoint(model, tmp_path / "ckpt.pt")
    ev.main(["export", "--checkpoint", checkpoint, "--out", str(tmp_path / "out")])
    assert_same_weights(model, load_pretrained(str(tmp_path / "out")))
    with pytest.raises(FileNotFoundError, match="not a saved Nirvana folder"):
        load_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    (tmp_path / "out" / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    with pytest.raises(ValueError, match="not 'nirvana'"):
        load_pretrained(str(tmp_path / "out"))
    torch.save(
        {"config": dataclasses.asdict(model.config), "model": model.state_dict()}, tmp_path / "notok.pt"
    )
    with pytest.raises(UserError, match="names no tokenizer"):
        export_checkpoint(str(tmp_path / "notok.pt"), str(tmp_path / "x"))


def test_train_writes_safetensors_beside_its_checkpoint(tmp_path):
    (tmp_path / "corpus").mkdir()
    for name in ("a.txt", "b.txt"):  # two documents: one for each split
        (tmp_path / "corpus" / name).write_text(TEXT * 20)
    prepare([str(tmp_path / "corpus")], str(tmp_path / "data"), tokenizer="bytes", val_fraction=0.5)
    train.main(
        [
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "run"),
            "--max-tokens",
            "256",
            "--micro-batch",
            "4",
            "--seq-len",
            "32",
            "--global-batch-tokens",
            "256",
            "--eval-tokens",
            "128",
            "--warmup-tokens",
            "256",
        ]
    )
    from_checkpoint = Nirvana.from_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    from_folder = load_pretrained(str(tmp_path / "run"))
    assert from_folder.config == from_checkpoint.config
    assert_same_weights(from_checkpoint, from_folder)
    assert pretrained_tokenizer(str(tmp_path / "run")).spec == "bytes"


# ----------------------------------------------------------------------------------------------- transformers

HF_SCRIPT = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, sp_folder, text = sys.argv[1], sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
sp_tokenizer = AutoTokenizer.from_pretrained(sp_folder, trust_remote_code=True)
ids = tokenizer(text, return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids[:, :40]).logits
generated = model.generate(ids[:, :20], max_new_tokens=8, do_sample=False)
sp_ids = sp_tokenizer(text).input_ids
torch.save({"logits": logits, "generated": generated}, "out.pt")
print(json.dumps({"ids": ids[0].tolist(), "decoded": tokenizer.decode(ids[0]), "sp_ids": sp_ids,
                  "sp_decoded": sp_tokenizer.decode(sp_ids), "training": model.training,
                  "model_file": sys.modules[type(model).__module__].__file__,
                  "nirvana_loaded_from": sys.modules[type(model.model).__module__].__file__,
                  "repo_on_path": any(p and __import__("os").path.samefile(p, sys.argv[4]) for p in sys.path
                                      if __import__("os").path.isdir(p))}))
"""


def test_transformers_loads_the_folder_offline_in_a_fresh_process(
    model, folder, sentencepiece_model, tmp_path
):
    pytest.importorskip("transformers")
    sp_folder = str(tmp_path / "sp_tokenizer")
    save_tokenizer(sentencepiece_model, sp_folder)
    (tmp_path / "load.py").write_text(HF_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run(
        [sys.executable, "load.py", folder, sp_folder, TEXT, REPO],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report["repo_on_path"] and REPO not in report["nirvana_loaded_from"]
    # the folder's copy of nirvana.py
    assert report["nirvana_loaded_from"].startswith(str(tmp_path / "hf_home"))
    assert not report["training"]
    tok = load_tokenizer("bytes")
    assert report["ids"] == tok.encode(TEXT) and report["decoded"] == TEXT
    sp = load_tokenizer(sentencepiece_model)
    assert report["sp_ids"] == sp.encode(TEXT) and report["sp_decoded"] == TEXT
    out = torch.load(tmp_path / "out.pt")
    ids = torch.tensor([tok.encode(TEXT)])
    with torch.no_grad():
        logits, _ = model(ids[:, :40])
    assert torch.equal(out["logits"], logits)  # the same computation, bit-equal
    assert torch.equal(out["generated"], model.generate(ids[:, :20], 8, temperature=0))


def test_wrapper_loss_and_padding(model, folder):
    pytest.importorskip("transformers")
    from nirvana_hf.configuration_nirvana import NirvanaHFConfig
    from nirvana_hf.modeling_nirvana import NirvanaForCausalLM

    wrapper = NirvanaForCausalLM.from_pretrained(folder).eval()
    config = NirvanaHFConfig.from_pretrained(folder)
    assert config.nirvana_config() == dataclasses.replace(model.config, backend="torch")
    ids = torch.randint(0, 257, (2, 24))
    with torch.no_grad():
        out = wrapper(ids, labels=ids)
        _, loss = model(ids[:, :-1], ids[:, 1:])
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-6)
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="padding"):
        wrapper(ids, attention_mask=mask)
