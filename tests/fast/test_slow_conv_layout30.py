"""The reference path's convolutions where ATen runs them with its own kernel instead of oneDNN (float64; bf16
without oneDNN's bf16 kernels, i.e. before AVX-512; float16 without AVX512-FP16): ``pvtv2.fast.aten_convolves``.

- Under bf16 autocast on such a CPU, ATen's kernel rounds from the layout it is given: the patch embeddings and the
  spatial reduction took a channels-last image where transformers gives a contiguous one, and a bf16 autocast model
  with attention dropout lost bit parity with transformers (found with ``ONEDNN_MAX_CPU_ISA=AVX2
  ATEN_CPU_CAPABILITY=avx2``, which makes this AVX-512 machine's PyTorch and oneDNN run as on an AVX2 CPU). Now each
  convolution gets transformers' layout there, checked below in such a subprocess.
- Weights in float16 / float64: ATen's kernel runs the grouped depthwise convolution group by group and gathered each
  channel of a channels-last image element by element, 3-6x slower (a float16 B0 ran at x0.84 timm at batch 1). It
  now gets a contiguous image (the dense convolutions keep channels-last, 2-5x faster there in float16), and the
  outputs stay within float16 rounding of transformers' (pure float16 weights are not bit-equal in either layout).
- fp32 (and bf16 where oneDNN has kernels) keep channels-last images, oneDNN's layout."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from conftest import TINY, hf_config, perturb_, relative_error

import pvtv2.fast.cpu as cpu
from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast

TESTS = Path(__file__).resolve().parents[1]


def _pair(dtype, linear=False):
    torch.manual_seed(0)
    config = PvtV2Config(**TINY, num_labels=5, linear_attention=linear)
    ours = perturb_(PvtV2ForImageClassification(config), seed=3).eval()
    theirs = transformers.PvtV2ForImageClassification(hf_config(config)).eval()
    theirs.load_state_dict(ours.state_dict())
    return ours.to(dtype), theirs.to(dtype)


def _conv_inputs(model):
    """Whether each convolution's input is contiguous, by kind, in call order."""
    seen = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            kind = "dw" if name.endswith("dwconv.dwconv") else "sr" if "spatial_reduction" in name else "patch"
            module.register_forward_pre_hook(lambda m, args, kind=kind: seen.append((kind, args[0].is_contiguous())))
    return seen


@pytest.mark.parametrize("linear", [False, True], ids=["sra", "linear"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float16, 3e-3)], ids=["fp64", "fp16"])
def test_weights_outside_onednn_convolve_depthwise_from_contiguous_images_with_transformers_numbers(dtype, tol, linear):
    """The depthwise convolution from a contiguous image (3-6x faster in ATen's kernel); the dense ones keep
    channels-last, 2-5x faster there in float16."""
    ours, theirs = _pair(dtype, linear)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    seen = _conv_inputs(ours)
    with torch.no_grad():
        got, want = ours(x).logits, theirs(x).logits
    assert {kind for kind, _ in seen} == {"dw", "sr", "patch"}  # linear attention reduces with a 1x1 convolution
    assert all(contiguous for kind, contiguous in seen if kind == "dw")
    assert not any(contiguous for kind, contiguous in seen if kind != "dw")
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


def test_fp32_keeps_channels_last_images():
    ours, _ = _pair(torch.float32)
    seen = _conv_inputs(ours)
    with torch.no_grad(), fast.fast_path(False):
        ours(torch.randn(2, 3, 64, 64))
    # The first patch embedding's input is the pixels, made channels-last; the later ones and the rest are views.
    assert seen and not any(contiguous for _, contiguous in seen)


def test_bf16_autocast_without_onednn_bf16_takes_transformers_layouts(monkeypatch):
    """The layouts chosen where oneDNN has no bf16 kernels (told so here; the numbers are those of this CPU's
    kernels): the patch embeddings and the reduction contiguous, the depthwise convolution transformers' view."""
    ours, theirs = _pair(torch.float32)
    monkeypatch.setitem(cpu.ONEDNN_CONV_DTYPES, torch.bfloat16, False)
    seen = _conv_inputs(ours)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), fast.fast_path(False):
        got, want = ours(x).logits, theirs(x).logits
    assert all(contiguous for kind, contiguous in seen if kind != "dw")
    assert not any(contiguous for kind, contiguous in seen if kind == "dw")  # batch 2: the view is channels-last
    assert torch.equal(want, got)


def test_aten_convolves_follows_the_dtype_and_autocast(monkeypatch):
    assert cpu.ONEDNN_CONV_DTYPES[torch.bfloat16] == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert cpu.ONEDNN_CONV_DTYPES[torch.float16] == torch.ops.mkldnn._is_mkldnn_fp16_supported()
    x = torch.zeros(1, 3, 4, 4)
    assert not fast.aten_convolves(x) and fast.aten_convolves(x.double())
    monkeypatch.setitem(cpu.ONEDNN_CONV_DTYPES, torch.float16, True)
    assert not fast.aten_convolves(x.half())
    monkeypatch.setitem(cpu.ONEDNN_CONV_DTYPES, torch.float16, False)
    assert fast.aten_convolves(x.half())
    monkeypatch.setitem(cpu.ONEDNN_CONV_DTYPES, torch.bfloat16, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast.aten_convolves(x)  # autocast runs the convolution in bf16
    assert not fast.aten_convolves(x)


@pytest.mark.slow
def test_on_an_avx2_cpu_bf16_autocast_training_with_dropout_equals_transformers_bit_for_bit():
    """In a subprocess whose PyTorch and oneDNN run as on an AVX2 CPU (no oneDNN bf16): the same seed, the same
    logits and attention maps as transformers under bf16 autocast in training, with attention dropout."""
    script = textwrap.dedent("""
        import sys, torch, transformers
        sys.path.insert(0, sys.argv[1])
        from conftest import TINY, hf_config, random_weights_
        from pvtv2 import PvtV2Config, PvtV2ForImageClassification
        assert not torch.ops.mkldnn._is_mkldnn_bf16_supported()
        for linear in (False, True):
            config = PvtV2Config(**TINY, num_labels=5, attention_probs_dropout_prob=0.3, linear_attention=linear)
            ours = random_weights_(PvtV2ForImageClassification(config), seed=1).train()
            theirs = transformers.PvtV2ForImageClassification(hf_config(config)).train()
            theirs.load_state_dict(ours.state_dict())
            x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                torch.manual_seed(7)
                got = ours(x, output_attentions=True)
                torch.manual_seed(7)
                want = theirs(x, output_attentions=True)
            assert torch.equal(got.logits, want.logits), (linear, (got.logits - want.logits).abs().max())
            for stage_a, stage_b in zip(got.attentions, want.attentions, strict=True):  # per stage, per block
                assert all(torch.equal(a, b) for a, b in zip(stage_a, stage_b, strict=True)), linear
        print("bit-equal")
    """)
    run_as_on_avx2(script)


def run_as_on_avx2(script: str) -> None:
    """Runs ``script`` (given this tests folder as argv[1]) in a Python whose PyTorch and oneDNN behave as on an AVX2
    CPU; it must print "bit-equal"."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", script, str(TESTS)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "bit-equal" in out.stdout
