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
- fp32 tensors on the CPU, without autocast (under bf16 autocast ``F.linear`` already calls oneDNN; there
  :class:`Bf16Linear` and the pieces in the comment above it run, on the same conditions otherwise), outside
  ``torch.compile``, ``torch.jit.trace``, torch.func transforms and forward-mode AD, with the fast path switched on
  (:func:`pvtv2.fast.fast_path`), oneDNN switched on (``torch.backends.mkldnn.enabled``) and its operators passing
  the capability probe (:func:`pvtv2.fast.fast_path_available`);
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

from .cpu import (
    PLAIN_TENSOR_TYPES, fusable_dwconv, fast_path, fast_path_available, fast_path_enabled, forward_ad_active,
    aten_convolves, plain_modules,
)

__all__ = [
    "TRAIN_GEMM_ENV", "CHOICES", "Bf16DepthwiseConv", "Bf16Linear", "OneDnnLinear", "bf16_autocast_training",
    "depthwise_conv", "forward_choices", "linear", "module_linear", "patch_conv", "train_gemm", "uses_onednn",
]

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


def forward_choices() -> contextlib.AbstractContextManager:
    """A context that re-enters this thread's fast-path switch and training-GEMM choice as they are now. Gradient
    checkpointing recomputes a block during the backward pass, which may run outside the ``fast.fast_path(False)`` or
    :func:`train_gemm` block its forward ran in: the recomputation must take the same path (under bf16 autocast the
    pieces save other tensors than the reference operators, and torch.utils.checkpoint refused the difference)."""
    return _reenter(fast_path_enabled(), _CHOICE.get())


@contextlib.contextmanager
def _reenter(enabled: bool, choice: str) -> Iterator[None]:
    with fast_path(enabled), train_gemm(choice):
        yield


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
    """``F.linear(x, weight, bias)``; while training on a CPU where oneDNN is chosen, through :class:`OneDnnLinear`
    (fp32) or :class:`Bf16Linear` (under bf16 autocast)."""
    if _applies(x, weight, bias):
        return OneDnnLinear.apply(x, weight, bias)
    if (
        _bf16_applies(x, weight, bias)
        and weight.dim() == 2
        and weight.shape[0] > 0
        and x.dim() >= 1
        and x.shape[-1] == weight.shape[1]
    ):
        if bias is not None and bias.shape != weight.shape[:1]:
            return F.linear(x, weight, bias)  # F.linear's own error message
        return Bf16Linear.apply(*_bf16(x, weight, bias))
    return F.linear(x, weight, bias)


# ------------------------------------------------------------------------------------- training under bf16 autocast
# Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` every implementation's linear layers and convolutions run
# oneDNN's bf16 kernels already. These passes were measured slower than the same products written another way (AMD
# EPYC Zen 5, AVX512-BF16, one thread, batch 16; docs/benchmarks.md):
#
# - the weight gradient of an expanding linear layer over many rows, ``grad.T @ x`` with a long K: computed as
#   ``[x, 1].T @ grad``, which also yields the bias gradient (the ones column) in the same GEMM instead of a separate
#   pass over the gradient (B2's first dense1, 50,176 rows, 64 -> 512: 21.7 ms against 12.0 with the bias);
# - the input gradient of the Mix-FFN's 3x3 depthwise convolution: the forward convolution with the kernel flipped,
#   which oneDNN runs twice as fast as its backward-data kernel (B2 stage 1: 15.4 against 6.3 ms);
# - the forward product over many rows: oneDNN's inner product rather than F.linear's addmm (see Bf16Linear);
# - the spatial-reduction convolution (kernel = stride, no padding): a linear layer over the non-overlapping patches,
#   gathered by one copy (which also casts an fp32 input; forward and backward 11.5 -> 7.3 ms for B2's stage 1, 8x8
#   patches of 64 channels).
#
# Same numbers: the same bf16 operands (cast from the same fp32 tensors by the same differentiable casts as autocast's,
# so the fp32 parameters receive their gradients through the same casts), fp32 accumulation, one bf16 rounding of
# each result; only the summation order differs. Where the conditions below fail, the reference operators run.


