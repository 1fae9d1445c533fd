"""Hostile sizes for the one size parser (``pvtv2.inference._pair``) behind load_processor's image_size,
predict_depth's size and the sliding window's crop and stride.

Found and held here:

- load_processor read a torch bool tensor as a side (``torch.tensor(True)`` has ``__index__``: 1), so
  ``image_size=torch.tensor(True)`` gave a 1x1 resize and ``(torch.tensor(True), 224)`` a 1x224 one, silently, where a
  Python or NumPy bool is refused;
- a memoryview of bytes was read as the bytes' values (``memoryview(b"32")``: 51x50), where bytes are refused;
- an endless iterable as a pair (``itertools.repeat(512)``) was read to the end: the call never returned, its memory
  growing. At most three items are read now (two sides, and one more to tell a longer iterable).
"""

from __future__ import annotations

import itertools

import PIL.Image
import pytest
import torch

from pvtv2.inference import load_processor, predict_depth, segmentation_logits

TORCH_BOOLS = {
    "0-d": lambda: torch.tensor(True),
    "one-element": lambda: torch.tensor([True]),
    "in a pair": lambda: (torch.tensor(True), 224),
    "False in a pair": lambda: (224, torch.tensor(False)),
    "in a list": lambda: [torch.tensor([True]), torch.tensor([True])],
}


@pytest.mark.parametrize("name", list(TORCH_BOOLS))
def test_load_processor_refuses_torch_bool_sides(tmp_path, name):
    (tmp_path / "config.json").write_text("{}")
    value = TORCH_BOOLS[name]()
    with pytest.raises(ValueError) as error:
        load_processor(tmp_path, value)
    assert str(error.value) == f"image_size must be a positive side or a (height, width) pair, got {value!r}"


def test_load_processor_still_reads_torch_integer_sides(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    size = load_processor(tmp_path, (torch.tensor(32, dtype=torch.uint8), torch.tensor([64]))).size
    assert (size["height"], size["width"]) == (32, 64)


def _sides_then_fail(*sides):
    """An iterable of ``sides`` that fails if read further (an endless one would never end)."""
    yield from sides
    raise AssertionError("read past the sides given")


def test_the_sliding_window_reads_at_most_three_items_of_a_pair():
    pixels = torch.zeros(1, 3, 64, 64)

    def model(p):
        return (p[:, :1],)

    crop = _sides_then_fail(32, 32, 32)
    with pytest.raises(ValueError) as error:
        segmentation_logits(model, pixels, mode="slide", crop=crop, stride=32)
    assert str(error.value) == f"crop must be a positive integer or a (height, width) pair of them, got {crop!r}"
    endless = itertools.repeat(32)
    with pytest.raises(ValueError, match="stride must be a positive integer or a"):
        segmentation_logits(model, pixels, mode="slide", crop=32, stride=endless)
    # Two sides from a generator are still a pair: 32x64 windows over 64x64, two of them.
    windows = []

    def recording(p):
        windows.append(tuple(p.shape[-2:]))
        return (p[:, :1],)

    out = segmentation_logits(recording, pixels, mode="slide", crop=(s for s in (32, 64)), stride=32)
    assert out.shape == (1, 1, 64, 64) and windows == [(32, 64), (32, 64)]


def test_predict_depth_refuses_an_endless_size():
    image = PIL.Image.new("RGB", (64, 64))
    with pytest.raises(ValueError, match="size must be a positive integer or a"):
        predict_depth(torch.nn.Linear(1, 1), image, itertools.repeat(64))


def test_a_memoryview_of_bytes_is_no_pair(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    value = memoryview(b"32")  # iterates as 51, 50
    with pytest.raises(ValueError) as error:
        load_processor(tmp_path, value)
    assert str(error.value) == f"image_size must be a positive side or a (height, width) pair, got {value!r}"
    with pytest.raises(ValueError, match="size must be a positive integer or a"):
        predict_depth(torch.nn.Linear(1, 1), PIL.Image.new("RGB", (64, 64)), memoryview(b"@@"))  # 64x64 else
