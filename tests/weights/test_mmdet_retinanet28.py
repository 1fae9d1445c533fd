"""mmdetection RetinaNet checkpoints (the authors' ``retinanet_pvt_v2_*`` configs: PVTv2 backbone, FPN neck with P6
and P7 on C5, RetinaHead) read whole into ``PvtV2ForObjectDetection``, against mmdetection's computation written out
here with functional ops on the file's own tensors, under mmdetection's key names (mmcv's ``ConvModule``: ``conv``):

- the neck: 1x1 laterals, nearest top-down sums, 3x3 outputs; P6 a stride-2 convolution of C5
  (``add_extra_convs="on_input"``), P7 one of P6 itself (``relu_before_extra_convs=False``);
- the head: 4 x (3x3 conv + ReLU) per branch, then ``retina_cls`` / ``retina_reg``; channels anchor-major;
- the anchors: ``AnchorGenerator(octave_base_scale=4, scales_per_octave=3, ratios=[0.5, 1, 2], strides=[8 .. 128])``
  with ``center_offset=0``: unrounded, at each level's nominal stride, ratio-major and scale-minor;
- the detections: ``DeltaXYWHBBoxCoder`` (means 0, stds 1, dw / dh clamped at |log(16 / 1000)|, boxes clipped to
  the image), sigmoid scores above 0.05, the 1000 best (anchor, class) pairs per level, class-wise NMS at IoU 0.5,
  100 per image (mmdetection's ``test_cfg``).

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

from torchvision.ops import batched_nms

from pvtv2.models.detection import PvtV2ForObjectDetection

TOL = 1e-5
STAGES = (32, 64, 160, 256)  # B0's widths
STRIDES = (8, 16, 32, 64, 128)
CLASSES = ("person", "bicycle", "car")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # mmdetection's 123.675 ... / 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


_backbone = timm_backbone


def _retina_state(width: int = 24, classes: int = len(CLASSES), seed: int = 1) -> dict[str, torch.Tensor]:
    """An FPN (stages 2-4) and RetinaHead as mmdetection names them, random tensors of fan-in scale, biases not 0."""
    g = torch.Generator().manual_seed(seed)

    def conv(out, inp, k):
        return torch.randn(out, inp, k, k, generator=g) * (inp * k * k) ** -0.5

    def bias(n, scale=0.3):
        return torch.randn(n, generator=g) * scale

    s: dict[str, torch.Tensor] = {}
    for i, c in enumerate(STAGES[1:]):
        s[f"neck.lateral_convs.{i}.conv.weight"], s[f"neck.lateral_convs.{i}.conv.bias"] = conv(width, c, 1), bias(width)
    for i in range(5):
        inp = STAGES[-1] if i == 3 else width  # P6 on C5
        s[f"neck.fpn_convs.{i}.conv.weight"], s[f"neck.fpn_convs.{i}.conv.bias"] = conv(width, inp, 3), bias(width)
    for branch in ("cls_convs", "reg_convs"):
        for i in range(4):
            s[f"bbox_head.{branch}.{i}.conv.weight"] = conv(width, width, 3) * 1.5
            s[f"bbox_head.{branch}.{i}.conv.bias"] = bias(width)
    s["bbox_head.retina_cls.weight"], s["bbox_head.retina_cls.bias"] = conv(9 * classes, width, 3) * 2, bias(9 * classes, 1.0) - 2
    s["bbox_head.retina_reg.weight"], s["bbox_head.retina_reg.bias"] = conv(36, width, 3), bias(36)
    return s


def _mmdet_file(tmp_path, backbone, head, name="retinanet_pvt_v2_b0_fpn_1x_coco.pth", classes=CLASSES, **config):
    return write_mmdet_file(tmp_path, backbone, head, name, "RetinaNet", classes, **config)


def _mmdet_levels(features: list[torch.Tensor], s: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """mmdetection's FPN (start_level=1, add_extra_convs='on_input', num_outs=5) on the four stage maps."""
    inputs = features[1:]
    laterals = [F.conv2d(x, s[f"neck.lateral_convs.{i}.conv.weight"], s[f"neck.lateral_convs.{i}.conv.bias"])
                for i, x in enumerate(inputs)]
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
    outs = [F.conv2d(x, s[f"neck.fpn_convs.{i}.conv.weight"], s[f"neck.fpn_convs.{i}.conv.bias"], padding=1)
            for i, x in enumerate(laterals)]
    p6 = F.conv2d(inputs[-1], s["neck.fpn_convs.3.conv.weight"], s["neck.fpn_convs.3.conv.bias"], stride=2, padding=1)
    p7 = F.conv2d(p6, s["neck.fpn_convs.4.conv.weight"], s["neck.fpn_convs.4.conv.bias"], stride=2, padding=1)
    return outs + [p6, p7]


