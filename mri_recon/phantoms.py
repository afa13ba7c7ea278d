"""Synthetic fastMRI-like data: brain-like phantoms with lesions, coil sensitivities, image phase and noise,
one templated report per slice (the report grammar and its parser live here too), written as fastMRI .h5
files."""

import dataclasses
import math
import os
import re

import numpy as np
import torch

from cli import Progress
from mri_recon.fastmri_files import write_volume
from mri_recon.fourier import center_crop, fft2c, ifft2c, rss

SIDES = {"left": -0.5, "midline": 0.0, "right": 0.5}  # x centre in brain-normalised coordinates
LOBES = {"frontal": -0.55, "central": 0.0, "posterior": 0.55}  # y centre (top of the image is anterior)
REGIONS = [(s, l) for l in LOBES for s in SIDES if (s, l) != ("midline", "central")]  # ventricles sit there
SIZES = {"small": 0.08, "medium": 0.12, "large": 0.17}  # radius, in units of the half field of view
SHAPES = ("round", "oval", "irregular")
CONTRASTS = ("bright", "dark")


@dataclasses.dataclass
class Lesion:
    side: str
    lobe: str
    size: str
    shape: str
    contrast: str
    x: float  # centre, brain-normalised coordinates
    y: float
    radius: float
    angle: float  # orientation of an oval / phase of an irregular outline
    first_slice: int  # the lesion shows in slices first_slice..last_slice
    last_slice: int

    def describe(self):
        return f"{self.side} {self.lobe}: {self.size} {self.shape} {self.contrast}"


