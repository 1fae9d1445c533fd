"""The Mix-FFN's depthwise convolution in dtypes ATen's CPU convolution runs without oneDNN (fp16 on CPUs without
AVX512-FP16, fp64): ATen's own kernel runs the grouped convolution group by group
and gathers each channel of a channels-last image element by element, 3-6x slower than from a contiguous image (a
pure fp16 B0 ran at x0.84 timm at batch 1). It now gets a contiguous image there, and the same numbers as
transformers' model; fp32 and bf16 keep the channels-last image (oneDNN wants it; without oneDNN bf16, ATen's kernel rounds
a few bf16 outputs otherwise than transformers' from the other layout)."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import TINY, hf_config, perturb_, relative_error

import pvtv2.fast.train as train
from pvtv2 import PvtV2Config, PvtV2ForImageClassification


def _pair(dtype, linear=False):
    torch.manual_seed(0)
    config = PvtV2Config(**TINY, num_labels=5, linear_attention=linear)
    ours = perturb_(PvtV2ForImageClassification(config), seed=3).eval()
    theirs = transformers.PvtV2ForImageClassification(hf_config(config)).eval()
    theirs.load_state_dict(ours.state_dict())
    return ours.to(dtype), theirs.to(dtype)


def _dwconv_inputs(model):
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
             for name, m in model.named_modules() if name.endswith("dwconv.dwconv")]
    return seen, hooks


@pytest.mark.parametrize("linear", [False, True], ids=["sra", "linear"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float16, 3e-3)], ids=["fp64", "fp16"])
def test_outside_onednn_the_convolution_reads_a_contiguous_image_and_gives_transformers_numbers(dtype, tol, linear):
    ours, theirs = _pair(dtype, linear)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    seen, hooks = _dwconv_inputs(ours)
    with torch.no_grad():
        got, want = ours(x).logits, theirs(x).logits
    assert seen and all(seen)
    assert relative_error(want.double(), got.double()) < tol


def test_fp64_training_gradients_equal_transformers():
    ours, theirs = _pair(torch.float64)
    ours.train(), theirs.train()
    x, labels = torch.randn(2, 3, 64, 64, dtype=torch.float64), torch.tensor([0, 3])
    for model in (ours, theirs):
        torch.nn.functional.cross_entropy(model(x).logits, labels).backward()
    theirs_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        # atol: the keys' bias has a gradient of exactly zero in theory (softmax ignores it), 1e-19 in rounding.
        torch.testing.assert_close(p.grad, theirs_grads[name].grad, rtol=1e-9, atol=1e-15, msg=name)


def test_fp32_keeps_the_channels_last_image():
    ours, _ = _pair(torch.float32)
    seen, hooks = _dwconv_inputs(ours)
    with torch.no_grad(), __import__("pvtv2").fast.fast_path(False):
        ours(torch.randn(2, 3, 64, 64))
    assert seen and not any(seen)


def test_bf16_autocast_where_onednn_has_no_bf16_convolution_keeps_transformers_layout(monkeypatch):
    """On a CPU without oneDNN bf16 (AVX2 only), autocast's bf16 convolution is ATen's own too, but there the layout
    stays transformers' (the other one rounds some outputs one bf16 step away): the same logits, bit for bit."""
    ours, theirs = _pair(torch.float32)
    x = torch.randn(2, 3, 64, 64)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    seen, hooks = _dwconv_inputs(ours)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), __import__("pvtv2").fast.fast_path(False):
        got = ours(x).logits
        want = theirs(x).logits
    assert seen and not any(seen)
    assert torch.equal(want, got)


def test_the_slow_dtypes_follow_onednn_float16_support(monkeypatch):
    assert torch.float64 in train.SLOW_CONV_DTYPES and torch.float32 not in train.SLOW_CONV_DTYPES
    assert torch.bfloat16 not in train.SLOW_CONV_DTYPES
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: True)
    assert torch.float16 not in train._slow_conv_dtypes()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)
    assert torch.float16 in train._slow_conv_dtypes()
