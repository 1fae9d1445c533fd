"""Training on CUDA: the memory-bound passes of the blocks as Triton autograd functions.

A PVTv2 training step on a GPU spends most of its device time outside the matrix products (measured on an H100 in
docs/benchmarks.md: B2 at batch 64 under bf16 autocast, LayerNorm forward and backward about a fifth of the step,
PyTorch's kernels giving every 64-512-channel row its own thread block). Here, while autograd records on a CUDA
device:

- :func:`add_norm`: the block's residual add and the LayerNorm after it as one kernel forward (the sum written once,
  as the residual stream) and one backward (the gradients of the sum and of the norm added in the same pass, the
  weight and bias gradients reduced per program and summed once); :func:`norm` is the same without the add.

**Same numbers.** The reference's arithmetic in fp32 (inputs upcast, results rounded once at the store, as PyTorch's
kernels do); only the summation order differs. Under CUDA autocast the norm's output is fp32, as autocast's
``layer_norm`` gives it. Gradients come back in the dtypes of the inputs they belong to.

**When.** :func:`applies`: a CUDA tensor while autograd records, the fast path switched on
(:func:`pvtv2.fast.fast_path`, ``PVTV2_FAST_PATH``), Triton present, outside ``torch.compile``, ``torch.jit.trace``,
torch.func transforms and forward-mode AD, plain tensors (no subclass), a float32/bfloat16/float16 input, and
modules that are exactly the expected type without hooks (:func:`pvtv2.fast.plain_modules`). Anything else is the
reference code: ``x + branch``, then the module called.
"""

from __future__ import annotations

import torch
from torch import nn

from . import cuda
from .cpu import PLAIN_TENSOR_TYPES, fast_path_enabled, plain_modules

__all__ = ["applies", "add_norm", "norm", "LayerNormFunction"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The device these functions run on: "cuda"; the tests set "cpu" to run them through Triton's interpreter.
DEVICE_TYPE = "cuda"


def _plain_cuda(t: torch.Tensor) -> bool:
    return type(t) in PLAIN_TENSOR_TYPES and t.layout == torch.strided and t.device.type == DEVICE_TYPE


def applies(x: torch.Tensor, cls: type[nn.Module], *modules: nn.Module) -> bool:
    """Whether the Triton training functions may replace ``modules`` (exactly of type ``cls``) applied to ``x``."""
    return (
        x.device.type == DEVICE_TYPE
        and torch.is_grad_enabled()
        and fast_path_enabled()
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and _plain_cuda(x)
        and x.dtype in _DTYPES
        and x.numel() > 0
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
        and getattr(torch.autograd.forward_ad, "_current_level", -1) < 0
        and plain_modules(cls, *modules)
        and (DEVICE_TYPE != "cuda" or cuda.available())
    )


# ---------------------------------------------------------------------------------------------- LayerNorm
def _kernels():
    from . import kernels  # needs Triton: imported only once applies() found it (or by the interpreter's tests)

    return kernels


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    """What ``layer_norm`` returns for an input of ``dtype``: fp32 under CUDA autocast (one of autocast's fp32
    operators), else the input's dtype (also for weights of another dtype)."""
    return torch.float32 if torch.is_autocast_enabled(DEVICE_TYPE) else dtype


def _norm_fits(ln: nn.LayerNorm, x: torch.Tensor) -> bool:
    return (
        ln.weight is not None and ln.bias is not None and len(ln.normalized_shape) == 1
        and x.shape[-1] == ln.normalized_shape[0] and ln.weight.device == x.device
        and ln.weight.dtype in _DTYPES and ln.bias.dtype in _DTYPES
    )


class LayerNormFunction(torch.autograd.Function):
    """``(x + residual, layer_norm(x + residual))``, or ``layer_norm(x)`` when ``residual`` is None, by Triton."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps: float, out_dtype: torch.dtype):
        sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
        total, y, mean, rstd = _kernels().layer_norm_forward(
            x, weight.detach(), bias.detach(), eps, out_dtype, residual, sum_dtype
        )
        ctx.save_for_backward(x if total is None else total, weight, mean, rstd)
        ctx.dtypes = (x.dtype, None if residual is None else residual.dtype, weight.dtype, bias.dtype)
        ctx.set_materialize_grads(False)
        if total is None:
            return y
        return total, y

    @staticmethod
    def backward(ctx, *grads):
        normed, weight, mean, rstd = ctx.saved_tensors
        x_dtype, res_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_sum, grad_y = (None, grads[0]) if res_dtype is None else grads
        if grad_y is None:  # only the sum was used: its gradient passes through
            if grad_sum is None:
                return None, None, None, None, None, None
            grad = grad_sum
            grad_w = grad_b = None
        else:
            grad, grad_w, grad_b = _kernels().layer_norm_backward(
                normed, grad_y.contiguous(), weight.detach(), mean, rstd, normed.dtype,
                None if grad_sum is None else grad_sum.contiguous(),
            )
            grad_w, grad_b = grad_w.to(w_dtype), grad_b.to(b_dtype)
        grad_x = grad.to(x_dtype) if ctx.needs_input_grad[0] else None
        grad_res = grad.to(res_dtype) if res_dtype is not None and ctx.needs_input_grad[1] else None
        return grad_x, grad_res, grad_w, grad_b, None, None


def norm(ln: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``ln(x)``; on CUDA while training, by :class:`LayerNormFunction` (same numbers)."""
    if applies(x, nn.LayerNorm, ln) and _norm_fits(ln, x):
        return LayerNormFunction.apply(x.contiguous(), None, ln.weight, ln.bias, ln.eps, _out_dtype(x.dtype))
    return ln(x)


def add_norm(ln: nn.Module, x: torch.Tensor, branch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + branch, ln(x + branch))``: the residual add and the norm after it; on CUDA while training, one Triton
    kernel forward and one backward (:class:`LayerNormFunction`)."""
    if (
        applies(x, nn.LayerNorm, ln) and _plain_cuda(branch) and branch.dtype in _DTYPES
        and branch.shape == x.shape and branch.device == x.device and _norm_fits(ln, x)
    ):
        sum_dtype = torch.promote_types(x.dtype, branch.dtype)
        return LayerNormFunction.apply(
            x.contiguous(), branch.contiguous(), ln.weight, ln.bias, ln.eps, _out_dtype(sum_dtype)
        )
    total = x + branch
    return total, ln(total)

