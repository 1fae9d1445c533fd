"""The building blocks of PVTv2: overlapping patch embedding, spatial-reduction attention, Mix-FFN, block, stage.

This is the reference model: public PyTorch ops, one forward per module, to be read next to the paper and to timm's
``pvt_v2.py``. Layers take explicit scalars, never the config. Tokens travel as ``(B, N, C)`` with the spatial size
``(H, W)`` passed alongside; a stage returns an image-shaped ``(B, C, H, W)`` map.

Memory layout (why the code permutes rather than transposes): tokens ``(B, N, C)`` are stored row-major, which is the
same memory as ``(B, H, W, C)``. The image view every convolution needs is taken as
``x.view(B, H, W, C).permute(0, 3, 1, 2)``, a channels-last ``(B, C, H, W)`` tensor that shares that memory; the
convolutions then run on channels-last kernels and return channels-last results whose token view is again free. No
activation is copied between the two views.

The fast CPU inference path (:mod:`pvtv2.fast`) takes over whole stages at one point, at the top of
:meth:`PvtV2Stage.forward`, when it applies (eval mode, autograd off, CPU, no attention maps requested, and every
module of the stage in eval mode, of exactly its usual type and without hooks); it computes the same numbers to 1e-5.
While training on an AMD CPU with AVX-512, the linear layers' matrix products run through oneDNN instead of MKL
(:mod:`pvtv2.fast.train`: ``fast.linear`` / ``fast.module_linear`` are ``F.linear`` / calling the module everywhere
else), with the same numbers to GEMM rounding.
Sub-module names follow the published transformers checkpoints (``query``, ``key``, ``value``,
``spatial_reduction``, ``dense1`` ...), so that ``state_dict()`` loads there strictly.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import fast
from .activations import get_activation

__all__ = [
    "DropPath",
    "OverlapPatchEmbed",
    "SpatialReductionAttention",
    "MixFFN",
    "PvtV2Block",
    "PvtV2Stage",
    "init_weights",
    "init_head_weights",
    "init_norm",
]


def _check_drop_prob(drop_prob: float) -> None:
    if isinstance(drop_prob, bool) or not isinstance(drop_prob, numbers.Real) or not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"DropPath drop_prob must be a probability in [0, 1], got {drop_prob!r}")


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability ``drop_prob`` in training.

    The draw is transformers' (``PvtV2DropPath``): one ``torch.rand`` of shape (B, 1, ...) in ``x``'s dtype and
    device, ``floor(rand + keep_prob)``, then ``x / keep_prob * mask``. Under the same seed it keeps the same samples
    and gives the same numbers as transformers' PVTv2 (and SegFormer, GLPN), where timm's ``bernoulli_`` would draw
    other masks (tests/models/test_dropout_draws29.py)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        _check_drop_prob(drop_prob)
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        # Checked again here: the attribute may have been changed since. Outside [0, 1] the formula below gives masks
        # of -1 or keeps every sample scaled, without an error.
        _check_drop_prob(self.drop_prob)
        keep = 1.0 - self.drop_prob
        mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
        mask = torch.floor(mask + keep)  # 1 with probability keep, else 0
        if keep == 0.0:
            # Every sample dropped: zeros, as timm gives (transformers' x / 0 * 0 is NaN). The draw is still made,
            # so that the generator moves as transformers' does.
            return x * mask
        return x.div(keep) * mask

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class OverlapPatchEmbed(nn.Module):
    """A strided convolution with overlapping windows (kernel > stride, zero padding kernel // 2), then LayerNorm."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, stride: int, eps: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.layer_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        # Channels-last for the convolution (oneDNN's layout on CPU; torch.func.vmap cannot ask for it). Under
        # autocast where ATen's own kernel convolves (fast.aten_convolves), whose rounding follows the layout,
        # transformers' layout instead: the pixels as given (a channels-last image made contiguous here came out
        # one bf16 step away from transformers'), a later stage's map contiguous (PvtV2Encoder makes it so, as
        # transformers' encoder does).
        if not fast.transformers_layouts(x) and torch._C._functorch.peek_interpreter_stack() is None:
            x = x.contiguous(memory_format=torch.channels_last)
        if (
            x.device.type == "cpu"
            and min(x.shape[-2:]) <= self.proj.padding[0]
            and (torch.is_autocast_enabled("cpu") or self.proj.weight.dtype in _REDUCED)
        ):
            x = self._small_input_proj(x)
        else:
            x = self.proj(x)  # (B, C, H, W), channels-last
        batch, channels, height, width = x.shape
        x = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # (B, N, C), a view
        return self.layer_norm(x), height, width

    def _small_input_proj(self, x: torch.Tensor) -> torch.Tensor:
        """``proj`` in fp32 on an input no larger than its padding, returned in the weights' dtype.

        PyTorch's bf16 CPU convolution writes garbage (1e38, inf, NaN) into the weight gradient of the taps that meet
        only padding when the input is no larger than the padding (a one-pixel input: a 16 px image's last stage; a 2
        or 3 px side under the first stage's 7x7 kernel), whether autocast or a model cast to bf16 runs it in bf16. In
        fp32 it is right, and a grid this small costs nothing. timm's and transformers' PVTv2 get the same garbage."""
        weight, bias = self.proj.weight, self.proj.bias
        with torch.autocast("cpu", enabled=False):
            if weight.dtype not in _REDUCED or not fast.plain_modules(nn.Conv2d, self.proj):
                return self.proj(x.to(weight.dtype))  # an fp32 model, or a convolution that is not exactly Conv2d's
            out = self.proj._conv_forward(x.float(), weight.float(), None if bias is None else bias.float())
            return out.to(weight.dtype)


# The dtypes PyTorch's CPU convolution gives garbage weight gradients in for the smallest inputs.
_REDUCED = (torch.bfloat16, torch.float16)

# Attention probabilities up to this size (bytes, all heads and images) are computed explicitly on the CPU under
# autocast and where autograd records them (`_explicit_attention`).
EXPLICIT_ATTENTION_BYTES = 256 << 20


def _explicit_attention(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether to compute attention as softmax(QK^T)V rather than SDPA, as transformers' eager attention computes it:
    - under bf16/fp16 autocast on the CPU, where SDPA's kernels run the few keys of spatial-reduction attention two
      to four times slower than the matrix products (forward and backward, measured in docs/benchmarks.md);
    - on the CPU whenever autograd records the attention (training, or gradients of an input): SDPA's CPU backward
      rebuilds the probabilities from their log-sum-exp, and where the scores are large (saturated softmax) its
      gradients came 10-30x further from the float64 truth than transformers' (the explicit product keeps the
      probabilities it used; about the same step time, docs/training.md), and it has no second derivative.
    Not where the probabilities would be large (no reduction at high resolution), which SDPA never stores. And inside
    torch.func's transforms (vmap, per-sample gradients, ensembles over stacked weights): SDPA's CPU kernels have no
    batching rule there, and vmap would run them one sample at a time. And under forward-mode AD
    (``torch.autograd.forward_ad``), where SDPA's CPU kernels have no tangent rule and raise."""
    if torch._C._functorch.peek_interpreter_stack() is not None or fast.forward_ad_active():
        return True
    if q.device.type != "cpu":
        return False
    # Not by grad mode under torch.jit.trace: its check traces again under no_grad, and one graph serves both.
    recorded = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad) and not torch.jit.is_tracing()
    if not (torch.is_autocast_enabled("cpu") or recorded):
        return False
    batch, heads, tokens, _ = q.shape
    return batch * heads * tokens * k.shape[-2] * 4 <= EXPLICIT_ATTENTION_BYTES


