"""Parity with transformers and timm under weights and configurations chosen to expose small differences.

Hostile weights: LayerNorm scales around 1 with a spread of 2 (negative ones included) and shifts of that size,
biases of that size, matrices of unit gain, and patch-embedding convolutions scaled down so that the LayerNorms after
them see variances near their epsilon. Such weights push the attention towards saturation, where float32 rounding
grows to 1e-5 (in transformers' and timm's own results as much as in ours, measured against float64), so the
comparisons that must be tight run in float64: there any difference of arithmetic (an epsilon, the order of norm and
residual, GELU's variant, the pooling of linear SRA, ReLU's place, the attention's scale, a missing final norm) shows
as 1e-7 or more, against a rounding floor near 1e-13. The fast path runs in float32 only, so it is held to
transformers' float32 numbers. The configurations leave the published ones: no spatial reduction, other heads, no qkv
bias, one or four input channels, three and five stages, other patch sizes and strides, a changed epsilon.
"""

from __future__ import annotations

import logging

import pytest
import timm
import torch
import transformers
from conftest import TINY, hf_config, relative_error
from timm.models.pvt_v2 import PyramidVisionTransformerV2, checkpoint_filter_fn

from pvtv2 import (
    PvtV2Backbone,
    PvtV2Config,
    PvtV2ForImageClassification,
    PvtV2Model,
    fast,
)
from pvtv2.weights.files import save_state_dict
from pvtv2.weights.layouts import convert_state_dict

TOL64 = 1e-10  # float64: rounding stays near 1e-13 even with these weights
TOL32 = 1e-5  # float32, the fast path included


@torch.no_grad()
def hostile_weights_(model: torch.nn.Module, seed: int = 0, embed_scale: float = 1e-2) -> torch.nn.Module:
    """Every parameter redrawn far from any library's initialisation (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        embedding = ("patch_embed" in name or "downsample" in name) and ".proj." in name
        scale = embed_scale if embedding else 1.0
        if p.ndim > 1:
            p.copy_(noise * p[0].numel() ** -0.5 * scale)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 2.0 * noise)
        else:
            p.copy_(2.0 * noise * scale)
    return model


def hf_pair(config: PvtV2Config, cls=PvtV2ForImageClassification, hf_cls=transformers.PvtV2ForImageClassification,
            seed: int = 0, dtype: torch.dtype = torch.float64):
    """transformers' model with hostile weights, and ours with the same weights loaded strictly, both in ``dtype``."""
    theirs = hostile_weights_(hf_cls(hf_config(config)), seed=seed).to(dtype).eval()
    ours = cls(config).to(dtype).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


