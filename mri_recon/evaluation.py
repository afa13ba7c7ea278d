"""Scoring on held-out volumes, each with its evaluation mask: reconstructions and their metrics per method,
greedy test reports, and the gate / Trigger statistics of a frozen backbone on the MRI sequence."""

import numpy as np
import torch

from cli import Progress
from mri_recon.batches import masked
from mri_recon.masks import volume_mask
from mri_recon.metrics import volume_metrics
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


@torch.no_grad()
def gate_statistics(model, volumes, prompt_ids, acc, args):
    """What the frozen backbone does with the MRI sequence, on each test volume's middle slice (its evaluation
    mask at `acc`): per post-prelude layer, the mean Updater gate t (eq. 8) at the k-space tokens and at the
    image queries, and, with a Trigger, how far p moved from p^0 = 1 (mean |p - 1|) and how much p differs
    between slices (std over slices, mean over K and queries) at the image queries.
    None for a backbone without gates (the transformer)."""
    items = [
        masked(
            v,
            v.kspace.shape[0] // 2,
            v.kspace.shape[0] // 2 + 1,
            volume_mask(v.name, v.kspace.shape[-1], acc, args.mask_type),
        )
        for v in volumes[:64]
    ]
    groups = {}
    for kspace, mask in items:
        groups.setdefault(tuple(kspace.shape[1:]), []).append((kspace, mask))
    kspace, mask = (torch.cat(x) for x in zip(*max(groups.values(), key=len)))
    trace = {}
    model.image_tokens(kspace, mask, prompt_ids, trace=trace)
    if "gate" not in trace:
        return None
    M = model.decoder.n_queries
    n_kspace = trace["gate"][0].shape[1] - len(prompt_ids) - M
    gates = torch.stack(trace["gate"]).float().reshape(len(trace["gate"]), kspace.shape[0], -1)  # (L, B, T)
    stats = {
        "slices": kspace.shape[0],
        "gate_kspace": gates[:, :, :n_kspace].mean((1, 2)).tolist(),
        "gate_queries": gates[:, :, -M:].mean((1, 2)).tolist(),
    }
    if "p" in trace:
        p = torch.stack(trace["p"]).float()  # (L, B, T, K)
        stats["p_shift_kspace"] = (p[:, :, :n_kspace] - 1).abs().mean((1, 2, 3)).tolist()
        stats["p_shift_queries"] = (p[:, :, -M:] - 1).abs().mean((1, 2, 3)).tolist()
        stats["p_slice_std_queries"] = p[:, :, -M:].std(1).mean((1, 2)).tolist() if p.shape[1] > 1 else None
    return stats
