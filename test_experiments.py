"""The small-scale experiment end to end at tiny size on the CPU: a corpus from files written here (no Debian
packages needed), every run trained and measured, the report's tables and pictures, then a second call that
resumes (nothing retrained or re-measured)."""

import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments"))

import real_text
import small_scale

from cli import UserError
from eval import haystack_sentence


def write_domains(root):
    """Four small domains of a few documents each: Python reference text, essay-like prose (S-NIAH's haystack
    grammar), ledger lines, and held-out "wikipedia" (more Python reference text, long enough for a window of
    4x the tiny context)."""
    from pydoc_data.topics import topics

    rng = random.Random(0)
    texts = [topics[name] for name in sorted(topics)]
    domains = {
        "python": texts[:5],
        "prose": [" ".join(haystack_sentence("essay", i, rng) for i in range(60)) for _ in range(5)],
        "ledger": [
            "\n".join(
                f"{rng.randint(1, 28):02d}/{rng.randint(1, 12):02d} paid {rng.randint(1, 999)}.00 "
                f"to {rng.choice(['Smith', 'Jones', 'Brown'])}"
                for _ in range(60)
            )
            for _ in range(5)
        ],
        "wikipedia": [t[:4000] for t in texts[20:26]],
    }
    for domain, documents in domains.items():
        os.makedirs(root / domain)
        for i, text in enumerate(documents):
            (root / domain / f"doc{i}.txt").write_text(text, encoding="utf-8")


def test_tiny_pipeline_end_to_end_and_resumes(tmp_path, capsys):
    write_domains(tmp_path / "domains")
    data = str(tmp_path / "data")
    real_text.main(
        [
            "--from-folders",
            str(tmp_path / "domains"),
            "--out",
            data,
            "--vocab-size",
            "400",
            "--workers",
            "1",
            "--min-val-docs",
            "1",
        ]
    )
    corpus = json.loads((tmp_path / "data" / "corpus.json").read_text())
    assert corpus["domains"]["wikipedia"]["held_out"] and corpus["domains"]["wikipedia"]["train_docs"] == 0
    assert all(
        corpus["domains"][d]["val_docs"] >= 1 and corpus["domains"][d]["train_tokens"] > 0
        for d in ("python", "prose", "ledger")
    )
    tokens, documents = real_text.load_eval_set(os.path.join(data, "tokens", "eval", "prose.npz"))
    assert len(documents) == corpus["domains"]["prose"]["val_docs"] and len(tokens) == sum(
        map(len, documents)
    )

    argv = [
        "--data",
        data,
        "--size",
        "tiny",
        "--runs",
        str(tmp_path / "runs"),
        "--results",
        str(tmp_path / "results"),
        "--device",
        "cpu",
    ]
    results = small_scale.main(argv)
    for run in small_scale.RUNS:
        entry = results[run.name]
        assert entry["train"]["steps"] == small_scale.SIZES["tiny"].train_steps
        assert all(np.isfinite(entry["ppl"][d]["ppl"]) for d in ("python", "prose", "ledger", "wikipedia"))
        assert set(entry["niah"]["accuracy"]) == {
            f"{t}@{n}" for t in ("pk", "n", "w") for n in (384, 768, 1536)
        }
        assert np.isfinite(entry["context"]["by_length"]["4x"]["ppl"])
        gated = run.variant.startswith("nirvana")
        assert (entry["trigger"] is not None) == gated
        if gated:
            assert (entry["trigger"].get("p_probe") is not None) == (run.variant != "nirvana-notrigger")
    report = (tmp_path / "results" / "results.md").read_text()
    for run in small_scale.RUNS:  # every run has a row of numbers in the perplexity and S-NIAH tables
        rows = [line for line in report.splitlines() if line.startswith(f"| {run.name} |")]
        assert len(rows) >= 4 and all(re.search(r"\| \d+\.\d+ \|", row) for row in rows[:3])
    for name in ("ppl_per_domain", "context", "niah", "trigger", "p_documents", "loss"):
        assert (tmp_path / "results" / f"{name}.png").stat().st_size > 1000
    assert "all done" in capsys.readouterr().out

    checkpoint = tmp_path / "runs" / "nirvana-s1" / "ckpt.pt"
    measured = tmp_path / "results" / "runs" / "nirvana-s1" / "measure" / "ppl.json"
    stamps = checkpoint.stat().st_mtime_ns, measured.stat().st_mtime_ns
    small_scale.main(argv)  # resumes: nothing left to do
    assert (checkpoint.stat().st_mtime_ns, measured.stat().st_mtime_ns) == stamps
    out = capsys.readouterr().out
    assert "training steps" not in out and "measuring" not in out and "all done" in out

    shutil.rmtree(tmp_path / "runs")  # a fresh checkout with the committed records: nothing to redo either
    assert small_scale.main(argv) == results
    out = capsys.readouterr().out
    assert "training steps" not in out and "measuring" not in out and "all done" in out

    # the same command on another corpus (other package versions from the mirror) refuses to mix the runs
    train_tokens = tmp_path / "data" / "tokens" / "train_00000.bin"
    train_tokens.write_bytes(train_tokens.read_bytes()[:-2])
    with pytest.raises(UserError, match=r"nirvana-s1.*trained on another corpus"):
        small_scale.main(argv)


