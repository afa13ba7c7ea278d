"""Tests of `python mri.py` as a user runs it: a tiny run end to end writes every output, and each class of
bad input (bad option value, bad path, wrong file type, corrupt file, unknown variant, unusable output folder)
gets one line on stderr naming the problem, exit status 2, and leaves nothing written or overwritten."""

import importlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import pytest

import mri
import nirvana
from cli import UserError
from mri_recon import experiment
from mri_recon.fastmri_files import write_volume
from mri_recon.phantoms import acquire, field_of_view_grid
from test_mri_data import write_head_nifti

ROOT = os.path.dirname(os.path.abspath(__file__))
TINY = (
    "--volumes 4 --slices 3 --size 16 --coils 2 --steps 2 --batch-size 4 --chans 4 --sens-chans 2 --pools 1 "
    "--enc-cascades 1 --varnet-cascades 1 --unet-chans 4 --vit-dim 32 --vit-depth 1 --patch 4 --dec-chans 4 "
    "--variants nirvana --device cpu"
).split()


def experiment_script(name):
    """The module of experiments/<name>.py, imported as its tests call its main."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(os.path.join(ROOT, "experiments"))


def test_main_end_to_end_writes_outputs(tmp_path):
    """With --diagnose and --image-skip: every output, every method with --steps optimizer steps in each phase
    (stage 0 on by default), the diagnostics, the skip-only row and the majority baseline beside the reports."""
    out = str(tmp_path / "out")
    mri.main(["--out", out, *TINY, "--diagnose", "--image-skip"])
    for name in (
        "results.md",
        "results.json",
        "reports.md",
        "recon_grid_4x.png",
        "recon_grid_8x.png",
        "training_curves.png",
    ):
        assert os.path.getsize(os.path.join(out, name)) > 0
    table = open(os.path.join(out, "results.md")).read()
    assert f"command: `python mri.py --out {out} {' '.join(TINY)} --diagnose --image-skip`" in table
    for method in ("zero-filled", "U-Net", "E2E-VarNet", "LLM[nirvana]", "LLM[nirvana] skip only"):
        assert f"| {method} |" in table
    results = json.load(open(os.path.join(out, "results.json")))
    nirvana_steps = "2 (stage 0) + 2 (stage 1) + 2 (stage 2)"
    assert results["steps"] == {
        "zero-filled": "-",
        "U-Net": "2",
        "E2E-VarNet": "2",
        "LLM[nirvana]": nirvana_steps,
        "LLM[nirvana] skip only": nirvana_steps,
    }
    assert f"| {nirvana_steps} |" in table and "| U-Net | " in table
    assert set(results["diagnostics"]) == {"LLM[nirvana] 4x", "LLM[nirvana] 8x"}
    assert "Does the image pass through the backbone?" in table and "| majority (" in table
    assert "same report" in table  # the gate / Trigger distances between slices
    assert "Majority baseline, 4x" in open(os.path.join(out, "reports.md")).read()


def test_results_so_far_are_written_after_each_method(tmp_path, monkeypatch):
    """A run stopped part way keeps what finished: results.md and results.json after the baselines, again after
    each backbone (marked PARTIAL, naming the methods still to train), then the whole; each method is scored
    once, so its numbers do not change between the writes; results.json's per-volume scores hold every method
    scored so far."""
    out = tmp_path / "out"
    writes = []
    evaluate_and_write = experiment.evaluate_and_write

    def spy(run, data, args, t_start, still_to_train=()):
        summary = evaluate_and_write(run, data, args, t_start, still_to_train)
        results = json.load(open(out / "results.json"))
        assert list(results["per_volume"]) == list(results["summary"])  # every method scored so far
        writes.append((tuple(still_to_train), open(out / "results.md").read(), results["summary"]))
        return summary

    monkeypatch.setattr(experiment, "evaluate_and_write", spy)
    mri.main(["--out", str(out), *TINY, "--variants", "nirvana,transformer"])
    assert [still for still, _, _ in writes] == [
        ("LLM[nirvana]", "LLM[transformer]"),
        ("LLM[transformer]",),
        (),
    ]
    for (still, table, summary), shown in zip(writes, (1, 2, 3)):
        methods = ["zero-filled", "U-Net", "E2E-VarNet", "LLM[nirvana]", "LLM[transformer]"][: 2 + shown]
        assert list(summary) == methods
        assert (
            "PARTIAL: written while the run goes on; still to train: " + ", ".join(still) in table
        ) == bool(still)
    assert all(summary["U-Net"] == writes[-1][2]["U-Net"] for _, _, summary in writes)
    assert writes[1][2]["LLM[nirvana]"] == writes[-1][2]["LLM[nirvana]"]


def test_a_run_stopped_part_way_keeps_the_results_of_the_finished_methods(tmp_path, monkeypatch):
    """A failure while a backbone trains (here an error; a job's time limit sends SIGTERM, handled the same
    way) leaves the baselines' results, marked PARTIAL, and nothing of the backbone."""
    out = tmp_path / "out"

    def fail(*args, **kwargs):
        raise RuntimeError("stopped while training a backbone")

    monkeypatch.setattr(experiment, "train_backbone", fail)
    with pytest.raises(RuntimeError):
        mri.main(["--out", str(out), *TINY])
    table = open(out / "results.md").read()
    assert "PARTIAL: written while the run goes on; still to train: LLM[nirvana]" in table
    assert "| U-Net |" in table and "LLM[nirvana]" not in table.split("still to train")[1].split("\n", 1)[1]
    assert os.path.getsize(out / "recon_grid_4x.png") > 0


