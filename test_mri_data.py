"""Tests of the MRI data (CPU): the masks of Table 10, the evaluation batches, the synthetic phantoms and their
reports, the fastMRI .h5 round trip and the reader's errors, the split by volume, the volumes of real anatomy
(from a small NIfTI head written here; the Colin27 brain of mricron-data where it is installed)."""

import os
import re

import h5py
import nibabel
import numpy as np
import pytest
import torch

import mri
from cli import UserError
from mri_recon import anatomy
from mri_recon.batches import evaluation_batches
from mri_recon.fastmri_files import (
    Volume,
    VolumeFileError,
    list_volume_files,
    load_volumes,
    read_volume,
    split_by_volume,
    write_volume,
)
from mri_recon.fourier import center_crop, ifft2c, rss
from mri_recon.masks import ACCELERATIONS, make_mask, volume_mask
from mri_recon.metrics import score_reports
from mri_recon.models import centre_lines
from mri_recon.phantoms import (
    LOBES,
    SIDES,
    Lesion,
    acquire,
    field_of_view_grid,
    lesion_outline,
    make_volume,
    paint_lesions,
    parse_report,
    report_text,
)

# ---------------------------------------------------------------- masks (Table 10)


@pytest.mark.parametrize("acc", sorted(ACCELERATIONS))
@pytest.mark.parametrize("num_cols", [64, 320, 368])
def test_equispaced_mask_acceleration_and_centre(acc, num_cols):
    mask = make_mask(num_cols, acc, "equispaced", np.random.default_rng(acc))
    num_low = max(1, round(num_cols * ACCELERATIONS[acc]))
    assert mask.sum() == round(num_cols / acc)
    c = num_cols // 2
    assert centre_lines(torch.from_numpy(mask)[None])[0].sum() >= num_low  # the centre block is sampled
    start = (num_cols - num_low + 1) // 2
    assert mask[start : start + num_low].all() and start <= c < start + num_low


@pytest.mark.parametrize("acc", sorted(ACCELERATIONS))
def test_random_mask_acceleration_in_expectation(acc):
    num_cols, rng = 320, np.random.default_rng(0)
    num_low = round(num_cols * ACCELERATIONS[acc])
    masks = np.stack([make_mask(num_cols, acc, "random", rng) for _ in range(400)])
    start = (num_cols - num_low + 1) // 2
    assert masks[:, start : start + num_low].all()
    assert abs(masks.sum(1).mean() - num_cols / acc) < 0.05 * num_cols / acc


def test_volume_mask_is_reproducible_and_differs_between_volumes():
    a = volume_mask("file_a.h5", 128, 8, "random")
    assert np.array_equal(a, volume_mask("file_a.h5", 128, 8, "random"))
    assert not np.array_equal(a, volume_mask("file_b.h5", 128, 8, "random"))


def test_mask_rejects_unknown_acceleration_and_kind():
    with pytest.raises(ValueError, match="Table 10"):
        make_mask(64, 5, "random", np.random.default_rng(0))
    with pytest.raises(ValueError, match="mask kind"):
        make_mask(64, 4, "spiral", np.random.default_rng(0))