def bf16_autocast_training() -> bool:
    """Whether the bf16-autocast training pieces run here: autograd recording under CPU autocast to bf16, eager (not
    compiled, traced, or under forward-mode AD), the fast path on, the choice ``onednn`` or ``auto`` on an AMD CPU with
    AVX-512 (the case measured), and oneDNN's bf16 operators passing the capability probe."""
    if not (
        torch.is_grad_enabled()
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not forward_ad_active()
        and torch._C._functorch.peek_interpreter_stack() is None  # torch.func's vmap batches no oneDNN call
    ):
        return False
    choice = _CHOICE.get()
    if choice == "aten" or not fast_path_enabled() or (choice == "auto" and not _amd_avx512()):
        return False
    return fast_path_available(torch.bfloat16)


def _bf16_operand(t: torch.Tensor | None) -> bool:
    # fp32 (what autocast casts) or bf16 (what it leaves); float64 autocast leaves alone, so the reference runs.
    return t is None or (
        _plain_tensor(t)
        and t.dtype in (torch.float32, torch.bfloat16)
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
    )


def _bf16_applies(*tensors: torch.Tensor | None) -> bool:
    return (
        bf16_autocast_training()
        and all(_bf16_operand(t) for t in tensors)
        and any(t is not None and t.requires_grad for t in tensors)
        and tensors[0].numel() > 0
    )


