"""Dense prediction on the PVTv2 (Mix Transformer) encoder: SegFormer's semantic segmentation and GLPN's depth.

``PvtV2ForSemanticSegmentation`` puts SegFormer's all-MLP decode head on the encoder's four stages;
``PvtV2ForDepthEstimation`` puts GLPN's decoder (selective feature fusion) and depth head on them. Both follow
transformers' ``SegformerForSemanticSegmentation`` and ``GLPNForDepthEstimation`` operation for operation, and
their heads keep those classes' module names, so a SegFormer / GLPN checkpoint loads by renaming the encoder keys
only (``pvtv2.checkpoints``). The encoder is the library's own ``PvtV2Model`` under ``pvt_v2.``, so any PVTv2
classification checkpoint initialises it for fine-tuning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import PvtV2Config
from .modeling import PvtV2Model, PvtV2PreTrainedModel, _flags
from .outputs import ModelOutput

__all__ = [
    "SemanticSegmenterOutput",
    "DepthEstimatorOutput",
    "SegformerDecodeHead",
    "SelectiveFeatureFusion",
    "GLPNDecoder",
    "GLPNDepthHead",
    "PvtV2ForSemanticSegmentation",
    "PvtV2ForDepthEstimation",
    "semantic_segmentation_loss",
    "silog_loss",
    "segmentation_config",
    "depth_config",
    "predict_segmentation",
    "predict_depth",
    "segmentation_picture",
    "depth_picture",
    "colorize_depth",
    "viridis_lut",
    "palette",
]

logger = logging.getLogger(__name__)

# The task defaults of transformers' SegformerConfig and GLPNConfig.
SEGMENTATION_DEFAULTS = dict(
    decoder_hidden_size=256, classifier_dropout_prob=0.1, semantic_loss_ignore_index=255, reshape_last_stage=True
)
DEPTH_DEFAULTS = dict(decoder_hidden_size=64, max_depth=10.0, head_in_index=-1)


@dataclass
class SemanticSegmenterOutput(ModelOutput):
    """``logits``: (B, num_labels, H/4, W/4) per-pixel class scores at the first stage's resolution."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class DepthEstimatorOutput(ModelOutput):
    """``predicted_depth``: (B, H, W) depth in ``[0, max_depth]`` at the input's resolution."""

    loss: torch.Tensor | None = None
    predicted_depth: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@torch.no_grad()
def _init_head(module: nn.Module, std: float) -> None:
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


def _with_defaults(config: PvtV2Config, defaults: dict) -> PvtV2Config:
    missing = {k: v for k, v in defaults.items() if getattr(config, k) is None}
    return config.replace(**missing) if missing else config


def segmentation_config(config: PvtV2Config) -> PvtV2Config:
    """``config`` with SegFormer's head defaults filled in where unset (256 wide, dropout 0.1, ignore index 255)."""
    return _with_defaults(config, SEGMENTATION_DEFAULTS)


def depth_config(config: PvtV2Config) -> PvtV2Config:
    """``config`` with GLPN's head defaults filled in where unset (64 wide, max depth 10, the last decoder output)."""
    return _with_defaults(config, DEPTH_DEFAULTS)


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
        _init_head(self.decode_head, config.initializer_range)

    def init_new_module(self, module: nn.Module) -> None:
        """Initialise a module that a checkpoint did not provide (called by ``from_pretrained``)."""
        _init_head(module, self.config.initializer_range)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> SemanticSegmenterOutput | tuple:
        output_attentions, output_hidden_states, return_dict = _flags(
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
    ``sqrt(mean(d^2) - lambd * mean(d)^2)`` with ``d = log(target) - log(pred)``."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"depth labels must be a torch.Tensor, got {type(target).__name__}")
    if target.shape != pred.shape:
        raise ValueError(f"depth labels must have the prediction's shape {tuple(pred.shape)}, got {tuple(target.shape)}")
    target = target.to(pred.device)
    valid = (target > 0).detach()
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
        _init_head(self.decoder, config.initializer_range)
        _init_head(self.head, config.initializer_range)

    def init_new_module(self, module: nn.Module) -> None:
        """Initialise a module that a checkpoint did not provide (called by ``from_pretrained``)."""
        _init_head(module, self.config.initializer_range)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> DepthEstimatorOutput | tuple:
        output_attentions, output_hidden_states, return_dict = _flags(
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


# ---------------------------------------------------------------------------------------------- predictions, pictures
# Viridis, sampled at 17 evenly spaced points (matplotlib's table); interpolated to 256 entries below.
_VIRIDIS_ANCHORS = (
    (68, 1, 84), (72, 24, 106), (71, 45, 123), (66, 64, 134), (59, 82, 139), (51, 99, 141),
    (44, 114, 142), (38, 130, 142), (33, 145, 140), (31, 159, 136), (39, 173, 129), (61, 188, 116),
    (92, 200, 99), (129, 211, 77), (170, 220, 50), (213, 226, 26), (253, 231, 37),
)
# Distinct colours for the first classes (background first); further ones are spread around the hue circle.
_PALETTE = (
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128),
)


def viridis_lut() -> np.ndarray:
    """A (256, 3) uint8 lookup table of the viridis colour map (no matplotlib needed)."""
    anchors = np.asarray(_VIRIDIS_ANCHORS, dtype=np.float64)
    positions = np.linspace(0, 255, len(anchors))
    table = np.stack([np.interp(np.arange(256), positions, anchors[:, c]) for c in range(3)], axis=1)
    return np.round(table).astype(np.uint8)


def colorize_depth(depth: np.ndarray) -> np.ndarray:
    """(H, W) depth -> (H, W, 3) uint8 viridis picture, stretched between the map's own minimum and maximum."""
    depth = np.asarray(depth, dtype=np.float64)
    low, high = float(np.nanmin(depth)), float(np.nanmax(depth))
    scaled = (depth - low) / (high - low) if high > low else np.zeros_like(depth)
    return viridis_lut()[np.clip(np.round(scaled * 255), 0, 255).astype(np.int64)]


def palette(num_labels: int) -> np.ndarray:
    """(num_labels, 3) uint8 class colours: a fixed table, then hues spaced by the golden angle."""
    import colorsys

    colours = list(_PALETTE[:num_labels])
    for i in range(len(colours), num_labels):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.95)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return np.asarray(colours, dtype=np.uint8).reshape(-1, 3)


