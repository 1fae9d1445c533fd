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


def _plain_cuda(t: torch.Tensor) -> bool:
    return type(t) in PLAIN_TENSOR_TYPES and t.layout == torch.strided and t.device.type == "cuda"


def applies(x: torch.Tensor, cls: type[nn.Module], *modules: nn.Module) -> bool:
    """Whether the Triton training functions may replace ``modules`` (exactly of type ``cls``) applied to ``x``."""
    return (
        x.device.type == "cuda"
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
        and cuda.available()
    )