def test_evaluation_batches_walk_every_slice_once_under_the_volume_masks():
    shapes = [(5, 16), (3, 32), (4, 16)]  # (slices, k-space height) per volume
    volumes = [
        Volume(
            f"v{v}.h5", torch.randn(S, 2, H, 16, dtype=torch.complex64), torch.rand(S, 8, 8), v + 1.0, None
        )
        for v, (S, H) in enumerate(shapes)
    ]
    order = [(acc, v, s) for acc in (4, 8) for v, (S, _) in enumerate(shapes) for s in range(S)]
    walk = lambda **options: list(evaluation_batches(volumes, [4, 8], "random", 3, **options))
    batches = walk()
    assert [s for b in batches for s in b.slices] == [(v, s) for _, v, s in order]
    assert all(len(b.slices) <= 3 and len({v for v, _ in b.slices}) == 1 for b in batches)
    rows = [(kspace, mask) for b in batches for kspace, mask in zip(b.kspace, b.mask)]
    for (kspace, mask), (acc, v, s) in zip(rows, order):
        assert torch.equal(mask, torch.from_numpy(volume_mask(f"v{v}.h5", 16, acc, "random")))
        assert torch.equal(kspace, volumes[v].kspace[s] * mask)
    again = walk()
    assert all(
        torch.equal(a.mask, b.mask) and torch.equal(a.kspace, b.kspace) for a, b in zip(batches, again)
    )
    assert [s for b in walk(max_slices=7) for s in b.slices] == [(0, s) for s in range(5)] + [(1, 0), (1, 1)]
    pooled = walk(across_volumes=True)
    for height in (16, 32):
        of_height = [b for b in pooled if b.kspace.shape[2] == height]
        expected = [(v, s) for _, v, s in order if shapes[v][1] == height]
        assert [s for b in of_height for s in b.slices] == expected
        assert len(of_height) == (len(expected) + 2) // 3  # batches span volumes and accelerations
    random = [walk(rng=np.random.default_rng(0)) for _ in range(2)]
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(*random))
    assert not all(torch.equal(a.mask, b.mask) for a, b in zip(random[0], batches))


# ---------------------------------------------------------------- data: generator, h5 round trip, errors


def test_h5_round_trip_and_fastmri_layout(tmp_path):
    rng = np.random.default_rng(1)
    kspace, target, reports = make_volume(rng, n_slices=4, size=16, n_coils=3, readout_oversampling=2)
    assert kspace.shape == (4, 3, 32, 16) and kspace.dtype == np.complex64 and target.shape == (4, 16, 16)
    # the target is the RSS of the fully sampled coil images, cropped to the field of view
    expected = center_crop(rss(ifft2c(torch.from_numpy(kspace))), (16, 16))
    assert torch.allclose(expected, torch.from_numpy(target), rtol=1e-5, atol=1e-6)
    path = str(tmp_path / "vol.h5")
    write_volume(path, kspace, target, reports, patient_id="p0")
    with h5py.File(path) as f:
        assert {"kspace", "reconstruction_rss", "reports"} <= set(f) and f.attrs["max"] == pytest.approx(
            target.max()
        )
    v = read_volume(path)
    assert np.array_equal(v.kspace.numpy(), kspace) and np.array_equal(v.target.numpy(), target)
    assert v.reports == reports and v.name == "vol.h5" and v.maxval == pytest.approx(float(target.max()))


def test_reports_follow_the_lesions():
    lesion = Lesion("left", "frontal", "small", "round", "bright", -0.5, -0.55, 0.08, 0.0, 0, 0)
    text = report_text([lesion])
    assert text == "lesions: 1. left frontal: small round bright."
    assert parse_report(text) == (1, [("left", "frontal", "small", "round", "bright")])
    assert parse_report("garbage") == (None, [])
    assert score_reports([text, "lesions: 0.", "xx"], [text, text, "lesions: 0."], [" lesions: 0. "]) == {
        "count_acc": 1 / 3,
        "place_acc": 1 / 3,
        "exact": 1 / 3,
        "level_acc": None,  # phantom reports state no level
        "n": 3,
        "distinct": 3,
        "known": 1 / 3,  # only 'lesions: 0.' is a known report (spaces stripped)
    }


