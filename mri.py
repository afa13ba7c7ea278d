"""
The paper's MRI experiment (Sec. 3.2.2, Appendix A.6; design fixed in SPEC.md "MRI"): a frozen language backbone
(Nirvana, or any other variant of nirvana.py for Fig. 4) with a trainable k-space encoder and image decoder,
post-trained in two stages, scored against a zero-filled reconstruction, a U-Net on the zero-filled image and
E2E-VarNet on the same data and masks.

    python mri.py                                   # embedded default: synthetic phantoms, tiny sizes, CPU minutes
    python mri.py --data /path/to/multicoil_files   # fastMRI multi-coil .h5 files (split by volume)
    python mri.py --backbone ckpt.pt --backbone notrigger.pt --backbone transformer.pt   # train.py checkpoints
    python mri.py --generate DIR --volumes 200 --slices 16 --size 64   # only write a synthetic data set

Sequence fed to the backbone (SPEC.md): [k-space tokens][prompt tokens][M image-query embeddings][report tokens].
Stage 1 trains the encoder (and the image queries) with cross-entropy on the report tokens; stage 2 trains
the image decoder alone with -SSIM (eq. 9). The backbone's weights never change; its Trigger still adapts p.
Every trained method keeps the checkpoint of its best validation loss (the validation volumes; the test
volumes are only scored). Outputs in --out: results.md / results.json (SSIM, PSNR, NMSE per method and
acceleration like Table 11, validation SSIM, gate and Trigger statistics of each backbone), recon_grid_<acc>x.png
(ground truth, zero-filled, baselines, each backbone; SSIM in each title), training_curves.png, reports.md.
"""
import argparse
import dataclasses
import json
import math
import os
import re
import time
import zlib

import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import write_atomically, write_text_atomically
from nirvana import Nirvana, NirvanaConfig

# Table 10: acceleration -> centre fraction
ACCELERATIONS = {4: 0.08, 6: 0.06, 8: 0.04, 10: 0.032, 12: 0.027}

# Instruction prompts (Sec. 3.2.2 quotes the first one); a training batch uses one of them.
PROMPTS = [
    "According to the k-space signals, are there any pathological features?",
    "Describe the lesions in this slice.",
    "Report the findings of this MRI slice.",
    "Are there lesions? Give count, place, size, shape and contrast.",
]


# ----------------------------------------------------------------------------------------------------------
# Complex image helpers (centred, orthonormal FFT as fastMRI stores k-space)

def fft2c(x):
    """(..., H, W) complex image -> centred k-space."""
    x = torch.fft.ifftshift(x, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.fft2(x, norm="ortho"), dim=(-2, -1))


def ifft2c(k):
    """(..., H, W) centred k-space -> complex image."""
    k = torch.fft.ifftshift(k, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.ifft2(k, norm="ortho"), dim=(-2, -1))


def rss(coil_images, dim=-3):
    """Root sum of squares over the coil dimension: (B, C, H, W) complex -> (B, H, W) real."""
    return coil_images.abs().pow(2).sum(dim).sqrt()


def center_crop(x, shape):
    """Crop the last two dims of x to shape (h, w) around the centre."""
    h, w = shape
    H, W = x.shape[-2:]
    if h > H or w > W:
        raise ValueError(f"cannot crop an image of {H}x{W} to {h}x{w}")
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top:top + h, left:left + w]


# ----------------------------------------------------------------------------------------------------------
# Synthetic data: brain-like phantoms with lesions, coil sensitivities, phase, noise, templated reports

SIDES = {"left": -0.5, "midline": 0.0, "right": 0.5}            # x centre in brain-normalised coordinates
LOBES = {"frontal": -0.55, "central": 0.0, "posterior": 0.55}   # y centre (top of the image is anterior)
REGIONS = [(s, l) for l in LOBES for s in SIDES if (s, l) != ("midline", "central")]  # ventricles sit there
SIZES = {"small": 0.08, "medium": 0.12, "large": 0.17}           # radius, in units of the half field of view
SHAPES = ("round", "oval", "irregular")
CONTRASTS = ("bright", "dark")


@dataclasses.dataclass
class Lesion:
    side: str
    lobe: str
    size: str
    shape: str
    contrast: str
    x: float          # centre, brain-normalised coordinates
    y: float
    radius: float
    angle: float      # orientation of an oval / phase of an irregular outline
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
        lesions.append(Lesion(side, lobe, size, str(rng.choice(SHAPES)), str(rng.choice(CONTRASTS)),
                              x=SIDES[side] + rng.uniform(-0.08, 0.08), y=LOBES[lobe] + rng.uniform(-0.08, 0.08),
                              radius=SIZES[size] * rng.uniform(0.9, 1.1), angle=rng.uniform(0, np.pi),
                              first_slice=first, last_slice=first + length - 1))
    return lesions


def report_text(lesions):
    """The templated report of one slice, lesions in REGIONS order."""
    if not lesions:
        return "lesions: 0."
    ordered = sorted(lesions, key=lambda l: REGIONS.index((l.side, l.lobe)))
    return f"lesions: {len(ordered)}. " + " ".join(l.describe() + "." for l in ordered)


REPORT_FIELD = re.compile(r"(left|midline|right) (frontal|central|posterior): (small|medium|large) "
                          r"(round|oval|irregular) (bright|dark)")


def parse_report(text):
    """-> (lesion count or None, [(side, lobe, size, shape, contrast), ...]) read from a report."""
    count = re.match(r"\s*lesions: (\d+)\.", text)
    return (int(count.group(1)) if count else None), REPORT_FIELD.findall(text)


def soft_inside(r, edge):
    """~1 inside r < 1, ~0 outside, a smooth edge of width ~edge (avoids aliasing the phantom)."""
    return 1.0 / (1.0 + np.exp(np.clip((r - 1.0) / edge, -50, 50)))


def brain_slice(xx, yy, z, head, lesions, edge):
    """Magnitude image of one slice: scalp, skull, cortex with sulci, white matter, ventricles, lesions.
    xx, yy (H, W) coordinates in [-1, 1] over the field of view; z in [-1, 1] the slice position."""
    s = math.sqrt(max(0.05, 1.0 - 0.8 * z * z))                   # the head narrows away from the middle
    ax, ay = head["ax"] * s, head["ay"] * s
    c, sn = math.cos(head["angle"]), math.sin(head["angle"])
    u = (xx - head["cx"]) * c + (yy - head["cy"]) * sn
    v = -(xx - head["cx"]) * sn + (yy - head["cy"]) * c
    rho = np.sqrt((u / ax) ** 2 + (v / ay) ** 2)
    theta = np.arctan2(v / ay, u / ax)
    head_mask, skull_inner, brain = soft_inside(rho / 1.12, edge), soft_inside(rho, edge), soft_inside(rho / 0.92, edge)
    img = 0.55 * head_mask - 0.47 * skull_inner                      # scalp 0.55, skull 0.08
    sulci = (np.sin(head["folds"] * theta + head["fold_phase"]) > 0.7).astype(np.float64)
    cortex = 0.62 + 0.25 * sulci
    white = soft_inside(rho / (0.92 * 0.8), edge)
    img += brain * (cortex - 0.08) + white * (0.42 - cortex)
    if abs(z) < 0.45:                                               # lateral ventricles (CSF, bright on T2)
        k = math.sqrt(1 - abs(z) / 0.45)
        for side in (-1, 1):
            rv = np.sqrt(((u / ax - side * 0.12) / (0.07 * k + 1e-3)) ** 2 + ((v / ay + 0.05) / (0.25 * k + 1e-3)) ** 2)
            img += soft_inside(rv, edge * 4) * (1.0 - img)
    bx, by = u / (0.92 * ax), v / (0.92 * ay)                       # brain-normalised coordinates
    for lesion in lesions:
        dx, dy = (bx - lesion.x) * 0.92 * ax, (by - lesion.y) * 0.92 * ay
        if lesion.shape == "oval":
            ca, sa = math.cos(lesion.angle), math.sin(lesion.angle)
            dx, dy = (dx * ca + dy * sa) / 1.6, (-dx * sa + dy * ca) * 1.3
        r = np.sqrt(dx * dx + dy * dy) / lesion.radius
        if lesion.shape == "irregular":
            phi = np.arctan2(dy, dx)
            r = r / (1 + 0.25 * np.sin(3 * phi + lesion.angle) + 0.15 * np.sin(5 * phi + 2 * lesion.angle))
        inside = soft_inside(r, edge / lesion.radius)
        target = np.minimum(img + 0.45, 1.1) if lesion.contrast == "bright" else img * 0.35
        img = img * (1 - inside) + target * inside
    bias = 1 + head["bias_x"] * xx + head["bias_y"] * yy               # smooth intensity non-uniformity
    return img * bias


