"""Pictures: the training curves of every phase, the reconstruction grid of the test slices and the preview of
a generated data set."""

import math
import textwrap

import numpy as np
import torch

from cli import write_atomically
from mri_recon.fastmri_files import read_volume
from mri_recon.metrics import ssim
from mri_recon.phantoms import parse_report


def save_curves(path, fits):
    """PNG: training loss (and validation checks, the chosen one circled) of every training phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(fits))
    rows = math.ceil(len(fits) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, result) in zip(axes.flat, fits.items()):
        steps = np.arange(1, len(result.losses) + 1)
        ax.plot(steps, result.losses, lw=0.6, alpha=0.5, label="train")
        if len(result.losses) >= 10:
            k = max(2, len(result.losses) // 25)
            ax.plot(
                steps[k - 1 :],
                np.convolve(result.losses, np.ones(k) / k, mode="valid"),
                lw=1.2,
                label="train (mean)",
            )
        if result.checks:
            ax.plot(*zip(*result.checks), "o-", ms=3, label="validation")
            best = dict(result.checks)[result.best_step]
            ax.plot([result.best_step], [best], "o", ms=9, mfc="none", mec="k", label="chosen")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=5)
    for ax in list(axes.flat)[len(fits) :]:
        ax.axis("off")
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def save_grid(path, recons, volumes, acc, rows=3):
    """PNG: one row per test slice (the slices with most lesions), columns ground truth, zero-filled,
    baselines, Nirvana; the slice's SSIM (data range = volume max) in each title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = []
    for v, vol in enumerate(volumes[:rows]):
        counts = [parse_report(r)[0] or 0 for r in vol.reports] if vol.reports else [0]
        picks.append((v, int(np.argmax(counts)) if vol.reports else vol.kspace.shape[0] // 2))
    names = list(recons[acc])
    fig, axes = plt.subplots(
        len(picks), len(names), figsize=(2.4 * len(names), 2.9 * len(picks)), squeeze=False
    )
    for r, (v, s) in enumerate(picks):
        gt, maxval = recons[acc]["ground truth"][v][s], volumes[v].maxval
        for c, name in enumerate(names):
            img = recons[acc][name][v][s]
            title = name
            if name != "ground truth":
                score = ssim(gt[None].double(), img[None].double(), torch.tensor([maxval])).item()
                title = f"{name}\nSSIM {score:.4f}"
            axes[r, c].imshow(img.numpy(), cmap="gray", vmin=0, vmax=maxval)
            axes[r, c].set_title(title, fontsize=7)
            axes[r, c].axis("off")
    fig.suptitle(f"{acc}x undersampling", fontsize=9)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def save_preview(path, volume_paths, rows=3, cols=4):
    """PNG: the targets of `cols` evenly spaced slices of the first `rows` volume files, each titled with its
    report (what a generated data set looks like)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    volumes = [read_volume(p) for p in volume_paths[:rows]]
    cols = min(cols, min(v.target.shape[0] for v in volumes))
    fig, axes = plt.subplots(len(volumes), cols, figsize=(2.3 * cols, 2.9 * len(volumes)), squeeze=False)
    for r, vol in enumerate(volumes):
        n = vol.target.shape[0]
        for c, s in enumerate(np.linspace(0, n - 1, cols).round().astype(int)):
            axes[r, c].imshow(vol.target[s].numpy(), cmap="gray", vmin=0, vmax=vol.maxval)
            report = vol.reports[s] if vol.reports else "(no report)"
            title = f"{vol.name} slice {s}\n" + "\n".join(textwrap.wrap(report, 34))
            axes[r, c].set_title(title, fontsize=5.5)
            axes[r, c].axis("off")
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