def test_data_consistency_run_scores_the_step_beside_the_decoder_alone_and_without_the_backbone(tmp_path):
    out = tmp_path / "out"
    mri.main(["--out", str(out), *TINY, "--data-consistency"])
    results = json.load(open(out / "results.json"))
    rows = ("LLM[nirvana]", "LLM[nirvana] decoder alone", "LLM[nirvana] encoder image + DC")
    assert set(rows) <= set(results["summary"])
    assert results["params"]["LLM[nirvana] encoder image + DC"] < results["params"]["LLM[nirvana]"]
    ssim = {row: results["summary"][row]["4"]["ssim"][0] for row in rows}
    assert ssim["LLM[nirvana]"] != ssim["LLM[nirvana] decoder alone"]


def test_queries_see_kspace_adds_its_projection_to_the_trainable_parameters(tmp_path):
    """--queries-see-kspace end to end: the pipeline's trainable parameters grow by the projection of the mean
    k-space token (d_model x d_model + d_model), and the run completes its three stages."""
    params = {}
    for extra in ([], ["--queries-see-kspace"]):
        out = tmp_path / ("with" if extra else "without")
        mri.main(["--out", str(out), *TINY, *extra])
        results = json.load(open(out / "results.json"))
        assert results["steps"]["LLM[nirvana]"] == "2 (stage 0) + 2 (stage 1) + 2 (stage 2)"
        params[bool(extra)] = results["params"]["LLM[nirvana]"]
    d_model = nirvana.NirvanaConfig.from_preset("nirvana-tiny").d_model
    assert params[True] - params[False] == d_model * d_model + d_model


def test_findings_stage_runs_between_stage_0_and_stage_1_and_is_counted(tmp_path):
    out = tmp_path / "out"
    mri.main(["--out", str(out), *TINY, "--encoder-findings-steps", "3"])
    results = json.load(open(out / "results.json"))
    steps = "2 (stage 0) + 3 (stage findings) + 2 (stage 1) + 2 (stage 2)"
    assert results["steps"]["LLM[nirvana]"] == steps
    assert len(results["fits"]["LLM[nirvana] stage findings"]["losses"]) == 3


def run_mri(*args):
    env = {k: v for k, v in os.environ.items() if k != "NIRVANA_DEBUG"}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "mri.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


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


