"""Undersampling masks along the phase-encoding (last) axis, with the accelerations and centre fractions of
Table 10."""

import zlib

import numpy as np

# Table 10: acceleration -> centre fraction
ACCELERATIONS = {4: 0.08, 6: 0.06, 8: 0.04, 10: 0.032, 12: 0.027}


def make_mask(num_cols, acceleration, kind, rng):
    """(num_cols,) bool: a fully sampled centre of round(num_cols * centre_fraction) columns, plus columns
    outside it, random (each with the probability that gives num_cols/acceleration in expectation) or
    equispaced (exactly round(num_cols/acceleration) in all, random offset)."""
    if acceleration not in ACCELERATIONS:
        raise ValueError(f"acceleration {acceleration} is not in Table 10 ({sorted(ACCELERATIONS)})")
    num_low = max(1, round(num_cols * ACCELERATIONS[acceleration]))
    mask = np.zeros(num_cols, dtype=bool)
    start = (num_cols - num_low + 1) // 2
    mask[start : start + num_low] = True
    outside = np.flatnonzero(~mask)
    if kind == "random":
        prob = (num_cols / acceleration - num_low) / (num_cols - num_low)
        mask[outside[rng.uniform(size=len(outside)) < prob]] = True
    elif kind == "equispaced":
        n_extra = max(0, round(num_cols / acceleration) - num_low)
        if n_extra:
            spacing = len(outside) / n_extra
            mask[outside[np.floor(rng.uniform(0, spacing) + spacing * np.arange(n_extra)).astype(int)]] = True
    else:
        raise ValueError(f"unknown mask kind {kind!r} (random | equispaced)")
    return mask


def volume_mask(name, num_cols, acceleration, kind):
    """The evaluation mask of a volume: seeded by its name, so every run and method sees the same one."""
    seed = zlib.crc32(f"{name}:{acceleration}:{kind}".encode())
    return make_mask(num_cols, acceleration, kind, np.random.default_rng(seed))
