"""Can a small supervised CNN read the report's findings from the image, where a linear probe cannot?

Every slice of the simulated sets has a templated report ("lesions: 2. left frontal: small oval bright. right
central: medium round bright. level: basal ganglia."), read as class labels by `diagnostics.findings`: the
lesion count, the set of lesion places and (real-anatomy sets) the slice's level in the head. `mri.py
--diagnose`'s ridge probes read the level from the images but find the count and the places no better than
always answering the most common one, even in the true image. This script asks whether a nonlinear model
trained on the labels themselves does better, from

    true image      the fully sampled image (the file's reconstruction_rss)
    zero-filled     the RSS of the undersampled k-space (--acc, --mask-type), as the encoder receives it

For each input and finding: a small CNN (three blocks of two 3x3 convolutions with ReLU and a 2x2 max pool,
the map average-pooled to 4x4 so that places survive, then a linear layer) trained with cross-entropy by
mri.py's training loop (`fit`: AdamW, warm-up and cosine schedule, clipping; --val-checks validation checks,
the parameters of the best validation accuracy kept), on the training volumes' slices in mri.py's batches
(`random_batches`: shuffled, a fresh random mask per slice, the project's only augmentation, which only the
zero-filled input sees). Each image is standardised on its own (mean 0, std 1), as the U-Net baseline's input.
Scored on the test slices (each volume under its evaluation mask) beside always answering the most common
training label and beside `findings_probe`, the ridge classifier of --diagnose, on the same standardised
images, flattened. The split by volume is mri.py's (--seed); the same seed draws every CNN's initialisation
and batches.

    python mri.py --generate data/anatomy32 --anatomy --volumes 240 --slices 8 --size 32 --coils 4 --seed 0
    python experiments/mri_findings_cnn.py --data data/anatomy32 --out out/findings_cnn

Writes findings_cnn.md (the table, the command, the slice counts, the steps and the times), findings_cnn.png
(test accuracy of the three per row) and findings_cnn_curves.png (the training curves) to --out."""

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: mri.py, cli.py

import mri
from cli import (
    ArgumentParser,
    UserError,
    non_negative_int,
    positive_float,
    positive_int,
    run_main,
    save_figure,
    torch_device,
    write_text_atomically,
)
from mri_recon.batches import evaluation_batches, random_batches
from mri_recon.diagnostics import MAX_PROBE_SLICES, finding_classes, findings, findings_probe
from mri_recon.experiment import load_data
from mri_recon.fastmri_files import list_volume_files
from mri_recon.fit import fit
from mri_recon.models import zero_filled
from mri_recon.plots import save_curves

INPUTS = ("true", "zero-filled")
FINDINGS = ("count", "places", "level")


class SliceCNN(nn.Module):
    """(B, 1, h, w) image -> (B, classes) logits. No normalisation layers: `fit` restores the parameters of
    the best validation check, and a layer's buffers would not follow them."""

    def __init__(self, n_classes, width):
        super().__init__()
        layers, c_in = [], 1
        for c in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU()]
            layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Linear(16 * c_in, n_classes)

    def forward(self, x):
        return self.head(self.features(x))


def standardise(images):
    """Each image (..., h, w) to mean 0 and std 1 over its pixels."""
    mean = images.mean(dim=(-2, -1), keepdim=True)
    return (images - mean) / images.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


def input_images(batch, kind, out_shape):
    """The standardised (B, h, w) images of a Batch: its true image or its zero-filled one."""
    return standardise(batch.target if kind == "true" else zero_filled(batch.kspace, out_shape))


def input_label(kind, args):
    return "true image" if kind == "true" else f"zero-filled {args.acc}x"


@torch.no_grad()
def split_inputs(volumes, out_shape, args, max_slices=None):
    """Every slice of volumes (the first max_slices), each volume under its evaluation mask at --acc:
    {kind: (N, h, w) standardised images} and the reports."""
    images, reports = {kind: [] for kind in INPUTS}, []
    for batch in evaluation_batches(volumes, [args.acc], args.mask_type, 256, max_slices):
        for kind in INPUTS:
            images[kind].append(input_images(batch, kind, out_shape))
        reports += batch.reports
    return {kind: torch.cat(parts) for kind, parts in images.items()}, reports


