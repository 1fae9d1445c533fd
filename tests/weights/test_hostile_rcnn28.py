"""Hostile mmdetection Faster / Mask R-CNN files (round 28). The recorded training config (``meta["config"]``) was
checked for RetinaNet files only: an R-CNN file whose config sets what its tensors' shapes cannot tell (the RPN's
anchors, RoIAlign's ``aligned`` / ``sampling_ratio`` / output size, the extractor's strides and ``finest_scale``,
the box coders' stds, the FPN's extra levels, the test-time settings) loaded silently into a network that computes
something else. The test-time settings that pvtv2's config holds (the box head's ``score_thr``, NMS IoU and
``max_per_img``) are applied from the file; the others, where they differ from what pvtv2 computes, refuse the file
by name."""

from __future__ import annotations

import logging

import pytest
import torch
from test_mmdet_rcnn28 import _backbone, _mmdet_file, _rcnn_state

from pvtv2 import CheckpointError

pytest.importorskip("torchvision")

from pvtv2.models.detection import PvtV2ForObjectDetection

# The authors' mask_rcnn_pvt_v2_b0_fpn_1x_coco as mmdetection 2.13 dumps it (Config.pretty_text), cut to the model.
AUTHORS = """model = dict(
    type='MaskRCNN',
    backbone=dict(type='pvt_v2_b0', style='pytorch'),
    neck=dict(
        type='FPN',
        in_channels=[32, 64, 160, 256],
        out_channels=24,
        num_outs=5),
    rpn_head=dict(
        type='RPNHead',
        in_channels=24,
        feat_channels=24,
        anchor_generator=dict(
            type='AnchorGenerator',
            scales=[8],
            ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32, 64]),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder',
            target_means=[0.0, 0.0, 0.0, 0.0],
            target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(
            type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
    roi_head=dict(
        type='StandardRoIHead',
        bbox_roi_extractor=dict(
            type='SingleRoIExtractor',
            roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0),
            out_channels=24,
            featmap_strides=[4, 8, 16, 32]),
        bbox_head=dict(
            type='Shared2FCBBoxHead',
            in_channels=24,
            fc_out_channels=1024,
            roi_feat_size=7,
            num_classes=3,
            bbox_coder=dict(
                type='DeltaXYWHBBoxCoder',
                target_means=[0.0, 0.0, 0.0, 0.0],
                target_stds=[0.1, 0.1, 0.2, 0.2]),
            reg_class_agnostic=False,
            loss_cls=dict(
                type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
        mask_roi_extractor=dict(
            type='SingleRoIExtractor',
            roi_layer=dict(type='RoIAlign', output_size=14, sampling_ratio=0),
            out_channels=24,
            featmap_strides=[4, 8, 16, 32]),
        mask_head=dict(
            type='FCNMaskHead',
            num_convs=4,
            in_channels=24,
            conv_out_channels=256,
            num_classes=3,
            loss_mask=dict(
                type='CrossEntropyLoss', use_mask=True, loss_weight=1.0))),
    train_cfg=dict(
        rpn=dict(
            assigner=dict(
                type='MaxIoUAssigner',
                pos_iou_thr=0.7,
                neg_iou_thr=0.3,
                min_pos_iou=0.3,
                match_low_quality=True,
                ignore_iof_thr=-1),
            sampler=dict(
                type='RandomSampler',
                num=256,
                pos_fraction=0.5,
                neg_pos_ub=-1,
                add_gt_as_proposals=False),
            allowed_border=-1,
            pos_weight=-1,
            debug=False),
        rpn_proposal=dict(
            nms_pre=2000,
            max_per_img=1000,
            nms=dict(type='nms', iou_threshold=0.7),
            min_bbox_size=0),
        rcnn=dict(
            assigner=dict(
                type='MaxIoUAssigner',
                pos_iou_thr=0.5,
                neg_iou_thr=0.5,
                min_pos_iou=0.5,
                match_low_quality=True,
                ignore_iof_thr=-1),
            sampler=dict(
                type='RandomSampler',
                num=512,
                pos_fraction=0.25,
                neg_pos_ub=-1,
                add_gt_as_proposals=True),
            mask_size=28,
            pos_weight=-1,
            debug=False)),
    test_cfg=dict(
        rpn=dict(
            nms_pre=1000,
            max_per_img=1000,
            nms=dict(type='nms', iou_threshold=0.7),
            min_bbox_size=0),
        rcnn=dict(
            score_thr=0.05,
            nms=dict(type='nms', iou_threshold=0.5),
            max_per_img=100,
            mask_thr_binary=0.5)))
"""