@pytest.fixture
def inputs(tmp_path):
    """Bad inputs on disk: a text file, a folder of text files named .h5, a folder without .h5 files, a
    folder of fastMRI files without the reports stage 1 needs, one whose reports state no finding, text files
    named .nii / .nii.gz, a NIfTI head image and that file cut short."""
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    for folder, names in (("text_h5", ["a.h5", "b.h5", "c.h5"]), ("no_h5", ["readme.txt"])):
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / name).write_text("not a volume\n")
    (tmp_path / "fake.nii").write_text("not an image\n")
    (tmp_path / "fake.nii.gz").write_text("not gzip\n")
    head = write_head_nifti(tmp_path / "head.nii.gz")
    (tmp_path / "truncated.nii.gz").write_bytes(open(head, "rb").read()[:2000])  # its header reads, no more
    (tmp_path / "no_reports").mkdir()
    for name in ("a.h5", "b.h5", "c.h5"):
        with h5py.File(tmp_path / "no_reports" / name, "w") as f:
            f["kspace"] = np.ones((2, 2, 16, 16), np.complex64)
            f["reconstruction_rss"] = np.ones((2, 16, 16), np.float32)
    (tmp_path / "free_reports").mkdir()
    for name in ("a.h5", "b.h5", "c.h5"):  # reports in words of their own: no finding to read from them
        with h5py.File(tmp_path / "free_reports" / name, "w") as f:
            f["kspace"] = np.ones((2, 2, 16, 16), np.complex64)
            f["reconstruction_rss"] = np.ones((2, 16, 16), np.float32)
            f["reports"] = ["unremarkable.", "unremarkable."]
    return tmp_path


# Refused while the options are parsed, before torch is imported: (arguments, fragments of the message).
# {inputs} is the folder of the `inputs` fixture.
OPTION_CASES = [
    (["--steps", "0"], ["argument --steps: expected a positive integer, got '0'"]),
    (["--batch-size", "-4"], ["argument --batch-size: expected a positive integer"]),
    (["--lr", "nan"], ["argument --lr: expected a number > 0"]),
    (["--phase-seconds", "-1"], ["argument --phase-seconds: expected a number >= 0"]),
    (["--encoder-pretrain-steps", "-1"], ["argument --encoder-pretrain-steps: expected an integer >= 0"]),
    (["--stage1-steps", "0"], ["argument --stage1-steps: expected a positive integer, got '0'"]),
    (["--image-skip", "yes"], ["unrecognized arguments: yes"]),
    (
        ["--encoder-pretrain-steps", "0", "--stage1-cascades", "freeze"],
        ["--stage1-cascades freeze needs stage 0"],
    ),
    (["--stage1-cascades", "keep"], ["argument --stage1-cascades: invalid choice: 'keep'"]),
    (["--vit-stride", "32"], ["argument --vit-stride: invalid choice: 32"]),
    (["--val-checks", "0"], ["argument --val-checks"]),
    (["--volumes", "2"], ["--volumes 2: train, validation and test need at least 3 volumes"]),
    (["--size", "30"], ["--size 30 must be a multiple of --patch 8"]),
    (["--train-acc", "4,5"], ["acceleration 5 is not in Table 10"]),
    (["--eval-acc", "four"], ["argument --eval-acc"]),
    (["--backbone", "{inputs}/missing.pt"], ["argument --backbone:", "missing.pt does not exist"]),
    (["--data", "{inputs}/missing"], ["argument --data:", "missing does not exist", "give a folder"]),
    (["--data", "{inputs}/notes.txt"], ["argument --data:", "notes.txt is a file", "give a folder"]),
    (["--data", "{inputs}/no_h5"], ["argument --data: no .h5 files in", "no_h5"]),
    (["--generate", "{inputs}/notes.txt"], ["argument --generate:", "notes.txt is a file"]),
    (["--anatomy", "{inputs}/missing.nii.gz"], ["argument --anatomy:", "missing.nii.gz does not exist"]),
    (["--anatomy", "{inputs}"], ["argument --anatomy:", "is a folder"]),
    (["--anatomy", "{inputs}/notes.txt"], ["argument --anatomy:", "notes.txt is not named .nii or .nii.gz"]),
    (
        ["--anatomy", "{inputs}/fake.nii"],
        ["argument --anatomy:", "fake.nii has no NIfTI-1 or NIfTI-2 header"],
    ),
    (["--anatomy", "{inputs}/fake.nii.gz"], ["argument --anatomy:", "fake.nii.gz: unreadable"]),
    (
        ["--anatomy", "{inputs}/head.nii.gz", "--data", "{inputs}/no_reports"],
        ["--anatomy and --data exclude each other"],
    ),
]