def coil_sensitivities(rng, xx, yy, n_coils):
    """(C, H, W) complex: Gaussian profiles from coils on a ring around the head, each with a linear phase."""
    start = rng.uniform(0, 2 * np.pi)
    maps = []
    for c in range(n_coils):
        a = start + 2 * np.pi * c / n_coils
        cx, cy = 1.2 * math.cos(a), 1.2 * math.sin(a)
        mag = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 0.9 ** 2))
        phase = rng.uniform(-np.pi, np.pi) + rng.uniform(-1, 1) * (xx * math.cos(a) + yy * math.sin(a))
        maps.append(mag * np.exp(1j * phase))
    return np.stack(maps)


def make_volume(rng, n_slices, size, n_coils, noise=0.01, readout_oversampling=1):
    """One synthetic volume in fastMRI's layout.
    Returns kspace (S, C, H*os, W) complex64, reconstruction_rss (S, H, W) float32, reports [S str]."""
    H = size * readout_oversampling
    yy, xx = np.meshgrid((np.arange(H) - H / 2) / (size / 2), (np.arange(size) - size / 2) / (size / 2), indexing="ij")
    head = dict(ax=rng.uniform(0.62, 0.72), ay=rng.uniform(0.78, 0.86), angle=rng.uniform(-0.15, 0.15),
                cx=rng.uniform(-0.04, 0.04), cy=rng.uniform(-0.04, 0.04), folds=int(rng.integers(10, 18)),
                fold_phase=rng.uniform(0, 2 * np.pi), bias_x=rng.uniform(-0.15, 0.15), bias_y=rng.uniform(-0.15, 0.15))
    lesions = sample_lesions(rng, n_slices)
    sens = coil_sensitivities(rng, xx, yy, n_coils)
    scale = rng.uniform(0.5, 2.0)                                    # volumes differ in signal level
    kspace, reports = [], []
    for s in range(n_slices):
        z = -0.6 + 1.2 * s / max(1, n_slices - 1)
        visible = [l for l in lesions if l.first_slice <= s <= l.last_slice]
        mag = brain_slice(xx, yy, z, head, visible, edge=1.0 / size)
        a0, ax_, ay_ = rng.uniform(-np.pi, np.pi), rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5)
        phase = np.exp(1j * (a0 + ax_ * xx + ay_ * yy))                 # smooth image phase
        coil_images = torch.from_numpy(scale * sens * mag * phase)
        k = fft2c(coil_images).numpy()
        k = k + scale * noise * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape)) / math.sqrt(2)
        kspace.append(k.astype(np.complex64))
        reports.append(report_text(visible))
    kspace = np.stack(kspace)
    target = center_crop(rss(ifft2c(torch.from_numpy(kspace))), (size, size)).numpy().astype(np.float32)
    return kspace, target, reports


def write_volume(path, kspace, target, reports, patient_id):
    """Write one volume as fastMRI stores it (plus a `reports` dataset), atomically."""
    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.create_dataset("kspace", data=kspace)
            f.create_dataset("reconstruction_rss", data=target)
            f.create_dataset("reports", data=np.array(reports, dtype=object), dtype=h5py.string_dtype("utf-8"))
            f.attrs["acquisition"] = "SYNTH_T2"
            f.attrs["max"] = float(target.max())
            f.attrs["norm"] = float(np.linalg.norm(target))
            f.attrs["patient_id"] = patient_id

    write_atomically(path, write)


def generate_volume_file(folder, seed, i, n_slices, size, n_coils, readout_oversampling):
    rng = np.random.default_rng([seed, i])
    kspace, target, reports = make_volume(rng, n_slices, size, n_coils, readout_oversampling=readout_oversampling)
    path = os.path.join(folder, f"synth_{i:05d}.h5")
    write_volume(path, kspace, target, reports, patient_id=f"synth{seed}-{i}")
    return path


def generate_dataset(folder, n_volumes, n_slices, size, n_coils, seed=0, readout_oversampling=1):
    """Write n_volumes synthetic .h5 files into folder (volume i seeded by (seed, i)), in parallel processes."""
    os.makedirs(folder, exist_ok=True)
    jobs = [(folder, seed, i, n_slices, size, n_coils, readout_oversampling) for i in range(n_volumes)]
    workers = min(8, os.cpu_count() or 1, n_volumes)
    if workers <= 1:
        return [generate_volume_file(*job) for job in jobs]
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        paths = pool.starmap(generate_volume_file, jobs)
    print(f"  generated {n_volumes} volumes with {workers} processes", flush=True)
    return paths


# ----------------------------------------------------------------------------------------------------------
# Reading fastMRI multi-coil files as they are

@dataclasses.dataclass
class Volume:
    name: str
    kspace: torch.Tensor      # (S, C, H, W) complex64
    target: torch.Tensor      # (S, h, w) float32, reconstruction_rss
    maxval: float             # the volume's max: SSIM / PSNR data range (fastMRI's "max" attribute)
    reports: list | None      # one string per slice, or None when the file holds none


def read_volume(path):
    """Read one multi-coil volume; clear errors for a missing file, a corrupt file, missing keys, bad shapes."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such .h5 file: {path}")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("kspace", "reconstruction_rss") if k not in f]
            if missing:
                raise ValueError(f"{path}: missing dataset(s) {missing}; it holds {sorted(f.keys())}. mri.py needs "
                                 f"fastMRI multi-coil train/val files ('kspace' and 'reconstruction_rss')")
            kspace, target = f["kspace"][()], f["reconstruction_rss"][()]
            maxval = float(f.attrs["max"]) if "max" in f.attrs else float(target.max())
            reports = None
            if "reports" in f:
                reports = [r.decode() if isinstance(r, bytes) else str(r) for r in f["reports"][()]]
    except OSError as e:
        raise ValueError(f"{path}: corrupt or not an HDF5 file ({e})") from e
    if kspace.ndim != 4 or not np.iscomplexobj(kspace):
        raise ValueError(f"{path}: 'kspace' must be complex (slices, coils, H, W), got {kspace.dtype} {kspace.shape}"
                         + (" (single-coil data is not supported)" if kspace.ndim == 3 else ""))
    if target.ndim != 3 or target.shape[0] != kspace.shape[0]:
        raise ValueError(f"{path}: 'reconstruction_rss' must be (slices, h, w) with {kspace.shape[0]} slices, "
                         f"got {target.shape}")
    if target.shape[1] > kspace.shape[2] or target.shape[2] > kspace.shape[3]:
        raise ValueError(f"{path}: target {target.shape[1:]} is larger than the k-space grid {kspace.shape[2:]}")
    if reports is not None and len(reports) != kspace.shape[0]:
        raise ValueError(f"{path}: 'reports' has {len(reports)} entries for {kspace.shape[0]} slices")
    if not np.isfinite(kspace).all() or not np.isfinite(target).all():
        raise ValueError(f"{path}: non-finite values in 'kspace' or 'reconstruction_rss'")
    return Volume(os.path.basename(path), torch.from_numpy(kspace.astype(np.complex64)),
                  torch.from_numpy(target.astype(np.float32)), maxval, reports)


def split_by_volume(paths, seed=0, fractions=(0.7, 0.15)):
    """Seeded split of volume files into train / val / test (slices of one volume never cross splits)."""
    paths = sorted(paths)
    if len(paths) < 3:
        raise ValueError(f"need at least 3 volumes for train/val/test splits, got {len(paths)}")
    order = np.random.default_rng(seed).permutation(len(paths))
    n_train = max(1, int(round(fractions[0] * len(paths))))
    n_val = max(1, int(round(fractions[1] * len(paths))))
    n_train = min(n_train, len(paths) - n_val - 1)
    pick = lambda idx: [paths[i] for i in sorted(idx)]
    return pick(order[:n_train]), pick(order[n_train:n_train + n_val]), pick(order[n_train + n_val:])


# ----------------------------------------------------------------------------------------------------------
# Undersampling masks (Table 10), along the phase-encoding (last) axis

def make_mask(num_cols, acceleration, kind, rng):
    """(num_cols,) bool: a fully sampled centre of round(num_cols * centre_fraction) columns, plus columns
    outside it, random (each with the probability that gives num_cols/acceleration in expectation) or
    equispaced (exactly round(num_cols/acceleration) in all, random offset)."""
    if acceleration not in ACCELERATIONS:
        raise ValueError(f"acceleration {acceleration} is not in Table 10 ({sorted(ACCELERATIONS)})")
    num_low = max(1, round(num_cols * ACCELERATIONS[acceleration]))
    mask = np.zeros(num_cols, dtype=bool)
    start = (num_cols - num_low + 1) // 2
    mask[start:start + num_low] = True
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


# ----------------------------------------------------------------------------------------------------------
# Metrics, as fastMRI computes them (skimage's SSIM: 7x7 uniform window, K1=0.01, K2=0.03, sample covariance)

def ssim(x, y, data_range, window=7, k1=0.01, k2=0.03):
    """Mean SSIM of each image pair. x, y (B, H, W); data_range (B,) -> (B,). Differentiable (the eq. 9 loss).
    Only windows that lie fully inside the image count, as skimage crops its border."""
    x, y = x.unsqueeze(1), y.unsqueeze(1)                            # (B, 1, H, W)
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
    """fastMRI's per-volume metrics. gt, pred (S, H, W) -> dict ssim, psnr (dB), nmse; data range = gt.max()."""
    gt, pred = gt.double(), pred.double()
    maxval = gt.max()
    ssim_v = ssim(gt, pred, maxval.expand(gt.shape[0])).mean()
    mse = (gt - pred).pow(2).mean()
    return {"ssim": ssim_v.item(), "psnr": (10 * torch.log10(maxval ** 2 / mse)).item(),
            "nmse": ((gt - pred).pow(2).sum() / gt.pow(2).sum()).item()}