def test_a_run_that_cannot_finish_in_the_budget_is_not_begun(tmp_path, monkeypatch):
    # judged from a finished run's record: 100 s a step for 4 steps plus 5 s of measurements
    size, records = small_scale.SIZES["tiny"], tmp_path / "results" / "runs"
    (records / "nirvana-s1" / "measure").mkdir(parents=True)
    done = {"steps": 4, "seconds": 400.0, "variant": "nirvana"}
    (records / "nirvana-s1" / "train_done.json").write_text(json.dumps(done))
    (records / "nirvana-s1" / "measure" / "ppl.json").write_text(json.dumps({"seconds": 5.0}))
    run = next(r for r in small_scale.RUNS if r.name == "transformer-s1")
    assert small_scale.whole_run_seconds(run, size, records) == 405.0
    run_dir = tmp_path / "runs" / run.name
    clock = small_scale.Clock(small_scale.FIRST_CHUNK_SECONDS + 1)  # a first chunk fits, the whole run not
    started = small_scale.train_run(
        run, size, "unused", str(run_dir), str(records / run.name), "cpu", clock, "corpus"
    )
    assert started is False and not run_dir.exists()

    class Begun(Exception):
        pass

    def train_main(argv):
        raise Begun(argv)

    monkeypatch.setattr(small_scale.train, "main", train_main)
    clock = small_scale.Clock(small_scale.FIRST_CHUNK_SECONDS + 1, runs_persist=True)
    with pytest.raises(Begun):  # the runs folder outlives the call: the run begins, the next call resumes it
        small_scale.train_run(
            run, size, "unused", str(run_dir), str(records / run.name), "cpu", clock, "corpus"
        )


def test_missing_corpus_and_unknown_run_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="real_text.py --out"):
        small_scale.main(["--data", str(tmp_path), "--size", "tiny"])
    with pytest.raises(UserError, match="--from-folders"):
        real_text.main(["--from-folders", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])


def test_nearest_centroid_probe_separates_separable_domains_and_not_noise():
    rng = np.random.default_rng(0)
    labels = ["a"] * 20 + ["b"] * 20 + ["c"] * 20
    separable = np.concatenate([rng.normal(m, 0.1, (20, 3)) for m in (0.0, 1.0, 2.0)])
    accuracy, chance = small_scale.nearest_centroid_accuracy(separable, labels)
    assert accuracy == 1.0 and chance == pytest.approx(1 / 3)
    noise_accuracy, _ = small_scale.nearest_centroid_accuracy(rng.normal(0, 1, (60, 3)), labels)
    assert noise_accuracy < 0.6


