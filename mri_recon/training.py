"""What each method trains: the image baselines (-SSIM), Nirvana's stage 0 (the encoder's VarNet cascades,
-SSIM on their own image: a choice of this code, see train_stage0), stage 1 (the k-space encoder and image
queries, cross-entropy on the report) and stage 2 (the image decoder alone, -SSIM, eq. 9), each with its
validation loss for model selection."""

import numpy as np
import torch

from mri_recon.batches import Batch, evaluation_batches, random_batches
from mri_recon.diagnostics import finding_classes, findings
from mri_recon.evaluation import mean_ssim
from mri_recon.fit import fit
from mri_recon.metrics import ssim
from mri_recon.pipeline import PROMPTS, encode_reports


def ssim_loss(pred, batch):
    """eq. (9): -SSIM, data range = the volume max."""
    return -ssim(pred, batch.target, batch.maxval).mean()


def train_image_baseline(name, model, volumes, args, rng, val_volumes=()):
    """-SSIM training; with val_volumes, the parameters of the best validation SSIM (training
    accelerations)."""
    batches = random_batches(volumes, args.batch_size, args.train_acc, args.mask_type, rng)
    shape_of = lambda b: tuple(b.target.shape[-2:])
    validate = (lambda: -mean_ssim(model, val_volumes, args.train_acc, args)) if val_volumes else None
    return fit(
        name,
        model.parameters(),
        lambda b: ssim_loss(model(b.kspace, b.mask, shape_of(b)), b),
        batches,
        args.steps,
        args.lr,
        args.phase_seconds,
        validate,
        args.val_checks,
    )


def train_stage0(name, model, volumes, args, rng, val_volumes=()):
    """Stage 0, before the paper's two stages: the encoder's VarNet cascades and sensitivity model (nothing
    else) trained with -SSIM on their own magnitude image, for --encoder-pretrain-steps steps.
    The paper leaves open how the encoder comes to carry the anatomy: it builds the encoder from a multi-coil
    VarNet (a reconstruction network) but trains it only on the report cross-entropy, and a templated report
    (lesion count, place, size) needs little of the image. Measured with `mri.py --diagnose` (README): after
    the paper's stage 1 the encoder's own image scores SSIM ~0.13, not a reconstruction. Stages 1 and 2 keep
    their losses; by default stage 1 then leaves these cascades frozen (--stage1-cascades)."""
    batches = random_batches(volumes, args.batch_size, args.train_acc, args.mask_type, rng)
    reconstruct = lambda kspace, mask, out_shape: model.encoder.reconstruct(kspace, mask)
    validate = (lambda: -mean_ssim(reconstruct, val_volumes, args.train_acc, args)) if val_volumes else None
    return fit(
        f"{name} stage 0",
        model.stage0_parameters(),
        lambda b: ssim_loss(model.encoder.reconstruct(b.kspace, b.mask), b),
        batches,
        args.encoder_pretrain_steps,
        args.lr,
        args.phase_seconds,
        validate,
        args.val_checks,
    )


