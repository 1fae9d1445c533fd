"""mmdetection Faster / Mask R-CNN checkpoints (the authors' ``mask_rcnn_pvt_v2_*`` configs: PVTv2 backbone, FPN on
the four stages with P6 max-pooled from P5, RPNHead, StandardRoIHead with Shared2FCBBoxHead and FCNMaskHead) read
whole into ``PvtV2ForObjectDetection``, against mmdetection 2.x's computation written out here with functional ops
on the file's own tensors, under mmdetection's key names (mmcv's ``ConvModule``: ``conv``):

- the neck: 1x1 laterals, nearest top-down sums, 3x3 outputs; P6 = ``max_pool2d(P5, 1, stride=2)`` (num_outs=5,
  no extra convolutions);
- the RPN: 3x3 conv + ReLU, then ``rpn_cls`` (one sigmoid per anchor) and ``rpn_reg``; anchors
  ``AnchorGenerator(scales=[8], ratios=[0.5, 1, 2], strides=[4 .. 64])``, ``center_offset=0``, unrounded; proposals:
  per level the 1000 best, decoded (stds 1, clipped), NMS at 0.7 per level, the 1000 best;
- the RoI features: ``SingleRoIExtractor`` (``finest_scale=56``: level ``floor(log2(sqrt(area) / 56 + 1e-6))`` in
  0..3) with mmcv's ``RoIAlign(aligned=True, sampling_ratio=0)``, written here as torchvision's ``roi_align`` with
  those arguments (the same algorithm, Detectron2's);
- the box head: flatten, two fully connected layers with ReLU, ``fc_cls`` (K + 1 logits, the background LAST) and
  ``fc_reg`` (4 deltas per object class); ``DeltaXYWHBBoxCoder(stds=(0.1, 0.1, 0.2, 0.2))`` clipped to the image;
  ``multiclass_nms`` (scores above 0.05, NMS at 0.5 per class, 100);
- the mask head: 4 x (3x3 conv + ReLU), a stride-2 transposed convolution + ReLU, ``conv_logits`` (K masks).

The backbone is timm's (its feature maps), so nothing of pvtv2 is in the reference.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import relative_error
from mmdet_files import timm_backbone, write_mmdet_file

from pvtv2 import CheckpointError, PvtV2Model

pytest.importorskip("torchvision")

from torchvision.ops import MultiScaleRoIAlign, batched_nms, roi_align

from pvtv2.models.detection import PvtV2ForObjectDetection

TOL = 1e-5
STAGES = (32, 64, 160, 256)  # B0's widths
STRIDES = (4, 8, 16, 32, 64)
CLASSES = ("person", "bicycle", "car")
WIDTH = 24  # the FPN's (256 in the authors' files; any width reads)
MASK_WIDTH = 256  # FCNMaskHead's conv_out_channels, which torchvision's mask head fixes at 256
FC = 1024  # Shared2FCBBoxHead's fc_out_channels, which torchvision's TwoMLPHead fixes at 1024
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # mmdetection's 123.675 ... / 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


_backbone = timm_backbone


def _rcnn_state(mask: bool = True, classes: int = len(CLASSES), seed: int = 1) -> dict[str, torch.Tensor]:
    """An FPN (stages 1-4), RPNHead, Shared2FCBBoxHead and (``mask``) FCNMaskHead as mmdetection names them, random
    tensors of fan-in scale, biases not 0."""
    g = torch.Generator().manual_seed(seed)

    def conv(out, inp, k, gain=1.0):
        return torch.randn(out, inp, k, k, generator=g) * gain * (inp * k * k) ** -0.5

    def fc(out, inp, gain=1.0):
        return torch.randn(out, inp, generator=g) * gain * inp ** -0.5

    def bias(n, scale=0.3):
        return torch.randn(n, generator=g) * scale

    s: dict[str, torch.Tensor] = {}
    for i, c in enumerate(STAGES):
        s[f"neck.lateral_convs.{i}.conv.weight"], s[f"neck.lateral_convs.{i}.conv.bias"] = conv(WIDTH, c, 1), bias(WIDTH)
        s[f"neck.fpn_convs.{i}.conv.weight"], s[f"neck.fpn_convs.{i}.conv.bias"] = conv(WIDTH, WIDTH, 3), bias(WIDTH)
    s["rpn_head.rpn_conv.weight"], s["rpn_head.rpn_conv.bias"] = conv(WIDTH, WIDTH, 3, 1.5), bias(WIDTH)
    s["rpn_head.rpn_cls.weight"], s["rpn_head.rpn_cls.bias"] = conv(3, WIDTH, 1, 2.0), bias(3, 1.0)
    s["rpn_head.rpn_reg.weight"], s["rpn_head.rpn_reg.bias"] = conv(12, WIDTH, 1, 0.5), bias(12, 0.1)
    s["roi_head.bbox_head.shared_fcs.0.weight"], s["roi_head.bbox_head.shared_fcs.0.bias"] = fc(FC, WIDTH * 49, 1.5), bias(FC)
    s["roi_head.bbox_head.shared_fcs.1.weight"], s["roi_head.bbox_head.shared_fcs.1.bias"] = fc(FC, FC, 1.5), bias(FC)
    s["roi_head.bbox_head.fc_cls.weight"], s["roi_head.bbox_head.fc_cls.bias"] = fc(classes + 1, FC, 2.0), bias(classes + 1, 1.0)
    s["roi_head.bbox_head.fc_reg.weight"], s["roi_head.bbox_head.fc_reg.bias"] = fc(4 * classes, FC, 0.5), bias(4 * classes, 0.2)
    if mask:
        for i in range(4):
            s[f"roi_head.mask_head.convs.{i}.conv.weight"] = conv(MASK_WIDTH, WIDTH if i == 0 else MASK_WIDTH, 3, 1.4)
            s[f"roi_head.mask_head.convs.{i}.conv.bias"] = bias(MASK_WIDTH)
        s["roi_head.mask_head.upsample.weight"] = torch.randn(MASK_WIDTH, MASK_WIDTH, 2, 2, generator=g) * MASK_WIDTH ** -0.5
        s["roi_head.mask_head.upsample.bias"] = bias(MASK_WIDTH)
        s["roi_head.mask_head.conv_logits.weight"], s["roi_head.mask_head.conv_logits.bias"] = conv(classes, MASK_WIDTH, 1), bias(classes)
    return s


def _mmdet_file(tmp_path, backbone, head, name="mask_rcnn_pvt_v2_b0_fpn_1x_coco.pth", classes=CLASSES, **config):
    return write_mmdet_file(tmp_path, backbone, head, name, "MaskRCNN", classes, **config)


# ---------------------------------------------------------------------------------------------- mmdetection, written out
def _mmdet_levels(features: list[torch.Tensor], s: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """mmdetection's FPN (start_level=0, num_outs=5, add_extra_convs=False) on the four stage maps."""
    laterals = [F.conv2d(x, s[f"neck.lateral_convs.{i}.conv.weight"], s[f"neck.lateral_convs.{i}.conv.bias"])
                for i, x in enumerate(features)]
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
    outs = [F.conv2d(x, s[f"neck.fpn_convs.{i}.conv.weight"], s[f"neck.fpn_convs.{i}.conv.bias"], padding=1)
            for i, x in enumerate(laterals)]
    return outs + [F.max_pool2d(outs[-1], 1, stride=2)]


