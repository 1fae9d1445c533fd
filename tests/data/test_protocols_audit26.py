"""The evaluation protocols against the code that defines them, on real photographs (scikit-learn's china.jpg and
flower.jpg) saved as files the way they come: JPEG at several qualities, a CMYK JPEG, EXIF-rotated JPEGs, palette
PNGs, extreme aspect ratios.

References: ``original`` is the authors' ``build_transform(is_train=False)`` (whai362/PVT ``datasets.py``, DeiT's),
written here with torchvision; ``timm`` is ``timm.data.create_transform(**resolve_data_config(...))`` of timm's own
``pvt_v2_b0``; both are fed the image pvtv2 reads (``load_image``), so what is compared is the resize, crop and
normalisation (loading differs on purpose, see the README). Tolerance 1e-6: torchvision's ``ToTensor`` divides in
float32 where pvtv2 multiplies by 1/255 in float64, which may differ in the last bit.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from pvtv2.data.processing import IMAGENET_MEAN, IMAGENET_STD, PvtV2ImageProcessor, load_image
from pvtv2.inference import load_processor

T = pytest.importorskip("torchvision.transforms")


def _authors_eval_transform(input_size: int):
    # whai362/PVT datasets.py build_transform(is_train=False), verbatim but for the names.
    t = []
    if input_size > 32:
        t.append(T.Resize(int((256 / 224) * input_size), interpolation=3))
        t.append(T.CenterCrop(input_size))
    t.append(T.ToTensor())
    t.append(T.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return T.Compose(t)


@pytest.fixture(scope="module")
def photo():
    datasets = pytest.importorskip("sklearn.datasets")
    return PIL.Image.fromarray(datasets.load_sample_images().images[0])  # china.jpg, 427x640


@pytest.mark.parametrize("size", [32, 16])
def test_original_protocol_at_32_pixels_or_fewer_does_not_resize_as_the_authors(photo, size):
    # The authors resize and crop only when input_size > 32 (CIFAR-sized inputs go in as they are); pvtv2 resized a
    # 32x32 image up to 36 and cropped 32 from it.
    image = photo.crop((300, 200, 300 + size, 200 + size))
    ours = PvtV2ImageProcessor.from_protocol("original", size)(image)["pixel_values"][0]
    theirs = _authors_eval_transform(size)(image)
    assert ours.shape == theirs.shape == (3, size, size)
    assert (ours - theirs).abs().max().item() < 1e-6
