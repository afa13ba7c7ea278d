"""Tests of the MRI metrics: SSIM, PSNR and NMSE against their definitions written out by hand, and the
majority baseline of the report scores on a hand-made example."""

import numpy as np
import pytest
import torch

from mri_recon.metrics import majority_report, score_majority, score_reports, ssim, volume_metrics
from mri_recon.phantoms import parse_level


def ssim_by_hand(x, y, data_range):
    """skimage's formula written out window by window: 7x7 windows fully inside, sample (co)variances."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(x.shape[0] - 6):
        for j in range(x.shape[1] - 6):
            a, b = x[i : i + 7, j : j + 7].ravel(), y[i : i + 7, j : j + 7].ravel()
            va, vb = a.var(ddof=1), b.var(ddof=1)
            cov = ((a - a.mean()) * (b - b.mean())).sum() / (a.size - 1)
            values.append(
                (2 * a.mean() * b.mean() + c1)
                * (2 * cov + c2)
                / ((a.mean() ** 2 + b.mean() ** 2 + c1) * (va + vb + c2))
            )
    return np.mean(values)


def test_ssim_equals_hand_computation():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(10, 9))
    y = x + 0.3 * rng.standard_normal((10, 9))
    got = ssim(
        torch.from_numpy(x)[None], torch.from_numpy(y)[None], torch.tensor([x.max()], dtype=torch.float64)
    )
    assert got.item() == pytest.approx(ssim_by_hand(x, y, x.max()), rel=1e-10)


def test_ssim_of_constant_images_and_of_an_image_with_itself():
    x = torch.full((1, 7, 7), 0.2, dtype=torch.float64)
    y = torch.full((1, 7, 7), 0.6, dtype=torch.float64)
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)  # variances are 0: the c2 terms cancel
    assert ssim(x, y, torch.tensor([1.0], dtype=torch.float64)).item() == pytest.approx(expected, rel=1e-12)
    z = torch.rand(2, 16, 12, dtype=torch.float64)
    one = torch.ones(2, dtype=torch.float64)
    assert torch.allclose(ssim(z, z, one), one)


def test_psnr_and_nmse_equal_hand_values():
    gt = torch.zeros(2, 8, 8, dtype=torch.float64)
    gt[0, :4] = 2.0  # max 2, ||gt||^2 = 32 * 4 = 128
    pred = gt.clone()
    pred[1, 0, 0] = 0.5  # one error of 0.5 over 128 pixels
    m = volume_metrics(gt, pred)
    assert m["psnr"] == pytest.approx(10 * np.log10(2.0**2 / (0.25 / 128)))
    assert m["nmse"] == pytest.approx(0.25 / 128)
    same = volume_metrics(gt + 1, gt + 1)
    assert same["ssim"] == pytest.approx(1.0) and same["nmse"] == 0.0


def test_level_is_scored_on_the_reports_that_state_one():
    """Anatomy reports end with the slice's level: scored over the truths that have one, whatever the count."""
    truth = [
        "lesions: 0. level: ventricles.",
        "lesions: 1. left frontal: small round dark. level: vertex.",
        "x",
    ]
    generated = ["lesions: 1. level: ventricles.", "lesions: 0. level: ventricles.", "lesions: 0."]
    assert parse_level(truth[0]) == "ventricles" and parse_level("lesions: 0.") is None
    scores = score_reports(generated, truth)
    assert scores["level_acc"] == 0.5 and scores["count_acc"] == 0


def test_majority_baseline_scores_the_most_common_training_report_on_the_test_reports():
    none, one = "lesions: 0.", "lesions: 1. left frontal: small round dark."
    two = "lesions: 2. left frontal: small round dark. right posterior: large oval bright."
    train = [one, none, " lesions: 0. ", one, none]  # 'lesions: 0.' 3 of 5 (spaces stripped), 'one' 2 of 5
    assert majority_report(train) == (none, 0.6)
    assert majority_report([one, none]) == (one, 0.5)  # a tie goes to the first seen
    test = [none, one, two, none]
    # always 'lesions: 0.': count right on the two empty slices, places ([] = []) too, exact on both
    assert score_majority(train, test) == {
        "count_acc": 0.5,
        "place_acc": 0.5,
        "exact": 0.5,
        "level_acc": None,
        "n": 4,
        "distinct": 1,
        "known": 1.0,
        "report": none,
        "train_share": 0.6,
    }
    # a count that matches but places that do not: 'one' against a different single lesion
    other_one = "lesions: 1. right posterior: small round dark."
    scores = score_majority([one], [other_one, one])
    assert (scores["count_acc"], scores["place_acc"], scores["exact"]) == (1.0, 0.5, 0.5)
