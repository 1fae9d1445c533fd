"""Checkpoints of timm's PVTv2 whose shapes the config must be read back from exactly, against timm's own numbers."""

from __future__ import annotations

import pytest
import torch
from conftest import random_weights_, relative_error
from timm.models.pvt_v2 import PyramidVisionTransformerV2

from pvtv2 import CheckpointError, PvtV2Config, PvtV2ForImageClassification
from pvtv2.weights.files import save_state_dict
from pvtv2.weights.layouts import convert_state_dict


@pytest.mark.parametrize("layout", ["timm", "original"])
@pytest.mark.parametrize("widths, ratios", [
    # int(112 * 2.06) = 230 hidden features, and 230 / 112 * 112 rounds to 229.99999999999997
    ((16, 32, 112, 64), (2, 2, 2.06, 2)),
    ((16, 32, 176, 64), (1.5, 2, 0.341, 2)),  # int(176 * 0.341) = 60: 60 / 176 * 176 is 59.99999999999999
])
def test_mlp_ratios_whose_quotient_rounds_down_load_with_timms_outputs(tmp_path, layout, widths, ratios):
    """The MLP ratio read off a checkpoint's shapes must rebuild its hidden width: int(dim * ratio) == hidden.
    hidden / dim can fall one rounding short of that, and the model was then built one feature narrower than the
    weights (a 'mis-shaped keys' refusal of a valid timm checkpoint)."""
    heads = tuple(w // 16 for w in widths)
    reference = PyramidVisionTransformerV2(
        num_classes=3, depths=(1, 1, 1, 1), embed_dims=widths, num_heads=heads, mlp_ratios=ratios
    )
    random_weights_(reference, seed=7)
    reference = reference.double().eval()
    path = save_state_dict(convert_state_dict(reference.state_dict(), layout), tmp_path / "weights.safetensors")
    model = PvtV2ForImageClassification.from_pretrained(path, num_attention_heads=list(heads)).double()
    for i, dim in enumerate(widths):
        assert model.pvt_v2.encoder.layers[i].blocks[0].mlp.dense1.out_features == int(dim * ratios[i])
    x = torch.randn(2, 3, 47, 61, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(reference(x), model(x).logits) < 1e-10


def test_a_load_failure_does_not_blame_mlp_ratios_that_rebuild_the_checkpoints_widths(tmp_path):
    """A config.json holding timm's ratio 2.06 for a 112-wide stage (230 hidden features, as the weights have) with
    wrong depths: the refusal names the depths, and not the ratio, which is right (230 / 112 is no fix for it)."""
    arch = dict(hidden_sizes=[16, 32, 112, 64], num_attention_heads=[1, 2, 7, 4], mlp_ratios=[2, 2, 2.06, 2])
    model = PvtV2ForImageClassification(PvtV2Config(depths=[1, 1, 1, 1], num_labels=3, **arch))
    assert model.pvt_v2.encoder.layers[2].blocks[0].mlp.dense1.out_features == 230
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(PvtV2Config(depths=[1, 1, 2, 1], num_labels=3, **arch).to_json_string())
    with pytest.raises(CheckpointError) as info:
        PvtV2ForImageClassification.from_pretrained(tmp_path)
    message = str(info.value)
    assert "its depths [1, 1, 2, 1] is not the checkpoint's [1, 1, 1, 1]" in message
    assert "mlp_ratios" not in message