def _file_with_config(tmp_path, text, key="config", mask=True):
    return _mmdet_file(tmp_path, _backbone(), _rcnn_state(mask=mask), config=text, config_key=key)


@pytest.mark.parametrize("key", ["config", "cfg"])
def test_the_authors_recorded_rcnn_config_loads_with_pvtv2s_settings(tmp_path, key):
    model = PvtV2ForObjectDetection.from_pretrained(_file_with_config(tmp_path, AUTHORS, key))
    c = model.config
    assert (c.detector, c.detection_convention, model.newly_initialized_keys) == ("mask_rcnn", "mmdetection", ())
    assert (c.score_threshold, c.nms_threshold, c.detections_per_image) == (0.05, 0.5, 100)


def _part(text: str, name: str, nth: int = 0) -> int:
    """Where the nth ``name=dict(`` of ``text`` starts (to change one of several parts of the same name)."""
    at = -1
    for _ in range(nth + 1):
        at = text.index(f"{name}=dict(", at + 1)
    return at


def _change(old: str, new: str, after: str | None = None, nth: int = 0):
    def edit(text: str) -> str:
        start = _part(text, after, nth) if after else 0
        at = text.index(old, start)
        return text[:at] + new + text[at + len(old):]
    return edit


@pytest.mark.parametrize("edit, message", [
    (_change("scales=[8]", "scales=[4]"), r"rpn_head anchor_generator scales=\[4\]"),
    (_change("ratios=[0.5, 1.0, 2.0]", "ratios=[1.0, 0.5, 2.0]"), r"anchor_generator ratios=\[1.0, 0.5, 2.0\]"),
    (_change("strides=[4, 8, 16, 32, 64]", "strides=[8, 16, 32, 64, 128]"), r"anchor_generator strides=\[8, 16"),
    (_change("scales=[8],", "scales=[8], center_offset=0.5,"), r"center_offset=0.5"),
    (_change("target_stds=[1.0, 1.0, 1.0, 1.0]", "target_stds=[0.5, 0.5, 1.0, 1.0]"),
     r"rpn_head bbox_coder target_stds=\[0.5, 0.5, 1.0, 1.0\]"),
    (_change("target_stds=[0.1, 0.1, 0.2, 0.2]", "target_stds=[0.05, 0.05, 0.1, 0.1]"),
     r"bbox_head bbox_coder target_stds=\[0.05, 0.05, 0.1, 0.1\]"),
    (_change("target_means=[0.0, 0.0, 0.0, 0.0]", "target_means=[0.0, 0.0, 0.1, 0.1]", "bbox_head"),
     r"bbox_head bbox_coder target_means"),
    (_change("sampling_ratio=0)", "sampling_ratio=2)"), r"bbox_roi_extractor roi_layer sampling_ratio=2"),
    (_change("sampling_ratio=0)", "sampling_ratio=0, aligned=False)", "mask_roi_extractor"),
     r"mask_roi_extractor roi_layer aligned=False"),
    (_change("output_size=7", "output_size=14"), r"bbox_roi_extractor roi_layer output_size=14"),
    (_change("type='RoIAlign'", "type='RoIPool'"), r"roi_layer type='RoIPool'"),
    (_change("featmap_strides=[4, 8, 16, 32]", "featmap_strides=[8, 16, 32, 64]", "mask_roi_extractor"),
     r"mask_roi_extractor featmap_strides=\[8, 16, 32, 64\]"),
    (_change("out_channels=24,\n            featmap_strides", "out_channels=24, finest_scale=112,\n            featmap_strides"),
     r"bbox_roi_extractor finest_scale=112"),
    (_change("num_outs=5)", "num_outs=5, add_extra_convs='on_input')"), r"neck add_extra_convs='on_input'"),
    (_change("max_per_img=1000,", "max_per_img=300,", "test_cfg"), r"test_cfg rpn max_per_img=300"),
    (_change("nms_pre=1000", "nms_pre=2000", "test_cfg"), r"test_cfg rpn nms_pre=2000"),
    (_change("iou_threshold=0.7", "iou_threshold=0.8", "test_cfg"), r"test_cfg rpn nms iou_threshold=0.8"),
])
def test_a_recorded_rcnn_setting_that_the_shapes_cannot_tell_is_refused(tmp_path, edit, message):
    path = _file_with_config(tmp_path, edit(AUTHORS))
    with pytest.raises(CheckpointError, match=message):
        PvtV2ForObjectDetection.from_pretrained(path)


