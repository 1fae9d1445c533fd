"""The building blocks of PVTv2: overlapping patch embedding, spatial-reduction attention, Mix-FFN, block, stage.

Layers take explicit scalars, never the config. Tokens travel as ``(B, N, C)`` with the spatial size ``(H, W)``
passed alongside; a stage returns an image-shaped ``(B, C, H, W)`` map.

Memory layout (why the code permutes rather than transposes): tokens ``(B, N, C)`` are stored row-major, which is the
same memory as ``(B, H, W, C)``. The image view every convolution needs is taken as
``x.view(B, H, W, C).permute(0, 3, 1, 2)``, a channels-last ``(B, C, H, W)`` tensor that shares that memory; the
convolutions then run on oneDNN's channels-last kernels (the 3x3 depthwise one several times faster than on NCHW) and
return channels-last results whose token view is again free. No activation is copied between the two views.

Fast inference path: with autograd off (``torch.no_grad()`` / ``inference_mode``), on CPU, outside ``torch.compile``,
the linear layers run through oneDNN with weights prepacked once into its blocked layout (keys and values as one
GEMM, the activation or the residual add fused into the GEMM), the strided convolutions (patch embeddings, spatial
reduction) with prepacked weights, and the depthwise convolution with its GELU fused. The Mix-FFN runs in pieces
(groups of images, or bands of rows) whose wide hidden activation stays in the CPU cache between its three steps.
The packed weights are a run-time cache, never in ``state_dict()``; they are rebuilt whenever a weight changes
(``load_state_dict``, an optimizer step: any in-place write bumps the tensor's version) and dropped by ``.train()``.
These are private oneDNN ops, so they sit behind a capability check (``fast_path_available``) that runs them once
against the public ops; ``set_fast_path(False)`` turns them off. Training and ``torch.compile`` use public ops only.

Sub-module names follow the published
transformers checkpoints (``query``, ``key``, ``value``, ``spatial_reduction``, ``dense1`` ...), so that
``state_dict()`` loads there strictly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

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
    "fast_path_available",
    "set_fast_path",
    "clear_fast_cache",
]

logger = logging.getLogger(__name__)

_FAST_PATH_ENABLED = True
# The Mix-FFN's hidden activation per piece on the fast path (``MixFFN._fast_forward``), near the best measured on a
# CPU with 1 MiB of L2 per core and a shared L3; 0 runs the whole batch at once.
_FFN_PIECE_BYTES = 8 << 20
_CAPABILITY: dict[torch.dtype, bool] = {}


def _probe(dtype: torch.dtype) -> bool:
    """Run the private oneDNN ops once on small tensors and compare with the public ops they replace."""
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(37, 24, generator=gen)
        w = torch.randn(40, 24, generator=gen) * 0.2
        b = torch.randn(40, generator=gen)
        r = torch.randn(37, 40, generator=gen)
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        packed = torch.ops.mkldnn._reorder_linear_weight(w.to(dtype))
        xd, bd, rd = x.to(dtype), b.to(dtype), r.to(dtype)
        ref = F.linear(x, w, b)
        checks = [
            (torch.ops.mkldnn._linear_pointwise(xd, packed, bd, "none", [], ""), ref),
            (torch.ops.mkldnn._linear_pointwise(xd, packed, bd, "relu", [], ""), ref.relu()),
            (torch.ops.mkldnn._linear_pointwise.binary(xd, rd, packed, bd, "add"), ref + r),
        ]
        img = torch.randn(2, 5, 6, 8, generator=gen).permute(0, 3, 1, 2)  # channels-last (2, 8, 5, 6)
        cw = torch.randn(8, 1, 3, 3, generator=gen)
        cb = torch.randn(8, generator=gen)
        conv_ref = F.gelu(F.conv2d(img, cw, cb, 1, 1, 1, 8))
        conv = torch.ops.mkldnn._convolution_pointwise(
            img.to(dtype), cw.to(dtype), cb.to(dtype), [1, 1], [1, 1], [1, 1], 8, "gelu", [], "none"
        )
        checks.append((conv, conv_ref))
        sw = torch.randn(6, 8, 2, 2, generator=gen)
        packed_conv = torch.ops.mkldnn._reorder_convolution_weight(sw.to(dtype), [0, 0], [2, 2], [1, 1], 1, [2, 8, 5, 6])
        strided = torch.ops.mkldnn._convolution_pointwise(
            img.to(dtype), packed_conv, cb[:6].to(dtype), [0, 0], [2, 2], [1, 1], 1, "none", [], ""
        )
        checks.append((strided, F.conv2d(img, sw, cb[:6], stride=2)))
        for got, want in checks:
            if got.shape != want.shape or ((got.float() - want).abs().max() / want.abs().max()).item() > tol:
                return False
        return True
    except (RuntimeError, AttributeError, NotImplementedError) as err:
        logger.debug("oneDNN fast path unavailable for %s: %s", dtype, err)
        return False


def fast_path_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this PyTorch build and CPU run the oneDNN prepacked linear and fused convolution for ``dtype``."""
    if dtype not in _CAPABILITY:
        ok = torch.backends.mkldnn.is_available() and dtype in (torch.float32, torch.bfloat16) and _probe(dtype)
        _CAPABILITY[dtype] = ok
        logger.debug("oneDNN fast path for %s: %s", dtype, ok)
    return _CAPABILITY[dtype]


