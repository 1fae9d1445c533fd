"""--clip-grad 0 (round 28): no clipping, as leaving the flag out (it was refused); a negative norm is still refused.
Each optimizer step is compared with an AdamW step taken by hand on a copy of the model: unclipped for 0, after
torch.nn.utils.clip_grad_norm_ for a small norm."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from pvtv2.cli import main
from pvtv2.training import TrainConfig
from pvtv2.training.engine import _optimizer_step


def _model_with_gradients() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    ((model(x) - y) ** 2).sum().backward()
    return model


def _engine_step(model: torch.nn.Module, clip_grad: float | None) -> torch.nn.Module:
    """One step of the engine's optimizer step (no scaler, no EMA) on ``model``'s gradients."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    training = SimpleNamespace(model=model, optimizer=optimizer, scheduler=scheduler, scaler=None, ema=None)
    cfg = TrainConfig(output="o", clip_grad=clip_grad)
    cfg.validate()
    _optimizer_step(cfg, training)
    return model


def _hand_step(model: torch.nn.Module, clip: float | None) -> torch.nn.Module:
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.05).step()
    return model


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_clip_grad_zero_is_an_unclipped_step():
    model = _model_with_gradients()
    grad_norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert grad_norm > 1.0  # a clip at 0 (or 1e-3) would change this step
    expected = _params(_hand_step(copy.deepcopy(model), None))
    for clip in (0.0, 0, None):
        got = _params(_engine_step(copy.deepcopy(model), clip))
        for a, b in zip(got, expected):
            assert torch.equal(a, b), clip


def test_small_clip_equals_clip_grad_norm_by_hand():
    model = _model_with_gradients()
    # AdamW's first step is sign-like (m / sqrt(v) = g / |g|): weight decay aside, a uniformly scaled gradient moves
    # the weights the same. Its second step is not: take two steps on the same gradients to see the clip.
    clip = 1e-3
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=0.1, weight_decay=0.05)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=0.1, weight_decay=0.05)
    unclipped = copy.deepcopy(model)
    opt_unclipped = torch.optim.AdamW(unclipped.parameters(), lr=0.1, weight_decay=0.05)
    cfg = TrainConfig(output="o", clip_grad=clip)
    training = SimpleNamespace(model=ours, optimizer=opt_ours, ema=None, scaler=None,
                               scheduler=torch.optim.lr_scheduler.LambdaLR(opt_ours, lambda step: 1.0))
    grads = [p.grad.clone() for p in model.parameters()]
    for step in range(2):
        for net in (ours, theirs, unclipped):
            for p, g in zip(net.parameters(), grads):
                p.grad = g.clone() * (step + 1)
        _optimizer_step(cfg, training)
        norm = torch.nn.utils.clip_grad_norm_(theirs.parameters(), clip)
        assert norm.item() > clip
        opt_theirs.step()
        opt_unclipped.step()
    for a, b, c in zip(_params(ours), _params(theirs), _params(unclipped)):
        assert torch.equal(a, b)
    assert any(not torch.allclose(a, c) for a, c in zip(_params(ours), _params(unclipped)))


def test_clip_grad_validation():
    TrainConfig(output="o", clip_grad=0.0).validate()
    TrainConfig(output="o", clip_grad=0.5).validate()
    for bad in (-1.0, -1e-9, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="--clip-grad"):
            TrainConfig(output="o", clip_grad=bad).validate()


def test_cli_takes_clip_grad_zero_and_refuses_negative(monkeypatch, capsys):
    import pvtv2.training

    calls: list = []
    monkeypatch.setattr(pvtv2.training, "train", lambda cfg, *, explicit=None: calls.append(cfg) or {"rank": 1})
    assert main(["train", "--data", "D", "-o", "O", "--clip-grad", "0"]) == 0
    assert calls[0].clip_grad == 0.0
    assert main(["train", "--data", "D", "-o", "O"]) == 0
    assert calls[1].clip_grad is None  # the default for every preset, B3-B5 included: no clipping unless asked
    monkeypatch.undo()
    assert main(["train", "--data", "D", "-o", "O", "--clip-grad", "-0.5"]) == 2
    assert "--clip-grad" in capsys.readouterr().err
