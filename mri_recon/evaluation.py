"""Scoring on held-out volumes, each with its evaluation mask: reconstructions and their metrics per method,
greedy test reports, and the gate / Trigger statistics of a frozen backbone on the MRI sequence."""

import numpy as np
import torch

from cli import Progress
from mri_recon.batches import masked
from mri_recon.masks import volume_mask
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
            S, W = vol.kspace.shape[0], vol.kspace.shape[-1]
            mask = volume_mask(vol.name, W, acc, mask_kind)
            recons[acc]["ground truth"].append(vol.target.cpu())
            for m, fn in methods.items():
                pred = torch.cat(
                    [
                        fn(*masked(vol, s0, s0 + batch_size, mask), tuple(vol.target.shape[-2:]))
                        for s0 in range(0, S, batch_size)
                    ]
                )
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
    groups = {}
    for vol in volumes:
        if vol.reports is not None:
            mask = volume_mask(vol.name, vol.kspace.shape[-1], acc, args.mask_type)
            groups.setdefault(tuple(vol.kspace.shape[1:]), []).extend(
                (*masked(vol, s, s + 1, mask), vol.reports[s]) for s in range(vol.kspace.shape[0])
            )
    generated, truth, chunk = [], [], 8 * args.batch_size
    for items in groups.values():
        for i in range(0, len(items), chunk):
            part = items[i : i + chunk]
            ids = model.generate_reports(
                torch.cat([p[0] for p in part]),
                torch.cat([p[1] for p in part]),
                prompt_ids,
                tokenizer.eos_id,
                max_len,
            )
            generated += [tokenizer.decode(t) for t in ids]
            truth += [p[2] for p in part]
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
    groups = {}
    for vol in volumes:
        mask = volume_mask(vol.name, vol.kspace.shape[-1], acc, args.mask_type)
        for s in range(vol.kspace.shape[0]):
            report = vol.reports[s] if vol.reports is not None else None
            groups.setdefault(tuple(vol.kspace.shape[1:]), []).append((vol, s, mask, report))
    items = max(groups.values(), key=len)[:max_slices]
    traces, chunk = [], 4 * args.batch_size
    for i in range(0, len(items), chunk):
        kspace, mask = (
            torch.cat(x) for x in zip(*(masked(v, s, s + 1, m) for v, s, m, _ in items[i : i + chunk]))
        )
        trace = {}
        model.image_tokens(kspace, mask, prompt_ids, trace=trace)
        if "gate" not in trace:
            return None
        traces.append(trace)
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
    reports = [r for *_, r in items]
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
