"""Semantic segmentation on the PVTv2 (Mix Transformer) encoder: SegFormer's all-MLP decode head, or Semantic FPN.

``PvtV2ForSemanticSegmentation`` puts SegFormer's decode head on the encoder's four stages (the default). It follows
transformers' ``SegformerForSemanticSegmentation`` operation for operation, and the head keeps that class's module
names, so a SegFormer checkpoint loads by renaming the encoder keys only (``pvtv2.weights.layouts``). The encoder is
the library's own ``PvtV2Model`` under ``pvt_v2.``, so any PVTv2 classification checkpoint initialises it for
fine-tuning.

``head="fpn"`` (``config.decode_head_type = "fpn"``) puts the head of the PVTv2 paper's ADE20K table instead:
Semantic FPN (Kirillov et al. 2019) as mmsegmentation builds it in ``fpn_r50.py``, the base of the authors'
``fpn_pvt_*_ade20k_40k.py`` configs: an FPN neck (1x1 lateral convs to 256 channels, top-down nearest upsampling,
3x3 output convs) and mmsegmentation's ``FPNHead`` (per level 3x3 conv + BN + ReLU blocks to 128 channels with 2x
bilinear upsampling down to stride 4, summed; dropout 0.1; a 1x1 classifier). With 150 classes it has the paper's
parameter counts (7.6M for B0, 17.8M for B1, ...).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import SEGMENTATION_DEFAULTS, PvtV2Config
from .layers import init_head_weights, init_norm
from .modeling import PvtV2Model, PvtV2PreTrainedModel, host_checkable_labels, resolve_output_flags
from .outputs import ModelOutput, exportable

__all__ = [
    "DECODE_HEAD_TYPES",
    "PvtV2ForSemanticSegmentation",
    "SegformerDecodeHead",
    "SemanticFPNHead",
    "SemanticSegmenterOutput",
    "segmentation_config",
    "semantic_segmentation_loss",
]

# The decode heads by the name a config gives in ``decode_head_type`` (absent: SegFormer's).
DECODE_HEAD_TYPES = ("segformer", "fpn")

logger = logging.getLogger(__name__)


@exportable
@dataclass
class SemanticSegmenterOutput(ModelOutput):
    """``logits``: (B, num_labels, H/4, W/4) per-pixel class scores at the first stage's resolution."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def segmentation_config(config: PvtV2Config, head: str | None = None) -> PvtV2Config:
    """``config`` with the head defaults filled in where unset (256 wide, dropout 0.1, ignore index 255) and, when
    ``head`` is given, ``decode_head_type`` set to it (``"segformer"`` or ``"fpn"``)."""
    current = getattr(config, "decode_head_type", None)
    if head is not None and head != (current or "segformer"):
        config = config.replace(decode_head_type=head)
    kind = getattr(config, "decode_head_type", None)
    if kind is not None and kind not in DECODE_HEAD_TYPES:
        raise ValueError(f"decode_head_type must be one of {list(DECODE_HEAD_TYPES)}, got {kind!r}")
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


# ---------------------------------------------------------------------------------------------- Semantic FPN
class _ConvModule(nn.Sequential):
    """mmcv's ``ConvModule``: a conv, then (when asked) BatchNorm and ReLU; the conv has a bias only without norm."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not norm)
        if norm:
            self.bn = nn.BatchNorm2d(out_channels)
            self.activate = nn.ReLU()


class FPNNeck(nn.Module):
    """The feature pyramid (mmsegmentation's ``FPN`` with ``num_outs`` = the number of stages): lateral 1x1 convs
    to ``width``, each level plus the nearest-upsampled level above it (from the top down), then a 3x3 conv per level.
    No norms or activations, as in ``fpn_r50.py``."""

    def __init__(self, in_channels: Sequence[int], width: int) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(_ConvModule(c, width, 1, norm=False) for c in in_channels)
        self.fpn_convs = nn.ModuleList(_ConvModule(width, width, 3, norm=False) for _ in in_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]  # (B, width, H_i, W_i)
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.fpn_convs, laterals)]


class SemanticFPNHead(nn.Module):
    """Semantic FPN: the FPN neck, then mmsegmentation's ``FPNHead``: for the level of stride ``4 * 2**i``, ``max(1, i)``
    blocks of 3x3 conv + BatchNorm + ReLU to ``channels``, each followed (below stride 4) by a 2x bilinear upsampling;
    the levels summed at stride 4, then ``Dropout2d`` and a 1x1 classifier. Logits at 1/4 of the input, like
    SegFormer's head."""

    def __init__(
        self, in_channels: Sequence[int], width: int, channels: int, num_labels: int, dropout: float
    ) -> None:
        super().__init__()
        self.neck = FPNNeck(in_channels, width)
        self.scale_heads = nn.ModuleList()
        for level in range(len(in_channels)):
            blocks: list[nn.Module] = []
            for k in range(max(1, level)):
                blocks.append(_ConvModule(width if k == 0 else channels, channels, 3, norm=True))
                if level > 0:
                    blocks.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*blocks))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_labels, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        pyramid = self.neck(features)
        x = self.scale_heads[0](pyramid[0])  # (B, channels, H/4, W/4)
        for level in range(1, len(pyramid)):
            # mmsegmentation resizes each level to the first one's size (they differ when the input is no multiple
            # of 32).
            up = self.scale_heads[level](pyramid[level])
            x = x + F.interpolate(up, size=x.shape[2:], mode="bilinear", align_corners=False)
        return self.classifier(self.dropout(x))  # (B, num_labels, H/4, W/4)


