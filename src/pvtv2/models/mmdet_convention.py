"""The places where mmdetection's RetinaNet, Faster R-CNN and Mask R-CNN compute otherwise than torchvision's, as
modules that replace torchvision's when ``config.detection_convention == "mmdetection"`` (a file read whole from
mmdetection's layout; see ``pvtv2.models.detection``).

- The FPN's last level: mmdetection's FPN (``add_extra_convs="on_input"``, ``relu_before_extra_convs=False``, its
  default) computes P7 by a stride-2 convolution of P6 itself; torchvision's ``LastLevelP6P7`` (and the RetinaNet
  paper) of ReLU(P6).
- The anchors: mmdetection's ``AnchorGenerator`` (``center_offset=0``) spans ``stride * 4 * 2^(k/3)`` times
  ``1/sqrt(ratio)`` and ``sqrt(ratio)``, unrounded, at ``0, stride, 2 * stride ...`` with each level's nominal
  stride. torchvision truncates the sizes to integers (we pass them so), rounds the base anchors to integers, and
  takes each level's stride as ``padded image size // feature size``: 61 rather than 64 for P6 of an 800-pixel side
  (13 cells), since the padding stops at multiples of 32. The R-CNNs' RPN anchors (``scales=[8]``, ratios 0.5, 1, 2,
  strides 4 ... 64) are made by the same generator.
- The RoI features (R-CNN): mmdetection's ``SingleRoIExtractor`` with mmcv's ``RoIAlign(aligned=True,
  sampling_ratio=0)`` (the half-pixel shift; samples per bin ``ceil(bin size)``) on the level
  ``floor(log2(sqrt(area) / 56 + 1e-6))`` clamped to the levels there are, at each level's nominal stride.
  torchvision's ``MultiScaleRoIAlign`` hard-codes ``aligned=False`` (we pass it ``sampling_ratio=2``), puts the
  ``1e-6`` outside the logarithm (``floor(4 + log2(sqrt(area) / 224) + 1e-6)``) and takes each level's scale from the
  feature and image sizes (rounded to a power of 2, so the same as the nominal stride).
- The masks pasted into the image (Mask R-CNN): mmdetection 2.x's ``_do_paste_mask`` samples the label's 28 x 28
  probabilities with ``grid_sample`` (``align_corners=False``, zeros beyond) at the centres of the image's pixels
  mapped into the exact box; torchvision's ``paste_masks_in_image`` pads the mask by one cell, widens the box to
  match, rounds it to whole pixels and resizes the mask into it bilinearly. Both give probabilities here;
  mmdetection then thresholds at 0.5 (``mask_thr_binary``), as pvtv2's COCO evaluation does. (mmdetection's CPU
  path samples only within a pixel of the box; the values it leaves out are below half the edge's probability, so
  the thresholded masks are the same.)

The order of the anchors (position-major; at each position ratio-major, scale-minor) and of the RetinaNet head's and
the RPN's output channels (anchor-major, then class or delta) is the same in both, so their tensors are read
unchanged; the R-CNN box classifier's rows are reordered on reading (``pvtv2.weights.layouts``: the background is
mmdetection's last class and torchvision's first).

torchvision is an optional dependency: the classes are made (once) by the first call that builds one, as nothing in
pvtv2 imports torchvision at module level.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "mmdetection_anchor_generator",
    "mmdetection_mask_transform",
    "mmdetection_roi_pool",
    "p6p7_without_relu",
    "paste_masks_mmdetection",
]


def p6p7_without_relu(in_channels: int, out_channels: int) -> nn.Module:
    """torchvision's ``LastLevelP6P7`` (same parameters and names, ``p6`` and ``p7``), P7 computed from P6 itself."""
    return _classes()[0](in_channels, out_channels)


def mmdetection_anchor_generator(sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]],
                                 strides: Sequence[int]) -> nn.Module:
    """torchvision's ``AnchorGenerator`` with mmdetection's anchors: sizes as given (floats), base anchors unrounded,
    and each level's grid spaced by its nominal stride (``strides``), not by the padded image size over the grid's."""
    if len(strides) != len(sizes):
        raise ValueError(f"one stride per level: {len(sizes)} levels, {len(strides)} strides")
    return _classes()[1](sizes, aspect_ratios, strides)


