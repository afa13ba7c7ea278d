"""Tests of `python mri.py` as a user runs it: a tiny run end to end writes every output, and each class of bad
input (bad option value, bad path, wrong file type, corrupt file, unknown variant, unusable output folder) gets
one line on stderr naming the problem, exit status 2, and leaves nothing written or overwritten."""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import pytest

import mri

ROOT = os.path.dirname(os.path.abspath(__file__))
TINY = ["--volumes", "4", "--slices", "3", "--size", "16", "--coils", "2", "--steps", "2", "--batch-size", "4",
        "--chans", "4", "--sens-chans", "2", "--pools", "1", "--enc-cascades", "1", "--varnet-cascades", "1",
        "--unet-chans", "4", "--vit-dim", "32", "--vit-depth", "1", "--patch", "4", "--dec-chans", "4",
        "--variants", "nirvana", "--device", "cpu"]


def test_main_end_to_end_writes_outputs(tmp_path):
    out = str(tmp_path / "out")
    mri.main(["--out", out, *TINY])
    for name in ("results.md", "results.json", "reports.md", "recon_grid_4x.png", "recon_grid_8x.png",
                 "training_curves.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    table = open(os.path.join(out, "results.md")).read()
    for method in ("zero-filled", "U-Net", "E2E-VarNet", "LLM[nirvana]"):
        assert method in table


def run_mri(*args):
    env = {k: v for k, v in os.environ.items() if k != "NIRVANA_DEBUG"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "mri.py"), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def assert_one_line_error(result, *fragments):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("mri.py: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def snapshot(folder):
    """{path: bytes} of every file under folder (to prove nothing was written or overwritten)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            files[path] = open(path, "rb").read()
    return files


@pytest.fixture
def out_folder(tmp_path):
    """An output folder holding a previous run's results.md, which a failed run must leave as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.md").write_text("previous results")
    return str(out)


@pytest.mark.parametrize("option, value, message", [
    ("--steps", "0", "argument --steps: expected a positive integer, got '0'"),
    ("--batch-size", "-4", "argument --batch-size: expected a positive integer"),
    ("--lr", "nan", "argument --lr: expected a number > 0"),
    ("--phase-seconds", "-1", "argument --phase-seconds: expected a number >= 0"),
    ("--val-checks", "0", "argument --val-checks"),
    ("--volumes", "2", "--volumes 2: train, validation and test need at least 3 volumes"),
    ("--size", "30", "--size 30 must be a multiple of --patch 8"),
    ("--train-acc", "4,5", "acceleration 5 is not in Table 10"),
    ("--eval-acc", "four", "argument --eval-acc"),
    ("--backbone", "missing.pt", "argument --backbone: missing.pt does not exist"),
])
def test_bad_option_values_are_refused_before_any_work(out_folder, option, value, message):
    before = snapshot(out_folder)
    assert_one_line_error(run_mri("--out", os.path.join(out_folder, "new"), option, value), message)
    assert snapshot(out_folder) == before and not os.path.exists(os.path.join(out_folder, "new"))


def write_text_files(folder, names):
    folder.mkdir()
    for name in names:
        (folder / name).write_text("not a volume\n")
    return str(folder)


def test_bad_inputs_of_a_run_are_refused_before_training(tmp_path, out_folder):
    """Each case needs torch and the package (a couple of seconds to import), so they share one test and run as
    concurrent processes; each has its own --out, which must not exist afterwards. Last, a run into an existing
    output folder fails on a corrupt file and leaves that folder as it was."""
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a checkpoint\n")
    text_h5 = write_text_files(tmp_path / "text_h5", ["a.h5", "b.h5", "c.h5"])
    no_h5 = write_text_files(tmp_path / "no_h5", ["readme.txt"])
    no_reports = tmp_path / "no_reports"
    no_reports.mkdir()
    for name in ("a.h5", "b.h5", "c.h5"):
        with h5py.File(no_reports / name, "w") as f:
            f["kspace"] = np.ones((2, 2, 16, 16), np.complex64)
            f["reconstruction_rss"] = np.ones((2, 16, 16), np.float32)
    cases = [
        (["--data", str(tmp_path / "missing")], ["--data", "missing does not exist", "give a folder"]),
        (["--data", str(text_file)], ["--data", "notes.txt is a file", "give a folder"]),
        (["--data", no_h5], ["no .h5 files in", "no_h5"]),
        (["--data", text_h5], ["text_h5", ".h5: corrupt or not an HDF5 file", "replace or remove it"]),
        (["--data", str(no_reports)], ["stage 1 needs a report per slice"]),
        (["--backbone", str(text_file)], ["--backbone", "notes.txt does not load", "train.py"]),
        (["--variants", "nirvana,nirvanna"], ["--variants: no variant 'nirvanna'", "transformer"]),
        (["--vit-dim", "100"], ["--vit-dim 100 must be a multiple of 4 and of its 3 attention heads"]),
        (["--device", "tpu"], ["--device tpu is not a device"]),
        (["--out", str(text_file)], ["--out", "notes.txt is a file"]),
    ]
    outs = [str(tmp_path / f"out{i}") for i in range(len(cases))]
    before = snapshot(out_folder)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda case, out: run_mri("--out", out, "--device", "cpu", *case[0]), cases, outs))
    for (args, fragments), out, result in zip(cases, outs, results):
        assert_one_line_error(result, *fragments)
        assert not os.path.exists(out), args
    assert text_file.read_text() == "not a checkpoint\n"
    assert_one_line_error(run_mri("--out", out_folder, "--device", "cpu", "--data", text_h5), "corrupt")
    assert snapshot(out_folder) == before