def test_seed_spread_compares_the_difference_of_seed_means_with_the_seed_range():
    def measured(python, held_out):
        return {"ppl": {"python": {"ppl": python}, "perl": {"ppl": python}, "wikipedia": {"ppl": held_out}}}

    results = {run.name: {} for run in small_scale.RUNS}
    results["nirvana-s1"], results["nirvana-s2"] = measured(40.0, 250.0), measured(42.0, 260.0)
    results["nirvana-notrigger-s1"] = measured(45.0, 255.0)
    results["gated-deltanet-s1"] = measured(30.0, 200.0)  # one seed: no spread, in no pair
    trained = ["perl", "python"]
    spread, pairs = small_scale.seed_spread(results, trained)
    assert list(spread) == ["nirvana"] and pairs == []  # nirvana-notrigger has one seed so far
    assert spread["nirvana"]["geometric_mean"] == pytest.approx([40.0, 42.0])
    assert spread["nirvana"]["geometric_mean_range"] == pytest.approx(2.0)
    assert spread["nirvana"]["held_out_mean"] == pytest.approx(255.0)

    results["nirvana-notrigger-s2"] = measured(47.0, 257.0)
    spread, pairs = small_scale.seed_spread(results, trained)
    assert list(spread) == ["nirvana", "nirvana-notrigger"]
    (pair,) = pairs
    assert pair["geometric_mean"]["difference"] == pytest.approx(41.0 - 46.0)
    assert pair["geometric_mean"]["seed_range"] == pytest.approx(2.0) and pair["geometric_mean"]["beyond"]
    assert pair["held_out"]["difference"] == pytest.approx(255.0 - 256.0)
    assert pair["held_out"]["seed_range"] == pytest.approx(10.0) and not pair["held_out"]["beyond"]
    text = "\n".join(small_scale.seed_spread_section(results, trained))
    assert (
        "nirvana - nirvana-notrigger | -5.00 (range 2.00: beyond it) | -1.00 (range 10.00: within it)" in text
    )


def test_missing_package_names_its_install_command():
    with pytest.raises(UserError, match="apt-get install linux-doc-6.1"):
        real_text.need("/nonexistent/**/*.rst.gz", "apt-get install linux-doc-6.1")


def test_wikipedia_articles_from_a_wheel_lose_their_markup(tmp_path):
    import bz2
    import zipfile

    article = (
        "{{Infobox|name=X {{nested}}}}'''Aardvark''' is a [[mammal]] of [[Africa|the African continent]]."
        "<ref>Smith 2001</ref> It digs.[[File:A.jpg|thumb|An [[aardvark]]]]\n== Diet ==\nAnts and termites, "
        "see [http://example.org the site].\n== References ==\n* cited work\n"
    )
    body = " ".join(["filler"] * 60)
    dump = (
        "<mediawiki><page><title>Aardvark</title><ns>0</ns><revision><text>"
        + article.replace("<", "&lt;").replace(">", "&gt;").replace("\n== Diet", f" {body}\n== Diet")
        + "</text></revision></page><page><title>AA</title><ns>0</ns><redirect title='A' /><revision>"
        "<text>#REDIRECT [[A]]</text></revision></page></mediawiki>"
    )
    wheel = tmp_path / "gensim-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("gensim/test/test_data/enwiki-latest-shortened.bz2", bz2.compress(dump.encode()))
    [(name, text)] = real_text.read_wikipedia(str(wheel))
    assert name == "Aardvark" and text.startswith(
        "Aardvark\n\nAardvark is a mammal of the African continent."
    )
    assert "Diet\nAnts and termites, see the site." in text
    assert not any(mark in text for mark in ("{{", "[[", "<ref", "'''", "cited work", "File:"))


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_run_records_are_not_ignored_by_git():
    """The records are what a fresh checkout continues from: an ignore rule that catches them loses runs."""
    root = os.path.dirname(os.path.abspath(__file__))
    if not os.path.isdir(os.path.join(root, ".git")):
        pytest.skip("not a git checkout")
    record = os.path.join("experiments", "results", "small", "runs", "nirvana-s1", "train_done.json")
    checked = subprocess.run(["git", "check-ignore", "-q", record], cwd=root)
    assert checked.returncode == 1, f"{record} is ignored by git: its run would be lost with the machine"


