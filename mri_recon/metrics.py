"""Scores: SSIM, PSNR and NMSE as fastMRI computes them (skimage's SSIM: 7x7 uniform window, K1=0.01, K2=0.03,
sample covariance), their summary over volumes, and the score of generated reports against the templated
truth."""

import numpy as np
import torch
import torch.nn.functional as F

from mri_recon.phantoms import parse_level, parse_report

SSIM_WINDOW = 7  # the side of SSIM's uniform window: an image must be at least this large


def ssim(x, y, data_range, window=SSIM_WINDOW, k1=0.01, k2=0.03):
    """Mean SSIM of each image pair. x, y (B, H, W); data_range (B,) -> (B,). Differentiable (the eq. 9 loss).
    Only windows that lie fully inside the image count, as skimage crops its border."""
    x, y = x.unsqueeze(1), y.unsqueeze(1)  # (B, 1, H, W)
    mean = lambda t: F.avg_pool2d(t, window, stride=1)
    n = window * window
    ux, uy = mean(x), mean(y)
    vx = (mean(x * x) - ux * ux) * n / (n - 1)
    vy = (mean(y * y) - uy * uy) * n / (n - 1)
    vxy = (mean(x * y) - ux * uy) * n / (n - 1)
    dr = data_range.reshape(-1, 1, 1, 1)
    c1, c2 = (k1 * dr) ** 2, (k2 * dr) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


def volume_metrics(gt, pred):
    """fastMRI's per-volume metrics. gt, pred (S, H, W) -> dict ssim, psnr (dB), nmse; data range =
    gt.max()."""
    gt, pred = gt.double(), pred.double()
    maxval = gt.max()
    ssim_v = ssim(gt, pred, maxval.expand(gt.shape[0])).mean()
    mse = (gt - pred).pow(2).mean()
    return {
        "ssim": ssim_v.item(),
        "psnr": (10 * torch.log10(maxval**2 / mse)).item(),
        "nmse": ((gt - pred).pow(2).sum() / gt.pow(2).sum()).item(),
    }


def summarize(scores):
    """{method: {acc: [per-volume dicts]}} -> {method: {acc: {metric: (mean, std)}}} (std over volumes)."""
    return {
        m: {
            a: {
                k: (float(np.mean([v[k] for v in vols])), float(np.std([v[k] for v in vols])))
                for k in ("ssim", "psnr", "nmse")
            }
            for a, vols in per_acc.items()
        }
        for m, per_acc in scores.items()
    }


def score_reports(generated, truth, known_reports=()):
    """Simple report score: lesion count exact, set of lesion places exact (in a report that parses), whole
    report exact; the level in the head right, over the reports whose truth states one (None when none does);
    and whether the reports follow the slice at all: how many distinct reports were generated, and the share of
    them that are one of known_reports (e.g. the training reports: the templates' wording, not the language
    model's own continuation)."""
    count = place = exact = 0
    for g, t in zip(generated, truth):
        (gc, gf), (tc, tf) = parse_report(g), parse_report(t)
        count += gc == tc
        place += gc is not None and sorted(f[:2] for f in gf) == sorted(f[:2] for f in tf)
        exact += g.strip() == t.strip()
    levels = [(parse_level(g), parse_level(t)) for g, t in zip(generated, truth)]
    levels = [(g, t) for g, t in levels if t is not None]
    n = max(1, len(truth))
    known = {r.strip() for r in known_reports}
    return {
        "count_acc": count / n,
        "place_acc": place / n,
        "exact": exact / n,
        "level_acc": sum(g == t for g, t in levels) / len(levels) if levels else None,
        "n": len(truth),
        "distinct": len({g.strip() for g in generated}),
        "known": sum(g.strip() in known for g in generated) / max(1, len(generated)),
    }


def majority_report(reports):
    """The most common report (ties: the first seen) and its share of reports: the answer of a model that
    ignores its input, which the generated reports' scores must beat."""
    counts = {}
    for r in reports:
        counts[r.strip()] = counts.get(r.strip(), 0) + 1
    best = max(counts, key=counts.get)  # dicts keep insertion order: ties go to the first seen
    return best, counts[best] / len(reports)


def score_majority(train_reports, test_reports):
    """score_reports of always answering the most common training report, on the test reports."""
    report, share = majority_report(train_reports)
    return {
        **score_reports([report] * len(test_reports), test_reports, train_reports),
        "report": report,
        "train_share": share,
    }
