"""Dense prediction: SegFormer / GLPN parity with transformers (the reference), losses, checkpoints, round trips."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, PvtV2Model
from pvtv2.models.depth import PvtV2ForDepthEstimation, silog_loss
from pvtv2.models.segmentation import PvtV2ForSemanticSegmentation, semantic_segmentation_loss
from pvtv2.visualize import colorize_depth, viridis_lut

transformers = pytest.importorskip("transformers")

RTOL = 1e-5

SEGFORMER_SIZES = {
    # b0-sized, with one block per stage to stay fast
    "b0": dict(depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 160, 256], num_attention_heads=[1, 2, 5, 8],
               decoder_hidden_size=256),
    # b1/b2 widths, a narrower decoder, two blocks in stage 2
    "wide": dict(depths=[1, 2, 1, 1], hidden_sizes=[64, 128, 320, 512], num_attention_heads=[1, 2, 5, 8],
                 decoder_hidden_size=128),
}


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every weight away from its initial value (LayerNorm scales off 1, biases off 0, BatchNorm statistics
    off 0 / 1) so that an epsilon, a scale or an ordering that differs shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
            if "patch_embedding" in name and ".proj." in name:
                p.mul_(0.02)  # small LayerNorm inputs, where 1e-5 and 1e-6 epsilons give different outputs
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.fixture(scope="module")
def segformer_folders(tmp_path_factory):
    folders = {}
    for name, args in SEGFORMER_SIZES.items():
        torch.manual_seed(0)
        config = transformers.SegformerConfig(**args, num_labels=5)
        model = transformers.SegformerForSemanticSegmentation(config).eval()
        _perturb(model)
        folder = tmp_path_factory.mktemp(f"segformer_{name}")
        model.save_pretrained(folder)
        folders[name] = (model, folder)
    return folders


@pytest.fixture(scope="module")
def glpn_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.GLPNForDepthEstimation(transformers.GLPNConfig(depths=[1, 1, 1, 1], max_depth=80)).eval()
    _perturb(model, seed=1)
    folder = tmp_path_factory.mktemp("glpn")
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize(
    "size, hw", [("b0", (64, 64)), ("b0", (97, 131)), ("b0", (128, 96)), ("wide", (64, 64)), ("wide", (97, 131))]
)
def test_segformer_logits_and_loss_match_transformers(segformer_folders, size, hw):
    reference, folder = segformer_folders[size]
    model = PvtV2ForSemanticSegmentation.from_pretrained(folder)
    gen = torch.Generator().manual_seed(hw[0])
    pixels = torch.randn(2, 3, *hw, generator=gen)
    labels = torch.randint(0, 5, (2, *hw), generator=gen)
    labels[0, : hw[0] // 3] = 255  # ignored pixels
    with torch.no_grad():
        expected = reference(pixels, labels=labels, output_hidden_states=True)
        got = model(pixels, labels=labels, output_hidden_states=True)
    assert got.logits.shape == expected.logits.shape == (2, 5, math.ceil(hw[0] / 4), math.ceil(hw[1] / 4))
    assert _rel(expected.logits, got.logits) < RTOL
    assert abs(float(expected.loss) - float(got.loss)) < RTOL * float(expected.loss)
    for e, g in zip(expected.hidden_states, got.hidden_states):
        assert _rel(e, g) < RTOL


def test_segformer_config_is_carried(segformer_folders):
    _, folder = segformer_folders["b0"]
    config = PvtV2ForSemanticSegmentation.from_pretrained(folder).config
    assert config.mlp_ratios == [4, 4, 4, 4]
    assert config.layer_norm_eps == 1e-5  # every SegFormer LayerNorm is nn.LayerNorm's default
    assert config.patch_norm_eps == config.reduction_norm_eps == 1e-5
    assert (config.decoder_hidden_size, config.semantic_loss_ignore_index, config.reshape_last_stage) == (256, 255, True)
    assert config.classifier_dropout_prob == 0.1 and config.num_labels == 5


def test_layer_norm_epsilon_is_visible(segformer_folders):
    """The parity tests can tell 1e-5 from transformers' unused config value 1e-6: a model built with it differs."""
    reference, folder = segformer_folders["b0"]
    wrong = PvtV2ForSemanticSegmentation.from_pretrained(folder, layer_norm_eps=1e-6)
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert _rel(reference(pixels).logits, wrong(pixels).logits) > 10 * RTOL