def _mmdet_head(level: torch.Tensor, s: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """RetinaHead on one level: (B, A*K, H, W) class logits and (B, A*4, H, W) deltas."""
    out = []
    for branch, last in (("cls_convs", "retina_cls"), ("reg_convs", "retina_reg")):
        x = level
        for i in range(4):
            x = F.relu(F.conv2d(x, s[f"bbox_head.{branch}.{i}.conv.weight"], s[f"bbox_head.{branch}.{i}.conv.bias"], padding=1))
        out.append(F.conv2d(x, s[f"bbox_head.{last}.weight"], s[f"bbox_head.{last}.bias"], padding=1))
    return out[0], out[1]


def _mmdet_anchors(stride: int, height: int, width: int) -> torch.Tensor:
    """mmdetection's anchors of one level, (H * W * 9, 4), worked out in float64: position-major, then ratio, then
    scale; centred on (x * stride, y * stride) (center_offset=0), not rounded."""
    base = []
    for ratio in (0.5, 1.0, 2.0):
        for k in range(3):
            size = stride * 4 * 2 ** (k / 3)
            w, h = size / math.sqrt(ratio), size * math.sqrt(ratio)
            base.append((-w / 2, -h / 2, w / 2, h / 2))
    rows = []
    for y in range(height):
        for x in range(width):
            for x1, y1, x2, y2 in base:
                rows.append((x * stride + x1, y * stride + y1, x * stride + x2, y * stride + y2))
    return torch.tensor(rows, dtype=torch.float64)


def _flat(t: torch.Tensor, per: int) -> torch.Tensor:
    """(B, A*per, H, W) -> (B, H*W*A, per): mmdetection's ``permute(0, 2, 3, 1).reshape(B, -1, per)``."""
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, per)


def _decode(anchors: torch.Tensor, deltas: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """DeltaXYWHBBoxCoder.decode (means 0, stds 1, wh_ratio_clip 16/1000), clipped to the image."""
    limit = abs(math.log(16 / 1000))
    px, py = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    pw, ph = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    dx, dy = deltas[:, 0], deltas[:, 1]
    dw, dh = deltas[:, 2].clamp(-limit, limit), deltas[:, 3].clamp(-limit, limit)
    gx, gy, gw, gh = px + pw * dx, py + ph * dy, pw * dw.exp(), ph * dh.exp()
    boxes = torch.stack([gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2], dim=1)
    return torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                        boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], dim=1)


def _mmdet_detections(cls, reg, anchors, height, width, classes):
    """test_cfg: sigmoid, score > 0.05, the 1000 best (anchor, class) pairs per level, NMS 0.5 per class, 100."""
    boxes, scores, labels = [], [], []
    for c, r, a in zip(cls, reg, anchors):
        s = c.sigmoid().flatten()
        keep = torch.nonzero(s > 0.05).squeeze(1)
        top, order = s[keep].topk(min(1000, keep.numel()))
        index = keep[order]
        anchor, label = index // classes, index % classes
        boxes.append(_decode(a[anchor], r[anchor], height, width))
        scores.append(top)
        labels.append(label)
    boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    keep = batched_nms(boxes, scores, labels, 0.5)[:100]
    return boxes[keep], scores[keep], labels[keep]


class _Capture:
    """The detector's head outputs and anchors, as the model computed them."""

    def __init__(self, model):
        self.head = self.anchors = None
        self.hooks = [model.detector.head.register_forward_hook(lambda m, i, o: setattr(self, "head", o)),
                      model.detector.anchor_generator.register_forward_hook(lambda m, i, o: setattr(self, "anchors", o))]

    def close(self):
        for hook in self.hooks:
            hook.remove()


