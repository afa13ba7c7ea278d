"""Real anatomy: fastMRI-like volumes resampled from one T1-weighted NIfTI head image (`python mri.py --anatomy`
uses the Colin27 brain, ch2.nii.gz of Debian's mricron-data), with the phantoms' simulated acquisition (coil
sensitivities, a signal level, smooth image phase, k-space noise), their lesions and their report grammar,
written as fastMRI multi-coil .h5 files.

A volume is a slab of S consecutive axial slices, SLICE_SPACING_MM apart (less when the brain is too short for
S of them), resampled to size x size over a square field of view 1.1 times the head's larger side. Volumes
differ by augmentation: the slab's height in the head (anywhere the brain's cross-section is at least
USABLE_AREA of its largest), a 3-D rotation (+-10 degrees in plane, +-4 out of plane), scale (0.9-1.1) and
in-plane shift (+-4% of the field of view), the intensity (gamma 0.8-1.25 and a linear bias field), then the
lesions, coils, phase, noise and signal level. Images are shown in the neurological convention: the patient's
left on the image's left (the phantoms' "left", x < 0), anterior at the top (their "frontal", y < 0).

Lesions are the phantoms' (count, place, size, shape, contrast, spanning 1 to S/2 consecutive slices), placed
in the brain: a lesion's place is relative to the bounding box of the brain in the slab, pulled towards the
brain's centre until at least 95% of it lies inside the brain on every slice it spans, and it is confined to
the brain mask. The brain mask is the brain-extracted twin of the image when there is one beside it
(mricron-data's ch2bet.nii.gz for ch2.nii.gz), else the head (voxels above 10% of the 99th percentile).
Each report ends with the slice's level in the head ("level: ventricles."), read from its height in the
brain (LEVELS, fractions of the brain's height matching the MNI levels of the named structures), so a report
depends on the anatomy of its slice, not only on the lesions; parse_report reads the lesions as before.

One subject: every volume comes from the same brain, so the split by volume (fastmri_files.split_by_volume,
random by file) holds out lesions, augmentation, coils and noise, not anatomy. A model can learn this one
brain; held-out scores say how well a method reconstructs new views of a brain it has seen, and are optimistic
for new subjects. Disjoint height bands per split were not used: with 16 slices 3 mm apart a slab spans 45 of
the ~100 usable mm, so bands wide enough for whole slabs would put the test slabs at levels training never
shows (a shift of level, not a new subject).
"""

import dataclasses
import functools
import math
import os
import zlib

import nibabel
import numpy as np
import torch
import torch.nn.functional as F
from nibabel.affines import apply_affine

from cli import UserError
from mri_recon.fastmri_files import write_volume
from mri_recon.phantoms import (
    acquire,
    field_of_view_grid,
    lesion_outline,
    paint_lesions,
    report_text,
    sample_lesions,
    write_dataset,
)

SLICE_SPACING_MM = 3.0  # between consecutive slices of a slab (a clinical axial spacing)
MIN_VOXELS = 16  # per axis of the NIfTI image
USABLE_AREA = 0.4  # slabs lie where the brain's axial cross-section is at least this fraction of its largest
BRAIN_PEAK = 0.7  # the brain's 99.5th percentile (white matter on T1) is scaled to this: the phantoms'
# bright lesions (+0.45, at most 1.1) then stand out in white matter as in the phantoms
LESION_INSIDE = 0.95  # the least fraction of a lesion's outline inside the brain on each slice it spans
# (upper bound as a fraction of the brain's height, level): the named structures' heights in MNI space
LEVELS = (
    (0.38, "posterior fossa"),
    (0.48, "basal ganglia"),
    (0.64, "ventricles"),
    (0.81, "centrum semiovale"),
    (math.inf, "vertex"),
)
SUBJECTS = {
    "ch2.nii.gz": "Colin27",
    "ch2bet.nii.gz": "Colin27",
    "ch2better.nii.gz": "Colin27",
}  # mricron-data


