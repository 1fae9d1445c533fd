"""The GPU's frozen path (``pvtv2.fast.cuda.frozen_stage_forward``), run on CPU tensors, gives the depthwise convolution
the layout the reference gives it: where ATen's own kernel convolves (float64 and, without AVX512-FP16, float16
weights) a contiguous image (fast.depthwise_conv). It kept the channels-last view, and float64 logits came out
otherwise than the reference path's (tests/fast/test_cuda_frozen.py failed after the reference's layouts changed)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from conftest import TINY, perturb_

import pvtv2.fast.cpu as cpu
from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast
from pvtv2.fast import cuda


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["fp64", "fp16"])
@pytest.mark.parametrize("linear", [False, True], ids=["sra", "linear"])
def test_frozen_path_equals_the_reference_in_dtypes_aten_convolves(dtype, linear):
    torch.manual_seed(0)
    model = perturb_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5, linear_attention=linear)), seed=1)
    model = model.eval().to(dtype)
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(2)).to(dtype)
    assert fast.aten_convolves(x) == (dtype == torch.float64 or not cpu.ONEDNN_CONV_DTYPES[torch.float16])
    fast.freeze(model)
    with torch.no_grad():
        with fast.fast_path(False):
            want = model(x).logits
        with mock.patch.object(fast, "applies", lambda h, stage=None: cpu.fusable(stage)), \
                mock.patch.object(fast, "stage_forward", cuda.frozen_stage_forward):
            got = model(x).logits
    assert got.dtype == dtype
    assert torch.equal(got, want)
