"""The original repository's mmdetection / mmsegmentation checkpoints (``backbone.`` + the original layout), and
detector checkpoints as a source of encoder weights."""

from __future__ import annotations

import logging

import pytest
import timm
import torch

from pvtv2 import CheckpointError, PvtV2Backbone, PvtV2Config, PvtV2ForSemanticSegmentation, PvtV2Model
from pvtv2.weights.layouts import convert_state_dict, detect_layout

from conftest import random_weights_, relative_error, shrink_patch_embeddings_

pytest.importorskip("torchvision")

from pvtv2.models.detection import PvtV2ForObjectDetection  # noqa: E402

TOL = 1e-5


def reference_encoder(seed: int = 0) -> torch.nn.Module:
    """timm's B0 (one block per stage) with random weights whose patch embeddings make LayerNorm epsilons matter."""
    model = timm.create_model("pvt_v2_b0", pretrained=False, depths=(1, 2, 1, 1), features_only=True)
    random_weights_(model, seed=seed)
    return shrink_patch_embeddings_(model, 1e-3).eval()


def mmdet_file(tmp_path, reference, heads: dict[str, torch.Tensor]) -> str:
    """The reference's weights as the original repository's detection code saved them: ``backbone.`` + the original
    layout, beside a neck and heads, inside mmcv's ``{"meta": ..., "state_dict": ...}``."""
    timm_state = {k.replace("stages_", "stages.", 1): v for k, v in reference.state_dict().items()}
    original = convert_state_dict(timm_state, "original")
    state = {f"backbone.{k}": v for k, v in original.items()} | heads
    path = tmp_path / "retinanet_pvt_v2_b0_fpn_1x_coco.pth"
    torch.save({"meta": {"epoch": 12, "CLASSES": ["person", "bicycle"], "mmdet_version": "2.13.0"},
                "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    return path


# A Cascade R-CNN's neck and heads (a few keys of them; the box heads numbered by stage): read for the backbone only.
# (A RetinaNet's and a Faster / Mask R-CNN's are read whole, and a part of one refused:
# tests/weights/test_mmdet_retinanet28.py, tests/weights/test_mmdet_rcnn28.py.)
MMDET_HEADS = {
    "neck.lateral_convs.0.conv.weight": torch.randn(256, 64, 1, 1),
    "neck.fpn_convs.3.conv.weight": torch.randn(256, 256, 3, 3),
    "rpn_head.rpn_conv.weight": torch.randn(256, 256, 3, 3),
    "roi_head.bbox_head.0.fc_cls.weight": torch.randn(81, 1024),
}
MMSEG_HEADS = {"decode_head.scale_heads.0.0.conv.weight": torch.randn(128, 256, 3, 3),
               "decode_head.conv_seg.weight": torch.randn(150, 128, 1, 1)}


@pytest.mark.parametrize("heads", [MMDET_HEADS, MMSEG_HEADS], ids=["mmdetection", "mmsegmentation"])
def test_mmdet_checkpoints_give_the_original_backbone(tmp_path, heads, caplog):
    reference = reference_encoder()
    path = mmdet_file(tmp_path, reference, heads)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert detect_layout(state) == "mmdet"
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        expected = reference(x)  # the four stage maps
        with caplog.at_level(logging.INFO):
            backbone = PvtV2Backbone.from_pretrained(path, out_indices=[0, 1, 2, 3])
        assert "mmdetection / mmsegmentation checkpoint" in caplog.text
        assert backbone.config.patch_norm_eps == 1e-5 and backbone.config.reduction_norm_eps == 1e-5
        for e, got in zip(expected, backbone(x).feature_maps):
            assert relative_error(e, got) < TOL
        encoder = PvtV2Model.from_pretrained(path)
        assert relative_error(expected[-1], encoder(x).last_hidden_state) < TOL
        # A segmentation model takes the encoder; mmsegmentation's Semantic FPN (these few keys of it) is read into
        # decode_head_type="fpn" (tests/weights/test_mmseg_semantic_fpn.py), its 150-class classifier replaced here.
        seg = PvtV2ForSemanticSegmentation.from_pretrained(path, id2label={0: "a", 1: "b"})
        assert relative_error(expected[-1], seg.pvt_v2(x).last_hidden_state) < TOL
        assert seg.head_type == ("fpn" if heads is MMSEG_HEADS else "segformer")
        if heads is MMSEG_HEADS:
            assert "decode_head.scale_heads.0.0.conv.weight" not in seg.newly_initialized_keys
            assert "decode_head.classifier.weight" in seg.newly_initialized_keys


def test_an_mmdet_checkpoint_initialises_a_detectors_backbone(tmp_path):
    reference = reference_encoder(seed=1)
    path = mmdet_file(tmp_path, reference, MMDET_HEADS)
    model = PvtV2ForObjectDetection.from_pretrained(path, detector="retinanet", id2label={0: "person"}, min_size=96, max_size=128)
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        ours = model.pvt_v2(x, output_hidden_states=True).hidden_states
        for e, got in zip(reference(x), ours):
            assert relative_error(e, got) < TOL
        assert len(model([x[0]])) == 1  # the rest is newly initialised and runs


def test_unknown_keys_beside_an_mmdet_backbone_are_named(tmp_path):
    path = mmdet_file(tmp_path, reference_encoder(), {"extra_module.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="extra_module.weight"):
        PvtV2Model.from_pretrained(path)


def test_a_detectors_checkpoint_initialises_other_models_encoders(tmp_path, caplog):
    torch.manual_seed(0)
    config = PvtV2Config(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4],
                         id2label={0: "a"}, detector="fcos", min_size=64, max_size=64)
    detector = PvtV2ForObjectDetection(config).eval()
    random_weights_(detector.pvt_v2)
    detector.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO):
        encoder = PvtV2Model.from_pretrained(tmp_path)
    assert "has no detector" in caplog.text
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(detector.pvt_v2(x).last_hidden_state, encoder(x).last_hidden_state)


def test_a_bad_detector_setting_in_a_folders_config_json_names_the_file(tmp_path):
    """The detector's settings are config.json fields the model checks: a bad one names the file, as a bad encoder
    field does; the same value given as an override is the override's error alone."""
    import json
    import re

    config = PvtV2Config(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4],
                         id2label={0: "a"}, detector="fcos", min_size=64, max_size=64)
    PvtV2ForObjectDetection(config).eval().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["min_size"] = -1
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: min_size must be a positive integer, got -1$"):
        PvtV2ForObjectDetection.from_pretrained(tmp_path)
    assert PvtV2ForObjectDetection.from_pretrained(tmp_path, min_size=32).config.min_size == 32
    data["min_size"] = 64
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"^min_size must be a positive integer, got -5$"):
        PvtV2ForObjectDetection.from_pretrained(tmp_path, min_size=-5)
