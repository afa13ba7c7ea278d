"""Where the report loses the slice: can stage 1 teach a backbone the slice's level in the head, and from what?

The reports of the real-anatomy set are cut to their last finding ("level: ventricles."), a 5-class label that a
ridge probe reads from the encoder's k-space tokens (mri.py --diagnose). A tiny random-init backbone
(nirvana-tiny, bytes tokenizer, its window holding the whole sequence) is trained with the image queries on the
report cross-entropy, as `mri.py --stage1-backbone train` does; what sits at the k-space positions is one of:

    learned code        a learned table of the true level (an oracle: the finding, clean, nothing else)
    fixed code          a fixed random table of the true level, at the embedding RMS (nothing to learn there)
    frozen encoder      the encoder at initialisation, frozen, its tokens standardised over the training slices
    encoder             the encoder trained by the report (mri.py's stage 1, without stage 0)
    encoder + batch norm the same with --kspace-token-norm batch
    level-supervised encoder  the encoder first trained with a linear head on its tokens to name the level (the
                        labels themselves, as many steps as stage 1: mri.py's --encoder-findings-steps), then
                        as "encoder"

Scored on the test slices at 4x: the level the trained backbone finds most likely (the report's likelihood
for each of the levels), beside always the most common training level.

    python mri.py --generate data/anatomy32 --anatomy ch2.nii.gz --volumes 60 --slices 8 --size 32 --coils 4
    python experiments/mri_level_readout.py --data data/anatomy32 --out out/level_readout

Writes readout.md (the table and the command) and readout.png (the training curves) to --out."""

import argparse
import dataclasses
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: mri.py, cli.py

import mri
from cli import UserError, run_main, save_figure, write_text_atomically
from mri_recon.batches import evaluation_batches, random_batches
from mri_recon.diagnostics import slice_blind_cross_entropy
from mri_recon.experiment import load_data
from mri_recon.fit import fit
from mri_recon.phantoms import parse_level
from mri_recon.pipeline import PROMPTS, NirvanaMRI, build_nirvana_mri, encode_reports
from mri_recon.training import calibrate_token_norm, train_findings
from nirvana import Nirvana, NirvanaConfig
from tokenizer import load_tokenizer

SOURCES = [
    "learned code",
    "fixed code",
    "frozen encoder",
    "encoder",
    "encoder + batch norm",
    "level-supervised encoder",
]


def level_report(level):
    return f"level: {level}."


def build(source, data, args, tokenizer):
    """The pipeline around a fresh tiny backbone (seeded, so every source starts from the same weights), the
    level table of the code sources (None otherwise), the parameters stage 1 trains and mri.py's options it
    was built with."""
    torch.manual_seed(args.seed)
    config = NirvanaConfig.from_preset("nirvana-tiny", vocab_size=tokenizer.vocab_size, window=args.window)
    llm = Nirvana(config).eval()
    mri_args = mri.parse_args(["--device", args.device, "--train-acc", "4", "--eval-acc", "4"])
    mri_args.kspace_token_norm = "batch" if source in ("frozen encoder", "encoder + batch norm") else "none"
    model = build_nirvana_mri(llm, data.out_shape, mri_args).to(args.device)
    table = None
    trained = list(llm.parameters()) + [model.image_queries]
    if source.endswith("code"):
        n_tokens = model.encoder.vit.n_tokens(*data.out_shape)
        scale = NirvanaMRI.embedding_rms(llm)
        table = scale * torch.randn(len(args.levels), n_tokens, config.d_model, device=args.device)
        if source == "learned code":
            table.requires_grad_(True)
            trained.append(table)
    elif source == "frozen encoder":
        calibrate_token_norm(model, data.train, mri_args)  # the standardisation of the untrained encoder
        model.encoder.token_norm.eval()
    else:
        trained += list(model.encoder.parameters())
    for p in llm.parameters():
        p.requires_grad_(True)
    return model, table, trained, mri_args


def kspace_positions(source, model, table, kspace, mask, levels):
    """What the backbone reads at the k-space positions (B, N, d)."""
    if table is not None:
        return table[levels]
    with torch.set_grad_enabled(source != "frozen encoder" and torch.is_grad_enabled()):
        return model.encoder(kspace, mask)[0]


@torch.no_grad()
def test_accuracy(source, model, table, data, args, tokenizer, prompt):
    """Share of test slices (4x, each volume under its evaluation mask) whose true level is the one whose
    report the backbone finds most likely, and a Counter of the levels it chose."""
    model.eval()
    hits = total = 0
    predictions = Counter()
    candidates = encode_reports(tokenizer, [level_report(level) for level in args.levels], args.device)
    for batch in evaluation_batches(data.test, [4], "random", args.batch_size):
        truth = torch.tensor([args.levels.index(parse_level(r)) for r in batch.reports], device=args.device)
        tokens = kspace_positions(source, model, table, batch.kspace, batch.mask, truth)
        scores = []
        for c in range(len(args.levels)):
            targets = candidates[c : c + 1].expand(len(truth), -1)
            logits = model.report_logits(model.prefix_of_tokens(tokens, prompt), targets, tokenizer.eos_id)
            nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-1, reduction="none").sum(1)
            scores.append(-nll)
        chosen = torch.stack(scores, 1).argmax(1)
        hits += int((chosen == truth).sum())
        total += len(truth)
        predictions.update(args.levels[i] for i in chosen.tolist())
    return hits / total, predictions