def test_chunks_shrink_to_the_budget_and_a_cut_run_stops_the_call(tmp_path, monkeypatch):
    """Simulated time, 1 s per step: the first run trains chunks of chunk_seconds, then one shrunk to what the
    budget leaves, and stops; the next run is not begun (two half-trained runs would help no one)."""
    now = [0.0]
    monkeypatch.setattr(small_scale.time, "time", lambda: now[0])
    trained = []

    def train_main(argv):
        run_dir, target = argv[argv.index("--out") + 1], int(argv[argv.index("--stop-step") + 1])
        step = small_scale.checkpoint_step(os.path.join(run_dir, "ckpt.pt"))
        now[0] += target - step
        os.makedirs(run_dir, exist_ok=True)
        torch.save({"step": target}, os.path.join(run_dir, "ckpt.pt"))
        trained.append((os.path.basename(run_dir), target))

    monkeypatch.setattr(small_scale.train, "main", train_main)
    size = dataclasses.replace(
        small_scale.SIZES["tiny"], train_steps=1000, first_chunk_steps=20, chunk_seconds=150
    )
    runs = [r for r in small_scale.RUNS if r.name in ("nirvana-s1", "transformer-s1")]
    clock = small_scale.Clock(200)
    pending = small_scale.work(
        runs, size, "unused", {}, str(tmp_path / "runs"), str(tmp_path / "records"), "cpu", clock, "corpus"
    )
    margin = small_scale.CHUNK_MARGIN_SECONDS
    assert trained == [("nirvana-s1", 20), ("nirvana-s1", 170), ("nirvana-s1", 170 + 30 - margin)]
    assert pending == ["nirvana-s1", "transformer-s1"]

    # a wide margin leaves 100 s after the last chunk: room for another run's first chunk, which is not begun
    monkeypatch.setattr(small_scale, "CHUNK_MARGIN_SECONDS", 100)
    shutil.rmtree(tmp_path / "runs")
    trained.clear()
    clock = small_scale.Clock(300)
    pending = small_scale.work(
        runs, size, "unused", {}, str(tmp_path / "runs"), str(tmp_path / "records"), "cpu", clock, "corpus"
    )
    assert trained == [("nirvana-s1", 20), ("nirvana-s1", 170), ("nirvana-s1", 200)]
    assert pending == ["nirvana-s1", "transformer-s1"]


def test_package_versions_name_each_package_and_say_unknown_when_dpkg_cannot_tell(monkeypatch):
    monkeypatch.setattr(real_text, "PACKAGES", {"nothing": ("no-such-package-here", None)})
    assert real_text.package_versions() == {"nothing": "no-such-package-here unknown"}
    if shutil.which("dpkg-query"):
        monkeypatch.setattr(real_text, "PACKAGES", {"dpkg": ("dpkg", None)})
        version = real_text.package_versions()["dpkg"]
        assert version.startswith("dpkg ") and version != "dpkg unknown"


def test_mri_gpu_script_parses_and_its_published_runs_are_complete():
    """experiments/mri_gpu.sh is valid bash, and experiments/results/mri holds every run it names, each with
    its tables and pictures, every trained method and stage at the script's step count."""
    root = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(root, "experiments", "mri_gpu.sh")
    subprocess.run(["bash", "-n", script], check=True)
    text = open(script).read()
    runs = re.search(r"^RUNS=\(\$\{MRI_RUNS:-([^}]*)\}\)", text, re.MULTILINE).group(1).split()
    steps = re.search(r"^STEPS=\$\{STEPS:-(\d+)\}", text, re.MULTILINE).group(1)
    published = os.path.join(root, "experiments", "results", "mri")
    for name in ("phantoms-preview.png", "anatomy-preview.png", "pretrain-nirvana.log"):
        assert os.path.isfile(os.path.join(published, name)), name
    for run in runs:
        folder = os.path.join(published, run)
        for name in ("results.md", "reports.md", "training_curves.png", "recon_grid_6x.png"):
            assert os.path.isfile(os.path.join(folder, name)), f"{run}/{name}"
        results = json.load(open(os.path.join(folder, "results.json")))
        trained = {method: taken for method, taken in results["steps"].items() if method != "zero-filled"}
        assert trained and all(
            re.fullmatch(rf"{steps}( \(stage \d\))?( \+ {steps} \(stage \d\))*", taken)
            for taken in trained.values()
        ), trained
