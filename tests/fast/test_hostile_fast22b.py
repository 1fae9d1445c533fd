"""Hostile checks of the fast CPU inference path's slot assumptions: the fused stage skips some modules (dropouts,
drop path, the Mix-FFN's ReLU slot), reads others' hyperparameters as fixed (the depthwise 3x3 geometry, zero
padding) and fuses keys and values into one GEMM with one bias. A model whose modules in those slots are of a known
type but compute something else must run the reference path, which calls them: each case is held to the reference
path's numbers (the modules called one by one), and to transformers' where transformers can hold the same change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pvtv2.fast.cpu as fast_cpu
from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast

from conftest import TINY, hf_twin as _hf, random_weights_, relative_error

pytestmark = pytest.mark.skipif(not fast.fast_path_available(), reason="oneDNN's operators unavailable here")


def _model(seed: int = 2, **changes) -> PvtV2ForImageClassification:
    return random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5, **changes)), seed=seed).eval()


def _input() -> torch.Tensor:
    return torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(0))


def _fast_and_reference(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    x = _input()
    with torch.no_grad():
        got = model(x).logits
        with fast.fast_path(False):
            want = model(x).logits
    return got, want


def _modules(model: nn.Module, name: str) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == name]


@pytest.mark.parametrize("which", ["key", "value"])
def test_key_and_value_with_different_biases_match_transformers(which):
    """The fused key/value GEMM takes one bias for both: with only one of them biased it dropped the key's bias
    silently (32% off) or crashed on the value's missing one."""
    ours = _model()
    theirs = _hf(ours)
    for model in (ours, theirs):
        for m in model.modules():
            if hasattr(m, "key") and hasattr(m, "value") and isinstance(m.key, nn.Linear):
                setattr(getattr(m, which), "bias", None)
    x = _input()
    with torch.no_grad():
        want = theirs(x).logits
        for frozen in (False, True):
            if frozen:
                fast.freeze(ours)
            assert relative_error(want, ours(x).logits) < 1e-4, frozen


def _set(model: nn.Module, owner: str, slot: str, make) -> None:
    for m in _modules(model, owner):
        if hasattr(m, slot):  # attention without spatial reduction has no reduction convolution
            setattr(m, slot, make(m))


@pytest.mark.parametrize(
    "owner, slot, make",
    [
        ("MixFFN", "relu", lambda m: nn.SiLU()),  # only a ReLU there was fused; anything else was skipped
        ("MixFFN", "dropout", lambda m: nn.ReLU()),
        ("SpatialReductionAttention", "proj_drop", lambda m: nn.GELU()),
        ("PvtV2Block", "drop_path", lambda m: nn.ReLU()),
    ],
    ids=["ffn-relu-slot", "ffn-dropout-slot", "proj-drop-slot", "drop-path-slot"],
)
def test_known_modules_in_skipped_slots_run_the_reference(owner, slot, make):
    model = _model()
    _set(model, owner, slot, make)
    got, want = _fast_and_reference(model)
    assert relative_error(want, got) < 1e-5


def _conv_like(conv: nn.Conv2d, **changes) -> nn.Conv2d:
    settings = dict(
        in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride,
        padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    settings.update(changes)
    new = nn.Conv2d(**settings)
    with torch.no_grad():
        new.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(conv.out_channels))
    return new


@pytest.mark.parametrize(
    "owner, slot, changes",
    [
        ("DepthwiseConv", "dwconv", dict(padding_mode="circular")),
        ("DepthwiseConv", "dwconv", dict(kernel_size=5, padding=2)),
        ("DepthwiseConv", "dwconv", dict(dilation=2, padding=2)),
        ("SpatialReductionAttention", "spatial_reduction", dict(padding=1, padding_mode="reflect")),
        ("OverlapPatchEmbed", "proj", dict(padding_mode="replicate")),
    ],
    ids=["dwconv-circular", "dwconv-5x5", "dwconv-dilated", "reduction-reflect", "embed-replicate"],
)
def test_convolutions_the_fused_code_does_not_reproduce_run_the_reference(owner, slot, changes):
    """The fused depthwise convolution hard-codes a 3x3 kernel, stride, padding and dilation 1; every fused
    convolution pads with zeros. Other geometries or padding modes gave other numbers (60% off) or crashed."""
    model = _model()
    _set(model, owner, slot, lambda m: _conv_like(getattr(m, slot), **changes).eval())
    got, want = _fast_and_reference(model)
    assert relative_error(want, got) < 1e-5


def test_fast_path_still_runs_for_the_model_as_built(monkeypatch):
    """The slot checks refuse only what the fused code cannot compute: the stock model (and transformers' numbers)
    still go through stage_forward, also with bias-less query/key/value, tanh GELU and linear attention."""
    calls = []
    real = fast_cpu.stage_forward
    monkeypatch.setattr(fast_cpu, "stage_forward", lambda *a: calls.append(1) or real(*a))
    for changes in (dict(), dict(qkv_bias=False), dict(linear_attention=True), dict(hidden_act="gelu_pytorch_tanh")):
        calls.clear()
        ours = _model(**changes)
        with torch.no_grad():
            got = ours(_input()).logits
            want = _hf(ours)(_input()).logits
        assert len(calls) == 4, changes
        assert relative_error(want, got) < 1e-4, changes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_float64_model_under_autocast_computes_in_float64(dtype):
    """Autocast leaves float64 tensors alone, so a float64 model under CPU autocast computes in float64 (as
    transformers' does); the fast path took the autocast dtype as its compute dtype and crashed on the float64
    LayerNorm weights ("mixed dtype (CPU)")."""
    ours = _model().double()
    theirs = _hf(ours).double()
    x = _input().double()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        got = ours(x).logits
        want = theirs(x).logits
    assert got.dtype == want.dtype == torch.float64
    assert relative_error(want, got) < 1e-10
