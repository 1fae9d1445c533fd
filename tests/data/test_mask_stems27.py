"""Two images with one stem in a segmentation split are refused, not both paired with the one mask."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from pvtv2.data.masks import scan_segmentation_split


def test_two_images_of_one_stem_are_refused(tmp_path):
    for sub in ("images", "masks"):
        (tmp_path / "val" / sub).mkdir(parents=True)
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(tmp_path / "val" / "images" / "a.png")
    PIL.Image.fromarray(np.ones((8, 8), dtype=np.uint8)).save(tmp_path / "val" / "masks" / "a.png")
    PIL.Image.fromarray(pixels).save(tmp_path / "val" / "images" / "b.jpg")
    PIL.Image.fromarray(np.ones((8, 8), dtype=np.uint8)).save(tmp_path / "val" / "masks" / "b.png")
    pairs = scan_segmentation_split(tmp_path, "val")
    assert [(i.name, m.name) for i, m in pairs] == [("a.png", "a.png"), ("b.jpg", "b.png")]
    PIL.Image.fromarray(pixels).save(tmp_path / "val" / "images" / "a.jpg")  # a second image for mask a.png
    with pytest.raises(ValueError, match=r"'a.jpg' and 'a.png'|'a.png' and 'a.jpg'"):
        scan_segmentation_split(tmp_path, "val")