def test_segformer_binary_loss_matches_transformers(tmp_path):
    torch.manual_seed(0)
    config = transformers.SegformerConfig(**SEGFORMER_SIZES["b0"], num_labels=1)
    reference = transformers.SegformerForSemanticSegmentation(config).eval()
    _perturb(reference)
    reference.save_pretrained(tmp_path)
    model = PvtV2ForSemanticSegmentation.from_pretrained(tmp_path)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 64, 96, generator=gen)
    labels = torch.randint(0, 2, (2, 64, 96), generator=gen)
    labels[1, :20] = 255
    with torch.no_grad():
        expected, got = reference(pixels, labels=labels), model(pixels, labels=labels)
    assert _rel(expected.logits, got.logits) < RTOL
    assert abs(float(expected.loss) - float(got.loss)) < RTOL * float(expected.loss)


def test_segmentation_loss_closed_form():
    """Cross-entropy over the non-ignored pixels, computed by hand."""
    logits = torch.tensor([[[[2.0]], [[0.0]], [[-1.0]]]]).expand(1, 3, 2, 2).contiguous()  # (1, 3, 2, 2)
    labels = torch.tensor([[[0, 1], [255, 2]]])
    logz = math.log(math.exp(2) + 1 + math.exp(-1))
    expected = ((logz - 2) + (logz - 0) + (logz + 1)) / 3
    assert abs(float(semantic_segmentation_loss(logits, labels)) - expected) < 1e-6
    with pytest.raises(ValueError, match="out of range"):
        semantic_segmentation_loss(logits, torch.tensor([[[0, 7], [1, 2]]]))


def test_reshape_last_stage_false(tmp_path):
    torch.manual_seed(0)
    config = transformers.SegformerConfig(**SEGFORMER_SIZES["b0"], num_labels=3, reshape_last_stage=False)
    reference = transformers.SegformerForSemanticSegmentation(config).eval()
    _perturb(reference)
    reference.save_pretrained(tmp_path)
    model = PvtV2ForSemanticSegmentation.from_pretrained(tmp_path)
    assert model.config.reshape_last_stage is False
    # transformers' decode head fails on its own unreshaped last stage, so its logits come from the same weights
    # with the flag on (the flag does not change them); its encoder gives the unreshaped hidden state.
    same = transformers.SegformerForSemanticSegmentation(config.__class__(**{**config.to_dict(), "reshape_last_stage": True}))
    same.load_state_dict(reference.state_dict())
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_hidden = reference.segformer(pixels, output_hidden_states=True).hidden_states
        expected_logits = same.eval()(pixels).logits
        got = model(pixels, output_hidden_states=True)
    assert got.hidden_states[-1].shape == expected_hidden[-1].shape == (1, 4, 256)
    assert _rel(expected_hidden[-1], got.hidden_states[-1]) < RTOL
    assert _rel(expected_logits, got.logits) < RTOL


@pytest.mark.parametrize("hw", [(64, 64), (96, 128)])
def test_glpn_depth_and_loss_match_transformers(glpn_folder, hw):
    reference, folder = glpn_folder
    model = PvtV2ForDepthEstimation.from_pretrained(folder)
    assert model.config.max_depth == 80 and model.config.decoder_hidden_size == 64
    gen = torch.Generator().manual_seed(hw[1])
    pixels = torch.randn(2, 3, *hw, generator=gen)
    labels = torch.rand(2, *hw, generator=gen) * 80
    labels[0, :10] = 0  # invalid depth, skipped by the loss
    with torch.no_grad():
        expected, got = reference(pixels, labels=labels), model(pixels, labels=labels)
    assert got.predicted_depth.shape == expected.predicted_depth.shape == (2, *hw)
    assert _rel(expected.predicted_depth, got.predicted_depth) < RTOL
    assert abs(float(expected.loss) - float(got.loss)) < RTOL * float(expected.loss)


def test_glpn_rejects_sizes_its_decoder_cannot_fuse(glpn_folder):
    _, folder = glpn_folder
    model = PvtV2ForDepthEstimation.from_pretrained(folder)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 97, 131))


def test_silog_loss_closed_form():
    pred = torch.tensor([[1.0, 2.0, 4.0]])
    target = torch.tensor([[2.0, 2.0, 0.0]])  # the zero is skipped
    d = np.array([math.log(2), 0.0])
    expected = math.sqrt((d**2).mean() - 0.5 * d.mean() ** 2)
    assert abs(float(silog_loss(pred, target)) - expected) < 1e-6


def test_encoder_only_and_classifier_checkpoints_of_segformer(tmp_path):
    """SegformerModel and SegformerForImageClassification (the MiT ImageNet encoders) load into pvtv2's classes."""
    torch.manual_seed(0)
    config = transformers.SegformerConfig(**SEGFORMER_SIZES["b0"], num_labels=7)
    classifier = transformers.SegformerForImageClassification(config).eval()
    _perturb(classifier)
    classifier.save_pretrained(tmp_path / "cls")
    classifier.segformer.save_pretrained(tmp_path / "bare")
    pixels = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = classifier(pixels, output_hidden_states=True)
        got = PvtV2ForImageClassification.from_pretrained(tmp_path / "cls")(pixels)
        bare = PvtV2Model.from_pretrained(tmp_path / "bare")(pixels)
    assert _rel(expected.logits, got.logits) < RTOL
    assert _rel(expected.hidden_states[-1], bare.last_hidden_state) < RTOL


