"""Does the image reach the decoder through the backbone? Measured after stage 2 (`mri.py --diagnose`):

- the decoder's SSIM with each slice's own image tokens, with the tokens of another slice (`partner_slices`:
  the same slice index in the next volume), and with the mean training token (the decoder's token_mean).
  With --image-skip the decoder keeps the slice's own encoder image in all three, so the mean-token score is
  the "skip only" reconstruction and the gap to the own-token score is what the backbone adds over the skip;
- ridge-regression linear probes from the image tokens, and from the k-space tokens the encoder emits, to the
  zero-filled image (in units of the k-space scale): fitted on the training slices, the ridge strength chosen
  on the validation slices, scored on the test slices (R^2 over pixels, and SSIM of the probe's image);
- a ridge probe from the image tokens to the truth (fitted and chosen the same way; its SSIM uses the decoder's
  data range): what a linear readout of all image tokens at once reaches, beside the trained decoder's score;
- the SSIM of the encoder's own image estimate (what stage 0 trains);
- can the findings be read from the tokens? Ridge classifiers (one-hot targets, the arg-max class) from the
  k-space tokens, from the image tokens and, for reference, from the zero-filled and the true image, to each
  finding of the report (`findings`: the lesion count, the set of lesion places, the level in the head), fitted
  and chosen as the image probes, their test accuracy beside always answering the most common training label.
  A k-space-token probe above that baseline while the generated reports are not: the encoder delivers the
  finding and the backbone does not turn it into words; a true-image probe near the baseline: a linear readout
  cannot find that finding even in the image. Beside them, how much of the tokens differs between slices at all
  (`slice_specific_share`): the probes standardise every feature, so they read differences the backbone, which
  sees the tokens whole, may find too small to notice;
- does the report depend on the slice? Stage 1's report cross-entropy (`report_loss`, the prompt of the
  diagnostics, mean over batches) of the test slices that have reports, with each slice's own k-space and with
  its partner's k-space and mask (the same reports, so only the encoder's k-space tokens change); and both again
  on the slices whose partner has a different report. Own ~= other slice's: the k-space tokens carry nothing
  the report needs (the reports then come out the same for every slice). Beside them, the cross-entropy of the
  best model that ignores the slice (`slice_blind_cross_entropy` of the training reports): a stage 1 far above
  it has not yet learned the reports' wording and their frequencies, before any question of the slice.

Every slice is undersampled with its volume's evaluation mask at the acceleration scored."""

import dataclasses
import math
from collections import Counter

import numpy as np
import torch

from mri_recon.batches import evaluation_batches, make_batch
from mri_recon.masks import volume_mask
from mri_recon.metrics import ssim
from mri_recon.models import zero_filled
from mri_recon.phantoms import parse_level, parse_report
from mri_recon.pipeline import encode_reports

RIDGE_STRENGTHS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # x the mean squared feature norm
MAX_PROBE_SLICES = 2048  # training slices a probe is fitted on (the dual solve is N x N)


@dataclasses.dataclass
class SliceFeatures:
    image_tokens: torch.Tensor  # (N, M, d) the backbone's states at the image queries
    kspace_tokens: torch.Tensor  # (N, Nk, d) the encoder's output
    encoder_image: torch.Tensor  # (N, h, w) the encoder's magnitude image, units of the k-space scale
    scale: torch.Tensor  # (N,) the k-space scale
    zero_filled: torch.Tensor  # (N, h, w) the zero-filled image, units of the k-space scale
    target: torch.Tensor  # (N, h, w)
    maxval: torch.Tensor  # (N,) the volume max of each slice's volume
    slice_counts: list  # slices per volume, in order


@torch.no_grad()
def slice_features(model, volumes, prompt_ids, acc, args, max_slices=None):
    """SliceFeatures of every slice of volumes (at most max_slices), each volume with its evaluation mask."""
    parts, slice_counts = [], Counter()
    for batch in evaluation_batches(volumes, [acc], args.mask_type, 4 * args.batch_size, max_slices):
        tokens, image, scale = model.image_tokens(batch.kspace, batch.mask, prompt_ids)
        kspace_tokens = model.encoder(batch.kspace, batch.mask)[0]
        zf = zero_filled(batch.kspace, model.encoder.out_shape) / scale.reshape(-1, 1, 1)
        parts.append((tokens, kspace_tokens, image, scale, zf, batch.target, batch.maxval))
        slice_counts.update(v for v, _ in batch.slices)
    return SliceFeatures(*(torch.cat(p) for p in zip(*parts)), list(slice_counts.values()))