@torch.no_grad()
def predict_segmentation(model: PvtV2ForSemanticSegmentation, image, size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W) class indices for a PIL image, at the image's own resolution.

    The image is resized to ``size`` (default: ``config.image_size``) and normalised with ImageNet's statistics,
    as SegFormer's processor does; the logits are upsampled (bilinear) back to the image before the argmax.
    """
    from .processing import PvtV2ImageProcessor

    size = tuple(size or model.config.image_size)
    pixels = PvtV2ImageProcessor(size={"height": size[0], "width": size[1]})(image)["pixel_values"]
    logits = model.eval()(pixels.to(model.device, model.dtype)).logits
    logits = F.interpolate(logits.float(), size=(image.height, image.width), mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].cpu().numpy()


@torch.no_grad()
def predict_depth(model: PvtV2ForDepthEstimation, image, size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W) depth for a PIL image, at the image's own resolution.

    As GLPN's processor: the image is resized to ``size`` (default: its own size rounded down to multiples of 32)
    and rescaled to [0, 1], not normalised; the prediction is resized back (bilinear).
    """
    from .processing import PvtV2ImageProcessor

    if size is None:
        size = (max(32, image.height // 32 * 32), max(32, image.width // 32 * 32))
    pixels = PvtV2ImageProcessor(size={"height": size[0], "width": size[1]}, do_normalize=False)(image)["pixel_values"]
    depth = model.eval()(pixels.to(model.device, model.dtype)).predicted_depth  # (1, h, w)
    depth = F.interpolate(depth[:, None].float(), size=(image.height, image.width), mode="bilinear", align_corners=False)
    return depth[0, 0].cpu().numpy()


LEGEND_WIDTH = 180


def segmentation_picture(image, label_map, id2label: dict[int, str], alpha: float = 0.5):
    """The image with its label map blended over it (``alpha``), and a legend of the classes present to its right.

    Returns a PIL image ``LEGEND_WIDTH`` wider than ``image``, as tall as the taller of the two.
    """
    import PIL.Image
    import PIL.ImageDraw

    label_map = np.asarray(label_map)
    if label_map.shape != (image.height, image.width):
        raise ValueError(f"label map of shape {label_map.shape} does not match the image's {(image.height, image.width)}")
    colours = palette(max(len(id2label), int(label_map.max()) + 1))
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = (1 - alpha) * rgb + alpha * colours[label_map].astype(np.float32)
    present = [int(c) for c in np.unique(label_map)]
    row = 20
    height = max(image.height, row * len(present) + 10)
    canvas = PIL.Image.new("RGB", (image.width + LEGEND_WIDTH, height), (255, 255, 255))
    canvas.paste(PIL.Image.fromarray(np.round(blended).astype(np.uint8)), (0, 0))
    draw = PIL.ImageDraw.Draw(canvas)
    for i, c in enumerate(present):
        top = 5 + i * row
        draw.rectangle([image.width + 6, top, image.width + 20, top + 14], fill=tuple(int(v) for v in colours[c]),
                       outline=(0, 0, 0))
        draw.text((image.width + 26, top + 1), id2label.get(c, f"class_{c}")[:24], fill=(0, 0, 0))
    return canvas


def depth_picture(image, depth):
    """The image and its viridis-coloured depth map side by side (twice the image's width)."""
    import PIL.Image

    depth = np.asarray(depth)
    if depth.shape != (image.height, image.width):
        raise ValueError(f"depth map of shape {depth.shape} does not match the image's {(image.height, image.width)}")
    canvas = PIL.Image.new("RGB", (image.width * 2, image.height))
    canvas.paste(image.convert("RGB"), (0, 0))
    canvas.paste(PIL.Image.fromarray(colorize_depth(depth)), (image.width, 0))
    return canvas
