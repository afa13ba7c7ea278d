"""Tests of tokenizer.py, prepare.py and train.py on the CPU (a few minutes on 2 cores)."""

import base64
import contextlib
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import train
from cli import UserError
from nirvana import VARIANTS, Nirvana
from prepare import BUILTIN_VOCAB_SIZE, TokenShards, builtin_documents, prepare, prepare_builtin
from tokenizer import load_tokenizer, train_sentencepiece

REPO = os.path.dirname(os.path.abspath(__file__))
SMALL_RUN = [
    "--micro-batch",
    "4",
    "--seq-len",
    "32",
    "--global-batch-tokens",
    "256",
    "--eval-tokens",
    "128",
    "--log-every",
    "1",
    "--warmup-tokens",
    "512",
]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The built-in corpus with its 2k sentencepiece tokenizer, prepared once."""
    out = str(tmp_path_factory.mktemp("pydoc"))
    prepare_builtin(out)
    return out


def read_log(path):
    with open(path) as f:
        return [{k: float(v) if v else None for k, v in row.items()} for row in csv.DictReader(f)]


# ----------------------------------------------------------------------------- tokenizer.py


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("bytes")
    text = "Nirvana — task-aware memory ✓\n"
    ids = tok.encode(text)
    assert tok.vocab_size == 257 and tok.eos_id == 256 and max(ids) < 256
    assert tok.decode(ids + [tok.eos_id]) == text
    with pytest.raises(ValueError, match="outside"):
        tok.decode([257])


def test_sentencepiece_train_and_round_trip(tmp_path):
    documents = builtin_documents()[:20]
    path = train_sentencepiece(iter(documents), str(tmp_path / "sp"), vocab_size=1000)
    tok = load_tokenizer(path)
    assert tok.spec == path and tok.vocab_size == 1000 and 0 <= tok.eos_id < 1000
    text = documents[3][:2000] + "\n  unseen: ✓ Ωμέγα 12345"
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # no normalisation, byte fallback: lossless
    assert len(ids) < len(text.encode()) / 2  # it really merges
    # a vocabulary larger than the corpus supports is an upper bound, not an error
    assert (
        load_tokenizer(train_sentencepiece(iter(documents[:2]), str(tmp_path / "big"), 32000)).vocab_size
        < 32000
    )


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_characters="\u2581", blacklist_categories=("Cs",))))
def test_round_trip_of_any_text(corpus, text):
    for tok in (load_tokenizer("bytes"), load_tokenizer(TokenShards(corpus, "train").tokenizer)):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids) and tok.decode(ids) == text


def test_sentencepiece_from_files(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(builtin_documents()[:5]))
    tok = load_tokenizer(train_sentencepiece(str(tmp_path / "a.txt"), str(tmp_path / "sp"), vocab_size=500))
    assert tok.vocab_size == 500
    with pytest.raises(UserError, match="not found"):
        train_sentencepiece([str(tmp_path / "missing.txt")], str(tmp_path / "x"))


def test_tiktoken_from_local_ranks_file(tmp_path):
    ranks = [bytes([i]) for i in range(256)] + [b"th", b"the", b" the"]
    lines = [f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(ranks)]
    (tmp_path / "mini.tiktoken").write_text("".join(lines))
    tok = load_tokenizer(f"tiktoken:{tmp_path / 'mini.tiktoken'}")
    assert tok.vocab_size == 260 and tok.eos_id == 259
    assert tok.encode(" the") == [258]
    assert tok.decode(tok.encode("the theory ✓")) == "the theory ✓"


def test_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="prepare.py"):
        load_tokenizer(str(tmp_path / "none.model"))
    with pytest.raises(UserError, match="tiktoken"):
        load_tokenizer(f"tiktoken:{tmp_path / 'cl100k_base.tiktoken'}")
    with pytest.raises(UserError, match="unknown tokenizer spec"):
        load_tokenizer("gpt5")
    with pytest.raises(UserError, match="must be a string"):
        load_tokenizer(None)  # e.g. a checkpoint trained on pre-tokenised data names no tokenizer
    with pytest.raises(UserError, match="empty corpus"):
        train_sentencepiece(iter(["", "   \n"]), str(tmp_path / "x"))
    (tmp_path / "text.model").write_text("not a model")
    with pytest.raises(UserError, match="text.model is not a sentencepiece model file"):
        load_tokenizer(str(tmp_path / "text.model"))
    with pytest.raises(UserError, match="vocabulary of 10 .*256 byte pieces"):
        train_sentencepiece(iter(builtin_documents()[:2]), str(tmp_path / "small"), vocab_size=10)


# ----------------------------------------------------------------------------- prepare.py


def test_prepare_reads_txt_jsonl_and_dataset_folders(tmp_path):
    documents = builtin_documents()[:30]
    (tmp_path / "in" / "hf").mkdir(parents=True)
    (tmp_path / "in" / "one.txt").write_text(documents[0])
    with open(tmp_path / "in" / "hf" / "data-00000.jsonl", "w") as f:
        for d in documents[1:]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    (tmp_path / "in" / "hf" / "dataset_info.json").write_text("{}")  # skipped, not data
    meta = prepare(
        [str(tmp_path / "in")], str(tmp_path / "out"), "bytes", val_fraction=0.2, shard_tokens=20000
    )
    assert meta["dtype"] == "uint16" and len(meta["train"]) > 1  # several shards
    train_split, val_split = (
        TokenShards(str(tmp_path / "out"), "train"),
        TokenShards(str(tmp_path / "out"), "val"),
    )
    everything = np.concatenate(
        [train_split.read(0, train_split.num_tokens), val_split.read(0, val_split.num_tokens)]
    )
    assert (everything == 256).sum() == len(documents)  # one <eos> per document
    assert everything.size == sum(len(d.encode()) for d in documents) + len(documents)
    assert 0.05 < val_split.num_tokens / everything.size < 0.4
    tok = load_tokenizer("bytes")
    assert tok.decode(train_split.read(0, 200)) == documents[0][:200]
    # the stream wraps around at its end
    assert np.array_equal(train_split.read(train_split.num_tokens - 3, 6)[3:], train_split.read(0, 3))


def test_prepare_with_worker_processes_writes_what_one_process_writes(tmp_path):
    """--workers 2 encodes in spawned processes (a forked child of a process holding torch's thread locks can
    hang): the shards are byte for byte those of one process."""
    (tmp_path / "in.txt").write_text("\n\n".join(builtin_documents()[:40]))
    for workers in (1, 2):
        prepare(
            [str(tmp_path / "in.txt")],
            str(tmp_path / f"w{workers}"),
            "bytes",
            val_fraction=0.2,
            workers=workers,
        )
    for split in ("train", "val"):
        one, two = (TokenShards(str(tmp_path / f"w{w}"), split) for w in (1, 2))
        assert np.array_equal(one.read(0, one.num_tokens), two.read(0, two.num_tokens))


def test_prepare_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        prepare([str(tmp_path / "nowhere")], str(tmp_path / "out"), "bytes")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="empty corpus"):
        prepare([str(tmp_path / "empty.txt")], str(tmp_path / "out"), "bytes")
    (tmp_path / "doc.pdf").write_text("x")
    with pytest.raises(UserError, match="not one of"):
        prepare([str(tmp_path / "doc.pdf")], str(tmp_path / "out"), "bytes")
    (tmp_path / "bad.jsonl").write_text('{"text": "a fine first document"}\n{"body": "no text field"}\n')
    with pytest.raises(UserError, match="bad.jsonl:2"):
        prepare([str(tmp_path / "bad.jsonl")], str(tmp_path / "out"), "bytes", shard_tokens=4)
    assert not (tmp_path / "out").exists()  # the shards written before the bad line are gone, and the folder
    # a prepared folder is replaced only when asked
    (tmp_path / "good.txt").write_text("\n".join(builtin_documents()[:5]))
    first = prepare([str(tmp_path / "good.txt")], str(tmp_path / "out"), "bytes", val_fraction=0.5)
    with pytest.raises(UserError, match="already holds a prepared corpus.*--overwrite"):
        prepare([str(tmp_path / "good.txt")], str(tmp_path / "out"), "bytes", val_fraction=0.5)
    again = prepare(
        [str(tmp_path / "good.txt")], str(tmp_path / "out"), "bytes", val_fraction=0.5, overwrite=True
    )
    assert again["train"] == first["train"]


def test_parquet_and_arrow_need_pyarrow_or_read(tmp_path):
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        for name in ("shard.parquet", "data-00000-of-00001.arrow"):
            (tmp_path / name).write_bytes(b"PAR1")
            with pytest.raises(UserError, match="pip install pyarrow"):
                prepare([str(tmp_path / name)], str(tmp_path / "out"), "bytes")
        return
    documents = builtin_documents()[:20]
    table = pyarrow.table({"id": list(range(20)), "text": documents})
    pyarrow.parquet.write_table(table, tmp_path / "shard.parquet")
    (tmp_path / "hf").mkdir()  # a HF datasets save_to_disk folder: arrow IPC stream files and json metadata
    with pyarrow.ipc.new_stream(str(tmp_path / "hf" / "data-00000-of-00001.arrow"), table.schema) as writer:
        writer.write_table(table)
    (tmp_path / "hf" / "state.json").write_text("{}")
    expected = sum(len(d.encode()) + 1 for d in documents)
    for source in ("shard.parquet", "hf"):
        meta = prepare([str(tmp_path / source)], str(tmp_path / source) + "_out", "bytes", val_fraction=0.2)
        assert sum(s["tokens"] for s in meta["train"] + meta["val"]) == expected
    with pytest.raises(UserError, match="no column 'body'"):
        prepare([str(tmp_path / "shard.parquet")], str(tmp_path / "x"), "bytes", text_field="body")


def test_builtin_corpus(corpus):
    meta = json.load(open(os.path.join(corpus, "meta.json")))
    assert meta["vocab_size"] == BUILTIN_VOCAB_SIZE and meta["dtype"] == "uint16"
    assert sum(s["tokens"] for s in meta["train"]) > 100_000
    assert meta["tokenizer"] == "tokenizer.model"  # relative to the folder
    tok = load_tokenizer(TokenShards(corpus, "train").tokenizer)
    assert "statement" in tok.decode(TokenShards(corpus, "train").read(0, 50))


# ----------------------------------------------------------------------------- train.py


def test_set_overrides_preset_fields_with_typed_values():
    args = train.parse_args(
        [
            "--preset",
            "nirvana-125m",
            "--set",
            "d_model=384",
            "--set",
            "detach_inner_grad=True",
            "--set",
            "variant=transformer",
        ]
    )
    assert args.config_overrides == {"d_model": 384, "detach_inner_grad": True, "variant": "transformer"}
    with pytest.raises(SystemExit):
        train.parse_args(["--set", "window"])  # not FIELD=VALUE
    with pytest.raises(SystemExit):
        train.parse_args(["--set", "vocab_size=100"])  # the data decides it
    with pytest.raises(SystemExit):
        train.parse_args(["--set", "windw=3"])  # not a NirvanaConfig field: refused before any work


def test_schedule_warmup_then_cosine():
    s = train.Schedule(peak_lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert s.lr(0) == pytest.approx(0.1) and s.lr(9) == pytest.approx(1.0)
    assert s.lr(60) == pytest.approx(0.55) and s.lr(110) == pytest.approx(0.1)
    assert all(s.lr(i) >= s.lr(i + 1) for i in range(10, 120))


def test_loss_falls_on_tiny_preset(corpus, tmp_path):
    result = train.main(
        [
            "--data",
            corpus,
            "--out",
            str(tmp_path),
            "--max-tokens",
            str(60 * 512),
            "--micro-batch",
            "8",
            "--seq-len",
            "64",
            "--global-batch-tokens",
            "512",
            "--warmup-tokens",
            "2048",
            "--eval-every",
            "30",
            "--eval-tokens",
            "1024",
            "--log-every",
            "10",
        ]
    )
    losses = result["losses"]
    assert len(losses) == 60
    assert losses[0] > math.log(BUILTIN_VOCAB_SIZE) - 0.5  # starts near uniform
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    assert result["val_losses"][-1][1] < result["val_losses"][0][1]
    assert os.path.getsize(tmp_path / "loss.png") > 1000
    model = Nirvana.from_checkpoint(str(tmp_path / "ckpt.pt"))  # the shared checkpoint format
    assert model.config.vocab_size == BUILTIN_VOCAB_SIZE
    spec = torch.load(tmp_path / "ckpt.pt", weights_only=True)["tokenizer"]
    assert load_tokenizer(spec).vocab_size == BUILTIN_VOCAB_SIZE  # eval/mri reload the tokenizer from it


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_trains(corpus, tmp_path, variant):
    result = train.main(
        [
            "--preset",
            f"{variant}-tiny",
            "--data",
            corpus,
            "--out",
            str(tmp_path),
            "--max-tokens",
            str(2 * 256),
            "--eval-every",
            "2",
        ]
        + SMALL_RUN
    )
    assert len(result["losses"]) == 2 and all(math.isfinite(x) for x in result["losses"])
    assert Nirvana.from_checkpoint(str(tmp_path / "ckpt.pt")).config.variant == variant


def test_stop_and_resume_equals_uninterrupted(corpus, tmp_path):
    args = ["--data", corpus, "--max-tokens", str(6 * 256), "--eval-every", "2"] + SMALL_RUN
    whole = train.main(args + ["--out", str(tmp_path / "whole")])
    first = train.main(args + ["--out", str(tmp_path / "parts"), "--stop-step", "3"])
    second = train.main(args + ["--out", str(tmp_path / "parts"), "--resume"])
    assert len(first["losses"]) == 3 and len(second["losses"]) == 3
    assert first["losses"] + second["losses"] == whole["losses"]  # exactly
    assert second["val_losses"] == [v for v in whole["val_losses"] if v[0] > 3]
    logged = read_log(tmp_path / "parts" / "log.csv")
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]  # the resumed log continues the first


def torchrun(args, cwd):
    """train.py in 2 CPU processes (gloo) under torchrun; returns its stdout.

    A worker killed by SIGABRT is retried once, loudly: on this 2-core CI machine that happened in about one
    full test run of seven (cause not yet found; never reproduced in isolation). Any other failure, or a
    second abort, fails the test; the callers' loss comparisons are unchanged.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(REPO, "train.py"),
        *args,
    ]
    for attempt in (1, 2):
        done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
        if done.returncode == 0 or "Signal 6 (SIGABRT)" not in done.stdout + done.stderr or attempt == 2:
            break
        print(
            f"torchrun: a worker aborted (SIGABRT); retrying once. Its output ends:\n{done.stderr[-1500:]}",
            file=sys.stderr,
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_ddp_then_fsdp_then_one_process_equal_one_uninterrupted_run(corpus, tmp_path):
    """Steps 1-2 in two DDP processes, 3-4 resumed in two FSDP processes, 5-6 resumed in one process: the
    same losses as one uninterrupted single-process run. Each part saves the full state that the next one
    (another topology) loads, so this checks DDP and FSDP training, FSDP's gathered save and sharded load."""
    run = ["--data", corpus, "--max-tokens", str(6 * 256), "--eval-every", "2"] + SMALL_RUN
    whole = train.main(run + ["--out", str(tmp_path / "whole")])
    args = run + ["--out", str(tmp_path / "parts")]
    assert "2 x cpu, ddp" in torchrun(args + ["--dist", "ddp", "--stop-step", "2"], tmp_path)
    assert torch.load(tmp_path / "parts" / "ckpt.pt", weights_only=True)["step"] == 2
    assert "2 x cpu, fsdp" in torchrun(args + ["--dist", "fsdp", "--stop-step", "4", "--resume"], tmp_path)
    assert torch.load(tmp_path / "parts" / "ckpt.pt", weights_only=True)["step"] == 4
    last = train.main(args + ["--resume"])
    assert last["losses"] == pytest.approx(whole["losses"][4:], rel=1e-5)
    logged = read_log(tmp_path / "parts" / "log.csv")
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in logged] == pytest.approx(whole["losses"], rel=1e-5)
    assert [r["val_loss"] for r in logged if r["val_loss"]] == pytest.approx(
        [v for _, v in whole["val_losses"]], rel=1e-5
    )