@pytest.mark.parametrize("args, fragments", OPTION_CASES, ids=[" ".join(a) for a, _ in OPTION_CASES])
def test_bad_options_are_refused_before_any_work(inputs, out_folder, args, fragments):
    before, new_out = snapshot(inputs), os.path.join(out_folder, "new")
    args = [a.format(inputs=inputs) for a in args]
    assert_one_line_error(run_mri("--out", new_out, *args), *fragments)
    assert snapshot(inputs) == before and not os.path.exists(new_out)


def test_out_that_is_a_file_is_refused(inputs):
    assert_one_line_error(
        run_mri("--out", str(inputs / "notes.txt")), "argument --out:", "notes.txt is a file"
    )
    assert (inputs / "notes.txt").read_text() == "not a checkpoint\n"


# Refused after torch and the package are imported, before any training.
RUN_CASES = [
    (["--data", "{inputs}/no_reports"], ["stage 1 needs a report per slice"]),
    (
        ["--data", "{inputs}/free_reports", "--encoder-findings-steps", "5"],
        ["--encoder-findings-steps", "state no finding with two or more values"],
    ),
    (
        ["--backbone", "{inputs}/notes.txt"],
        ["--backbone", "notes.txt is not a PyTorch checkpoint", "train.py"],
    ),
    (["--variants", "nirvana,nirvanna"], ["--variants: no variant 'nirvanna'", "transformer"]),
    (["--vit-dim", "100"], ["--vit-dim 100 must be a multiple of 4 and of its 3 attention heads"]),
    (["--device", "tpu"], ["--device tpu is not a device"]),
    (["--anatomy", "{inputs}/truncated.nii.gz"], ["truncated.nii.gz: not a readable NIfTI image"]),
]


def test_bad_inputs_of_a_run_are_refused_before_training(inputs, out_folder):
    """Each case imports torch (a couple of seconds), so they share one test and run as concurrent processes,
    each with its own --out, which must not exist afterwards. A corrupt (text) .h5 file is named in the
    message, and the output folder of an earlier run it was to write into is left as it was."""
    outs = [str(inputs / f"out{i}") for i in range(len(RUN_CASES))]
    commands = [
        ["--out", out, "--device", "cpu", *[a.format(inputs=inputs) for a in args]]
        for (args, _), out in zip(RUN_CASES, outs)
    ]
    commands.append(["--out", out_folder, "--device", "cpu", "--data", str(inputs / "text_h5")])
    before = snapshot(out_folder)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda command: run_mri(*command), commands))
    for (args, fragments), out, result in zip(RUN_CASES, outs, results):
        assert_one_line_error(result, *fragments)
        assert not os.path.exists(out), args
    assert_one_line_error(results[-1], "text_h5", ".h5: corrupt or not an HDF5 file", "replace or remove it")
    assert snapshot(out_folder) == before


def test_anatomy_without_a_value_names_the_package_when_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mri, "DEFAULT_ANATOMY", str(tmp_path / "templates" / "ch2.nii.gz"))
    with pytest.raises(SystemExit) as exit_status:
        mri.parse_args(["--anatomy", "--volumes", "3"])
    assert exit_status.value.code == 2
    assert (
        "ch2.nii.gz does not exist; install it with `apt-get install mricron-data`" in capsys.readouterr().err
    )


