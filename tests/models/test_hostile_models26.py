"""Checkpoints a hostile user loads without a config.json, second pass over round 26's shape reading (MLP ratios
inferred so that they rebuild each hidden width): tensors whose shapes no PVTv2 has are refused by name."""

from __future__ import annotations

import pytest
import timm
import torch

from pvtv2 import PvtV2Model
from pvtv2.weights.files import CheckpointError, save_state_dict


@pytest.fixture(scope="module")
def timm_state():
    torch.manual_seed(0)
    model = timm.create_model("pvt_v2_b0", num_classes=0)
    return model.state_dict()


def _emptied(state, prefix):
    """Every tensor of ``prefix`` cut to no rows (a truncated or hand-edited file)."""
    return {k: (v[:0] if k.startswith(prefix) and v.ndim else v) for k, v in state.items()}


@pytest.mark.parametrize("change, named", [
    (lambda s: _emptied(s, "stages.3."), "encoder.layers.3.patch_embedding.proj.weight"),
    (lambda s: {**s, "stages.2.downsample.proj.weight": s["stages.2.downsample.proj.weight"].flatten()},
     "encoder.layers.2.patch_embedding.proj.weight"),
    (lambda s: {**s, "patch_embed.proj.weight": s["patch_embed.proj.weight"].flatten()},
     "encoder.layers.0.patch_embedding.proj.weight"),
])
def test_a_stage_of_no_width_is_a_checkpoint_error_naming_its_tensor(timm_state, tmp_path, change, named):
    path = save_state_dict(change(timm_state), tmp_path / "hostile.safetensors")
    # A stage of no width stopped with a ZeroDivisionError from the MLP ratio (hidden / dim); a flat tensor built a
    # model 92160 channels wide and listed 25 and more mismatches, none of them the flat tensor.
    with pytest.raises(CheckpointError, match="shape") as err:
        PvtV2Model.from_pretrained(path)
    assert named in str(err.value)