def test_bad_inputs_give_clear_errors(corpus, tmp_path):
    base = ["--max-tokens", "256", "--eval-every", "1"] + SMALL_RUN
    with pytest.raises(UserError, match="does not exist"):
        train.main(base + ["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a")])
    with pytest.raises(UserError, match="not a multiple"):
        train.main(base + ["--data", corpus, "--out", str(tmp_path / "a"), "--global-batch-tokens", "300"])
    assert not (tmp_path / "a").exists()  # refused before any output
    # a token id beyond the vocabulary
    (tmp_path / "in.txt").write_text("\n\n".join(builtin_documents()[:20]))
    prepare([str(tmp_path / "in.txt")], str(tmp_path / "bytes"), "bytes", val_fraction=0.5)
    shard = np.memmap(tmp_path / "bytes" / "train_00000.bin", dtype=np.uint16, mode="r+")
    shard[100] = 300
    shard.flush()
    with pytest.raises(UserError, match="token id 300 at data position 100"):
        train.main(base + ["--data", str(tmp_path / "bytes"), "--out", str(tmp_path / "b")])
    assert not (tmp_path / "b").exists()  # no header-only log, no empty folder
    # a checkpoint from another config
    train.main(base + ["--data", corpus, "--out", str(tmp_path / "c")])
    with pytest.raises(UserError, match="another model config.*variant"):
        train.main(
            base
            + ["--data", corpus, "--out", str(tmp_path / "c"), "--resume", "--preset", "gated-deltanet-tiny"]
        )
    with pytest.raises(UserError, match="no checkpoint"):
        train.main(base + ["--data", corpus, "--out", str(tmp_path / "d"), "--resume"])


