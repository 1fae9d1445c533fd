"""Parity audit 26: transformers' PvtV2 and timm's pvt_v2 against pvtv2 where the earlier parity tests do not reach.

Every Mix-FFN activation name transformers' PvtV2 builds (its ACT2FN table); configurations at the edges of what the
layers compute; weights written after a frozen model's first call in ways tests/fast does not list; gradient
checkpointing with attention maps in the loss; timm's own feature extractor. Float64 on the reference path (to
1e-10), float32 on the fast path, frozen or not, all with the hostile weights of tests/models/test_adversarial_parity.py.
"""

from __future__ import annotations

import copy
import logging

import pytest
import timm
import torch
import transformers
from conftest import TINY, relative_error
from test_adversarial_parity import TOL32, TOL64, hf_pair, hostile_weights_
from transformers.activations import ACT2CLS

from pvtv2 import PvtV2Backbone, PvtV2Config, PvtV2ForImageClassification, fast
from pvtv2.weights.files import save_state_dict

# transformers' names whose activation holds weights of its own (a PReLU's slope, xIELU's alphas): a state dict of
# such a model has keys no PVTv2 layout has, and pvtv2 refuses the names.
WITH_WEIGHTS = {"prelu", "xielu"}
PARAMETER_FREE = sorted(set(ACT2CLS) - WITH_WEIGHTS)


@pytest.mark.parametrize("act", PARAMETER_FREE)
def test_every_transformers_activation_name_computes_transformers_numbers(act):
    config = PvtV2Config(**TINY, hidden_act=act, num_labels=3)
    ours, theirs = hf_pair(config, seed=11)
    x = torch.randn(2, 3, 33, 35, dtype=torch.float64) * 3
    with torch.no_grad():
        assert relative_error(theirs(x).logits, ours(x).logits) < TOL64
    ours, theirs = ours.float(), theirs.float()
    x = x.float()
    with torch.no_grad():
        expected = theirs(x).logits
        assert relative_error(expected, ours(x).logits) < TOL32
        fast.freeze(ours)
        assert relative_error(expected, ours(x).logits) < TOL32


@pytest.mark.parametrize("act", sorted(WITH_WEIGHTS))
def test_activation_names_with_weights_are_refused_by_name(act):
    assert act in ACT2CLS  # transformers still has them: the refusal is pvtv2's choice
    with pytest.raises(ValueError, match=f"hidden_act='{act}' is not supported"):
        PvtV2Config(**TINY, hidden_act=act)


def test_save_pretrained_says_transformers_builds_no_model_of_the_selu_pvtv2_takes(tmp_path, caplog):
    """pvtv2 takes "selu" (which the model documentation lists); transformers' table lacks it and its model fails
    to build from such a config.json, so save_pretrained says so, as it does for fractional MLP ratios."""
    model = PvtV2ForImageClassification(PvtV2Config(**TINY, hidden_act="selu", num_labels=3))
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        model.save_pretrained(tmp_path)
    assert "hidden_act" in caplog.text and "'selu'" in caplog.text and "transformers" in caplog.text
    with pytest.raises(KeyError, match="selu"):
        transformers.PvtV2ForImageClassification.from_pretrained(tmp_path)


# Configurations at the edges of what the layers compute, each against transformers: one stage; a patch of 1 with
# stride 1 (no padding); even patches with strides above them; token grids of 1x1 and 2x1 (linear attention pools
# them up to 7x7); reductions of 3 over grids they do not divide; a LayerNorm epsilon of 0.5.
EDGES = {
    "one stage, patch 1, stride 1": (
        dict(num_encoder_blocks=1, depths=[2], hidden_sizes=[8], num_attention_heads=[2], patch_sizes=[1],
             strides=[1], sr_ratios=[3], mlp_ratios=[3], num_labels=2), (7, 11)),
    "two stages, even patches, stride 3": (
        dict(num_encoder_blocks=2, depths=[1, 2], hidden_sizes=[8, 16], num_attention_heads=[1, 4], patch_sizes=[4, 2],
             strides=[3, 3], sr_ratios=[2, 1], mlp_ratios=[2, 1], qkv_bias=False, num_labels=3), (29, 17)),
    "linear, 2x1 and 1x1 grids": (dict(TINY, linear_attention=True, num_labels=4), (5, 3)),
    "strides above patches, reduction 3, epsilon 0.5": (
        dict(TINY, patch_sizes=[3, 1, 2, 3], strides=[4, 2, 3, 1], sr_ratios=[3, 1, 1, 1], layer_norm_eps=0.5,
             hidden_act="gelu_python", num_labels=3), (33, 61)),
}


