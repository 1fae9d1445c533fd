"""Training on the CPU: the blocks' linear layers through oneDNN where its GEMMs beat ATen's.

``F.linear`` on a CPU runs its matrix products (forward, and both products of the backward pass) through ATen,
which calls MKL. On AMD CPUs MKL runs its AVX2 code even where the CPU has AVX-512: measured on a 2-core AMD EPYC
(Zen 5, AVX-512) in docs/benchmarks.md, MKL's fp32 GEMM peaks at about 100 GFLOP/s per core and oneDNN's at 235, and
the GEMMs were two thirds of a B2 training step. There, the linear layers of the blocks (queries, keys and values,
output projection, the Mix-FFN's two layers) run as :class:`OneDnnLinear`: the same three products, each through
oneDNN (``torch.ops.mkldnn._linear_pointwise``, which also serves the fast inference path).

**Same numbers.** fp32 in, fp32 out, fp32 accumulation, as ATen's; only the summation order differs (relative
differences around 1e-7, as between any two GEMM libraries). The function reads the weights it is given at every
call and keeps nothing, so nothing about a model's state, copying or saving changes. Double backward
(``create_graph=True``) runs the backward products through differentiable ATen ops.

**When.** :func:`linear` uses oneDNN only where all of these hold; everything else is ``F.linear``:

- the choice (:func:`train_gemm`, or ``PVTV2_TRAIN_GEMM=auto|onednn|aten`` for a whole program) is ``onednn``, or
  ``auto`` (the default) on an AMD CPU with AVX-512, the case measured;
- autograd records (``torch.is_grad_enabled()`` and a tensor that needs a gradient: inference has its own path);
- fp32 tensors on the CPU, without autocast (under bf16 autocast ``F.linear`` already calls oneDNN), outside
  ``torch.compile``, ``torch.jit.trace``, torch.func transforms and forward-mode AD, with the fast path switched on
  (:func:`pvtv2.fast.fast_path`) and oneDNN's operators passing the capability probe
  (:func:`pvtv2.fast.fast_path_available`);
- dense (strided) tensors of PyTorch's own types (a tensor subclass, such as a quantized weight, defines its own
  ``F.linear``), of shapes ``F.linear`` accepts with a 2-D weight of at least one output feature.

Non-contiguous operands (strided biases, transposed weights, overlapping inputs) are made dense before oneDNN reads
them. Modules are used through :func:`module_linear`, which calls the module itself unless it is exactly an
``nn.Linear`` without forward or backward hooks (:func:`pvtv2.fast.plain_modules`), so adapters, hooks and quantized
layers keep working.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from .cpu import PLAIN_TENSOR_TYPES, fast_path_available, fast_path_enabled, forward_ad_active, plain_modules

__all__ = ["TRAIN_GEMM_ENV", "CHOICES", "OneDnnLinear", "linear", "module_linear", "train_gemm", "uses_onednn"]

TRAIN_GEMM_ENV = "PVTV2_TRAIN_GEMM"
# Rows (tokens in the batch) from which an expanding layer's weight gradient is computed transposed (_weight_grad).
FLIP_MIN_ROWS = 1024
CHOICES = ("auto", "onednn", "aten")


def _from_env() -> str:
    value = os.environ.get(TRAIN_GEMM_ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{TRAIN_GEMM_ENV}={value!r}: expected one of {', '.join(CHOICES)}")
    return value


_CHOICE: ContextVar[str] = ContextVar("pvtv2_train_gemm", default=_from_env())


@contextlib.contextmanager
def train_gemm(choice: str) -> Iterator[None]:
    """Within the block (this thread only), run the training GEMMs of the blocks' linear layers through ``choice``:
    ``"onednn"``, ``"aten"`` (``F.linear``), or ``"auto"`` (oneDNN on AMD CPUs with AVX-512)."""
    if choice not in CHOICES:
        raise ValueError(f"train_gemm: {choice!r} is not one of {', '.join(CHOICES)}")
    token = _CHOICE.set(choice)
    try:
        yield
    finally:
        _CHOICE.reset(token)


@functools.lru_cache(maxsize=1)
def _amd_avx512() -> bool:
    """An AMD CPU on which PyTorch runs AVX-512 code: where MKL's AVX2 GEMMs lose to oneDNN's (measured)."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") and "AuthenticAMD" in line for line in f)
    except OSError:
        return False


def uses_onednn() -> bool:
    """Whether training GEMMs of fp32 CPU tensors go through oneDNN here (the choice, and the probe)."""
    choice = _CHOICE.get()
    if choice == "aten" or not fast_path_enabled() or (choice == "auto" and not _amd_avx512()):
        return False
    return fast_path_available(torch.float32)