def test_a_run_folder_with_a_checkpoint_is_never_replaced_silently(corpus, tmp_path, capsys):
    args = ["--data", corpus, "--out", str(tmp_path), "--max-tokens", "512", "--eval-every", "2"] + SMALL_RUN
    first = train.main(args)
    ckpt = tmp_path / "ckpt.pt"
    out = capsys.readouterr().out
    assert f"saved checkpoint {ckpt}" in out and "(first 128 validation tokens)" in out
    before = {name: (tmp_path / name).read_bytes() for name in ("ckpt.pt", "log.csv", "loss.png")}
    with pytest.raises(UserError, match="already holds a checkpoint.*--resume.*--overwrite"):
        train.main(args + ["--seed", "7"])
    assert {name: (tmp_path / name).read_bytes() for name in before} == before  # nothing touched
    again = train.main(args + ["--seed", "7", "--overwrite"])
    assert again["losses"] != first["losses"]  # another initialisation, the old run replaced
    assert [r["step"] for r in read_log(tmp_path / "log.csv")] == [1, 2]
    assert ckpt.read_bytes() != before["ckpt.pt"]


def test_nan_loss_stops_with_step_number(corpus, tmp_path, monkeypatch):
    class DivergingNirvana(Nirvana):
        calls = 0

        def forward(self, idx, targets=None, return_trace=False):
            logits, loss = super().forward(idx, targets)
            DivergingNirvana.calls += 1
            diverged = DivergingNirvana.calls >= 2  # one forward per step here: NaN from step 2 on
            return logits, loss * float("nan") if diverged else loss

    monkeypatch.setattr(train, "Nirvana", DivergingNirvana)
    with pytest.raises(FloatingPointError, match="loss is nan at step 2"):
        train.main(
            [
                "--data",
                corpus,
                "--out",
                str(tmp_path),
                "--max-tokens",
                "2048",
                "--eval-every",
                "100",
                "--micro-batch",
                "8",
                "--seq-len",
                "32",
                "--global-batch-tokens",
                "256",
                "--log-every",
                "1",
            ]
        )