def _mmdet_rpn(level: torch.Tensor, s: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """RPNHead on one level: (B, A, H, W) objectness logits and (B, A*4, H, W) deltas."""
    x = F.relu(F.conv2d(level, s["rpn_head.rpn_conv.weight"], s["rpn_head.rpn_conv.bias"], padding=1))
    return (F.conv2d(x, s["rpn_head.rpn_cls.weight"], s["rpn_head.rpn_cls.bias"]),
            F.conv2d(x, s["rpn_head.rpn_reg.weight"], s["rpn_head.rpn_reg.bias"]))


def _mmdet_anchors(stride: int, height: int, width: int) -> torch.Tensor:
    """mmdetection's RPN anchors of one level, (H * W * 3, 4), in float64: position-major, then ratio; centred on
    (x * stride, y * stride) (center_offset=0), of side 8 * stride / sqrt(ratio) by 8 * stride * sqrt(ratio)."""
    base = []
    for ratio in (0.5, 1.0, 2.0):
        w, h = 8 * stride / math.sqrt(ratio), 8 * stride * math.sqrt(ratio)
        base.append((-w / 2, -h / 2, w / 2, h / 2))
    rows = [(x * stride + x1, y * stride + y1, x * stride + x2, y * stride + y2)
            for y in range(height) for x in range(width) for x1, y1, x2, y2 in base]
    return torch.tensor(rows, dtype=torch.float64)


def _mmdet_roi_levels(boxes: torch.Tensor) -> torch.Tensor:
    """SingleRoIExtractor.map_roi_levels (finest_scale=56, 4 levels), in float64."""
    b = boxes.double()
    scale = torch.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    return torch.floor(torch.log2(scale / 56 + 1e-6)).clamp(0, 3).long()


def _mmdet_roi_features(levels: list[torch.Tensor], boxes: torch.Tensor, size: int) -> torch.Tensor:
    """mmcv RoIAlign(output_size=size, sampling_ratio=0, aligned=True) of each box (image 0) on its level."""
    rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], dim=1)
    level = _mmdet_roi_levels(boxes)
    out = levels[0].new_zeros(len(boxes), levels[0].shape[1], size, size)
    for i in range(4):
        index = torch.nonzero(level == i).squeeze(1)
        if index.numel():
            out[index] = roi_align(levels[i], rois[index], size, spatial_scale=1 / STRIDES[i], sampling_ratio=0, aligned=True)
    return out