def partner_slices(slice_counts):
    """Index of "another slice" for every slice of volumes laid end to end: the same slice index in the next
    volume (cyclically; its last slice when it has fewer), or with one volume the slice half a volume away.
    None when there is only one slice."""
    starts = np.concatenate([[0], np.cumsum(slice_counts)[:-1]])
    if len(slice_counts) == 1:
        S = slice_counts[0]
        return None if S < 2 else (np.arange(S) + S // 2) % S
    partners = []
    for v, S in enumerate(slice_counts):
        nxt = (v + 1) % len(slice_counts)
        partners += [starts[nxt] + min(s, slice_counts[nxt] - 1) for s in range(S)]
    return np.array(partners)


@torch.no_grad()
def report_cross_entropy(model, volumes, tokenizer, prompt_ids, acc, args):
    """Stage 1's report cross-entropy of every slice of volumes (all with reports), each volume undersampled with
    its evaluation mask at acc: with each slice's own k-space and with its partner's (`partner_slices`), the
    reports and batches the same in both. Each value is the mean of `report_loss` (the mean over a batch's
    report tokens) over batches of 4 x batch-size slices; a batch holds slices of one own and one partner
    k-space shape. Returns {"report_ce_own", "report_ce_other_slice"} over all slices, the same two restricted
    to the slices whose partner has a different report ("..._other_report_only") and "report_ce_slices"
    (how many of each); None values where no slice has a partner (or none a different report)."""
    items = [(v, s) for v, vol in enumerate(volumes) for s in range(vol.kspace.shape[0])]
    masks = [volume_mask(vol.name, vol.kspace.shape[-1], acc, args.mask_type) for vol in volumes]
    reports = [volumes[v].reports[s] for v, s in items]
    partners = partner_slices([vol.kspace.shape[0] for vol in volumes]) if volumes else None
    if partners is None:
        return {
            "report_ce_own": None,
            "report_ce_other_slice": None,
            "report_ce_own_other_report_only": None,
            "report_ce_other_report_only": None,
            "report_ce_slices": {"all": len(items), "other_report": 0},
        }
    kspace_shape = lambda i: tuple(volumes[items[i][0]].kspace.shape[1:])

    def loss(source, chunk):  # report_loss of the chunk's reports after the k-space and masks of source
        batch = make_batch(volumes, [items[j] for j in source], [masks[items[j][0]] for j in source])
        targets = encode_reports(tokenizer, [reports[i] for i in chunk], args.device)
        return model.report_loss(batch.kspace, batch.mask, prompt_ids, targets, tokenizer.eos_id).item()

    def own_and_other(slices):
        """The mean loss over batches, with the slices' own k-space and with their partners'."""
        groups = {}
        for i in slices:
            groups.setdefault((kspace_shape(i), kspace_shape(partners[i])), []).append(i)
        own, other = [], []
        for group in groups.values():
            for b in range(0, len(group), 4 * args.batch_size):
                chunk = group[b : b + 4 * args.batch_size]
                own.append(loss(chunk, chunk))
                other.append(loss(partners[chunk], chunk))
        return float(np.mean(own)), float(np.mean(other))

    all_own, all_other = own_and_other(range(len(items)))
    other_report = [i for i in range(len(items)) if reports[partners[i]] != reports[i]]
    own_restricted, other_restricted = own_and_other(other_report) if other_report else (None, None)
    return {
        "report_ce_own": all_own,
        "report_ce_other_slice": all_other,
        "report_ce_own_other_report_only": own_restricted,
        "report_ce_other_report_only": other_restricted,
        "report_ce_slices": {"all": len(items), "other_report": len(other_report)},
    }


@torch.no_grad()
def decoder_ssim(model, tokens, feats, batch_size):
    """Mean SSIM over slices of the decoder's image from tokens (N, M, d), with each slice's own encoder image
    (used with image_skip) and k-space scale, against its target."""
    scores = []
    for i in range(0, tokens.shape[0], batch_size):
        part = slice(i, i + batch_size)
        pred = model.reconstruct_from_tokens(tokens[part], feats.encoder_image[part], feats.scale[part])
        scores.append(ssim(pred, feats.target[part], feats.maxval[part]))
    return torch.cat(scores).mean().item()


def ridge_fit_predict(x_train, y_train, x_eval, strength):
    """Ridge regression in its dual form (N_train x N_train), features standardised with the training
    statistics, an intercept from the training mean. x (N, F), y (N, P) -> predictions (N_eval, P)."""
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-12)
    xt, xe = (x_train - mean) / std, (x_eval - mean) / std
    y_mean = y_train.mean(0)
    gram = xt @ xt.T  # (N, N)
    lam = strength * gram.diagonal().mean()
    alpha = torch.linalg.solve(
        gram + lam * torch.eye(len(gram), dtype=gram.dtype, device=gram.device), y_train - y_mean
    )
    return xe @ xt.T @ alpha + y_mean


