"""Object detection and instance segmentation on the PVTv2 encoder: torchvision's detectors with a PVTv2 + FPN backbone.

``PvtV2ForObjectDetection`` composes, as the original repository's mmdetection configs do:

- the PVTv2 encoder (the library's ``PvtV2Model``, under ``pvt_v2.``, so every classification checkpoint initialises
  it and a saved detector's encoder keys are the published ones);
- torchvision's ``FeaturePyramidNetwork`` (256 channels) on some of its stages, with extra levels;
- one of torchvision's detectors on top (``RetinaNet``, ``FasterRCNN``, ``MaskRCNN``, ``FCOS``), with its own image
  transform (resize so that the shorter side is ``min_size`` and the longer at most ``max_size``, ImageNet
  normalisation, padding to a multiple of 32), anchors, losses, box coder, NMS and RoIAlign.

The original configurations (``detection/configs`` of the PVT repository):

========================  ======================  ===========================================  =============
detector                  FPN inputs              extra levels                                 strides
========================  ======================  ===========================================  =============
RetinaNet                 stages 2-4              P6 from C5 (``on_input``), P7 from ReLU(P6)  8 ... 128
Faster / Mask R-CNN       stages 1-4              P6 by max-pooling P5                         4 ... 64
FCOS (not in the paper)   stages 2-4              P6 from P5 (``on_output``), P7 from P6       8 ... 128
========================  ======================  ===========================================  =============

torchvision's ``LastLevelP6P7`` takes P5 when its input and output widths are equal, C5 otherwise; B0's last stage is
256 wide, the FPN's width, so the RetinaNet levels force C5 explicitly (``use_P5 = False``).

Two conventions (``config.detection_convention``). ``"torchvision"`` (the default): torchvision's modules as they
are. ``"mmdetection"`` (RetinaNet, Faster and Mask R-CNN; set when an mmdetection file of one is read whole,
which ``pvtv2.weights.layouts`` renames into this model): where mmdetection computes otherwise, its arithmetic
(``pvtv2.models.mmdet_convention``). RetinaNet: P7 from P6 itself, without the ReLU that torchvision (and the RetinaNet paper) put
between them; anchors of ``stride * 4 * 2^(k/3)``, not truncated to integers, base anchors not rounded, laid at each
level's nominal stride (torchvision takes ``padded size // grid size``: 61 for P6 of an 800-pixel side). The head's
tensors and channel orders (anchor-major; ratio-major, scale-minor anchors; deltas dx, dy, dw, dh with means 0 and
stds 1, dw / dh clamped at log(1000 / 16)), the test settings (sigmoid scores above 0.05, the 1000 best
(anchor, class) pairs per level, class-wise NMS at IoU 0.5, 100 per image) and the boxes clipped to the resized image
are the same in both. What is left of torchvision's in that mode, and differs from mmdetection 2.x:

- resizing: torchvision interpolates the float image bilinearly to ``floor(side * scale)``; mmdetection (mmcv's
  ``imrescale``, cv2) to ``round(side * scale)`` on the 8-bit image, rounded back to 8 bits before normalising. The
  detections move by a fraction of a pixel; on an image already at the test scale (and a multiple of 32 as padded)
  there is no difference;
- the candidates before NMS: the mmdetection 2.x releases before ``filter_scores_and_topk`` (the dense heads'
  ``get_bboxes`` rewrite of 2.18 / 2.19) kept per level the 1000 anchors with the highest best-class score and then
  every class of them above 0.05; later releases, torchvision and pvtv2 the 1000 best (anchor, class) pairs above
  0.05. With many confident classes per anchor the lists differ at the bottom;
- mmdetection scales the boxes back to the input image before NMS, torchvision after; the IoUs differ only as far as
  the horizontal and vertical scales differ (by the rounding of the resized size).

Faster / Mask R-CNN under ``"mmdetection"``: the RPN's anchors (``8 * stride``, ratios 0.5, 1, 2) unrounded at
the nominal strides, as RetinaNet's; the RoI features by mmdetection's ``SingleRoIExtractor``: mmcv's RoIAlign with
``aligned=True`` (the half-pixel shift) and ``sampling_ratio=0`` (``ceil(bin size)`` samples per bin) on the level
``floor(log2(sqrt(area) / 56 + 1e-6))`` clamped to P2-P5 (torchvision's ``MultiScaleRoIAlign``: ``aligned=False``,
and we pass it 2 samples). The file's box classifier is reordered on reading (mmdetection's background is its last
class, torchvision's its first; the background's box deltas and mask logits, which mmdetection does not have and
torchvision does not read at inference, are zeros). The same in both: the FPN with P6 = max_pool(P5, 1, stride 2),
the RPN head and its box coder (means 0, stds 1), its test settings (the 1000 best per level, NMS at IoU 0.7 per
level, 1000 proposals), the box head (two 1024-wide layers with ReLU), its coder (stds 0.1, 0.1, 0.2, 0.2, torchvision's
weights 10, 10, 5, 5), softmax scores above 0.05, class-wise NMS at 0.5, 100 per image, and the mask head (four
3x3 convolutions, a stride-2 transposed one, 28 x 28 logits of the label's class), pasted as mmdetection pastes them
(``grid_sample`` at the pixel centres mapped into the box). What differs, besides the resizing and the scaling
before NMS above:

- proposals without area: mmdetection 2.13 (the authors' release; ``min_bbox_size=0`` filters nothing) keeps
  them, and they take places among the 1000 and can come out as detections without area; 2.18 and later drop them
  (``w, h > 0``), torchvision too (``w, h >= 1e-3``; detections under 1e-2 as well);
- box deltas: torchvision clamps ``dw``, ``dh`` at ``log(1000 / 16)`` from above only, mmdetection from both sides:
  boxes shrunk more than 62-fold from their anchor or proposal differ;
- masks: pasted into the image as mmdetection 2.x pastes them (``grid_sample`` at the pixel centres mapped into the
  exact box, not torchvision's bilinear resize into the box widened by a cell and rounded to pixels), but returned
  as probabilities, as torchvision's; mmdetection returns them thresholded at 0.5 (``mask_thr_binary``), which
  pvtv2's COCO evaluation applies too;
- training keeps torchvision's losses and samplers (smooth L1 with beta 1/9 for both box regressions, where
  mmdetection 2.x's configs have L1; 2000 proposals per image, where they have 1000).

FCOS files of mmdetection, and the cascades' (``roi_head.bbox_head.{stage}.``), are read for their backbone only.

Labels: a detector's classes are the config's ``id2label`` (``0 .. num_labels - 1``); there is no background class in
targets or outputs. RetinaNet and FCOS classify with one sigmoid per class (``num_labels`` outputs); the R-CNNs'
softmax has a background class at 0, so their labels are shifted by one inside, never outside.

torchvision is an optional dependency (``pip install 'pvtv2[detection]'``): importing this module does not need it,
building a detector does.
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..runtime import import_optional
from .config import PvtV2Config
from .labels import imagenet_id2label
from .modeling import PvtV2Model, PvtV2PreTrainedModel, check_input_size

__all__ = [
    "DETECTORS",
    "DETECTION_DEFAULTS",
    "DETECTOR_DEFAULTS",
    "GroupNormAnyBatch",
    "PvtV2FeaturePyramid",
    "PvtV2ForObjectDetection",
    "detection_config",
    "import_torchvision",
]

logger = logging.getLogger(__name__)

DETECTORS = ("retinanet", "faster_rcnn", "mask_rcnn", "fcos")

# Settings shared by every detector (config.json fields). ``image_mean`` / ``image_std`` None: ImageNet's statistics
# (torchvision's default, equal to pvtv2.IMAGENET_MEAN / IMAGENET_STD).
DETECTION_DEFAULTS: dict[str, Any] = dict(
    min_size=800,  # the shorter side after resizing; a list: one drawn at random per training batch, the last at eval
    max_size=1333,  # the longer side's cap
    fpn_channels=256,
    frozen_stages=0,  # stages 1..k of the encoder get no gradient and stay in eval mode
    freeze_layer_norms=False,  # the encoder's LayerNorm scales and shifts get no gradient
    score_threshold=0.05,  # detections below are dropped (mmdetection's and torchvision's test setting)
    detections_per_image=100,  # COCOeval's maxDets
    image_mean=None,
    image_std=None,
    # Whose arithmetic the levels, anchors and RoI features follow: "torchvision" (its modules as they are) or
    # "mmdetection" (RetinaNet: P7 from P6 without a ReLU; anchors unrounded at nominal strides; the R-CNNs: aligned
    # RoIAlign with adaptive sampling and mmdetection's level mapping: pvtv2.models.mmdet_convention), which a
    # RetinaNet, Faster or Mask R-CNN read whole from an mmdetection file sets.
    detection_convention="torchvision",
)
DETECTION_CONVENTIONS = ("torchvision", "mmdetection")
# Settings whose defaults depend on the detector: which stages feed the FPN (1-based), where the extra levels come
# from, and the NMS IoU threshold (torchvision's per detector).
DETECTOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "retinanet": dict(fpn_stages=[2, 3, 4], extra_levels="p6p7_on_input", nms_threshold=0.5),
    "fcos": dict(fpn_stages=[2, 3, 4], extra_levels="p6p7_on_output", nms_threshold=0.6),
    "faster_rcnn": dict(fpn_stages=[1, 2, 3, 4], extra_levels="max_pool", nms_threshold=0.5),
    "mask_rcnn": dict(fpn_stages=[1, 2, 3, 4], extra_levels="max_pool", nms_threshold=0.5),
}
EXTRA_LEVELS = ("p6p7_on_input", "p6p7_on_output", "max_pool")
# The detectors (and their extra levels) whose mmdetection arithmetic pvtv2.models.mmdet_convention writes out.
_MMDETECTION_LEVELS = {"retinanet": "p6p7_on_input", "faster_rcnn": "max_pool", "mask_rcnn": "max_pool"}
# Anchor size per FPN level as a multiple of the level's stride: RetinaNet's octave base scale 4 (times 2^0, 2^1/3,
# 2^2/3), the RPN's scale 8, FCOS's points (one "anchor" of the stride's size, torchvision's convention).
_ANCHOR_SCALE = {"retinanet": 4, "faster_rcnn": 8, "mask_rcnn": 8, "fcos": 1}


def import_torchvision() -> Any:
    """torchvision, or a :class:`pvtv2.runtime.MissingDependencyError` naming the extra that installs it."""
    return import_optional("torchvision", "detection", "object detection (torchvision's detectors, FPN, NMS, RoIAlign)")


# ---------------------------------------------------------------------------------------------- configuration
def detection_config(config: PvtV2Config, **settings: Any) -> PvtV2Config:
    """``config`` with every detection setting filled in (``settings`` first, then the config's own, then the
    defaults of its detector) and checked; ``ValueError`` names a bad one."""
    if not isinstance(config, PvtV2Config):
        raise TypeError(f"config must be a PvtV2Config, got {type(config).__name__}")
    detector = settings.get("detector", getattr(config, "detector", None)) or "retinanet"
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; choose from {', '.join(DETECTORS)}")
    values: dict[str, Any] = {"detector": detector}
    for name, default in {**DETECTION_DEFAULTS, **DETECTOR_DEFAULTS[detector]}.items():
        value = settings[name] if name in settings else getattr(config, name, None)
        values[name] = default if value is None and name not in ("image_mean", "image_std") else value
    _check_settings(values, config)
    if config.num_labels < 1:
        raise ValueError(f"a detector needs num_labels >= 1 (its object classes), got {config.num_labels}")
    if config.num_labels == 1000 and config.id2label == imagenet_id2label():
        raise ValueError(
            "the detector's classes would be ImageNet's 1000 classification labels (from a classification "
            "checkpoint or preset): pass the object classes, id2label={0: 'cat', ...} or num_labels=K"
        )
    changed = {k: v for k, v in values.items() if not hasattr(config, k) or getattr(config, k) != v}
    return config.replace(**changed) if changed else config


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_settings(values: dict[str, Any], config: PvtV2Config) -> None:
    min_size = values["min_size"]
    sizes = [min_size] if isinstance(min_size, int) and not isinstance(min_size, bool) else min_size
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not sizes:
        raise ValueError(f"min_size must be a positive integer or a list of them, got {min_size!r}")
    for size in sizes:
        _positive_int("min_size", size)
    if not isinstance(min_size, int):
        values["min_size"] = list(sizes)
    _positive_int("max_size", values["max_size"])
    if values["max_size"] < max(sizes):
        raise ValueError(f"max_size ({values['max_size']}) must be at least min_size ({min_size})")
    stages = values["fpn_stages"]
    n = config.num_encoder_blocks
    if (
        isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or not stages
        or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= n for s in stages)
        or list(stages) != sorted(set(stages))
    ):
        raise ValueError(f"fpn_stages must be increasing stage numbers in 1..{n}, got {stages!r}")
    values["fpn_stages"] = list(stages)
    _positive_int("fpn_channels", values["fpn_channels"])
    if values["detector"] == "fcos" and values["fpn_channels"] % 32:
        raise ValueError(f"FCOS's head normalises in 32 groups: fpn_channels must be a multiple of 32, got {values['fpn_channels']}")
    if values["extra_levels"] not in EXTRA_LEVELS:
        raise ValueError(f"extra_levels must be one of {', '.join(EXTRA_LEVELS)}, got {values['extra_levels']!r}")
    frozen = values["frozen_stages"]
    if isinstance(frozen, bool) or not isinstance(frozen, int) or not 0 <= frozen <= n:
        raise ValueError(f"frozen_stages must be an integer in 0..{n} (0: train every stage), got {frozen!r}")
    if not isinstance(values["freeze_layer_norms"], bool):
        raise ValueError(f"freeze_layer_norms must be true or false, got {values['freeze_layer_norms']!r}")
    for name, low_open in (("score_threshold", False), ("nms_threshold", True)):
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= 1 if low_open else 0 <= value <= 1):
            raise ValueError(f"{name} must be a number in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")
    _positive_int("detections_per_image", values["detections_per_image"])
    convention = values["detection_convention"]
    if convention not in DETECTION_CONVENTIONS:
        raise ValueError(f"detection_convention must be one of {', '.join(DETECTION_CONVENTIONS)}, got {convention!r}")
    if convention == "mmdetection" and _MMDETECTION_LEVELS.get(values["detector"]) != values["extra_levels"]:
        # Only mmdetection's RetinaNet (the authors' configs: P6 and P7 on C5) and Faster / Mask R-CNN (P6 by
        # max-pooling P5) are written out; another detector would silently keep torchvision's arithmetic under
        # mmdetection's name.
        raise ValueError(
            "detection_convention='mmdetection' is implemented for detector='retinanet' with "
            "extra_levels='p6p7_on_input' and for detector='faster_rcnn' / 'mask_rcnn' with extra_levels='max_pool' "
            f"only, got detector={values['detector']!r}, extra_levels={values['extra_levels']!r}"
        )
    for name in ("image_mean", "image_std"):
        value = values[name]
        if value is None and config.num_channels != 3:
            # The default is ImageNet's three channels: one channel broadcast into three and was then refused by the
            # encoder ("has 3 channels ... expects 1"), four failed in torchvision's normalisation, both at the
            # first call, after a load (num_channels=..., ignore_mismatched_sizes=True) had built the model.
            raise ValueError(f"num_channels={config.num_channels}: the detector's default {name} is ImageNet's, for "
                             f"3 channels; pass {name} with {config.num_channels} values (one per channel)")
        if value is None:
            continue
        if (
            isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != config.num_channels
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value)
        ):  # NaN or infinity (a bare NaN in config.json) would make every pixel NaN or 0: no detections, no error
            raise ValueError(f"{name} must be {config.num_channels} finite numbers (one per channel), got {value!r}")
        if name == "image_std" and any(v <= 0 for v in value):
            raise ValueError(f"image_std must be positive (it divides), got {value!r}")
        values[name] = [float(v) for v in value]


# ---------------------------------------------------------------------------------------------- backbone + FPN
class PvtV2FeaturePyramid(nn.Module):
    """The torchvision detector's ``backbone``: PVTv2 stage maps through an FPN, named as torchvision names them
    (``"0"``, ``"1"``, ... for the stages fed in, then ``"p6"``, ``"p7"`` or ``"pool"``).

    The encoder is held, not registered: its parameters belong to ``PvtV2ForObjectDetection.pvt_v2``, so that
    ``state_dict()`` lists them once, under the encoder's published names. ``out_channels`` is the FPN width (what
    torchvision's heads read); ``strides`` the stride of every output level.
    """

    def __init__(self, encoder: PvtV2Model | None, config: PvtV2Config) -> None:
        super().__init__()
        tv = import_torchvision()
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

        self.__dict__["encoder"] = encoder  # see the class docstring: deliberately outside nn.Module's registry
        self.stages = [s - 1 for s in config.fpn_stages]  # 0-based
        in_channels = [config.hidden_sizes[i] for i in self.stages]
        width = config.fpn_channels
        if config.extra_levels == "max_pool":
            extra: nn.Module = LastLevelMaxPool()
            num_extra = 1
        else:
            on_input = config.extra_levels == "p6p7_on_input"
            if config.detection_convention == "mmdetection":
                from .mmdet_convention import p6p7_without_relu

                extra = p6p7_without_relu(in_channels[-1] if on_input else width, width)
            else:
                extra = LastLevelP6P7(in_channels[-1] if on_input else width, width)
            # torchvision decides "from P5" by equal widths; the setting decides here (B0's C5 is 256 wide too).
            extra.use_P5 = not on_input
            num_extra = 2
        self.fpn = tv.ops.FeaturePyramidNetwork(in_channels, width, extra_blocks=extra)
        self.out_channels = width
        first = [config.stage_strides[i] for i in self.stages]
        self.strides = first + [first[-1] * 2 ** (k + 1) for k in range(num_extra)]

    def forward(self, pixel_values: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        encoder: PvtV2Model = self.__dict__["encoder"]
        hidden = encoder(pixel_values, output_hidden_states=True, return_dict=True).hidden_states  # (B, C_i, H_i, W_i)
        return self.fpn(OrderedDict((str(n), hidden[i]) for n, i in enumerate(self.stages)))  # each (B, width, h, w)


def _anchor_generator(config: PvtV2Config, strides: list[int]) -> nn.Module:
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    scale = _ANCHOR_SCALE[config.detector]
    if config.detector == "retinanet" and config.detection_convention == "mmdetection":
        from .mmdet_convention import mmdetection_anchor_generator

        # octave_base_scale=4, scales_per_octave=3, base size the stride: not truncated to integers
        sizes_f = [[scale * s * 2 ** (k / 3) for k in range(3)] for s in strides]
        return mmdetection_anchor_generator(sizes_f, [[0.5, 1.0, 2.0]] * len(strides), strides)
    if config.detection_convention == "mmdetection":  # an R-CNN's RPN: scales=[8], as mmdetection's anchors
        from .mmdet_convention import mmdetection_anchor_generator

        return mmdetection_anchor_generator([[float(scale * s)] for s in strides], [[0.5, 1.0, 2.0]] * len(strides), strides)
    if config.detector == "retinanet":
        # mmdetection's octave_base_scale=4, scales_per_octave=3 (torchvision's _default_anchorgen at strides 8..128)
        sizes = tuple(tuple(int(scale * s * 2 ** (k / 3)) for k in range(3)) for s in strides)
        ratios = ((0.5, 1.0, 2.0),) * len(strides)
    elif config.detector == "fcos":
        sizes = tuple((scale * s,) for s in strides)
        ratios = ((1.0,),) * len(strides)
    else:
        sizes = tuple((scale * s,) for s in strides)
        ratios = ((0.5, 1.0, 2.0),) * len(strides)
    return AnchorGenerator(sizes, ratios)


class GroupNormAnyBatch(nn.GroupNorm):
    """``nn.GroupNorm`` (the same parameters and arithmetic) without ``F.group_norm``'s check for more than one value
    per group, which counts the batch: FCOS's head normalises in 32 groups, one channel each at ``fpn_channels=32``,
    so a level of one cell (P7 of an image padded to 128 pixels or less) was refused for a single image ("Expected
    more than 1 value per channel when training", in eval too) and computed for the same image in a batch of two."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


def _build_detector(config: PvtV2Config, encoder: PvtV2Model | None) -> nn.Module:
    """The torchvision detector for ``config`` (already completed by :func:`detection_config`)."""
    import_torchvision()
    from torchvision.models import detection as D
    from torchvision.ops import MultiScaleRoIAlign

    backbone = PvtV2FeaturePyramid(encoder, config)
    anchors = _anchor_generator(config, backbone.strides)
    common: dict[str, Any] = dict(
        min_size=tuple(config.min_size) if isinstance(config.min_size, list) else config.min_size,
        max_size=config.max_size,
        image_mean=config.image_mean,
        image_std=config.image_std,
        size_divisible=32,
    )
    # RetinaNet and FCOS: one sigmoid per class, num_labels outputs.
    if config.detector == "retinanet":
        return D.RetinaNet(
            backbone, config.num_labels, anchor_generator=anchors, score_thresh=config.score_threshold,
            nms_thresh=config.nms_threshold, detections_per_img=config.detections_per_image, **common,
        )
    if config.detector == "fcos":
        fcos = D.FCOS(
            backbone, config.num_labels, anchor_generator=anchors, score_thresh=config.score_threshold,
            nms_thresh=config.nms_threshold, detections_per_img=config.detections_per_image, **common,
        )
        for module in fcos.head.modules():
            if type(module) is nn.GroupNorm:
                module.__class__ = GroupNormAnyBatch
        return fcos
    # The R-CNNs' softmax has a background class at index 0: num_labels + 1 classes.
    names = [str(n) for n in range(len(backbone.stages))]  # RoIAlign reads the FPN's stage levels, not the pooled one
    if config.detection_convention == "mmdetection":
        from .mmdet_convention import mmdetection_roi_pool

        # aligned RoIAlign, adaptive sampling, mmdetection's level mapping, at the stage levels' nominal strides
        strides = backbone.strides[: len(names)]
        box_pool: nn.Module = mmdetection_roi_pool(names, 7, strides)
        mask_pool: nn.Module = mmdetection_roi_pool(names, 14, strides)
    else:
        box_pool = MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2)
        mask_pool = MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2)
    kwargs: dict[str, Any] = dict(
        rpn_anchor_generator=anchors,
        box_roi_pool=box_pool,
        box_score_thresh=config.score_threshold,
        box_nms_thresh=config.nms_threshold,
        box_detections_per_img=config.detections_per_image,
        **common,
    )
    if config.detector == "faster_rcnn":
        return D.FasterRCNN(backbone, config.num_labels + 1, **kwargs)
    model = D.MaskRCNN(backbone, config.num_labels + 1, mask_roi_pool=mask_pool, **kwargs)
    if config.detection_convention == "mmdetection":
        from .mmdet_convention import mmdetection_mask_transform

        model.transform = mmdetection_mask_transform(model.transform)  # masks pasted as mmdetection pastes them
    return model


