"""Tests of the MRI data (CPU): the masks of Table 10, the synthetic phantoms and their reports, the fastMRI
.h5 round trip and the reader's errors, the split by volume."""

import h5py
import numpy as np
import pytest
import torch

from cli import UserError
from mri_recon.fastmri_files import VolumeFileError, read_volume, split_by_volume, write_volume
from mri_recon.fourier import center_crop, ifft2c, rss
from mri_recon.masks import ACCELERATIONS, make_mask, volume_mask
from mri_recon.metrics import score_reports
from mri_recon.models import centre_lines
from mri_recon.phantoms import Lesion, make_volume, parse_report, report_text

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
    assert score_reports([text, "lesions: 0.", "xx"], [text, text, "lesions: 0."]) == {
        "count_acc": 1 / 3,
        "place_acc": 1 / 3,
        "exact": 1 / 3,
        "n": 3,
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