def _mmdet_bbox_head(features: torch.Tensor, s: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared2FCBBoxHead: (N, K + 1) class logits (background last), (N, 4K) deltas."""
    x = features.flatten(1)
    x = F.relu(F.linear(x, s["roi_head.bbox_head.shared_fcs.0.weight"], s["roi_head.bbox_head.shared_fcs.0.bias"]))
    x = F.relu(F.linear(x, s["roi_head.bbox_head.shared_fcs.1.weight"], s["roi_head.bbox_head.shared_fcs.1.bias"]))
    return (F.linear(x, s["roi_head.bbox_head.fc_cls.weight"], s["roi_head.bbox_head.fc_cls.bias"]),
            F.linear(x, s["roi_head.bbox_head.fc_reg.weight"], s["roi_head.bbox_head.fc_reg.bias"]))


def _mmdet_mask_head(features: torch.Tensor, s: dict[str, torch.Tensor]) -> torch.Tensor:
    """FCNMaskHead: (N, K, 28, 28) mask logits."""
    x = features
    for i in range(4):
        x = F.relu(F.conv2d(x, s[f"roi_head.mask_head.convs.{i}.conv.weight"], s[f"roi_head.mask_head.convs.{i}.conv.bias"], padding=1))
    x = F.relu(F.conv_transpose2d(x, s["roi_head.mask_head.upsample.weight"], s["roi_head.mask_head.upsample.bias"], stride=2))
    return F.conv2d(x, s["roi_head.mask_head.conv_logits.weight"], s["roi_head.mask_head.conv_logits.bias"])


def _delta2bbox(rois: torch.Tensor, deltas: torch.Tensor, stds: tuple[float, ...], height: int, width: int) -> torch.Tensor:
    """DeltaXYWHBBoxCoder.decode (means 0, the given stds, wh_ratio_clip 16/1000), clipped to the image; ``deltas``
    (N, 4 * C) give (N, C, 4) boxes."""
    limit = abs(math.log(16 / 1000))
    d = deltas.reshape(len(deltas), -1, 4) * torch.tensor(stds, dtype=deltas.dtype)
    px, py = ((rois[:, 0] + rois[:, 2]) / 2)[:, None], ((rois[:, 1] + rois[:, 3]) / 2)[:, None]
    pw, ph = (rois[:, 2] - rois[:, 0])[:, None], (rois[:, 3] - rois[:, 1])[:, None]
    gx, gy = px + pw * d[..., 0], py + ph * d[..., 1]
    gw, gh = pw * d[..., 2].clamp(-limit, limit).exp(), ph * d[..., 3].clamp(-limit, limit).exp()
    return torch.stack([(gx - gw / 2).clamp(0, width), (gy - gh / 2).clamp(0, height),
                        (gx + gw / 2).clamp(0, width), (gy + gh / 2).clamp(0, height)], dim=-1)


def _mmdet_proposals(rpn: list[tuple[torch.Tensor, torch.Tensor]], anchors: list[torch.Tensor], height: int, width: int):
    """RPNHead test_cfg: per level the 1000 best (sigmoid) scores, decoded (stds 1), NMS 0.7 per level, 1000 best."""
    boxes, scores, ids = [], [], []
    for level, ((cls, reg), a) in enumerate(zip(rpn, anchors)):
        score = cls[0].permute(1, 2, 0).reshape(-1).sigmoid()
        delta = reg[0].permute(1, 2, 0).reshape(-1, 4)
        score, index = score.topk(min(1000, score.numel()))
        boxes.append(_delta2bbox(a[index], delta[index], (1.0, 1.0, 1.0, 1.0), height, width)[:, 0])
        scores.append(score)
        ids.append(torch.full_like(score, level, dtype=torch.int64))
    boxes, scores, ids = torch.cat(boxes), torch.cat(scores), torch.cat(ids)
    # min_bbox_size=0: mmdetection 2.18 and later drop the boxes without area (w > 0 and h > 0 kept), as torchvision
    # (w, h >= 1e-3); 2.13, the authors', kept them (see docs/detection.md)
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, scores, ids = boxes[valid], scores[valid], ids[valid]
    keep = batched_nms(boxes, scores, ids, 0.7)[:1000]
    return boxes[keep]


def _mmdet_detections(logits: torch.Tensor, deltas: torch.Tensor, rois: torch.Tensor, height: int, width: int):
    """The box head's test: softmax, class-specific boxes (stds 0.1, 0.1, 0.2, 0.2), multiclass_nms(0.05, 0.5, 100)."""
    k = logits.shape[1] - 1
    scores = logits.softmax(-1)[:, :k]  # background last
    boxes = _delta2bbox(rois, deltas, (0.1, 0.1, 0.2, 0.2), height, width)  # (N, K, 4)
    labels = torch.arange(k).expand(len(rois), k)
    boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
    valid = scores > 0.05
    boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
    keep = batched_nms(boxes, scores, labels, 0.5)[:100]
    return boxes[keep], scores[keep], labels[keep]


class _Capture:
    """The detector's FPN levels, RPN head outputs and anchors, as the model computed them."""

    def __init__(self, model):
        self.levels = self.rpn = self.anchors = None
        rpn = model.detector.rpn
        self.hooks = [model.detector.backbone.register_forward_hook(lambda m, i, o: setattr(self, "levels", o)),
                      rpn.head.register_forward_hook(lambda m, i, o: setattr(self, "rpn", o)),
                      rpn.anchor_generator.register_forward_hook(lambda m, i, o: setattr(self, "anchors", o))]

    def close(self):
        for hook in self.hooks:
            hook.remove()


def _load(path, size, **kwargs):
    # min_size / max_size the image's own: no resizing, so the reference sees the same pixels
    return PvtV2ForObjectDetection.from_pretrained(path, min_size=min(size), max_size=max(size), **kwargs).eval()


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("mask", [False, True], ids=["faster_rcnn", "mask_rcnn"])
def test_an_mmdet_rcnn_file_gives_mmdetections_levels_rpn_and_anchors(tmp_path, mask, caplog):
    backbone, head = _backbone(), _rcnn_state(mask=mask)
    path = _mmdet_file(tmp_path, backbone, head)
    size = (96, 160)  # a multiple of 32 only: P6's grid (2 x 3) is not the image over 64
    with caplog.at_level(logging.INFO):
        model = _load(path, size)
    name = "Mask R-CNN" if mask else "Faster R-CNN"
    assert f"backbone and {name} (neck, rpn_head, roi_head" in caplog.text and "optimizer" not in caplog.text
    config = model.config
    assert (config.detector, config.detection_convention, config.fpn_stages, config.fpn_channels, config.num_labels) == \
        ("mask_rcnn" if mask else "faster_rcnn", "mmdetection", [1, 2, 3, 4], WIDTH, len(CLASSES))
    assert config.id2label == dict(enumerate(CLASSES)) and model.newly_initialized_keys == ()
    torch.manual_seed(0)
    image = torch.rand(3, *size)
    capture = _Capture(model)
    with torch.no_grad():
        model([image])
        levels = _mmdet_levels(backbone((image[None] - MEAN) / STD), head)
    capture.close()
    ours = list(capture.levels.values())
    assert len(ours) == len(levels) == 5
    for a, b in zip(levels, ours):
        assert relative_error(a, b) < TOL
    # the RPN's raw outputs, level by level (both (B, A, H, W) and (B, 4A, H, W), anchor-major)
    for level, cls, reg in zip(levels, *capture.rpn):
        their_cls, their_reg = _mmdet_rpn(level, head)
        assert relative_error(their_cls, cls) < TOL and relative_error(their_reg, reg) < TOL
    # the anchors at the nominal strides, unrounded (torchvision's: P6 at 96 // 2 = 48 down, 160 // 3 = 53 across)
    anchors = torch.cat([_mmdet_anchors(s, *level.shape[2:]) for s, level in zip(STRIDES, levels)])
    assert relative_error(anchors, capture.anchors[0]) < 1e-6


def test_the_roi_level_mapping_is_mmdetections():
    """floor(log2(sqrt(area) / 56 + 1e-6)) in 0..3, on boxes of every level and at the boundaries."""
    from pvtv2.models.mmdet_convention import mmdetection_roi_pool

    pool = mmdetection_roi_pool(["0", "1", "2", "3"], 7, STRIDES[:4])
    sides = torch.tensor([4.0, 30, 55.9, 56.1, 111.9, 112.1, 223.9, 224.1, 447.9, 448.1, 900])
    boxes = torch.stack([torch.full_like(sides, 10), torch.full_like(sides, 20), 10 + sides, 20 + sides], dim=1)
    # by hand: level 0 below a side of 112 (56 x 2; below 56 the logarithm is negative, clamped), 1 below 224, 2
    # below 448, then 3 (clamped: there are four levels)
    expected = [0, 0, 0, 0, 0, 1, 1, 2, 2, 3, 3]
    assert pool.levels(boxes).tolist() == expected == _mmdet_roi_levels(boxes).tolist()
    # by the square root of the area, not a side: 141 x 141, 400 x 50 and 50 x 400 boxes alike
    wide = torch.tensor([[0.0, 0, 400, 50], [0, 0, 50, 400], [5, 5, 146, 146], [0, 0, 400, 30]])
    assert pool.levels(wide).tolist() == _mmdet_roi_levels(wide).tolist() == [1, 1, 1, 0]
    # where the 1e-6 sits: inside the logarithm (mmdetection) or outside (torchvision's LevelMapper, whose level 0 is
    # P2 here); a side of 112 * (1 - 6e-7), in float64, is level 0 for the one and 1 for the other
    from torchvision.ops.poolers import LevelMapper

    side = 112 * (1 - 6e-7)
    edge = torch.tensor([[0.0, 0.0, side, side]], dtype=torch.float64)
    assert pool.levels(edge).tolist() == _mmdet_roi_levels(edge).tolist() == [0]
    assert LevelMapper(2, 5)([edge]).tolist() == [1]


@pytest.mark.parametrize("mask", [False, True], ids=["faster_rcnn", "mask_rcnn"])
def test_roi_features_box_and_mask_heads_are_mmdetections_for_given_boxes(tmp_path, mask):
    backbone, head = _backbone(seed=2), _rcnn_state(mask=mask, seed=3)
    path = _mmdet_file(tmp_path, backbone, head)
    height, width = size = (128, 192)
    model = _load(path, size)
    torch.manual_seed(1)
    image = torch.rand(3, *size)
    with torch.no_grad():
        levels = _mmdet_levels(backbone((image[None] - MEAN) / STD), head)
        ours = model.detector.backbone(((image - MEAN[0]) / STD[0])[None])
    names = list(ours)[:4]
    roi_heads = model.detector.roi_heads
    # boxes of every level (some past the image's border, as RoIAlign allows), at fractional positions
    boxes = torch.tensor([[3.3, 4.7, 20.1, 25.9], [50.5, 10.2, 90.7, 60.4], [7.25, 30.5, 120.75, 126.5],
                          [10.0, 2.0, 180.5, 127.0], [-150.3, -150.6, 350.2, 330.9], [60.2, 40.9, 61.8, 43.1],
                          [0.0, 0.0, 192.0, 128.0], [100.5, 64.5, 191.5, 127.5],
                          [-40.5, -60.5, 230.5, 200.5]])
    assert sorted(set(_mmdet_roi_levels(boxes).tolist())) == [0, 1, 2, 3]
    shapes = [(height, width)]
    with torch.no_grad():
        features = roi_heads.box_roi_pool(ours, [boxes], shapes)
        torchvision_features = MultiScaleRoIAlign(names, 7, 2)(ours, [boxes], shapes)
        their_features = _mmdet_roi_features(levels, boxes, 7)
        assert relative_error(their_features, features) < TOL
        # torchvision's own pooler (aligned=False, 2 samples) is measurably another
        assert relative_error(their_features, torchvision_features) > 100 * TOL
        # the box head: class scores (background first here, last there) and class-specific boxes
        logits, deltas = roi_heads.box_predictor(roi_heads.box_head(features))
        their_logits, their_deltas = _mmdet_bbox_head(their_features, head)
        k = len(CLASSES)
        assert logits.shape == (len(boxes), k + 1) and deltas.shape == (len(boxes), 4 * (k + 1))
        assert relative_error(their_logits[:, [k, *range(k)]], logits) < TOL
        assert relative_error(their_logits.softmax(-1)[:, :k], logits.softmax(-1)[:, 1:]) < TOL
        from torchvision.ops.boxes import clip_boxes_to_image

        proposals = boxes.clamp(min=0)
        proposals[:, 0::2], proposals[:, 1::2] = proposals[:, 0::2].clamp(max=width), proposals[:, 1::2].clamp(max=height)
        features = roi_heads.box_roi_pool(ours, [proposals], shapes)
        logits, deltas = roi_heads.box_predictor(roi_heads.box_head(features))
        their_logits, their_deltas = _mmdet_bbox_head(_mmdet_roi_features(levels, proposals, 7), head)
        decoded = clip_boxes_to_image(roi_heads.box_coder.decode(deltas, [proposals]), (height, width))[:, 1:]
        their_boxes = _delta2bbox(proposals, their_deltas, (0.1, 0.1, 0.2, 0.2), height, width)
        assert relative_error(their_boxes, decoded) < TOL
        # the detections of those proposals: multiclass_nms against torchvision's postprocessing (labels 1..K there)
        got_boxes, got_scores, got_labels = roi_heads.postprocess_detections(logits, deltas, [proposals], shapes)
        want_boxes, want_scores, want_labels = _mmdet_detections(their_logits, their_deltas, proposals, height, width)
        assert len(want_boxes) >= 3 and torch.equal(got_labels[0] - 1, want_labels)
        assert relative_error(want_boxes, got_boxes[0]) < TOL and relative_error(want_scores, got_scores[0]) < TOL
        if mask:
            mask_logits = roi_heads.mask_predictor(roi_heads.mask_head(roi_heads.mask_roi_pool(ours, [boxes], shapes)))
            their_masks = _mmdet_mask_head(_mmdet_roi_features(levels, boxes, 14), head)
            assert mask_logits.shape == (len(boxes), k + 1, 28, 28)
            assert relative_error(their_masks, mask_logits[:, 1:]) < TOL


def _mmdet_paste(probabilities: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """_do_paste_mask on the GPU (skip_empty=False: the whole image): (N, 1, 28, 28) -> (N, 1, H, W) probabilities,
    sampled at the pixel centres mapped into each box, grid_sample(align_corners=False), zeros beyond the mask."""
    x0, y0, x1, y1 = boxes.split(1, dim=1)  # (N, 1) each
    img_x = (torch.arange(width, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1  # (N, W)
    img_y = (torch.arange(height, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1  # (N, H)
    n = len(boxes)
    grid = torch.stack([img_x[:, None, :].expand(n, height, width), img_y[:, :, None].expand(n, height, width)], dim=3)
    return F.grid_sample(probabilities, grid, align_corners=False)


@pytest.mark.parametrize("mask", [False, True], ids=["faster_rcnn", "mask_rcnn"])
def test_an_mmdet_rcnn_gives_mmdetections_detections(tmp_path, mask):
    """The whole test: proposals (per-level top 1000, NMS 0.7 per level), box head, multiclass_nms; the masks of the
    detections (the label's sigmoid, pasted)."""
    backbone, head = _backbone(seed=4), _rcnn_state(mask=mask, seed=5)
    path = _mmdet_file(tmp_path, backbone, head, name="faster_rcnn_pvt_v2_b0_fpn_1x_coco.pth")
    height, width = size = (128, 192)
    model = _load(path, size)
    torch.manual_seed(2)
    image = torch.rand(3, *size)
    seen = {}
    hook = model.detector.roi_heads.register_forward_pre_hook(lambda m, args: seen.update(proposals=args[1]))
    with torch.no_grad():
        got = model([image])[0]
    hook.remove()
    with torch.no_grad():
        levels = _mmdet_levels(backbone((image[None] - MEAN) / STD), head)
        rpn = [_mmdet_rpn(level, head) for level in levels]
        anchors = [_mmdet_anchors(s, *level.shape[2:]).float() for s, level in zip(STRIDES, levels)]
        proposals = _mmdet_proposals(rpn, anchors, height, width)
        logits, deltas = _mmdet_bbox_head(_mmdet_roi_features(levels, proposals, 7), head)
        boxes, scores, labels = _mmdet_detections(logits, deltas, proposals, height, width)
    assert 20 <= len(boxes) <= 100 and len(proposals) > 300
    assert relative_error(proposals, seen["proposals"][0]) < TOL  # the same proposals, in the same order
    assert torch.equal(got["labels"], labels)  # 0 .. K - 1 outside the model, as mmdetection's
    # 1e-4 at the end of the chain: the anchors' float32 roundings (computed in float32 there, in float64 and rounded
    # here) move the proposals by an ulp, which RoIAlign's bilinear samples and the box head's random layers
    # amplify (a float64 run of both agrees to 4e-7, the anchors' float32 cell templates left)
    assert relative_error(scores, got["scores"]) < 10 * TOL
    assert relative_error(boxes, got["boxes"]) < 10 * TOL
    if not mask:
        return
    # the masks of the model's own detections (which equal mmdetection's to 1e-4 above; the pasting's samples would
    # carry that difference of the boxes on): the label's sigmoid on the detection's RoI features, pasted
    boxes, labels = got["boxes"], got["labels"]
    with torch.no_grad():
        logits = _mmdet_mask_head(_mmdet_roi_features(levels, boxes, 14), head)  # (N, K, 28, 28)
        probabilities = logits[torch.arange(len(labels)), labels][:, None].sigmoid()
        masks = _mmdet_paste(probabilities, boxes, height, width)
        from torchvision.models.detection.roi_heads import paste_masks_in_image

        torchvision_masks = paste_masks_in_image(probabilities, boxes, (height, width))
    assert got["masks"].shape == masks.shape == (len(boxes), 1, height, width)
    assert relative_error(masks, got["masks"]) < TOL
    # thresholded at 0.5 (mask_thr_binary): the same pixels, but where a probability is within the tolerance of 0.5
    differ = (masks >= 0.5) != (got["masks"] >= 0.5)
    assert ((masks[differ] - 0.5).abs() < TOL).all()
    # torchvision's pasting (the box widened by a cell, rounded to pixels) gives other masks
    assert ((torchvision_masks >= 0.5) != (masks >= 0.5)).sum() > 100


def test_torchvisions_arithmetic_differs_where_the_convention_says(tmp_path):
    """The same file under torchvision's convention: the levels and RPN outputs are the same, the anchors and RoI
    features are not; so the comparisons above can tell the two apart."""
    backbone, head = _backbone(seed=6), _rcnn_state(seed=7)
    path = _mmdet_file(tmp_path, backbone, head)
    mm = _load(path, (96, 160))
    tv = _load(path, (96, 160), detection_convention="torchvision")
    assert tv.config.detection_convention == "torchvision" and tv.newly_initialized_keys == ()
    assert type(tv.detector.roi_heads.box_roi_pool).__name__ == "MultiScaleRoIAlign"
    assert type(tv.detector.transform).__name__ == "GeneralizedRCNNTransform"
    assert type(mm.detector.transform).__name__ == "MMDetectionMaskTransform"
    image = torch.rand(3, 96, 160)
    first, second = _Capture(mm), _Capture(tv)
    with torch.no_grad():
        mm([image]), tv([image])
    first.close(), second.close()
    for a, b in zip(first.rpn[0], second.rpn[0]):
        assert torch.equal(a, b)
    # torchvision: base anchors rounded; P6's stride 96 // 2 = 48 down, 160 // 3 = 53 across, not 64
    assert (first.anchors[0] - second.anchors[0]).abs().max() > 10


def test_save_and_reload_keeps_the_convention(tmp_path):
    from pvtv2.inference import load_detector

    backbone, head = _backbone(seed=8), _rcnn_state(seed=9)
    path = _mmdet_file(tmp_path, backbone, head)
    model = _load(path, (96, 160))
    served = load_detector(path, min_size=96, max_size=160)  # what `pvtv2 detect FILE` runs
    assert served.config.detection_convention == "mmdetection" and served.newly_initialized_keys == ()
    model.save_pretrained(tmp_path / "saved")
    again = PvtV2ForObjectDetection.from_pretrained(tmp_path / "saved").eval()
    assert (again.config.detector, again.config.detection_convention) == ("mask_rcnn", "mmdetection")
    assert again.newly_initialized_keys == () and again.config.id2label == dict(enumerate(CLASSES))
    image = torch.rand(3, 96, 160)
    with torch.no_grad():
        ours, theirs, served_out = model([image])[0], again([image])[0], served([image])[0]
    assert len(ours["boxes"])
    for key in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(ours[key], theirs[key])
    assert torch.equal(ours["labels"], served_out["labels"]) and relative_error(ours["boxes"], served_out["boxes"]) < TOL


@pytest.mark.parametrize("mask", [False, True], ids=["faster_rcnn", "mask_rcnn"])
def test_one_training_step_under_the_mmdetection_convention(tmp_path, mask):
    """The pooler is differentiable: the losses are finite and the gradient reaches the FPN through it."""
    path = _mmdet_file(tmp_path, _backbone(seed=10), _rcnn_state(mask=mask, seed=11))
    model = _load(path, (96, 128)).train()
    masks = torch.zeros(2, 96, 128, dtype=torch.uint8)
    masks[0, 10:60, 20:70] = 1
    masks[1, 30:90, 60:120] = 1
    target = {"boxes": torch.tensor([[20.0, 10, 70, 60], [60, 30, 120, 90]]), "labels": torch.tensor([0, 2])}
    if mask:
        target["masks"] = masks
    losses = model([torch.rand(3, 96, 128)], [target])
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
    assert ("loss_mask" in losses) == mask
    assert all(torch.isfinite(v) for v in losses.values())
    # the box and mask losses alone: their gradient reaches the FPN only through the RoI pooler
    roi_loss = losses["loss_classifier"] + losses["loss_box_reg"] + losses.get("loss_mask", 0)
    roi_loss.backward()
    grad = model.detector.backbone.fpn.layer_blocks[0][0].weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("change, message", [
    (lambda s: [s.pop(k) for k in ("rpn_head.rpn_reg.weight", "rpn_head.rpn_reg.bias")],
     r"Mask R-CNN.*\n.*\n  2 missing keys:\s+rpn_head\.rpn_reg\.bias\s+rpn_head\.rpn_reg\.weight"),
    (lambda s: s.pop("roi_head.bbox_head.shared_fcs.1.weight"), r"missing keys:\s+roi_head\.bbox_head\.shared_fcs\.1\.weight"),
    (lambda s: s.pop("roi_head.mask_head.convs.3.conv.bias"), r"missing keys:\s+roi_head\.mask_head\.convs\.3\.conv\.bias"),
    (lambda s: s.update({"neck.fpn_convs.4.conv.weight": torch.zeros(WIDTH, WIDTH, 3, 3)}),
     r"unexpected keys:\s+neck\.fpn_convs\.4\.conv\.weight"),
    (lambda s: s.update({"roi_head.mask_head.convs.0.gn.weight": torch.ones(MASK_WIDTH)}),
     r"unexpected keys:\s+roi_head\.mask_head\.convs\.0\.gn\.weight"),
    (lambda s: s.update({"roi_head.bbox_head.shared_convs.0.conv.weight": torch.zeros(WIDTH, WIDTH, 3, 3)}),
     r"unexpected keys:\s+roi_head\.bbox_head\.shared_convs\.0\.conv\.weight"),
    (lambda s: s.update({"roi_head.bbox_head.fc_reg.weight": torch.zeros(4, FC), "roi_head.bbox_head.fc_reg.bias": torch.zeros(4)}),
     r"roi_head\.bbox_head\.fc_reg\.weight has the shape \(4, 1024\), not 4 x 3 \(class-specific.*reg_class_agnostic"),
    (lambda s: s.update({"rpn_head.rpn_cls.weight": torch.zeros(6, WIDTH, 1, 1), "rpn_head.rpn_cls.bias": torch.zeros(6)}),
     r"rpn_head\.rpn_cls\.weight has the shape \(6, 24, 1, 1\), not 3 \(one sigmoid per anchor.*use_sigmoid=False"),
    (lambda s: s.update({"roi_head.mask_head.conv_logits.weight": torch.zeros(1, MASK_WIDTH, 1, 1),
                         "roi_head.mask_head.conv_logits.bias": torch.zeros(1)}),
     r"roi_head\.mask_head\.conv_logits\.weight has the shape \(1, 256, 1, 1\), not 3 \(one mask per class"),
    (lambda s: s.update({"roi_head.bbox_head.fc_cls.weight": torch.zeros(1, FC), "roi_head.bbox_head.fc_cls.bias": torch.zeros(1)}),
     r"fc_cls\.weight has the shape \(1, 1024\): fewer than 2 rows"),
    (lambda s: s.update({"roi_head.mask_head.upsample.weight": torch.zeros(MASK_WIDTH, 64, 2, 2)}),
     r"mis-shaped.*\n.*mask_predictor\.conv5_mask\.weight: checkpoint \(256, 64, 2, 2\) vs model \(256, 256, 2, 2\)"),
])
def test_a_partial_or_misshaped_rcnn_is_refused_by_name(tmp_path, change, message):
    head = _rcnn_state()
    change(head)
    path = _mmdet_file(tmp_path, _backbone(), head)
    with pytest.raises(CheckpointError, match=message):
        PvtV2ForObjectDetection.from_pretrained(path)


def test_a_partial_rcnn_is_refused_for_the_backbone_too(tmp_path):
    # Read in part, the absent layers would come out random; the file is not one mmdetection wrote whole.
    head = {k: v for k, v in _rcnn_state(mask=False).items() if not k.startswith("rpn_head.")}
    path = _mmdet_file(tmp_path, _backbone(), head)
    with pytest.raises(CheckpointError, match=r"Faster R-CNN.*\n.*\n  6 missing keys:\s+rpn_head\.rpn_cls\.bias"):
        PvtV2Model.from_pretrained(path)


def test_a_cascade_rcnn_file_is_still_read_for_its_backbone(tmp_path, caplog):
    """A cascade's heads (bbox_head.{stage}.fc_cls, the authors' Cascade Mask R-CNN) are no torchvision module."""
    head = {"neck.lateral_convs.0.conv.weight": torch.randn(WIDTH, 32, 1, 1),
            "rpn_head.rpn_conv.weight": torch.randn(WIDTH, WIDTH, 3, 3),
            "roi_head.bbox_head.0.fc_cls.weight": torch.randn(4, FC)}
    backbone = _backbone(seed=12)
    path = _mmdet_file(tmp_path, backbone, head, name="cascade_mask_rcnn_pvt_v2_b2_fpn_3x_coco.pth")
    with caplog.at_level(logging.INFO):
        model = PvtV2ForObjectDetection.from_pretrained(path, detector="mask_rcnn", min_size=64, max_size=64)
    assert "its backbone is used; its neck, roi_head, rpn_head are not" in caplog.text
    assert model.config.detection_convention == "torchvision"
    assert any(k.startswith("detector.") for k in model.newly_initialized_keys)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(backbone(x)[-1], model.pvt_v2(x).last_hidden_state) < TOL


def test_the_convention_is_checked_for_the_rcnns():
    from pvtv2 import PvtV2Config

    tiny = {"depths": [1, 1, 1, 1], "hidden_sizes": [16, 32, 48, 64], "num_attention_heads": [1, 2, 3, 4],
            "id2label": {0: "a"}}
    with pytest.raises(ValueError, match=r"'faster_rcnn' / 'mask_rcnn' with extra_levels='max_pool'.*got "
                                         r"detector='faster_rcnn', extra_levels='p6p7_on_output'"):
        PvtV2ForObjectDetection(PvtV2Config(**tiny, detector="faster_rcnn", extra_levels="p6p7_on_output",
                                            detection_convention="mmdetection"))
    mm = PvtV2ForObjectDetection(PvtV2Config(**tiny, detector="mask_rcnn", detection_convention="mmdetection"))
    assert type(mm.detector.roi_heads.mask_roi_pool).__name__ == "MMDetectionRoIPool"
    assert type(mm.detector.rpn.anchor_generator).__name__ == "MMDetectionAnchorGenerator"
    default = PvtV2ForObjectDetection(PvtV2Config(**tiny, detector="faster_rcnn"))
    assert type(default.detector.roi_heads.box_roi_pool).__name__ == "MultiScaleRoIAlign"