def sample_lesions(rng, n_slices):
    count = rng.choice(4, p=[0.25, 0.35, 0.25, 0.15])
    lesions = []
    for r in rng.choice(len(REGIONS), size=count, replace=False):
        side, lobe = REGIONS[r]
        size = str(rng.choice(list(SIZES)))
        length = int(rng.integers(1, max(1, n_slices // 2) + 1))
        first = int(rng.integers(0, n_slices - length + 1))
        lesions.append(
            Lesion(
                side,
                lobe,
                size,
                str(rng.choice(SHAPES)),
                str(rng.choice(CONTRASTS)),
                x=SIDES[side] + rng.uniform(-0.08, 0.08),
                y=LOBES[lobe] + rng.uniform(-0.08, 0.08),
                radius=SIZES[size] * rng.uniform(0.9, 1.1),
                angle=rng.uniform(0, np.pi),
                first_slice=first,
                last_slice=first + length - 1,
            )
        )
    return lesions


def report_text(lesions, level=None):
    """The templated report of one slice, lesions in REGIONS order, then the slice's level in the head when
    one is given (real anatomy): "lesions: 1. left frontal: small round bright. level: ventricles."."""
    ordered = sorted(lesions, key=lambda l: REGIONS.index((l.side, l.lobe)))
    text = " ".join([f"lesions: {len(ordered)}.", *(l.describe() + "." for l in ordered)])
    return text + (f" level: {level}." if level else "")


REPORT_FIELD = re.compile(
    r"(left|midline|right) (frontal|central|posterior): (small|medium|large) "
    r"(round|oval|irregular) (bright|dark)"
)


def parse_report(text):
    """-> (lesion count or None, [(side, lobe, size, shape, contrast), ...]) read from a report (a level
    finding at its end is not part of either)."""
    count = re.match(r"\s*lesions: (\d+)\.", text)
    return (int(count.group(1)) if count else None), REPORT_FIELD.findall(text)


def parse_level(text):
    """The slice's level in the head that real-anatomy reports end with ("level: ventricles." -> "ventricles"),
    or None."""
    level = re.search(r"level: ([a-z ]+)\.", text)
    return level.group(1) if level else None


def soft_inside(r, edge):
    """~1 inside r < 1, ~0 outside, a smooth edge of width ~edge (avoids aliasing the phantom)."""
    return 1.0 / (1.0 + np.exp(np.clip((r - 1.0) / edge, -50, 50)))


def brain_slice(xx, yy, z, head, lesions, edge):
    """Magnitude image of one slice: scalp, skull, cortex with sulci, white matter, ventricles, lesions.
    xx, yy (H, W) coordinates in [-1, 1] over the field of view; z in [-1, 1] the slice position."""
    s = math.sqrt(max(0.05, 1.0 - 0.8 * z * z))  # the head narrows away from the middle
    ax, ay = head["ax"] * s, head["ay"] * s
    c, sn = math.cos(head["angle"]), math.sin(head["angle"])
    u = (xx - head["cx"]) * c + (yy - head["cy"]) * sn
    v = -(xx - head["cx"]) * sn + (yy - head["cy"]) * c
    rho = np.sqrt((u / ax) ** 2 + (v / ay) ** 2)
    theta = np.arctan2(v / ay, u / ax)
    head_mask, skull_inner, brain = (
        soft_inside(rho / 1.12, edge),
        soft_inside(rho, edge),
        soft_inside(rho / 0.92, edge),
    )
    img = 0.55 * head_mask - 0.47 * skull_inner  # scalp 0.55, skull 0.08
    sulci = (np.sin(head["folds"] * theta + head["fold_phase"]) > 0.7).astype(np.float64)
    cortex = 0.62 + 0.25 * sulci
    white = soft_inside(rho / (0.92 * 0.8), edge)
    img += brain * (cortex - 0.08) + white * (0.42 - cortex)
    if abs(z) < 0.45:  # lateral ventricles (CSF, bright on T2)
        k = math.sqrt(1 - abs(z) / 0.45)
        for side in (-1, 1):
            rv = np.sqrt(
                ((u / ax - side * 0.12) / (0.07 * k + 1e-3)) ** 2 + ((v / ay + 0.05) / (0.25 * k + 1e-3)) ** 2
            )
            img += soft_inside(rv, edge * 4) * (1.0 - img)
    bx, by = u / (0.92 * ax), v / (0.92 * ay)  # brain-normalised coordinates
    img = paint_lesions(img, lesions, bx, by, 0.92 * ax, 0.92 * ay, edge)
    bias = 1 + head["bias_x"] * xx + head["bias_y"] * yy  # smooth intensity non-uniformity
    return img * bias


def lesion_outline(lesion, dx, dy, edge):
    """(H, W) ~1 inside the lesion's outline, ~0 outside; dx, dy (H, W) offsets from its centre in units of
    the half field of view, edge the width of the border in the same units."""
    if lesion.shape == "oval":
        ca, sa = math.cos(lesion.angle), math.sin(lesion.angle)
        dx, dy = (dx * ca + dy * sa) / 1.6, (-dx * sa + dy * ca) * 1.3
    r = np.sqrt(dx * dx + dy * dy) / lesion.radius
    if lesion.shape == "irregular":
        phi = np.arctan2(dy, dx)
        r = r / (1 + 0.25 * np.sin(3 * phi + lesion.angle) + 0.15 * np.sin(5 * phi + 2 * lesion.angle))
    return soft_inside(r, edge / lesion.radius)


def paint_lesions(img, lesions, bx, by, half_x, half_y, edge, brain=1.0):
    """img (H, W) with the lesions blended in (bright: +0.45, at most 1.1; dark: 35% of the tissue).
    bx, by (H, W): brain-normalised coordinates (the lesions' x, y); half_x, half_y: the brain's half axes in
    units of the half field of view; brain: (H, W) weight that confines lesions to the brain (1: none)."""
    for lesion in lesions:
        inside = lesion_outline(lesion, (bx - lesion.x) * half_x, (by - lesion.y) * half_y, edge) * brain
        target = np.minimum(img + 0.45, 1.1) if lesion.contrast == "bright" else img * 0.35
        img = img * (1 - inside) + target * inside
    return img


def coil_sensitivities(rng, xx, yy, n_coils):
    """(C, H, W) complex: Gaussian profiles from coils on a ring around the head, each with a linear phase."""
    start = rng.uniform(0, 2 * np.pi)
    maps = []
    for c in range(n_coils):
        a = start + 2 * np.pi * c / n_coils
        cx, cy = 1.2 * math.cos(a), 1.2 * math.sin(a)
        mag = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 0.9**2))
        phase = rng.uniform(-np.pi, np.pi) + rng.uniform(-1, 1) * (xx * math.cos(a) + yy * math.sin(a))
        maps.append(mag * np.exp(1j * phase))
    return np.stack(maps)


def field_of_view_grid(height, width):
    """xx, yy (height, width): pixel coordinates in units of the half field of view (width pixels across;
    height > width for readout oversampling)."""
    return np.meshgrid(
        (np.arange(height) - height / 2) / (width / 2),
        (np.arange(width) - width / 2) / (width / 2),
        indexing="ij",
    )[::-1]


def acquire(rng, magnitudes, xx, yy, n_coils, noise=0.01):
    """The simulated multi-coil scan of magnitude slices (S, H, W): coil sensitivities and a signal level per
    volume, a smooth image phase and complex Gaussian k-space noise per slice.
    Returns kspace (S, C, H, W) complex64 and reconstruction_rss (S, W, W) float32 (the RSS of the fully
    sampled coil images, cropped to the field of view as fastMRI crops it)."""
    sens = coil_sensitivities(rng, xx, yy, n_coils)
    scale = rng.uniform(0.5, 2.0)  # volumes differ in signal level
    kspace = []
    for mag in magnitudes:
        a0, ax_, ay_ = rng.uniform(-np.pi, np.pi), rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5)
        phase = np.exp(1j * (a0 + ax_ * xx + ay_ * yy))  # smooth image phase
        k = fft2c(torch.from_numpy(scale * sens * mag * phase)).numpy()
        k = k + scale * noise * (
            rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape)
        ) / math.sqrt(2)
        kspace.append(k.astype(np.complex64))
    kspace = np.stack(kspace)
    width = kspace.shape[-1]
    target = center_crop(rss(ifft2c(torch.from_numpy(kspace))), (width, width)).numpy().astype(np.float32)
    return kspace, target


