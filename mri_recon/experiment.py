"""The steps of `python mri.py`, in the order main calls them: check what the run needs, read or generate the
data, train the baselines, train and score each backbone, evaluate every method and write the outputs."""

import dataclasses
import json
import os
import time

import h5py
import numpy as np
import torch

from cli import UserError, no_half_made_output, write_text_atomically
from mri_recon import phantoms
from mri_recon.backbones import (
    describe_backbone,
    load_backbones,
    state_fingerprint,
    tiny_config,
    unchanged,
    window_note,
)
from mri_recon.diagnostics import diagnose, finding_classes
from mri_recon.evaluation import evaluate, gate_statistics, generate_test_reports
from mri_recon.fastmri_files import list_volume_files, load_volumes, split_by_volume
from mri_recon.metrics import SSIM_WINDOW, score_majority, score_reports, summarize
from mri_recon.models import E2EVarNet, UNetBaseline, zero_filled
from mri_recon.pipeline import PROMPTS, build_nirvana_mri, count_trainable, heads_for, mri_sequence_length
from mri_recon.plots import save_curves, save_grid
from mri_recon.results import reports_markdown, results_markdown
from mri_recon.training import train_findings, train_image_baseline, train_stage0, train_stage1, train_stage2


def set_up(args):
    """Seeds, matmul precision and the device (default: cuda when there is one)."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {args.device} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: this machine has no CUDA GPU; use --device cpu")
    torch.manual_seed(args.seed)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them
    return np.random.default_rng(args.seed)


def generate_dataset(args, folder):
    """Phantoms, or volumes of the --anatomy image, written to folder; their paths."""
    shape = (args.volumes, args.slices, args.size, args.coils)
    if args.anatomy:
        from mri_recon import anatomy  # it needs nibabel, which runs on phantoms or --data do not

        return anatomy.generate_dataset(folder, args.anatomy, *shape, args.seed)
    return phantoms.generate_dataset(folder, *shape, args.seed)


def generate(args):
    """--generate: only write a synthetic data set."""
    with no_half_made_output(args.generate):
        generate_dataset(args, args.generate)


def check_run(args):
    """What a run needs, checked before its first expensive step: the encoder width, the backbones (every
    checkpoint loads, every variant exists) and the number of --data volumes."""
    heads = heads_for(args.vit_dim)
    if args.vit_dim % 4 or args.vit_dim % heads:
        raise UserError(
            f"--vit-dim {args.vit_dim} must be a multiple of 4 and of its {heads} attention heads "
            f"(one per 32 features); try 64"
        )
    if args.backbone:
        # loaded here to check them, and again after the baselines as before: building a model draws random
        # numbers, which must not shift the baselines' initialisation
        with torch.random.fork_rng():
            load_backbones(args)
    for variant in args.variants:
        tiny_config(variant, vocab_size=256)  # the bytes tokenizer's vocabulary
    if args.data:
        paths = list_volume_files(args.data, args.max_volumes)
        if len(paths) < 3:
            raise UserError(
                f"{args.data}: {len(paths)} .h5 file(s) used; train, validation and test need at least 3 "
                "volumes: add files or raise --max-volumes"
            )


@dataclasses.dataclass
class Data:
    train: list
    val: list
    test: list
    note: str  # where the data came from
    split_note: str  # how many volumes and slices each split holds
    out_shape: tuple


def load_data(args):
    """The --data files, or synthetic phantoms written to <out>/synthetic (volumes of the --anatomy image to
    <out>/anatomy), split by volume and loaded."""
    if args.data:
        paths = list_volume_files(args.data, args.max_volumes)
    else:
        print(
            f"generating {args.volumes} synthetic volumes x {args.slices} slices, {args.size}x{args.size}, "
            f"{args.coils} coils" + (f", from {args.anatomy}" if args.anatomy else ""),
            flush=True,
        )
        paths = generate_dataset(args, os.path.join(args.out, "anatomy" if args.anatomy else "synthetic"))
    train_paths, val_paths, test_paths = split_by_volume(paths, args.seed)
    train, val, test = (load_volumes(p, args.device) for p in (train_paths, val_paths, test_paths))
    note = data_note(args, paths)
    n_slices = lambda vols: sum(v.kspace.shape[0] for v in vols)
    split_note = (
        f"split by volume: train {len(train)} ({n_slices(train)} slices), val {len(val)} "
        f"({n_slices(val)} slices), test {len(test)} ({n_slices(test)} slices)"
    )
    print(f"{note}; {split_note}; device {args.device}", flush=True)
    out_shape = tuple(train[0].target.shape[-2:])
    if any(v.reports is None for v in train):
        raise UserError(
            "stage 1 needs a report per slice: add a 'reports' dataset (one string per slice) to "
            "every training .h5 file"
        )
    if args.encoder_findings_steps and not finding_classes([r for v in train for r in v.reports]):
        raise UserError(
            "--encoder-findings-steps: the training reports state no finding with two or more values (lesion "
            "count, places, level in the templated form mri.py --generate writes); leave the option out"
        )
    h, w = out_shape
    if min(h, w) < SSIM_WINDOW or h % args.patch or w % args.patch:
        raise UserError(
            f"the images are {h}x{w}: the image decoder needs sides that are multiples of --patch "
            f"{args.patch}, and SSIM sides of at least {SSIM_WINDOW}"
        )
    return Data(train, val, test, note, split_note, out_shape)


def data_note(args, paths):
    """Where the data came from, for the log and results.md (the files are known to be readable)."""
    with h5py.File(paths[0], "r") as f:
        acquisition = f.attrs.get("acquisition", "not recorded")
    if not args.data:
        return (
            f"data: {acquisition if args.anatomy else 'synthetic phantoms'}, {args.volumes} volumes x "
            f"{args.slices} slices, {args.size}x{args.size}, {args.coils} coils"
        )
    return (
        f"data: {len(paths)} fastMRI-format files from {args.data} (acquisition of the first: {acquisition})"
    )


@dataclasses.dataclass
class Run:
    """What the training steps produce, for the evaluation and the outputs."""

    methods: dict = dataclasses.field(
        default_factory=lambda: {"zero-filled": lambda k, m, shape: zero_filled(k, shape)}
    )
    params: dict = dataclasses.field(default_factory=lambda: {"zero-filled": 0})
    timings: dict = dataclasses.field(default_factory=dict)
    fits: dict = dataclasses.field(default_factory=dict)
    steps: dict = dataclasses.field(default_factory=lambda: {"zero-filled": "-"})  # optimizer steps taken
    report_scores: dict = dataclasses.field(default_factory=dict)
    report_examples: dict = dataclasses.field(default_factory=dict)
    majority: dict = dataclasses.field(default_factory=dict)  # {acc: scores of the most common report}
    diagnostics: dict = dataclasses.field(default_factory=dict)  # {(backbone, acc): diagnose(...)}
    backbone_notes: list = dataclasses.field(default_factory=list)
    gates: dict = dataclasses.field(default_factory=dict)
    # each method scored once, when it is first written: {method: {acc: [metrics per volume]}}, and the test
    # reconstructions {acc: {method or "ground truth": [(S, h, w) per volume]}}
    scores: dict = dataclasses.field(default_factory=dict)
    val_scores: dict = dataclasses.field(default_factory=dict)
    recons: dict = dataclasses.field(default_factory=dict)


def train_baselines(run, data, args, rng):
    """The U-Net on the zero-filled image and E2E-VarNet, trained with -SSIM."""
    baselines = {
        "U-Net": UNetBaseline(args.unet_chans, args.pools),
        "E2E-VarNet": E2EVarNet(args.varnet_cascades, args.chans, args.sens_chans),
    }
    for name, model in baselines.items():
        model.to(args.device)
        t0 = time.time()
        run.fits[name] = train_image_baseline(name, model, data.train, args, rng, data.val)
        run.timings[name] = time.time() - t0
        model.eval()
        run.methods[name], run.params[name] = model, count_trainable(model)
        run.steps[name] = str(len(run.fits[name].losses))


def train_backbone(run, backbone, data, args, rng):
    """Stage 0 (unless --encoder-pretrain-steps 0) and both post-training stages around one frozen backbone
    (trained in stage 1 with --stage1-backbone train), then its test reports beside the majority baseline, gate
    statistics and (--diagnose) diagnostics."""
    name, llm, tokenizer, how = backbone
    train = data.train
    model = build_nirvana_mri(llm, data.out_shape, args)
    seq_len = mri_sequence_length(model, data.out_shape, tokenizer, [r for v in train for r in v.reports])
    fits_in = window_note(llm, seq_len)
    print(f"{name}: {describe_backbone(llm)}; {how}; {fits_in}", flush=True)
    fingerprint = state_fingerprint(llm)
    t0 = time.time()
    stages = [1, 2]
    if args.encoder_pretrain_steps:
        run.fits[f"{name} stage 0"] = train_stage0(name, model, train, args, rng, data.val)
        stages.insert(0, 0)
    if args.encoder_findings_steps:
        run.fits[f"{name} stage findings"] = train_findings(name, model, train, args, rng)
        stages.insert(-2, "findings")
    run.fits[f"{name} stage 1"] = train_stage1(name, model, train, tokenizer, args, rng, data.val)
    run.fits[f"{name} stage 2"] = train_stage2(name, model, train, tokenizer, args, rng, data.val)
    run.timings[name] = time.time() - t0
    frozen = unchanged(llm, fingerprint)
    model.eval()
    prompt_ids = torch.tensor(tokenizer.encode(PROMPTS[0]), device=args.device)
    run.methods[name] = lambda k, m, shape, model=model, prompt_ids=prompt_ids: model(k, m, prompt_ids)
    # every trained part: the encoder with its cascades, the queries (and their projection), the decoder (and
    # the backbone with --stage1-backbone train)
    tuned = args.stage1_backbone == "train"
    run.params[name] = count_trainable(*model.stage1_parameters(backbone=tuned), model.decoder)
    run.steps[name] = " + ".join(f"{len(run.fits[f'{name} stage {i}'].losses)} (stage {i})" for i in stages)
    if args.data_consistency:  # what the step adds to the decoder, and what it gives without the backbone
        run.methods[f"{name} decoder alone"] = lambda k, m, shape, model=model, prompt_ids=prompt_ids: (
            model.decoder_alone(k, m, prompt_ids)
        )
        run.methods[f"{name} encoder image + DC"] = lambda k, m, shape, model=model: (
            model.encoder_image_with_data_consistency(k, m)
        )
        run.params[f"{name} decoder alone"] = run.params[name]
        run.params[f"{name} encoder image + DC"] = count_trainable(model.encoder)
        for row in (f"{name} decoder alone", f"{name} encoder image + DC"):
            run.steps[row] = run.steps[name]
    if (
        args.image_skip
    ):  # what the backbone adds over the skip: the same decoder, the image tokens at their mean
        skip_only = f"{name} skip only"
        run.methods[skip_only] = lambda k, m, shape, model=model: model.reconstruct_skip_only(k, m)
        run.params[skip_only], run.steps[skip_only] = run.params[name], run.steps[name]
    state = "trained in stage 1 (--stage1-backbone train)" if tuned else "frozen"
    run.backbone_notes.append(
        f"- {name}: {describe_backbone(llm)}; {how}; {fits_in}; {state} (bit-equal after "
        f"both stages: {frozen})"
    )
    train_reports = [r for v in train for r in v.reports]
    max_len = max(len(tokenizer.encode(r)) for r in train_reports) + 8
    for acc in args.eval_acc:
        generated, truth = generate_test_reports(model, data.test, tokenizer, acc, args, max_len)
        run.report_scores[(name, acc)] = score_reports(generated, truth, train_reports)
        run.report_examples[(name, acc)] = list(zip(generated, truth))[:12]
        run.majority[acc] = score_majority(train_reports, truth)
        stats = gate_statistics(model, data.test, prompt_ids, acc, args)
        if stats is not None:
            run.gates.setdefault(acc, {})[name] = stats
        if args.diagnose:
            run.diagnostics[(name, acc)] = diagnose(model, data, tokenizer, prompt_ids, acc, args)


def evaluate_and_write(run, data, args, t_start, still_to_train=()):
    """Scores the methods not scored yet on the test (and validation) volumes; writes results.md, results.json,
    reports.md, recon_grid_<acc>x.png and training_curves.png to --out for every method so far. Called after
    the baselines and after each backbone, so a run stopped part way (a GPU session's time limit) still has
    the finished methods' results; still_to_train names the methods to come (results.md says they are missing).
    Each method's masks depend only on the volume, so scoring methods at different times changes nothing.
    Returns the test summary."""
    new = {name: fn for name, fn in run.methods.items() if name not in run.scores}
    if new:
        print(f"evaluating {', '.join(new)}", flush=True)
        scores, recons = evaluate(
            new,
            data.test,
            args.eval_acc,
            args.mask_type,
            args.batch_size,
            progress="scoring the test volumes",
        )
        run.scores.update(scores)
        for acc, images in recons.items():
            run.recons.setdefault(acc, {}).update(images)
        run.val_scores.update(
            evaluate(
                new,
                data.val,
                args.eval_acc,
                args.mask_type,
                args.batch_size,
                progress="scoring the validation volumes",
            )[0]
        )
    summary, val_summary, recons = summarize(run.scores), summarize(run.val_scores), run.recons
    chosen = ", ".join(
        f"{k} {len(f.losses)}" + (f" (best val at {f.best_step})" if f.checks else "")
        for k, f in run.fits.items()
    )
    partial = (
        [f"PARTIAL: written while the run goes on; still to train: {', '.join(still_to_train)}"]
        if still_to_train
        else []
    )
    notes = partial + [
        f"command: `{args.command}`",
        f"{data.note}; {data.split_note}",
        f"masks: {args.mask_type}, trained on {args.train_acc}x, scored on {args.eval_acc}x; "
        f"batch {args.batch_size}, lr {args.lr}, device {args.device}; optimizer steps "
        f"(--steps {args.steps}, --stage1-steps {args.stage1_steps}, --phase-seconds {args.phase_seconds:g}, "
        f"{args.val_checks} validation checks per phase, the best kept): {chosen}",
        "backbones:",
        *run.backbone_notes,
        "training time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in run.timings.items()),
    ]
    reports_by_acc = {}
    for (name, acc), s in run.report_scores.items():
        reports_by_acc.setdefault(acc, {})[name] = s
    for acc, s in run.majority.items():
        reports_by_acc[acc]["majority"] = s
    table = results_markdown(
        summary,
        run.params,
        notes,
        val_summary,
        run.gates,
        steps=run.steps,
        reports=reports_by_acc,
        diagnostics=run.diagnostics,
    )
    write_text_atomically(os.path.join(args.out, "results.md"), table)
    write_text_atomically(
        os.path.join(args.out, "results.json"),
        json.dumps(
            {
                "summary": summary,
                "val_summary": val_summary,
                "per_volume": run.scores,
                "params": run.params,
                "timings_s": run.timings,
                "notes": notes,
                "fits": {k: dataclasses.asdict(f) for k, f in run.fits.items()},
                "gates": {f"{a}x": g for a, g in run.gates.items()},
                "reports": {f"{n} {a}x": s for (n, a), s in run.report_scores.items()},
                "majority_report": {f"{a}x": s for a, s in run.majority.items()},
                "diagnostics": {f"{n} {a}x": d for (n, a), d in run.diagnostics.items()},
                "steps": run.steps,
            },
            indent=1,
        ),
    )
    reports = reports_markdown(run.report_scores, run.report_examples, run.majority)
    write_text_atomically(os.path.join(args.out, "reports.md"), reports)
    for acc in args.eval_acc:
        save_grid(os.path.join(args.out, f"recon_grid_{acc}x.png"), recons, data.test, acc)
    save_curves(os.path.join(args.out, "training_curves.png"), run.fits)
    if still_to_train:
        print(f"wrote the results so far to {args.out} ({time.time() - t_start:.0f}s)", flush=True)
        return summary
    print(table)
    lines = reports.split("\n")
    print("\n".join(lines[:3] + [line for line in lines if line.startswith("## ")]))
    print(
        f"wrote results.md, results.json, reports.md, recon_grid_<acc>x.png, training_curves.png to "
        f"{args.out} ({time.time() - t_start:.0f}s)"
    )
    return summary