def train_findings(name, model, volumes, args, rng):
    """Before stage 1 (--encoder-findings-steps; not in the paper): the encoder's token path (what stage 1 trains
    of it, per --stage1-cascades) and one linear head per finding on all its k-space tokens (N * d_model ->
    classes), trained with the sum of the findings' cross-entropies for --encoder-findings-steps steps. The
    findings are the report's labels (`diagnostics.findings`: lesion count, places, level), each one every
    training report states with two or more values. Why: stage 1's one report per slice did not teach the
    encoder to put a finding into its tokens (README), while a supervised CNN reads the findings from the
    same images and the backbone reads a finding that arrives clean. The heads are dropped afterwards."""
    classes = finding_classes([r for v in volumes for r in v.reports])
    if not classes:
        raise ValueError(
            "--encoder-findings-steps: the training reports state no finding with two or more values"
        )
    width = model.encoder.vit.n_tokens(*volumes[0].target.shape[-2:]) * model.llm.config.d_model
    heads = torch.nn.ModuleDict({n: torch.nn.Linear(width, len(c)) for n, c in classes.items()}).to(
        args.device
    )
    encoder = model.encoder_parameters(cascades=args.stage1_cascades == "train")

    def loss_fn(b):
        tokens = model.encoder(b.kspace, b.mask)[0].flatten(1)  # (B, N * d_model)
        return sum(
            torch.nn.functional.cross_entropy(
                head(tokens),
                torch.tensor([classes[n].index(findings(r)[n]) for r in b.reports], device=args.device),
            )
            for n, head in heads.items()
        )

    batches = random_batches(volumes, args.batch_size, args.train_acc, args.mask_type, rng)
    return fit(
        f"{name} findings",
        encoder + list(heads.parameters()),
        loss_fn,
        batches,
        args.encoder_findings_steps,
        args.lr,
        args.phase_seconds,
    )


@torch.no_grad()
def report_val_loss(model, volumes, tokenizer, prompt_ids, args):
    """Stage 1's validation loss: the report cross-entropy (mean over batches) of every slice of volumes, each
    volume with its evaluation mask at every training acceleration; batches of 4 x batch-size slices."""
    batches = evaluation_batches(
        volumes, args.train_acc, args.mask_type, 4 * args.batch_size, across_volumes=True
    )
    losses = [
        model.report_loss(
            b.kspace, b.mask, prompt_ids, encode_reports(tokenizer, b.reports, args.device), tokenizer.eos_id
        ).item()
        for b in batches
    ]
    return float(np.mean(losses))


def train_stage1(name, model, volumes, tokenizer, args, rng, val_volumes=()):
    """Stage 1: the encoder (and image queries) only, cross-entropy on the report tokens, for --stage1-steps
    steps; backbone frozen (unless --stage1-backbone train).
    --stage1-cascades freeze (the default after stage 0) leaves the encoder's VarNet cascades as stage 0 made
    them: trained on the report, they forget the reconstruction (measured: the encoder's image fell from SSIM
    ~0.8 after stage 0 to ~0.17 after stage 1, see README). --stage1-backbone train (a diagnostic, not the
    paper's recipe) trains the backbone's weights as well, then freezes them again. With val_volumes (all with
    reports), the parameters of the best validation cross-entropy."""
    prompts = [torch.tensor(tokenizer.encode(p), device=args.device) for p in PROMPTS]
    batches = random_batches(volumes, args.batch_size, args.train_acc, args.mask_type, rng)
    loss_fn = lambda b: model.report_loss(
        b.kspace,
        b.mask,
        prompts[rng.integers(len(prompts))],
        encode_reports(tokenizer, b.reports, args.device),
        tokenizer.eos_id,
    )
    validate = None
    if val_volumes and all(v.reports is not None for v in val_volumes):
        validate = lambda: report_val_loss(model, val_volumes, tokenizer, prompts[0], args)
    backbone = args.stage1_backbone == "train"
    with model.backbone_trainable(backbone):
        result = fit(
            f"{name} stage 1",
            model.stage1_parameters(cascades=args.stage1_cascades == "train", backbone=backbone),
            loss_fn,
            batches,
            args.stage1_steps,
            args.lr,
            args.phase_seconds,
            validate,
            args.val_checks,
        )
    if model.encoder.token_norm is not None:
        calibrate_token_norm(model, volumes, args)
    return result


@torch.no_grad()
def calibrate_token_norm(model, volumes, args):
    """--kspace-token-norm batch, after stage 1: the standardisation's statistics from every training slice at
    every training acceleration, each volume under its evaluation mask, with the encoder stage 1 kept; fixed from
    then on (the running average of stage 1 followed weights that model selection may have undone)."""
    batches = evaluation_batches(volumes, args.train_acc, args.mask_type, 4 * args.batch_size)
    tokens = [model.encoder.projected_tokens(b.kspace, b.mask)[0] for b in batches]
    model.encoder.token_norm.calibrate(torch.cat(tokens))