def r_squared(pred, y):
    """1 - SSE / SST over every pixel of every slice, SST around the per-pixel mean of y. (N, P)."""
    return (1 - (y - pred).pow(2).sum() / (y - y.mean(0)).pow(2).sum().clamp_min(1e-30)).item()


def linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, shape, data_range=None):
    """The probe's R^2 and SSIM on the test slices, the ridge strength chosen by the validation R^2.
    x (N, F) features, y (N, h*w) images; SSIM with data_range (N,), by default each slice's own max."""
    to64 = lambda t: t.double()
    train_x, train_y, val_x, val_y, test_x, test_y = map(
        to64, (train_x, train_y, val_x, val_y, test_x, test_y)
    )
    strength = max(
        RIDGE_STRENGTHS, key=lambda s: r_squared(ridge_fit_predict(train_x, train_y, val_x, s), val_y)
    )
    pred = ridge_fit_predict(train_x, train_y, test_x, strength)
    images = lambda t: t.reshape(-1, *shape)
    data_range = test_y.max(1).values if data_range is None else data_range.double()
    return {
        "r2": r_squared(pred, test_y),
        "ssim": ssim(images(pred), images(test_y), data_range).mean().item(),
        "strength": strength,
    }


def findings(report):
    """The findings a report states, as class labels: "count" (the lesion count), "places" (the sorted sides and
    lobes of its lesions) and "level" (where anatomy reports give the slice's level in the head); None for
    what the report does not state."""
    count, fields = parse_report(report)
    return {
        "count": count,
        "places": None if count is None else ", ".join(sorted(f"{side} {lobe}" for side, lobe, *_ in fields)),
        "level": parse_level(report),
    }


def finding_classes(reports):
    """{finding: its values, sorted} for each finding (`findings`) that every one of reports states with two or
    more values among them: the findings a classifier can be trained on, in the order count, places, level."""
    labels = [findings(r) for r in reports]
    classes = {n: sorted({f[n] for f in labels}, key=str) for n in ("count", "places", "level")}
    return {n: c for n, c in classes.items() if None not in c and len(c) > 1}


def findings_probe(train_x, train_reports, val_x, val_reports, test_x, test_reports):
    """Ridge classifiers from features x (N, F) to each finding (`findings`) that every report of the three
    splits states and that takes two or more values in training: one-hot targets (all findings in one solve),
    the predicted class the arg-max, the ridge strength chosen per finding by validation accuracy.
    Returns {finding: {"accuracy" (test), "majority" (test accuracy of always the most common training label),
    "classes", "strength"}}."""
    labels = [[findings(r) for r in reports] for reports in (train_reports, val_reports, test_reports)]
    classes = {
        n: c
        for n, c in finding_classes(train_reports).items()
        if all(f[n] is not None for split in labels[1:] for f in split)
    }
    names = list(classes)
    one_hot = torch.cat(
        [
            torch.tensor(
                [[float(f[n] == c) for c in classes[n]] for f in labels[0]],
                dtype=torch.float64,
                device=train_x.device,
            )
            for n in names
        ]
        or [torch.zeros(len(labels[0]), 0, dtype=torch.float64, device=train_x.device)],
        dim=1,
    )
    train_x, val_x, test_x = (x.double() for x in (train_x, val_x, test_x))

    def accuracy(scores, split, n):  # scores (N, all classes) -> the share of slices whose finding n is right
        start = sum(len(classes[m]) for m in names[: names.index(n)])
        pred = scores[:, start : start + len(classes[n])].argmax(1).tolist()
        return float(np.mean([classes[n][p] == f[n] for p, f in zip(pred, labels[split])]))

    val_scores = {s: ridge_fit_predict(train_x, one_hot, val_x, s) for s in RIDGE_STRENGTHS}
    result = {}
    for n in names:
        strength = max(RIDGE_STRENGTHS, key=lambda s: accuracy(val_scores[s], 1, n))
        majority = Counter(f[n] for f in labels[0]).most_common(1)[0][0]
        result[n] = {
            "accuracy": accuracy(ridge_fit_predict(train_x, one_hot, test_x, strength), 2, n),
            "majority": float(np.mean([f[n] == majority for f in labels[2]])),
            "classes": len(classes[n]),
            "strength": strength,
        }
    return result


