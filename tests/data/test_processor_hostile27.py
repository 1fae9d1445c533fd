"""Hostile pass on PvtV2ImageProcessor's per-call settings (today's features), against transformers' processors.

Holds:
- a setting given to a call as None keeps the instance's (transformers 4.x's rule, ``x if x is not None else
  self.x``): image_mean/image_std/size=None silently went back to the class defaults (ImageNet, 224x224), the
  others were a TypeError; the same through from_pretrained(source, image_mean=None).
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
from sklearn.datasets import load_sample_images
from transformers.models.pvt.image_processing_pil_pvt import PvtImageProcessorPil

from pvtv2 import PvtV2ImageProcessor

PHOTO = PIL.Image.fromarray(load_sample_images().images[0])  # 427 x 640 (china.jpg)

CUSTOM = dict(size={"height": 96, "width": 80}, image_mean=[0.1, 0.2, 0.3], image_std=[0.3, 0.2, 0.1], resample=3,
              rescale_factor=1 / 127.5)


def _transformers(settings, **call):
    """transformers 4.x's reading of a None per-call setting: the instance's; transformers 5 does the same when the
    setting is left out, which is what we compare against."""
    reference = PvtImageProcessorPil(**settings)
    call = {key: value for key, value in call.items() if value is not None}
    return np.asarray(reference(PHOTO, return_tensors="np", do_convert_rgb=True, **call)["pixel_values"])


@pytest.mark.parametrize(
    "name",
    ["image_mean", "image_std", "size", "do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize",
     "do_center_crop", "crop_size", "crop_pct"],
)
def test_a_setting_given_as_none_keeps_the_instances(name):
    ours = PvtV2ImageProcessor(**CUSTOM)
    got = ours(PHOTO, return_tensors="np", **{name: None})["pixel_values"]
    expected = _transformers(CUSTOM, **{name: None})
    assert got.shape == expected.shape == (1, 3, 96, 80)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert ours.to_dict() == PvtV2ImageProcessor(**CUSTOM).to_dict()


def test_from_pretrained_with_none_keeps_the_files_setting(tmp_path):
    PvtV2ImageProcessor(**CUSTOM).save_pretrained(tmp_path)
    loaded = PvtV2ImageProcessor.from_pretrained(tmp_path, image_mean=None, size=None)
    assert loaded.image_mean == (0.1, 0.2, 0.3)
    assert loaded.size == {"height": 96, "width": 80}