@pytest.mark.parametrize("size", [(128, 192), (96, 160)])  # a multiple of 128, and of 32 only (P6, P7 grids odd)
def test_an_mmdet_retinanet_file_gives_mmdetections_outputs(tmp_path, size, caplog):
    backbone, head = _backbone(), _retina_state()
    path = _mmdet_file(tmp_path, backbone, head)
    height, width = size
    with caplog.at_level(logging.INFO):
        # min_size / max_size the image's own: no resizing, so the reference sees the same pixels
        model = PvtV2ForObjectDetection.from_pretrained(path, min_size=min(size), max_size=max(size)).eval()
    assert "backbone and RetinaNet" in caplog.text and "optimizer" not in caplog.text
    config = model.config
    assert (config.detector, config.detection_convention, config.fpn_stages, config.fpn_channels) == \
        ("retinanet", "mmdetection", [2, 3, 4], 24)
    assert config.id2label == dict(enumerate(CLASSES)) and model.newly_initialized_keys == ()
    torch.manual_seed(0)
    image = torch.rand(3, height, width)
    capture = _Capture(model)
    with torch.no_grad():
        got = model([image])[0]
        levels = _mmdet_levels(backbone((image[None] - MEAN) / STD), head)
        outputs = [_mmdet_head(level, head) for level in levels]
    capture.close()
    # the head's raw outputs, level by level
    cls = [_flat(c, len(CLASSES))[0] for c, _ in outputs]
    reg = [_flat(r, 4)[0] for _, r in outputs]
    sizes = [c.shape[0] for c in cls]
    assert sum(sizes) == capture.head["cls_logits"].shape[1]
    for ours, theirs in zip(capture.head["cls_logits"][0].split(sizes), cls):
        assert relative_error(theirs, ours) < TOL
    for ours, theirs in zip(capture.head["bbox_regression"][0].split(sizes), reg):
        assert relative_error(theirs, ours) < TOL
    # the anchors at the nominal strides, unrounded
    anchors = [_mmdet_anchors(s, *level.shape[2:]) for s, level in zip(STRIDES, levels)]
    assert relative_error(torch.cat(anchors), capture.anchors[0]) < 1e-6
    # the detections
    boxes, scores, labels = _mmdet_detections(cls, reg, [a.float() for a in anchors], height, width, len(CLASSES))
    assert 20 <= len(boxes) <= 100  # enough to compare, and the cap reached or not
    assert torch.equal(got["labels"], labels)
    assert relative_error(scores, got["scores"]) < TOL
    assert relative_error(boxes, got["boxes"]) < TOL


def test_torchvisions_arithmetic_differs_where_the_convention_says(tmp_path):
    """The same file under torchvision's convention: P7 (ReLU before its convolution) and the anchors differ, P3-P6
    do not; so the comparisons above can tell the two apart."""
    backbone, head = _backbone(seed=2), _retina_state(seed=3)
    path = _mmdet_file(tmp_path, backbone, head)
    mm = PvtV2ForObjectDetection.from_pretrained(path, min_size=96, max_size=160).eval()
    tv = PvtV2ForObjectDetection.from_pretrained(path, min_size=96, max_size=160, detection_convention="torchvision").eval()
    assert tv.config.detection_convention == "torchvision"
    image = torch.rand(3, 96, 160)
    first, second = _Capture(mm), _Capture(tv)
    with torch.no_grad():
        mm([image]), tv([image])
    first.close(), second.close()
    p7 = 9 * 1 * 2  # the last level: a 1 x 2 grid, 9 anchors
    a, b = first.head["cls_logits"][0], second.head["cls_logits"][0]
    assert torch.equal(a[:-p7], b[:-p7]) and relative_error(a[-p7:], b[-p7:]) > 100 * TOL
    # torchvision: sizes truncated, base anchors rounded; P6's stride 160 // 3 = 53 across, not 64
    assert (first.anchors[0] - second.anchors[0]).abs().max() > 10


def test_save_and_reload_keeps_the_convention(tmp_path):
    from pvtv2.inference import load_detector

    backbone, head = _backbone(seed=4), _retina_state(seed=5)
    path = _mmdet_file(tmp_path, backbone, head)
    model = PvtV2ForObjectDetection.from_pretrained(path, min_size=96, max_size=160).eval()
    served = load_detector(path, min_size=96, max_size=160)  # what `pvtv2 detect FILE` runs
    assert served.config.detection_convention == "mmdetection" and served.newly_initialized_keys == ()
    model.save_pretrained(tmp_path / "saved")
    again = PvtV2ForObjectDetection.from_pretrained(tmp_path / "saved").eval()
    assert again.config.detection_convention == "mmdetection" and again.newly_initialized_keys == ()
    assert again.config.id2label == dict(enumerate(CLASSES))
    image = torch.rand(3, 96, 160)
    with torch.no_grad():
        ours, theirs = model([image])[0], again([image])[0]
        served_out = served([image])[0]
    assert len(ours["boxes"]) and torch.equal(ours["boxes"], theirs["boxes"]) and torch.equal(ours["scores"], theirs["scores"])
    assert torch.equal(ours["labels"], served_out["labels"]) and relative_error(ours["boxes"], served_out["boxes"]) < TOL


