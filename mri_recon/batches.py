"""Slices into batches: shuffled training batches with a fresh random mask per slice (Table 10 accelerations),
every slice of some volumes once and in order, each under its volume's evaluation mask (validation, scoring,
diagnostics), and the undersampled slices of one volume under one mask."""

import dataclasses
import functools

import numpy as np
import torch

from mri_recon.masks import make_mask, volume_mask


def slice_batches(volumes, batch_size, rng):
    """Endless shuffled batches of (volume, slice) pairs; one batch holds slices of one k-space / target
    shape."""
    groups = {}
    for v, vol in enumerate(volumes):
        key = (tuple(vol.kspace.shape[1:]), tuple(vol.target.shape[1:]))
        groups.setdefault(key, []).extend((v, s) for s in range(vol.kspace.shape[0]))
    while True:
        batches = []
        for items in groups.values():
            order = rng.permutation(len(items))
            batches += [
                [items[i] for i in order[j : j + batch_size]] for j in range(0, len(items), batch_size)
            ]
        for b in rng.permutation(len(batches)):
            yield batches[b]


@dataclasses.dataclass
class Batch:
    kspace: torch.Tensor  # (B, C, H, W) complex, already undersampled
    mask: torch.Tensor  # (B, W) bool
    target: torch.Tensor  # (B, h, w)
    maxval: torch.Tensor  # (B,) the volume max of each slice's volume
    reports: list
    slices: list  # (volume index, slice index) of each slice


def make_batch(volumes, items, masks):
    """Stack slices and undersample each with its mask (numpy (B, W) bool)."""
    kspace = torch.stack([volumes[v].kspace[s] for v, s in items])
    mask = torch.from_numpy(np.asarray(masks)).to(kspace.device)
    return Batch(
        kspace * mask[:, None, None, :],
        mask,
        torch.stack([volumes[v].target[s] for v, s in items]),
        torch.tensor([volumes[v].maxval for v, _ in items], device=kspace.device),
        [volumes[v].reports[s] if volumes[v].reports else None for v, s in items],
        items,
    )


def random_batches(volumes, batch_size, accelerations, mask_kind, rng):
    """Training batches: each slice gets a fresh random mask at a random training acceleration."""
    for items in slice_batches(volumes, batch_size, rng):
        W = volumes[items[0][0]].kspace.shape[-1]
        yield make_batch(
            volumes, items, [make_mask(W, int(rng.choice(accelerations)), mask_kind, rng) for _ in items]
        )


def evaluation_batches(
    volumes, accelerations, mask_kind, batch_size, max_slices=None, across_volumes=False, rng=None
):
    """Every slice of volumes at every acceleration, once, as Batches of at most batch_size slices.
    The slices come acceleration by acceleration, volume by volume, slice by slice; only the first max_slices
    of them (None: all). A batch holds slices of one volume at one acceleration; with across_volumes, slices of
    one k-space shape from any volumes and accelerations (the shapes in order of first appearance, each one's
    slices in order). Each slice is undersampled with its volume's evaluation mask (`volume_mask`: seeded by
    the volume's name, the acceleration and the mask kind, so every call, run and method sees the same one),
    or with rng with a fresh random mask per slice, drawn as the batches come."""
    order = [
        (acc, v, s)
        for acc in accelerations
        for v, vol in enumerate(volumes)
        for s in range(vol.kspace.shape[0])
    ]
    groups = {}
    for acc, v, s in order[:max_slices]:
        key = tuple(volumes[v].kspace.shape[1:]) if across_volumes else (acc, v)
        groups.setdefault(key, []).append((acc, v, s))
    evaluation_mask = functools.cache(
        lambda acc, v: volume_mask(volumes[v].name, volumes[v].kspace.shape[-1], acc, mask_kind)
    )
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            masks = [
                evaluation_mask(acc, v)
                if rng is None
                else make_mask(volumes[v].kspace.shape[-1], acc, mask_kind, rng)
                for acc, v, _ in chunk
            ]
            yield make_batch(volumes, [(v, s) for _, v, s in chunk], masks)


def masked(vol, start, stop, mask):
    """Slices start:stop of a volume, undersampled with one (W,) mask -> (kspace, (B, W) mask)."""
    k = vol.kspace[start:stop]
    m = torch.from_numpy(mask).to(k.device).expand(k.shape[0], -1)
    return k * m[:, None, None, :], m
