"""The training GEMMs through oneDNN (pvtv2.fast.train): the same gradients as transformers, taken only where it
applies, and every other case left to F.linear."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import TINY, hf_config, random_weights_, relative_error

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast
from pvtv2.fast import train as train_gemm_mod

pytestmark = pytest.mark.skipif(not fast.fast_path_available(), reason="oneDNN's operators unavailable here")

CONFIGS = {
    "sr": dict(TINY),
    "linear": dict(TINY, linear_attention=True),
    "no_qkv_bias_sr1": dict(TINY, qkv_bias=False, sr_ratios=[1, 1, 1, 1]),
}
# Linear layers of a block that the path takes: query, keys+values (one GEMM), projection, dense1, dense2.
PER_BLOCK = 5


def _pair(kwargs: dict, seed: int = 0):
    config = PvtV2Config(num_labels=5, drop_path_rate=0.0, **kwargs)
    ours = random_weights_(PvtV2ForImageClassification(config), seed=seed)
    theirs = transformers.PvtV2ForImageClassification(hf_config(config))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours.train(), theirs.double().train()


def _nodes(loss: torch.Tensor, name: str = "OneDnnLinearBackward") -> int:
    seen, todo, count = set(), [loss.grad_fn], 0
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == name
        todo.extend(n for n, _ in node.next_functions)
    return count


def _grads(model, x, labels, choice):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with fast.train_gemm(choice):
        loss = model(x, labels=labels).loss
        nodes = _nodes(loss)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), x.grad, grads, nodes


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradients_equal_transformers_and_the_aten_path(name):
    ours, theirs = _pair(CONFIGS[name], seed=len(name))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, 48, generator=gen)
    labels = torch.tensor([4, 1])
    x64 = x.double().requires_grad_(True)
    theirs(x64, labels=labels).loss.backward()
    reference = dict(theirs.named_parameters())

    loss_d, gx_d, grads_d, nodes_d = _grads(ours, x, labels, "onednn")
    loss_a, gx_a, grads_a, nodes_a = _grads(ours, x, labels, "aten")
    blocks = sum(ours.config.depths)
    assert nodes_d == PER_BLOCK * blocks and nodes_a == 0
    assert relative_error(loss_a, loss_d) < 1e-6
    assert relative_error(x64.grad, gx_d) < 1e-4
    assert set(grads_d) == set(grads_a) == set(reference)
    worst_d = worst_a = 0.0
    for pname, want in reference.items():
        if pname.endswith("attention.key.bias"):  # softmax ignores a shift shared by all keys: rounding noise
            continue
        worst_d = max(worst_d, relative_error(want.grad, grads_d[pname]))
        worst_a = max(worst_a, relative_error(want.grad, grads_a[pname]))
    # fp32 against float64: oneDNN's rounding is of the size of ATen's own.
    assert worst_d < 1e-4 and worst_d < 10 * max(worst_a, 1e-6), (worst_d, worst_a)


def test_auto_follows_the_cpu_and_the_switches():
    ours, _ = _pair(CONFIGS["sr"])
    x = torch.randn(1, 3, 32, 32)
    blocks = sum(ours.config.depths)
    expected = PER_BLOCK * blocks if train_gemm_mod._amd_avx512() else 0
    with fast.train_gemm("auto"):
        assert _nodes(ours(x).logits.sum()) == expected
    with fast.train_gemm("onednn"):
        with fast.fast_path(False):  # the fast path switched off: the reference everywhere
            assert _nodes(ours(x).logits.sum()) == 0
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's F.linear already calls oneDNN
            assert _nodes(ours(x).logits.sum()) == 0
        assert _nodes(ours.double()(x.double()).logits.sum()) == 0  # float64: ATen
        ours.float()
        with torch.no_grad():
            assert ours(x).logits.grad_fn is None
        for p in ours.parameters():  # nothing needs a gradient: no graph at all
            p.requires_grad_(False)
        assert ours(x).logits.grad_fn is None
        assert _nodes(ours(x.requires_grad_(True)).logits.sum()) == PER_BLOCK * blocks  # the input's gradient
    with pytest.raises(ValueError, match="bogus"):
        with fast.train_gemm("bogus"):
            pass


def _close(want: dict, got: dict, tol: float) -> None:
    """Every gradient within ``tol`` of the largest one: a gradient that is itself rounding noise (attention near
    saturation) is held to the scale of the others."""
    scale = max(g.abs().max().item() for g in want.values())
    for name, g in want.items():
        assert (g - got[name]).abs().max().item() < tol * scale, name


def test_partly_frozen_model_and_a_hooked_layer_give_the_aten_gradients():
    ours, _ = _pair(CONFIGS["sr"], seed=3)
    for name, p in ours.named_parameters():
        if "encoder.layers.0." in name:  # first stage frozen, as in fine-tuning
            p.requires_grad_(False)
    seen = []
    ours.pvt_v2.encoder.layers[1].blocks[0].mlp.dense1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 3, 40, 56)
    labels = torch.tensor([0, 3])
    _, _, grads_d, nodes_d = _grads(ours, x, labels, "onednn")
    _, _, grads_a, _ = _grads(ours, x, labels, "aten")
    assert len(seen) == 2  # the hooked module was called, both times
    assert nodes_d == PER_BLOCK * sum(ours.config.depths) - 1
    assert set(grads_d) == set(grads_a) and not any("encoder.layers.0." in n for n in grads_d)
    _close(grads_a, grads_d, 1e-5)


def test_double_backward():
    # (The whole model has no double backward on the CPU: SDPA's backward has no derivative. The linear layer has.)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 24, generator=gen)
    layer = torch.nn.Linear(24, 40)
    results = {}
    for choice in ("aten", "onednn"):
        xi = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        with fast.train_gemm(choice):
            out = fast.module_linear(layer, xi)
            assert (type(out.grad_fn).__name__ == "OneDnnLinearBackward") == (choice == "onednn")
            (gx,) = torch.autograd.grad(out.tanh().square().sum(), xi, create_graph=True)
            penalty = gx.square().sum()
            penalty.backward()
        results[choice] = (penalty.detach(), layer.weight.grad.clone(), layer.bias.grad.clone(), xi.grad.clone())
    for want, got in zip(results["aten"], results["onednn"]):
        assert relative_error(want, got) < 1e-5


def test_gradient_checkpointing():
    ours, _ = _pair(CONFIGS["linear"], seed=5)
    plain = copy.deepcopy(ours)
    ours.gradient_checkpointing_enable()
    x = torch.randn(1, 3, 32, 32)
    labels = torch.tensor([2])
    _, _, grads_c, nodes_c = _grads(ours, x, labels, "onednn")
    _, _, grads_p, _ = _grads(plain, x, labels, "aten")
    assert nodes_c == PER_BLOCK * sum(ours.config.depths)
    _close(grads_p, grads_c, 1e-5)


def test_weights_are_read_at_every_call():
    ours, _ = _pair(CONFIGS["sr"], seed=7)
    x = torch.randn(1, 3, 32, 32)
    opt = torch.optim.SGD(ours.parameters(), lr=0.5)
    with fast.train_gemm("onednn"):
        for _ in range(2):  # optimizer steps between calls change every weight in place
            opt.zero_grad()
            ours(x).logits.square().mean().backward()
            opt.step()
        got = ours(x).logits
    with fast.train_gemm("aten"):
        want = ours(x).logits
    assert relative_error(want, got) < 1e-5


@pytest.mark.parametrize("rows,cin,cout", [(53, 8, 40), (53, 40, 8), (53, 16, 16), (3, 5, 130), (130, 1, 2), (600, 8, 40), (520, 1, 2)])
@pytest.mark.parametrize("weight_layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("flip_min_rows", [0, 10**9, None])
def test_weight_gradient_both_orientations_closed_form(rows, cin, cout, weight_layout, flip_min_rows, monkeypatch):
    """The weight gradient is computed as grad.T @ x or, for an expanding layer with many rows, as (x.T @ grad).T:
    both equal the float64 product, land in ``.grad`` in the weight's own layout (as F.linear's do), and accumulate.
    Each orientation is forced for every shape (``FLIP_MIN_ROWS``), and the default threshold is run as it is."""
    if flip_min_rows is not None:
        monkeypatch.setattr(fast.train, "FLIP_MIN_ROWS", flip_min_rows)
    gen = torch.Generator().manual_seed(rows + cin * 7 + cout)
    x = torch.randn(2, rows, cin, generator=gen, requires_grad=True)
    if weight_layout == "transposed":
        w = torch.randn(cin, cout, generator=gen).t().requires_grad_(True)  # a (cout, cin) view with strides (1, cout)
    else:
        w = torch.randn(cout, cin, generator=gen, requires_grad=True)
    b = torch.randn(cout, generator=gen, requires_grad=True)
    g = torch.randn(2, rows, cout, generator=gen)
    with fast.train_gemm("onednn"):
        out = fast.linear(x, w, b)
        assert type(out.grad_fn).__name__ == "OneDnnLinearBackward"
        out.backward(g)
        first = w.grad.clone()
        fast.linear(x, w, b).backward(2 * g)
    x64, g64 = x.detach().double().reshape(-1, cin), g.double().reshape(-1, cout)
    want_w = g64.T @ x64
    def strides(t):  # a size-1 dimension's stride means nothing
        return [s for s, n in zip(t.stride(), t.shape) if n > 1]

    assert first.shape == (cout, cin) and strides(first) == strides(w)
    assert relative_error(want_w, first) < 1e-5
    assert relative_error(3 * want_w, w.grad) < 1e-5
    assert relative_error(3 * (g64 @ w.detach().double()), x.grad.reshape(-1, cin)) < 1e-5
    assert relative_error(3 * g64.sum(0), b.grad) < 1e-5


def test_bad_environment_value_is_named():
    env = dict(os.environ, PVTV2_TRAIN_GEMM="fastest")
    out = subprocess.run([sys.executable, "-c", "import pvtv2"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "PVTV2_TRAIN_GEMM='fastest'" in out.stderr
    env["PVTV2_TRAIN_GEMM"] = "ATEN"
    out = subprocess.run([sys.executable, "-c", "import pvtv2.fast.train as t; print(t.uses_onednn())"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "False"


def test_cpu_autocast_training_attention_as_transformers_computes_it(monkeypatch):
    """Under bf16 autocast on the CPU the reference attention is softmax(QK^T)V (as transformers' eager attention),
    not SDPA, whose bf16 CPU kernels are slower: gradients as close to the fp32 ones as transformers' own."""
    from pvtv2.models import layers

    ours, theirs = _pair(CONFIGS["sr"], seed=9)
    theirs.float()
    x = torch.randn(2, 3, 48, 64)
    labels = torch.tensor([1, 3])
    theirs(x, labels=labels).loss.backward()
    exact = {n: p.grad.clone() for n, p in theirs.named_parameters()}
    theirs.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs(x, labels=labels).loss.backward()
    hf_low = {n: p.grad.clone() for n, p in theirs.named_parameters()}

    def run(model):
        model.zero_grad(set_to_none=True)
        calls = []
        with mock.patch.object(layers.F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention) as sdpa:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(x, labels=labels).loss.backward()
            calls = sdpa.call_count
        return {n: p.grad.clone() for n, p in model.named_parameters()}, calls

    low, sdpa_calls = run(ours)
    assert sdpa_calls == 0
    scale = max(g.abs().max().item() for g in exact.values())
    worst_ours = max((exact[n] - g).abs().max().item() for n, g in low.items()) / scale
    worst_hf = max((exact[n] - g).abs().max().item() for n, g in hf_low.items()) / scale
    assert worst_ours < 2 * worst_hf + 1e-3, (worst_ours, worst_hf)

    monkeypatch.setattr(layers, "EXPLICIT_ATTENTION_BYTES", 0)  # probabilities too large: SDPA
    low_sdpa, sdpa_calls = run(ours)
    assert sdpa_calls == sum(ours.config.depths)
    worst_sdpa = max((exact[n] - g).abs().max().item() for n, g in low_sdpa.items()) / scale
    assert worst_sdpa < 2 * worst_hf + 1e-3