def run_source(source, data, args, tokenizer):
    """Stage 1 with mri.py's training loop (AdamW, warm-up and cosine schedule, clipping; no model selection)
    -> test accuracy, the most common test prediction and its share, the training losses."""
    model, table, trained, mri_args = build(source, data, args, tokenizer)
    prompt = torch.tensor(tokenizer.encode(PROMPTS[0]), device=args.device)
    rng = np.random.default_rng(args.seed)

    def loss_fn(b):
        levels = torch.tensor([args.levels.index(parse_level(r)) for r in b.reports], device=args.device)
        targets = encode_reports(tokenizer, [level_report(args.levels[i]) for i in levels], args.device)
        tokens = kspace_positions(source, model, table, b.kspace, b.mask, levels)
        logits = model.report_logits(model.prefix_of_tokens(tokens, prompt), targets, tokenizer.eos_id)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)

    t0 = time.time()
    if source == "level-supervised encoder":  # mri.py --encoder-findings-steps, the whole encoder, the level
        mri_args.encoder_findings_steps, mri_args.stage1_cascades = args.steps, "train"
        mri_args.batch_size, mri_args.lr = args.batch_size, args.lr
        train_findings(source, model, data.train, mri_args, np.random.default_rng(args.seed + 1))
    batches = random_batches(data.train, args.batch_size, [4], "random", rng)
    losses = fit(source, trained, loss_fn, batches, args.steps, args.lr).losses
    if source == "encoder + batch norm":  # as mri.py's stage 1 ends: the training slices' statistics
        calibrate_token_norm(model, data.train, mri_args)
    accuracy, predictions = test_accuracy(source, model, table, data, args, tokenizer, prompt)
    common, n = predictions.most_common(1)[0]
    print(f"{source}: test level accuracy {accuracy:.3f} ({time.time() - t0:.0f}s)", flush=True)
    return accuracy, f"{common} ({n / predictions.total():.0%})", losses


def write_outputs(out, results, args, majority, bound, command):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        "# Can stage 1 teach the backbone the slice's level? (experiments/mri_level_readout.py)",
        "",
        f"`{command}`",
        "",
        f"Reports cut to the level, tiny random-init nirvana backbone (window {args.window}) trained with the image "
        f"queries, {args.steps} steps of batch {args.batch_size}, lr {args.lr} (warm-up and cosine, as mri.py), "
        f"seed {args.seed}, 4x random masks. "
        "Test accuracy: the level whose report the backbone finds most likely. Final training loss: mean of the "
        f"last 50 steps, beside the slice-blind bound {bound:.4f} (the levels' frequencies).",
        "",
        "| at the k-space positions | test level accuracy | majority | most common choice | final training loss |",
        "|---|---|---|---|---|",
    ]
    for source, (accuracy, common, losses) in results.items():
        lines.append(
            f"| {source} | {accuracy:.3f} | {majority:.3f} | {common} | {np.mean(losses[-50:]):.4f} |"
        )
    write_text_atomically(str(out / "readout.md"), "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4))
    for source, (_, _, losses) in results.items():
        smooth = np.convolve(losses, np.ones(20) / 20, mode="valid")
        ax.plot(np.arange(len(smooth)) + 20, smooth, label=source)
    ax.axhline(bound, color="k", ls="--", lw=1, label="slice-blind bound")
    ax.set(xlabel="step", ylabel="report cross-entropy per token (20-step mean)", yscale="log")
    ax.legend(fontsize=8)
    save_figure(str(out / "readout.png"), fig)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a real-anatomy set (reports ending in 'level: ...')")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--window", type=int, default=512, help="the backbone's window (the sequence must fit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated, of: {', '.join(SOURCES)}")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    sources = [s.strip() for s in args.sources.split(",")]
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise UserError(f"--sources: unknown {unknown}; the sources are {SOURCES}")
    data = load_data(mri.parse_args(["--data", args.data, "--seed", str(args.seed), "--device", args.device]))
    train_levels = [parse_level(r) for v in data.train for r in v.reports]
    if None in train_levels:
        raise UserError(f"{args.data}: its reports name no level; generate a real-anatomy set (--anatomy)")
    args.levels = sorted(set(train_levels))
    data = dataclasses.replace(
        data,
        **{
            split: [
                dataclasses.replace(v, reports=[level_report(parse_level(r)) for r in v.reports])
                for v in getattr(data, split)
            ]
            for split in ("train", "val", "test")
        },
    )
    tokenizer = load_tokenizer("bytes")
    common = Counter(train_levels).most_common(1)[0][0]
    test_levels = [parse_level(r) for v in data.test for r in v.reports]
    majority = sum(level == common for level in test_levels) / len(test_levels)
    bound = slice_blind_cross_entropy([r for v in data.train for r in v.reports], tokenizer)
    results = {source: run_source(source, data, args, tokenizer) for source in sources}
    out = Path(args.out)
    command = "python experiments/mri_level_readout.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    write_outputs(out, results, args, majority, bound, command)  # each file written whole or not at all
    print(f"wrote readout.md and readout.png to {out}")


if __name__ == "__main__":
    run_main(main)