@dataclasses.dataclass
class Anatomy:
    """A NIfTI head image in RAS+ orientation, as (z, y, x) arrays: voxel index (k, j, i) lies at world
    position affine @ (i, j, k, 1) in mm (x to the patient's right, y anterior, z superior)."""

    path: str
    image: torch.Tensor  # (Z, Y, X) float32, the brain's 99.5th percentile scaled to BRAIN_PEAK
    brain: torch.Tensor  # (Z, Y, X) float32, 1 in the brain mask
    affine: np.ndarray  # (4, 4) voxel index -> world mm
    voxel_mm: tuple  # (x, y, z)
    head_centre: tuple  # (x, y) mm, centre of the head's bounding box
    fov_mm: float  # side of the square field of view
    brain_z: tuple  # (lowest, highest) world z of the brain, mm
    usable_z: tuple  # (lowest, highest) world z of the levels slabs may cover, mm

    def description(self):
        name = os.path.basename(self.path)
        return f"{SUBJECTS[name]} {name}" if name in SUBJECTS else name


def load_nifti(path):
    """(X, Y, Z) float32 array and affine of a NIfTI image reoriented to RAS+; a UserError naming the file
    when it is missing, unreadable or not a 3-D image."""
    if not os.path.isfile(path):
        raise UserError(f"no such NIfTI file: {path}")
    try:
        image = nibabel.as_closest_canonical(nibabel.load(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except (nibabel.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error) as error:
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise UserError(f"{path}: not a readable NIfTI image ({reason})") from error
    if data.ndim > 3 and all(n == 1 for n in data.shape[3:]):  # a 3-D image stored with trailing axes of 1
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise UserError(f"{path}: a 3-D image is needed, it holds shape {image.shape}")
    if not np.isfinite(data).all():
        raise UserError(f"{path}: non-finite voxel values")
    return data, image.affine


def brain_twin(path):
    """The brain-extracted image beside `path` (ch2.nii.gz -> ch2bet.nii.gz), or None."""
    for ext in (".nii.gz", ".nii"):
        if path.endswith(ext):
            twin = path[: -len(ext)] + "bet" + ext
            return twin if os.path.isfile(twin) else None
    return None


@functools.lru_cache(maxsize=2)
def read_anatomy(path):
    """The Anatomy of a NIfTI head image (read once per process); a UserError naming the file for a missing,
    corrupt, blank or too small one."""
    data, affine = load_nifti(path)
    if min(data.shape) < MIN_VOXELS:
        raise UserError(
            f"{path}: the image is {data.shape} voxels; at least {MIN_VOXELS} per axis are needed"
        )
    positive = data[data > 0]
    if positive.size == 0:
        raise UserError(f"{path}: the image holds no signal (no voxel above 0)")
    head = data > 0.1 * np.percentile(positive, 99)
    brain = head
    twin = brain_twin(path)
    if twin is not None:
        twin_data, _ = load_nifti(twin)
        if twin_data.shape == data.shape:
            brain = twin_data > 0
    data = data * (BRAIN_PEAK / np.percentile(data[brain], 99.5))
    i, j = np.nonzero(head.any(2))
    corners = np.array([[a, b, 0] for a in (i.min(), i.max()) for b in (j.min(), j.max())])
    world = apply_affine(affine, corners)
    lo, hi = world.min(0), world.max(0)
    area = brain.sum((0, 1))  # (Z,) brain voxels per axial level
    level_z = apply_affine(
        affine, np.stack([np.zeros(len(area)), np.zeros(len(area)), np.arange(len(area))], 1)
    )
    in_brain, usable = np.nonzero(area)[0], np.nonzero(area >= USABLE_AREA * area.max())[0]
    return Anatomy(
        path=path,
        image=torch.from_numpy(np.ascontiguousarray(data.transpose(2, 1, 0))),
        brain=torch.from_numpy(np.ascontiguousarray(brain.transpose(2, 1, 0).astype(np.float32))),
        affine=affine,
        voxel_mm=tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(0))),
        head_centre=(float(lo[0] + hi[0]) / 2, float(lo[1] + hi[1]) / 2),
        fov_mm=1.1 * float(max(hi[0] - lo[0], hi[1] - lo[1])),
        brain_z=(float(level_z[in_brain[0], 2]), float(level_z[in_brain[-1], 2])),
        usable_z=(float(level_z[usable[0], 2]), float(level_z[usable[-1], 2])),
    )


