"""Sliding-window and multi-scale + flip segmentation inference: one window is the whole image; several are
stitched as a direct computation stitches them; test-time augmentation averages what it says it averages."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from pvtv2 import PvtV2Config
from pvtv2.inference import (
    predict_segmentation,
    segmentation_logits,
    segmentation_probabilities,
    window_starts,
)
from pvtv2.models.segmentation import PvtV2ForSemanticSegmentation

from conftest import TINY, perturb_


@pytest.fixture(scope="module")
def model() -> PvtV2ForSemanticSegmentation:
    torch.manual_seed(0)
    return perturb_(PvtV2ForSemanticSegmentation(PvtV2Config(**TINY, num_labels=3))).eval()


def _pixels(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed))


class Pointwise(torch.nn.Module):
    """Logits that depend on each pixel alone, at full resolution: any correct stitching reproduces them exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.conv(pixel_values))


def test_window_starts_cover_the_axis_as_mmsegmentation_places_them():
    assert window_starts(64, 32, 24) == [0, 24, 32]
    assert window_starts(96, 32, 24) == [0, 24, 48, 64]
    assert window_starts(512, 512, 341) == [0]
    assert window_starts(300, 512, 341) == [0]  # smaller than one window: the whole axis
    assert window_starts(683, 512, 341) == [0, 171]
    for length, crop, stride in [(1000, 512, 341), (77, 20, 7), (20, 20, 20)]:
        starts = window_starts(length, crop, stride)
        covered = np.zeros(length, bool)
        for start in starts:
            covered[start : start + crop] = True
        assert covered.all() and starts[-1] + crop == length and all(s % stride == 0 for s in starts[:-1])


def test_one_window_is_the_whole_image(model):
    pixels = _pixels(64, 96)
    whole = segmentation_logits(model, pixels)
    assert whole.shape == (2, 3, 64, 96)
    expected = F.interpolate(model(pixels).logits, size=(64, 96), mode="bilinear", align_corners=False)
    torch.testing.assert_close(whole, expected, rtol=0, atol=1e-6)
    for crop in (96, (64, 96), 512):
        torch.testing.assert_close(segmentation_logits(model, pixels, mode="slide", crop=crop, stride=32), whole, rtol=0, atol=1e-6)


def test_several_windows_average_as_a_direct_computation(model):
    pixels = _pixels(64, 96, seed=1)
    slid = segmentation_logits(model, pixels, mode="slide", crop=32, stride=24)
    # Direct: every window through the model on its own; each pixel the plain mean over the windows that hold it.
    windows = {}
    for top in (0, 24, 32):
        for left in (0, 24, 48, 64):
            logits = model(pixels[:, :, top : top + 32, left : left + 32]).logits
            windows[top, left] = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    expected = torch.zeros_like(slid)
    for y in range(64):  # row by row: the windows that hold row y, each pixel's mean over those holding it
        holding = [(left, up[:, :, y - t]) for (t, left), up in windows.items() if t <= y < t + 32]
        for x in range(96):
            expected[:, :, y, x] = torch.stack([row[:, :, x - left] for left, row in holding if left <= x < left + 32]).mean(0)
    torch.testing.assert_close(slid, expected, rtol=1e-5, atol=1e-5)
    assert (slid - segmentation_logits(model, pixels)).abs().max() > 1e-3  # windows see less context: not "whole"


def test_pointwise_logits_are_stitched_back_exactly():
    torch.manual_seed(3)
    pointwise = Pointwise().eval()
    pixels = _pixels(70, 101, seed=2)
    whole = segmentation_logits(pointwise, pixels)
    for crop, stride in [(32, 24), ((40, 17), (13, 17)), (70, 1)]:
        torch.testing.assert_close(
            segmentation_logits(pointwise, pixels, mode="slide", crop=crop, stride=stride), whole, rtol=0, atol=1e-5
        )


