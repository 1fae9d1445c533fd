"""The model documentation's Deformable DETR example with a pvtv2 ``save_pretrained`` folder in place of the hub id:
``backbone_config=AutoConfig.from_pretrained(folder)``, and the folder's weights load into that model's backbone."""

from __future__ import annotations

import pytest
import torch

from pvtv2 import PvtV2Backbone, PvtV2Config, PvtV2ForImageClassification

from conftest import TINY_SHALLOW, perturb_

transformers = pytest.importorskip("transformers")

# A small Deformable DETR (the documentation builds SenseTime/deformable-detr's, which the hub would download); two
# decoder layers: transformers 5.24 cannot tie the box heads of a single one.
DETR = dict(d_model=64, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=12, encoder_n_points=2, decoder_n_points=2,
            num_labels=5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """What a user has: a pvtv2 classifier (trained weights, here random and perturbed) saved with save_pretrained."""
    torch.manual_seed(0)
    model = perturb_(PvtV2ForImageClassification(PvtV2Config(**TINY_SHALLOW, num_labels=10)))
    path = tmp_path_factory.mktemp("pvtv2_classifier")
    model.save_pretrained(path)
    return str(path)  # as the documentation passes a hub id: a string


@pytest.mark.parametrize("out_features", [None, ["stage2", "stage3", "stage4"]])
def test_the_documentations_deformable_detr_runs_on_a_pvtv2_folder(folder, out_features):
    extra = {} if out_features is None else {"out_features": out_features}
    backbone_config = transformers.AutoConfig.from_pretrained(folder, **extra)
    assert type(backbone_config).__name__ == "PvtV2Config"
    config = transformers.DeformableDetrConfig(backbone_config=backbone_config, use_timm_backbone=False, **DETR)
    torch.manual_seed(0)
    model = transformers.AutoModelForObjectDetection.from_config(config).eval()

    # The folder's weights load into the detector's backbone, every key and shape as transformers expects.
    backbone = model.model.backbone.model  # DeformableDetrConvEncoder.model: transformers' PvtV2Backbone
    # (transformers' PvtV2Backbone class: AutoBackbone.from_pretrained of transformers 5.24 asks the hub about any
    # name, a local folder's included, and fails offline)
    weights = transformers.PvtV2Backbone.from_pretrained(folder, **extra).state_dict()
    backbone.load_state_dict(weights, strict=True)

    # ... and that backbone (transformers' implementation) gives our feature maps.
    ours = PvtV2Backbone.from_pretrained(folder, **extra)
    assert backbone.channels == ours.channels
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        theirs = backbone(x).feature_maps
        expected = ours(x).feature_maps
        assert len(theirs) == len(expected) == len(out_features or ["stage4"])
        for a, b in zip(expected, theirs):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
        outputs = model(pixel_values=x)
    assert outputs.logits.shape == (1, DETR["num_queries"], DETR["num_labels"])
    assert outputs.pred_boxes.shape == (1, DETR["num_queries"], 4) and torch.isfinite(outputs.logits).all()
