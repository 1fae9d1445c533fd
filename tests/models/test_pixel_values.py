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


@pytest.mark.parametrize("cls", [PvtV2ForImageClassification, PvtV2Backbone], ids=lambda c: c.__name__)
@pytest.mark.parametrize("model_dtype, input_dtype", [
    (torch.float32, torch.float64), (torch.float64, torch.float32), (torch.float64, torch.bfloat16),
    (torch.bfloat16, torch.float64),
])
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_float64_against_another_dtype_under_autocast_is_refused_by_name(cls, model_dtype, input_dtype,
                                                                          autocast_dtype):
    """Autocast casts no float64 tensor, so a float64 input to a model of another dtype (or the other way round)
    cannot run under it: transformers fails in its first convolution ("Input type (double) and bias type
    (c10::BFloat16) should be the same"), and so did pvtv2, whose check let every mix through under autocast.
    Now a TypeError naming both dtypes and the cast; the mixes autocast reconciles still run."""
    import transformers
    from conftest import hf_config

    config = PvtV2Config(**TINY_SHALLOW, num_labels=3)
    model = cls(config).to(model_dtype).eval()
    theirs = transformers.PvtV2Model(hf_config(config)).to(model_dtype).eval()
    x = torch.randn(1, 3, 32, 32, dtype=input_dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype):
        with pytest.raises(RuntimeError, match="should be the same"):
            theirs(x)
        with pytest.raises(TypeError, match=rf"pixel_values is {input_dtype} but the model's weights are "
                                            rf"{model_dtype}.*autocast.*pixel_values\.to\({model_dtype}\)"):
            model(x)
        if model_dtype == torch.bfloat16 and autocast_dtype == torch.float16:
            return  # a bf16 model under float16 autocast fails in its LayerNorms, whatever the input
        outputs = [model(x.to(model_dtype))]
        if model_dtype != torch.float64:
            outputs.append(model(x.to(torch.float16)))  # a reduced input autocast casts
    first = outputs[0].logits if hasattr(outputs[0], "logits") else outputs[0].feature_maps[0]
    assert first.dtype == (torch.float64 if model_dtype == torch.float64 else autocast_dtype)
    for out in outputs:
        maps = [out.logits] if hasattr(out, "logits") else list(out.feature_maps)
        assert all(m.isfinite().all() for m in maps)