def test_multiscale_and_flip_average_the_views(model):
    pixels = _pixels(64, 96, seed=4)
    plain = segmentation_probabilities(model, pixels)
    torch.testing.assert_close(plain, segmentation_logits(model, pixels).softmax(1))
    assert torch.allclose(plain.sum(1), torch.ones(2, 64, 96))
    augmented = segmentation_probabilities(model, pixels, scales=(0.5, 1.5), flip=True)
    views = []
    for size in ((32, 48), (96, 144)):
        scaled = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
        for mirrored in (False, True):
            view = scaled.flip(-1) if mirrored else scaled
            logits = F.interpolate(model(view).logits, size=size, mode="bilinear", align_corners=False)
            logits = F.interpolate(logits, size=(64, 96), mode="bilinear", align_corners=False)
            probs = logits.softmax(1)
            views.append(probs.flip(-1) if mirrored else probs)
    torch.testing.assert_close(augmented, torch.stack(views).mean(0), rtol=1e-5, atol=1e-6)


def test_flip_of_a_mirror_symmetric_model_changes_nothing():
    torch.manual_seed(5)
    pointwise = Pointwise().eval()
    pixels = _pixels(32, 48)
    torch.testing.assert_close(
        segmentation_probabilities(pointwise, pixels, flip=True), segmentation_probabilities(pointwise, pixels)
    )


def test_predict_segmentation_modes(model):
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    whole = predict_segmentation(model, image, (64, 96))
    assert whole.shape == (60, 90) and set(np.unique(whole)) <= {0, 1, 2}
    assert np.array_equal(predict_segmentation(model, image, (64, 96), mode="slide", crop=128), whole)
    slid = predict_segmentation(model, image, mode="slide", crop=32, stride=21)  # at the image's own 60x90
    assert slid.shape == (60, 90)
    tta = predict_segmentation(model, image, (64, 96), scales=(0.75, 1.0, 1.25), flip=True)
    assert tta.shape == (60, 90) and (tta == whole).mean() > 0.5


def test_binary_model_predicts_where_the_probability_passes_one_half():
    torch.manual_seed(1)
    binary = perturb_(PvtV2ForSemanticSegmentation(PvtV2Config(**TINY, num_labels=1))).eval()
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    labels = predict_segmentation(binary, image, (64, 64))
    pixels = torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)[None]
    pixels = (pixels - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    logits = F.interpolate(binary(pixels).logits, size=(64, 64), mode="bilinear", align_corners=False)
    assert np.array_equal(labels, (logits[0, 0] > 0).long().numpy())


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"mode": "tile"}, "mode must be one of"),
        ({"mode": "slide", "crop": 32, "stride": 40}, "must not exceed crop"),
        ({"mode": "slide", "crop": 0}, "crop must be a positive integer"),
        ({"mode": "slide", "stride": (3, 4, 5)}, "stride must be"),
    ],
)
def test_bad_settings_raise(model, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        segmentation_logits(model, _pixels(64, 64), **kwargs)


def test_bad_scales_raise(model):
    for scales in ((), (0.0,), (-1.0,), 1.0):
        with pytest.raises(ValueError, match="scales must be"):
            segmentation_probabilities(model, _pixels(32, 32), scales=scales)


def test_slide_stride_defaults_to_two_thirds_of_the_crop(model):
    # The library's default follows the window as the command's --stride does (341 for 512): a fixed 341 refused
    # crop=32 on a larger image for a stride the caller never gave.
    pixels = _pixels(64, 96, seed=5)
    default = segmentation_logits(model, pixels, mode="slide", crop=(32, 48))
    torch.testing.assert_close(default, segmentation_logits(model, pixels, mode="slide", crop=(32, 48), stride=(21, 32)),
                               rtol=0, atol=0)
    assert (default - segmentation_logits(model, pixels, mode="slide", crop=(32, 48), stride=(16, 16))).abs().max() > 1e-4
    image = PIL.Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    np.testing.assert_array_equal(
        predict_segmentation(model, image, mode="slide", crop=32),
        predict_segmentation(model, image, mode="slide", crop=32, stride=21),
    )