def test_reader_errors(tmp_path):
    with pytest.raises(VolumeFileError, match="no such .h5 file"):
        read_volume(str(tmp_path / "missing.h5"))
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(ValueError, match="corrupt") as error:
        read_volume(str(corrupt))
    assert isinstance(error.value, UserError) and str(corrupt) in str(error.value)  # one line naming the file
    no_target = str(tmp_path / "no_target.h5")
    with h5py.File(no_target, "w") as f:
        f["kspace"] = np.zeros((2, 3, 8, 8), np.complex64)
    with pytest.raises(ValueError, match="reconstruction_rss"):
        read_volume(no_target)
    single_coil = str(tmp_path / "single.h5")
    with h5py.File(single_coil, "w") as f:
        f["kspace"] = np.zeros((2, 8, 8), np.complex64)
        f["reconstruction_rss"] = np.zeros((2, 8, 8), np.float32)
    with pytest.raises(ValueError, match="single-coil"):
        read_volume(single_coil)
    bad_slices = str(tmp_path / "bad_slices.h5")
    with h5py.File(bad_slices, "w") as f:
        f["kspace"] = np.zeros((2, 3, 8, 8), np.complex64)
        f["reconstruction_rss"] = np.zeros((3, 8, 8), np.float32)
    with pytest.raises(ValueError, match="slices"):
        read_volume(bad_slices)


def test_split_by_volume_is_disjoint_and_seeded():
    paths = [f"v{i}.h5" for i in range(20)]
    train, val, test = split_by_volume(paths, seed=3)
    assert sorted(train + val + test) == sorted(paths) and not (set(train) & set(test))
    assert (train, val, test) == split_by_volume(paths, seed=3) and len(test) >= 1


def test_report_level_finding_leaves_the_lesions_parse_alone():
    lesion = Lesion("right", "posterior", "large", "oval", "dark", 0.5, 0.55, 0.17, 0.0, 0, 0)
    text = report_text([lesion], level="posterior fossa")
    assert text == "lesions: 1. right posterior: large oval dark. level: posterior fossa."
    assert parse_report(text) == (1, [("right", "posterior", "large", "oval", "dark")])
    assert parse_report(report_text([], "vertex")) == (0, [])


# ---------------------------------------------------------------- real anatomy (NIfTI)