def test_anatomy_generates_a_set_and_the_data_of_a_run(inputs, tmp_path):
    head, sizes = str(inputs / "head.nii.gz"), "--volumes 3 --slices 3 --size 16 --coils 2 --patch 4".split()
    mri.main(["--generate", str(tmp_path / "set"), "--anatomy", head, *sizes])
    assert sorted(os.listdir(tmp_path / "set")) == [f"anatomy_0000{i}.h5" for i in range(3)] + ["preview.png"]
    args = mri.parse_args(["--out", str(tmp_path / "out"), "--anatomy", head, "--device", "cpu", *sizes])
    experiment.set_up(args)
    data = experiment.load_data(args)  # a run's data: written to <out>/anatomy
    assert len(os.listdir(tmp_path / "out" / "anatomy")) == 4 and len(data.train + data.val + data.test) == 3
    assert data.note.startswith("data: simulated multi-coil from head.nii.gz (one subject")


def test_stage0_steps_default_to_steps_and_zero_turns_it_off():
    assert mri.parse_args(["--steps", "7"]).encoder_pretrain_steps == 7
    assert mri.parse_args(["--steps", "7", "--encoder-pretrain-steps", "0"]).encoder_pretrain_steps == 0
    assert mri.parse_args(["--steps", "7"]).stage1_steps == 7
    assert mri.parse_args(["--steps", "7", "--stage1-steps", "40"]).stage1_steps == 40
    assert mri.parse_args([]).stage1_cascades == "freeze"  # after stage 0
    assert mri.parse_args(["--encoder-pretrain-steps", "0"]).stage1_cascades == "train"  # the paper's recipe
    args = mri.parse_args([])
    assert not args.image_skip and not args.diagnose and args.phase_seconds == 0  # equal steps by default
    assert args.stage1_backbone == "freeze"  # the paper's recipe
    assert args.kspace_token_norm == "none"  # the paper's encoder


def test_options_script_writes_one_table_of_every_variant(tmp_path):
    """experiments/mri_options.py: every variant around the same backbone, one row each with its optimizer
    steps (stage 0 only where it is on), and the baselines trained once."""
    mri_options = experiment_script("mri_options")
    out = tmp_path / "options"
    mri_options.main(["--out", str(out), *TINY])
    rows = [
        line for line in (out / "options.md").read_text().splitlines() if line.startswith("| LLM[nirvana] |")
    ]
    assert [row.split(" | ")[1] for row in rows] == [label for label, *_ in mri_options.OPTIONS]
    for row, (_, stage0, _, skip) in zip(rows, mri_options.OPTIONS):
        steps = "2 (stage 0) + 2 (stage 1) + 2 (stage 2)" if stage0 else "2 (stage 1) + 2 (stage 2)"
        assert row.endswith(f"| {steps} |")
        assert (row.split(" | ")[4] != "-") == skip  # the skip-only score where the skip is on
    assert "| - | U-Net |" in (out / "options.md").read_text()
    results = (out / "results.md").read_text()
    assert "Does the image pass through the backbone?" in results
    assert f"command: `python experiments/mri_options.py --out {out} " in results  # the script, not mri.py


