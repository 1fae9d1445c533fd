"""What the image sizes of load_processor (image_size) and of predict_depth / the sliding window (size, crop, stride)
accept and refuse, pinned row by row before their two parsers became one helper.

The two differ on purpose and must stay so: load_processor reads a side as any integer index (a torch or numpy
0-d integer tensor too, as a config or a model may hold one) and a pair only from a sequence or array; the others
read a side only as a Python or numpy integer and a pair from any iterable (a generator too).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

from pvtv2.inference import load_processor, predict_depth, segmentation_logits

HUGE = 10**30 + 1  # no multiple of 32, so predict_depth stops at its own check instead of resizing to it

# (row, a function making the value anew (a generator is used up once read), the (height, width) load_processor
# reads or None for its ValueError, the same for predict_depth / the sliding window)
ROWS = [
    ("int", lambda: 32, (32, 32), (32, 32)),
    ("tuple", lambda: (32, 64), (32, 64), (32, 64)),
    ("list", lambda: [32, 64], (32, 64), (32, 64)),
    ("range", lambda: range(32, 65, 32), (32, 64), (32, 64)),
    ("numpy int64", lambda: np.int64(32), (32, 32), (32, 32)),
    ("numpy uint8", lambda: np.uint8(32), (32, 32), (32, 32)),
    ("numpy pair", lambda: np.array([32, 64]), (32, 64), (32, 64)),
    ("numpy ints in a tuple", lambda: (np.int32(32), np.int64(64)), (32, 64), (32, 64)),
    ("huge int", lambda: HUGE, (HUGE, HUGE), (HUGE, HUGE)),
    ("huge int in a pair", lambda: (HUGE, 32), (HUGE, 32), (HUGE, 32)),
    # torch integer scalars: a side for load_processor only
    ("torch 0-d int", lambda: torch.tensor(32), (32, 32), None),
    ("torch one-element int", lambda: torch.tensor([32]), (32, 32), None),
    ("torch 0-d int in a tuple", lambda: (torch.tensor(32), 64), (32, 64), None),
    ("numpy 0-d int in a tuple", lambda: (np.array(32), 64), (32, 64), None),
    # iterables that are no sequence: a pair for predict_depth / the sliding window only
    ("generator", lambda: (side for side in (32, 64)), None, (32, 64)),
    ("iterator", lambda: iter([32, 64]), None, (32, 64)),
    # refused by both
    ("dict", lambda: {32: "a", 64: "b"}, None, None),  # its keys have an order, but a mapping is no pair of sides
    ("set", lambda: {64, 32}, None, None),  # iterated as (32, 64) or (64, 32): height and width swapped silently
    ("frozenset", lambda: frozenset({2, 9}), None, None),
    ("True", lambda: True, None, None),
    ("False", lambda: False, None, None),
    ("numpy bool", lambda: np.bool_(True), None, None),
    ("bool in a pair", lambda: (True, 32), None, None),
    ("numpy bool in a pair", lambda: (np.bool_(True), 32), None, None),
    ("float", lambda: 32.0, None, None),
    ("numpy float", lambda: np.float64(32), None, None),
    ("float in a pair", lambda: (32.0, 64), None, None),
    ("numpy float pair", lambda: np.array([32.0, 64.0]), None, None),
    ("torch 0-d float", lambda: torch.tensor(32.0), None, None),
    ("torch int pair", lambda: torch.tensor([32, 64]), None, None),
    ("numpy 0-d int", lambda: np.array(32), None, None),
    ("numpy one-element", lambda: np.array([32]), None, None),
    ("numpy 2-d", lambda: np.array([[32, 64]]), None, None),
    ("bytes", lambda: b"32", None, None),
    ("bytearray", lambda: bytearray(b"32"), None, None),
    ("str digits", lambda: "32", None, None),
    ("str 32x", lambda: "32x", None, None),
    ("str 32_0", lambda: "32_0", None, None),
    ("negative", lambda: -32, None, None),
    ("zero", lambda: 0, None, None),
    ("zero in a pair", lambda: (0, 32), None, None),
    ("negative in a pair", lambda: (32, -1), None, None),
    ("one item", lambda: (32,), None, None),
    ("three items", lambda: (32, 64, 96), None, None),
    ("nested", lambda: ((32,), 64), None, None),
    ("None", lambda: None, None, None),
]
IDS = [row[0] for row in ROWS]


@pytest.mark.parametrize(("name", "make", "expected", "_"), ROWS, ids=IDS)
def test_load_processor_image_size(tmp_path, name, make, expected, _):
    (tmp_path / "config.json").write_text("{}")  # no preprocessor_config.json: the transformers resize to the size
    value = make()
    if expected is None:
        with pytest.raises(ValueError) as error:
            load_processor(tmp_path, value)
        assert str(error.value) == f"image_size must be a positive side or a (height, width) pair, got {value!r}"
    else:
        size = load_processor(tmp_path, value).size
        assert (size["height"], size["width"]) == expected
        assert type(size["height"]) is int and type(size["width"]) is int


class _DepthStub(torch.nn.Module):
    """Records the (height, width) predict_depth resized the image to; its depth is zeros."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.sizes: list[tuple[int, int]] = []

    device = property(lambda self: self.weight.device)
    dtype = property(lambda self: self.weight.dtype)

    def forward(self, pixel_values, return_dict=True):
        self.sizes.append(tuple(pixel_values.shape[-2:]))
        return SimpleNamespace(predicted_depth=torch.zeros(1, *pixel_values.shape[-2:]))


