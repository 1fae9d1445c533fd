"""Triton kernels of the fast GPU inference path (:mod:`pvtv2.fast.cuda`): what PyTorch runs as several
memory-bound passes, done in one.

- :func:`layer_norm`: LayerNorm over the last dimension, optionally after adding a residual (the sum is written
  too), with its output in another dtype (the autocast dtype the next linear layer would cast it to). PyTorch's
  kernel gives each row its own thread block, which for PVTv2's narrow rows (64-512 channels, hundreds of thousands
  of rows) runs far below memory bandwidth; here a program normalises many rows at once.
- :func:`depthwise_conv_gelu`: the Mix-FFN's 3x3 depthwise convolution, its bias and the exact GELU on the
  channels-last token grid, so the wide hidden activation is read once and written once.

Arithmetic is fp32 throughout (loads are upcast, results rounded once at the store). Importing this module needs
Triton; :mod:`pvtv2.fast.cuda` imports it only when a CUDA tensor reaches the fast path. With ``TRITON_INTERPRET=1``
set before the import, the kernels run on CPU tensors through Triton's interpreter (the tests use this).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["layer_norm", "depthwise_conv_gelu"]

# Elements a LayerNorm program holds (rows x padded channels): enough rows per program for narrow rows.
_LN_ELEMENTS = 4096
# Pixels x channels a depthwise-convolution program computes.
_DW_PIXELS, _DW_CHANNELS = 32, 64


@triton.jit
def _layer_norm_kernel(
    x_ptr, res_ptr, sum_ptr, w_ptr, b_ptr, y_ptr, rows, cols, eps,
    HAS_RES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    col = tl.arange(0, BLOCK_C)[None, :]
    mask = (row < rows) & (col < cols)
    offsets = row * cols + col
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        total = (x + tl.load(res_ptr + offsets, mask=mask, other=0.0).to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + offsets, total, mask=mask)
        x = total.to(tl.float32)  # the norm reads the sum as stored, as the reference's norm reads ``x + residual``
    mean = tl.sum(x, axis=1) / cols
    centred = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / cols
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + col, mask=col < cols, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + col, mask=col < cols, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w + b
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``layer_norm(x)`` over the last dimension, in ``out_dtype`` (default ``x``'s). With ``residual``: returns
    ``(x + residual, layer_norm(x + residual))``, the sum in the dtype PyTorch's ``x + residual`` would have.
    ``x`` and ``residual`` must be contiguous."""
    cols = x.shape[-1]
    rows = x.numel() // cols
    y = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    total = None
    if residual is not None:
        total = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    block_c = triton.next_power_of_2(cols)
    block_r = max(1, _LN_ELEMENTS // block_c)
    grid = (triton.cdiv(rows, block_r),)
    _layer_norm_kernel[grid](
        x, residual if residual is not None else x, total if total is not None else y, weight, bias, y, rows, cols,
        eps, HAS_RES=residual is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4 if block_c <= 512 else 8,
    )
    return y if total is None else (total, y)


@triton.jit
def _dwconv_gelu_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, pixels, height, width, channels,
    GELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # pixel index over batch x height x width
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < pixels
    c_ok = c < channels
    px = p % width
    py = (p // width) % height
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for dy in tl.static_range(3):
        for dx in tl.static_range(3):
            yy = py + (dy - 1)
            xx = px + (dx - 1)
            ok = p_ok & (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
            src = (p + (dy - 1) * width + (dx - 1)).to(tl.int64)  # same image: ``ok`` keeps inside it
            v = tl.load(x_ptr + src[:, None] * channels + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
            w = tl.load(w_ptr + c * 9 + (dy * 3 + dx), mask=c_ok, other=0.0)
            acc += v.to(tl.float32) * w.to(tl.float32)[None, :]
    acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    offsets = p.to(tl.int64)[:, None] * channels + c[None, :]
    tl.store(y_ptr + offsets, acc.to(y_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


def depthwise_conv_gelu(
    x: torch.Tensor, height: int, width: int, weight: torch.Tensor, bias: torch.Tensor, gelu: bool = True
) -> torch.Tensor:
    """A 3x3 depthwise convolution (stride 1, zero padding 1) with bias, then the exact GELU (``gelu=True``), of
    the contiguous token grid ``x`` (B, height * width, C); returns the same layout and dtype. ``weight`` (C, 1, 3, 3)
    and ``bias`` (C,) are used in the dtype given (pass them cast as autocast would cast them)."""
    batch, tokens, channels = x.shape
    if tokens != height * width:
        raise ValueError(f"{tokens} tokens are not a {height}x{width} grid")
    y = torch.empty_like(x)
    pixels = batch * tokens
    grid = (triton.cdiv(pixels, _DW_PIXELS), triton.cdiv(channels, _DW_CHANNELS))
    _dwconv_gelu_kernel[grid](
        x, weight.contiguous(), bias, y, pixels, height, width, channels,
        GELU=gelu, BLOCK_P=_DW_PIXELS, BLOCK_C=_DW_CHANNELS, num_warps=4,
    )
    return y