def test_the_recorded_test_settings_of_the_box_head_are_applied(tmp_path, caplog):
    """score_thr, the NMS IoU and max_per_img of test_cfg.rcnn are pvtv2's score_threshold, nms_threshold and
    detections_per_image: the file's are taken (mmdetection's detections are those), and said; one given by the
    caller stays the caller's."""
    text = AUTHORS.replace("score_thr=0.05", "score_thr=0.3").replace("max_per_img=100,", "max_per_img=20,")
    text = _change("iou_threshold=0.5", "iou_threshold=0.6", "test_cfg")(text)
    path = _file_with_config(tmp_path, text)
    with caplog.at_level(logging.INFO):
        model = PvtV2ForObjectDetection.from_pretrained(path)
    c = model.config
    assert (c.score_threshold, c.nms_threshold, c.detections_per_image) == (0.3, 0.6, 20)
    roi = model.detector.roi_heads
    assert (roi.score_thresh, roi.nms_thresh, roi.detections_per_img) == (0.3, 0.6, 20)
    assert "score_threshold=0.3" in caplog.text and "detections_per_image=20" in caplog.text
    given = PvtV2ForObjectDetection.from_pretrained(path, score_threshold=0.1)
    assert (given.config.score_threshold, given.config.nms_threshold, given.config.detections_per_image) == (0.1, 0.6, 20)


def test_another_mask_threshold_is_said(tmp_path, caplog):
    """pvtv2 returns mask probabilities and its COCO evaluation thresholds them at 0.5: a file recording another
    mask_thr_binary is read (the network is the same) with a warning naming it."""
    path = _file_with_config(tmp_path, AUTHORS.replace("mask_thr_binary=0.5", "mask_thr_binary=0.4"))
    with caplog.at_level(logging.WARNING):
        PvtV2ForObjectDetection.from_pretrained(path)
    assert "mask_thr_binary=0.4" in caplog.text