@pytest.mark.parametrize(("name", "make", "_", "expected"), ROWS, ids=IDS)
def test_predict_depth_size(name, make, _, expected):
    model = _DepthStub()
    image = PIL.Image.new("RGB", (70, 40))
    value = make()
    if value is None:  # predict_depth's default: the image's own size rounded down to multiples of 32
        expected = (32, 64)
    if expected is None:
        with pytest.raises(ValueError) as error:
            predict_depth(model, image, value)
        assert str(error.value) == f"size must be a positive integer or a (height, width) pair of them, got {value!r}"
    elif HUGE in expected:  # read, then refused by GLPN's multiples of 32, naming the sides as read
        with pytest.raises(ValueError) as error:
            predict_depth(model, image, value)
        assert str(error.value) == (
            f"size must be multiples of 32 per side (GLPN's decoder), got {expected[0]}x{expected[1]}")
        assert model.sizes == []
    else:
        assert predict_depth(model, image, value).shape == (40, 70)
        assert model.sizes == [expected]


@pytest.mark.parametrize(("name", "make", "_", "expected"), ROWS, ids=IDS)
def test_sliding_window_crop_and_stride(name, make, _, expected):
    windows: list[tuple[int, int]] = []

    def model(pixels):  # records each window; its logits are the first channel (a tuple, as return_dict false gives)
        windows.append(tuple(pixels.shape[-2:]))
        return (pixels[:, :1],)

    pixels = torch.zeros(1, 3, 128, 128)
    crop = make()
    if expected is None:
        with pytest.raises(ValueError) as error:
            segmentation_logits(model, pixels, mode="slide", crop=crop, stride=64)
        assert str(error.value) == f"crop must be a positive integer or a (height, width) pair of them, got {crop!r}"
        stride = make()
        if stride is None:  # the stride's default: two thirds of the crop (42 of 64), windows at 0, 42 and 64
            corners = []
            ramp = torch.arange(128.0)[:, None] * 1000 + torch.arange(128.0)  # each pixel says where it is
            segmentation_logits(lambda p: (corners.append(divmod(int(p[0, 0, 0, 0]), 1000)), model(p))[1],
                                ramp.expand(1, 3, 128, 128), mode="slide", crop=64, stride=stride)
            assert windows == [(64, 64)] * 9
            assert corners == [(top, left) for top in (0, 42, 64) for left in (0, 42, 64)]
            return
        with pytest.raises(ValueError) as error:
            segmentation_logits(model, pixels, mode="slide", crop=64, stride=stride)
        assert str(error.value) == (
            f"stride must be a positive integer or a (height, width) pair of them, got {stride!r}")
        assert windows == []
        return
    # crop = stride = the value: the windows tile the 128x128 input, each the crop clipped to the input
    height, width = (min(side, 128) for side in expected)
    assert segmentation_logits(model, pixels, mode="slide", crop=make(), stride=make()).shape == (1, 1, 128, 128)
    assert windows == [(height, width)] * ((128 // height) * (128 // width))
