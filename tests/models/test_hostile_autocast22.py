"""Hostile checks of the reference attention under CPU autocast, computed as softmax(QK^T * scale) V (what
transformers' eager attention computes) where the probabilities are small, SDPA elsewhere: training with attention
dropout, attention maps, nested autocast regions, the size threshold and the dense models. Each is held to
transformers' numbers under the same autocast (same seed where dropout draws), or to float64."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pvtv2 import PvtV2Config, PvtV2ForImageClassification
from pvtv2.models import layers
from pvtv2.models.depth import PvtV2ForDepthEstimation
from pvtv2.models.segmentation import PvtV2ForSemanticSegmentation

from conftest import TINY, TINY_SHALLOW, hf_twin as _hf, random_weights_, relative_error


def _model(seed: int = 1, **changes) -> PvtV2ForImageClassification:
    config = PvtV2Config(**{**TINY, "num_labels": 5, "drop_path_rate": 0.0, **changes})
    return random_weights_(PvtV2ForImageClassification(config), seed=seed)


def _input(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 48, 64, generator=torch.Generator().manual_seed(0))


def _autocast(dtype: torch.dtype | None):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_training_attention_maps_are_transformers_after_dropout(dtype):
    """With attention dropout in training, transformers returns the probabilities the values were weighted with
    (after dropout); the maps returned here were the ones before it."""
    ours = _model(attention_probs_dropout_prob=0.3).train()
    theirs = _hf(ours)
    x = _input()
    with _autocast(dtype):
        torch.manual_seed(5)
        got = ours(x, output_attentions=True)
        torch.manual_seed(5)
        want = theirs(x, output_attentions=True)
    maps = [a for stage in want.attentions for a in stage]  # per stage, per block
    ours_maps = [a for stage in got.attentions for a in stage]
    assert len(ours_maps) == len(maps) == sum(TINY["depths"])
    for w, g in zip(maps, ours_maps):
        assert (w == 0).any()  # dropout did draw
        assert relative_error(w, g) < 1e-6
    assert relative_error(want.logits, got.logits) < 1e-6


@pytest.mark.parametrize("linear", [False, True], ids=["sra", "linear"])
def test_autocast_training_with_attention_dropout_draws_as_transformers(linear):
    """Under bf16 autocast the attention (and its dropout mask) is transformers' eager computation: the same seed
    gives the same logits; in eval the dropout is off (the same logits for any seed)."""
    ours = _model(attention_probs_dropout_prob=0.3, linear_attention=linear).train()
    theirs = _hf(ours)
    x = _input()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(7)
        got = ours(x).logits
        torch.manual_seed(7)
        want = theirs(x).logits
        torch.manual_seed(8)
        other = ours(x).logits
        ours.eval()
        theirs.eval()
        torch.manual_seed(9)
        evaluated = ours(x).logits
        torch.manual_seed(10)
        assert relative_error(theirs(x).logits, evaluated) < 1e-6
    assert relative_error(want, got) < 1e-6
    assert relative_error(got, other) > 1e-2  # the draw matters: the comparison above is not vacuous


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_gradients_as_accurate_as_transformers(dtype):
    """Loss and every gradient under autocast, against float64: no further off than transformers' own."""
    ours = _model(seed=3).train()
    reference = _hf(ours).double()
    theirs = _hf(ours)
    x, labels = _input(), torch.tensor([1, 4])
    reference(x.double(), labels=labels).loss.backward()
    with torch.autocast("cpu", dtype=dtype):
        loss = ours(x, labels=labels).loss
        their_loss = theirs(x, labels=labels).loss
    loss.backward()
    their_loss.backward()
    want, theirs_p = dict(reference.named_parameters()), dict(theirs.named_parameters())
    scale = max(p.grad.abs().max().item() for p in want.values())
    ours_err = max((want[n].grad - p.grad.double()).abs().max().item() for n, p in ours.named_parameters()) / scale
    their_err = max((want[n].grad - theirs_p[n].grad.double()).abs().max().item() for n in want) / scale
    assert ours_err < 2 * their_err + 1e-3, (ours_err, their_err)


def _sdpa_spy(monkeypatch) -> list[torch.dtype]:
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        calls.append(q.dtype)
        return real(q, *args, **kwargs)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", spy)
    return calls


def test_probabilities_over_the_threshold_go_to_sdpa(monkeypatch):
    """Over EXPLICIT_ATTENTION_BYTES the attention runs as SDPA (bf16), still close to transformers."""
    ours = _model(seed=4).train()
    theirs = _hf(ours)
    x = _input()
    calls = _sdpa_spy(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        small = ours(x).logits
        assert calls == []  # the tiny model's probabilities are all small: explicit attention
        monkeypatch.setattr(layers, "EXPLICIT_ATTENTION_BYTES", 0)
        large = ours(x).logits
        want = theirs(x).logits
    assert calls == [torch.bfloat16] * sum(TINY["depths"])
    with torch.no_grad():
        reference = theirs.double()(x.double()).logits
    assert relative_error(want, small) < 1e-6
    assert relative_error(reference, large) < 4 * relative_error(reference, want) + 1e-3


def test_disabled_region_inside_autocast_runs_fp32_sdpa(monkeypatch):
    """Autocast switched off inside an autocast region: fp32 attention (SDPA, where the probabilities would pass
    EXPLICIT_ATTENTION_BYTES; below it CPU training computes them explicitly, and no SDPA call is made)."""
    monkeypatch.setattr(layers, "EXPLICIT_ATTENTION_BYTES", 0)
    ours = _model(seed=5).train()
    theirs = _hf(ours)
    x = _input()
    calls = _sdpa_spy(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            got = ours(x).logits
    assert got.dtype == torch.float32
    assert calls == [torch.float32] * sum(TINY["depths"])
    assert relative_error(theirs(x).logits, got) < 1e-5


@pytest.mark.parametrize("kind", ["segformer", "fpn", "depth"])
def test_dense_models_train_under_autocast(kind):
    """The dense heads under bf16 autocast with attention dropout: finite loss and gradients, the loss near fp32's."""
    torch.manual_seed(0)
    config = PvtV2Config(**TINY_SHALLOW, num_labels=3)
    if kind == "depth":
        model = PvtV2ForDepthEstimation(config)
        labels = torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(1)) + 0.5
    else:
        model = PvtV2ForSemanticSegmentation(config, head=kind)
        labels = torch.randint(0, 3, (2, 64, 64), generator=torch.Generator().manual_seed(1))
    model.eval()  # no dropout: the fp32 and bf16 losses are comparable
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    fp32 = model(x, labels=labels).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - fp32.item()) < 0.02 * abs(fp32.item())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_declared_torch_floor_has_the_autocast_api_the_models_call():
    """Every CPU attention call (training included), the fast paths and the input check call
    ``torch.is_autocast_enabled(device_type)`` and ``torch.get_autocast_dtype(device_type)``, which came with
    PyTorch 2.4: before, ``is_autocast_enabled()`` took no argument, so every forward pass on a declared-supported
    torch 2.1-2.3 raised a TypeError."""
    root = Path(__file__).resolve().parents[2]
    calls = re.findall(r"torch\.(?:is_autocast_enabled|get_autocast_dtype)\((?!\))", "".join(
        path.read_text() for path in (root / "src" / "pvtv2").rglob("*.py")
    ))
    assert calls  # the code does use the device-argument form
    floor = re.search(r'"torch>=([0-9]+)\.([0-9]+)', (root / "pyproject.toml").read_text())
    assert floor is not None and (int(floor.group(1)), int(floor.group(2))) >= (2, 4), floor
