"""Hostile checks of the CPU training pieces under bf16 autocast (pvtv2.fast.train: Bf16Linear, Bf16DepthwiseConv,
patch_conv): odd grids, odd weights, contexts that change between the forward and the backward pass, against the
reference path (fast path off), transformers under the same autocast, or float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import TINY, hf_config, random_weights_, relative_error
from torch import nn

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast

pytestmark = pytest.mark.skipif(
    not fast.fast_path_available(torch.bfloat16), reason="no oneDNN bf16 operators on this CPU"
)


def _model(seed: int = 1, **kwargs) -> PvtV2ForImageClassification:
    config = PvtV2Config(num_labels=5, drop_path_rate=0.0, **dict(TINY, **kwargs))
    return random_weights_(PvtV2ForImageClassification(config), seed=seed).train()


def _grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["input"] = x.grad.clone()
    return grads


def _worst(want: dict, got: dict) -> float:
    assert set(want) == set(got)
    scale = max(g.abs().max().item() for g in want.values())
    return max((want[n].float() - got[n].float()).abs().max().item() for n in want) / scale


@pytest.mark.parametrize("forward_context", ["fast-path-off", "aten"])
def test_checkpointed_blocks_recompute_under_the_forward_passes_choice(forward_context):
    """Gradient checkpointing recomputes each block during the backward pass, outside the ``fast.fast_path(False)`` or
    ``fast.train_gemm("aten")`` block the forward ran in: the recomputation took the bf16 pieces where the forward
    had not, saved other tensors, and torch.utils.checkpoint raised CheckpointError (the reference path crashed). The
    recomputation runs under the forward's choice: the gradients of the unchecked model, bit for bit."""
    model = _model()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    context = (lambda: fast.fast_path(False)) if forward_context == "fast-path-off" else (lambda: fast.train_gemm("aten"))

    def step() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with context(), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(xi).logits.float().square().mean()
        with fast.train_gemm("onednn"):  # the backward pass where the pieces would apply
            loss.backward()
        return _grads(model, xi)

    plain = step()
    model.gradient_checkpointing_enable()
    checkpointed = step()
    for name, grad in plain.items():
        assert torch.equal(grad, checkpointed[name]), name


def test_checkpointed_blocks_still_compile():
    """torch.compile of a checkpointed model: dynamo takes no context_fn of the model's own making (it raised
    NotImplementedError with the choices' context), so none is passed there; the eager model's gradients."""
    model = _model()
    model.gradient_checkpointing_enable()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    torch.compile(model, backend="aot_eager")(x).logits.square().sum().backward()
    compiled = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with fast.fast_path(False):
        model(x).logits.square().sum().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert _worst(eager, compiled) < 1e-5
