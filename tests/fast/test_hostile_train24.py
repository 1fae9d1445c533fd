"""Hostile checks of the training GEMMs through oneDNN (pvtv2.fast.train) after the weight-gradient change of
2026-11-27 (expanding layers' weight gradients as ``(x.T @ grad).T``, the transposed weight read in place by the
input-gradient product): overlapping weights, second derivatives through the weight gradient, gradient strides of
one-input layers, tied weights, hooks and accumulation. Each is held to float64 F.linear or a closed form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pvtv2 import fast

from conftest import relative_error

pytestmark = pytest.mark.skipif(not fast.fast_path_available(), reason="oneDNN's operators unavailable here")


def _onednn(x, w, b=None):
    with fast.train_gemm("onednn"):
        out = fast.linear(x, w, b)
    assert type(out.grad_fn).__name__ == "OneDnnLinearBackward"
    return out


@pytest.mark.parametrize("cin,cout,strides", [(4, 9, (2, 1)), (9, 4, (3, 1)), (4, 9, (1, 1)), (5, 5, (2, 1))])
def test_overlapping_weight_closed_form(cin, cout, strides):
    """A weight whose rows overlap in memory (``as_strided``): oneDNN has no memory descriptor for it, so the
    input-gradient product must not hand it the transposed view as it is (it raised "could not construct a memory
    descriptor using strides" there, where F.linear trains)."""
    gen = torch.Generator().manual_seed(cin * 10 + cout)
    base = torch.randn(cout * cin, generator=gen, requires_grad=True)
    w = base.as_strided((cout, cin), strides)
    x = torch.randn(6, cin, generator=gen, requires_grad=True)
    g = torch.randn(6, cout, generator=gen)
    _onednn(x, w).backward(g)
    w64, x64, g64 = w.detach().double(), x.detach().double(), g.double()
    assert relative_error(g64 @ w64, x.grad) < 1e-5
    # The base's gradient: each weight element's gradient summed into the base element it reads.
    index = torch.arange(cout * cin).as_strided((cout, cin), strides)
    want_base = torch.zeros(cout * cin, dtype=torch.float64).index_add_(0, index.reshape(-1), (g64.T @ x64).reshape(-1))
    assert relative_error(want_base, base.grad) < 1e-5


@pytest.mark.parametrize("shape,cout,layout", [((6, 4), 9, "contiguous"), ((6, 9), 4, "contiguous"),
                                               ((2, 3, 4), 9, "contiguous"), ((4, 6), 9, "transposed")])
def test_second_derivative_through_the_weight_gradient(shape, cout, layout):
    """d/dx of a function of the weight gradient (``create_graph=True``), as a gradient penalty on the weights
    computes: the weight gradient depends on the input, so the second backward reaches the input through it. It
    lost that term (the input was saved as a copy made without autograd): a silently wrong input gradient."""
    gen = torch.Generator().manual_seed(cout)
    x0 = torch.randn(shape if layout == "contiguous" else shape[::-1], generator=gen)
    x0 = x0 if layout == "contiguous" else x0.t()
    w0 = torch.randn(cout, shape[-1], generator=gen)
    b0 = torch.randn(cout, generator=gen)
    results = {}
    for dtype in (torch.float32, torch.float64):  # float64: F.linear (the path takes float32 only)
        x = x0.detach().to(dtype).requires_grad_(True)
        w = w0.detach().to(dtype).requires_grad_(True)
        b = b0.detach().to(dtype).requires_grad_(True)
        with fast.train_gemm("onednn"):
            out = fast.linear(x, w, b)
            assert (type(out.grad_fn).__name__ == "OneDnnLinearBackward") == (dtype == torch.float32)
            gx, gw = torch.autograd.grad(out.tanh().sum(), (x, w), create_graph=True)
            (gw.square().sum() + gx.square().sum()).backward()
        results[dtype] = (x.grad, w.grad, b.grad)
    for want, got in zip(results[torch.float64], results[torch.float32]):
        assert relative_error(want, got) < 1e-5


def test_second_derivative_closed_form():
    """The same against a closed form: for out = x @ w.T and L = |d(sum(out * c))/dw|^2 = |c.T @ x|^2,
    dL/dx = 2 c (c.T @ x)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 3, generator=gen, requires_grad=True)
    w = torch.randn(8, 3, generator=gen, requires_grad=True)
    c = torch.randn(7, 8, generator=gen)
    (gw,) = torch.autograd.grad((_onednn(x, w) * c).sum(), w, create_graph=True)
    gw.square().sum().backward()
    c64 = c.double()
    assert relative_error(2 * c64 @ (c64.T @ x.detach().double()), x.grad) < 1e-5


@pytest.mark.parametrize("cin,cout", [(1, 9), (1, 1), (9, 1), (1, 300), (4, 9), (9, 4)])
def test_weight_gradient_strides_equal_the_parameters(cin, cout):
    """``param.grad.stride() == param.stride()``, size-one dimensions included, as F.linear gives: DDP compares
    the whole stride tuples with its bucket views' and warns of a slow copy otherwise. A one-input expanding layer
    (``nn.Linear(1, n)``) got strides (1, n) for its (n, 1) weight of strides (1, 1)."""
    gen = torch.Generator().manual_seed(cin + cout)
    layer = nn.Linear(cin, cout)
    x = torch.randn(5, cin, generator=gen, requires_grad=True)
    g = torch.randn(5, cout, generator=gen)
    with fast.train_gemm("onednn"):
        out = fast.module_linear(layer, x)
    assert type(out.grad_fn).__name__ == "OneDnnLinearBackward"
    out.backward(g)
    assert layer.weight.grad.stride() == layer.weight.stride()
    assert relative_error(g.double().T @ x.detach().double(), layer.weight.grad) < 1e-5


def test_tied_weight_used_expanding_and_contracting_closed_form():
    """One weight used as (9, 4) and, transposed, as (4, 9) in the same graph: both orientations of the weight
    gradient add up in one ``.grad``."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(9, 4, generator=gen, requires_grad=True)
    x = torch.randn(6, 4, generator=gen, requires_grad=True)
    y = torch.randn(5, 9, generator=gen, requires_grad=True)
    a, c = _onednn(x, w), _onednn(y, w.t())
    (a.square().sum() + c.square().sum()).backward()
    w64, x64, y64 = w.detach().double(), x.detach().double(), y.detach().double()
    a64, c64 = x64 @ w64.T, y64 @ w64
    assert relative_error((2 * a64).T @ x64 + ((2 * c64).T @ y64).T, w.grad) < 1e-5
    assert relative_error(2 * a64 @ w64, x.grad) < 1e-5
    assert relative_error(2 * c64 @ w64.T, y.grad) < 1e-5


def test_hooks_retained_graph_and_accumulation_into_a_strided_grad():
    """A weight hook sees the gradient and scales it; the graph is run twice (``retain_graph``); the gradient adds
    into an existing ``.grad`` of other strides, in place, as AccumulateGrad does for F.linear."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(9, 4, generator=gen, requires_grad=True)
    x = torch.randn(6, 4, generator=gen)
    seen = []
    w.register_hook(lambda grad: seen.append(grad.clone()) or grad * 2)
    existing = torch.ones(4, 9).t()  # strides (1, 9)
    w.grad = existing
    loss = _onednn(x, w).square().sum()
    loss.backward(retain_graph=True)
    loss.backward()
    want = 2 * (x.double() @ w.detach().double().T).T @ x.double()
    assert len(seen) == 2 and all(relative_error(want, s) < 1e-5 for s in seen)
    assert w.grad is existing and w.grad.stride() == (1, 9)
    assert relative_error(1 + 4 * want, w.grad) < 1e-5


def test_float64_gradcheck_goes_to_f_linear():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, generator=gen, requires_grad=True)
    with fast.train_gemm("onednn"):
        assert type(fast.linear(x, w, b).grad_fn).__name__ == "AddmmBackward0"
        assert torch.autograd.gradcheck(fast.linear, (x, w, b))
        assert torch.autograd.gradgradcheck(fast.linear, (x, w, b))
    assert relative_error(F.linear(x, w, b), x @ w.T + b) < 1e-12
