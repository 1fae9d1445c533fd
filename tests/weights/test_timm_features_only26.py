"""A timm ``features_only=True`` PVTv2 (what detection code built on timm saves) names its stages ``stages_{i}``: its
state dict loads as the timm layout, and the backbone gives timm's feature maps."""

from __future__ import annotations

import pytest
import timm
import torch

from pvtv2 import PvtV2Backbone, PvtV2ForImageClassification
from pvtv2.weights.layouts import detect_layout

from conftest import random_weights_, relative_error


@pytest.fixture(scope="module")
def features_only(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("pvt_v2_b0", pretrained=False, features_only=True).eval()
    random_weights_(model, 3)
    path = tmp_path_factory.mktemp("timm") / "features_only.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_a_features_only_state_dict_is_the_timm_layout(features_only):
    model, _ = features_only
    state = model.state_dict()
    assert any(k.startswith("stages_0.") for k in state) and not any(k.startswith("stages.") for k in state)
    assert detect_layout(state) == "timm"


def test_the_backbone_gives_timms_feature_maps(features_only):
    model, path = features_only
    backbone = PvtV2Backbone.from_pretrained(path, out_indices=[0, 1, 2, 3])
    x = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        got = backbone(x).feature_maps
    assert backbone.channels == model.feature_info.channels() == [32, 64, 160, 256]
    assert len(got) == len(expected) == 4
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        assert relative_error(a, b) < 1e-5


def test_a_classifier_from_it_has_timms_encoder_and_a_new_head(features_only, caplog):
    model, path = features_only
    classifier = PvtV2ForImageClassification.from_pretrained(path, num_labels=3)
    assert "no weights for classifier" in caplog.text
    assert sorted(classifier.newly_initialized_keys) == ["classifier.bias", "classifier.weight"]
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)[-1]
        got = classifier.pvt_v2(x).last_hidden_state
    assert relative_error(got, expected) < 1e-5