# ----------------------------------------------------------------------------------------------------------
# Networks: U-Net, E2E-VarNet (cascades + sensitivity estimation), light T2T-ViT, k-space encoder, decoder

class ConvBlock(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.InstanceNorm2d(cout), nn.LeakyReLU(0.2),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.InstanceNorm2d(cout), nn.LeakyReLU(0.2))


class UNet(nn.Module):
    """The standard U-Net: num_pools 2x average-pool downs, transposed-conv ups, skip concatenations."""

    def __init__(self, cin, cout, chans, num_pools):
        super().__init__()
        widths = [chans * 2 ** i for i in range(num_pools + 1)]
        self.downs = nn.ModuleList([ConvBlock(cin, widths[0])] + [ConvBlock(a, b) for a, b in zip(widths, widths[1:])])
        self.ups = nn.ModuleList([nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in zip(widths, widths[1:])][::-1])
        self.up_convs = nn.ModuleList([ConvBlock(2 * a, a) for a in widths[:-1]][::-1])
        self.head = nn.Conv2d(widths[0], cout, 1)
        self.multiple = 2 ** num_pools

    def forward(self, x):                                            # (B, cin, H, W) -> (B, cout, H, W)
        H, W = x.shape[-2:]
        x = F.pad(x, (0, -W % self.multiple, 0, -H % self.multiple))
        skips = []
        for i, down in enumerate(self.downs):
            x = down(x if i == 0 else F.avg_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for up, conv in zip(self.ups, self.up_convs):
            x = conv(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)[..., :H, :W]


class NormUNet(nn.Module):
    """U-Net on a complex image seen as 2 real channels, normalised per image (mean/std) and back."""

    def __init__(self, chans, num_pools):
        super().__init__()
        self.unet = UNet(2, 2, chans, num_pools)

    def forward(self, x):                                            # (B, H, W) complex -> (B, H, W) complex
        x = torch.view_as_real(x).permute(0, 3, 1, 2)                # (B, 2, H, W)
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.std(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        x = self.unet((x - mean) / std) * std + mean
        return torch.view_as_complex(x.permute(0, 2, 3, 1).contiguous())


def sens_expand(image, sens):                                        # (B,H,W) x (B,C,H,W) -> k-space (B,C,H,W)
    return fft2c(image.unsqueeze(1) * sens)


def sens_reduce(kspace, sens):                                       # (B,C,H,W) -> coil-combined image (B,H,W)
    return (ifft2c(kspace) * sens.conj()).sum(1)


def centre_lines(mask):
    """(B, W) bool -> (B, W) bool: the contiguous sampled run around the centre column (the ACS lines)."""
    c = mask.shape[-1] // 2
    right = mask[:, c:].long().cumprod(-1)
    left = mask[:, :c + 1].flip(-1).long().cumprod(-1).flip(-1)[:, :-1]
    return torch.cat([left, right], dim=-1).bool()


class SensitivityModel(nn.Module):
    """E2E-VarNet's sensitivity estimation: ACS lines -> coil images -> NormUNet per coil -> divide by RSS."""

    def __init__(self, chans, num_pools):
        super().__init__()
        self.unet = NormUNet(chans, num_pools)

    def forward(self, kspace, mask):                                 # (B,C,H,W), (B,W) -> (B,C,H,W) complex
        B, C, H, W = kspace.shape
        coil_images = ifft2c(kspace * centre_lines(mask)[:, None, None, :])
        maps = self.unet(coil_images.reshape(B * C, H, W)).reshape(B, C, H, W)
        return maps / rss(maps, dim=1).unsqueeze(1).clamp_min(1e-12)


class VarNetCascade(nn.Module):
    """k <- k - dc_weight * mask * (k - k0) - E(U-Net(R(k))): one unrolled gradient step with a learned prior."""

    def __init__(self, chans, num_pools):
        super().__init__()
        self.unet = NormUNet(chans, num_pools)
        self.dc_weight = nn.Parameter(torch.ones(1))

    def forward(self, k, k0, mask, sens):                            # mask (B,1,1,W)
        return k - self.dc_weight * mask * (k - k0) - sens_expand(self.unet(sens_reduce(k, sens)), sens)


class E2EVarNet(nn.Module):
    """End-to-end VarNet (Sriram et al. 2020): sensitivity estimation + cascades, output RSS cropped to target."""

    def __init__(self, cascades, chans, sens_chans, num_pools=2):
        super().__init__()
        self.sens = SensitivityModel(sens_chans, num_pools)
        self.cascades = nn.ModuleList([VarNetCascade(chans, num_pools) for _ in range(cascades)])

    def refine(self, kspace, mask):                                  # -> refined k-space (B,C,H,W), sens maps
        sens = self.sens(kspace, mask)
        m, k = mask[:, None, None, :].to(kspace.real.dtype), kspace
        for cascade in self.cascades:
            k = cascade(k, kspace, m, sens)
        return k, sens

    def forward(self, kspace, mask, out_shape):                      # -> (B, h, w)
        k, _ = self.refine(kspace, mask)
        return center_crop(rss(ifft2c(k)), out_shape)


def zero_filled(kspace, out_shape):
    """The zero-filled reconstruction: RSS of the inverse FFT of the masked k-space, cropped."""
    return center_crop(rss(ifft2c(kspace)), out_shape)


class UNetBaseline(nn.Module):
    """U-Net on the zero-filled magnitude image, normalised per image."""

    def __init__(self, chans, num_pools):
        super().__init__()
        self.unet = UNet(1, 1, chans, num_pools)

    def forward(self, kspace, mask, out_shape):
        x = zero_filled(kspace, out_shape).unsqueeze(1)
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.std(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        return (self.unet((x - mean) / std) * std + mean).squeeze(1)


class Block(nn.Module):
    """Pre-LayerNorm transformer block (attention + MLP), non-causal."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):                                            # (B, N, dim)
        B, N, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))
        return x + self.mlp(self.norm2(x))


def sincos_2d(gh, gw, dim, device):
    """(gh*gw, dim) fixed 2-D sine-cosine position embedding (works for any grid size)."""
    f = 1.0 / 10000 ** (torch.arange(dim // 4, device=device) / (dim // 4))
    y, x = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    y, x = y.reshape(-1, 1) * f, x.reshape(-1, 1) * f
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)


class T2TViT(nn.Module):
    """A light Tokens-to-Token ViT (Yuan et al. 2021): soft split 7/4, re-structurise + soft split 3/2 twice
    (a small transformer layer between splits), then `depth` ViT blocks. (B, cin, H, W) -> (B, N, dim),
    N = ceil(H/16) * ceil(W/16) tokens."""

    def __init__(self, cin, dim, depth, heads, token_dim=32):
        super().__init__()
        self.splits = nn.ModuleList([nn.Unfold(7, stride=4, padding=2), nn.Unfold(3, stride=2, padding=1),
                                     nn.Unfold(3, stride=2, padding=1)])
        self.t2t_in = nn.ModuleList([nn.Linear(cin * 49, token_dim), nn.Linear(token_dim * 9, token_dim)])
        self.t2t_blocks = nn.ModuleList([Block(token_dim, 1), Block(token_dim, 1)])
        self.project = nn.Linear(token_dim * 9, dim)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        H, W = x.shape[-2:]
        for split, proj, block in zip(self.splits, self.t2t_in, self.t2t_blocks):
            t = split(x).transpose(1, 2)                             # (B, L, c*k*k)
            H, W = self.grid_after(split, H, W)
            t = block(proj(t))                                       # (B, L, token_dim)
            x = t.transpose(1, 2).reshape(t.shape[0], -1, H, W)      # re-structurise to a grid
        t = self.project(self.splits[-1](x).transpose(1, 2))         # (B, N, dim)
        H, W = self.grid_after(self.splits[-1], H, W)
        t = t + sincos_2d(H, W, t.shape[-1], t.device)
        for block in self.blocks:
            t = block(t)
        return self.norm(t)

    @staticmethod
    def grid_after(split, H, W):
        k, s, p = split.kernel_size, split.stride, split.padding
        return (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1

    def n_tokens(self, H, W):
        """Tokens out of an H x W input."""
        for split in self.splits:
            H, W = self.grid_after(split, H, W)
        return H * W


def kspace_layer_norm(kspace, mask):
    """LayerNorm before the encoder (Sec. 3.2.2), on k-space: divide by the RMS of the sampled entries.
    No mean-centring (it would fill the unsampled lines) and no affine; returns (normalised, scale (B,))."""
    B, C, H, W = kspace.shape
    n_sampled = mask.sum(-1).clamp_min(1) * C * H                    # (B,)
    scale = (kspace.abs().pow(2).sum(dim=(1, 2, 3)) / n_sampled).sqrt().clamp_min(1e-12)
    return kspace / scale.reshape(B, 1, 1, 1), scale


class KspaceEncoder(nn.Module):
    """LayerNorm -> VarNet cascades with sensitivity estimation -> light T2T-ViT -> Linear to d_model."""

    def __init__(self, d_model, out_shape, cascades, chans, sens_chans, vit_dim, vit_depth, vit_heads):
        super().__init__()
        self.out_shape = out_shape
        self.varnet = E2EVarNet(cascades, chans, sens_chans)
        self.vit = T2TViT(3, vit_dim, vit_depth, vit_heads)
        self.to_model = nn.Linear(vit_dim, d_model)

    def forward(self, kspace, mask):                                 # -> k-space tokens (B, N, d_model), scale (B,)
        kspace, scale = kspace_layer_norm(kspace, mask)
        k, sens = self.varnet.refine(kspace, mask)
        image = center_crop(sens_reduce(k, sens), self.out_shape)    # (B, h, w) complex
        features = torch.stack([image.real, image.imag, image.abs()], dim=1)
        return self.to_model(self.vit(features)), scale


class ImageDecoder(nn.Module):
    """LayerNorm -> Linear to patch pixels -> reshape to the image grid -> U-Net -> magnitude image.
    (B, M, d_model) image tokens, M = (h/patch) * (w/patch) -> (B, h, w), in units of the k-space scale.
    Before the LayerNorm, tokens are standardised per (query, feature) with training-set statistics (fixed
    buffers, set once in stage 2): a frozen backbone's image tokens share a large input-independent part, and
    what depends on the k-space is ~0.1-1% of it at init, too small for the LayerNorm alone to expose."""

    def __init__(self, d_model, out_shape, patch, chans, num_pools, feat=8):
        super().__init__()
        h, w = out_shape
        if h % patch or w % patch:
            raise ValueError(f"image size {h}x{w} is not a multiple of the decoder patch {patch}")
        self.grid, self.patch, self.feat = (h // patch, w // patch), patch, feat
        self.register_buffer("token_mean", torch.zeros(self.grid[0] * self.grid[1], d_model))
        self.register_buffer("token_std", torch.ones(self.grid[0] * self.grid[1], d_model))
        self.norm = nn.LayerNorm(d_model)
        self.to_pixels = nn.Linear(d_model, feat * patch * patch)
        self.unet = UNet(feat, 1, chans, num_pools)

    @property
    def n_queries(self):
        return self.grid[0] * self.grid[1]

    @torch.no_grad()
    def set_token_statistics(self, tokens):                         # (N, M, d) training image tokens
        self.token_mean.copy_(tokens.mean(0))
        self.token_std.copy_(tokens.std(0).clamp_min(1e-6 * tokens.std().item()))

    def forward(self, tokens):
        B, (gh, gw), p = tokens.shape[0], self.grid, self.patch
        x = self.to_pixels(self.norm((tokens - self.token_mean) / self.token_std))   # (B, M, feat*p*p)
        x = x.reshape(B, gh, gw, self.feat, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, self.feat, gh * p, gw * p)
        return F.softplus(self.unet(x).squeeze(1))                 # a magnitude image is >= 0


class NirvanaMRI(nn.Module):
    """Frozen language backbone + k-space encoder + M image queries + image decoder (Sec. 3.2.2, Fig. 5)."""

    def __init__(self, llm, encoder, decoder):
        super().__init__()
        self.llm = llm
        for p in self.llm.parameters():
            p.requires_grad_(False)                                  # frozen; gradients still flow through it
        self.encoder, self.decoder = encoder, decoder
        d_model = llm.lm_head.in_features
        # the image queries sit before the report tokens, so stage 1 trains them with the encoder and stage 2
        # (which must not change the reports) leaves them alone
        self.image_queries = nn.Parameter(0.02 * torch.randn(decoder.n_queries, d_model))

    def stage1_parameters(self):
        return list(self.encoder.parameters()) + [self.image_queries]

    def prefix(self, kspace, mask, prompt_ids):
        """[k-space tokens][prompt tokens][image queries] -> embeddings (B, N+Lp+M, d), scale (B,)."""
        ks_tokens, scale = self.encoder(kspace, mask)
        B = ks_tokens.shape[0]
        prompt = self.llm.embed(prompt_ids[None]).expand(B, -1, -1)
        queries = self.image_queries[None].expand(B, -1, -1)
        return torch.cat([ks_tokens, prompt, queries], dim=1), scale

    def report_loss(self, kspace, mask, prompt_ids, report_targets, eos_id):
        """Stage 1: cross-entropy of the report tokens only. report_targets (B, L) ids + eos, -1 = padding."""
        prefix, _ = self.prefix(kspace, mask, prompt_ids)
        report_in = report_targets[:, :-1].masked_fill(report_targets[:, :-1] < 0, eos_id)
        h = self.llm.backbone(torch.cat([prefix, self.llm.embed(report_in)], dim=1))
        logits = self.llm.lm_head(h[:, prefix.shape[1] - 1:])          # position t predicts report token t
        return F.cross_entropy(logits.flatten(0, 1), report_targets.flatten(), ignore_index=-1)

    def image_tokens(self, kspace, mask, prompt_ids, trace=None):
        """The backbone's final hidden states at the M image-query positions: (B, M, d), scale (B,)."""
        prefix, scale = self.prefix(kspace, mask, prompt_ids)
        h = self.llm.backbone(prefix, trace=trace)
        return h[:, -self.decoder.n_queries:], scale

    def reconstruct_from_tokens(self, tokens, scale):
        return self.decoder(tokens) * scale.reshape(-1, 1, 1)

    def forward(self, kspace, mask, prompt_ids):                     # -> image (B, h, w)
        return self.reconstruct_from_tokens(*self.image_tokens(kspace, mask, prompt_ids))

    @torch.no_grad()
    def generate_reports(self, kspace, mask, prompt_ids, eos_id, max_len):
        """Greedy decoding of the report after the image queries -> list of token-id lists."""
        prefix, _ = self.prefix(kspace, mask, prompt_ids)
        B = prefix.shape[0]
        tokens, done = [], torch.zeros(B, dtype=torch.bool, device=prefix.device)
        self.llm.setup_caches(B, prefix.shape[1] + max_len)          # prefill, then O(1) per token
        try:
            h = self.llm.backbone(prefix)
            for _ in range(max_len):
                nxt = self.llm.lm_head(h[:, -1]).argmax(-1).masked_fill(done, eos_id)   # (B,)
                tokens.append(nxt)
                done = done | (nxt == eos_id)
                if done.all():
                    break
                h = self.llm.backbone(self.llm.embed(nxt[:, None]))
        finally:
            self.llm.clear_caches()
        rows = torch.stack(tokens, 1).tolist()
        return [row[:row.index(eos_id)] if eos_id in row else row for row in rows]


def count_trainable(*modules_or_params):
    seen, total = set(), 0
    for m in modules_or_params:
        for p in (m.parameters() if isinstance(m, nn.Module) else [m]):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


# ----------------------------------------------------------------------------------------------------------
# Batches and training

def load_volumes(paths, device):
    volumes = []
    for path in paths:
        v = read_volume(path)
        v.kspace, v.target = v.kspace.to(device), v.target.to(device)
        volumes.append(v)
    return volumes


def slice_batches(volumes, batch_size, rng):
    """Endless shuffled batches of (volume, slice) pairs; one batch holds slices of one k-space/target shape."""
    groups = {}
    for v, vol in enumerate(volumes):
        key = (tuple(vol.kspace.shape[1:]), tuple(vol.target.shape[1:]))
        groups.setdefault(key, []).extend((v, s) for s in range(vol.kspace.shape[0]))
    while True:
        batches = []
        for items in groups.values():
            order = rng.permutation(len(items))
            batches += [[items[i] for i in order[j:j + batch_size]] for j in range(0, len(items), batch_size)]
        for b in rng.permutation(len(batches)):
            yield batches[b]


@dataclasses.dataclass
class Batch:
    kspace: torch.Tensor   # (B, C, H, W) complex, already undersampled
    mask: torch.Tensor     # (B, W) bool
    target: torch.Tensor   # (B, h, w)
    maxval: torch.Tensor   # (B,) the volume max of each slice's volume
    reports: list


def make_batch(volumes, items, masks):
    """Stack slices and undersample each with its mask (numpy (B, W) bool)."""
    kspace = torch.stack([volumes[v].kspace[s] for v, s in items])
    mask = torch.from_numpy(np.asarray(masks)).to(kspace.device)
    return Batch(kspace * mask[:, None, None, :], mask, torch.stack([volumes[v].target[s] for v, s in items]),
                 torch.tensor([volumes[v].maxval for v, _ in items], device=kspace.device),
                 [volumes[v].reports[s] if volumes[v].reports else None for v, s in items])


def random_batches(volumes, batch_size, accelerations, mask_kind, rng):
    """Training batches: each slice gets a fresh random mask at a random training acceleration."""
    for items in slice_batches(volumes, batch_size, rng):
        W = volumes[items[0][0]].kspace.shape[-1]
        yield make_batch(volumes, items, [make_mask(W, int(rng.choice(accelerations)), mask_kind, rng) for _ in items])


@dataclasses.dataclass
class FitResult:
    losses: list          # training loss per step
    checks: list          # [(step, validation loss)], lower is better
    best_step: int        # the step whose parameters the model holds after fit (the last one without validation)


def fit(name, params, loss_fn, batches, steps, lr, seconds=0, validate=None, checks=4):
    """AdamW with linear warm-up (5%) and cosine decay to 10%; gradient clipping at 1.
    seconds > 0: from the pace of steps 6-15 (and the cost of one validation), shorten the run (and its
    schedule) to fit in that many seconds.
    validate: () -> validation loss, run `checks` times spread over the run (the last at the end); the
    parameters of the best check are restored at the end (model selection on the validation split)."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = [steps]
    lr_factor = lambda s: min(1.0, (s + 1) / max(1, total[0] // 20)) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / total[0]))))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    losses, val_checks, best, t0, step = [], [], (math.inf, steps, None), time.time(), 0

    def check():
        nonlocal best
        t = time.time()
        val = float(validate())
        val_checks.append((step, val))
        if val < best[0]:
            best = (val, step, [p.detach().clone() for p in params])
        print(f"  [{name}] step {step} validation loss {val:.4f} (best {best[0]:.4f} at step {best[1]})", flush=True)
        return time.time() - t

    while step < total[0]:
        loss = loss_fn(next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        step += 1
        if seconds and step == 5:
            t5 = time.time()                                         # steps 1-5 warm up (cuDNN, allocator)
        if seconds and step == 15:
            per_step = (time.time() - t5) / 10
            check_cost = check() * (checks - 1) if validate else 0.0  # this check is the first of `checks`
            left = seconds - (time.time() - t0) - check_cost
            total[0] = min(steps, max(15, 15 + int(left / per_step)))
            print(f"  [{name}] {per_step:.3f}s/step: {total[0]} steps fit in {seconds:.0f}s", flush=True)
        every = max(1, total[0] // 10)
        if step % every == 1 or step == total[0]:
            print(f"  [{name}] step {step}/{total[0]} loss {np.mean(losses[-every:]):.4f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
        due = step % max(1, total[0] // checks) == 0 or step == total[0]
        if validate and due and not (seconds and step == 15):      # a timed run checked at step 15 already
            check()
    if best[2] is None:
        return FitResult(losses, val_checks, step)
    with torch.no_grad():
        for p, value in zip(params, best[2]):
            p.copy_(value)
    return FitResult(losses, val_checks, best[1])


def ssim_loss(pred, batch):
    """eq. (9): -SSIM, data range = the volume max."""
    return -ssim(pred, batch.target, batch.maxval).mean()


def mean_ssim(fn, volumes, accelerations, args):
    """Mean per-volume SSIM of fn(kspace, mask, out_shape) over volumes x accelerations (evaluation masks)."""
    scores, _ = evaluate({"fn": fn}, volumes, accelerations, args.mask_type, args.batch_size)
    return float(np.mean([v["ssim"] for per_volume in scores["fn"].values() for v in per_volume]))


def train_image_baseline(name, model, volumes, args, rng, val_volumes=()):
    """-SSIM training; with val_volumes, the parameters of the best validation SSIM (training accelerations)."""
    batches = random_batches(volumes, args.batch_size, args.train_acc, args.mask_type, rng)
    shape_of = lambda b: tuple(b.target.shape[-2:])
    validate = (lambda: -mean_ssim(model, val_volumes, args.train_acc, args)) if val_volumes else None
    return fit(name, model.parameters(), lambda b: ssim_loss(model(b.kspace, b.mask, shape_of(b)), b),
               batches, args.steps, args.lr, args.phase_seconds, validate, args.val_checks)


def encode_reports(tokenizer, reports, device):
    """Reports -> (B, L) token ids with eos appended, padded with -1."""
    ids = [tokenizer.encode(r) + [tokenizer.eos_id] for r in reports]
    out = torch.full((len(ids), max(map(len, ids))), -1, dtype=torch.long)
    for i, row in enumerate(ids):
        out[i, :len(row)] = torch.tensor(row)
    return out.to(device)


@torch.no_grad()
def report_val_loss(model, volumes, tokenizer, prompt_ids, args):
    """Stage 1's validation loss: the report cross-entropy (mean over batches) of every slice of volumes, each
    volume with its evaluation mask at every training acceleration; batches of 4 x batch-size slices."""
    groups = {}
    for acc in args.train_acc:
        for vol in volumes:
            mask = volume_mask(vol.name, vol.kspace.shape[-1], acc, args.mask_type)
            kspace, m = masked(vol, 0, vol.kspace.shape[0], mask)
            groups.setdefault(tuple(kspace.shape[1:]), []).extend(zip(kspace, m, vol.reports))
    losses, chunk = [], 4 * args.batch_size
    for items in groups.values():
        for i in range(0, len(items), chunk):
            kspace, mask, reports = zip(*items[i:i + chunk])
            targets = encode_reports(tokenizer, reports, args.device)
            losses.append(model.report_loss(torch.stack(kspace), torch.stack(mask), prompt_ids, targets,
                                            tokenizer.eos_id).item())
    return float(np.mean(losses))


def train_stage1(name, model, volumes, tokenizer, args, rng, val_volumes=()):
    """Stage 1: the encoder (and image queries) only, cross-entropy on the report tokens; backbone frozen.
    With val_volumes (all with reports), the parameters of the best validation cross-entropy."""
    prompts = [torch.tensor(tokenizer.encode(p), device=args.device) for p in PROMPTS]
    batches = random_batches(volumes, args.batch_size, args.train_acc, args.mask_type, rng)
    loss_fn = lambda b: model.report_loss(b.kspace, b.mask, prompts[rng.integers(len(prompts))],
                                          encode_reports(tokenizer, b.reports, args.device), tokenizer.eos_id)
    validate = None
    if val_volumes and all(v.reports is not None for v in val_volumes):
        validate = lambda: report_val_loss(model, val_volumes, tokenizer, prompts[0], args)
    return fit(f"{name} stage 1", model.stage1_parameters(), loss_fn, batches, args.steps, args.lr,
               args.phase_seconds, validate, args.val_checks)


@torch.no_grad()
def cache_image_tokens(model, volumes, prompt_ids, args, masks_for):
    """Stage 2 inputs: encoder and backbone are frozen, so each slice's image tokens are computed once per
    training acceleration. masks_for(volume, acceleration, n) -> n (W,) masks.
    Returns [(tokens, scale, target, maxval)], one entry per image shape."""
    cache = {}
    for acc in args.train_acc:
        for v, vol in enumerate(volumes):
            for s0 in range(0, vol.kspace.shape[0], 4 * args.batch_size):
                items = [(v, s) for s in range(s0, min(s0 + 4 * args.batch_size, vol.kspace.shape[0]))]
                b = make_batch(volumes, items, masks_for(vol, acc, len(items)))
                tokens, scale = model.image_tokens(b.kspace, b.mask, prompt_ids)
                cache.setdefault(tuple(b.target.shape[-2:]), []).append((tokens, scale, b.target, b.maxval))
    return [tuple(torch.cat(parts) for parts in zip(*v)) for v in cache.values()]


@torch.no_grad()
def decoder_val_loss(model, cache, batch_size):
    """-SSIM of the decoder over every cached slice (mean over slices)."""
    total, count = 0.0, 0
    for tokens, scale, target, maxval in cache:
        for i in range(0, tokens.shape[0], batch_size):
            pred = model.reconstruct_from_tokens(tokens[i:i + batch_size], scale[i:i + batch_size])
            total += ssim(pred, target[i:i + batch_size], maxval[i:i + batch_size]).sum().item()
            count += pred.shape[0]
    return -total / count


def train_stage2(name, model, volumes, tokenizer, args, rng, val_volumes=()):
    """Stage 2: the decoder only, loss -SSIM (eq. 9); encoder, image queries and backbone frozen.
    Training slices get one random mask per training acceleration, validation slices their evaluation masks;
    with val_volumes, the decoder of the best validation SSIM."""
    for p in model.stage1_parameters():
        p.requires_grad_(False)
    prompt_ids = torch.tensor(tokenizer.encode(PROMPTS[0]), device=args.device)
    random_masks = lambda vol, acc, n: [make_mask(vol.kspace.shape[-1], acc, args.mask_type, rng) for _ in range(n)]
    cache = cache_image_tokens(model, volumes, prompt_ids, args, random_masks)
    model.decoder.set_token_statistics(torch.cat([c[0] for c in cache]))
    sizes = np.array([c[0].shape[0] for c in cache], dtype=np.float64)
    validate = None
    if val_volumes:
        eval_masks = lambda vol, acc, n: [volume_mask(vol.name, vol.kspace.shape[-1], acc, args.mask_type)] * n
        val_cache = cache_image_tokens(model, val_volumes, prompt_ids, args, eval_masks)
        validate = lambda: decoder_val_loss(model, val_cache, 4 * args.batch_size)

    def batches():
        while True:
            tokens, scale, target, maxval = cache[rng.choice(len(cache), p=sizes / sizes.sum())]
            i = torch.from_numpy(rng.choice(tokens.shape[0], size=min(args.batch_size, tokens.shape[0]), replace=False))
            yield tokens[i], scale[i], Batch(None, None, target[i], maxval[i], None)

    loss_fn = lambda b: ssim_loss(model.reconstruct_from_tokens(b[0], b[1]), b[2])
    return fit(f"{name} stage 2", model.decoder.parameters(), loss_fn, batches(), args.steps, args.lr,
               args.phase_seconds, validate, args.val_checks)


# ----------------------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(methods, volumes, accelerations, mask_kind, batch_size):
    """Per-volume metrics of every method. methods: {name: fn(kspace, mask, out_shape) -> (B, h, w)}.
    Returns ({method: {acc: [metrics per volume]}}, {acc: {method or 'ground truth': [(S, h, w) per volume]}})."""
    scores = {m: {a: [] for a in accelerations} for m in methods}
    recons = {a: {m: [] for m in ["ground truth", *methods]} for a in accelerations}
    for acc in accelerations:
        for vol in volumes:
            S, W = vol.kspace.shape[0], vol.kspace.shape[-1]
            mask = volume_mask(vol.name, W, acc, mask_kind)
            recons[acc]["ground truth"].append(vol.target.cpu())
            for m, fn in methods.items():
                pred = torch.cat([fn(*masked(vol, s0, s0 + batch_size, mask), tuple(vol.target.shape[-2:]))
                                  for s0 in range(0, S, batch_size)])
                scores[m][acc].append(volume_metrics(vol.target, pred))
                recons[acc][m].append(pred.float().cpu())
    return scores, recons


def masked(vol, start, stop, mask):
    """Slices start:stop of a volume, undersampled with one (W,) mask -> (kspace, (B, W) mask)."""
    k = vol.kspace[start:stop]
    m = torch.from_numpy(mask).to(k.device).expand(k.shape[0], -1)
    return k * m[:, None, None, :], m


def score_reports(generated, truth):
    """Simple report score: lesion count exact, set of lesion places exact (in a report that parses), whole
    report exact."""
    count = place = exact = 0
    for g, t in zip(generated, truth):
        (gc, gf), (tc, tf) = parse_report(g), parse_report(t)
        count += gc == tc
        place += gc is not None and sorted(f[:2] for f in gf) == sorted(f[:2] for f in tf)
        exact += g.strip() == t.strip()
    n = max(1, len(truth))
    return {"count_acc": count / n, "place_acc": place / n, "exact": exact / n, "n": len(truth)}


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
                (*masked(vol, s, s + 1, mask), vol.reports[s]) for s in range(vol.kspace.shape[0]))
    generated, truth, chunk = [], [], 8 * args.batch_size
    for items in groups.values():
        for i in range(0, len(items), chunk):
            part = items[i:i + chunk]
            ids = model.generate_reports(torch.cat([p[0] for p in part]), torch.cat([p[1] for p in part]), prompt_ids,
                                         tokenizer.eos_id, max_len)
            generated += [tokenizer.decode(t) for t in ids]
            truth += [p[2] for p in part]
    return generated, truth


# ----------------------------------------------------------------------------------------------------------
# Outputs: results table, reconstruction grid, reports

def summarize(scores):
    """{method: {acc: [per-volume dicts]}} -> {method: {acc: {metric: (mean, std)}}} (std over volumes)."""
    return {m: {a: {k: (float(np.mean([v[k] for v in vols])), float(np.std([v[k] for v in vols])))
                    for k in ("ssim", "psnr", "nmse")} for a, vols in per_acc.items()} for m, per_acc in scores.items()}


def results_markdown(summary, params, notes, val_summary=None, gates=None):
    """Table 11-like tables (test split; the validation SSIM beside it when there is a validation split) and
    the gate / Trigger statistics of each backbone that has them."""
    lines = ["# MRI reconstruction (mri.py)", "", *notes, "",
             "Per-volume SSIM / PSNR / NMSE as fastMRI computes them (data range = volume max), mean ± std over "
             "test volumes" + ("; val SSIM: the same on the validation volumes, which chose each trained "
                              "method's checkpoint" if val_summary else "") + ".", ""]
    accs = sorted(next(iter(summary.values())))
    for acc in accs:
        val_head = ("val SSIM | ", "---|") if val_summary else ("", "")
        lines += [f"## {acc}x (centre fraction {ACCELERATIONS[acc]})", "",
                  f"| method | trainable params | {val_head[0]}SSIM ↑ | PSNR (dB) ↑ | NMSE (×10⁻²) ↓ |",
                  f"|---|---|{val_head[1]}---|---|---|"]
        for m, per_acc in summary.items():
            s = per_acc[acc]
            val = f"{val_summary[m][acc]['ssim'][0]:.4f} | " if val_summary else ""
            lines.append(f"| {m} | {params[m]:,} | {val}{s['ssim'][0]:.4f} ± {s['ssim'][1]:.4f} | "
                         f"{s['psnr'][0]:.2f} ± {s['psnr'][1]:.2f} | "
                         f"{100 * s['nmse'][0]:.3f} ± {100 * s['nmse'][1]:.3f} |")
        lines.append("")
    for (acc, stats) in (gates or {}).items():
        lines += [f"## Gates and Trigger on the MRI sequence, {acc}x (frozen backbones, one middle slice per test "
                  "volume)", "",
                  "t: the Updater's gate of eq. (8), mean at the k-space tokens / image queries; |p-1|: how far the "
                  "Trigger moved p from p^0 = 1; std(p): how much p differs between slices at the image queries "
                  "(input dependence). Backbones without gates (transformer) are left out; '-': no Trigger.", "",
                  "| backbone | layer | t k-space | t queries | abs(p-1) k-space | abs(p-1) queries | std(p) over slices |",
                  "|---|---|---|---|---|---|---|"]
        fmt = lambda values, i: "-" if values is None else f"{values[i]:.4f}"
        for name, st in stats.items():
            for i in range(len(st["gate_kspace"])):
                lines.append(f"| {name} | {i} | {st['gate_kspace'][i]:.4f} | {st['gate_queries'][i]:.4f} | "
                             f"{fmt(st.get('p_shift_kspace'), i)} | {fmt(st.get('p_shift_queries'), i)} | "
                             f"{fmt(st.get('p_slice_std_queries'), i)} |")
        lines.append("")
    return "\n".join(lines)


def save_curves(path, fits):
    """PNG: training loss (and validation checks, the chosen one circled) of every training phase."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(4, len(fits))
    rows = math.ceil(len(fits) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, result) in zip(axes.flat, fits.items()):
        steps = np.arange(1, len(result.losses) + 1)
        ax.plot(steps, result.losses, lw=0.6, alpha=0.5, label="train")
        if len(result.losses) >= 10:
            k = max(2, len(result.losses) // 25)
            ax.plot(steps[k - 1:], np.convolve(result.losses, np.ones(k) / k, mode="valid"), lw=1.2, label="train (mean)")
        if result.checks:
            ax.plot(*zip(*result.checks), "o-", ms=3, label="validation")
            best = dict(result.checks)[result.best_step]
            ax.plot([result.best_step], [best], "o", ms=9, mfc="none", mec="k", label="chosen")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=5)
    for ax in list(axes.flat)[len(fits):]:
        ax.axis("off")
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def save_grid(path, recons, volumes, acc, rows=3):
    """PNG: one row per test slice (the slices with most lesions), columns ground truth, zero-filled,
    baselines, Nirvana; the slice's SSIM (data range = volume max) in each title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    picks = []
    for v, vol in enumerate(volumes[:rows]):
        counts = [parse_report(r)[0] or 0 for r in vol.reports] if vol.reports else [0]
        picks.append((v, int(np.argmax(counts)) if vol.reports else vol.kspace.shape[0] // 2))
    names = list(recons[acc])
    fig, axes = plt.subplots(len(picks), len(names), figsize=(2.4 * len(names), 2.9 * len(picks)), squeeze=False)
    for r, (v, s) in enumerate(picks):
        gt, maxval = recons[acc]["ground truth"][v][s], volumes[v].maxval
        for c, name in enumerate(names):
            img = recons[acc][name][v][s]
            title = name if name == "ground truth" else \
                f"{name}\nSSIM {ssim(gt[None].double(), img[None].double(), torch.tensor([maxval])).item():.4f}"
            axes[r, c].imshow(img.numpy(), cmap="gray", vmin=0, vmax=maxval)
            axes[r, c].set_title(title, fontsize=7)
            axes[r, c].axis("off")
    fig.suptitle(f"{acc}x undersampling", fontsize=9)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Backbones

def load_backbones(args):
    """-> [(name, llm, tokenizer, how it was made)]: train.py checkpoints, or tiny random-init presets.
    Any variant of nirvana.py works: those without a Trigger (nirvana-notrigger, transformer, ...) simply have
    no p to report, and the transformer no gates either."""
    from eval import load_model
    from tokenizer import load_tokenizer
    backbones = []
    for path in args.backbone:
        llm, tokenizer = load_model(path, device="cpu", dtype="float32")   # the tokenizer the backbone learned
        name = f"LLM[{llm.config.variant}]"
        if any(name == b[0] for b in backbones):
            name = f"LLM[{llm.config.variant}:{os.path.basename(os.path.dirname(os.path.abspath(path)))}]"
        backbones.append((name, llm, tokenizer, f"checkpoint {path}, {pretraining_summary(path)}"))
    if not args.backbone:
        tokenizer = load_tokenizer("bytes")
        for variant in args.variants:
            torch.manual_seed(args.seed)
            cfg = NirvanaConfig.from_preset(f"{variant}-tiny", vocab_size=tokenizer.vocab_size)
            backbones.append((f"LLM[{variant}]", Nirvana(cfg), tokenizer,
                              f"{variant}-tiny, random init (seed {args.seed}), bytes tokenizer: no --backbone "
                              f"given, so an untrained language model (its reports cannot be meaningful)"))
    return [(n, llm.to(args.device).eval(), tok, how) for n, llm, tok, how in backbones]


def pretraining_summary(checkpoint):
    """The end of the log.csv that train.py wrote beside a checkpoint: steps, tokens, losses."""
    from train import Log
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "log.csv")
    if not os.path.isfile(path):
        return "no log.csv beside it"
    rows = Log.read(path)
    if not rows:
        return "empty log.csv beside it"
    last, checks = rows[-1], [r for r in rows if r.get("val_loss") is not None]
    text = f"pretrained {last['step']} steps / {last['tokens']:,} tokens, final training loss {last['loss']:.3f}"
    if checks:
        best = min(checks, key=lambda r: r["val_loss"])
        text += (f", validation loss {checks[-1]['val_loss']:.3f} (ppl {checks[-1]['val_ppl']:.1f}; best "
                 f"{best['val_loss']:.3f} at step {best['step']})")
    return text


def describe_backbone(llm):
    c = llm.config
    return (f"{c.variant}: d_model {c.d_model}, {c.n_layers} layers, {c.n_heads} heads, window {c.window}, "
            f"context {c.context_length}, vocab {c.vocab_size}, {llm.num_params():,} parameters")


def mri_sequence_length(model, out_shape, tokenizer, reports):
    """Longest backbone sequence: k-space tokens + the longest prompt + image queries + report tokens + eos."""
    n_kspace = model.encoder.vit.n_tokens(*out_shape)
    prompt = max(len(tokenizer.encode(p)) for p in PROMPTS)
    return n_kspace + prompt + model.decoder.n_queries + max(len(tokenizer.encode(r)) for r in reports) + 1


def window_note(llm, seq_len):
    """Whether the backbone's attention sees the whole MRI sequence (SPEC: the image queries read the k-space
    tokens through both branches); a window shorter than the sequence leaves them the recurrent branch alone."""
    c = llm.config
    windowed = any(c.layer_kind(i) in ("swa", "nirvana") for i in range(c.n_layers))
    if windowed and c.window < seq_len:
        return f"WARNING: window {c.window} < MRI sequence {seq_len} tokens: the image queries do not attend to " \
               f"every k-space token"
    if seq_len > c.context_length:
        return f"WARNING: MRI sequence {seq_len} tokens > training context {c.context_length}"
    return f"MRI sequence <= {seq_len} tokens fits in the window ({c.window}) and the training context " \
           f"({c.context_length})"


@torch.no_grad()
def gate_statistics(model, volumes, prompt_ids, acc, args):
    """What the frozen backbone does with the MRI sequence, on each test volume's middle slice (its evaluation
    mask at `acc`): per post-prelude layer, the mean Updater gate t (eq. 8) at the k-space tokens and at the
    image queries, and, with a Trigger, how far p moved from p^0 = 1 (mean |p - 1|) and how much p differs
    between slices (std over slices, mean over K and queries) at the image queries.
    None for a backbone without gates (the transformer)."""
    items = [masked(v, v.kspace.shape[0] // 2, v.kspace.shape[0] // 2 + 1,
                    volume_mask(v.name, v.kspace.shape[-1], acc, args.mask_type)) for v in volumes[:64]]
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
    gates = torch.stack(trace["gate"]).float().reshape(len(trace["gate"]), kspace.shape[0], -1)   # (L, B, T)
    stats = {"slices": kspace.shape[0], "gate_kspace": gates[:, :, :n_kspace].mean((1, 2)).tolist(),
             "gate_queries": gates[:, :, -M:].mean((1, 2)).tolist()}
    if "p" in trace:
        p = torch.stack(trace["p"]).float()                                                         # (L, B, T, K)
        stats["p_shift_kspace"] = (p[:, :, :n_kspace] - 1).abs().mean((1, 2, 3)).tolist()
        stats["p_shift_queries"] = (p[:, :, -M:] - 1).abs().mean((1, 2, 3)).tolist()
        stats["p_slice_std_queries"] = p[:, :, -M:].std(1).mean((1, 2)).tolist() if p.shape[1] > 1 else None
    return stats


def build_nirvana_mri(llm, out_shape, args):
    d_model = llm.lm_head.in_features
    encoder = KspaceEncoder(d_model, out_shape, args.enc_cascades, args.chans, args.sens_chans,
                            args.vit_dim, args.vit_depth, heads_for(args.vit_dim))
    decoder = ImageDecoder(d_model, out_shape, args.patch, args.dec_chans, args.pools)
    return NirvanaMRI(llm, encoder, decoder).to(args.device)


def heads_for(dim):
    return max(1, dim // 32)


def state_fingerprint(module):
    """A copy of every parameter and buffer, to prove bit-equality after training."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def unchanged(module, fingerprint):
    return all(torch.equal(v, fingerprint[k]) for k, v in module.state_dict().items())


# ----------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="folder of fastMRI multi-coil .h5 files (default: generate synthetic phantoms)")
    p.add_argument("--out", default="mri_out", help="output folder")
    p.add_argument("--generate", metavar="DIR", help="only write a synthetic data set to DIR and exit")
    p.add_argument("--backbone", action="append", default=[], help="train.py checkpoint (repeatable)")
    p.add_argument("--variants", default="nirvana,nirvana-notrigger",
                   help="tiny random-init backbones to build when no --backbone is given")
    p.add_argument("--volumes", type=int, default=16, help="synthetic volumes")
    p.add_argument("--slices", type=int, default=6, help="synthetic slices per volume")
    p.add_argument("--size", type=int, default=32, help="synthetic image size")
    p.add_argument("--coils", type=int, default=4, help="synthetic coils")
    p.add_argument("--max-volumes", type=int, default=0, help="use at most this many files from --data (0: all)")
    p.add_argument("--train-acc", default="4,8", help="accelerations seen in training (Table 10)")
    p.add_argument("--eval-acc", default="4,8", help="accelerations scored")
    p.add_argument("--mask-type", default="random", choices=["random", "equispaced"])
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per baseline and per Nirvana stage")
    p.add_argument("--phase-seconds", type=float, default=0,
                   help="time budget of each training phase: fewer steps if --steps would not fit (0: no limit)")
    p.add_argument("--val-checks", type=int, default=4,
                   help="validation checks per training phase; the best checkpoint is kept")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--chans", type=int, default=8, help="U-Net width in VarNet cascades")
    p.add_argument("--sens-chans", type=int, default=4, help="U-Net width of the sensitivity model")
    p.add_argument("--pools", type=int, default=2, help="U-Net pooling levels (image decoder and U-Net baseline)")
    p.add_argument("--varnet-cascades", type=int, default=4, help="E2E-VarNet baseline cascades")
    p.add_argument("--unet-chans", type=int, default=24, help="U-Net baseline width")
    p.add_argument("--enc-cascades", type=int, default=2, help="VarNet cascades in the k-space encoder")
    p.add_argument("--vit-dim", type=int, default=64, help="T2T-ViT width in the k-space encoder")
    p.add_argument("--vit-depth", type=int, default=2)
    p.add_argument("--patch", type=int, default=8, help="image pixels per image-query token (side)")
    p.add_argument("--dec-chans", type=int, default=16, help="image decoder U-Net width")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.train_acc = [int(a) for a in args.train_acc.split(",")]
    args.eval_acc = [int(a) for a in args.eval_acc.split(",")]
    args.variants = [v for v in args.variants.split(",") if v]
    if args.val_checks < 1:
        raise SystemExit(f"--val-checks must be >= 1, got {args.val_checks}")
    for a in args.train_acc + args.eval_acc:
        if a not in ACCELERATIONS:
            raise SystemExit(f"acceleration {a} is not in Table 10 ({sorted(ACCELERATIONS)})")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_float32_matmul_precision("high")                      # TF32 matmuls on GPUs that have them
    rng = np.random.default_rng(args.seed)
    if args.generate:
        generate_dataset(args.generate, args.volumes, args.slices, args.size, args.coils, args.seed)
        return
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    if args.data:
        paths = sorted(os.path.join(args.data, f) for f in os.listdir(args.data) if f.endswith(".h5"))
        if not paths:
            raise SystemExit(f"no .h5 files in {args.data}")
        paths = paths[:args.max_volumes] if args.max_volumes else paths
        with h5py.File(paths[0], "r") as f:
            acquisition = f.attrs.get("acquisition", "not recorded")
        data_note = f"data: {len(paths)} fastMRI-format files from {args.data} (acquisition of the first: {acquisition})"
    else:
        print(f"generating {args.volumes} synthetic volumes x {args.slices} slices, {args.size}x{args.size}, "
              f"{args.coils} coils", flush=True)
        paths = generate_dataset(os.path.join(args.out, "synthetic"), args.volumes, args.slices, args.size,
                                 args.coils, args.seed)
        data_note = (f"data: synthetic phantoms, {args.volumes} volumes x {args.slices} slices, "
                     f"{args.size}x{args.size}, {args.coils} coils")
    train_paths, val_paths, test_paths = split_by_volume(paths, args.seed)
    train, val, test = (load_volumes(p, args.device) for p in (train_paths, val_paths, test_paths))
    n_slices = lambda vols: sum(v.kspace.shape[0] for v in vols)
    split_note = (f"split by volume: train {len(train)} ({n_slices(train)} slices), val {len(val)} "
                  f"({n_slices(val)} slices), test {len(test)} ({n_slices(test)} slices)")
    print(f"{data_note}; {split_note}; device {args.device}", flush=True)
    out_shape = tuple(train[0].target.shape[-2:])
    if any(v.reports is None for v in train):
        raise SystemExit("stage 1 needs a report per slice: add a 'reports' dataset (one string per slice) to "
                         "every training .h5 file")

    methods, params, timings = {"zero-filled": lambda k, m, shape: zero_filled(k, shape)}, {"zero-filled": 0}, {}
    fits = {}
    baselines = {"U-Net": UNetBaseline(args.unet_chans, args.pools),
                 "E2E-VarNet": E2EVarNet(args.varnet_cascades, args.chans, args.sens_chans)}
    for name, model in baselines.items():
        model.to(args.device)
        t0 = time.time()
        fits[name] = train_image_baseline(name, model, train, args, rng, val)
        timings[name] = time.time() - t0
        model.eval()
        methods[name], params[name] = model, count_trainable(model)

    report_scores, report_examples, backbone_notes, gates = {}, {}, [], {}
    for name, llm, tokenizer, how in load_backbones(args):
        model = build_nirvana_mri(llm, out_shape, args)
        seq_len = mri_sequence_length(model, out_shape, tokenizer, [r for v in train for r in v.reports])
        fits_in = window_note(llm, seq_len)
        print(f"{name}: {describe_backbone(llm)}; {how}; {fits_in}", flush=True)
        fingerprint = state_fingerprint(llm)
        t0 = time.time()
        fits[f"{name} stage 1"] = train_stage1(name, model, train, tokenizer, args, rng, val)
        fits[f"{name} stage 2"] = train_stage2(name, model, train, tokenizer, args, rng, val)
        timings[name] = time.time() - t0
        frozen = unchanged(llm, fingerprint)
        model.eval()
        prompt_ids = torch.tensor(tokenizer.encode(PROMPTS[0]), device=args.device)
        methods[name] = lambda k, m, shape, model=model, prompt_ids=prompt_ids: model(k, m, prompt_ids)
        params[name] = count_trainable(model.encoder, model.image_queries, model.decoder)
        backbone_notes.append(f"- {name}: {describe_backbone(llm)}; {how}; {fits_in}; frozen (bit-equal after "
                              f"both stages: {frozen})")
        max_len = max(len(tokenizer.encode(r)) for v in train for r in v.reports) + 8
        for acc in args.eval_acc:
            generated, truth = generate_test_reports(model, test, tokenizer, acc, args, max_len)
            report_scores[(name, acc)] = score_reports(generated, truth)
            report_examples[(name, acc)] = list(zip(generated, truth))[:12]
            stats = gate_statistics(model, test, prompt_ids, acc, args)
            if stats is not None:
                gates.setdefault(acc, {})[name] = stats

    print("evaluating", flush=True)
    scores, recons = evaluate(methods, test, args.eval_acc, args.mask_type, args.batch_size)
    summary = summarize(scores)
    val_summary = summarize(evaluate(methods, val, args.eval_acc, args.mask_type, args.batch_size)[0])
    chosen = ", ".join(f"{k} {len(f.losses)}" + (f" (best val at {f.best_step})" if f.checks else "")
                       for k, f in fits.items())
    notes = [f"{data_note}; {split_note}",
             f"masks: {args.mask_type}, trained on {args.train_acc}x, scored on {args.eval_acc}x; "
             f"batch {args.batch_size}, lr {args.lr}, device {args.device}; optimizer steps (--steps {args.steps}, "
             f"--phase-seconds {args.phase_seconds:g}, {args.val_checks} validation checks per phase, the best "
             f"kept): {chosen}",
             "backbones:", *backbone_notes,
             "training time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    table = results_markdown(summary, params, notes, val_summary, gates)
    write_text_atomically(os.path.join(args.out, "results.md"), table)
    write_text_atomically(os.path.join(args.out, "results.json"), json.dumps(
        {"summary": summary, "val_summary": val_summary, "per_volume": scores, "params": params,
         "timings_s": timings, "notes": notes,
         "fits": {k: dataclasses.asdict(f) for k, f in fits.items()},
         "gates": {f"{a}x": g for a, g in gates.items()},
         "reports": {f"{n} {a}x": s for (n, a), s in report_scores.items()}}, indent=1))
    lines = ["# Generated reports vs templated truth", "",
             "Score: lesion count exact, set of lesion places exact, whole report exact (test slices).", ""]
    for (name, acc), s in report_scores.items():
        lines += [f"## {name}, {acc}x: count {s['count_acc']:.3f}, place {s['place_acc']:.3f}, "
                  f"exact {s['exact']:.3f} (n={s['n']})", "", "| generated | truth |", "|---|---|"]
        lines += [f"| {g!r} | {t!r} |" for g, t in report_examples[(name, acc)]] + [""]
    write_text_atomically(os.path.join(args.out, "reports.md"), "\n".join(lines))
    for acc in args.eval_acc:
        save_grid(os.path.join(args.out, f"recon_grid_{acc}x.png"), recons, test, acc)
    save_curves(os.path.join(args.out, "training_curves.png"), fits)
    print(table)
    print("\n".join(lines[:3] + [l for l in lines if l.startswith("## ")]))
    print(f"wrote results.md, results.json, reports.md, recon_grid_<acc>x.png, training_curves.png to {args.out} "
          f"({time.time() - t_start:.0f}s)")


if __name__ == "__main__":
    main()
