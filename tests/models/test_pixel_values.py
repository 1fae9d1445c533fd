"""Inputs of another dtype than the weights': a TypeError that names both dtypes and the fix, raised before the first
layer, instead of a convolution or matmul error deep inside."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import TINY_SHALLOW, relative_error

from pvtv2 import PvtV2Backbone, PvtV2Config, PvtV2ForImageClassification, PvtV2Model
from pvtv2.models.segmentation import PvtV2ForSemanticSegmentation

MODELS = [PvtV2Model, PvtV2ForImageClassification, PvtV2Backbone, PvtV2ForSemanticSegmentation]


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_a_float_input_of_another_dtype_names_both_and_the_fix(cls, dtype):
    torch.manual_seed(0)
    model = cls(PvtV2Config(**TINY_SHALLOW, num_labels=3)).eval()
    with pytest.raises(TypeError) as caught:
        model(torch.randn(1, 3, 64, 64, dtype=dtype))
    message = str(caught.value)
    assert str(dtype) in message and "torch.float32" in message
    assert re.search(r"pixel_values\.to\(torch\.float32\)", message)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_an_integer_input_names_both_dtypes_and_the_processor(dtype):
    model = PvtV2ForImageClassification(PvtV2Config(**TINY_SHALLOW, num_labels=3)).eval()
    with pytest.raises(TypeError, match=rf"floating-point tensor of the model's dtype torch\.float32, got {dtype}.*PvtV2ImageProcessor"):
        model(torch.zeros(1, 3, 64, 64, dtype=dtype))


def test_matching_dtypes_and_autocast_are_let_through():
    torch.manual_seed(0)
    model = PvtV2ForImageClassification(PvtV2Config(**TINY_SHALLOW, num_labels=3)).eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        reference = model.double()(x).logits  # float64 weights and input: the precise reference
        single = model.float()(x.float()).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast reconciles the dtypes: not refused
            mixed = model(x.to(torch.bfloat16)).logits
    assert relative_error(reference, single) < 1e-5
    assert relative_error(reference, mixed.float()) < 5e-2  # bfloat16 keeps 8 bits of mantissa