def class_labels(reports, name, classes, device):
    """(N,) the index of each report's finding among classes; -1 for a value training never showed (never
    right)."""
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index.get(findings(r)[name], -1) for r in reports], device=device)


@torch.no_grad()
def accuracy(model, images, labels, batch_size=512):
    model.eval()
    chosen = torch.cat(
        [model(images[i : i + batch_size].unsqueeze(1)).argmax(1) for i in range(0, len(images), batch_size)]
    )
    return (chosen == labels).float().mean().item()


def train_cnn(kind, name, classes, data, splits, args):
    """One CNN for one input and one finding -> (test accuracy, validation accuracy of the kept parameters,
    the FitResult, seconds)."""
    torch.manual_seed(args.seed)
    model = SliceCNN(len(classes), args.width).to(args.device)
    rng = np.random.default_rng(args.seed)
    (val_x, val_reports), (test_x, test_reports) = splits["val"], splits["test"]
    val_y = class_labels(val_reports, name, classes, args.device)
    test_y = class_labels(test_reports, name, classes, args.device)

    def loss_fn(b):
        model.train()
        logits = model(input_images(b, kind, data.out_shape).unsqueeze(1))
        return F.cross_entropy(logits, class_labels(b.reports, name, classes, args.device))

    t0 = time.time()
    result = fit(
        f"{input_label(kind, args)} / {name}",
        model.parameters(),
        loss_fn,
        random_batches(data.train, args.batch_size, [args.acc], args.mask_type, rng),
        args.steps,
        args.lr,
        validate=lambda: 1 - accuracy(model, val_x[kind], val_y),  # fit keeps the lowest: the best accuracy
        checks=args.val_checks,
    )
    test = accuracy(model, test_x[kind], test_y)
    seconds = time.time() - t0
    val = 1 - dict(result.checks)[result.best_step]
    print(f"{input_label(kind, args)} / {name}: test accuracy {test:.3f} (val {val:.3f}, {seconds:.0f}s)")
    return test, val, result, seconds