@torch.no_grad()
def cache_image_tokens(model, volumes, prompt_ids, args, rng=None):
    """Stage 2 inputs: encoder and backbone are frozen, so each slice's image tokens are computed once per
    training acceleration, under its volume's evaluation mask (with rng: under a fresh random mask).
    Returns [(tokens, encoder image, scale, target, maxval, k0, mask, sens, coil image)], one entry per image
    and k-space shape; the last four are encoder.data_consistency_inputs with the data-consistency step (the
    normalised undersampled k-space, its mask, the coil maps and the cascades' image: 2 C H W + H W complex
    numbers per slice and training acceleration, on the device), four None without it."""
    cache = {}
    for b in evaluation_batches(volumes, args.train_acc, args.mask_type, 4 * args.batch_size, rng=rng):
        tokens, image, scale = model.image_tokens(b.kspace, b.mask, prompt_ids)
        measured = (
            model.encoder.data_consistency_inputs(b.kspace, b.mask) if model.data_consistency else (None,) * 4
        )
        cache.setdefault((tuple(b.target.shape[-2:]), tuple(b.kspace.shape[1:])), []).append(
            (tokens, image, scale, b.target, b.maxval, *measured)
        )
    return [
        tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*v)) for v in cache.values()
    ]


@torch.no_grad()
def decoder_val_loss(model, cache, batch_size):
    """-SSIM of the decoder over every cached slice (mean over slices)."""
    total, count = 0.0, 0
    for tokens, image, scale, target, maxval, *measured in cache:
        for i in range(0, tokens.shape[0], batch_size):
            part = slice(i, i + batch_size)
            inputs = None if measured[0] is None else [m[part] for m in measured]
            pred = model.reconstruct_from_tokens(tokens[part], image[part], scale[part], inputs)
            total += ssim(pred, target[part], maxval[part]).sum().item()
            count += pred.shape[0]
    return -total / count


def train_stage2(name, model, volumes, tokenizer, args, rng, val_volumes=()):
    """Stage 2: the decoder only, loss -SSIM (eq. 9); encoder, image queries and backbone frozen.
    Training slices get one random mask per training acceleration, validation slices their evaluation masks;
    with val_volumes, the decoder of the best validation SSIM."""
    for p in model.stage1_parameters():
        p.requires_grad_(False)
    prompt_ids = torch.tensor(tokenizer.encode(PROMPTS[0]), device=args.device)
    cache = cache_image_tokens(model, volumes, prompt_ids, args, rng)
    model.decoder.set_token_statistics(torch.cat([c[0] for c in cache]))
    sizes = np.array([c[0].shape[0] for c in cache], dtype=np.float64)
    validate = None
    if val_volumes:
        val_cache = cache_image_tokens(model, val_volumes, prompt_ids, args)
        validate = lambda: decoder_val_loss(model, val_cache, 4 * args.batch_size)

    def batches():
        while True:
            tokens, image, scale, target, maxval, *measured = cache[
                rng.choice(len(cache), p=sizes / sizes.sum())
            ]
            i = torch.from_numpy(
                rng.choice(tokens.shape[0], size=min(args.batch_size, tokens.shape[0]), replace=False)
            )
            inputs = None if measured[0] is None else [m[i] for m in measured]
            yield tokens[i], image[i], scale[i], inputs, Batch(None, None, target[i], maxval[i], None, None)

    # with the data-consistency step, the decoder is trained through it
    loss_fn = lambda b: ssim_loss(model.reconstruct_from_tokens(*b[:4]), b[4])
    return fit(
        f"{name} stage 2",
        model.decoder.parameters(),
        loss_fn,
        batches(),
        args.steps,
        args.lr,
        args.phase_seconds,
        validate,
        args.val_checks,
    )
