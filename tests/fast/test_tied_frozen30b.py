"""A frozen parameter tied into another model with ``nn.Parameter(p)`` (pvtv2.fast.cpu's ``_WatchedParameter.detach``):
the two parameters share memory and version counter, and every write through either must reach the frozen stages
holding the other. The reference is the same model with the fast path off (``fast.fast_path(False)``), which reads
the weights as they are at call time.

Found and held here: each parameter counted its own ``.data`` uses, so a write through the new parameter's ``.data``
(or the old one's), and a step of a fused optimizer (``fused=True``: it bumps no version counter; its step hook
counted a use of the parameter it holds only) left the frozen model holding the other computing with the weights
packed before: 1e-2 to 1e-1 off the reference.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast

from conftest import TINY, perturb_, relative_error

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))


def _model(seed: int = 7) -> PvtV2ForImageClassification:
    torch.manual_seed(seed)
    return perturb_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5)), seed=seed).eval()


def _value(model) -> nn.Linear:
    return model.pvt_v2.encoder.layers[1].blocks[0].attention.value


def _reference(model) -> torch.Tensor:
    with torch.no_grad(), fast.fast_path(False):
        return model(X).logits


def _fast(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


def _halve_data(p: torch.Tensor) -> None:
    p.data.mul_(0.5)


def _fused_sgd(p: torch.Tensor) -> None:
    p.grad = torch.ones_like(p)
    torch.optim.SGD([p], lr=1.0, fused=True).step()


def _fused_adamw(p: torch.Tensor) -> None:
    p.grad = torch.ones_like(p)
    torch.optim.AdamW([p], lr=0.1, fused=True).step()


def _plain_sgd(p: torch.Tensor) -> None:
    p.grad = torch.ones_like(p)
    torch.optim.SGD([p], lr=1.0).step()


WRITES = {".data in place": _halve_data, "fused SGD step": _fused_sgd, "fused AdamW step": _fused_adamw,
          "SGD step": _plain_sgd}


@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("through", ["new parameter", "frozen parameter"])
def test_a_write_through_either_tied_parameter_reaches_the_frozen_model(write, through):
    frozen, other = _model(), _model(seed=9)
    fast.freeze(frozen)
    _fast(frozen)  # packs the frozen stages' weights
    tied = nn.Parameter(_value(frozen).weight)
    _value(other).weight = tied
    fast.freeze(other)
    _fast(other)
    before = _reference(frozen)
    WRITES[write](tied if through == "new parameter" else _value(frozen).weight)
    assert torch.equal(_value(frozen).weight, _value(other).weight)  # one memory
    for model in (frozen, other):
        want = _reference(model)
        assert relative_error(want, _fast(model)) < 1e-5
    assert relative_error(_reference(frozen), before) > 1e-4  # the write changed the numbers (the test can tell)


def test_the_tied_model_saves_and_loads_with_weights_only():
    frozen, other = _model(), _model(seed=9)
    fast.freeze(frozen)
    _fast(frozen)
    _value(other).weight = nn.Parameter(_value(frozen).weight)
    buffer = io.BytesIO()
    torch.save(other.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    key = "pvt_v2.encoder.layers.1.blocks.0.attention.value.weight"
    assert type(state[key]) is torch.Tensor
    torch.testing.assert_close(state[key], _value(frozen).weight.detach(), rtol=0, atol=0)
    fresh = _model(seed=3)
    fresh.load_state_dict(state)
    torch.testing.assert_close(_reference(fresh), _reference(other), rtol=0, atol=0)