def make_volume(rng, n_slices, size, n_coils, noise=0.01, readout_oversampling=1):
    """One synthetic volume in fastMRI's layout.
    Returns kspace (S, C, H*os, W) complex64, reconstruction_rss (S, H, W) float32, reports [S str]."""
    xx, yy = field_of_view_grid(size * readout_oversampling, size)
    head = dict(
        ax=rng.uniform(0.62, 0.72),
        ay=rng.uniform(0.78, 0.86),
        angle=rng.uniform(-0.15, 0.15),
        cx=rng.uniform(-0.04, 0.04),
        cy=rng.uniform(-0.04, 0.04),
        folds=int(rng.integers(10, 18)),
        fold_phase=rng.uniform(0, 2 * np.pi),
        bias_x=rng.uniform(-0.15, 0.15),
        bias_y=rng.uniform(-0.15, 0.15),
    )
    lesions = sample_lesions(rng, n_slices)
    visible = [[l for l in lesions if l.first_slice <= s <= l.last_slice] for s in range(n_slices)]
    magnitudes = [
        brain_slice(xx, yy, -0.6 + 1.2 * s / max(1, n_slices - 1), head, visible[s], edge=1.0 / size)
        for s in range(n_slices)
    ]
    kspace, target = acquire(rng, magnitudes, xx, yy, n_coils, noise)
    return kspace, target, [report_text(v) for v in visible]


def generate_volume_file(folder, seed, i, n_slices, size, n_coils, readout_oversampling):
    rng = np.random.default_rng([seed, i])
    kspace, target, reports = make_volume(
        rng, n_slices, size, n_coils, readout_oversampling=readout_oversampling
    )
    path = os.path.join(folder, f"synth_{i:05d}.h5")
    write_volume(path, kspace, target, reports, patient_id=f"synth{seed}-{i}")
    return path


def call_job(job):
    """job = (function, arguments): a picklable call for a worker process."""
    function, arguments = job
    return function(*arguments)


# Below this much work (volumes x slices x pixels x coils, ~1 microsecond each) one process is faster than
# starting worker processes, which each import torch first.
PARALLEL_WORK = 10_000_000


def write_dataset(folder, write_file, jobs, work):
    """write_file(*job) for every job (each writes one volume file and returns its path), in parallel
    processes when the work is large; progress lines with an ETA; then <folder>/preview.png of a few slices.
    Returns the paths."""
    os.makedirs(folder, exist_ok=True)
    workers = min(8, os.cpu_count() or 1, len(jobs)) if work > PARALLEL_WORK else 1
    progress = Progress(f"generating {len(jobs)} volumes", total=len(jobs))
    paths = []
    if workers <= 1:
        for job in jobs:
            paths.append(write_file(*job))
            progress.update()
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for path in pool.imap(call_job, [(write_file, job) for job in jobs]):
                paths.append(path)
                progress.update()
        print(f"  generated {len(jobs)} volumes with {workers} processes", flush=True)
    from mri_recon.plots import save_preview  # plots reads the report grammar from this module

    save_preview(os.path.join(folder, "preview.png"), paths)
    return paths


def generate_dataset(folder, n_volumes, n_slices, size, n_coils, seed=0, readout_oversampling=1):
    """Write n_volumes synthetic .h5 files into folder (volume i seeded by (seed, i)) and preview.png."""
    jobs = [(folder, seed, i, n_slices, size, n_coils, readout_oversampling) for i in range(n_volumes)]
    work = n_volumes * n_slices * size * size * readout_oversampling * n_coils
    return write_dataset(folder, generate_volume_file, jobs, work)