def test_compare_script_pairs_the_volumes_of_runs_on_the_same_data(tmp_path, capsys):
    """experiments/mri_compare.py: one table of every run's methods, paired per-volume SSIM differences
    (backbone against backbone, skip only against skip only, backbone against its skip only) with the count of
    volumes where the first is higher, compare.png; runs of different test volumes are refused by name."""
    mri_compare = experiment_script("mri_compare")

    def write_run(name, backbone, ssims, skip_ssims, zero_filled=(0.5, 0.6, 0.4)):
        per_volume = {
            "zero-filled": {"4": [{"ssim": s, "psnr": 20.0, "nmse": 0.1} for s in zero_filled]},
            backbone: {"4": [{"ssim": s, "psnr": 25.0, "nmse": 0.05} for s in ssims]},
            backbone + " skip only": {"4": [{"ssim": s, "psnr": 24.0, "nmse": 0.06} for s in skip_ssims]},
        }
        summary = {
            m: {"4": {k: [float(np.mean([v[k] for v in by["4"]])), 0.01] for k in ("ssim", "psnr", "nmse")}}
            for m, by in per_volume.items()
        }
        folder = tmp_path / name
        folder.mkdir()
        steps = {"zero-filled": "-", backbone: "3 (stage 1) + 3 (stage 2)", backbone + " skip only": "3"}
        (folder / "results.json").write_text(
            json.dumps(dict(summary=summary, per_volume=per_volume, steps=steps))
        )
        return str(folder)

    a = write_run("a", "LLM[nirvana]", [0.90, 0.80, 0.70], [0.85, 0.80, 0.60])
    b = write_run("b", "LLM[transformer]", [0.88, 0.82, 0.60], [0.80, 0.81, 0.65])
    mri_compare.main([a, b, "--out", str(tmp_path / "out")])
    text = (tmp_path / "out" / "compare.md").read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "| a | LLM[nirvana] | 3 (stage 1) + 3 (stage 2) | 0.8000 ± 0.0100 | -" in text
    # differences 0.02, -0.02, 0.10: mean 0.0333, population std 0.0499, higher on 2 of 3 volumes
    assert "| LLM[nirvana] | LLM[transformer] | +0.0333 ± 0.0499 (2/3) |" in text
    # skip only: 0.05, -0.01, -0.05
    assert "| LLM[nirvana] skip only | LLM[transformer] skip only | -0.0033 ± 0.0411 (1/3) |" in text
    assert "| LLM[nirvana] | LLM[nirvana] skip only | +0.0500 ± 0.0408 (2/3) |" in text
    assert (tmp_path / "out" / "compare.png").stat().st_size > 0
    c = write_run("c", "LLM[nirvana-notrigger]", [0.9] * 3, [0.9] * 3, zero_filled=(0.5, 0.6, 0.41))
    with pytest.raises(UserError, match="c and a did not score the same test volumes"):
        mri_compare.main([a, c])
    with pytest.raises(UserError, match="not a results.json"):
        mri_compare.main([str(tmp_path)])


def tiny_anatomy_set(tmp_path, volumes, slices):
    """<tmp_path>/anatomy: a real-anatomy set of the small test head, 16x16, 2 coils, seed 0."""
    data = tmp_path / "anatomy"
    head = write_head_nifti(tmp_path / "head.nii.gz")
    sizes = f"--volumes {volumes} --slices {slices} --size 16 --coils 2 --seed 0"
    mri.main(f"--generate {data} --anatomy {head} {sizes}".split())
    return data


def test_level_readout_script_finds_a_clean_code_and_writes_its_table(tmp_path):
    """experiments/mri_level_readout.py on a tiny real-anatomy set: a row per source with its test accuracy beside
    the majority, the curves as a PNG; a learned code of the true level is read right (which the scoring by
    likelihood must find); a set without levels and an unknown source are named errors."""
    mri_level_readout = experiment_script("mri_level_readout")
    data = tiny_anatomy_set(tmp_path, volumes=8, slices=6)
    out = tmp_path / "readout"
    mri_level_readout.main(["--data", str(data), "--out", str(out), "--steps", "3", "--window", "128"])
    rows = [
        line.split(" | ") for line in (out / "readout.md").read_text().splitlines() if line.startswith("| ")
    ]
    assert [row[0].lstrip("| ") for row in rows[1:]] == mri_level_readout.SOURCES
    assert all(0 <= float(row[1]) <= 1 for row in rows[1:])
    assert (out / "readout.png").stat().st_size > 0
    learned = ["--sources", "learned code", "--steps", "150", "--window", "128"]
    mri_level_readout.main(["--data", str(data), "--out", str(out), *learned])
    rows = [
        line.split(" | ") for line in (out / "readout.md").read_text().splitlines() if line.startswith("| ")
    ]
    assert rows[1][:2] == ["| learned code", "1.000"]
    with pytest.raises(UserError, match="unknown"):
        mri_level_readout.main(["--data", str(data), "--out", str(out), "--sources", "oracle"])
    phantoms = tmp_path / "phantoms"
    mri.main(f"--generate {phantoms} --volumes 6 --slices 2 --size 16 --coils 2 --seed 0".split())
    with pytest.raises(UserError, match="no level"):
        mri_level_readout.main(["--data", str(phantoms), "--out", str(out), "--steps", "1"])