def slice_specific_share(tokens):
    """The share of the tokens' mean square that differs between slices: sum_i ||x_i - mean||^2 / sum_i ||x_i||^2
    over slices i of tokens (N, ...), the mean over slices. 0: every slice gets the same tokens."""
    x = tokens.double().flatten(1)
    return ((x - x.mean(0)).pow(2).sum() / x.pow(2).sum().clamp_min(1e-300)).item()


def split_reports(volumes, slice_counts):
    """The reports of the slices slice_features took (the first slice_counts[v] of volume v); None when a volume
    has no reports."""
    if any(v.reports is None for v in volumes[: len(slice_counts)]):
        return None
    return [r for v, n in zip(volumes, slice_counts) for r in v.reports[:n]]


def slice_blind_cross_entropy(reports, tokenizer):
    """Report cross-entropy per token (eos included, as report_loss counts) of the best model that ignores the
    slice, on these reports: it gives each report its frequency among them, so the total is their entropy. None
    without reports."""
    if not reports:
        return None
    counts = Counter(reports)
    nll = sum(-math.log(counts[r] / len(reports)) for r in reports)
    return nll / sum(len(tokenizer.encode(r)) + 1 for r in reports)


@torch.no_grad()
def diagnose(model, data, tokenizer, prompt_ids, acc, args):
    """The measurements of this module's docstring for one trained pipeline at one acceleration; the report
    cross-entropy on the test volumes that have reports (None values when none has)."""
    train = slice_features(model, data.train, prompt_ids, acc, args, MAX_PROBE_SLICES)
    val = slice_features(model, data.val, prompt_ids, acc, args)
    test = slice_features(model, data.test, prompt_ids, acc, args)
    batch = 4 * args.batch_size
    partners = partner_slices(test.slice_counts)
    mean_tokens = model.decoder.token_mean.expand_as(test.image_tokens)
    flat = lambda t: t.flatten(1)
    shape = tuple(test.zero_filled.shape[-2:])
    probes = {
        name: linear_probe(
            flat(getattr(train, name)),
            flat(train.zero_filled),
            flat(getattr(val, name)),
            flat(val.zero_filled),
            flat(getattr(test, name)),
            flat(test.zero_filled),
            shape,
        )
        for name in ("image_tokens", "kspace_tokens")
    }
    # The same probe from the image tokens to the truth (units of the k-space scale, as the decoder's output):
    # its SSIM, with the decoder's data range, is what a linear readout of all tokens at once reaches, beside
    # the decoder's "own tokens" score.
    in_scale_units = lambda f: flat(f.target / f.scale.reshape(-1, 1, 1))
    probes["truth_image_tokens"] = linear_probe(
        flat(train.image_tokens),
        in_scale_units(train),
        flat(val.image_tokens),
        in_scale_units(val),
        flat(test.image_tokens),
        in_scale_units(test),
        shape,
        data_range=test.maxval / test.scale,
    )
    reports = [
        split_reports(d, f.slice_counts) for d, f in ((data.train, train), (data.val, val), (data.test, test))
    ]
    findings_probes = None
    if all(r is not None for r in reports):
        findings_probes = {
            name: findings_probe(
                flat(getattr(train, name)),
                reports[0],
                flat(getattr(val, name)),
                reports[1],
                flat(getattr(test, name)),
                reports[2],
            )
            for name in ("kspace_tokens", "image_tokens", "zero_filled", "target")
        }
    encoder_images = test.encoder_image * test.scale.reshape(-1, 1, 1)
    return {
        "slices": {
            "train": sum(train.slice_counts),
            "val": sum(val.slice_counts),
            "test": sum(test.slice_counts),
        },
        "ssim_own_tokens": decoder_ssim(model, test.image_tokens, test, batch),
        "ssim_other_slice_tokens": (
            None if partners is None else decoder_ssim(model, test.image_tokens[partners], test, batch)
        ),
        "ssim_mean_token": decoder_ssim(model, mean_tokens, test, batch),
        "ssim_encoder_image": ssim(encoder_images, test.target, test.maxval).mean().item(),
        "probe_image_tokens": probes["image_tokens"],
        "probe_kspace_tokens": probes["kspace_tokens"],
        "probe_truth_image_tokens": probes["truth_image_tokens"],
        "probe_findings": findings_probes,
        "slice_specific_share": {
            name: slice_specific_share(getattr(test, name)) for name in ("kspace_tokens", "image_tokens")
        },
        **report_cross_entropy(
            model, [v for v in data.test if v.reports is not None], tokenizer, prompt_ids, acc, args
        ),
        "report_ce_slice_blind": slice_blind_cross_entropy(
            [r for v in data.train if v.reports is not None for r in v.reports], tokenizer
        ),
        "image_skip": model.decoder.image_skip,
    }
