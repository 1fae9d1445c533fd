"""mmsegmentation Semantic FPN checkpoints (the authors' ADE20K configs: PVTv2 backbone, FPN neck, FPNHead) read
whole: the backbone against timm's feature maps, the neck and head against mmsegmentation's forward written out with
functional ops on the file's own tensors, under mmsegmentation's key names (mmcv's ``ConvModule``: ``conv``, ``bn``;
``FPNHead.scale_heads.{level}.{index}`` with an ``Upsample`` after each block below stride 4; ``conv_seg``)."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
import torch.nn.functional as F

from pvtv2 import CheckpointError, PvtV2ForSemanticSegmentation, PvtV2Model
from pvtv2.export import convert_checkpoint, load_export_model
from pvtv2.inference import load_segmenter
from pvtv2.weights.layouts import convert_state_dict

from conftest import random_weights_, relative_error, shrink_patch_embeddings_

TOL = 1e-5
STAGES = (32, 64, 160, 256)  # B0's widths


def _reference_backbone(seed: int = 0) -> torch.nn.Module:
    model = timm.create_model("pvt_v2_b0", pretrained=False, depths=(1, 2, 1, 1), features_only=True)
    random_weights_(model, seed=seed)
    return shrink_patch_embeddings_(model, 1e-3).eval()


def _mmseg_head(width: int, channels: int, labels: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """A Semantic FPN's neck and head as mmsegmentation names them, with random tensors (BatchNorm statistics too)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=None):
        fan_in = shape[1] * shape[2] * shape[3] if len(shape) == 4 else 1
        return torch.randn(*shape, generator=g) * (scale if scale is not None else fan_in ** -0.5)

    state: dict[str, torch.Tensor] = {}
    for i, c in enumerate(STAGES):
        state[f"neck.lateral_convs.{i}.conv.weight"] = rand(width, c, 1, 1)
        state[f"neck.lateral_convs.{i}.conv.bias"] = rand(width, scale=0.1)
        state[f"neck.fpn_convs.{i}.conv.weight"] = rand(width, width, 3, 3)
        state[f"neck.fpn_convs.{i}.conv.bias"] = rand(width, scale=0.1)
        for k in range(max(1, i)):
            prefix = f"decode_head.scale_heads.{i}.{2 * k if i else 0}."
            state[prefix + "conv.weight"] = rand(channels, width if k == 0 else channels, 3, 3)
            state[prefix + "bn.weight"] = 1 + rand(channels, scale=0.2)
            state[prefix + "bn.bias"] = rand(channels, scale=0.2)
            state[prefix + "bn.running_mean"] = rand(channels, scale=0.3)
            state[prefix + "bn.running_var"] = torch.rand(channels, generator=g) + 0.5
            state[prefix + "bn.num_batches_tracked"] = torch.tensor(40000)
    state["decode_head.conv_seg.weight"] = rand(labels, channels, 1, 1)
    state["decode_head.conv_seg.bias"] = rand(labels, scale=0.1)
    return state