def test_transformers5_state_dict_file_without_config(tmp_path, segformer_folders):
    """A bare ``torch.save(model.state_dict())`` of transformers 5 (its in-memory names): config read off shapes."""
    reference, _ = segformer_folders["b0"]
    torch.save(reference.state_dict(), tmp_path / "weights.pth")
    assert any(".q_proj." in k for k in reference.state_dict())
    model = PvtV2ForSemanticSegmentation.from_pretrained(tmp_path / "weights.pth")
    assert model.config.num_labels == 5 and model.config.decoder_hidden_size == 256
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _rel(reference(pixels).logits, model(pixels).logits) < RTOL


def test_segformer_file_with_fused_key_value_gives_transformers_logits(tmp_path, segformer_folders):
    """Keys and values fused into one ``key_value`` matrix (keys first, as the original code's ``kv``), as some
    conversions write SegFormer weights: split back, the logits are transformers' (no other test has such a file)."""
    reference, folder = segformer_folders["b0"]
    state = load_file(folder / "model.safetensors")  # the published names (attention.self.key ...)
    fused = {}
    for key, value in state.items():
        if ".attention.self.key." in key:
            other = state[key.replace(".key.", ".value.")]
            fused[key.replace(".key.", ".key_value.")] = torch.cat([value, other])
        elif ".attention.self.value." not in key:
            fused[key] = value
    assert any(".key_value." in k for k in fused)
    torch.save(fused, tmp_path / "fused.pth")
    model = PvtV2ForSemanticSegmentation.from_pretrained(tmp_path / "fused.pth")
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert _rel(reference(pixels).logits, model(pixels).logits) < RTOL


@pytest.mark.parametrize("cls", [PvtV2ForSemanticSegmentation, PvtV2ForDepthEstimation])
def test_save_load_round_trip_is_exact(cls, tmp_path):
    config = PvtV2Config(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4],
                         id2label={0: "sky", 1: "road", 2: "car"}, decoder_hidden_size=32)
    torch.manual_seed(0)
    model = cls(config).eval()
    _perturb(model)
    model.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert loaded.config.id2label == {0: "sky", 1: "road", 2: "car"}
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model(pixels), loaded(pixels)
    assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("cls", [PvtV2ForSemanticSegmentation, PvtV2ForDepthEstimation])
def test_classification_checkpoint_initialises_the_encoder(cls, tmp_path, caplog):
    config = PvtV2Config(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4],
                         num_labels=10)
    torch.manual_seed(0)
    classifier = PvtV2ForImageClassification(config).eval()
    _perturb(classifier)
    classifier.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        model = cls.from_pretrained(tmp_path, num_labels=3)
    assert "newly initialised" in caplog.text
    encoder = {k: v for k, v in classifier.state_dict().items() if k.startswith("pvt_v2.")}
    mine = model.state_dict()
    assert encoder and all(torch.equal(v, mine[k]) for k, v in encoder.items())
    assert all(not t.is_meta and torch.isfinite(t).all() for t in model.state_dict().values())
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))[0]
    assert torch.isfinite(out).all()
    if cls is PvtV2ForSemanticSegmentation:
        assert out.shape == (1, 3, 16, 16)


def test_segformer_checkpoint_with_other_class_count_replaces_classifier_only(segformer_folders):
    reference, folder = segformer_folders["b0"]
    model = PvtV2ForSemanticSegmentation.from_pretrained(folder, num_labels=2)
    assert model.decode_head.classifier.weight.shape == (2, 256, 1, 1)
    assert torch.equal(model.decode_head.linear_fuse.weight, reference.decode_head.linear_fuse.weight)


def test_viridis_lut_matches_matplotlib():
    cm = pytest.importorskip("matplotlib").colormaps["viridis"]
    expected = np.round(np.asarray([cm(i / 255)[:3] for i in range(256)]) * 255)
    assert np.abs(viridis_lut().astype(float) - expected).max() <= 6  # 17 anchors, linearly interpolated
    picture = colorize_depth(np.array([[0.0, 5.0], [10.0, 2.5]]))
    assert picture.shape == (2, 2, 3) and tuple(picture[0, 0]) == (68, 1, 84) and tuple(picture[1, 0]) == (253, 231, 37)
