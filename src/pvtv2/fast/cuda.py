"""The fast GPU inference path: a PVTv2 stage with its memory-bound passes fused by Triton kernels.

On a GPU, PVTv2's time at useful batch sizes goes to memory-bound operations, not to its matrix products (measured
on an H100 in docs/benchmarks.md: B2 at batch 64 under bf16 autocast spends 30% of its device time in PyTorch's
LayerNorm kernel, which runs far below bandwidth on rows of 64-512 channels, and 17% in the depthwise convolution
and GELU over the Mix-FFN's wide hidden activation). This path runs the same stage with:

- every LayerNorm of the blocks and the stage as :func:`pvtv2.fast.kernels.layer_norm`, with the residual add
  before it fused in (the sum is written once, as the residual stream) and, under autocast, its output written
  directly in the autocast dtype that the next linear layer would cast it to;
- the Mix-FFN's depthwise convolution, bias and exact GELU as one kernel (:func:`pvtv2.fast.kernels.depthwise_conv_gelu`).

Everything else is the reference code: the patch embedding, the attention module (called, so its keys and values
take the path the reference takes), the linear layers (called, so autocast casts as it would).

**Same numbers.** In fp32 the results equal the reference path to fp32 rounding (summation order). Under autocast
the only difference is one rounding fewer: the reference rounds the convolution's output to bf16/fp16 before the
GELU, this path keeps it in fp32 until the GELU's result is rounded. The contract of :mod:`pvtv2.fast.cpu` holds:
the path runs only in eval mode, without autograd, outside ``torch.compile``, for stages whose every module is
exactly of a known type with no hooks (:func:`pvtv2.fast.cpu.fusable`), with the switch on; it keeps no state, so
every call reads the weights the modules hold. It needs Triton (PyTorch's CUDA builds ship it); without it the
reference path runs.

**Below that size, a frozen model** (:func:`pvtv2.fast.freeze`, which the ``pvtv2`` command applies to the models it
serves) runs :func:`frozen_stage_forward`: the reference computation, operator for operator, with what the
reference recomputes from the weights at every call kept instead: the keys' and values' weights concatenated, and
under autocast every linear and convolution weight already cast to the autocast dtype. Small batches on a GPU are
bound by the host's launches (docs/benchmarks.md), and per block the reference launches 16 kernels for this (two
concatenations, a weight and a bias cast per layer) of about 37. Same numbers as the reference, bit for bit: the
same operators on the same values. The kept tensors follow the frozen CPU path's rules (rebuilt when a weight
changes in a way PyTorch sees, never in ``state_dict()``, weakly keyed by module). Not while a CUDA graph is
captured: a graph's replays would read the kept copies as they were and miss later writes to the parameters, which
the reference's graph reads (frozen stages then run the reference path, or the fused kernels on the weights).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu
from .cpu import fast_path_enabled, fusable

__all__ = ["applies", "stage_forward", "fused_stage_forward", "frozen_stage_forward", "available", "MIN_ELEMENTS"]

logger = logging.getLogger(__name__)

# Below these sizes of a stage's input the GPU finishes the reference path's kernels faster than the host launches
# them, and the fused path's Triton launches (slower to launch from Python than ATen's) only add host time. Measured
# on an H100 (docs/benchmarks.md): under bf16 autocast, batch 64 at 224 px (stage 1 input: 9.6M elements) is still
# host-bound for B0 and B5, batch 256 (38.5M) is not; in fp32/TF32 batch 64 gains for B0, B2 and B5.
MIN_ELEMENTS = {torch.float32: 4_000_000, torch.bfloat16: 16_000_000, torch.float16: 16_000_000}

_AVAILABLE: bool | None = None
_kernels = None


def available() -> bool:
    """Whether Triton imports here (checked once)."""
    global _AVAILABLE, _kernels
    if _AVAILABLE is None:
        try:
            from . import kernels

            _kernels = kernels
            _AVAILABLE = True
        except Exception as exc:  # no Triton, or one that does not work with this PyTorch
            logger.debug("Triton kernels unavailable: %s", exc)
            _AVAILABLE = False
    return _AVAILABLE


def applies(x: torch.Tensor, stage: nn.Module | None = None) -> bool:
    """Whether a stage called on ``x`` hands over to :func:`stage_forward`: a CUDA tensor, autograd off, outside
    ``torch.compile`` and ``torch.jit.trace``, the switch on; either large enough to be bound by memory traffic with
    Triton present, or (given ``stage``) a frozen stage outside CUDA graph capture; and (given ``stage``) every
    module of the stage as the fast code assumes (:func:`pvtv2.fast.cpu.fusable`)."""
    return (
        not torch.compiler.is_compiling()  # first: PyTorch 2.11's torch.compile cannot trace the switch's ContextVar
        and x.device.type == "cuda"
        and fast_path_enabled()
        and not torch.is_grad_enabled()
        and not torch.jit.is_tracing()  # a trace would record the kept weights as constants
        and torch._C._functorch.peek_interpreter_stack() is None  # inside torch.func's vmap: no Triton kernel is batched
        and not cpu.forward_ad_active()  # dual tensors: no Triton kernel has a tangent rule
        and (_fuses(x) or (stage is not None and stage in cpu._FROZEN and not _capturing()))
        and (stage is None or fusable(stage))
    )


def _capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (False where CUDA never started: the check
    itself raises on a machine without a driver)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _kept_weights(stage: nn.Module):
    """A frozen stage's kept weights (``pvtv2.fast.cpu._PackedWeights``), or None: where the stage is not frozen, and
    while a CUDA graph is captured. A graph records the memory its kernels read, so it would read the kept copies at
    every replay and miss later writes to the weights (``load_state_dict``, an EMA's ``copy_``), which the
    reference's graph, concatenating and casting the parameters themselves at every replay, reads. A graph saves the
    launches anyway."""
    return None if _capturing() else cpu._FROZEN.get(stage)


def _fuses(x: torch.Tensor) -> bool:
    """Whether a stage input ``x`` is large enough for the fused kernels to pay (and Triton is here)."""
    return x.numel() >= MIN_ELEMENTS.get(_compute_dtype(x), float("inf")) and available()


def stage_forward(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A ``PvtV2Stage`` on the CUDA tensor ``x`` in eval mode, where :func:`applies`: the fused kernels for large
    inputs, the frozen reference computation below."""
    if _fuses(x):
        return fused_stage_forward(stage, x)
    return frozen_stage_forward(stage, x)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type  # "cuda"; "cpu" where the tests run the kernels through Triton's interpreter
    # Autocast leaves float64 alone: a float64 model computes in float64 (and this path does not apply to it).
    if torch.is_autocast_enabled(device) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return x.dtype


def _stream_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the reference's LayerNorm output for an input like ``x``, which the residual stream keeps: under
    CUDA autocast ``layer_norm`` is one of the ops autocast runs in fp32 (whatever the weights' dtype); otherwise
    it returns its input's dtype, also for fp32 weights with a bf16/fp16 input (and so does CPU autocast)."""
    device = x.device.type
    return torch.float32 if device == "cuda" and torch.is_autocast_enabled(device) else x.dtype


def _exact_gelu(act: nn.Module) -> bool:
    return type(act) is nn.GELU and act.approximate == "none"


def _fusable_dwconv(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is what the kernel computes: a 3x3 depthwise convolution, stride 1, zero padding 1, with
    bias (a module of the right type may still have been built or changed otherwise)."""
    return cpu.fusable_dwconv(conv, conv.in_channels) and conv.padding_mode == "zeros" and conv.bias is not None


def _norm(ln: nn.LayerNorm, x: torch.Tensor, out_dtype: torch.dtype, residual: torch.Tensor | None = None):
    """The LayerNorm ``ln`` (over the last dimension, with affine weights) of ``x`` (+ ``residual``), fused."""
    if ln.weight is None or ln.bias is None or len(ln.normalized_shape) != 1:
        total = x if residual is None else x + residual
        out = ln(total).to(out_dtype)
        return out if residual is None else (total, out)
    return _kernels.layer_norm(x.contiguous(), ln.weight, ln.bias, ln.eps, out_dtype,
                               None if residual is None else residual.contiguous())


def _mix_ffn_hidden(weights, mlp: nn.Module, h: torch.Tensor, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """dense1, (ReLU), depthwise conv and activation: the last three fused where the activation is the exact GELU."""
    hidden = cpu._call(mlp.relu, _linear(weights, [mlp.dense1], h, _autocast_dtype(h)))  # (B, N, hidden)
    conv = mlp.dwconv.dwconv
    if not _exact_gelu(mlp.act) or not hidden.is_contiguous() or not _fusable_dwconv(conv):
        return mlp.act(mlp.dwconv(hidden, height, width))
    weight, bias = conv.weight, conv.bias
    if hidden.dtype != weight.dtype:  # as autocast casts the convolution's weights (kept where the stage is frozen)
        def make():
            return conv.weight.to(hidden.dtype), conv.bias.to(hidden.dtype)

        weight, bias = make() if weights is None else weights.cached(("cuda fused", id(conv)), [conv], hidden.dtype, make)
    return _kernels.depthwise_conv_gelu(hidden, height, width, weight, bias)


def fused_stage_forward(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A ``PvtV2Stage`` on the CUDA tensor ``x`` (B, C_in, H, W) in eval mode, with the Triton kernels: its
    (B, C, H', W') output, channels-last, as the reference stage computes it."""
    if not available():
        raise RuntimeError("the fast GPU path needs Triton, which does not import here")
    dtype = _compute_dtype(x)
    weights = _kept_weights(stage)  # a frozen stage's kept weights (the keys' and values' concatenated, cast)
    embed = stage.patch_embedding
    image = _conv(weights, embed.proj, x.contiguous(memory_format=torch.channels_last), _autocast_dtype(x))  # (B, C, H, W)
    batch, channels, height, width = image.shape
    tokens = image.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # (B, N, C), a view
    # The residual stream keeps the dtype the reference's LayerNorm gives it (fp32 under CUDA autocast). Not the
    # weights' dtype: a bf16 model under autocast still gets an fp32 stream, bf16 weights with fp32 norms a bf16 one.
    stream_dtype = _stream_dtype(tokens)
    x = _norm(embed.layer_norm, tokens, stream_dtype)
    pending = None  # the last branch output, not yet added to the stream
    for block in stage.blocks:
        # Under autocast the reference casts LayerNorm's fp32 output for the next linear layer, so the norm writes it
        # cast. Linear attention average-pools that output first (in its own dtype): there it stays as the reference's.
        attn_dtype = dtype if isinstance(block.attention.pool, nn.Identity) else stream_dtype
        if pending is None:
            h = _norm(block.layer_norm_1, x, attn_dtype)
        else:
            x, h = _norm(block.layer_norm_1, x, attn_dtype, residual=pending)
        attn = _attention(weights, block.attention, h, height, width, _autocast_dtype(h))
        x, h = _norm(block.layer_norm_2, x, dtype, residual=attn)
        hidden = _mix_ffn_hidden(weights, block.mlp, h, height, width, dtype)
        pending = _linear(weights, [block.mlp.dense2], hidden, _autocast_dtype(h))
    if pending is None:
        x = _norm(stage.layer_norm, x, stream_dtype)
    else:
        _, x = _norm(stage.layer_norm, x, stream_dtype, residual=pending)
    return x.view(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, C, H, W), a channels-last view


# ---------------------------------------------------------------------------------------------- frozen, small inputs
# The reference's operators in the reference's order, on the reference's views (so SDPA and the GEMMs get the same
# operands and pick the same kernels), with the weights each layer would have recomputed kept in the stage's
# pvtv2.fast.cpu._PackedWeights. The modules the fast code calls (activations, pooling) are called as the reference
# calls them; fusable() has checked every module's type, slot and hooks.
def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast casts a linear or convolution weight to here, or None where it casts nothing."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _as_autocast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """``t`` as autocast hands it to a lower-precision operator: cast unless it is float64 (autocast leaves those)."""
    if t is None or dtype is None or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


def _linear_weights(weights, layers: list[nn.Linear], dtype: torch.dtype | None):
    """The weight and bias of ``layers`` (concatenated along their outputs, as the reference concatenates the keys'
    and values'), as autocast would cast them."""
    if len(layers) == 1 and dtype is None:  # nothing recomputed: the module's own tensors
        return layers[0].weight, layers[0].bias

    def make():
        weight = torch.cat([m.weight for m in layers]) if len(layers) > 1 else layers[0].weight
        bias = layers[0].bias
        if len(layers) > 1 and bias is not None:
            bias = torch.cat([m.bias for m in layers])
        return _as_autocast(weight, dtype), _as_autocast(bias, dtype)

    if weights is None:
        return make()
    return weights.cached(("cuda",) + tuple(id(m) for m in layers), layers, dtype, make)


def _linear(weights, layers: list[nn.Linear], x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    weight, bias = _linear_weights(weights, layers, dtype)
    return F.linear(x, weight, bias)


def _conv(weights, conv: nn.Conv2d, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None:
        weight, bias = conv.weight, conv.bias
    else:
        def make():
            return _as_autocast(conv.weight, dtype), _as_autocast(conv.bias, dtype)

        weight, bias = make() if weights is None else weights.cached(("cuda", id(conv)), [conv], dtype, make)
    # As the reference: the layout PyTorch's bf16 CPU convolution computes right in (a no-op on a GPU; this path runs
    # CPU tensors in the tests).
    x = cpu.one_kernel_wide_bf16(conv, x)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _attention(weights, attn: nn.Module, x: torch.Tensor, height: int, width: int, dtype: torch.dtype | None):
    """What ``SpatialReductionAttention.forward`` returns (without maps) for the tokens ``x`` (B, N, C)."""
    batch, tokens, channels = x.shape
    kv_in = x
    if attn.reduces:
        kv_in = x.view(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last view
        kv_in = cpu.reference_conv_input(kv_in)  # the reference's layout (CPU tensors: ATen's own kernel)
        kv_in = _conv(weights, attn.spatial_reduction, cpu._call(attn.pool, kv_in), dtype)  # (B, C, H', W')
        kv_in = kv_in.permute(0, 2, 3, 1).reshape(batch, -1, channels)  # (B, N', C)
        kv_in = cpu._call(attn.act, cpu._norm(attn.layer_norm, kv_in))
    q = attn.split_heads(_linear(weights, [attn.query], x, dtype))  # (B, heads, N, head_dim)
    # One product where the reference computes one (the same test as SpatialReductionAttention.forward: backward
    # hooks, inert here, make it call the two layers; fusable() has checked the types and widths).
    if cpu.plain_modules(nn.Linear, attn.key, attn.value) and (attn.key.bias is None) == (attn.value.bias is None):
        k, v = attn.split_keys_values(_linear(weights, [attn.key, attn.value], kv_in, dtype))
    else:  # where the reference calls the two layers
        k, v = (attn.split_heads(_linear(weights, [m], kv_in, dtype)) for m in (attn.key, attn.value))
    out, _ = attn.attend(q, k, v)  # (B, N, C)
    return _linear(weights, [attn.proj], out, dtype)


def _mix_ffn(weights, mlp: nn.Module, x: torch.Tensor, height: int, width: int, dtype: torch.dtype | None):
    """What ``MixFFN.forward`` returns in eval mode for the tokens ``x`` (B, N, C)."""
    x = cpu._call(mlp.relu, _linear(weights, [mlp.dense1], x, dtype))  # (B, N, hidden)
    batch, tokens, channels = x.shape
    if cpu.transformers_layouts(x):
        # As DepthwiseConv.forward on CPU tensors where ATen's own kernel convolves under autocast: transformers' views
        # (its rounding follows the layout; never on a GPU).
        image = x.transpose(1, 2).view(batch, channels, height, width)
        x = _conv(weights, mlp.dwconv.dwconv, image, dtype).flatten(2).transpose(1, 2)
    else:
        image = x.view(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, hidden, H, W), channels-last view
        # As fast.depthwise_conv: a contiguous image where ATen's own kernel convolves (float64, float16 weights).
        image = image.contiguous() if cpu.aten_convolves(image) else image
        x = _conv(weights, mlp.dwconv.dwconv, image, dtype).permute(0, 2, 3, 1).reshape(batch, tokens, channels)
    return _linear(weights, [mlp.dense2], cpu._call(mlp.act, x), dtype)


def frozen_stage_forward(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A ``PvtV2Stage`` in eval mode on ``x`` (B, C_in, H, W): the reference computation, with the weights the
    reference would recompute at this call kept while the stage is frozen (computed here where it is not). Its
    (B, C, H', W') output, channels-last, equal to the reference's."""
    weights = _kept_weights(stage)
    dtype = _autocast_dtype(x)
    embed = stage.patch_embedding
    if not cpu.transformers_layouts(x):  # as OverlapPatchEmbed.forward
        x = x.contiguous(memory_format=torch.channels_last)
    x = _conv(weights, embed.proj, x, dtype)  # (B, C, H, W)
    batch, channels, height, width = x.shape
    x = cpu._norm(embed.layer_norm, x.permute(0, 2, 3, 1).reshape(batch, height * width, channels))  # (B, N, C)
    for block in stage.blocks:
        x = x + _attention(weights, block.attention, cpu._norm(block.layer_norm_1, x), height, width, dtype)
        x = x + _mix_ffn(weights, block.mlp, cpu._norm(block.layer_norm_2, x), height, width, dtype)
    x = cpu._norm(stage.layer_norm, x)
    return x.view(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, C, H, W), a channels-last view