def _mmseg_file(tmp_path, backbone: torch.nn.Module, head: dict[str, torch.Tensor], name="fpn_pvt_v2_b0_ade20k.pth",
                meta=None):
    """mmcv's checkpoint: ``{"meta", "state_dict", "optimizer"}``, the backbone in the original layout."""
    timm_state = {k.replace("stages_", "stages.", 1): v for k, v in backbone.state_dict().items()}
    state = {f"backbone.{k}": v for k, v in convert_state_dict(timm_state, "original").items()} | head
    path = tmp_path / name
    if meta is None:
        meta = {"mmseg_version": "0.13.0", "CLASSES": ("wall", "building"), "PALETTE": [[120, 120, 120], [180, 120, 120]],
                "iter": 40000, "config": "model = dict(type='EncoderDecoder')"}
    torch.save({"meta": meta, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    return path


def _mmseg_forward(features: list[torch.Tensor], s: dict[str, torch.Tensor]) -> torch.Tensor:
    """mmsegmentation's FPN (no norm, no activation, nearest top-down) and FPNHead, from the file's tensors."""
    laterals = [F.conv2d(f, s[f"neck.lateral_convs.{i}.conv.weight"], s[f"neck.lateral_convs.{i}.conv.bias"])
                for i, f in enumerate(features)]
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
    outs = [F.conv2d(x, s[f"neck.fpn_convs.{i}.conv.weight"], s[f"neck.fpn_convs.{i}.conv.bias"], padding=1)
            for i, x in enumerate(laterals)]
    total = None
    for i, x in enumerate(outs):
        for k in range(max(1, i)):
            p = f"decode_head.scale_heads.{i}.{2 * k if i else 0}."
            x = F.conv2d(x, s[p + "conv.weight"], None, padding=1)
            x = F.batch_norm(x, s[p + "bn.running_mean"], s[p + "bn.running_var"], s[p + "bn.weight"],
                             s[p + "bn.bias"], False, 0.0, 1e-5)
            x = F.relu(x)
            if i:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        total = x if total is None else total + F.interpolate(x, size=total.shape[2:], mode="bilinear",
                                                             align_corners=False)
    return F.conv2d(total, s["decode_head.conv_seg.weight"], s["decode_head.conv_seg.bias"])


@pytest.mark.parametrize("size", [(128, 96), (100, 140)])  # a multiple of 32, and not
def test_an_mmseg_semantic_fpn_file_gives_mmsegmentations_logits(tmp_path, size, caplog):
    backbone = _reference_backbone()
    head = _mmseg_head(width=24, channels=12, labels=7)
    path = _mmseg_file(tmp_path, backbone, head)
    with caplog.at_level(logging.INFO):
        model = PvtV2ForSemanticSegmentation.from_pretrained(path).eval()
    assert "Semantic FPN" in caplog.text and "optimizer" not in caplog.text
    assert model.head_type == "fpn" and model.config.num_labels == 7 and model.config.decoder_hidden_size == 24
    assert model.newly_initialized_keys == ()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = _mmseg_forward(backbone(x), head)
        got = model(x).logits
    assert relative_error(expected, got) < TOL


def test_the_file_is_served_converted_and_exported_with_its_head(tmp_path, caplog):
    backbone = _reference_backbone(seed=2)
    head = _mmseg_head(width=16, channels=8, labels=3, seed=3)
    path = _mmseg_file(tmp_path, backbone, head)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = _mmseg_forward(backbone(x), head)
        assert relative_error(expected, load_segmenter(path)(x).logits) < TOL
        assert relative_error(expected, load_export_model(path)(x).logits) < TOL
        # A folder keeps the whole model: before, convert wrote the encoder alone and dropped the head silently.
        convert_checkpoint(path, tmp_path / "folder")
        folder = PvtV2ForSemanticSegmentation.from_pretrained(tmp_path / "folder").eval()
        assert folder.newly_initialized_keys == ()
        assert relative_error(expected, folder(x).logits) < TOL
        again = convert_checkpoint(tmp_path / "folder", tmp_path / "again")
        assert again["model"] == "PvtV2ForSemanticSegmentation"
    # A single timm file cannot hold the head: said, and the encoder is what it holds.
    with caplog.at_level(logging.WARNING):
        info = convert_checkpoint(path, tmp_path / "encoder.pth", layout="timm")
    assert info["model"] == "PvtV2Model" and "the segmentation head" in caplog.text
    with torch.no_grad():
        encoder = PvtV2Model.from_pretrained(tmp_path / "encoder.pth")
        assert relative_error(backbone(x)[-1], encoder(x).last_hidden_state) < TOL


def test_a_head_of_other_proportions_is_refused_with_its_shapes(tmp_path):
    # pvtv2's Semantic FPN head is half as wide as its neck (mmsegmentation's fpn_r50: 256 and 128).
    path = _mmseg_file(tmp_path, _reference_backbone(), _mmseg_head(width=24, channels=16, labels=5))
    with pytest.raises(CheckpointError, match=r"scale_heads\.0\.0\.conv\.weight.*16.*24"):
        PvtV2ForSemanticSegmentation.from_pretrained(path)


def test_other_mmseg_heads_are_still_left_out(tmp_path, caplog):
    # A UPerNet head with an auxiliary FCN head: no Semantic FPN, so only the backbone is read.
    head = {"decode_head.psp_modules.0.1.conv.weight": torch.randn(8, 256, 1, 1),
            "decode_head.conv_seg.weight": torch.randn(150, 8, 1, 1),
            "neck.lateral_convs.0.conv.weight": torch.randn(8, 32, 1, 1),
            "auxiliary_head.conv_seg.weight": torch.randn(150, 8, 1, 1)}
    backbone = _reference_backbone()
    path = _mmseg_file(tmp_path, backbone, head)
    with caplog.at_level(logging.INFO):
        encoder = PvtV2Model.from_pretrained(path)
    assert "its auxiliary_head, decode_head, neck are not" in caplog.text
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(backbone(x)[-1], encoder(x).last_hidden_state) < TOL


def test_convert_to_a_folder_keeps_depth_and_detection_heads(tmp_path):
    pytest.importorskip("torchvision")
    from pvtv2 import PvtV2Config, PvtV2ForDepthEstimation
    from pvtv2.models.detection import PvtV2ForObjectDetection

    torch.manual_seed(0)
    tiny = dict(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4])
    depth = PvtV2ForDepthEstimation(PvtV2Config(**tiny)).eval()
    detector = PvtV2ForObjectDetection(PvtV2Config(**tiny, id2label={0: "a"}, detector="fcos", min_size=64,
                                                   max_size=64)).eval()
    x = torch.rand(1, 3, 64, 64)
    for name, model in (("depth", depth), ("detector", detector)):
        model.save_pretrained(tmp_path / name)
        info = convert_checkpoint(tmp_path / name, tmp_path / f"{name}_out")
        assert info["model"] == type(model).__name__  # was PvtV2Model: the head dropped without a word
        again = type(model).from_pretrained(tmp_path / f"{name}_out").eval()
        with torch.no_grad():
            if name == "depth":
                assert torch.equal(model(x).predicted_depth, again(x).predicted_depth)
            else:
                ours, theirs = model([x[0]])[0], again([x[0]])[0]
                assert torch.equal(ours["boxes"], theirs["boxes"]) and torch.equal(ours["scores"], theirs["scores"])


@pytest.mark.parametrize("style", ["mmcv", "mmengine"])
def test_the_class_names_the_file_records_become_the_labels(tmp_path, style):
    names = ("wall", "building", "sky")
    meta = ({"CLASSES": names, "PALETTE": [[1, 2, 3]] * 3} if style == "mmcv"
            else {"dataset_meta": {"classes": names, "palette": [[1, 2, 3]] * 3}})
    backbone = _reference_backbone()
    path = _mmseg_file(tmp_path, backbone, _mmseg_head(width=16, channels=8, labels=3), meta=meta)
    model = PvtV2ForSemanticSegmentation.from_pretrained(path)
    assert model.config.id2label == {0: "wall", 1: "building", 2: "sky"}
    assert model.config.label2id == {"wall": 0, "building": 1, "sky": 2}
    # Given labels win; a list of another length is not the classifier's and is not used.
    given = PvtV2ForSemanticSegmentation.from_pretrained(path, id2label={0: "a", 1: "b", 2: "c"})
    assert given.config.id2label == {0: "a", 1: "b", 2: "c"}
    other = _mmseg_file(tmp_path, backbone, _mmseg_head(width=16, channels=8, labels=4), name="four.pth", meta=meta)
    assert PvtV2ForSemanticSegmentation.from_pretrained(other).config.id2label[0] == "LABEL_0"
