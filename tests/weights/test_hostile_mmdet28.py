"""Hostile mmdetection RetinaNet files (round 28): settings that change the computation but not a tensor's shape.
mmdetection writes its whole config as text beside the weights (mmcv: ``meta["config"]``; mmengine: ``meta["cfg"]``).
An FPN 256 wide on B0 (whose last stage is 256 wide too) computes P6 from C5 (``add_extra_convs="on_input"``, the
authors' configs) or from P5 (``"on_output"``) with tensors of the same shapes, and the anchors' scales are not in
the file's tensors at all: where the recorded config says otherwise than what pvtv2 computes, the file is refused by
name, not read into a network that computes something else."""

from __future__ import annotations

import pytest
import torch
from test_mmdet_retinanet28 import _backbone, _mmdet_file, _retina_state

from pvtv2 import CheckpointError

pytest.importorskip("torchvision")

from pvtv2.models.detection import PvtV2ForObjectDetection

AUTHORS = """model = dict(
    type='RetinaNet',
    backbone=dict(type='pvt_v2_b0', style='pytorch'),
    neck=dict(
        type='FPN',
        in_channels=[32, 64, 160, 256],
        out_channels=256,
        start_level=1,
        add_extra_convs='on_input',
        num_outs=5),
    bbox_head=dict(
        type='RetinaHead',
        num_classes=3,
        in_channels=256,
        stacked_convs=4,
        feat_channels=256,
        anchor_generator=dict(
            type='AnchorGenerator',
            octave_base_scale=4,
            scales_per_octave=3,
            ratios=[0.5, 1.0, 2.0],
            strides=[8, 16, 32, 64, 128])))
"""


def _file_with_config(tmp_path, text, key="config"):
    return _mmdet_file(tmp_path, _backbone(), _retina_state(width=256), config=text, config_key=key)


@pytest.mark.parametrize("key", ["config", "cfg"])
def test_the_authors_recorded_config_loads(tmp_path, key):
    model = PvtV2ForObjectDetection.from_pretrained(_file_with_config(tmp_path, AUTHORS, key))
    assert model.config.detection_convention == "mmdetection" and model.newly_initialized_keys == ()


@pytest.mark.parametrize("old, new, message", [
    ("add_extra_convs='on_input'", "add_extra_convs='on_output'", r"add_extra_convs='on_output'"),
    ("add_extra_convs='on_input'", 'add_extra_convs="on_lateral"', r"add_extra_convs='on_lateral'"),
    ("num_outs=5)", "num_outs=5, relu_before_extra_convs=True)", r"relu_before_extra_convs=True"),
    ("add_extra_convs='on_input'", "add_extra_convs=True, extra_convs_on_inputs=False", r"extra_convs_on_inputs=False"),
    ("octave_base_scale=4", "octave_base_scale=8", r"octave_base_scale=8"),
    ("scales_per_octave=3", "scales_per_octave=2", r"scales_per_octave=2"),
    ("strides=[8, 16, 32, 64, 128]", "strides=[4, 8, 16, 32, 64]", r"strides=\[4, 8, 16, 32, 64\]"),
    ("ratios=[0.5, 1.0, 2.0]", "ratios=[1.0, 0.5, 2.0]", r"ratios=\[1.0, 0.5, 2.0\]"),
])
def test_a_recorded_setting_that_the_shapes_cannot_tell_is_refused(tmp_path, old, new, message):
    assert old in AUTHORS
    path = _file_with_config(tmp_path, AUTHORS.replace(old, new))
    with pytest.raises(CheckpointError, match=message):
        PvtV2ForObjectDetection.from_pretrained(path)


def test_info_says_what_a_detection_file_holds(tmp_path, capsys):
    """`pvtv2 info` of an mmdetection RetinaNet file showed its encoder with ``num_labels`` null: the classes, the
    detector and its arithmetic (which decide the detections) are the file's, and are said."""
    import json

    from pvtv2.cli import main

    path = _mmdet_file(tmp_path, _backbone(), _retina_state())
    assert main(["info", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["num_labels"], summary["detector"], summary["detection_convention"]) == (3, "retinanet", "mmdetection")
    assert main(["info", str(path)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "retinanet detector (mmdetection's arithmetic)" in first and "3 classes" in first


def test_tensors_that_share_storage_in_the_file_become_separate_parameters(tmp_path):
    """torch.save keeps tensors that share storage shared, and the loader assigned the file's tensors as the
    parameters: two layers stored as one tensor (or as views of one buffer) were then one parameter in two places,
    so a step on one moved the other, and save_pretrained failed (safetensors refuses shared tensors)."""
    head = _retina_state()
    head["bbox_head.reg_convs.0.conv.weight"] = head["bbox_head.cls_convs.0.conv.weight"]  # the same tensor twice
    buffer = torch.randn(2 * 24 * 24 * 9)
    head["bbox_head.cls_convs.1.conv.weight"] = buffer[: 24 * 24 * 9].view(24, 24, 3, 3)  # views of one buffer
    head["bbox_head.cls_convs.2.conv.weight"] = buffer[24 * 24 * 9 :].view(24, 24, 3, 3)
    head["bbox_head.cls_convs.3.conv.weight"] = head["bbox_head.cls_convs.3.conv.weight"].transpose(2, 3).contiguous().transpose(2, 3)
    path = _mmdet_file(tmp_path, _backbone(), head)
    model = PvtV2ForObjectDetection.from_pretrained(path, min_size=96, max_size=160).eval()
    params = dict(model.named_parameters())
    cls0 = params["detector.head.classification_head.conv.0.0.weight"]
    reg0 = params["detector.head.regression_head.conv.0.0.weight"]
    assert torch.equal(cls0, head["bbox_head.cls_convs.0.conv.weight"]) and torch.equal(cls0, reg0)
    storages = [p.untyped_storage().data_ptr() for p in params.values()]
    assert len(set(storages)) == len(storages)  # every parameter its own memory
    with torch.no_grad():
        cls0.add_(1.0)
    assert torch.equal(reg0, head["bbox_head.reg_convs.0.conv.weight"])  # untouched by the step on the other
    model.save_pretrained(tmp_path / "saved")
    again = PvtV2ForObjectDetection.from_pretrained(tmp_path / "saved")
    for key, value in again.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


@pytest.mark.parametrize("detector", ["faster_rcnn", "fcos"])
def test_another_detector_on_a_retinanet_file_says_what_the_file_is(tmp_path, detector, capsys):
    """from_pretrained(FILE, detector=...) and `pvtv2 train --task detection --model FILE --detector ...` on an
    mmdetection RetinaNet file answered "detection_convention='mmdetection' is implemented for detector='retinanet'"
    (or FCOS's group count), a setting the user never gave; the file's kind and the ways out are named instead."""
    path = _mmdet_file(tmp_path, _backbone(), _retina_state())
    with pytest.raises(CheckpointError, match=rf"mmdetection RetinaNet.*detector='{detector}'.*detector='retinanet'"):
        PvtV2ForObjectDetection.from_pretrained(path, detector=detector)


def test_recorded_class_names_that_do_not_fit_are_said_to_be_left_out(tmp_path, caplog):
    """meta CLASSES of another count than the head's classes were dropped without a word (the labels came out
    LABEL_0 ...); the file's own record is wrong, and the log says which names were not used and why."""
    import logging

    path = _mmdet_file(tmp_path, _backbone(), _retina_state(), classes=("person", "bicycle"))
    with caplog.at_level(logging.WARNING):
        model = PvtV2ForObjectDetection.from_pretrained(path)
    assert model.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert "records 2 class names" in caplog.text and "3 classes" in caplog.text
