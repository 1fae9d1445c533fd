"""Semantic segmentation on the PVTv2 (Mix Transformer) encoder: SegFormer's all-MLP decode head.

``PvtV2ForSemanticSegmentation`` puts SegFormer's decode head on the encoder's four stages. It follows transformers'
``SegformerForSemanticSegmentation`` operation for operation, and the head keeps that class's module names, so a
SegFormer checkpoint loads by renaming the encoder keys only (``pvtv2.weights.layouts``). The encoder is the
library's own ``PvtV2Model`` under ``pvt_v2.``, so any PVTv2 classification checkpoint initialises it for fine-tuning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import SEGMENTATION_DEFAULTS, PvtV2Config
from .layers import init_head_weights
from .modeling import PvtV2Model, PvtV2PreTrainedModel, resolve_output_flags
from .outputs import ModelOutput

__all__ = [
    "SemanticSegmenterOutput",
    "SegformerDecodeHead",
    "PvtV2ForSemanticSegmentation",
    "semantic_segmentation_loss",
    "segmentation_config",
]

logger = logging.getLogger(__name__)


@dataclass
class SemanticSegmenterOutput(ModelOutput):
    """``logits``: (B, num_labels, H/4, W/4) per-pixel class scores at the first stage's resolution."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def segmentation_config(config: PvtV2Config) -> PvtV2Config:
    """``config`` with SegFormer's head defaults filled in where unset (256 wide, dropout 0.1, ignore index 255)."""
    return config.with_defaults(**SEGMENTATION_DEFAULTS)


# ---------------------------------------------------------------------------------------------- SegFormer
class _LinearProjection(nn.Module):
    """A per-pixel linear map of a (B, C, H, W) map to ``width`` channels (SegFormer's ``SegformerMLP``)."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        x = self.proj(x.flatten(2).transpose(1, 2))  # (B, H*W, width)
        return x.transpose(1, 2).reshape(batch, -1, height, width)  # (B, width, H, W)


class SegformerDecodeHead(nn.Module):
    """SegFormer's all-MLP decoder: project every stage to ``width``, upsample to the first stage's size, concatenate
    (last stage first, as the reference does), fuse with a 1x1 conv + BatchNorm + ReLU, dropout, 1x1 classifier."""

    def __init__(self, in_channels: Sequence[int], width: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.linear_c = nn.ModuleList(_LinearProjection(c, width) for c in in_channels)
        self.linear_fuse = nn.Conv2d(width * len(in_channels), width, kernel_size=1, bias=False)
        self.batch_norm = nn.BatchNorm2d(width)
        self.activation = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(width, num_labels, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[2:]
        maps = [
            F.interpolate(proj(f), size=size, mode="bilinear", align_corners=False)  # (B, width, H/4, W/4)
            for f, proj in zip(features, self.linear_c)
        ]
        x = self.linear_fuse(torch.cat(maps[::-1], dim=1))
        x = self.dropout(self.activation(self.batch_norm(x)))
        return self.classifier(x)  # (B, num_labels, H/4, W/4)


def semantic_segmentation_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255
) -> torch.Tensor:
    """SegFormer's loss: logits upsampled (bilinear) to the label size, then cross-entropy skipping ``ignore_index``;
    with one label, binary cross-entropy with logits averaged over all pixels, ignored ones counted as zero loss.

    ``labels``: (B, H, W) class indices; ``logits``: (B, K, h, w).
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must be (batch, height, width) label maps for a batch of {logits.shape[0]}, got shape "
            f"{tuple(labels.shape)}"
        )
    num_labels = logits.shape[1]
    if num_labels < 1:
        raise ValueError(f"the segmentation loss needs at least one label, the model has {num_labels}")
    labels = labels.to(logits.device)
    upsampled = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    if num_labels == 1:
        valid = ((labels >= 0) & (labels != ignore_index)).float()
        loss = F.binary_cross_entropy_with_logits(upsampled.squeeze(1), labels.float(), reduction="none")
        return (loss * valid).mean()
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"segmentation labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.long()
    valid = labels[labels != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_labels):
        bad = valid[(valid < 0) | (valid >= num_labels)].unique()[:10].tolist()
        raise ValueError(
            f"label values {bad} are out of range for {num_labels} classes (valid: 0..{num_labels - 1}, or "
            f"{ignore_index} to ignore)"
        )
    return F.cross_entropy(upsampled, labels, ignore_index=ignore_index)


class PvtV2ForSemanticSegmentation(PvtV2PreTrainedModel):
    """The PVTv2 encoder and SegFormer's decode head: per-pixel class logits at 1/4 of the input resolution.

    Loads transformers' ``SegformerForSemanticSegmentation`` checkpoints (and ``SegformerModel`` /
    ``SegformerForImageClassification`` ones, or any PVTv2 classifier, for the encoder only).
    """

    encoder_prefix = "pvt_v2."
    head_prefixes = ("decode_head.",)
    classifier_prefix = "decode_head.classifier."

    def __init__(self, config: PvtV2Config) -> None:
        if not isinstance(config, PvtV2Config):
            raise TypeError(f"config must be a PvtV2Config, got {type(config).__name__}")
        config = segmentation_config(config)
        if config.num_labels < 1:
            raise ValueError(f"a segmentation model needs num_labels >= 1, got {config.num_labels}")
        super().__init__(config)
        self.pvt_v2 = PvtV2Model(config)
        self.decode_head = SegformerDecodeHead(
            config.hidden_sizes, config.decoder_hidden_size, config.num_labels, config.classifier_dropout_prob
        )
        self.post_init()
        init_head_weights(self.decode_head, config.initializer_range)

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
    ) -> SemanticSegmenterOutput | tuple:
        output_attentions, output_hidden_states, return_dict = resolve_output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        out = self.pvt_v2(pixel_values, output_attentions, output_hidden_states=True, return_dict=True)
        logits = self.decode_head(out.hidden_states)  # (B, K, H/4, W/4)
        loss = None
        if labels is not None:
            loss = semantic_segmentation_loss(logits, labels, self.config.semantic_loss_ignore_index)
        hidden_states = None
        if output_hidden_states:
            hidden_states = out.hidden_states
            if not self.config.reshape_last_stage:
                # SegFormer's reshape_last_stage=False: the last stage stays tokens (B, N, C).
                hidden_states = hidden_states[:-1] + (hidden_states[-1].flatten(2).transpose(1, 2),)
        result = SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=hidden_states, attentions=out.attentions)
        return result if return_dict else result.to_tuple()
