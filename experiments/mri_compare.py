"""One table from several mri.py runs on the same data, e.g. the one-process-per-backbone runs of
`PER_BACKBONE=1 bash experiments/mri_gpu.sh`: every method of every run, and paired per-volume differences
between the backbones, between their "skip only" rows, and between each backbone and its "skip only" row.

    python experiments/mri_compare.py experiments/results/mri-long-stage1/phantoms/*/ \
        --out experiments/results/mri-long-stage1/phantoms

The runs must have scored the same test volumes with the same masks: their zero-filled per-volume metrics (no
training, so no randomness) must agree, else the comparison stops with an error naming the runs. Baselines
trained in every run appear once per run: their spread is the run-to-run noise of one seed on a GPU.
A paired difference is the mean ± std over the test volumes of (a - b) in SSIM, with the count of volumes
where a is higher; the pairs are scored on the same volumes, so the volume-to-volume spread of each method
(± in the first table) mostly cancels. Writes compare.md and compare.png (SSIM per method and acceleration)."""

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: cli.py

from cli import UserError, run_main, save_figure, write_text_atomically

SKIP_ONLY = " skip only"


def load_runs(folders):
    """-> [(label, results.json dict)]; label: the folder's name. A missing or unreadable file, or runs of
    different test volumes or masks, is a UserError."""
    runs = []
    for folder in folders:
        path = os.path.join(folder, "results.json")
        try:
            with open(path) as f:
                runs.append((os.path.basename(os.path.normpath(folder)), json.load(f)))
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(f"{path}: not a results.json of mri.py ({error})") from error
    if not runs:
        raise UserError("no run folders given")
    reference_label, reference = runs[0]
    for label, results in runs[1:]:
        if results["per_volume"].get("zero-filled") != reference["per_volume"].get("zero-filled"):
            raise UserError(
                f"{label} and {reference_label} did not score the same test volumes and masks (their zero-filled "
                "per-volume metrics differ); compare runs of one data set, seed and --eval-acc"
            )
    return runs


def backbones_of(results):
    """The backbone methods of one run (LLM[...] rows that are not a diagnostic variant)."""
    return [m for m in results["per_volume"] if m.startswith("LLM[") and not m.endswith(SKIP_ONLY)]


def ssim_per_volume(results, method, acc):
    return np.array([v["ssim"] for v in results["per_volume"][method][acc]])


def paired(a, b):
    """(mean, std, wins, n) of the per-volume differences a - b."""
    d = a - b
    return d.mean(), d.std(), int((d > 0).sum()), len(d)


def compare_markdown(runs):
    accelerations = sorted(runs[0][1]["summary"]["zero-filled"], key=int)
    lines = [
        "| run | method | steps | " + " | ".join(f"SSIM {a}x" for a in accelerations) + " | PSNR (dB) 6x |"
    ]
    lines.append("|---" * (4 + len(accelerations)) + "|")
    for label, results in runs:
        for method, by_acc in results["summary"].items():
            cells = [f"{by_acc[a]['ssim'][0]:.4f} ± {by_acc[a]['ssim'][1]:.4f}" for a in accelerations]
            psnr = f"{by_acc['6']['psnr'][0]:.2f}" if "6" in by_acc else "-"
            lines.append(
                f"| {label} | {method} | {results['steps'].get(method, '-')} | {' | '.join(cells)} | {psnr} |"
            )
    named = [(method, results) for _, results in runs for method in backbones_of(results)]
    skip_only = [(m + SKIP_ONLY, r) for m, r in named if m + SKIP_ONLY in r["per_volume"]]
    pairs = list(itertools.combinations(named, 2)) + list(itertools.combinations(skip_only, 2))
    pairs += [((m, r), (m + SKIP_ONLY, r)) for m, r in named if m + SKIP_ONLY in r["per_volume"]]
    lines += [
        "",
        "Paired SSIM differences over the test volumes: mean ± std of (a - b), volumes where a is higher.",
        "",
    ]
    lines.append("| a | b | " + " | ".join(f"{a}x" for a in accelerations) + " |")
    lines.append("|---" * (2 + len(accelerations)) + "|")
    for (a, results_a), (b, results_b) in pairs:
        cells = []
        for acc in accelerations:
            mean, std, wins, n = paired(
                ssim_per_volume(results_a, a, acc), ssim_per_volume(results_b, b, acc)
            )
            cells.append(f"{mean:+.4f} ± {std:.4f} ({wins}/{n})")
        lines.append(f"| {a} | {b} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def save_plot(path, runs):
    """PNG: test SSIM (mean over volumes) of every method of every run, one group of bars per acceleration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accelerations = sorted(runs[0][1]["summary"]["zero-filled"], key=int)
    rows = [
        (f"{method} ({label})", by_acc)
        for label, results in runs
        for method, by_acc in results["summary"].items()
        if method != "zero-filled"
    ]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4))
    width = 0.8 / len(rows)
    for i, (name, by_acc) in enumerate(rows):
        x = np.arange(len(accelerations)) + i * width
        ax.bar(
            x, [by_acc[a]["ssim"][0] for a in accelerations], width, label=name, color=plt.cm.tab20(i % 20)
        )
    ax.set_xticks(np.arange(len(accelerations)) + 0.4 - width / 2, [f"{a}x" for a in accelerations])
    low = min(by_acc[a]["ssim"][0] for _, by_acc in rows for a in accelerations)
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_ylabel("test SSIM (mean over volumes)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save_figure(path, fig)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="mri.py --out folders (each with results.json)")
    parser.add_argument("--out", help="folder for compare.md and compare.png (default: print only)")
    args = parser.parse_args(argv)
    runs = load_runs(args.runs)
    text = compare_markdown(runs)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_text_atomically(os.path.join(args.out, "compare.md"), text)
        save_plot(os.path.join(args.out, "compare.png"), runs)


if __name__ == "__main__":
    run_main(main)
