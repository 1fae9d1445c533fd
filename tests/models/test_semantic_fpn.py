"""Semantic FPN: the neck against torchvision's FeaturePyramidNetwork, the head against a direct computation of
mmsegmentation's FPNHead, the sizes against the PVTv2 paper's ADE20K table, loading and saving."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from pvtv2 import PvtV2Config, PvtV2ForImageClassification
from pvtv2.models.segmentation import PvtV2ForSemanticSegmentation, SemanticFPNHead

from conftest import TINY, perturb_


def _features(channels=(16, 32, 48, 64), size=(64, 96), batch=2, seed=0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    height, width = size
    return [
        torch.randn(batch, c, -(-height // 2 ** (i + 2)), -(-width // 2 ** (i + 2)), generator=generator)
        for i, c in enumerate(channels)
    ]


def _perturbed_head(channels=(16, 32, 48, 64), width=24, head_channels=12, labels=5) -> SemanticFPNHead:
    head = SemanticFPNHead(channels, width, head_channels, labels, dropout=0.1).eval()
    perturb_(head, scale=0.2)
    generator = torch.Generator().manual_seed(1)
    for module in head.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return head


def test_neck_matches_torchvisions_feature_pyramid_network():
    ops = pytest.importorskip("torchvision.ops")
    head = _perturbed_head()
    reference = ops.FeaturePyramidNetwork([16, 32, 48, 64], 24).eval()
    with torch.no_grad():
        for i in range(4):
            for theirs, ours in ((reference.inner_blocks[i][0], head.neck.lateral_convs[i].conv),
                                 (reference.layer_blocks[i][0], head.neck.fpn_convs[i].conv)):
                theirs.weight.copy_(ours.weight)
                theirs.bias.copy_(ours.bias)
        for size in ((64, 96), (70, 100)):  # a multiple of 32, and not
            features = _features(size=size)
            expected = reference({str(i): f for i, f in enumerate(features)})
            for ours, theirs in zip(head.neck(features), expected.values()):
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def _fpn_head_directly(head: SemanticFPNHead, features: list[torch.Tensor]) -> torch.Tensor:
    """mmsegmentation's FPNHead.forward written out with functional ops on the head's tensors: level i has
    max(1, i) conv-BN-ReLU blocks, each followed by a 2x bilinear upsampling when i > 0; levels are resized to the
    first one and summed; dropout (off in eval) and the 1x1 classifier."""
    pyramid = head.neck(features)
    total = None
    for level, x in enumerate(pyramid):
        convs = [m for m in head.scale_heads[level].modules() if isinstance(m, torch.nn.Conv2d)]
        norms = [m for m in head.scale_heads[level].modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert len(convs) == max(1, level)
        for conv, norm in zip(convs, norms):
            x = F.conv2d(x, conv.weight, None, padding=1)
            x = F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
            x = F.relu(x)
            if level > 0:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        total = x if total is None else total + F.interpolate(x, size=total.shape[2:], mode="bilinear", align_corners=False)
    return F.conv2d(total, head.classifier.weight, head.classifier.bias)


@pytest.mark.parametrize("size", [(64, 96), (70, 100)])
def test_head_matches_a_direct_computation_of_mmsegmentations_fpn_head(size):
    head = _perturbed_head()
    features = _features(size=size)
    with torch.no_grad():
        logits = head(features)
        expected = _fpn_head_directly(head, features)
    assert logits.shape == (2, 5, *features[0].shape[2:])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


# The PVTv2 paper's Table 4 (ADE20K, Semantic FPN, 150 classes), parameters in millions.
PAPER_PARAMS = {"pvt_v2_b0": 7.6, "pvt_v2_b1": 17.8, "pvt_v2_b2": 29.1, "pvt_v2_b3": 49.0, "pvt_v2_b4": 66.3,
                "pvt_v2_b5": 85.7}


@pytest.mark.parametrize("preset", list(PAPER_PARAMS))
def test_parameter_counts_are_the_papers(preset):
    with torch.device("meta"):
        model = PvtV2ForSemanticSegmentation(PvtV2Config.from_preset(preset, num_labels=150), head="fpn")
    # Within the table's rounding; B0's 7.545M is printed as 7.6 (7.55 rounded once more, presumably).
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - PAPER_PARAMS[preset]) < 0.06
    widths = [m.out_channels for m in model.decode_head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths.count(256) == 8 and widths[-1] == 150  # four lateral and four output convs of 256, classifier


def test_model_runs_trains_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = PvtV2ForSemanticSegmentation(PvtV2Config(**TINY, num_labels=4), head="fpn")
    assert model.head_type == "fpn" and model.config.decode_head_type == "fpn"
    pixels = torch.randn(2, 3, 64, 80)
    labels = torch.randint(0, 4, (2, 64, 80))
    out = model(pixels, labels=labels)
    assert out.logits.shape == (2, 4, 16, 20)
    out.loss.backward()
    assert all(p.grad is not None for p in model.decode_head.parameters())
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = PvtV2ForSemanticSegmentation.from_pretrained(tmp_path)
    assert loaded.head_type == "fpn"
    with torch.no_grad():
        assert torch.equal(loaded(pixels).logits, model(pixels).logits)


def test_initialisation_is_mmsegmentations():
    torch.manual_seed(0)
    head = PvtV2ForSemanticSegmentation(
        PvtV2Config(hidden_sizes=[64, 128, 320, 512], num_labels=150), head="fpn"
    ).decode_head
    classifier = head.classifier.weight
    assert abs(classifier.std().item() - 0.01) < 0.001 and head.classifier.bias.abs().max() == 0
    lateral = head.neck.lateral_convs[3].conv.weight  # xavier uniform: bound sqrt(6 / (fan_in + fan_out))
    bound = (6 / (512 + 256)) ** 0.5
    assert lateral.abs().max() <= bound and lateral.abs().max() > 0.95 * bound
    conv = head.scale_heads[3][0].conv.weight  # kaiming normal, fan out, ReLU: std sqrt(2 / (128 * 9))
    assert abs(conv.std().item() - (2 / (128 * 9)) ** 0.5) < 0.002


def test_classification_checkpoint_initialises_the_encoder(tmp_path, caplog):
    torch.manual_seed(0)
    classifier = PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=3))
    classifier.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        model = PvtV2ForSemanticSegmentation.from_pretrained(tmp_path, num_labels=2, decode_head_type="fpn")
    assert model.head_type == "fpn" and "decode_head" in caplog.text
    for key, value in classifier.pvt_v2.state_dict().items():
        assert torch.equal(model.pvt_v2.state_dict()[key], value)
    assert abs(model.decode_head.classifier.weight.std().item() - 0.01) < 0.005


def test_segformer_stays_the_default_and_bad_heads_raise():
    model = PvtV2ForSemanticSegmentation(PvtV2Config(**TINY, num_labels=2))
    assert model.head_type == "segformer" and not hasattr(model.config, "decode_head_type")
    assert "decode_head_type" not in model.config.to_dict()
    with pytest.raises(ValueError, match="head must be one of"):
        PvtV2ForSemanticSegmentation(PvtV2Config(**TINY, num_labels=2), head="upernet")
    with pytest.raises(ValueError, match="decode_head_type must be one of"):
        PvtV2ForSemanticSegmentation(PvtV2Config(**TINY, num_labels=2, decode_head_type="psp"))