def set_fast_path(enabled: bool) -> bool:
    """Turn the oneDNN inference path on or off (for comparisons and tests); returns the previous setting."""
    global _FAST_PATH_ENABLED
    previous, _FAST_PATH_ENABLED = _FAST_PATH_ENABLED, bool(enabled)
    return previous


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


def _use_fast(x: torch.Tensor) -> bool:
    """The oneDNN path runs only where nothing needs autograd and nothing traces the graph."""
    return (
        _FAST_PATH_ENABLED
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and fast_path_available(_compute_dtype(x))
    )


def _params_key(dtype: torch.dtype, params: list[torch.Tensor | None]) -> tuple:
    """What packed weights were built from: the dtype and each parameter's storage, version and shape (an in-place
    write bumps the version, so the key changes whenever a weight does)."""
    return (dtype,) + tuple((p.data_ptr(), p._version, tuple(p.shape)) for p in params if p is not None)


class _FastCache:
    """Prepacked weights of one module, keyed by the identity and version of the parameters they were built from."""

    def __init__(self) -> None:
        # name (linear layers) or (name, input shape) (convolutions) -> (parameter key, packed weight, bias)
        self.entries: dict[str | tuple, tuple[tuple, torch.Tensor, torch.Tensor | None]] = {}

    def linear(self, name: str, layers: list[nn.Linear], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = _params_key(dtype, [p for layer in layers for p in (layer.weight, layer.bias)])
        entry = self.entries.get(name)
        if entry is None or entry[0] != key:
            weight = torch.cat([layer.weight for layer in layers]) if len(layers) > 1 else layers[0].weight
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype))
            bias = None
            if layers[0].bias is not None:
                bias = torch.cat([layer.bias for layer in layers]) if len(layers) > 1 else layers[0].bias
                bias = bias.detach().to(dtype)
            entry = (key, packed, bias)
            self.entries[name] = entry
        return entry[1], entry[2]

    def conv(self, name: str, conv: nn.Conv2d, dtype: torch.dtype, input_shape: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The convolution's weight in the oneDNN layout chosen for inputs of ``input_shape``.

        The layout depends on the input's size, and a weight packed for another size gives the right numbers 10 to
        100 times slower (measured: 15 ms instead of 0.1 ms for a 4x4 map with a weight packed for 14x14). So each
        input shape gets its own packing, and the last ``_CONV_SHAPES`` shapes per convolution are kept.
        """
        key = _params_key(dtype, [conv.weight, conv.bias])
        slot = (name, tuple(input_shape))
        entry = self.entries.pop(slot, None)  # re-inserted below: the dict's order is the order of last use
        if entry is None or entry[0] != key:
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                conv.weight.detach().to(dtype), list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
                list(input_shape),
            )
            bias = None if conv.bias is None else conv.bias.detach().to(dtype)
            entry = (key, packed, bias)
            # list() first and pop(..., None): other threads may use the same model at the same time.
            same_conv = [k for k in list(self.entries) if isinstance(k, tuple) and k[0] == name]
            for old in same_conv[: max(0, len(same_conv) - _CONV_SHAPES + 1)]:
                self.entries.pop(old, None)
        self.entries[slot] = entry
        return entry[1], entry[2]


# Input shapes per convolution whose packed weights are kept (an evaluation loop sees one or two: its batch size
# and a smaller last batch).
_CONV_SHAPES = 4


def clear_fast_cache(module: nn.Module) -> None:
    """Drop every prepacked weight under ``module`` (they are rebuilt on the next no-grad forward)."""
    for m in module.modules():
        cache = m.__dict__.get("_fast_cache")
        if cache is not None:
            cache.entries.clear()


class _Cached(nn.Module):
    """A module with a run-time cache of prepacked weights, outside ``state_dict()``, dropped by ``.train()``."""

    def _fast(self, x: torch.Tensor) -> bool:
        """Whether this call takes the packed path: eval mode, and :func:`_use_fast` for ``x``."""
        return not self.training and _use_fast(x)

    def _cache(self) -> _FastCache:
        cache = self.__dict__.get("_fast_cache")
        if cache is None:
            cache = self.__dict__["_fast_cache"] = _FastCache()
        return cache

    def train(self, mode: bool = True):
        cache = self.__dict__.get("_fast_cache")
        if cache is not None and mode:
            cache.entries.clear()
        return super().train(mode)

    def _linear(
        self, name: str, layers: list[nn.Linear], x: torch.Tensor, attr: str = "none", residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``layers`` (concatenated along outputs) applied to ``x`` with oneDNN, with an optional fused ReLU or
        residual add. Under autocast the packed weights and the result take the autocast dtype, as F.linear would."""
        dtype = _compute_dtype(x)
        weight, bias = self._cache().linear(name, layers, dtype)
        x2d = x.reshape(-1, x.shape[-1]).to(dtype)  # (B * N, C), a view for the token layout
        if residual is not None and residual.dtype == dtype:
            res2d = residual.reshape(x2d.shape[0], -1)
            out = torch.ops.mkldnn._linear_pointwise.binary(x2d, res2d, weight, bias, "add")
            return out.view(residual.shape)
        out = torch.ops.mkldnn._linear_pointwise(x2d, weight, bias, attr, [], "")
        out = out.view(*x.shape[:-1], out.shape[-1])
        # A residual stream in higher precision than the GEMM (bf16 autocast) stays so, as with autocast's F.linear.
        return out if residual is None else residual + out

    def _conv(self, name: str, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """``conv`` applied to the channels-last ``x`` with its weight prepacked: the same numbers as ``conv(x)``
        without reordering the weight on every call (which costs more than the convolution on small maps)."""
        dtype = _compute_dtype(x)
        weight, bias = self._cache().conv(name, conv, dtype, list(x.shape))
        return torch.ops.mkldnn._convolution_pointwise(
            x.to(dtype), weight, bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
            "none", [], "",
        )


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability ``drop_prob`` in training."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class OverlapPatchEmbed(_Cached):
    """A strided convolution with overlapping windows (kernel > stride, zero padding kernel // 2), then LayerNorm."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, stride: int, eps: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.layer_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = x.contiguous(memory_format=torch.channels_last)
        x = self._conv("proj", self.proj, x) if self._fast(x) else self.proj(x)  # channels-last
        batch, channels, height, width = x.shape
        x = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # (B, N, C), a view
        return self.layer_norm(x), height, width


class SpatialReductionAttention(_Cached):
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

        self.pool: nn.Module = nn.Identity()
        self.act: nn.Module = nn.Identity()
        self.reduces = linear or sr_ratio > 1
        if linear:
            self.pool = nn.AdaptiveAvgPool2d(pool_size)
            self.spatial_reduction = nn.Conv2d(dim, dim, kernel_size=1, stride=1)
            self.act = nn.GELU()
        elif sr_ratio > 1:
            self.spatial_reduction = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
        if self.reduces:
            self.layer_norm = nn.LayerNorm(dim, eps=norm_eps)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, head_dim)

    def _reduce(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The tokens keys and values come from: (B, N', C)."""
        if not self.reduces:
            return x
        batch, _, channels = x.shape
        kv = x.view(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last view
        kv = self.pool(kv)
        if self._fast(kv):
            kv = self._conv("reduction", self.spatial_reduction, kv)  # (B, C, H', W'), channels-last
        else:
            kv = self.spatial_reduction(kv)
        kv = kv.permute(0, 2, 3, 1).reshape(batch, -1, channels)  # (B, N', C), a view
        return self.act(self.layer_norm(kv))

    def forward(
        self,
        x: torch.Tensor,
        height: int,
        width: int,
        output_attentions: bool = False,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention output (plus ``residual`` when given: the fast path fuses that add into the projection)."""
        batch, tokens, channels = x.shape
        kv_in = self._reduce(x, height, width)
        fast = self._fast(x)
        if fast:
            q = self._split_heads(self._linear("q", [self.query], x))
            kv = self._linear("kv", [self.key, self.value], kv_in)  # (B, N', 2C): one GEMM
        else:
            q = self._split_heads(self.query(x))
            # Keys and values as one GEMM here too (the weights are concatenated on the fly; gradients flow back to
            # both layers), so training runs one larger matrix product forward and two backward instead of twice that.
            weight = torch.cat([self.key.weight, self.value.weight])
            bias = None if self.key.bias is None else torch.cat([self.key.bias, self.value.bias])
            kv = F.linear(kv_in, weight, bias)
        k, v = self._split_heads(kv[..., :channels]), self._split_heads(kv[..., channels:])

        dropout = self.attn_drop if self.training else 0.0
        probs = None
        if output_attentions:
            probs = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)  # (B, heads, N, N')
            out = F.dropout(probs, dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, tokens, channels)  # (B, N, C)
        if fast:
            return self._linear("proj", [self.proj], out, residual=residual), probs
        out = self.proj_drop(self.proj(out))
        return (out if residual is None else residual + out), probs


class _DepthwiseConv(nn.Module):
    """3x3 depthwise convolution over the token grid: the Mix-FFN's source of positional information."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, height: int, width: int, fused_gelu: str | None = None) -> torch.Tensor:
        """The convolution; with ``fused_gelu`` ("none" for exact, "tanh") oneDNN applies GELU in the same pass."""
        batch, _, channels = x.shape
        x = x.view(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last view
        if fused_gelu is None:
            x = self.dwconv(x)  # (B, C, H, W), channels-last
        else:
            dtype = _compute_dtype(x)
            w, b = self.dwconv.weight.to(dtype), self.dwconv.bias.to(dtype)
            x = torch.ops.mkldnn._convolution_pointwise(
                x.to(dtype), w, b, [1, 1], [1, 1], [1, 1], channels, "gelu", [], fused_gelu
            )
        return x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # (B, N, C), a view


class MixFFN(_Cached):
    """Linear, (ReLU with linear attention), depthwise 3x3 conv, activation, linear."""

    def __init__(self, dim: int, hidden_dim: int, act: nn.Module, drop: float = 0.0, extra_relu: bool = False) -> None:
        super().__init__()
        self.dense1 = nn.Linear(dim, hidden_dim)
        self.relu: nn.Module = nn.ReLU() if extra_relu else nn.Identity()
        self.dwconv = _DepthwiseConv(hidden_dim)
        self.act = act
        self.dense2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(drop)
        # GELU that oneDNN can fuse into the depthwise convolution: its algorithm name, else None.
        self._gelu_algorithm = (
            {"none": "none", "tanh": "tanh"}.get(act.approximate) if type(act) is nn.GELU else None
        )

    def forward(
        self, x: torch.Tensor, height: int, width: int, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The feed-forward output (plus ``residual`` when given: the fast path fuses that add into ``dense2``)."""
        if self._fast(x):
            return self._fast_forward(x, height, width, residual)
        x = self.relu(self.dense1(x))
        x = self.dropout(self.act(self.dwconv(x, height, width)))
        x = self.dropout(self.dense2(x))
        return x if residual is None else residual + x

    def _fast_hidden(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """dense1, (ReLU), depthwise conv and activation of a piece ``(B, height * width, C)``."""
        x = self._linear("dense1", [self.dense1], x, attr="relu" if isinstance(self.relu, nn.ReLU) else "none")
        if self._gelu_algorithm is not None:
            return self.dwconv(x, height, width, fused_gelu=self._gelu_algorithm)
        return self.act(self.dwconv(x, height, width))

    def _fast_forward(
        self, x: torch.Tensor, height: int, width: int, residual: torch.Tensor | None
    ) -> torch.Tensor:
        """The Mix-FFN in cache-sized pieces.

        The hidden activation is ``mlp_ratio`` times wider than the tokens. Over a whole batch it is far larger than
        the CPU caches, and the expanding GEMM, the depthwise convolution and the contracting GEMM would each stream
        it through main memory. Run in pieces whose hidden activation is about ``_FFN_PIECE_BYTES``, it stays in
        cache from one to the next: groups of whole images or, where one image is larger, bands of rows. A band
        computes one extra row above and below for the 3x3 convolution and drops them. Each token's result is the
        same as in one piece.
        """
        batch, tokens, channels = x.shape
        row_bytes = width * self.dense1.out_features * 4
        image_bytes = row_bytes * height
        if _FFN_PIECE_BYTES <= 0 or batch * image_bytes <= _FFN_PIECE_BYTES:
            return self._linear("dense2", [self.dense2], self._fast_hidden(x, height, width), residual=residual)
        if image_bytes <= _FFN_PIECE_BYTES or height <= 8:  # groups of whole images
            step = max(1, _FFN_PIECE_BYTES // image_bytes)
            pieces = []
            for i in range(0, batch, step):
                hidden = self._fast_hidden(x[i : i + step], height, width)
                res = None if residual is None else residual[i : i + step]
                pieces.append(self._linear("dense2", [self.dense2], hidden, residual=res))
            return torch.cat(pieces)
        band = max(4, _FFN_PIECE_BYTES // row_bytes - 2)  # rows per band, one image at a time
        grid = x.view(batch, height, width, channels)
        res_grid = None if residual is None else residual.view(batch, height, width, channels)
        out = None
        for i in range(batch):
            for top in range(0, height, band):
                bottom = min(height, top + band)
                lo, hi = max(0, top - 1), min(height, bottom + 1)  # with the rows the convolution reads
                hidden = self._fast_hidden(grid[i, lo:hi].reshape(1, -1, channels), hi - lo, width)
                hidden = hidden.view(hi - lo, width, -1)[top - lo : bottom - lo].reshape(1, -1, hidden.shape[-1])
                res = None if res_grid is None else res_grid[i, top:bottom].reshape(1, -1, channels)
                piece = self._linear("dense2", [self.dense2], hidden, residual=res)
                if out is None:
                    out = piece.new_empty(batch, height, width, channels)
                out[i, top:bottom] = piece.view(bottom - top, width, channels)
        return out.view(batch, tokens, channels)



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
        if isinstance(self.drop_path, nn.Identity) or not self.training:
            # No stochastic depth: the residual adds go inside the branches, where oneDNN fuses them.
            x, probs = self.attention(self.layer_norm_1(x), height, width, output_attentions, residual=x)
            return self.mlp(self.layer_norm_2(x), height, width, residual=x), probs
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

    def forward(
        self, x: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, height, width = self.patch_embedding(x)  # (B, N, C)
        attentions = []
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, probs = checkpoint(block, x, height, width, output_attentions, use_reentrant=False)
            else:
                x, probs = block(x, height, width, output_attentions)
            if probs is not None:
                attentions.append(probs)
        x = self.layer_norm(x)
        batch, _, channels = x.shape
        x = x.view(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, C, H, W), a channels-last view
        return x, attentions


@torch.no_grad()
def init_weights(module: nn.Module, initializer_range: float = 0.02, recurse: bool = True) -> None:
    """The initialisation of the original code, timm and transformers, applied once to a whole model.

    Linear: truncated normal (std ``initializer_range``), zero bias. Conv: normal with std sqrt(2 / fan_out)
    (fan_out divided by groups). LayerNorm / BatchNorm: one and zero.
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
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


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
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            m.reset_running_stats()
