"""The building blocks of PVTv2: overlapping patch embedding, spatial-reduction attention, Mix-FFN, block, stage.

Layers take explicit scalars, never the config. Tokens travel as ``(B, N, C)`` with the spatial size ``(H, W)``
passed alongside; a stage returns an image-shaped ``(B, C, H, W)`` map. Sub-module names follow the published
transformers checkpoints (``query``, ``key``, ``value``, ``spatial_reduction``, ``dense1`` ...), so that
``state_dict()`` loads there strictly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "get_activation",
    "DropPath",
    "OverlapPatchEmbed",
    "SpatialReductionAttention",
    "MixFFN",
    "PvtV2Block",
    "PvtV2Stage",
    "init_weights",
]


class _Formula(nn.Module):
    """An activation given by a closed form (as transformers writes it, so results match to the bit)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str) -> None:
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def get_activation(act: str | Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """The Mix-FFN activation for a config's ``hidden_act``."""
    if callable(act) and not isinstance(act, str):
        return act if isinstance(act, nn.Module) else _Formula(act, getattr(act, "__name__", "custom"))
    table: dict[str, Callable[[], nn.Module]] = {
        "gelu": nn.GELU,
        "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
        "gelu_new": lambda: _Formula(_gelu_new, "gelu_new"),
        "gelu_fast": lambda: _Formula(_gelu_fast, "gelu_fast"),
        "quick_gelu": lambda: _Formula(_quick_gelu, "quick_gelu"),
        "relu": nn.ReLU,
        "selu": nn.SELU,
        "silu": nn.SiLU,
        "swish": nn.SiLU,
    }
    if act not in table:
        raise ValueError(f"unsupported activation {act!r}; choose from {sorted(table)}")
    return table[act]()


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


class OverlapPatchEmbed(nn.Module):
    """A strided convolution with overlapping windows (kernel > stride, zero padding kernel // 2), then LayerNorm."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, stride: int, eps: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.layer_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)  # (B, C, H, W)
        _, _, height, width = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        return self.layer_norm(x), height, width


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

    def forward(
        self, x: torch.Tensor, height: int, width: int, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, tokens, channels = x.shape
        q = self._split_heads(self.query(x))
        if self.reduces:
            kv = x.transpose(1, 2).reshape(batch, channels, height, width)  # (B, C, H, W)
            kv = self.spatial_reduction(self.pool(kv))  # (B, C, H', W')
            kv = self.act(self.layer_norm(kv.flatten(2).transpose(1, 2)))  # (B, N', C)
        else:
            kv = x
        k = self._split_heads(self.key(kv))
        v = self._split_heads(self.value(kv))

        dropout = self.attn_drop if self.training else 0.0
        probs = None
        if output_attentions:
            probs = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)  # (B, heads, N, N')
            out = F.dropout(probs, dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, tokens, channels)  # (B, N, C)
        return self.proj_drop(self.proj(out)), probs


class _DepthwiseConv(nn.Module):
    """3x3 depthwise convolution over the token grid: the Mix-FFN's source of positional information."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, _, channels = x.shape
        x = x.transpose(1, 2).view(batch, channels, height, width)  # (B, C, H, W)
        return self.dwconv(x).flatten(2).transpose(1, 2)  # (B, N, C)


class MixFFN(nn.Module):
    """Linear, (ReLU with linear attention), depthwise 3x3 conv, activation, linear."""

    def __init__(self, dim: int, hidden_dim: int, act: nn.Module, drop: float = 0.0, extra_relu: bool = False) -> None:
        super().__init__()
        self.dense1 = nn.Linear(dim, hidden_dim)
        self.relu: nn.Module = nn.ReLU() if extra_relu else nn.Identity()
        self.dwconv = _DepthwiseConv(hidden_dim)
        self.act = act
        self.dense2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = self.relu(self.dense1(x))
        x = self.dropout(self.act(self.dwconv(x, height, width)))
        return self.dropout(self.dense2(x))


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
        x = x.transpose(1, 2).reshape(batch, channels, height, width)  # (B, C, H, W)
        return x, attentions


@torch.no_grad()
def init_weights(module: nn.Module, initializer_range: float = 0.02) -> None:
    """The initialisation of the original code, timm and transformers, applied once to a whole model.

    Linear: truncated normal (std ``initializer_range``), zero bias. Conv: normal with std sqrt(2 / fan_out)
    (fan_out divided by groups). LayerNorm / BatchNorm: one and zero.
    """
    for m in module.modules():
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