@pytest.mark.parametrize("name", list(EDGES))
def test_edge_configurations_match_transformers_on_every_path(name):
    kwargs, size = EDGES[name]
    config = PvtV2Config(**kwargs)
    ours, theirs = hf_pair(config, seed=len(name))
    for batch in (1, 3):
        x = torch.randn(batch, config.num_channels, *size, dtype=torch.float64) * 3
        with torch.no_grad():
            expected = theirs(x, output_hidden_states=True, output_attentions=True)
            got = ours(x, output_hidden_states=True, output_attentions=True)
        assert relative_error(expected.logits, got.logits) < TOL64
        for a, b in zip(expected.hidden_states, got.hidden_states, strict=True):
            assert relative_error(a, b) < TOL64
        for stage_a, stage_b in zip(expected.attentions, got.attentions, strict=True):
            for a, b in zip(stage_a, stage_b, strict=True):
                assert relative_error(a, b) < TOL64
    ours, theirs = ours.float(), theirs.float()
    x = torch.randn(3, config.num_channels, *size)
    with torch.no_grad():
        assert fast.applies(x, ours.pvt_v2.encoder.layers[0])  # the fused stages are what is compared
        expected = theirs(x).logits
        assert relative_error(expected, ours(x).logits) < TOL32
        fast.freeze(ours)
        assert relative_error(expected, ours(x).logits) < TOL32


def _set_(ours, theirs):
    with torch.no_grad():
        for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
            p.set_(q.detach().clone())


def _dtype_round_trip(ours, theirs):
    ours.load_state_dict(theirs.state_dict())
    ours.double()
    ours.float()


def _swapping_conversion(ours, theirs):
    ours.load_state_dict(theirs.state_dict())
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # Module._apply swaps each tensor's contents
    try:
        ours.double()
        ours.float()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


# Weight changes after a first (packing) call that tests/fast/test_fastpath.py's list does not hold.
LATE_WRITES = {"Tensor.set_": _set_, ".double().float()": _dtype_round_trip, "swapping .double().float()": _swapping_conversion}


@pytest.mark.parametrize("write", list(LATE_WRITES))
def test_frozen_model_follows_weights_written_after_a_call(write):
    config = PvtV2Config(**TINY, num_labels=3)
    ours, theirs = hf_pair(config, seed=4, dtype=torch.float32)
    fast.freeze(ours)
    x = torch.randn(2, 3, 45, 38)
    with torch.no_grad():
        assert relative_error(theirs(x).logits, ours(x).logits) < TOL32
        hostile_weights_(theirs, seed=5)
        LATE_WRITES[write](ours, theirs)
        expected = theirs(x).logits
        assert relative_error(expected, ours(x).logits) < TOL32
        # functional_call's weights for one call, then the module's own again
        swapped = torch.func.functional_call(ours, dict(hostile_weights_(copy.deepcopy(theirs), seed=6).named_parameters()), (x,))
        assert relative_error(expected, swapped.logits) > 1e-2
        assert relative_error(expected, ours(x).logits) < TOL32


def test_gradient_checkpointing_with_attention_maps_gives_transformers_gradients():
    """Both with gradient checkpointing on, in training, a loss that reads the attention maps too: float64."""
    config = PvtV2Config(**TINY, linear_attention=True, num_labels=3)
    ours, theirs = hf_pair(config, seed=6)
    ours.train().gradient_checkpointing_enable()
    theirs.train()
    # transformers 5 renamed it (the old name warns)
    getattr(theirs, "activation_checkpointing_enable", theirs.gradient_checkpointing_enable)()
    x = torch.randn(2, 3, 41, 37, dtype=torch.float64)
    labels = torch.tensor([1, 2])
    for model in (ours, theirs):
        out = model(x, labels=labels, output_attentions=True)
        (out.loss + 1e-3 * sum(a.sum() for stage in out.attentions for a in stage)).backward()
    reference = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if not name.endswith("attention.key.bias"):  # softmax ignores it: both gradients are rounding noise
            assert relative_error(reference[name].grad, p.grad) < 1e-9, name


@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_v2_b2_li"])
def test_backbone_maps_are_timms_features_only_maps(tmp_path, name):
    """A timm checkpoint's PvtV2Backbone gives the maps of timm's own feature extractor (features_only), float64,
    at a size whose last grids are 1x1 and at an odd one."""
    arch = dict(depths=(1, 1, 2, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), mlp_ratios=(2, 2, 2, 2))
    reference = hostile_weights_(timm.create_model(name, num_classes=0, **arch), seed=8).double().eval()
    features = timm.create_model(name, features_only=True, out_indices=(0, 1, 2, 3), **arch).double().eval()
    # the same weights under the feature extractor's names (stages.0 -> stages_0)
    features.load_state_dict({k.replace("stages.", "stages_", 1): v for k, v in reference.state_dict().items()})
    path = save_state_dict(reference.state_dict(), tmp_path / "timm.safetensors")
    ours = PvtV2Backbone.from_pretrained(path, out_indices=[0, 1, 2, 3], num_attention_heads=[1, 2, 3, 4]).double()
    for size in ((67, 45), (40, 33)) if name == "pvt_v2_b0" else ((67, 45), (5, 7)):
        x = torch.randn(2, 3, *size, dtype=torch.float64)
        with torch.no_grad():
            for a, b in zip(features(x), ours(x).feature_maps, strict=True):
                assert relative_error(a, b) < TOL64