def slice_spacing(anatomy, n_slices):
    """mm between the slices of a slab: SLICE_SPACING_MM, less when the usable levels are too short; a
    UserError when they hold fewer voxel levels than slices."""
    span = anatomy.usable_z[1] - anatomy.usable_z[0]
    levels = int(round(span / anatomy.voxel_mm[2])) + 1
    if levels < n_slices:
        raise UserError(
            f"{anatomy.path}: the brain has {levels} axial levels where its cross-section is at least "
            f"{USABLE_AREA:.0%} of its largest, fewer than the {n_slices} slices asked for; use fewer --slices "
            f"or a finer image"
        )
    return min(SLICE_SPACING_MM, span / max(1, n_slices - 1))


@functools.lru_cache(maxsize=4)
def blurred(path, kernel):
    """(image, brain) box-filtered by kernel (kz, ky, kx) voxels, odd, one axis at a time: the slab's pixels
    and slice spacing are coarser than the voxels, and trilinear sampling alone would alias."""
    anatomy = read_anatomy(path)

    def smooth(volume):
        volume = volume[None, None]
        for axis, k in enumerate(kernel):
            box, pad = [1, 1, 1], [0, 0, 0]
            box[axis], pad[axis] = k, k // 2
            volume = F.avg_pool3d(volume, box, 1, pad, count_include_pad=False)
        return volume[0, 0]

    return smooth(anatomy.image), smooth(anatomy.brain)


def rotation(yaw, pitch, roll):
    """(3, 3) rotation about z (in plane), then x and y (out of plane), angles in radians."""
    cz, sz, cx, sx, cy, sy = (f(a) for a in (yaw, pitch, roll) for f in (math.cos, math.sin))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return rz @ rx @ ry


def level_name(fraction):
    """The level of a slice at `fraction` of the brain's height (0: lowest, 1: highest)."""
    return next(name for top, name in LEVELS if fraction < top)


def sample_slab(rng, anatomy, n_slices, size):
    """One augmented slab. Returns magnitudes (S, size, size) and brain weights (S, size, size) float64, the
    levels [S str]; pixel coordinates are field_of_view_grid(size, size)."""
    spacing = slice_spacing(anatomy, n_slices)
    half_span = spacing * (n_slices - 1) / 2
    slab_z = rng.uniform(anatomy.usable_z[0] + half_span, anatomy.usable_z[1] - half_span)
    turn = rotation(*np.radians([rng.uniform(-10, 10), rng.uniform(-4, 4), rng.uniform(-4, 4)]))
    zoom = rng.uniform(0.9, 1.1)
    shift = rng.uniform(-0.04, 0.04, size=2) * anatomy.fov_mm
    # (S, H, W, 3) offsets from the slab's centre in mm: x along columns, y up the rows, z along the slices
    xx, yy = field_of_view_grid(size, size)
    u, v = xx * anatomy.fov_mm / 2, -yy * anatomy.fov_mm / 2
    w = (np.arange(n_slices) - (n_slices - 1) / 2) * spacing
    offsets = np.stack(np.broadcast_arrays(u[None], v[None], w[:, None, None]), -1)
    centre = np.array([anatomy.head_centre[0] + shift[0], anatomy.head_centre[1] + shift[1], slab_z])
    world = centre + offsets @ turn.T / zoom
    voxel = apply_affine(np.linalg.inv(anatomy.affine), world)  # (S, H, W, 3) as (i, j, k)
    shape_xyz = np.array(anatomy.image.shape[::-1])
    # (1, S, H, W, 3): grid_sample's (x, y, z), -1 and 1 the first and last voxel
    grid = torch.from_numpy(2 * voxel / (shape_xyz - 1) - 1).float()[None]
    pixel_mm = anatomy.fov_mm / size  # nominal (before zoom): one filtered image serves every volume of a set
    kernel = tuple(
        2 * int(target / mm / 2) + 1
        for target, mm in zip((spacing, pixel_mm, pixel_mm), anatomy.voxel_mm[::-1])
    )
    sample = lambda volume: F.grid_sample(volume[None, None], grid, align_corners=True)[0, 0].double().numpy()
    image, brain = (sample(volume) for volume in blurred(anatomy.path, kernel))
    gamma, bias_x, bias_y = rng.uniform(0.8, 1.25), rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15)
    magnitudes = np.clip(image, 0, None) ** gamma * (1 + bias_x * xx + bias_y * yy)
    slice_z = world[:, size // 2, size // 2, 2]
    low, high = anatomy.brain_z
    levels = [level_name((z - low) / (high - low)) for z in slice_z]
    return magnitudes, np.clip(brain, 0, 1), levels


def place_lesions(rng, brain, n_slices, size):
    """The phantoms' lesions for a slab whose brain weights are brain (S, H, W): their x, y in brain-normalised
    coordinates of the slab's brain bounding box, pulled towards its centre until LESION_INSIDE of each lies
    in the brain on every slice it spans. Returns the lesions and that box (cx, cy, half_x, half_y) in units
    of the half field of view."""
    xx, yy = field_of_view_grid(size, size)
    anywhere = brain.max(0) > 0.5
    box_x, box_y = xx[anywhere], yy[anywhere]
    cx, cy = (box_x.min() + box_x.max()) / 2, (box_y.min() + box_y.max()) / 2
    half_x, half_y = (box_x.max() - box_x.min()) / 2, (box_y.max() - box_y.min()) / 2
    lesions = []
    for lesion in sample_lesions(rng, n_slices):
        everywhere = brain[lesion.first_slice : lesion.last_slice + 1].min(0)
        best = None
        for pull in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5):
            x, y = lesion.x * pull, lesion.y * pull
            outline = lesion_outline(lesion, xx - cx - x * half_x, yy - cy - y * half_y, 1.0 / size)
            inside = (outline * everywhere).sum() / outline.sum()
            if best is None or inside > best[0]:
                best = (inside, x, y)
            if inside >= LESION_INSIDE:
                break
        lesions.append(dataclasses.replace(lesion, x=best[1], y=best[2]))
    return lesions, (cx, cy, half_x, half_y)