class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose keys and values come from a spatially reduced copy of the tokens.

    The reduction is chosen once, at construction:
    - SRA (``sr_ratio > 1``): a ``sr_ratio``-strided convolution, then LayerNorm;
    - linear SRA (``linear=True``): average pooling to ``pool_size`` x ``pool_size``, a 1x1 convolution,
      LayerNorm and GELU, so the cost grows linearly with the number of tokens;
    - none (``sr_ratio == 1``): keys and values from every token.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int = 1,
        linear: bool = False,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_eps: float = 1e-6,
        pool_size: int = 7,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide dim={dim}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.query = nn.Linear(dim, dim, bias=qkv_bias)
        self.key = nn.Linear(dim, dim, bias=qkv_bias)
        self.value = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

        self.reduces = linear or sr_ratio > 1
        self.pool: nn.Module = nn.AdaptiveAvgPool2d(pool_size) if linear else nn.Identity()
        self.act: nn.Module = nn.GELU() if linear else nn.Identity()
        if linear:
            self.spatial_reduction = nn.Conv2d(dim, dim, kernel_size=1, stride=1)
        elif sr_ratio > 1:
            self.spatial_reduction = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
        if self.reduces:
            self.layer_norm = nn.LayerNorm(dim, eps=norm_eps)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, head_dim)

    def split_keys_values(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values from one (B, N', 2C) product of the two layers: each (B, heads, N', head_dim), views."""
        # Split by a view of the whole, then unbind (as timm's fused kv): one gradient kernel backward (a stack),
        # where two slices of the last dimension take a zero fill and a copy each and their sum.
        kv = kv.view(kv.shape[0], -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (2, B, heads, N', d)
        k, v = kv.unbind(0)
        return k, v

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """softmax(q k^T * scale) v, with attention dropout in training: (B, N, C), and the maps where asked.

        q: (B, heads, N, head_dim); k, v: (B, heads, N', head_dim)."""
        dropout = self.attn_drop if self.training else 0.0
        probs = None
        # With attention dropout in training, the explicit softmax and F.dropout on the (B, heads, N, N')
        # probabilities: the draws transformers makes (nn.Dropout on the same tensor), which SDPA's dropout_p does
        # not promise (its fused CUDA kernels draw otherwise). Dropout 0 (the default) keeps SDPA.
        if output_attentions or dropout > 0.0 or _explicit_attention(q, k):
            probs = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)  # (B, heads, N, N')
            # The maps returned are the weights the values get, after dropout in training, as transformers returns.
            probs = F.dropout(probs, dropout, self.training)
            out = probs @ v
            probs = probs if output_attentions else None
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # no dropout here (above)
        batch, _, tokens, _ = out.shape
        return out.transpose(1, 2).reshape(batch, tokens, -1), probs  # (B, N, C)

    def forward(
        self, x: torch.Tensor, height: int, width: int, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, tokens, channels = x.shape
        kv_in = x
        if self.reduces:
            grid = x.view(batch, height, width, channels)
            # Under bf16 autocast in training, the strided reduction as a GEMM over its patches (pvtv2.fast.train).
            reduced = None
            if fast.plain_modules(nn.Identity, self.pool):
                reduced = fast.patch_conv(self.spatial_reduction, grid)
            if reduced is None:
                kv_in = fast.reference_conv_input(grid.permute(0, 3, 1, 2))  # (B, C, H, W), channels-last view
                # (One kernel wide in bf16: the (B, C, H, W) layout, where PyTorch's oneDNN kernel is right.)
                kv_in = self.pool(kv_in)
                kv_in = self.spatial_reduction(fast.one_kernel_wide_bf16(self.spatial_reduction, kv_in))
                reduced = kv_in.permute(0, 2, 3, 1).reshape(batch, -1, channels)  # (B, N', C)
            kv_in = self.act(self.layer_norm(reduced))
        q = self.split_heads(fast.module_linear(self.query, x))  # (B, heads, N, head_dim)
        if (
            fast.plain_modules(nn.Linear, self.key, self.value)
            and (self.key.bias is None) == (self.value.bias is None)
            # A key or value layer of another width (replaced by hand) would be split silently at the wrong place:
            # the modules themselves then fail where their outputs meet the heads.
            and self.key.out_features == self.value.out_features == channels
        ):
            # Keys and values as one GEMM (the weights concatenated on the fly, gradients flow back to both layers):
            # one larger matrix product forward and two backward instead of twice that, as timm's fused ``kv`` does.
            weight = torch.cat([self.key.weight, self.value.weight])
            bias = None if self.key.bias is None else torch.cat([self.key.bias, self.value.bias])
            k, v = self.split_keys_values(fast.linear(kv_in, weight, bias))  # from (B, N', 2C)
        else:  # hooks, adapters, subclasses or quantized layers: the modules themselves
            k, v = self.split_heads(self.key(kv_in)), self.split_heads(self.value(kv_in))
        out, probs = self.attend(q, k, v, output_attentions)  # (B, N, C)
        return self.proj_drop(fast.module_linear(self.proj, out)), probs


class DepthwiseConv(nn.Module):
    """3x3 depthwise convolution over the token grid: the Mix-FFN's source of positional information."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, height: int, width: int, keep_layout: bool = False) -> torch.Tensor:
        batch, _, channels = x.shape
        if keep_layout or fast.transformers_layouts(x):
            # transformers' views in and out (transpose(1, 2).view, flatten(2).transpose(1, 2)), so that the
            # convolution picks the memory layout it picks there: a dropout after this draws its mask in memory
            # order, so the layout decides which element gets which draw. At batch 1 the two views in differ in the
            # size-1 batch dimension's stride, and the CPU convolution then returns (B, C, H, W) contiguous there
            # and channels-last here. So under autocast where ATen's own kernel convolves (bf16 without oneDNN's
            # kernels): its rounding follows the layout, and these views keep transformers' numbers bit for bit.
            # (Weights in float16 / float64 / bf16 differ from transformers' by rounding elsewhere anyway: there
            # fast.depthwise_conv gives that kernel the contiguous image it runs 3-6x faster on.)
            x = self.dwconv(x.transpose(1, 2).view(batch, channels, height, width))
            return x.flatten(2).transpose(1, 2)  # (B, N, C)
        x = x.view(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last view
        x = fast.depthwise_conv(self.dwconv, x)  # (B, C, H, W), channels-last
        return x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # (B, N, C), a view


class MixFFN(nn.Module):
    """Linear, (ReLU with linear attention), depthwise 3x3 conv, activation, linear."""

    def __init__(self, dim: int, hidden_dim: int, act: nn.Module, drop: float = 0.0, extra_relu: bool = False) -> None:
        super().__init__()
        self.dense1 = nn.Linear(dim, hidden_dim)
        self.relu: nn.Module = nn.ReLU() if extra_relu else nn.Identity()
        self.dwconv = DepthwiseConv(hidden_dim)
        self.act = act
        self.dense2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = self.relu(fast.module_linear(self.dense1, x))  # (B, N, hidden)
        if self.training and self.dropout.p > 0.0:
            # The dropout draws over the layout transformers' draws over (see DepthwiseConv): at batch 1 a mask
            # drawn over our (B, N, C) layout gave each element another draw than transformers' under the same seed.
            x = self.dropout(self.act(self.dwconv(x, height, width, keep_layout=True)))
            if not fast.transformers_layouts(x):
                # (B, N, C) rows for dense2. Not under autocast without oneDNN's kernels for its dtype (bf16 on an
                # AVX2 CPU): ATen's own GEMM rounds by the layout, and at batch 1 transformers' dense2 reads the
                # depthwise convolution's transposed view (contiguous rows here came out one bf16 step away).
                x = x.contiguous()
        else:
            x = self.dropout(self.act(self.dwconv(x, height, width)))
        return self.dropout(fast.module_linear(self.dense2, x))  # (B, N, C)


class PvtV2Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``, each with drop path."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        linear: bool,
        qkv_bias: bool,
        act: nn.Module,
        drop: float,
        attn_drop: float,
        drop_path: float,
        norm_eps: float,
        reduction_norm_eps: float,
    ) -> None:
        super().__init__()
        self.layer_norm_1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attention = SpatialReductionAttention(
            dim, num_heads, sr_ratio, linear, qkv_bias, attn_drop, drop, norm_eps=reduction_norm_eps
        )
        self.drop_path: nn.Module = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_norm_2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio), act, drop, extra_relu=linear)

    def forward(
        self, x: torch.Tensor, height: int, width: int, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn, probs = self.attention(self.layer_norm_1(x), height, width, output_attentions)
        x = x + self.drop_path(attn)
        x = x + self.drop_path(self.mlp(self.layer_norm_2(x), height, width))
        return x, probs


class PvtV2Stage(nn.Module):
    """One level of the pyramid: overlapping patch embedding, ``depth`` blocks, LayerNorm; returns ``(B, C, H, W)``."""

    def __init__(
        self,
        in_channels: int,
        dim: int,
        depth: int,
        patch_size: int,
        stride: int,
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        linear: bool,
        qkv_bias: bool,
        act: str | Callable,
        drop: float,
        attn_drop: float,
        drop_path: list[float],
        norm_eps: float,
        patch_norm_eps: float,
        reduction_norm_eps: float,
    ) -> None:
        super().__init__()
        self.patch_embedding = OverlapPatchEmbed(in_channels, dim, patch_size, stride, patch_norm_eps)
        self.blocks = nn.ModuleList(
            PvtV2Block(
                dim, num_heads, mlp_ratio, sr_ratio, linear, qkv_bias, get_activation(act), drop, attn_drop,
                drop_path[j], norm_eps, reduction_norm_eps,
            )
            for j in range(depth)
        )
        self.layer_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.gradient_checkpointing = False
        # torch.utils.checkpoint's arguments (PvtV2PreTrainedModel.gradient_checkpointing_enable sets them).
        self.checkpoint_kwargs: dict = {"use_reentrant": False}
        self.checkpoint_offload = False  # keep what the recomputation starts from in host memory

    def _checkpoint_kwargs(self) -> dict:
        """torch.utils.checkpoint's arguments for a block: those of gradient_checkpointing_enable (non-reentrant by
        default), and the recomputation in the backward pass under the forward's fast-path choices
        (fast.forward_choices). Not with the reentrant variant, which takes no context_fn (nor checks the
        recomputation: it computes the same numbers either way), nor under torch.compile: dynamo takes no context_fn
        of its own making, and no fast piece runs there. Nor with ``debug=True``, which torch.utils.checkpoint takes
        with its default context_fn only: transformers' ``{"debug": True}`` raised at the first training step. The
        recomputation then runs under the backward's choices, and torch's determinism check refuses a difference."""
        kwargs = dict(getattr(self, "checkpoint_kwargs", None) or {"use_reentrant": False})
        if not kwargs.get("use_reentrant") and not kwargs.get("debug") and not torch.compiler.is_compiling():
            kwargs["context_fn"] = functools.partial(_forward_choices, kwargs.get("context_fn"))
        return kwargs

    def _offload(self, x: torch.Tensor) -> contextlib.AbstractContextManager:
        """activation_checkpointing_enable(offload=True): the tensors a block's checkpoint keeps (its input) held in
        pinned host memory, as transformers does; a model on the CPU has them there already."""
        if not getattr(self, "checkpoint_offload", False) or x.device.type == "cpu":
            return contextlib.nullcontext()
        return torch.autograd.graph.save_on_cpu(pin_memory=True, device_type=x.device.type)

    def forward(self, x: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # The one hand-over point to the fast CPU inference path (pvtv2.fast): same numbers, computed faster.
        if not self.training and not output_attentions and fast.applies(x, self):
            return fast.stage_forward(self, x), []
        x, height, width = self.patch_embedding(x)  # (B, N, C)
        attentions = []
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                with self._offload(x):
                    x, probs = checkpoint(block, x, height, width, output_attentions, **self._checkpoint_kwargs())
            else:
                x, probs = block(x, height, width, output_attentions)
            if probs is not None:
                attentions.append(probs)
        x = self.layer_norm(x)
        batch, _, channels = x.shape
        x = x.view(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, C, H, W), a channels-last view
        return x, attentions


def _forward_choices(
    user_fn: Callable[[], tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]] | None = None,
) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """torch.utils.checkpoint's context_fn: the user's contexts (``gradient_checkpointing_kwargs``' context_fn), if
    any, with the forward's fast-path choices added around the recomputation."""
    forward, recompute = user_fn() if user_fn is not None else (contextlib.nullcontext(), contextlib.nullcontext())
    return forward, _both(recompute, fast.forward_choices())


@contextlib.contextmanager
def _both(first: contextlib.AbstractContextManager, second: contextlib.AbstractContextManager) -> Iterator[None]:
    with first, second:
        yield


@torch.no_grad()
def init_weights(module: nn.Module, initializer_range: float = 0.02, recurse: bool = True) -> None:
    """The initialisation of the original code, timm and transformers, applied once to a whole model.

    Linear: truncated normal (std ``initializer_range``), zero bias. Conv: normal with std sqrt(2 / fan_out)
    (fan_out divided by groups). LayerNorm / BatchNorm: :func:`init_norm`.
    """
    for m in module.modules() if recurse else [module]:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=initializer_range)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            init_norm(m)


@torch.no_grad()
def init_norm(m: nn.LayerNorm | nn.BatchNorm2d) -> None:
    """A norm layer as new, in every model and head: scale one, shift zero and (BatchNorm) running statistics reset."""
    if m.weight is not None:
        nn.init.ones_(m.weight)
    if m.bias is not None:
        nn.init.zeros_(m.bias)
    if isinstance(m, nn.BatchNorm2d):
        m.reset_running_stats()


@torch.no_grad()
def init_head_weights(module: nn.Module, std: float) -> None:
    """transformers' initialisation of SegFormer's and GLPN's heads: every conv and linear normal(0, std), zero bias.

    (The encoder's fan-out initialisation would give a 1x1 classifier over few classes logits of unit scale or
    more, and a first loss several times log(num_labels).)
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            init_norm(m)
