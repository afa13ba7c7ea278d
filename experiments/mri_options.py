"""The MRI pipeline's open choices side by side: stage 0 (the encoder's reconstruction pre-training) on / off,
stage 1 training or freezing the encoder's VarNet cascades, and the decoder's image skip off / on, each around the same frozen backbone(s), on the same data, masks and
seed, with the same baselines. Every other option is mri.py's and is passed through:

    python experiments/mri_options.py --out mri_options --steps 150 --size 32 --variants nirvana
    python experiments/mri_options.py --out mri_options --data /path/to/multicoil --backbone ckpt.pt

Writes to --out mri.py's outputs for all the variants together (results.md with --diagnose's measurements,
results.json, reports.md, ...) and options.md: one table, a row per backbone and variant."""

import copy
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: mri.py, cli.py

import mri
from cli import no_half_made_output, run_main, write_text_atomically

# (label, stage 0 on, stage 1 trains the cascades, image skip on); the first is the paper's recipe as it
# stands, the third mri.py's default
OPTIONS = [
    ("paper: stages 1+2", False, True, False),
    ("stage 0, stage 1 trains cascades", True, True, False),
    ("stage 0, stage 1 freezes cascades (default)", True, False, False),
    ("paper + image skip", False, True, True),
    ("stage 0, frozen cascades + image skip", True, False, True),
]


def options_markdown(rows, run, summary, command, accelerations):
    """One row per (backbone, variant): test SSIM, the skip alone, the diagnostics, the report scores beside
    the majority baseline and the optimizer steps; then the baselines. rows: [(backbone, variant label, method
    name)]; run: experiment.Run; summary: the test summary."""
    head = " | ".join(f"SSIM {a}x" for a in accelerations)
    lines = [
        "# MRI pipeline options (experiments/mri_options.py)",
        "",
        f"`{command}`",
        "",
        "Test SSIM per acceleration; then at the first acceleration: the 'skip only' SSIM (decoder with the "
        "image tokens at their mean), the decoder with another slice's tokens and with the mean token, the "
        "encoder's own image, ridge-probe R² of the zero-filled image from the image tokens and from the k-space "
        "tokens, and the report count accuracy beside the majority baseline.",
        "",
        f"| backbone | variant | {head} | skip only | other slice's tokens | mean token | encoder image | probe R² "
        "image tokens | probe R² k-space tokens | count acc (majority) | optimizer steps |",
        "|---|---|" + "---|" * len(accelerations) + "---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"
    acc = accelerations[0]
    for backbone, label, name in rows:
        ssims = " | ".join(fmt(summary[name][a]["ssim"][0]) for a in accelerations)
        skip = summary.get(f"{name} skip only")
        d = run.diagnostics[(name, acc)]
        count, majority = run.report_scores[(name, acc)]["count_acc"], run.majority[acc]["count_acc"]
        lines.append(
            f"| {backbone} | {label} | {ssims} | {fmt(skip[acc]['ssim'][0]) if skip else '-'} | "
            f"{fmt(d['ssim_other_slice_tokens'])} | {fmt(d['ssim_mean_token'])} | {fmt(d['ssim_encoder_image'])} | "
            f"{fmt(d['probe_image_tokens']['r2'])} | {fmt(d['probe_kspace_tokens']['r2'])} | "
            f"{count:.3f} ({majority:.3f}) | {run.steps[name]} |"
        )
    for method in ("U-Net", "E2E-VarNet", "zero-filled"):
        ssims = " | ".join(fmt(summary[method][a]["ssim"][0]) for a in accelerations)
        lines.append(f"| - | {method} | {ssims} | - | - | - | - | - | - | - | {run.steps[method]} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = mri.parse_args([*argv, "--diagnose"])
    args.command = shlex.join(["python", "experiments/mri_options.py", *argv])  # results.md names this script
    from mri_recon import experiment
    from mri_recon.backbones import load_backbones

    experiment.set_up(args)
    experiment.check_run(args)
    t_start = time.time()
    with no_half_made_output(args.out):
        data = experiment.load_data(args)
        run = experiment.Run()
        experiment.train_baselines(run, data, args, np.random.default_rng(args.seed))
        rows = []
        for label, stage0, train_cascades, skip in OPTIONS:
            variant = copy.copy(args)
            variant.encoder_pretrain_steps = args.steps if stage0 else 0
            variant.stage1_cascades = "train" if train_cascades else "freeze"
            variant.image_skip = skip
            for name, llm, tokenizer, how in load_backbones(variant):  # seeded: the same backbone each time
                experiment.set_up(variant)  # the same seed for the encoder and decoder of every variant
                tagged = f"{name} {label}"
                experiment.train_backbone(
                    run, (tagged, llm, tokenizer, how), data, variant, np.random.default_rng(args.seed)
                )
                rows.append((name, label, tagged))
        summary = experiment.evaluate_and_write(run, data, args, t_start)
        table = options_markdown(rows, run, summary, args.command, args.eval_acc)
        write_text_atomically(os.path.join(args.out, "options.md"), table)
        print(table)


if __name__ == "__main__":
    run_main(main)