def make_volume(rng, anatomy, n_slices, size, n_coils, noise=0.01):
    """One volume of real anatomy in fastMRI's layout.
    Returns kspace (S, C, H, W) complex64, reconstruction_rss (S, H, W) float32, reports [S str]."""
    magnitudes, brain, levels = sample_slab(rng, anatomy, n_slices, size)
    lesions, (cx, cy, half_x, half_y) = place_lesions(rng, brain, n_slices, size)
    xx, yy = field_of_view_grid(size, size)
    bx, by = (xx - cx) / half_x, (yy - cy) / half_y  # brain-normalised coordinates
    visible = [[l for l in lesions if l.first_slice <= s <= l.last_slice] for s in range(n_slices)]
    magnitudes = [
        paint_lesions(magnitudes[s], visible[s], bx, by, half_x, half_y, 1.0 / size, brain[s])
        for s in range(n_slices)
    ]
    kspace, target = acquire(rng, magnitudes, xx, yy, n_coils, noise)
    return kspace, target, [report_text(v, level) for v, level in zip(visible, levels)]


def generate_volume_file(folder, path, seed, i, n_slices, size, n_coils):
    anatomy = read_anatomy(path)
    kspace, target, reports = make_volume(np.random.default_rng([seed, i]), anatomy, n_slices, size, n_coils)
    out = os.path.join(folder, f"anatomy_{i:05d}.h5")
    acquisition = f"simulated multi-coil from {anatomy.description()} (one subject; coils, phase, noise, lesions simulated)"
    write_volume(out, kspace, target, reports, f"{anatomy.description()} {seed}-{i}", acquisition)
    return out


def generate_dataset(folder, path, n_volumes, n_slices, size, n_coils, seed=0):
    """Write n_volumes .h5 files of the anatomy in NIfTI file `path` into folder (volume i seeded by
    (seed, i)) and preview.png; the image is checked before any is written."""
    slice_spacing(read_anatomy(path), n_slices)
    jobs = [(folder, path, seed, i, n_slices, size, n_coils) for i in range(n_volumes)]
    return write_dataset(folder, generate_volume_file, jobs, n_volumes * n_slices * size * size * n_coils)