def write_outputs(out, rows, args, data, slices, command, seconds):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        "# Can a supervised CNN read the report's findings from the image? (experiments/mri_findings_cnn.py)",
        "",
        f"`{command}`",
        "",
        f"{data.note}; split by volume (seed {args.seed}): train {len(data.train)} volumes "
        f"({slices['train']} slices), val {len(data.val)} ({slices['val']} slices), test {len(data.test)} "
        f"({slices['test']} slices). CNN: width {args.width}, {args.steps} steps of batch {args.batch_size}, "
        f"lr {args.lr} (AdamW, warm-up and cosine), {args.val_checks} validation checks, the best validation "
        f"accuracy kept; seed {args.seed}. Zero-filled: {args.mask_type} masks at {args.acc}x (fresh per "
        "slice in training, the volume's evaluation mask in validation and test). Every image standardised "
        "on its own. Ridge probe: `findings_probe` on the same images, flattened (fitted on at most "
        f"{MAX_PROBE_SLICES} training slices, the ridge strength chosen by validation accuracy). Majority: "
        f"always the most common training label. Test accuracy on the {slices['test']} test slices. Wall "
        f"time {seconds:.0f}s in all (data, probes, every CNN). findings_cnn_curves.png: each CNN's training "
        "cross-entropy and its validation error (1 - accuracy), the kept check circled.",
        "",
        "| input | finding | classes | majority | ridge probe | CNN test accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for (kind, name), row in rows.items():
        lines.append(
            f"| {input_label(kind, args)} | {name} | {row['classes']} | {row['majority']:.3f} | "
            f"{row['ridge']:.3f} | {row['cnn']:.3f} |"
        )
    lines += [
        "",
        "| input | finding | CNN val accuracy | chosen step | CNN seconds |",
        "|---|---|---|---|---|",
    ]
    for (kind, name), row in rows.items():
        lines.append(
            f"| {input_label(kind, args)} | {name} | {row['val']:.3f} | {row['fit'].best_step} | "
            f"{row['seconds']:.0f} |"
        )
    write_text_atomically(str(out / "findings_cnn.md"), "\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(rows), 3.6))
    x = np.arange(len(rows))
    for i, (key, label) in enumerate((("majority", "majority"), ("ridge", "ridge probe"), ("cnn", "CNN"))):
        ax.bar(x + (i - 1) * 0.27, [row[key] for row in rows.values()], 0.27, label=label)
    ax.set_xticks(x, [f"{input_label(kind, args)}\n{name}" for kind, name in rows], fontsize=7)
    ax.set(ylabel="test accuracy", ylim=(0, 1))
    ax.legend(fontsize=7)
    save_figure(str(out / "findings_cnn.png"), fig)
    plt.close(fig)
    save_curves(
        str(out / "findings_cnn_curves.png"),
        {f"{input_label(kind, args)} / {name}": row["fit"] for (kind, name), row in rows.items()},
    )


def choices(text, allowed, option):
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise UserError(f"{option}: unknown {unknown or text!r}; choose from {', '.join(allowed)}")
    return items


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a folder of .h5 volumes with reports (mri.py --generate)")
    p.add_argument("--out", required=True)
    p.add_argument("--inputs", default=",".join(INPUTS), help=f"comma-separated, of: {', '.join(INPUTS)}")
    p.add_argument(
        "--findings",
        help=f"comma-separated, of: {', '.join(FINDINGS)} (default: every one the reports state)",
    )
    p.add_argument("--acc", type=mri.accelerations, default=[4], help="the zero-filled input's acceleration")
    p.add_argument("--mask-type", default="random", choices=["random", "equispaced"])
    p.add_argument("--steps", type=positive_int, default=2000)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--lr", type=positive_float, default=2e-3)
    p.add_argument("--width", type=positive_int, default=16, help="the first block's channels (then 2x, 4x)")
    p.add_argument("--val-checks", type=positive_int, default=10)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", type=torch_device, default="cpu")
    args = p.parse_args(argv)
    t_start = time.time()
    if len(args.acc) != 1:
        raise UserError(f"--acc: one acceleration, got {args.acc}")
    args.acc = args.acc[0]
    inputs = choices(args.inputs, INPUTS, "--inputs")
    requested = None if args.findings is None else choices(args.findings, FINDINGS, "--findings")
    try:
        mri.volume_folder(args.data)
        mri.output_folder(args.out)
    except argparse.ArgumentTypeError as error:
        raise UserError(str(error)) from None
    if len(list_volume_files(args.data)) < 3:
        raise UserError(f"{args.data}: train, validation and test need at least 3 volumes")
    data = load_data(mri.parse_args(["--data", args.data, "--seed", str(args.seed), "--device", args.device]))
    if any(v.reports is None for v in data.val + data.test):
        raise UserError(f"{args.data}: every .h5 file needs its 'reports' (one string per slice)")
    splits = {
        "train": split_inputs(data.train, data.out_shape, args, MAX_PROBE_SLICES),
        "val": split_inputs(data.val, data.out_shape, args),
        "test": split_inputs(data.test, data.out_shape, args),
    }
    flat = lambda split, kind: splits[split][0][kind].flatten(1)
    probes = {
        kind: findings_probe(
            flat("train", kind),
            splits["train"][1],
            flat("val", kind),
            splits["val"][1],
            flat("test", kind),
            splits["test"][1],
        )
        for kind in inputs
    }
    stated = list(probes[inputs[0]])  # the findings every report states, two or more values in training
    names = stated if requested is None else requested
    missing = [name for name in names if name not in stated]
    if missing or not names:
        raise UserError(
            f"{args.data}: no {missing or 'finding'} to classify (one stated by every report, two or more "
            f"values in training); these reports give {stated or 'none'}"
        )
    classes = finding_classes([r for v in data.train for r in v.reports])
    rows = {}
    for kind in inputs:
        for name in names:
            test, val, result, seconds = train_cnn(kind, name, classes[name], data, splits, args)
            probe = probes[kind][name]
            rows[(kind, name)] = dict(
                classes=len(classes[name]),
                majority=probe["majority"],
                ridge=probe["accuracy"],
                cnn=test,
                val=val,
                fit=result,
                seconds=seconds,
            )
    slices = {
        split: sum(v.kspace.shape[0] for v in getattr(data, split)) for split in ("train", "val", "test")
    }
    out = Path(args.out)
    command = "python experiments/mri_findings_cnn.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    write_outputs(out, rows, args, data, slices, command, time.time() - t_start)
    print(Path(out / "findings_cnn.md").read_text())
    print(f"wrote findings_cnn.md, findings_cnn.png and findings_cnn_curves.png to {out}")


if __name__ == "__main__":
    run_main(main)