def test_a_file_without_the_retinanet_head_is_read_for_its_backbone(tmp_path, caplog):
    head = {k: v for k, v in _retina_state().items() if k.startswith("neck.")}  # the neck alone
    backbone = _backbone(seed=6)
    path = _mmdet_file(tmp_path, backbone, head)
    with caplog.at_level(logging.INFO):
        model = PvtV2ForObjectDetection.from_pretrained(path, id2label={0: "a"}, min_size=64, max_size=64)
    assert "its backbone is used; its neck are not" in caplog.text
    assert model.config.detection_convention == "torchvision"
    assert any(k.startswith("detector.") for k in model.newly_initialized_keys)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(backbone(x)[-1], model.pvt_v2(x).last_hidden_state) < TOL


@pytest.mark.parametrize("change, message", [
    (lambda s: [s.pop(k) for k in ("bbox_head.retina_reg.weight", "bbox_head.retina_reg.bias")],
     r"2 missing keys:\s+bbox_head\.retina_reg\.bias\s+bbox_head\.retina_reg\.weight"),
    (lambda s: s.pop("neck.fpn_convs.4.conv.weight"), r"missing keys:\s+neck\.fpn_convs\.4\.conv\.weight"),
    (lambda s: s.update({"bbox_head.cls_convs.4.conv.weight": torch.zeros(24, 24, 3, 3)}),
     r"unexpected keys:\s+bbox_head\.cls_convs\.4\.conv\.weight"),
    (lambda s: s.update({"bbox_head.cls_convs.0.gn.weight": torch.ones(24)}),
     r"unexpected keys:\s+bbox_head\.cls_convs\.0\.gn\.weight"),
    (lambda s: s.update({"bbox_head.retina_reg.weight": torch.zeros(12, 24, 3, 3), "bbox_head.retina_reg.bias": torch.zeros(12)}),
     r"bbox_head\.retina_reg.*\(12, 24, 3, 3\).*36"),
    (lambda s: s.update({"bbox_head.retina_cls.weight": torch.zeros(28, 24, 3, 3)}), r"bbox_head\.retina_cls.*\(28, 24, 3, 3\)"),
    (lambda s: s.update({"bbox_head.reg_convs.2.conv.weight": torch.zeros(24, 16, 3, 3)}),
     r"mis-shaped.*\n.*regression_head\.conv\.2\.0\.weight: checkpoint \(24, 16, 3, 3\) vs model \(24, 24, 3, 3\)"),
    (lambda s: s.update({"neck.fpn_convs.3.conv.weight": torch.zeros(24, 24, 3, 3)}),
     r"P6 convolution \(neck\.fpn_convs\.3\) takes 24 channels.*on_input"),
])
def test_a_partial_or_misshaped_retinanet_is_refused_by_name(tmp_path, change, message):
    head = _retina_state()
    change(head)
    path = _mmdet_file(tmp_path, _backbone(), head)
    with pytest.raises(CheckpointError, match=message):
        PvtV2ForObjectDetection.from_pretrained(path)


def test_a_partial_retinanet_is_refused_for_the_backbone_too(tmp_path):
    # Read in part, the head's absent layers would come out random; the file is not one mmdetection wrote whole.
    head = {k: v for k, v in _retina_state().items() if not k.startswith("bbox_head.reg_convs.")}
    path = _mmdet_file(tmp_path, _backbone(), head)
    with pytest.raises(CheckpointError, match=r"8 missing keys:\s+bbox_head\.reg_convs\.0\.conv\.bias"):
        PvtV2Model.from_pretrained(path)


def test_the_convention_is_checked_and_limited_to_retinanet():
    from pvtv2 import PvtV2Config

    tiny = {"depths": [1, 1, 1, 1], "hidden_sizes": [16, 32, 48, 64], "num_attention_heads": [1, 2, 3, 4],
            "id2label": {0: "a"}}
    with pytest.raises(ValueError, match=r"detection_convention must be one of torchvision, mmdetection, got 'mmdet'"):
        PvtV2ForObjectDetection(PvtV2Config(**tiny, detection_convention="mmdet"))
    with pytest.raises(ValueError, match=r"retinanet.*got detector='fcos'"):
        PvtV2ForObjectDetection(PvtV2Config(**tiny, detector="fcos", detection_convention="mmdetection"))
    default = PvtV2ForObjectDetection(PvtV2Config(**tiny))
    assert default.config.detection_convention == "torchvision"
    assert type(default.detector.anchor_generator).__name__ == "AnchorGenerator"
