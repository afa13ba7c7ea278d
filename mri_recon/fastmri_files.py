"""fastMRI multi-coil .h5 files as they are: reading (with an error naming the file for anything that is not
such a volume), writing (plus a `reports` dataset), listing a folder of them, the split by volume and
loading."""

import dataclasses
import os

import h5py
import numpy as np
import torch

from cli import UserError, write_atomically


class VolumeFileError(UserError, ValueError):
    """A path that is not a readable fastMRI multi-coil volume: missing, corrupt, not HDF5, wrong contents."""


def write_volume(path, kspace, target, reports, patient_id, acquisition="SYNTH_T2"):
    """Write one volume as fastMRI stores it (plus a `reports` dataset), atomically; `acquisition` says where
    the data came from (fastMRI's attribute names the scanner protocol)."""

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.create_dataset("kspace", data=kspace)
            f.create_dataset("reconstruction_rss", data=target)
            f.create_dataset(
                "reports", data=np.array(reports, dtype=object), dtype=h5py.string_dtype("utf-8")
            )
            f.attrs["acquisition"] = acquisition
            f.attrs["max"] = float(target.max())
            f.attrs["norm"] = float(np.linalg.norm(target))
            f.attrs["patient_id"] = patient_id

    write_atomically(path, write)


@dataclasses.dataclass
class Volume:
    name: str
    kspace: torch.Tensor  # (S, C, H, W) complex64
    target: torch.Tensor  # (S, h, w) float32, reconstruction_rss
    maxval: float  # the volume's max: SSIM / PSNR data range (fastMRI's "max" attribute)
    reports: list | None  # one string per slice, or None when the file holds none


def read_volume(path):
    """Read one multi-coil volume; an error naming the file for a missing or corrupt file, missing keys or
    bad shapes."""
    if not os.path.exists(path):
        raise VolumeFileError(f"no such .h5 file: {path}")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("kspace", "reconstruction_rss") if k not in f]
            if missing:
                raise VolumeFileError(
                    f"{path}: missing dataset(s) {missing}; it holds {sorted(f.keys())}. mri.py needs "
                    f"fastMRI multi-coil train/val files ('kspace' and 'reconstruction_rss')"
                )
            kspace, target = f["kspace"][()], f["reconstruction_rss"][()]
            maxval = float(f.attrs["max"]) if "max" in f.attrs else float(target.max())
            reports = None
            if "reports" in f:
                reports = [r.decode() if isinstance(r, bytes) else str(r) for r in f["reports"][()]]
    except OSError as e:
        raise VolumeFileError(f"{path}: corrupt or not an HDF5 file ({e}); replace or remove it") from e
    if kspace.ndim != 4 or not np.iscomplexobj(kspace):
        raise VolumeFileError(
            f"{path}: 'kspace' must be complex (slices, coils, H, W), got {kspace.dtype} {kspace.shape}"
            + (" (single-coil data is not supported)" if kspace.ndim == 3 else "")
        )
    if target.ndim != 3 or target.shape[0] != kspace.shape[0]:
        raise VolumeFileError(
            f"{path}: 'reconstruction_rss' must be (slices, h, w) with {kspace.shape[0]} slices, "
            f"got {target.shape}"
        )
    if target.shape[1] > kspace.shape[2] or target.shape[2] > kspace.shape[3]:
        raise VolumeFileError(
            f"{path}: target {target.shape[1:]} is larger than the k-space grid {kspace.shape[2:]}"
        )
    if reports is not None and len(reports) != kspace.shape[0]:
        raise VolumeFileError(f"{path}: 'reports' has {len(reports)} entries for {kspace.shape[0]} slices")
    if not np.isfinite(kspace).all() or not np.isfinite(target).all():
        raise VolumeFileError(f"{path}: non-finite values in 'kspace' or 'reconstruction_rss'")
    return Volume(
        os.path.basename(path),
        torch.from_numpy(kspace.astype(np.complex64)),
        torch.from_numpy(target.astype(np.float32)),
        maxval,
        reports,
    )


def list_volume_files(folder, max_volumes=0):
    """The sorted .h5 files of a folder (the first max_volumes of them, 0: all)."""
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".h5"))
    return paths[:max_volumes] if max_volumes else paths


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
    return pick(order[:n_train]), pick(order[n_train : n_train + n_val]), pick(order[n_train + n_val :])


def load_volumes(paths, device):
    volumes = []
    for path in paths:
        v = read_volume(path)
        v.kspace, v.target = v.kspace.to(device), v.target.to(device)
        volumes.append(v)
    return volumes