def init_fpn_weights(head: SemanticFPNHead, only: nn.Module | None = None) -> None:
    """mmsegmentation's initialisation of Semantic FPN: the neck's convs Xavier-uniform, the head's convs Kaiming
    (normal, fan-out, ReLU), BatchNorm 1 / 0, the classifier normal(0, 0.01); biases zero. With ``only``, just that
    module of the head and its children (a head part a checkpoint lacked)."""
    inside = only is None
    for name, m in head.named_modules():
        if only is not None:
            inside = m is only or any(m is child for child in only.modules())
        if not inside:
            continue
        if isinstance(m, nn.Conv2d):
            if name.startswith("neck."):
                nn.init.xavier_uniform_(m.weight)
            elif name == "classifier":
                nn.init.normal_(m.weight, 0.0, 0.01)
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            init_norm(m)


def semantic_segmentation_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255
) -> torch.Tensor:
    """SegFormer's loss: logits upsampled (bilinear) to the label size, then cross-entropy skipping ``ignore_index``
    (0 for a batch whose every pixel is ignored);
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
    # The class range is checked on labels that arrive on the CPU, before they move (as the classifier's loss does):
    # on a GPU the check would stall every step on the host, and cross_entropy's device-side check stops bad labels
    # there. Not under torch.compile either: a data-dependent check splits the graph. Nor for labels batched by
    # torch.func's vmap, which no mask indexes (cross_entropy's own check raises; the one-class BCE takes any value).
    host = labels if host_checkable_labels(labels) else None
    labels = labels.to(logits.device)
    upsampled = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    if num_labels == 1:
        # Binary targets are 0 and 1: a 2 would be taken as a probability of 2 by the BCE, without an error.
        if host is not None:
            kept = host[host != ignore_index]
            if kept.numel() and ((kept != 0) & (kept != 1)).any():
                bad = kept[(kept != 0) & (kept != 1)].unique()[:10].tolist()
                raise ValueError(
                    f"label values {bad} are out of range for a one-class (binary) model: 0 (background), 1 (the "
                    f"class), or {ignore_index} to ignore"
                )
        valid = ((labels >= 0) & (labels != ignore_index)).float()
        loss = F.binary_cross_entropy_with_logits(upsampled.squeeze(1), labels.float(), reduction="none")
        return (loss * valid).mean()
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"segmentation labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.long()
    valid = None if host is None else host.long()[host != ignore_index]
    if valid is not None and valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_labels):
        bad = valid[(valid < 0) | (valid >= num_labels)].unique()[:10].tolist()
        raise ValueError(
            f"label values {bad} are out of range for {num_labels} classes (valid: 0..{num_labels - 1}, or "
            f"{ignore_index} to ignore)"
        )
    # The mean over the labelled pixels, as cross_entropy's "mean" takes it, but 0 (with a zero gradient) for a batch
    # without any: its mean over nothing was NaN, and training stopped saying the loss diverged (an unlabelled image
    # or crop, ADE20K's 0 reduced to the ignore value). No host sync: the count stays on the device.
    total = F.cross_entropy(upsampled, labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp(min=1)


class PvtV2ForSemanticSegmentation(PvtV2PreTrainedModel):
    """The PVTv2 encoder and a decode head: per-pixel class logits at 1/4 of the input resolution.

    ``head`` (or the config's ``decode_head_type``): ``"segformer"`` (the default), SegFormer's all-MLP head, which
    loads transformers' ``SegformerForSemanticSegmentation`` checkpoints (and ``SegformerModel`` /
    ``SegformerForImageClassification`` ones, or any PVTv2 classifier, for the encoder only); or ``"fpn"``, Semantic
    FPN, the PVTv2 paper's ADE20K head (neck ``decoder_hidden_size`` = 256 wide, head half that, 128). Either head
    sits under ``decode_head.`` with its classifier as ``decode_head.classifier``.
    """

    encoder_prefix = "pvt_v2."
    head_prefixes = ("decode_head.",)
    classifier_prefix = "decode_head.classifier."

    def __init__(self, config: PvtV2Config, head: str | None = None) -> None:
        if not isinstance(config, PvtV2Config):
            raise TypeError(f"config must be a PvtV2Config, got {type(config).__name__}")
        if head is not None and head not in DECODE_HEAD_TYPES:
            raise ValueError(f"head must be one of {list(DECODE_HEAD_TYPES)}, got {head!r}")
        config = segmentation_config(config, head)
        if config.num_labels < 1:
            raise ValueError(f"a segmentation model needs num_labels >= 1, got {config.num_labels}")
        super().__init__(config)
        self.pvt_v2 = PvtV2Model(config)
        if self.head_type == "fpn":
            if config.decoder_hidden_size < 2:
                raise ValueError(f"Semantic FPN needs decoder_hidden_size >= 2, got {config.decoder_hidden_size}")
            self.decode_head: nn.Module = SemanticFPNHead(
                config.hidden_sizes,
                config.decoder_hidden_size,
                config.decoder_hidden_size // 2,
                config.num_labels,
                config.classifier_dropout_prob,
            )
        else:
            self.decode_head = SegformerDecodeHead(
                config.hidden_sizes, config.decoder_hidden_size, config.num_labels, config.classifier_dropout_prob
            )
        self.post_init()
        self.init_new_module(self.decode_head)

    @property
    def head_type(self) -> str:
        """``"segformer"`` or ``"fpn"``."""
        return getattr(self.config, "decode_head_type", None) or "segformer"

    def init_new_module(self, module: nn.Module) -> None:
        """A head module the checkpoint did not provide: the initialisation of its reference (transformers' for
        SegFormer's head, mmsegmentation's for Semantic FPN)."""
        if self.head_type == "fpn" and any(module is m for m in self.decode_head.modules()):
            init_fpn_weights(self.decode_head, only=None if module is self.decode_head else module)
        else:
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