def write_toy_findings_set(folder, volumes=24, slices=4, size=16):
    """Volumes whose lesions no reader can miss: slice s of volume v holds (v + s) % 3 bright squares on a
    dark background, each always at its place ("left frontal", then "right posterior"), scanned as the
    phantoms are (coils, signal level, phase, noise) and written with their reports."""
    squares = [("left", "frontal", np.s_[2:7, 2:7]), ("right", "posterior", np.s_[9:14, 9:14])]
    xx, yy = field_of_view_grid(size, size)
    rng = np.random.default_rng(0)
    os.makedirs(folder)
    for v in range(volumes):
        magnitudes, reports = np.full((slices, size, size), 0.1), []
        for s in range(slices):
            count = (v + s) % 3
            for _, _, place in squares[:count]:
                magnitudes[s][place] = 1.0
            places = [f"{side} {lobe}: large round bright." for side, lobe, _ in squares[:count]]
            reports.append(" ".join([f"lesions: {count}.", *places]))
        kspace, target = acquire(rng, magnitudes, xx, yy, 2)
        write_volume(os.path.join(folder, f"toy_{v:05d}.h5"), kspace, target, reports, f"toy {v}")
    return str(folder)


def findings_rows(out):
    """The rows of findings_cnn.md's first table: [input, finding, classes, majority, ridge, CNN]."""
    lines = (out / "findings_cnn.md").read_text().split("\n\n")
    table = next(block for block in lines if block.startswith("| input | finding | classes |"))
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]


def test_findings_cnn_script_writes_its_table_and_reads_a_visible_count(tmp_path):
    """experiments/mri_findings_cnn.py: on a tiny real-anatomy set a row per input and finding (count,
    places, level), accuracies in [0, 1], the figures; on a set whose lesions are bright squares the CNN reads
    the count from the true and the zero-filled image, well above always the most common count; bad input is
    a named error."""
    mri_findings_cnn = experiment_script("mri_findings_cnn")
    data = tiny_anatomy_set(tmp_path, volumes=6, slices=4)
    out = tmp_path / "cnn"
    tiny = ["--steps", "2", "--batch-size", "8", "--width", "2", "--val-checks", "1"]
    mri_findings_cnn.main(["--data", str(data), "--out", str(out), *tiny])
    rows = findings_rows(out)
    assert [row[:2] for row in rows] == [
        [kind, name] for kind in ("true image", "zero-filled 4x") for name in ("count", "places", "level")
    ]
    assert all(0 <= float(value) <= 1 for row in rows for value in row[3:])
    assert (out / "findings_cnn.png").stat().st_size > 0 and (
        out / "findings_cnn_curves.png"
    ).stat().st_size > 0
    toy = write_toy_findings_set(tmp_path / "toy")
    visible = ["--findings", "count", "--steps", "100", "--batch-size", "16", "--width", "4", "--lr", "1e-2"]
    mri_findings_cnn.main(["--data", toy, "--out", str(out), *visible])
    rows = findings_rows(out)
    assert [row[:3] for row in rows] == [["true image", "count", "3"], ["zero-filled 4x", "count", "3"]]
    for row in rows:
        assert float(row[5]) >= 0.9 and float(row[5]) > float(row[3]) + 0.4, row
    for args, message in (
        (["--data", str(tmp_path / "missing")], "does not exist"),
        (["--data", toy, "--findings", "level"], r"no \['level'\] to classify"),
        (["--data", toy, "--inputs", "kspace"], "--inputs: unknown"),
    ):
        with pytest.raises(UserError, match=message):
            mri_findings_cnn.main([*args, "--out", str(tmp_path / "refused"), "--steps", "1"])
    assert not (tmp_path / "refused").exists()