def write_head_nifti(path, shape=(40, 48, 40), voxel_mm=4.0):
    """A small T1-like head as a NIfTI file, stored left-right flipped (LAS) so that reading must reorient it:
    scalp, skull, a brain whose texture changes with height, ventricles in the middle levels."""
    x, y, z = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) / (n / 2) for n in shape], indexing="ij")
    r = np.sqrt((x / 0.85) ** 2 + (y / 0.9) ** 2 + (z / 0.9) ** 2)
    head, brain = r < 1, r < 0.8
    texture = 0.6 + 0.25 * np.sin(7 * x + 3 * z) * np.cos(5 * y - 4 * z)
    ventricles = (np.abs(np.abs(x) - 0.12) < 0.06) & (np.abs(y) < 0.3) & (np.abs(z) < 0.25)
    image = 0.9 * (head & ~(r < 0.88)) + brain * texture * ~ventricles + 0.1 * (brain & ventricles)
    affine = np.diag([-voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = [voxel_mm * (shape[0] - 1) / 2, -voxel_mm * shape[1] / 2, -voxel_mm * shape[2] / 2]
    nibabel.save(nibabel.Nifti1Image((image * 200).astype(np.float32), affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def head_nifti(tmp_path_factory):
    return write_head_nifti(tmp_path_factory.mktemp("anatomy") / "head.nii.gz")


LEVEL_NAMES = {name for _, name in anatomy.LEVELS}


def test_anatomy_files_load_with_reports_and_a_preview(head_nifti, tmp_path):
    folder = str(tmp_path / "set")
    paths = anatomy.generate_dataset(folder, head_nifti, 3, n_slices=5, size=32, n_coils=2, seed=4)
    assert paths == list_volume_files(folder) and os.path.getsize(os.path.join(folder, "preview.png")) > 0
    volumes = load_volumes(paths, "cpu")
    for v in volumes:
        assert v.kspace.shape == (5, 2, 32, 32) and v.target.shape == (5, 32, 32) and len(v.reports) == 5
        for report in v.reports:
            count, places = parse_report(report)
            assert count == len(places)
            assert re.fullmatch(r".* level: (.+)\.", report).group(1) in LEVEL_NAMES
    with h5py.File(paths[0]) as f:
        assert f.attrs["acquisition"].startswith("simulated multi-coil from head.nii.gz (one subject")


def slab_and_lesions(head_nifti, seed, n_slices=6, size=32):
    """make_volume's steps up to the acquisition: (plain magnitudes, brain, levels, lesions, box)."""
    rng = np.random.default_rng(seed)
    magnitudes, brain, levels = anatomy.sample_slab(rng, anatomy.read_anatomy(head_nifti), n_slices, size)
    lesions, box = anatomy.place_lesions(rng, brain, n_slices, size)
    return rng, magnitudes, brain, levels, lesions, box


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 5])
def test_anatomy_reports_are_the_inserted_lesions_and_show_where_reported(head_nifti, seed):
    n_slices, size = 6, 32
    _, _, reports = anatomy.make_volume(
        np.random.default_rng(seed), anatomy.read_anatomy(head_nifti), n_slices, size, 2
    )
    rng, plain, brain, levels, lesions, (cx, cy, half_x, half_y) = slab_and_lesions(head_nifti, seed)
    xx, yy = field_of_view_grid(size, size)
    bx, by = (xx - cx) / half_x, (yy - cy) / half_y
    state = rng.bit_generator.state
    painted = []
    for s in range(n_slices):
        visible = [l for l in lesions if l.first_slice <= s <= l.last_slice]
        assert parse_report(reports[s]) == parse_report(report_text(visible))  # count and places
        assert reports[s].endswith(f" level: {levels[s]}.")
        painted.append(paint_lesions(plain[s], visible, bx, by, half_x, half_y, 1 / size, brain[s]))
        outlines = [lesion_outline(l, (bx - l.x) * half_x, (by - l.y) * half_y, 1 / size) for l in visible]
        for lesion, outline in zip(visible, outlines):
            assert (
                outline * brain[lesion.first_slice : lesion.last_slice + 1].min(0)
            ).sum() > 0.5 * outline.sum()
            # the place of the report, relative to the brain's centre: left on the left, frontal at the top
            for where, expected in (
                (((xx * outline).sum() / outline.sum() - cx) / half_x, SIDES[lesion.side]),
                (((yy * outline).sum() / outline.sum() - cy) / half_y, LOBES[lesion.lobe]),
            ):
                assert abs(where) < 0.2 if expected == 0 else where * expected > 0 and abs(where) > 0.1
        change = np.abs(painted[s] - plain[s])
        near = sum(outlines) if outlines else np.zeros_like(change)
        assert change[near < 1e-4].max(initial=0) < 1e-3  # nothing changes away from the reported lesions
        for outline in outlines:
            assert (change * outline).sum() / outline.sum() > 0.02
    # the same acquisition (coils, phase, noise) of the slab with and without its lesions
    _, with_lesions = acquire(rng, painted, xx, yy, 2)
    rng.bit_generator.state = state
    _, without = acquire(rng, plain, xx, yy, 2)
    for s in range(n_slices):
        differs = not np.allclose(with_lesions[s], without[s])
        assert differs == (parse_report(reports[s])[0] > 0), reports[s]


def test_anatomy_volumes_are_seeded_and_their_slices_differ(head_nifti):
    head = anatomy.read_anatomy(head_nifti)
    k1, t1, r1 = anatomy.make_volume(np.random.default_rng(3), head, 8, 32, 2)
    k2, t2, r2 = anatomy.make_volume(np.random.default_rng(3), head, 8, 32, 2)
    assert np.array_equal(k1, k2) and np.array_equal(t1, t2) and r1 == r2
    k3, t3, _ = anatomy.make_volume(np.random.default_rng(4), head, 8, 32, 2)
    assert not np.allclose(t1, t3)
    flat = t1.reshape(len(t1), -1)
    assert all(not np.allclose(flat[s], flat[s + 1]) for s in range(len(flat) - 1))
    corr = np.corrcoef(flat)
    assert np.mean([corr[s, s + 1] for s in range(len(flat) - 1)]) > corr[0, -1]  # neighbours are related


def test_anatomy_reorients_to_the_neurological_view(tmp_path):
    """A bright column at the patient's left front (RAS x < 0, y > 0) shows at the image's top left, whether
    the file stores the head in RAS order or as (z, -x, y) (another acquisition's axis order)."""
    n, mm = 32, 4.0
    x, y, z = np.meshgrid(*[np.arange(n) - (n - 1) / 2] * 3, indexing="ij")
    head = (x**2 + y**2 + z**2 < 14**2).astype(np.float32)
    head[(np.abs(x + 7) < 3) & (np.abs(y - 7) < 3)] = 4
    ras = np.diag([mm, mm, mm, 1.0])
    ras[:3, 3] = -mm * (n - 1) / 2
    permuted = np.array([[0, -mm, 0, 0], [0, 0, mm, 0], [mm, 0, 0, 0], [0, 0, 0, 1]])
    permuted[:3, 3] = [mm * (n - 1) / 2, -mm * (n - 1) / 2, -mm * (n - 1) / 2]
    stored = {"ras.nii": (head, ras), "zxy.nii": (head[::-1].transpose(2, 0, 1), permuted)}
    for name, (data, affine) in stored.items():
        path = str(tmp_path / name)
        nibabel.save(nibabel.Nifti1Image(np.ascontiguousarray(data), affine), path)
        magnitudes, _, _ = anatomy.sample_slab(np.random.default_rng(0), anatomy.read_anatomy(path), 3, 32)
        row, col = np.unravel_index(np.argmax(magnitudes[1]), magnitudes[1].shape)
        assert row < 16 and col < 16, (name, row, col)


def test_anatomy_errors_name_the_file(tmp_path, head_nifti):
    with pytest.raises(UserError, match="no such NIfTI file"):
        anatomy.read_anatomy(str(tmp_path / "missing.nii.gz"))
    text = tmp_path / "text.nii"
    text.write_text("not an image\n")
    with pytest.raises(UserError, match="text.nii: not a readable NIfTI image"):
        anatomy.read_anatomy(str(text))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(open(head_nifti, "rb").read()[:2000])
    with pytest.raises(UserError, match="truncated.nii.gz: not a readable NIfTI image"):
        anatomy.read_anatomy(str(truncated))
    small = str(tmp_path / "small.nii")
    nibabel.save(nibabel.Nifti1Image(np.ones((10, 40, 40), np.float32), np.eye(4)), small)
    with pytest.raises(UserError, match=r"small.nii: the image is \(10, 40, 40\) voxels; at least 16"):
        anatomy.read_anatomy(small)
    four_d = str(tmp_path / "fmri.nii")
    nibabel.save(nibabel.Nifti1Image(np.ones((20, 20, 20, 3), np.float32), np.eye(4)), four_d)
    with pytest.raises(UserError, match="a 3-D image is needed"):
        anatomy.read_anatomy(four_d)
    blank = str(tmp_path / "blank.nii")
    nibabel.save(nibabel.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)), blank)
    with pytest.raises(UserError, match="no signal"):
        anatomy.read_anatomy(blank)
    with pytest.raises(UserError, match="fewer than the 40 slices asked for; use fewer --slices"):
        anatomy.generate_dataset(str(tmp_path / "none"), head_nifti, 3, 40, 32, 2)
    assert not os.path.exists(tmp_path / "none")


@pytest.mark.skipif(not os.path.isfile(mri.DEFAULT_ANATOMY), reason="mricron-data is not installed")
def test_colin27_volume(tmp_path):
    (path,) = anatomy.generate_dataset(str(tmp_path), mri.DEFAULT_ANATOMY, 1, n_slices=4, size=32, n_coils=2)
    v = read_volume(path)
    assert v.kspace.shape == (4, 2, 32, 32) and all(parse_report(r)[0] is not None for r in v.reports)
    with h5py.File(path) as f:
        assert "Colin27 ch2.nii.gz" in f.attrs["acquisition"]