def tiny_model_and_fused_adamw(device, backend="torch"):
    """nirvana-tiny (seed 0) and train.py's AdamW groups as fused AdamW, the optimizer --cuda-graph needs."""
    torch.manual_seed(0)
    model = Nirvana(train.NirvanaConfig.from_preset("nirvana-tiny", backend=backend)).to(device)
    args = train.parse_args(["--preset", "nirvana-tiny"])
    groups = [
        {"params": g["params"], "weight_decay": g["weight_decay"]}
        for g in train.build_optimizer(args, model).param_groups
    ]
    return model, torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), fused=True)


def eager_step(model, optimizer, x, y, grad_clip, autocast=None):
    """train_step's work written plainly: the reference of device_train_step."""
    total = 0.0
    for micro in range(len(x)):
        with autocast or contextlib.nullcontext():
            loss = model(x[micro], y[micro])[1]
        (loss / len(x)).backward()
        total += float(loss.detach())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if math.isfinite(total):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(x), float(grad_norm)


def test_device_train_step_equals_the_eager_step_and_skips_adamw_on_a_non_finite_loss():
    """The body of --cuda-graph's step on the CPU: two steps of 2 micro-batches (the second clipped) give the
    eager step's losses, gradient norms and weights; a NaN loss leaves weights and AdamW's state untouched."""
    x = torch.randint(0, 512, (2, 2, 24), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=-1)
    reference, reference_optimizer = tiny_model_and_fused_adamw("cpu")
    model, optimizer = tiny_model_and_fused_adamw("cpu")
    for grad_clip in (1e9, 0.05):
        want = eager_step(reference, reference_optimizer, x, y, grad_clip)
        loss, grad_norm = train.device_train_step(model, optimizer, x, y, grad_clip, contextlib.nullcontext())
        optimizer.zero_grad(set_to_none=True)
        assert loss.shape == grad_norm.shape == ()
        assert float(loss) == pytest.approx(want[0], rel=1e-6)
        assert float(grad_norm) == pytest.approx(want[1], rel=1e-5)
        assert want[1] > 0.05 or grad_clip > 1  # the second step's clipping does act
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    before = [p.detach().clone() for p in model.parameters()]
    steps = [optimizer.state[p]["step"].clone() for p in model.parameters()]
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    loss, _ = train.device_train_step(model, optimizer, x, y, 1.0, contextlib.nullcontext())
    assert not math.isfinite(float(loss))
    for p, b, s in zip(model.parameters(), before[:], steps):
        if p is not model.lm_head.weight:
            assert torch.equal(p, b)
        assert torch.equal(optimizer.state[p]["step"], s)


