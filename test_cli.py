"""Bad input to the scripts, one class at a time: each gives one line on stderr naming the problem and the
fix, exit status 2, and leaves every file as it was. The scripts run in-process through cli.run_main (what their
`__main__` calls); one test starts them as real processes to check that wiring."""

import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import cli
import eval as ev
import prepare
import sample
import train
from prepare import builtin_documents

REPO = os.path.dirname(os.path.abspath(__file__))
TINY_RUN = [
    "--micro-batch",
    "2",
    "--seq-len",
    "32",
    "--global-batch-tokens",
    "64",
    "--max-tokens",
    "64",
    "--eval-tokens",
    "64",
    "--log-every",
    "1",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder holding a bytes-tokenised corpus (data/), a one-step train.py run (run/ckpt.pt), a text file
    and a sentencepiece model; every test works inside it and checks that it stays as it was."""
    root = tmp_path_factory.mktemp("workspace")
    (root / "notes.txt").write_text("\n\n".join(builtin_documents()[:8]))
    prepare.prepare([str(root / "notes.txt")], str(root / "data"), "bytes", val_fraction=0.5)
    train.main(["--data", str(root / "data"), "--out", str(root / "run")] + TINY_RUN)
    return root


def snapshot(folder):
    """Every file under folder with its bytes: a failed command must leave this unchanged."""
    return {
        os.path.relpath(os.path.join(path, name), folder): open(os.path.join(path, name), "rb").read()
        for path, _, names in os.walk(folder)
        for name in names
    }


def fails(main, argv, capsys):
    """Runs main(argv) as the script would; -> its one stderr line (asserting exit status 2 and one line)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def check_all(cases, workspace, capsys, monkeypatch):
    """cases: (main, argv with {w} for the workspace, words the message must contain)."""
    monkeypatch.chdir(workspace)
    before = snapshot(workspace)
    for main, argv, words in cases:
        line = fails(main, [a.format(w=workspace) for a in argv], capsys)
        for word in words:
            assert word.format(w=workspace) in line, (argv, line)
        assert snapshot(workspace) == before, f"{argv} changed files"


def test_an_existing_run_is_not_replaced_without_resume_or_overwrite(workspace, capsys, monkeypatch):
    check_all(
        [
            (
                train.main,
                ["--data", "{w}/data", "--out", "{w}/run"] + TINY_RUN,
                ["{w}/run already holds a checkpoint", "--resume", "--overwrite"],
            ),
            (train.main, ["--out", "{w}/run", "--resume", "--overwrite"], ["give one of them"]),
            (
                prepare.main,
                ["--input", "{w}/notes.txt", "--out", "{w}/data", "--tokenizer", "bytes"],
                ["already holds a prepared corpus", "--overwrite"],
            ),
        ],
        workspace,
        capsys,
        monkeypatch,
    )


def test_zero_or_negative_numbers_are_refused_at_parse_time(workspace, capsys, monkeypatch):
    ckpt = "{w}/run/ckpt.pt"
    train_args = ["--data", "{w}/data", "--out", "{w}/new"]
    cases = [
        (train.main, train_args + [option, value], [f"argument {option}", repr(value)])
        for option, value in [
            ("--micro-batch", "0"),
            ("--seq-len", "-5"),
            ("--global-batch-tokens", "0"),
            ("--max-tokens", "0"),
            ("--eval-every", "0"),
            ("--eval-tokens", "-1"),
            ("--log-every", "0"),
            ("--stop-step", "0"),
            ("--lr", "-1"),
            ("--lr", "nan"),
            ("--beta2", "1"),
            ("--min-lr-fraction", "2"),
            ("--save-every", "-1"),
        ]
    ]
    cases += [
        (ev.main, ["ppl", "--checkpoint", ckpt, "--data", "{w}/data", option, value], [f"argument {option}"])
        for option, value in [("--context-length", "0"), ("--batch-size", "-1")]
    ]
    cases += [
        (ev.main, ["niah", "--checkpoint", ckpt, "--samples", "0"], ["argument --samples"]),
        (ev.main, ["niah", "--checkpoint", ckpt, "--depths", "0.5,1.5"], ["argument --depths", "[0, 1]"]),
        (ev.main, ["niah", "--checkpoint", ckpt, "--lengths", "256,0"], ["argument --lengths"]),
        (ev.main, ["speed", "--prompt-len", "0"], ["argument --prompt-len"]),
        (
            ev.main,
            ["extrapolate", "--checkpoint", ckpt, "--data", "{w}/data", "--lengths", "x"],
            ["--lengths"],
        ),
        (sample.main, ["--checkpoint", ckpt, "--max-new-tokens", "0"], ["argument --max-new-tokens"]),
        (sample.main, ["--checkpoint", ckpt, "--temperature", "-1"], ["argument --temperature"]),
        (sample.main, ["--checkpoint", ckpt, "--top-k", "0"], ["argument --top-k"]),
        (prepare.main, ["--input", "{w}/notes.txt", "--out", "{w}/p", "--vocab-size", "0"], ["--vocab-size"]),
        (prepare.main, ["--input", "{w}/notes.txt", "--out", "{w}/p", "--val-fraction", "1"], ["(0, 1)"]),
        (prepare.main, ["--input", "{w}/notes.txt", "--out", "{w}/p", "--workers", "0"], ["--workers"]),
    ]
    check_all(cases, workspace, capsys, monkeypatch)


def test_bad_paths_and_wrong_file_types(workspace, capsys, monkeypatch):
    (workspace / "text.pt").write_text("this is text, not a checkpoint")
    check_all(
        [
            (
                train.main,
                ["--data", "{w}/missing", "--out", "{w}/new"],
                ["data folder {w}/missing does not exist", "prepare.py"],
            ),
            (
                train.main,
                ["--data", "{w}/notes.txt", "--out", "{w}/new"],  # an existing text file, not a folder
                ["{w}/notes.txt is a file", "python prepare.py --input {w}/notes.txt --out"],
            ),
            (train.main, ["--data", "{w}", "--out", "{w}/new"], ["has no meta.json", "prepare.py"]),
            (
                ev.main,
                ["ppl", "--checkpoint", "{w}/run/missing.pt", "--data", "{w}/data"],
                ["does not exist"],
            ),
            (ev.main, ["ppl", "--checkpoint", "{w}/run", "--data", "{w}/data"], ["is a folder"]),
            (
                ev.main,
                ["ppl", "--checkpoint", "{w}/text.pt", "--data", "{w}/data"],
                ["{w}/text.pt is not a PyTorch checkpoint", "train.py"],
            ),
            (
                ev.main,
                ["ppl", "--checkpoint", "{w}/run/ckpt.pt", "--data", "{w}/nowhere.txt"],
                ["does not exist"],
            ),
            (
                ev.main,
                ["ppl", "--checkpoint", "{w}/run/ckpt.pt", "--data", "{w}/run/ckpt.pt"],
                ["not UTF-8 text"],
            ),
            (
                ev.main,
                ["lambada", "--checkpoint", "{w}/run/ckpt.pt", "--data", "{w}/notes.txt"],
                ["notes.txt:1 is not a JSON object with a 'text' field"],
            ),
            (sample.main, ["--checkpoint", "{w}/out/nirvana-tiny/ckpt.pt"], ["does not exist"]),
            (
                sample.main,
                ["--checkpoint", "{w}/run/ckpt.pt", "--prompt-file", "{w}/none.txt"],
                ["does not exist"],
            ),
            (prepare.main, ["--input", "{w}/missing.txt", "--out", "{w}/p"], ["does not exist"]),
            (prepare.main, ["--input", "{w}/text.pt", "--out", "{w}/p"], ["is not one of .txt, .jsonl"]),
        ],
        workspace,
        capsys,
        monkeypatch,
    )
    (workspace / "text.pt").unlink()


def test_corrupt_files_are_named(workspace, capsys, monkeypatch):
    whole = (workspace / "run" / "ckpt.pt").read_bytes()
    (workspace / "half.pt").write_bytes(whole[: len(whole) // 2])
    (workspace / "broken").mkdir()
    (workspace / "broken" / "meta.json").write_text("{not json")
    (workspace / "sp.model").write_text("not a sentencepiece model")
    with zipfile.ZipFile(workspace / "archive.pt", "w") as archive:  # a zip archive, but not torch.save's
        archive.writestr("notes.txt", "hello")
    torch.save(torch.zeros(3), workspace / "tensor.pt")  # torch.save's, but not a checkpoint
    (workspace / "bad.jsonl").write_text('{"text": "one"}\n{"body": "two"}\n')
    check_all(
        [
            (
                ev.main,
                ["ppl", "--checkpoint", "{w}/half.pt", "--data", "{w}/data"],
                ["{w}/half.pt is not a PyTorch checkpoint", "cut short"],
            ),
            (sample.main, ["--checkpoint", "{w}/half.pt"], ["{w}/half.pt is not a PyTorch checkpoint"]),
            (
                sample.main,
                ["--checkpoint", "{w}/archive.pt"],
                ["{w}/archive.pt is not a readable PyTorch checkpoint"],
            ),
            (sample.main, ["--checkpoint", "{w}/tensor.pt"], ["{w}/tensor.pt holds no 'config' and 'model'"]),
            (
                train.main,
                ["--data", "{w}/broken", "--out", "{w}/new"],
                ["{w}/broken/meta.json is not valid JSON"],
            ),
            (
                ev.main,
                [
                    "ppl",
                    "--checkpoint",
                    "{w}/run/ckpt.pt",
                    "--data",
                    "{w}/data",
                    "--tokenizer",
                    "{w}/sp.model",
                ],
                ["{w}/sp.model is not a sentencepiece model file"],
            ),
            (
                prepare.main,
                ["--input", "{w}/bad.jsonl", "--out", "{w}/p", "--tokenizer", "bytes"],
                ["bad.jsonl:2: not a JSON object with a string field 'text'"],
            ),
        ],
        workspace,
        capsys,
        monkeypatch,
    )
    for name in ("half.pt", "archive.pt", "tensor.pt", "broken/meta.json", "broken", "sp.model", "bad.jsonl"):
        path = workspace / name
        path.rmdir() if path.is_dir() else path.unlink()


def test_unknown_names_missing_tokenizer_and_ids_out_of_range(workspace, capsys, monkeypatch):
    checkpoint = torch.load(workspace / "run" / "ckpt.pt", weights_only=True)
    torch.save(dict(checkpoint, tokenizer=str(workspace / "gone.model")), workspace / "lost_tokenizer.pt")
    torch.save(dict(checkpoint, tokenizer=None), workspace / "no_tokenizer.pt")
    (workspace / "ids").mkdir()
    for name in os.listdir(workspace / "data"):
        (workspace / "ids" / name).write_bytes((workspace / "data" / name).read_bytes())
    shard = np.memmap(workspace / "ids" / "train_00000.bin", dtype=np.uint16, mode="r+")
    shard[5] = 300  # the bytes tokenizer has 257 ids
    shard.flush()
    val_shard = np.memmap(workspace / "ids" / "val_00000.bin", dtype=np.uint16, mode="r+")
    val_shard[7] = 999
    val_shard.flush()
    check_all(
        [
            (train.main, ["--preset", "nirvana-huge"], ["unknown preset 'nirvana-huge'"]),
            (train.main, ["--set", "windw=3"], ["--set windw=3: NirvanaConfig: unknown fields ['windw']"]),
            (train.main, ["--set", "n_heads=0"], ["n_heads"]),
            (ev.main, ["speed", "--size", "huge"], ["argument --size", "tiny, 125m, 350m, 1.3b"]),
            (ev.main, ["speed", "--variants", "nirvana,gpt"], ["argument --variants"]),
            (ev.main, ["niah", "--checkpoint", "{w}/run/ckpt.pt", "--tasks", "pk,xx"], ["argument --tasks"]),
            (
                ev.main,
                ["niah", "--checkpoint", "{w}/run/ckpt.pt", "--tasks", "pk", "--lengths", "40"],
                ["S-NIAH length 40 is too short"],
            ),
            (
                ev.main,
                ["ppl", "--checkpoint", "{w}/lost_tokenizer.pt", "--data", "{w}/data"],
                ["sentencepiece model '{w}/gone.model' not found"],
            ),
            (sample.main, ["--checkpoint", "{w}/no_tokenizer.pt"], ["names no tokenizer", "--tokenizer"]),
            (
                ev.main,
                [
                    "extrapolate",
                    "--checkpoint",
                    "{w}/run/ckpt.pt",
                    "{w}/no_tokenizer.pt",
                    "--data",
                    "{w}/data",
                ],
                ["{w}/no_tokenizer.pt names no tokenizer"],
            ),  # found before the first checkpoint is evaluated
            (
                sample.main,
                ["--checkpoint", "{w}/run/ckpt.pt", "--tokenizer", "gpt5"],
                ["unknown tokenizer spec 'gpt5'"],
            ),
            (
                train.main,
                ["--data", "{w}/ids", "--out", "{w}/new"] + TINY_RUN,
                ["token id 300 at data position 5 is outside the model's vocabulary [0, 257)"],
            ),
            (
                ev.main,
                ["ppl", "--checkpoint", "{w}/run/ckpt.pt", "--data", "{w}/ids"],
                ["token id 999 is outside the tokenizer's vocabulary [0, 257)"],
            ),
        ],
        workspace,
        capsys,
        monkeypatch,
    )
    assert not (workspace / "new").exists()  # the failed run left no folder, log or checkpoint


def test_scripts_report_user_errors_in_one_line_and_bugs_with_a_traceback(workspace):
    """The real processes, started together: `python <script>` prints one line and exits with 2;
    NIRVANA_DEBUG=1 shows the traceback instead."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    missing_input = ["prepare.py", "--input", str(workspace / "missing.txt"), "--out", str(workspace / "p")]
    commands = [
        (["train.py", "--data", str(workspace / "notes.txt")], env),
        (["eval.py", "ppl", "--checkpoint", str(workspace / "notes.txt"), "--data", "x"], env),
        (missing_input, env),
        (missing_input, {**env, "NIRVANA_DEBUG": "1"}),
    ]
    running = [
        subprocess.Popen(
            [sys.executable, os.path.join(REPO, argv[0])] + argv[1:],
            env=environment,
            cwd=workspace,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv, environment in commands
    ]
    results = [(process.wait(timeout=120), process.stderr.read()) for process in running]
    for (argv, _), (code, err) in list(zip(commands, results))[:3]:
        assert code == 2 and len(err.strip().splitlines()) == 1, (argv, code, err)
        assert err.startswith(argv[0]) and ": error: " in err, err
    code, err = results[3]
    assert code == 1 and "Traceback" in err and "missing.txt' does not exist" in err
    for process in running:
        process.stdout.close()
        process.stderr.close()


@pytest.mark.parametrize("existed", [False, True])
def test_a_failed_block_removes_what_it_wrote_but_what_it_kept(tmp_path, capsys, existed):
    """cli.no_half_made_output: entries written before keep() stay through a failure, later ones go, and the
    entries that were there before the block are untouched; without keep() a folder the block made goes."""
    folder = tmp_path / "out"
    if existed:
        folder.mkdir()
        (folder / "old.txt").write_text("before")
    with pytest.raises(RuntimeError), cli.no_half_made_output(str(folder)) as keep:
        folder.mkdir(exist_ok=True)
        (folder / "results.md").write_text("so far")
        keep()
        (folder / "grid.png").write_text("after keep")
        os.mkdir(folder / "later")
        raise RuntimeError("stopped")
    assert sorted(os.listdir(folder)) == sorted(["results.md"] + (["old.txt"] if existed else []))
    assert "kept what it had finished in" in capsys.readouterr().err
    with pytest.raises(RuntimeError), cli.no_half_made_output(str(tmp_path / "new")):
        os.mkdir(tmp_path / "new")
        (tmp_path / "new" / "results.md").write_text("never kept")
        raise RuntimeError("stopped")
    assert not (tmp_path / "new").exists()
