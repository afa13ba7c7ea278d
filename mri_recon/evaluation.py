"""Scoring on held-out volumes, each with its evaluation mask: reconstructions and their metrics per method,
greedy test reports, and the gate / Trigger statistics of a frozen backbone on the MRI sequence."""

from collections import Counter

import numpy as np
import torch

from cli import Progress
from mri_recon.batches import evaluation_batches
from mri_recon.metrics import volume_metrics
from mri_recon.phantoms import parse_report
from mri_recon.pipeline import PROMPTS


@torch.no_grad()
def evaluate(methods, volumes, accelerations, mask_kind, batch_size, progress=None):
    """Per-volume metrics of every method. methods: {name: fn(kspace, mask, out_shape) -> (B, h, w)}.
    Returns ({method: {acc: [metrics per volume]}},
             {acc: {method or 'ground truth': [(S, h, w) per volume]}}).
    progress: what to call the work in progress lines with an ETA (None: no lines)."""
    scores = {m: {a: [] for a in accelerations} for m in methods}
    recons = {a: {m: [] for m in ["ground truth", *methods]} for a in accelerations}
    lines = Progress(progress, total=len(accelerations) * len(volumes)) if progress else None
    for acc in accelerations:
        for vol in volumes:
            out_shape = tuple(vol.target.shape[-2:])
            preds = {m: [] for m in methods}
            for batch in evaluation_batches([vol], [acc], mask_kind, batch_size):
                for m, fn in methods.items():
                    preds[m].append(fn(batch.kspace, batch.mask, out_shape))
            recons[acc]["ground truth"].append(vol.target.cpu())
            for m, parts in preds.items():
                pred = torch.cat(parts)
                scores[m][acc].append(volume_metrics(vol.target, pred))
                recons[acc][m].append(pred.float().cpu())
            if lines:
                lines.update()
    return scores, recons


def mean_ssim(fn, volumes, accelerations, args):
    """Mean per-volume SSIM of fn(kspace, mask, out_shape) over volumes x accelerations (evaluation masks)."""
    scores, _ = evaluate({"fn": fn}, volumes, accelerations, args.mask_type, args.batch_size)
    return float(np.mean([v["ssim"] for per_volume in scores["fn"].values() for v in per_volume]))


@torch.no_grad()
def generate_test_reports(model, volumes, tokenizer, acc, args, max_len):
    """Greedy reports for every test slice (each volume with its evaluation mask), batched across volumes of
    one k-space shape."""
    prompt_ids = torch.tensor(tokenizer.encode(PROMPTS[0]), device=args.device)
    with_reports = [vol for vol in volumes if vol.reports is not None]
    batches = evaluation_batches(
        with_reports, [acc], args.mask_type, 8 * args.batch_size, across_volumes=True
    )
    generated, truth = [], []
    for batch in batches:
        ids = model.generate_reports(batch.kspace, batch.mask, prompt_ids, tokenizer.eos_id, max_len)
        generated += [tokenizer.decode(t) for t in ids]
        truth += batch.reports
    return generated, truth


MAX_GATE_SLICES = 256  # test slices the gate / Trigger statistics look at (their pair distances are N x N)


@torch.no_grad()
def gate_statistics(model, volumes, prompt_ids, acc, args, max_slices=MAX_GATE_SLICES):
    """What the frozen backbone does with the MRI sequence, on every test slice (at most max_slices, those of
    the most common k-space shape; each volume with its evaluation mask at `acc`): per post-prelude layer, the
    mean Updater gate t (eq. 8) at the k-space tokens and at the image queries, and, with a Trigger, how far p
    moved from p^0 = 1 (mean |p - 1|) and how much p differs between slices (std over slices, mean over K and
    queries) at the image queries.
    With reports: `distance`, the mean L1 distance (per entry) of t and of p between two slices, at the
    k-space tokens and at the image queries, averaged over pairs of slices with the same report and with
    different reports (and with the same / different lesion count): p and t that follow the findings are
    closer within a finding than across. None for a backbone without gates (the transformer)."""
    slices_per_shape = Counter()
    for vol in volumes:
        slices_per_shape[tuple(vol.kspace.shape[1:])] += vol.kspace.shape[0]
    shape = slices_per_shape.most_common(1)[0][0]
    of_shape = [vol for vol in volumes if tuple(vol.kspace.shape[1:]) == shape]
    batches = evaluation_batches(
        of_shape, [acc], args.mask_type, 4 * args.batch_size, max_slices, across_volumes=True
    )
    traces, reports = [], []
    for batch in batches:
        trace = {}
        model.image_tokens(batch.kspace, batch.mask, prompt_ids, trace=trace)
        if "gate" not in trace:
            return None
        traces.append(trace)
        reports += batch.reports
    M = model.decoder.n_queries
    gates = torch.cat([torch.stack(t["gate"]).float() for t in traces], dim=1)  # (L, N, T)
    n_kspace = gates.shape[2] - len(prompt_ids) - M
    where = {"k-space": slice(0, n_kspace), "queries": slice(gates.shape[2] - M, None)}
    stats = {
        "slices": gates.shape[1],
        "gate_kspace": gates[:, :, where["k-space"]].mean((1, 2)).tolist(),
        "gate_queries": gates[:, :, where["queries"]].mean((1, 2)).tolist(),
    }
    values = {"t": gates.unsqueeze(-1)}  # (L, N, T, 1)
    if "p" in traces[0]:
        p = torch.cat([torch.stack(t["p"]).float() for t in traces], dim=1)  # (L, N, T, K)
        values["p"] = p
        stats["p_shift_kspace"] = (p[:, :, where["k-space"]] - 1).abs().mean((1, 2, 3)).tolist()
        stats["p_shift_queries"] = (p[:, :, where["queries"]] - 1).abs().mean((1, 2, 3)).tolist()
        stats["p_slice_std_queries"] = (
            p[:, :, where["queries"]].std(1).mean((1, 2)).tolist() if p.shape[1] > 1 else None
        )
    if None not in reports and len(reports) > 1:
        labels = {"report": [r.strip() for r in reports], "count": [parse_report(r)[0] for r in reports]}
        stats["pairs"], stats["distance"] = {}, {}
        for key, label in labels.items():
            same = torch.tensor([[a == b for b in label] for a in label], device=gates.device)
            off_diagonal = ~torch.eye(len(label), dtype=torch.bool, device=gates.device)
            stats["pairs"][key] = {
                "same": int((same & off_diagonal).sum()) // 2,
                "different": int((~same).sum()) // 2,
            }
            for name, value in values.items():
                for place, cols in where.items():
                    x = value[:, :, cols].flatten(2)  # (L, N, F)
                    dist = torch.cdist(x, x, p=1) / x.shape[-1]  # (L, N, N) mean |difference| per entry
                    entry = stats["distance"].setdefault(f"{name} {place}", {})
                    for kind, pairs in (("same", same & off_diagonal), ("different", ~same)):
                        entry[f"{kind} {key}"] = dist[:, pairs].mean(1).tolist() if pairs.any() else None
    return stats