def _mm_weight_t(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``grad @ weight`` through oneDNN, which computes ``input @ w.T`` for a (N, K) ``w`` (the transposed view of a
    contiguous or transposed weight is read in place: oneDNN reorders an unpacked weight anyway, and a copy first
    was 5-25% slower). Any other layout is copied: oneDNN has no memory descriptor for rows overlapping in memory
    (``as_strided``), and raises."""
    weight_t = weight.t()
    if not (weight.is_contiguous() or weight_t.is_contiguous()):
        weight_t = weight_t.contiguous()
    return torch.ops.mkldnn._linear_pointwise(grad, weight_t, None, "none", [], "")


def _weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad.T @ x``, (out, rows) @ (rows, in), through oneDNN, which reads the transposed views in place.

    oneDNN's inner product runs these long-K products well when its output has at least as many columns as rows
    and badly the other way round: for an expanding layer (out > in) it computes ``x.T @ grad`` and the result is
    transposed. Measured for B0's first Mix-FFN (rows 50,176, 32 -> 256, AMD EPYC Zen 5, one thread): 36 ms one way,
    7.4 ms the other, and the same ratio mirrored for the contracting layer (docs/benchmarks.md). The transposed
    result's copy into the weight's layout costs as much as the product saves near 1,024 rows, and up to four times
    the product below 64 (512 -> 2048: 0.15 against 0.68 ms at one row), so few rows keep the direct product
    (:data:`FLIP_MIN_ROWS`: small images, the last stages at batch 1-16)."""
    if grad.shape[1] > x.shape[1] and grad.shape[0] >= FLIP_MIN_ROWS:
        # A contiguous_format copy, not .contiguous(): with one input feature the transposed (out, 1) result counts
        # as contiguous with strides (1, out), and the gradient would keep them, where the parameter's (and DDP's
        # bucket views', which compare every stride) are (1, 1).
        flipped = torch.ops.mkldnn._linear_pointwise(x.t(), grad.t(), None, "none", [], "")
        return flipped.t().clone(memory_format=torch.contiguous_format)
    return torch.ops.mkldnn._linear_pointwise(grad.t(), x.t(), None, "none", [], "")


class OneDnnLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` with its forward and backward GEMMs run by oneDNN (fp32, CPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # Dense operands for oneDNN: rows overlapping in memory (as_strided) have no oneDNN memory descriptor. The
        # blocks' inputs are contiguous already, so this copies nothing there.
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        # oneDNN reads the bias as a dense vector whatever its strides (a strided one gave other memory's values).
        bias = None if bias is None else bias.contiguous()
        out = torch.ops.mkldnn._linear_pointwise(x2d, weight.contiguous(), bias, "none", [], "")
        # The input itself, not x2d: x2d is made here without autograd, so a second backward (create_graph=True)
        # through the weight gradient, which depends on the input, would not reach the input (a wrong gradient).
        # (As F.linear, which keeps its input too; the blocks' inputs are contiguous and x2d is a view of them.)
        ctx.save_for_backward(x, weight)
        ctx.input_shape = x.shape
        ctx.has_bias = bias is not None
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        x2d = x.reshape(-1, x.shape[-1])  # differentiable under create_graph=True
        g2d = grad.reshape(-1, grad.shape[-1]).contiguous()
        grad_x = grad_w = grad_b = None
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops, so a second backward works
            if ctx.needs_input_grad[0]:
                grad_x = (g2d @ weight).view(ctx.input_shape)
            if ctx.needs_input_grad[1]:
                grad_w = g2d.t() @ x2d
        else:
            if ctx.needs_input_grad[0]:
                grad_x = _mm_weight_t(g2d, weight).view(ctx.input_shape)
            if ctx.needs_input_grad[1]:
                grad_w = _weight_grad(g2d, x2d.contiguous())  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2d.sum(0)
        return grad_x, grad_w, grad_b


def _plain_tensor(t: torch.Tensor) -> bool:
    """A dense CPU tensor whose operators are PyTorch's own. A subclass (a quantized or fake-quantized weight kept in
    a plain nn.Linear, as tensor-subclass quantization does) defines what F.linear means for it: F.linear it gets."""
    return type(t) in PLAIN_TENSOR_TYPES and t.layout == torch.strided and t.device.type == "cpu"


def _applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        torch.is_grad_enabled()
        # Before the choice: torch.compile cannot trace the CPU capability look-up, nor (PyTorch 2.11) the choice's
        # ContextVar: a graph break at every linear layer.
        and not torch.compiler.is_compiling()
        and uses_onednn()  # then: where oneDNN is not chosen, F.linear's callers pay for one look-up only
        and _plain_tensor(x)
        and _plain_tensor(weight)
        and (bias is None or _plain_tensor(bias))
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        # Shapes F.linear takes and oneDNN's inner product does not, or refuses without naming the problem: left
        # to F.linear (a 1-D weight, no output features, mismatched sizes, with its own error messages).
        and x.dim() >= 1
        and weight.dim() == 2
        and weight.shape[0] > 0
        and x.shape[-1] == weight.shape[1]
        and (bias is None or bias.shape == weight.shape[:1])
        and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and not torch.jit.is_tracing()  # the tracer cannot record oneDNN's call (and traces with autograd on)
        and not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in (x, weight))
        and not forward_ad_active()  # OneDnnLinear has no tangent rule
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; while training on a CPU where oneDNN is chosen, through :class:`OneDnnLinear`."""
    if _applies(x, weight, bias):
        return OneDnnLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def module_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; for exactly an ``nn.Linear`` without hooks, :func:`linear` with its weights. Under
    ``torch.jit.trace`` the module itself, with autograd on or off: the trace's check reruns the model under
    ``no_grad``, and the weights read here (in the caller's scope) made another graph than the module's own forward
    (the trace was refused as differing across invocations)."""
    if torch.is_grad_enabled() and not torch.jit.is_tracing() and plain_modules(nn.Linear, module):
        return linear(x, module.weight, module.bias)
    return module(x)