def mmdetection_roi_pool(featmap_names: Sequence[str], output_size: int, strides: Sequence[int],
                         finest_scale: float = 56.0) -> nn.Module:
    """mmdetection's ``SingleRoIExtractor`` (mmcv ``RoIAlign(aligned=True, sampling_ratio=0)``, ``finest_scale=56``)
    as a torchvision ``MultiScaleRoIAlign`` (which torchvision's R-CNNs require), with its call:
    ``forward(features, boxes, image_shapes)``, the features a dict of maps (those named ``featmap_names`` are read,
    at ``strides``), ``boxes`` one (N_i, 4) tensor per image in the (resized) image's pixels; returns
    (sum N_i, C, size, size), the images' boxes in turn. ``levels(boxes)`` is the level each box is read from.
    Differentiable (torchvision's ``roi_align`` has a backward), so it trains."""
    if len(featmap_names) != len(strides) or not featmap_names:
        raise ValueError(f"one stride per feature map: {list(featmap_names)} and {list(strides)}")
    return _classes()[2](featmap_names, output_size, strides, finest_scale)


def paste_masks_mmdetection(masks: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
    """(N, 1, M, M) mask probabilities pasted into a (height, width) image at (N, 4) boxes (x1, y1, x2, y2 in its
    pixels) as mmdetection 2.x's ``_do_paste_mask`` does on the GPU (over the whole image): each pixel centre
    ``(x + 0.5, y + 0.5)`` mapped to ``2 * (x + 0.5 - x1) / (x2 - x1) - 1`` (and so for y), sampled with
    ``grid_sample(align_corners=False)`` and zeros beyond the mask, which reach half a cell past the box; further
    out every value is 0, so each box is sampled over its own region only (memory: torchvision's pasting keeps the
    same (N, 1, H, W) result). Returns (N, 1, height, width) probabilities in ``masks``' dtype, computed in
    float64 for float64 masks, else in float32."""
    out = masks.new_zeros((masks.shape[0], 1, height, width))
    cells = masks.shape[-1]
    # float64 masks (a model in float64) sampled in float64; float32 and lower in float32, as mmdetection
    work = torch.float64 if masks.dtype == torch.float64 else torch.float32
    for i in range(masks.shape[0]):
        box = boxes[i].to(work)
        x1, y1, x2, y2 = (float(v) for v in box)
        # a whole cell of margin (the samples reach half of one), and a pixel for the rounding
        margin_x, margin_y = (x2 - x1) / cells, (y2 - y1) / cells
        left, right = max(math.floor(x1 - margin_x) - 1, 0), min(math.ceil(x2 + margin_x) + 1, width)
        top, bottom = max(math.floor(y1 - margin_y) - 1, 0), min(math.ceil(y2 + margin_y) + 1, height)
        if right <= left or bottom <= top:
            continue
        xs = (torch.arange(left, right, device=masks.device, dtype=work) + 0.5 - box[0]) / (box[2] - box[0]) * 2 - 1
        ys = (torch.arange(top, bottom, device=masks.device, dtype=work) + 0.5 - box[1]) / (box[3] - box[1]) * 2 - 1
        # a box without width or height: mmdetection sets the infinite coordinates to 0 (pvtv2's detections have
        # none: torchvision drops boxes under 1e-2)
        xs, ys = torch.nan_to_num(xs, nan=0.0, posinf=0.0, neginf=0.0), torch.nan_to_num(ys, nan=0.0, posinf=0.0, neginf=0.0)
        grid = torch.stack([xs[None, :].expand(len(ys), -1), ys[:, None].expand(-1, len(xs))], dim=-1)
        pasted = F.grid_sample(masks[i : i + 1].to(work), grid[None], align_corners=False)
        out[i, 0, top:bottom, left:right] = pasted[0, 0].to(out.dtype)
    return out


def mmdetection_mask_transform(transform: nn.Module) -> nn.Module:
    """torchvision's ``GeneralizedRCNNTransform`` ``transform`` (same settings) whose ``postprocess`` pastes the masks
    as mmdetection does (:func:`paste_masks_mmdetection`); boxes and everything else as torchvision's."""
    return _classes()[3](
        transform.min_size, transform.max_size, transform.image_mean, transform.image_std,
        size_divisible=transform.size_divisible, fixed_size=transform.fixed_size,
        _skip_resize=getattr(transform, "_skip_resize", False),
    )


@functools.cache
def _classes() -> tuple[Any, Any, Any, Any]:
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.transform import GeneralizedRCNNTransform
    from torchvision.ops import MultiScaleRoIAlign, roi_align
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    class P6P7WithoutReLU(LastLevelP6P7):
        def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
            p6 = self.p6(p[-1] if self.use_P5 else c[-1])
            p7 = self.p7(p6)  # mmdetection: no ReLU in between (relu_before_extra_convs=False)
            p.extend([p6, p7])
            names.extend(["p6", "p7"])
            return p, names

    class MMDetectionAnchorGenerator(AnchorGenerator):
        def __init__(self, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]],
                     strides: Sequence[int]) -> None:
            super().__init__(tuple(tuple(s) for s in sizes), tuple(tuple(a) for a in aspect_ratios))
            self.level_strides = [int(s) for s in strides]

        def generate_anchors(self, scales: list[float], aspect_ratios: list[float], dtype: torch.dtype = torch.float32,
                             device: torch.device | None = None) -> Tensor:
            # on the CPU unless told, as torchvision's: the model is built under torch.device("meta") when loaded,
            # and these are plain attributes that no checkpoint fills
            device = torch.device("cpu") if device is None else device
            scales_t = torch.as_tensor(scales, dtype=dtype, device=device)
            ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
            h_ratios = torch.sqrt(ratios)
            w_ratios = 1 / h_ratios
            ws = (w_ratios[:, None] * scales_t[None, :]).view(-1)  # ratio-major, scale-minor, as both libraries
            hs = (h_ratios[:, None] * scales_t[None, :]).view(-1)
            return torch.stack([-ws, -hs, ws, hs], dim=1) / 2  # centred on 0 (center_offset=0), not rounded

        def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
            if len(feature_maps) != len(self.level_strides):
                raise ValueError(f"{len(feature_maps)} feature maps for {len(self.level_strides)} anchor levels")
            grid_sizes = [list(f.shape[-2:]) for f in feature_maps]
            device = feature_maps[0].device
            strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.level_strides]
            self.set_cell_anchors(feature_maps[0].dtype, device)
            per_level = self.grid_anchors(grid_sizes, strides)
            return [torch.cat(per_level) for _ in image_list.image_sizes]

    class MMDetectionRoIPool(MultiScaleRoIAlign):
        def __init__(self, featmap_names: Sequence[str], output_size: int, strides: Sequence[int],
                     finest_scale: float) -> None:
            super().__init__([str(n) for n in featmap_names], output_size, sampling_ratio=0)
            self.strides = [int(s) for s in strides]
            self.finest_scale = float(finest_scale)

        def levels(self, boxes: Tensor) -> Tensor:
            """The level (0-based, into ``featmap_names``) of each (N, 4) box: mmdetection's ``map_roi_levels``."""
            scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
            level = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
            return level.clamp(min=0, max=len(self.strides) - 1).long()

        def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
            maps = [x[name] for name in self.featmap_names]
            rois = torch.cat([torch.cat([b.new_full((b.shape[0], 1), i), b], dim=1) for i, b in enumerate(boxes)])
            levels = self.levels(rois[:, 1:])
            size = self.output_size
            out = maps[0].new_zeros((rois.shape[0], maps[0].shape[1], *size))
            for level, (feature, stride) in enumerate(zip(maps, self.strides)):
                index = torch.nonzero(levels == level).squeeze(1)
                if index.numel():
                    # the wider of the two dtypes: boxes are not rounded to bfloat16 features (under autocast the
                    # ground-truth boxes join the proposals in float32; roi_align's autocast runs in float32)
                    dtype = torch.promote_types(feature.dtype, rois.dtype)
                    pooled = roi_align(feature.to(dtype), rois[index].to(dtype), size, spatial_scale=1.0 / stride,
                                       sampling_ratio=0, aligned=True)
                    out = out.index_copy(0, index, pooled.to(out.dtype))  # out of place: autograd through each level
            return out

    class MMDetectionMaskTransform(GeneralizedRCNNTransform):
        def postprocess(self, result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
                        original_image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
            if self.training:
                return result
            masks = [r.pop("masks", None) for r in result]
            result = super().postprocess(result, image_shapes, original_image_sizes)  # the boxes to the input's size
            for r, m, (height, width) in zip(result, masks, original_image_sizes):
                if m is not None:
                    r["masks"] = paste_masks_mmdetection(m, r["boxes"], height, width)
            return result

    return P6P7WithoutReLU, MMDetectionAnchorGenerator, MMDetectionRoIPool, MMDetectionMaskTransform