_FIVE = dict(
    num_encoder_blocks=5, depths=[1, 1, 2, 1, 1], hidden_sizes=[16, 24, 32, 48, 64], num_attention_heads=[1, 2, 2, 3, 4],
    mlp_ratios=[2, 3, 2, 1, 2], sr_ratios=[4, 2, 2, 1, 1], patch_sizes=[7, 3, 3, 3, 3], strides=[4, 2, 2, 2, 2],
)
_THREE = dict(
    num_encoder_blocks=3, depths=[1, 2, 1], hidden_sizes=[16, 32, 48], num_attention_heads=[1, 2, 3], mlp_ratios=[2, 2, 2],
    sr_ratios=[4, 2, 1], patch_sizes=[7, 3, 3], strides=[4, 2, 2],
)
# name -> (config arguments, input size): every one away from the published models in some way.
CONFIGS = {
    "tiny": (dict(TINY, num_labels=5), (65, 97)),
    "no reduction": (dict(TINY, sr_ratios=[1, 1, 1, 1], num_labels=2), (33, 47)),
    "other heads": (dict(TINY, num_attention_heads=[2, 4, 6, 8], num_labels=3), (71, 64)),
    "no qkv bias": (dict(TINY, qkv_bias=False, num_labels=1), (64, 90)),
    "linear SRA": (dict(TINY, linear_attention=True, num_labels=2), (97, 65)),
    "linear SRA, tiny input": (dict(TINY, linear_attention=True, num_labels=3), (23, 19)),
    "one channel": (dict(TINY, num_channels=1, mlp_ratios=[1, 3, 2, 4], num_labels=4), (70, 66)),
    "four channels, linear": (dict(TINY, num_channels=4, linear_attention=True, num_labels=3), (50, 61)),
    "epsilon 1e-3, gelu_new": (dict(TINY, layer_norm_eps=1e-3, hidden_act="gelu_new", num_labels=3), (64, 64)),
    "drop path and dropout, eval": (
        dict(TINY, drop_path_rate=0.4, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.2, num_labels=3), (48, 80)
    ),
    "three stages": (dict(_THREE, num_labels=3), (45, 77)),
    "five stages": (dict(_FIVE, num_labels=0), (96, 70)),
    "patch 5, stride 2": (dict(TINY, patch_sizes=[5, 3, 5, 3], strides=[2, 2, 2, 2], num_labels=3), (31, 37)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float64_outputs_match_transformers(name):
    kwargs, size = CONFIGS[name]
    config = PvtV2Config(**kwargs)
    ours, theirs = hf_pair(config, seed=len(name))
    x = torch.randn(3, config.num_channels, *size, dtype=torch.float64) * 3
    with torch.no_grad():
        expected = theirs(x, output_hidden_states=True, output_attentions=True)
        got = ours(x, output_hidden_states=True, output_attentions=True)
        assert relative_error(expected.logits, got.logits) < TOL64
        assert len(got.hidden_states) == len(expected.hidden_states) == config.num_encoder_blocks
        for a, b in zip(expected.hidden_states, got.hidden_states):
            assert relative_error(a, b) < TOL64
        assert [len(s) for s in got.attentions] == [len(s) for s in expected.attentions] == config.depths
        for stage_a, stage_b in zip(expected.attentions, got.attentions):
            for a, b in zip(stage_a, stage_b):
                assert relative_error(a, b) < TOL64
        # The tuple form holds the same values in transformers' order.
        as_tuple = ours(x, output_hidden_states=True, return_dict=False)
        reference = theirs(x, output_hidden_states=True, return_dict=False)
        assert len(as_tuple) == len(reference) == 2
        assert relative_error(reference[0], as_tuple[0]) < TOL64
        assert all(relative_error(a, b) < TOL64 for a, b in zip(reference[1], as_tuple[1]))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_path_frozen_or_not_matches_transformers_float32(name):
    kwargs, size = CONFIGS[name]
    config = PvtV2Config(**kwargs)
    ours, theirs = hf_pair(config, seed=len(name), dtype=torch.float32)
    # Batch 1 and 3; a channels-last input and a strided view of a larger tensor.
    inputs = [
        torch.randn(1, config.num_channels, *size),
        torch.randn(3, config.num_channels, *size).contiguous(memory_format=torch.channels_last),
        torch.randn(3, config.num_channels, 2 * size[0], size[1])[:, :, ::2],
    ]
    with torch.no_grad():
        expected = [theirs(x.contiguous()).logits for x in inputs]
        for frozen in (False, True):
            if frozen:
                fast.freeze(ours)
            for x, want in zip(inputs, expected):
                assert relative_error(want, ours(x).logits) < TOL32
                with fast.fast_path(False):
                    assert relative_error(want, ours(x).logits) < TOL32
    with torch.inference_mode():
        assert relative_error(expected[0], ours(inputs[0]).logits) < TOL32


@pytest.mark.parametrize("name", ["tiny", "no reduction", "linear SRA", "no qkv bias", "one channel", "five stages"])
def test_float64_gradients_match_transformers(name):
    kwargs, size = CONFIGS[name]
    config = PvtV2Config(**{**kwargs, "num_labels": 3})
    ours, theirs = hf_pair(config, seed=len(name))
    ours.train(), theirs.train()
    x = torch.randn(2, config.num_channels, *size, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    labels = torch.tensor([2, 0])
    ours(x, labels=labels).loss.backward()
    theirs(x_ref, labels=labels).loss.backward()
    assert relative_error(x_ref.grad, x.grad) < 1e-9
    reference = dict(theirs.named_parameters())
    scale = max(p.grad.abs().max().item() for p in reference.values())
    for param_name, p in ours.named_parameters():
        want = reference[param_name].grad
        if param_name.endswith("attention.key.bias"):
            # softmax ignores a shift shared by all keys: both gradients are rounding noise around zero
            assert p.grad.abs().max() < 1e-12 * scale and want.abs().max() < 1e-12 * scale, param_name
            continue
        assert relative_error(want, p.grad) < 1e-9, param_name


# timm's architecture arguments -> ours (what a checkpoint's shapes cannot say is passed to from_pretrained).
TIMM_CONFIGS = {
    "tiny": dict(depths=(1, 2, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), mlp_ratios=(2, 2, 2, 2)),
    "linear SRA": dict(depths=(1, 2, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), mlp_ratios=(2, 2, 2, 2),
                       linear=True),
    "no qkv bias, one channel": dict(in_chans=1, depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4),
                                     mlp_ratios=(2, 2, 2, 2), qkv_bias=False),
    "four channels, linear": dict(in_chans=4, depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4),
                                  mlp_ratios=(2, 2, 2, 2), linear=True),
    "no reduction": dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), mlp_ratios=(2, 2, 2, 2),
                         sr_ratios=(1, 1, 1, 1)),
    "fractional mlp ratios": dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4),
                                  mlp_ratios=(1.5, 2.5, 3, 0.5)),
    "three stages": dict(depths=(1, 1, 1), embed_dims=(16, 32, 64), num_heads=(1, 2, 4), mlp_ratios=(2, 2, 2),
                         sr_ratios=(4, 2, 1)),
    "other heads": dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(2, 4, 6, 8), mlp_ratios=(2, 2, 2, 2),
                        sr_ratios=(4, 2, 2, 1)),
}