# Fresh detectors, one per model being loaded, from which init_new_module copies torchvision's initialisation.
_FRESH: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------------------- the model
class PvtV2ForObjectDetection(PvtV2PreTrainedModel):
    """A torchvision detector (``config.detector``: ``retinanet``, ``faster_rcnn``, ``mask_rcnn`` or ``fcos``) on the
    PVTv2 encoder and an FPN, configured as the original repository's configs (see the module docstring).

    ``forward(images, targets=None)`` follows torchvision's convention. ``images``: a list of (3, H, W) float tensors
    in [0, 1] (sizes may differ) or a (B, 3, H, W) tensor. In training mode, ``targets`` (one dict per image:
    ``boxes`` (N, 4) float in pixels, x1 y1 x2 y2; ``labels`` (N,) int64 in ``0 .. num_labels - 1``; ``masks``
    (N, H, W) uint8 for ``mask_rcnn``) are required and a dict of losses is returned. In eval mode, a list of dicts
    per image: ``boxes`` (in the input image's pixels), ``labels``, ``scores`` and, for ``mask_rcnn``, ``masks``
    (N, 1, H, W) probabilities.
    """

    encoder_prefix = "pvt_v2."
    head_prefixes = ("detector.",)

    def __init__(self, config: PvtV2Config) -> None:
        config = detection_config(config)
        super().__init__(config)
        self.pvt_v2 = PvtV2Model(config)  # initialises itself
        # torchvision's modules initialise themselves as torchvision does (FPN, heads, prior bias); not post_init.
        self.detector = _build_detector(config, self.pvt_v2)
        self._freeze()

    # ------------------------------------------------------------------ loading
    @property
    def classifier_prefix(self) -> tuple[str, ...]:  # type: ignore[override]
        """The class-sized layers, replaced when a checkpoint has another number of classes."""
        if self.config.detector in ("retinanet", "fcos"):
            return ("detector.head.classification_head.cls_logits.",)
        prefixes = ("detector.roi_heads.box_predictor.cls_score.", "detector.roi_heads.box_predictor.bbox_pred.")
        if self.config.detector == "mask_rcnn":
            prefixes += ("detector.roi_heads.mask_predictor.mask_fcn_logits.",)
        return prefixes

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, **kwargs: Any):
        """Load a saved detector, or initialise the encoder of a new one from any checkpoint ``PvtV2Model`` reads
        (transformers, timm, the original authors' and mmdetection / mmsegmentation files, hub ids, folders);
        keyword arguments override config fields (``detector=``, ``id2label=``, ``min_size=`` ...)."""
        loaded = super().from_pretrained(source, **kwargs)
        _FRESH.pop(loaded[0] if isinstance(loaded, tuple) else loaded, None)  # (model, info): output_loading_info
        return loaded

    def init_new_module(self, module: nn.Module) -> None:
        """A module the checkpoint did not provide: torchvision's own initialisation for the detector's modules
        (copied from a freshly built detector), the library's for the encoder's."""
        name = next((n for n, m in self.named_modules() if m is module), "")
        if not name.startswith("detector."):
            super().init_new_module(module)
            return
        fresh = _FRESH.get(self)
        if fresh is None:
            with torch.device("cpu"):
                fresh = _FRESH[self] = _build_detector(self.config, None)
        source = fresh.get_submodule(name[len("detector."):])
        with torch.no_grad():
            for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                tensor.copy_(getattr(source, key))

    # ------------------------------------------------------------------ frozen parts
    def _freeze(self) -> None:
        stages = self.pvt_v2.encoder.layers
        for stage in stages[: self.config.frozen_stages]:
            stage.requires_grad_(False)
        if self.config.freeze_layer_norms:
            for module in self.pvt_v2.modules():
                if isinstance(module, nn.LayerNorm):
                    module.requires_grad_(False)

    def train(self, mode: bool = True) -> PvtV2ForObjectDetection:
        """As ``nn.Module.train``, but frozen stages stay in eval mode (no dropout or stochastic depth)."""
        super().train(mode)
        for stage in self.pvt_v2.encoder.layers[: self.config.frozen_stages]:
            stage.eval()
        return self

    # ------------------------------------------------------------------ information
    @property
    def feature_strides(self) -> list[int]:
        """The stride of each FPN level the heads see (RetinaNet: 8 ... 128; R-CNN: 4 ... 64)."""
        return list(self.detector.backbone.strides)

    # ------------------------------------------------------------------ forward
    def forward(
        self, images: list[torch.Tensor] | torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        images = self._check_images(images)
        if self.training and targets is None:
            raise ValueError("in training mode the detector needs targets (one dict with boxes and labels per image)")
        if targets is not None:
            targets = self._check_targets(targets, images)
        self.check_image_sizes(images)
        out = self.detector(images, targets)
        if self.training:
            return out
        if self.config.detector in ("faster_rcnn", "mask_rcnn"):
            for result in out:
                result["labels"] = result["labels"] - 1  # torchvision's class 0 is the background
        return out

    def _check_images(self, images: Any) -> list[torch.Tensor]:
        if isinstance(images, torch.Tensor):
            if images.ndim != 4:
                raise ValueError(f"images must be a list of (3, H, W) tensors or a (B, 3, H, W) tensor, got shape {tuple(images.shape)}")
            images = list(images)
        if not isinstance(images, (list, tuple)) or not images:
            raise TypeError(f"images must be a non-empty list of (3, H, W) tensors, got {type(images).__name__}")
        channels = self.config.num_channels
        for i, image in enumerate(images):
            if not isinstance(image, torch.Tensor):
                raise TypeError(f"image {i} must be a torch.Tensor, got {type(image).__name__}")
            if image.ndim != 3 or image.shape[0] != channels or min(image.shape[1:]) < 1:
                raise ValueError(f"image {i} must have shape ({channels}, H, W), got {tuple(image.shape)}")
            if not image.is_floating_point():
                raise TypeError(f"image {i} must be a float tensor with values in [0, 1], got {image.dtype}")
            # The detector normalises with ImageNet's statistics itself: 0-255 or normalised inputs would give
            # confident nonsense, so they are refused.
            low, high = float(image.min()), float(image.max())
            if math.isnan(low) or math.isnan(high):  # NaN compares false below: "no objects", or NaN losses
                raise ValueError(f"image {i} has NaN values; the detector takes images with values in [0, 1]")
            if low < -1e-3 or high > 1 + 1e-3:
                raise ValueError(
                    f"image {i} has values in [{low:.3g}, {high:.3g}]; the detector takes unnormalised images in "
                    f"[0, 1] (divide 8-bit pixels by 255; it applies the mean and std itself)"
                )
        return list(images)

    def _check_targets(self, targets: Any, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
            count = len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__
            raise ValueError(f"targets must be a list of one dict per image ({len(images)}), got {count}")
        k = self.config.num_labels
        shift = 1 if self.config.detector in ("faster_rcnn", "mask_rcnn") else 0
        checked = []
        for i, (target, image) in enumerate(zip(targets, images)):
            if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
                raise ValueError(f"target {i} must be a dict with 'boxes' and 'labels'")
            boxes, labels = target["boxes"], target["labels"]
            if not isinstance(boxes, torch.Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
                raise ValueError(f"target {i}: boxes must be a float tensor of shape (N, 4) (x1, y1, x2, y2), got "
                                 f"{tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__}")
            if not isinstance(labels, torch.Tensor) or labels.shape != boxes.shape[:1] or labels.is_floating_point():
                raise ValueError(f"target {i}: labels must be an integer tensor of shape ({boxes.shape[0]},)")
            if boxes.numel():
                if not torch.isfinite(boxes).all():
                    raise ValueError(f"target {i}: boxes must be finite")
                bad = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
                if bad.any():
                    raise ValueError(f"target {i}: box {boxes[bad][0].tolist()} has no area (x2 <= x1 or y2 <= y1)")
                if int(labels.min()) < 0 or int(labels.max()) >= k:
                    raise ValueError(f"target {i}: labels must be in 0..{k - 1} (the config's classes), got "
                                     f"{sorted(set(labels.tolist()))[:10]}")
            # float32 boxes: FCOS stopped on float64 ones (numpy's default) with an index_put dtype error
            new = dict(target, boxes=boxes.to(torch.float32), labels=labels.to(torch.int64) + shift)
            if self.config.detector == "mask_rcnn":
                masks = target.get("masks")
                if not isinstance(masks, torch.Tensor) or masks.shape != (boxes.shape[0], *image.shape[1:]):
                    got = tuple(masks.shape) if isinstance(masks, torch.Tensor) else None
                    raise ValueError(f"target {i}: mask_rcnn needs masks of shape ({boxes.shape[0]}, "
                                     f"{image.shape[1]}, {image.shape[2]}) (one per box, the image's size), got {got}")
                if masks.numel() and ((masks != 0) & (masks != 1)).any():
                    # torchvision's mask loss takes the value as a target probability: 255 (an 8-bit PNG's) gave a
                    # loss without a minimum, trained without a word
                    raise ValueError(f"target {i}: masks must hold 0 and 1 only (divide 0/255 masks by 255), got "
                                     f"values up to {float(masks.max()):g}")
            checked.append(new)
        return checked

    def check_image_sizes(self, images: list[torch.Tensor]) -> None:
        """A clear error when an image, once resized, is too small for the encoder's spatial reductions."""
        transform = self.detector.transform
        size = transform.min_size[-1] if not self.training else min(transform.min_size)
        for image in images:
            h, w = image.shape[-2:]
            scale = min(size / min(h, w), transform.max_size / max(h, w))
            check_input_size(max(1, math.floor(h * scale)), max(1, math.floor(w * scale)), self.config)