def test_cuda_graph_needs_one_gpu_process(corpus, tmp_path):
    base = ["--data", corpus, "--out", str(tmp_path / "a"), "--max-tokens", "256"] + SMALL_RUN
    with pytest.raises(UserError, match="--cuda-graph captures the eager step of one process on a GPU"):
        train.main(base + ["--cuda-graph", "--device", "cpu"])
    assert not (tmp_path / "a").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_steps_equal_eager_steps_on_a_gpu():
    """Six steps of nirvana-tiny on the Triton backend under bf16 autocast (2 micro-batches): the first two
    eager on a side stream, the third captured, the rest replayed, against the eager step on the same weights.
    bf16 autocast rounds the same way in both, so the losses agree to 1e-3 relative and the weights to 1e-3."""
    generator = torch.Generator().manual_seed(2)
    reference, reference_optimizer = tiny_model_and_fused_adamw("cuda", backend="triton")
    model, optimizer = tiny_model_and_fused_adamw("cuda", backend="triton")
    graph_step = train.CudaGraphTrainStep(model, optimizer, 2, 2, 96, grad_clip=1.0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    for step in range(6):
        x = torch.randint(0, 512, (2, 2, 96), generator=generator).cuda()
        y = torch.roll(x, -1, dims=-1)
        lr = 1e-3 * (step + 1) / 6
        for group in reference_optimizer.param_groups:
            group["lr"] = lr
        want = eager_step(reference, reference_optimizer, x, y, 1.0, autocast)
        got = graph_step(list(zip(x, y)), lr)
        assert got[0] == pytest.approx(want[0], rel=1e-3), step
        assert got[1] == pytest.approx(want[1], rel=2e-2), step
    assert graph_step.graph is not None
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-3)