@pytest.mark.parametrize("num_classes", [1, 7])
@pytest.mark.parametrize("name", list(TIMM_CONFIGS))
def test_float64_timm_and_original_checkpoints_both_ways(tmp_path, name, num_classes):
    """A timm state dict read from a file gives timm's numbers; written back in timm's and in the authors' layout, it
    loads strictly there (the authors' layout through timm's own converter) and gives them again."""
    arch = TIMM_CONFIGS[name]
    reference = hostile_weights_(PyramidVisionTransformerV2(num_classes=num_classes, **arch), seed=num_classes)
    reference = reference.double().eval()
    heads = list(arch["num_heads"])
    overrides = {} if heads == [d // arch["embed_dims"][0] for d in arch["embed_dims"]] else dict(num_attention_heads=heads)
    x = torch.randn(2, arch.get("in_chans", 3), 73, 89, dtype=torch.float64)
    with torch.no_grad():
        expected = reference(x)
    for layout in ("timm", "original"):
        path = save_state_dict(convert_state_dict(reference.state_dict(), layout), tmp_path / f"{layout}.safetensors")
        model = PvtV2ForImageClassification.from_pretrained(path, **overrides).double()
        assert model.config.patch_norm_eps == model.config.reduction_norm_eps == 1e-5
        assert model.config.layer_norm_eps == 1e-6
        with torch.no_grad():
            assert relative_error(expected, model(x).logits) < TOL64, layout
        exported = PyramidVisionTransformerV2(num_classes=num_classes, **arch).double().eval()
        state = convert_state_dict(model.state_dict(), layout)
        if layout == "original":
            assert "patch_embed1.proj.weight" in state and "block1.0.attn.kv.weight" in state
            state = checkpoint_filter_fn(state, exported)
        exported.load_state_dict(state, strict=True)
        with torch.no_grad():
            assert relative_error(expected, exported(x)) < TOL64, layout


def test_backbone_maps_channels_and_attentions_of_every_stage():
    """Feature maps and channels for a subset of stages as transformers' backbone gives them; attention maps, which
    transformers' backbone does not return, for every stage (as its bare model gives them), also when the requested
    maps end early."""
    for kwargs in (dict(out_features=["stage1"]), dict(out_indices=[1, -2]), dict(out_features=["stage2", "stage4"])):
        config = PvtV2Config(**TINY, **kwargs)
        ours, theirs = hf_pair(config, PvtV2Backbone, transformers.PvtV2Backbone, seed=3)
        encoder = transformers.PvtV2Model(hf_config(config)).double().eval()
        encoder.load_state_dict(theirs.state_dict(), strict=True)
        x = torch.randn(2, 3, 75, 61, dtype=torch.float64)
        with torch.no_grad():
            expected = theirs(x, output_hidden_states=True)
            got = ours(x, output_hidden_states=True, output_attentions=True)
            attentions = encoder(x, output_attentions=True).attentions
        assert ours.channels == list(theirs.channels) and ours.out_features == list(theirs.out_features)
        assert len(got.feature_maps) == len(expected.feature_maps) == len(ours.out_features)
        for a, b, channels in zip(expected.feature_maps, got.feature_maps, ours.channels):
            assert b.shape[1] == channels and relative_error(a, b) < TOL64
        for a, b in zip(expected.hidden_states, got.hidden_states, strict=True):
            assert relative_error(a, b) < TOL64
        assert [len(s) for s in got.attentions] == [len(s) for s in attentions] == TINY["depths"]
        for stage_a, stage_b in zip(attentions, got.attentions):
            for a, b in zip(stage_a, stage_b):
                assert relative_error(a, b) < TOL64
        with torch.no_grad():
            assert len(ours(x, output_attentions=True).attentions) == config.num_encoder_blocks


@pytest.mark.parametrize("cls, hf_cls", [
    (PvtV2ForImageClassification, transformers.PvtV2ForImageClassification),
    (PvtV2Model, transformers.PvtV2Model),
])
def test_whole_number_floats_in_a_config_still_load_in_transformers(tmp_path, cls, hf_cls):
    """transformers 5 types mlp_ratios as integers and the epsilons and initializer range as floats, and refuses a
    config.json that holds 2.0 or 1 there: whole numbers given either way are written as transformers reads them."""
    config = PvtV2Config(**{**TINY, "mlp_ratios": [2.0, 3.0, 2.0, 1.0]}, initializer_range=1, layer_norm_eps=1,
                         num_labels=3)
    model = hostile_weights_(cls(config), seed=4).eval()
    model.save_pretrained(tmp_path)
    theirs, info = hf_cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert list(theirs.config.mlp_ratios) == [2, 3, 2, 1]
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        assert relative_error(theirs.eval()(x)[0], model(x)[0]) < TOL32
    assert PvtV2Config.from_pretrained(tmp_path) == config
    # An initializer range of 0 would fail deep inside the truncated-normal init (as in transformers): refused here.
    with pytest.raises(ValueError, match="initializer_range must be a positive number, got 0"):
        PvtV2Config(initializer_range=0)


def test_save_pretrained_says_when_transformers_would_compute_otherwise(tmp_path, caplog):
    """A timm checkpoint keeps PyTorch's default epsilon (1e-5) in its patch embeddings and spatial reductions;
    transformers' PvtV2 has one epsilon for every LayerNorm, so in transformers such a folder gives other numbers:
    save_pretrained says so. A fractional MLP ratio (timm takes one) makes a config.json transformers refuses."""
    arch = TIMM_CONFIGS["tiny"]
    reference = hostile_weights_(PyramidVisionTransformerV2(num_classes=3, **arch), seed=5, embed_scale=1e-3).eval()
    path = save_state_dict(reference.state_dict(), tmp_path / "timm.safetensors")
    model = PvtV2ForImageClassification.from_pretrained(path)
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        model.save_pretrained(tmp_path / "folder")
    text = caplog.text
    assert "patch_embed_layer_norm_eps" in text and "transformers" in text
    x = torch.randn(2, 3, 64, 64)
    theirs = transformers.PvtV2ForImageClassification.from_pretrained(tmp_path / "folder").eval()
    again = PvtV2ForImageClassification.from_pretrained(tmp_path / "folder")
    with torch.no_grad():
        expected = reference(x)
        assert relative_error(expected, again(x).logits) < TOL32  # pvtv2 reads the epsilons back
        assert relative_error(expected, theirs(x).logits) > 1e-3  # transformers cannot

    fractional = PyramidVisionTransformerV2(num_classes=3, **TIMM_CONFIGS["fractional mlp ratios"])
    path = save_state_dict(fractional.state_dict(), tmp_path / "fractional.safetensors")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        PvtV2ForImageClassification.from_pretrained(path).save_pretrained(tmp_path / "fractional")
    assert "mlp_ratios" in caplog.text
    with pytest.raises(Exception, match="mlp_ratios"):
        transformers.PvtV2Config.from_pretrained(tmp_path / "fractional")
    # Models whose numbers transformers reproduces are saved without a word.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        PvtV2ForImageClassification(PvtV2Config(**TINY)).save_pretrained(tmp_path / "plain")
    assert not caplog.records


def test_timm_itself_is_the_reference_here():
    """The models these tests compare against are the ones named: a guard against a timm or transformers that
    changed underneath (timm's blocks use LayerNorm epsilon 1e-6 and its patch embeddings PyTorch's 1e-5)."""
    model = timm.create_model("pvt_v2_b0", pretrained=False)
    assert model.stages[0].blocks[0].norm1.eps == 1e-6 and model.stages[0].norm.eps == 1e-6
    assert model.patch_embed.norm.eps == 1e-5 and model.stages[0].blocks[0].attn.norm.eps == 1e-5
    assert transformers.PvtV2Config().layer_norm_eps == 1e-6
