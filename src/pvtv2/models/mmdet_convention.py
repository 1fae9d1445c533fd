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

The order of the anchors (position-major; at each position ratio-major, scale-minor) and of the head's output
channels (anchor-major, then class or delta) is the same in both, so the head's tensors are read unchanged.

torchvision is an optional dependency: the classes are made (once) by the first call that builds one, as nothing in
pvtv2 imports torchvision at module level.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["mmdetection_anchor_generator", "mmdetection_roi_pool", "p6p7_without_relu"]


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


@functools.cache
def _classes() -> tuple[Any, Any, Any]:
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList
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
                    pooled = roi_align(feature, rois[index].to(feature.dtype), size, spatial_scale=1.0 / stride,
                                       sampling_ratio=0, aligned=True)
                    out = out.index_copy(0, index, pooled.to(out.dtype))  # out of place: autograd through each level
            return out

    return P6P7WithoutReLU, MMDetectionAnchorGenerator, MMDetectionRoIPool
