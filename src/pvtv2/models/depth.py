"""Monocular depth on the PVTv2 (Mix Transformer) encoder: GLPN's decoder (selective feature fusion) and depth head.

``PvtV2ForDepthEstimation`` follows transformers' ``GLPNForDepthEstimation`` operation for operation, and its decoder
and head keep that class's module names, so a GLPN checkpoint loads by renaming the encoder keys only
(``pvtv2.weights.layouts``). The encoder is the library's own ``PvtV2Model`` under ``pvt_v2.``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import DEPTH_DEFAULTS, PvtV2Config
from .layers import init_head_weights
from .modeling import PvtV2Model, PvtV2PreTrainedModel, resolve_output_flags
from .outputs import ModelOutput, exportable

__all__ = [
    "DepthEstimatorOutput",
    "SelectiveFeatureFusion",
    "GLPNDecoder",
    "GLPNDepthHead",
    "PvtV2ForDepthEstimation",
    "silog_loss",
    "depth_config",
]

logger = logging.getLogger(__name__)


@exportable
@dataclass
class DepthEstimatorOutput(ModelOutput):
    """``predicted_depth``: (B, H, W) depth in ``[0, max_depth]`` at the input's resolution."""

    loss: torch.Tensor | None = None
    predicted_depth: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def depth_config(config: PvtV2Config) -> PvtV2Config:
    """``config`` with GLPN's head defaults filled in where unset (64 wide, max depth 10, the last decoder output)."""
    return config.with_defaults(**DEPTH_DEFAULTS)


# ---------------------------------------------------------------------------------------------- GLPN
class SelectiveFeatureFusion(nn.Module):
    """GLPN's selective feature fusion: two convs predict a two-channel sigmoid map that weighs the local (decoder)
    and global (encoder skip) features pixel by pixel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.convolutional_layer1 = nn.Sequential(
            nn.Conv2d(channels * 2, channels, kernel_size=3, stride=1, padding=1), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.convolutional_layer2 = nn.Sequential(
            nn.Conv2d(channels, channels // 2, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(channels // 2),
            nn.ReLU(),
        )
        self.convolutional_layer3 = nn.Conv2d(channels // 2, 2, kernel_size=3, stride=1, padding=1)

    def forward(self, local: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = torch.cat((local, skip), dim=1)  # (B, 2C, H, W)
        attn = torch.sigmoid(self.convolutional_layer3(self.convolutional_layer2(self.convolutional_layer1(x))))
        return local * attn[:, 0:1] + skip * attn[:, 1:2]  # (B, C, H, W)


class _DecoderStage(nn.Module):
    """1x1 conv to the decoder width (none when the widths agree), fusion with the upsampled deeper map, 2x upsample."""

    def __init__(self, in_channels: int, width: int, fuse: bool) -> None:
        super().__init__()
        self.convolution: nn.Module = nn.Conv2d(in_channels, width, kernel_size=1) if in_channels != width else nn.Identity()
        self.fusion = SelectiveFeatureFusion(width) if fuse else None

    def forward(self, x: torch.Tensor, deeper: torch.Tensor | None) -> torch.Tensor:
        x = self.convolution(x)
        if self.fusion is not None and deeper is not None:
            if deeper.shape[2:] != x.shape[2:]:
                raise ValueError(
                    f"GLPN's decoder needs each stage to be exactly twice the size of the next (input height and "
                    f"width multiples of 32); got a {tuple(x.shape[2:])} stage under a {tuple(deeper.shape[2:])} "
                    f"upsampled one"
                )
            x = self.fusion(x, deeper)
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class GLPNDecoder(nn.Module):
    """From the deepest stage up: each stage fused with the 2x-upsampled result of the one below it; the last
    output is upsampled once more, to the input's resolution. Returns every stage's output, shallowest last."""

    def __init__(self, hidden_sizes: Sequence[int], width: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            _DecoderStage(c, width, fuse=i > 0) for i, c in enumerate(reversed(list(hidden_sizes)))
        )

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        outputs: list[torch.Tensor] = []
        x = None
        for feature, stage in zip(reversed(list(features)), self.stages):
            x = stage(feature, x)
            outputs.append(x)
        outputs[-1] = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return outputs


class GLPNDepthHead(nn.Module):
    """3x3 conv, ReLU, 3x3 conv to one channel; depth = sigmoid * ``max_depth``."""

    def __init__(self, width: int, max_depth: float, in_index: int = -1) -> None:
        super().__init__()
        self.max_depth = max_depth
        self.in_index = in_index
        self.head = nn.Sequential(
            nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 1, kernel_size=3, stride=1, padding=1),
        )

    def forward(self, decoded: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.head(decoded[self.in_index])  # (B, 1, H, W)
        return (torch.sigmoid(x) * self.max_depth).squeeze(1)  # (B, H, W)


def silog_loss(pred: torch.Tensor, target: torch.Tensor, lambd: float = 0.5) -> torch.Tensor:
    """Scale-invariant log loss (Eigen et al. 2014) as GLPN computes it, over pixels with ``target > 0``:
    ``sqrt(mean(d^2) - lambd * mean(d)^2)`` with ``d = log(target) - log(pred)``; 0 where no pixel has depth."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"depth labels must be a torch.Tensor, got {type(target).__name__}")
    if target.shape != pred.shape:
        raise ValueError(f"depth labels must have the prediction's shape {tuple(pred.shape)}, got {tuple(target.shape)}")
    target = target.to(pred.device)
    valid = (target > 0).detach()
    if torch.compiler.is_compiling():
        # One graph under torch.compile(fullgraph=True): the branch below and the selection by a mask are data
        # dependent. Masked sums over all pixels instead (other rounding than eager's means of the selected ones).
        count = valid.sum()
        has = count > 0
        diff = torch.log(torch.where(valid, target, 1.0)) - torch.log(torch.where(valid, pred, 1.0))  # 0 off the mask
        n = count.clamp_min(1)
        inner = torch.pow(diff, 2).sum() / n - lambd * torch.pow(diff.sum() / n, 2)
        # sqrt of 1 where no pixel is measured: its gradient there is finite, and where() sends it none.
        return torch.where(has, torch.sqrt(torch.where(has, inner, 1.0)), pred.sum() * 0.0)
    if not bool(valid.any()):
        # No measured pixel (a frame the sensor got nothing back for): nothing to learn, a zero that keeps the graph
        # (every parameter gets a zero gradient, as DDP needs). The mean over no pixel was NaN, and training stopped
        # saying the loss diverged.
        return pred.sum() * 0.0
    diff = torch.log(target[valid]) - torch.log(pred[valid])
    return torch.sqrt(torch.pow(diff, 2).mean() - lambd * torch.pow(diff.mean(), 2))