def test_masks_of_a_float64_model_are_pasted_in_float64():
    """paste_masks_mmdetection computed in float32 whatever the masks' dtype (the boxes and samples rounded to
    float32, returned as float64): a model moved to float64 (``.double()``, ``dtype=torch.float64``) pasted its
    masks 1e-7 off mmdetection's pasting in float64. Held against _do_paste_mask written out in float64."""
    import torch.nn.functional as F

    from pvtv2.models.mmdet_convention import paste_masks_mmdetection

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 1, 28, 28, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[3.3, 7.1, 60.7, 41.9], [0.2, 0.4, 149.9, 99.7], [70.123456789, 20.5, 71.987654321, 80.25]],
                         dtype=torch.float64)
    height, width = 100, 150
    x0, y0, x1, y1 = boxes.split(1, dim=1)
    img_x = (torch.arange(width, dtype=torch.float64) + 0.5 - x0) / (x1 - x0) * 2 - 1
    img_y = (torch.arange(height, dtype=torch.float64) + 0.5 - y0) / (y1 - y0) * 2 - 1
    grid = torch.stack([img_x[:, None, :].expand(3, height, width), img_y[:, :, None].expand(3, height, width)], dim=3)
    expected = F.grid_sample(masks, grid, align_corners=False)
    got = paste_masks_mmdetection(masks, boxes, height, width)
    assert got.dtype == torch.float64
    assert (got - expected).abs().max() < 1e-12
    # float32 masks stay float32 and as close as float32 allows
    got32 = paste_masks_mmdetection(masks.float(), boxes.float(), height, width)
    assert got32.dtype == torch.float32 and (got32 - expected).abs().max() < 1e-4  # the thin box: 28 cells over 1.9 px


def test_a_batch_of_sizes_not_multiples_of_32_gives_mmdetections_detections(tmp_path):
    """Two images of other sizes than multiples of 32 in one batch: mmdetection pads the normalized images with
    zeros to the batch's size rounded up to 32 (here 128 x 160), and each image's proposals and boxes are clipped to
    its own size; written out with test_mmdet_rcnn28's reference on the padded canvas."""
    import torch.nn.functional as F
    from test_mmdet_rcnn28 import (
        MEAN,
        STD,
        STRIDES,
        _mmdet_anchors,
        _mmdet_bbox_head,
        _mmdet_detections,
        _mmdet_levels,
        _mmdet_proposals,
        _mmdet_roi_features,
        _mmdet_rpn,
    )

    backbone, head = _backbone(seed=4), _rcnn_state(mask=False, seed=5)
    path = _mmdet_file(tmp_path, backbone, head, name="faster_rcnn_pvt_v2_b0_fpn_1x_coco.pth")
    # short side 96 and long side at most 160: neither image is resized
    model = PvtV2ForObjectDetection.from_pretrained(path, min_size=96, max_size=160).eval()
    torch.manual_seed(3)
    images = [torch.rand(3, 96, 150), torch.rand(3, 100, 96)]
    with torch.no_grad():
        got = model(images)
        for image, out in zip(images, got):
            height, width = image.shape[1:]
            canvas = F.pad((image[None] - MEAN) / STD, (0, 160 - width, 0, 128 - height))
            levels = _mmdet_levels(backbone(canvas), head)
            rpn = [_mmdet_rpn(level, head) for level in levels]
            anchors = [_mmdet_anchors(s, *level.shape[2:]).float() for s, level in zip(STRIDES, levels)]
            proposals = _mmdet_proposals(rpn, anchors, height, width)
            logits, deltas = _mmdet_bbox_head(_mmdet_roi_features(levels, proposals, 7), head)
            boxes, scores, labels = _mmdet_detections(logits, deltas, proposals, height, width)
            assert len(boxes) >= 10
            assert torch.equal(out["labels"], labels)
            assert (out["boxes"] - boxes).abs().max() < 1e-3 and (out["scores"] - scores).abs().max() < 1e-4


