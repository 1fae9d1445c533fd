"""Depth metrics against values computed by hand on small maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pvtv2.training.depth import (
    DEPTH_METRICS,
    depth_metric_sums,
    depth_metrics,
    eigen_crop_mask,
    finish_depth_metrics,
)

# Ground truth 1, 2, 4 m and one pixel without depth (0); predictions 1.5, 2, 2 and 7 (ignored).
TARGET = np.array([[1.0, 2.0], [4.0, 0.0]])
PRED = np.array([[1.5, 2.0], [2.0, 7.0]])
# By hand: errors 0.5, 0, -2; ratios max(p/t, t/p) 1.5, 1, 2.
EXPECTED = {
    "abs_rel": (0.5 / 1 + 0 / 2 + 2 / 4) / 3,
    "sq_rel": (0.25 / 1 + 0 / 2 + 4 / 4) / 3,
    "rmse": math.sqrt((0.25 + 0 + 4) / 3),
    "rmse_log": math.sqrt((math.log(1.5) ** 2 + 0 + math.log(0.5) ** 2) / 3),
    "log10": (math.log10(1.5) + 0 + abs(math.log10(0.5))) / 3,
    "delta1": 1 / 3,  # only the exact pixel is within 1.25
    "delta2": 2 / 3,  # 1.5 < 1.5625, 2 is not
    "delta3": 2 / 3,  # 2 > 1.953125
}


@pytest.mark.parametrize("as_tensor", [False, True])
def test_metrics_of_a_small_map_are_the_hand_computed_ones(as_tensor):
    pred, target = (torch.from_numpy(PRED).float(), torch.from_numpy(TARGET).float()) if as_tensor else (PRED, TARGET)
    metrics = depth_metrics(pred, target)
    assert set(metrics) == set(DEPTH_METRICS)
    for name, value in EXPECTED.items():
        assert metrics[name] == pytest.approx(value, rel=1e-6), name


def test_numbers_stay_within_the_range_and_beyond_it_are_clamped():
    target = np.array([[2.0, 12.0, 0.0005]])  # 12 m and 0.5 mm are outside (1e-3, 10): not evaluated
    pred = np.array([[40.0, 1.0, 1.0]])  # 40 m is clamped to 10
    metrics = depth_metrics(pred, target)
    assert metrics["abs_rel"] == pytest.approx((10 - 2) / 2)
    assert metrics["rmse"] == pytest.approx(8.0)
    assert metrics["delta3"] == 0.0
    assert depth_metrics(np.array([[0.0, np.nan]]), np.array([[1.0, 1.0]]))["abs_rel"] == pytest.approx(1 - 1e-3)
    assert depth_metrics(np.ones((2, 2)), np.zeros((2, 2))) is None


def test_perfect_prediction():
    target = np.linspace(0.5, 9.5, 12).reshape(3, 4)
    metrics = depth_metrics(target, target)
    assert all(metrics[k] == 0 for k in ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10"))
    assert all(metrics[k] == 1 for k in ("delta1", "delta2", "delta3"))


def test_eigen_crop():
    mask = eigen_crop_mask(480, 640)
    assert int(mask.sum()) == (471 - 45) * (601 - 41)
    assert mask[45, 41] and mask[470, 600] and not mask[44, 41] and not mask[45, 601]
    assert int(eigen_crop_mask(240, 320).sum()) == (236 - 22) * (300 - 20)  # the same fractions, rounded
    target = np.full((480, 640), 3.0)
    pred = np.full((480, 640), 3.0)
    pred[:45] = 6.0  # wrong only outside the crop
    assert depth_metrics(pred, target, nyu_crop=True)["rmse"] == 0
    assert depth_metrics(pred, target)["rmse"] == pytest.approx(math.sqrt(9 * 45 / 480))


def test_dataset_metrics_are_means_over_images():
    second_target, second_pred = np.full((2, 2), 2.0), np.full((2, 2), 3.0)  # abs_rel 0.5, rmse 1
    pred = np.stack([PRED, second_pred, np.ones((2, 2))])
    target = np.stack([TARGET, second_target, np.zeros((2, 2))])  # the third image has no depth at all
    sums = depth_metric_sums(torch.from_numpy(pred), torch.from_numpy(target))
    half = [a + b for a, b in zip(depth_metric_sums(pred[:1], target[:1]), depth_metric_sums(pred[1:], target[1:]))]
    assert half == pytest.approx(sums)  # sums add across batches (and processes)
    result = finish_depth_metrics(sums)
    assert result["images"] == 2 and result["images_without_depth"] == 1
    assert result["abs_rel"] == pytest.approx((EXPECTED["abs_rel"] + 0.5) / 2)
    assert result["rmse"] == pytest.approx((EXPECTED["rmse"] + 1.0) / 2)
    assert math.isnan(finish_depth_metrics(depth_metric_sums(np.ones((1, 2, 2)), np.zeros((1, 2, 2))))["rmse"])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="same shape"):
        depth_metrics(np.ones((2, 2)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="min_depth < max_depth"):
        depth_metrics(np.ones((2, 2)), np.ones((2, 2)), min_depth=5, max_depth=1)
    with pytest.raises(ValueError, match="NaN"):
        depth_metrics(np.ones((2, 2)), np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        depth_metric_sums(np.ones((2, 2)), np.ones((2, 2)))
    with pytest.raises(TypeError, match="NumPy array"):
        depth_metrics([[1.0]], [[1.0]])