class PvtV2ForDepthEstimation(PvtV2PreTrainedModel):
    """The PVTv2 encoder with GLPN's decoder and head: a (B, H, W) depth map at the input's resolution.

    Input height and width must be multiples of 32 (the decoder fuses each stage with the 2x-upsampled next one).
    Loads transformers' ``GLPNForDepthEstimation`` checkpoints, and any PVTv2 / SegFormer encoder for fine-tuning.
    """

    encoder_prefix = "pvt_v2."
    head_prefixes = ("decoder.", "head.")

    def __init__(self, config: PvtV2Config) -> None:
        if not isinstance(config, PvtV2Config):
            raise TypeError(f"config must be a PvtV2Config, got {type(config).__name__}")
        config = depth_config(config)
        super().__init__(config)
        self.pvt_v2 = PvtV2Model(config)
        self.decoder = GLPNDecoder(config.hidden_sizes, config.decoder_hidden_size)
        self.head = GLPNDepthHead(config.decoder_hidden_size, config.max_depth, config.head_in_index)
        self.post_init()
        init_head_weights(self.decoder, config.initializer_range)
        init_head_weights(self.head, config.initializer_range)

    def init_new_module(self, module: nn.Module) -> None:
        """A head module the checkpoint did not provide: transformers' initialisation of this head."""
        init_head_weights(module, self.config.initializer_range)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> DepthEstimatorOutput | tuple:
        output_attentions, output_hidden_states, return_dict = resolve_output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        out = self.pvt_v2(pixel_values, output_attentions, output_hidden_states=True, return_dict=True)
        depth = self.head(self.decoder(out.hidden_states))  # (B, H, W)
        loss = silog_loss(depth, labels) if labels is not None else None
        result = DepthEstimatorOutput(
            loss=loss,
            predicted_depth=depth,
            hidden_states=out.hidden_states if output_hidden_states else None,
            attentions=out.attentions,
        )
        return result if return_dict else result.to_tuple()