def test_the_aligned_pooler_keeps_float32_boxes_under_bfloat16_autocast():
    """The mmdetection convention's RoI pooler cast the boxes to the features' dtype: under bfloat16 autocast
    (``--bf16`` in training, where the ground-truth boxes join the proposals in float32) a box at x = 790.3 was
    pooled at 792, 0.46 off features of size 1.2. torchvision's roi_align under autocast samples bfloat16 features
    at float32 boxes; held against it."""
    from torchvision.ops import roi_align

    from pvtv2.models.mmdet_convention import mmdetection_roi_pool

    pool = mmdetection_roi_pool(["0", "1"], 7, [4, 8])
    g = torch.Generator().manual_seed(0)
    feats = {"0": torch.randn(1, 8, 200, 200, generator=g).bfloat16(), "1": torch.randn(1, 8, 100, 100, generator=g).bfloat16()}
    boxes = torch.tensor([[301.3, 407.7, 333.9, 450.1], [650.6, 10.2, 790.3, 160.9]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pool(feats, [boxes], [(800, 800)])
    assert pool.levels(boxes).tolist() == [0, 1]  # sqrt(area) 33 and 145 against finest_scale 56
    expected = torch.cat([
        roi_align(feats[str(level)].float(), torch.cat([torch.zeros(1), box])[None], 7, spatial_scale=1 / stride,
                  sampling_ratio=0, aligned=True)
        for level, (box, stride) in enumerate(zip(boxes, (4, 8)))
    ])
    assert (got.float() - expected).abs().max() < 1e-2  # bfloat16's rounding of the result, not of the boxes


def test_a_retinanet_files_recorded_test_settings_are_applied_too(tmp_path):
    """The RetinaNet reading checked the recorded neck and anchors but left its test_cfg (score_thr, NMS IoU,
    max_per_img) aside: a file recording score_thr=0.3 gave pvtv2's 0.05 detections without a word. Applied as the
    R-CNNs' are; an nms_pre other than torchvision's 1000 candidates per level refused by name."""
    from test_hostile_mmdet28 import AUTHORS as RETINA
    from test_hostile_mmdet28 import _file_with_config as _retina_file

    test_cfg = ("    test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.3, nms=dict(type='nms', iou_threshold=0.4), "
                "max_per_img=50))\n")
    text = RETINA.rstrip().removesuffix(")") + ",\n" + test_cfg
    model = PvtV2ForObjectDetection.from_pretrained(_retina_file(tmp_path, text))
    c = model.config
    assert (c.detector, c.score_threshold, c.nms_threshold, c.detections_per_image) == ("retinanet", 0.3, 0.4, 50)
    head = model.detector
    assert (head.score_thresh, head.nms_thresh, head.detections_per_img) == (0.3, 0.4, 50)
    with pytest.raises(CheckpointError, match=r"test_cfg nms_pre=2000"):
        PvtV2ForObjectDetection.from_pretrained(_retina_file(tmp_path, text.replace("nms_pre=1000", "nms_pre=2000")))


@pytest.mark.parametrize("kind", ["rcnn", "retinanet"])
def test_the_encoder_of_a_file_with_another_recorded_head_setting_still_reads(tmp_path, kind, capsys):
    """The recorded-config check is about the detector's arithmetic: it refused the encoder alone too
    (PvtV2Model.from_pretrained, `pvtv2 convert FILE encoder.safetensors --layout timm`, the way out its own message
    gives), whose numbers the setting does not touch. The encoder reads, and equals timm's on the file's backbone."""
    from test_hostile_mmdet28 import AUTHORS as RETINA
    from test_hostile_mmdet28 import _file_with_config as _retina_file

    from pvtv2 import PvtV2Model
    from pvtv2.cli import main

    if kind == "rcnn":
        path = _file_with_config(tmp_path, AUTHORS.replace("sampling_ratio=0)", "sampling_ratio=2)"))
    else:
        path = _retina_file(tmp_path, RETINA.replace("octave_base_scale=4", "octave_base_scale=8"))
    with pytest.raises(CheckpointError, match="sampling_ratio=2" if kind == "rcnn" else "octave_base_scale=8"):
        PvtV2ForObjectDetection.from_pretrained(path)  # the detector is still refused
    encoder = PvtV2Model.from_pretrained(path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (_backbone()(x)[-1] - encoder(x).last_hidden_state).abs().max() < 1e-5
    assert main(["convert", str(path), str(tmp_path / "encoder.safetensors"), "--layout", "timm"]) == 0, capsys.readouterr().err