def _bf16(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The operands as autocast casts them: differentiable casts, so the gradients reach fp32 tensors in fp32."""
    return [None if t is None else t.to(torch.bfloat16) for t in tensors]


class Bf16Linear(torch.autograd.Function):
    """``F.linear`` of bf16 operands (as under bf16 autocast); over many rows (:data:`FLIP_MIN_ROWS`) its product
    through oneDNN's inner product, and an expanding layer's weight and bias gradients as one GEMM
    ``[x, 1].T @ grad``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if x.numel() < FLIP_MIN_ROWS * x.shape[-1]:
            return F.linear(x, weight, bias)  # the reference's own kernel: the same output, bit for bit
        # Many rows: oneDNN's inner product, as the fp32 path. F.linear's addmm writes the broadcast bias into the
        # whole output before its matrix product adds to it (one more pass over the output): B2's stage-1 dense1
        # ran at 335 GFLOP/s that way, 446 this way (AMD EPYC Zen 5, one thread; 2-3% of a whole step).
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        bias = None if bias is None else bias.contiguous()
        out = torch.ops.mkldnn._linear_pointwise(x2d, weight.contiguous(), bias, "none", [], "")
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        g2d = grad.reshape(-1, grad.shape[-1])
        x2d = x.reshape(-1, x.shape[-1])
        need_x, need_w, need_b = ctx.needs_input_grad
        need_b = need_b and ctx.has_bias
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = (g2d @ weight).view(x.shape)
        if need_w and g2d.shape[1] > x2d.shape[1] and g2d.shape[0] >= FLIP_MIN_ROWS:
            if need_b:
                x2d = torch.cat([x2d, x2d.new_ones(x2d.shape[0], 1)], 1)
            flipped = x2d.t() @ g2d  # (in [+ 1], out)
            # contiguous_format, as in _weight_grad: the parameter's strides (DDP's bucket views compare them).
            grad_w = flipped[: x.shape[-1]].t().clone(memory_format=torch.contiguous_format)
            if need_b:
                grad_b = flipped[-1]
        else:
            if need_w:
                grad_w = g2d.t() @ x2d
            if need_b:
                grad_b = g2d.sum(0)
        return grad_x, grad_w, grad_b


class Bf16DepthwiseConv(torch.autograd.Function):
    """A 3x3 depthwise convolution (stride 1, padding 1) of bf16 operands, its input gradient as the forward
    convolution of the gradient with the flipped kernel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, 1, 1, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        channels = weight.shape[0]
        grad = grad.contiguous(memory_format=torch.channels_last)
        need_x, need_w, need_b = ctx.needs_input_grad
        need_b = need_b and ctx.has_bias
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = F.conv2d(grad, weight.flip(-2, -1), None, 1, 1, 1, channels)
        if need_w or need_b:
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad, x, weight, [channels] if ctx.has_bias else None, [1, 1], [1, 1], [1, 1], False, [0, 0],
                channels, [False, need_w, need_b],
            )
        return grad_x, grad_w, grad_b


def depthwise_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for the Mix-FFN's depthwise convolution; under bf16 autocast in training, with the input gradient of
    :class:`Bf16DepthwiseConv`, where ``conv`` is exactly a 3x3 depthwise ``nn.Conv2d`` without hooks (stride 1,
    padding 1, zero padding) and ``x`` a channels-last (B, C, H, W) image."""
    if (
        x.dim() == 4
        and _bf16_applies(x, conv.weight, conv.bias)
        and plain_modules(nn.Conv2d, conv)
        and fusable_dwconv(conv, x.shape[1])  # the fused inference path's test of the same convolution
        and conv.padding_mode == "zeros"
        and conv.weight.shape == (x.shape[1], 1, 3, 3)
    ):
        xb, wb, bb = _bf16(x, conv.weight, conv.bias)
        return Bf16DepthwiseConv.apply(xb.contiguous(memory_format=torch.channels_last), wb, bb)
    # Where ATen's own kernel convolves (weights in float16 / float64 / bf16 without oneDNN's kernels for them; under
    # autocast the Mix-FFN takes transformers' view instead), contiguous: it runs a grouped convolution group by
    # group and gathered each channel of a channels-last image element by element, 3-6x slower (float16 B0 batch 1:
    # a 56x56x256 convolution 36 -> 6 ms, AMD EPYC Zen 5, one thread).
    return conv(x.contiguous() if aten_convolves(x) else x)


def patch_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The spatial reduction of (B, H, W, C) tokens ``x`` by ``conv`` as a linear layer over its non-overlapping
    patches, (B, H/r * W/r, C_out), under bf16 autocast in training; None where it does not apply (then call the
    convolution): ``conv`` exactly an ``nn.Conv2d`` without hooks, square kernel = stride r, no padding, no groups or
    dilation, and H and W at least r. Where r does not divide H or W, the last rows and columns are left out, as the
    convolution leaves them (their gradient is zero). Also where r does not divide the grid, this is the path: PyTorch
    2.14's oneDNN bf16 convolution of a channels-last input exactly one kernel wide (9 x 8 tokens, 16 channels, stride
    8) returns wrong numbers (tests/fast/test_hostile_bf16_train29.py)."""
    if not (
        isinstance(conv, nn.Conv2d)
        and x.dim() == 4
        and _bf16_applies(x, conv.weight, conv.bias)
        and plain_modules(nn.Conv2d, conv)
    ):
        return None
    r = conv.stride[0]
    batch, height, width, channels = x.shape
    if not (
        conv.kernel_size == (r, r)
        and conv.stride == (r, r)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.in_channels == channels
        and conv.weight.shape[1:] == (channels, r, r)
        and r > 0
        and height >= r
        and width >= r
    ):
        return None
    rows, columns = height // r, width // r
    # One copy gathers the patches (and casts them, where autocast would have cast the input); the crop, where r does
    # not divide the grid, and any strides are a view until then.
    patches = x[:, : rows * r, : columns * r].reshape(batch, rows, r, columns, r, channels).permute(0, 1, 3, 2, 4, 5)
    # (Tensor.to with the dtype it has already returns the permuted view itself, whatever memory_format asks.)
    patches = patches.to(torch.bfloat16, memory_format=torch.contiguous_format).contiguous()
    patches = patches.view(-1, r * r * channels)
    # The kernel in the patches' (row, column, channel) order: a small differentiable copy of the weight.
    weight, bias = _bf16(conv.weight, conv.bias)
    weight = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    out = Bf16Linear.apply(patches, weight, bias)
    return out.view(batch, rows * columns, -1)


def module_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; for exactly an ``nn.Linear`` without hooks, :func:`linear` with its weights. Under
    ``torch.jit.trace`` the module itself, with autograd on or off: the trace's check reruns the model under
    ``no_grad``, and the weights read here (in the caller's scope) made another graph than the module's own forward
    (the trace was refused as differing across invocations)."""
    if torch.is_grad_enabled() and not torch.jit.is_tracing() and plain_modules(nn.Linear, module):
        return linear(x, module.weight, module.bias)
    return module(x)
