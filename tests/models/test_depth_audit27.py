"""Audit of monocular depth (GLPN's decoder and head on the PVTv2 encoder) against independent references:
transformers' GLPNForDepthEstimation and GLPNImageProcessorPil on the same weights and images (two real photographs
from scikit-learn), and the depth metrics written out in NumPy as BTS's / GLPN's evaluation computes them."""

from __future__ import annotations

import logging

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from pvtv2.inference import predict_depth
from pvtv2.models.depth import PvtV2ForDepthEstimation
from pvtv2.training.depth import DEPTH_METRICS, depth_metric_sums, depth_metrics, finish_depth_metrics

from conftest import relative_error, scramble_batch_norm_statistics_

transformers = pytest.importorskip("transformers")

# Widths 1:2:5:8 with heads 1, 2, 5, 8 (as every published variant): the heads of a bare state dict are inferred
# without a guess. Two blocks in stage 2, MLP ratios other than 4, a decoder narrower than the first stage.
ARCH = dict(depths=[1, 2, 1, 1], hidden_sizes=[16, 32, 80, 128], num_attention_heads=[1, 2, 5, 8],
            mlp_ratios=[4, 4, 4, 4], decoder_hidden_size=12)
TIGHT = 1e-10  # float64


@torch.no_grad()
def _adversarial(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight off its initial value; LayerNorm scales and biases far from 1 / 0; the patch embeddings shrunk
    so that LayerNorm inputs are tiny (a 1e-5 against 1e-6 epsilon shows); BatchNorm statistics far from 0 / 1."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * 0.1)
        if "layer_norm" in name or "layernorm" in name:
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * 0.5)
        if "patch_embeddings" in name and ".proj." in name:
            p.mul_(1e-3)
    return scramble_batch_norm_statistics_(model, gen)


@pytest.fixture(scope="module")
def kitti_like(tmp_path_factory):
    """A float64 GLPN with KITTI's depth range (80 m), saved as transformers saves it and as a bare state dict."""
    torch.manual_seed(0)
    config = transformers.GLPNConfig(**ARCH, max_depth=80, drop_path_rate=0.0)
    reference = _adversarial(transformers.GLPNForDepthEstimation(config).double()).eval()
    folder = tmp_path_factory.mktemp("glpn_kitti")
    reference.save_pretrained(folder)
    torch.save(reference.state_dict(), folder / "state_dict.pt")
    return reference, folder


# ---------------------------------------------------------------------------------------------- checkpoints
def test_a_bare_glpn_state_dict_says_its_depth_range_is_assumed(kitti_like, caplog):
    """A GLPN state dict without its config.json records no max_depth: NYU's and KITTI's models have the same
    tensors and predict up to 10 and 80 m. Loaded without a word it predicted KITTI's depths 8x too small."""
    reference, folder = kitti_like
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        expected = reference(x).predicted_depth
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        assumed = PvtV2ForDepthEstimation.from_pretrained(folder / "state_dict.pt", dtype="auto").eval()
    assert assumed.config.max_depth == 10.0
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("max_depth" in m and "10" in m for m in warned), warned
    with torch.no_grad():  # the depths are the reference's scaled by 10 / 80: what the warning is about
        assert relative_error(expected * 10 / 80, assumed(x).predicted_depth) < TIGHT

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        model = PvtV2ForDepthEstimation.from_pretrained(folder / "state_dict.pt", dtype="auto", max_depth=80).eval()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert model.dtype == torch.float64 and model.config.layer_norm_eps == 1e-5
    with torch.no_grad():
        assert relative_error(expected, model(x).predicted_depth) < TIGHT


def test_a_glpn_folder_needs_no_word_on_its_depth_range(kitti_like, caplog):
    reference, folder = kitti_like
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        model = PvtV2ForDepthEstimation.from_pretrained(folder, dtype="auto").eval()
    assert model.config.max_depth == 80.0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ---------------------------------------------------------------------------------------------- forward parity
@pytest.mark.parametrize("shape", [(1, 3, 29, 30), (3, 3, 31, 61), (2, 3, 32, 320), (1, 3, 352, 64)])
def test_odd_tiny_and_wide_inputs_match_transformers(kitti_like, shape):
    """Sizes that are no multiple of 32 but whose four stages still halve exactly (29 to 31 px: 8, 4, 2, 1 tokens)
    give transformers' (B, 32k, 32k) depth; a 32 px tall, 320 px wide strip; batch 3."""
    reference, folder = kitti_like
    model = PvtV2ForDepthEstimation.from_pretrained(folder, dtype="auto").eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        expected, got = reference(x).predicted_depth, model(x).predicted_depth
    assert got.shape == expected.shape == (shape[0], -(-shape[2] // 32) * 32, -(-shape[3] // 32) * 32)
    assert relative_error(expected, got) < TIGHT
    assert 0 < float(got.min()) and float(got.max()) < 80


def test_attentions_and_tuples_hold_transformers_values(kitti_like):
    """transformers lists the attention maps block after block; pvtv2 groups them by stage (as its PvtV2Model
    does): the same maps in the same order once flattened. The tuple form (loss first) has the same entries."""
    reference, folder = kitti_like
    reference = transformers.GLPNForDepthEstimation.from_pretrained(folder, attn_implementation="eager",
                                                                    dtype=torch.float64).eval()
    model = PvtV2ForDepthEstimation.from_pretrained(folder, dtype="auto").eval()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 64, 32, generator=gen, dtype=torch.float64)
    labels = torch.rand(2, 64, 32, generator=gen, dtype=torch.float64) * 90
    with torch.no_grad():
        expected = reference(x, labels=labels, output_attentions=True, output_hidden_states=True, return_dict=False)
        got = model(x, labels=labels, output_attentions=True, output_hidden_states=True, return_dict=False)
    assert len(expected) == len(got) == 4
    assert abs(float(expected[0]) - float(got[0])) < TIGHT * float(expected[0])
    assert relative_error(expected[1], got[1]) < TIGHT
    for e, g in zip(expected[2], got[2], strict=True):
        assert relative_error(e, g) < TIGHT
    flat = [a for stage in got[3] for a in stage]
    assert [len(stage) for stage in got[3]] == ARCH["depths"]
    assert len(flat) == len(expected[3]) == sum(ARCH["depths"])
    for e, g in zip(expected[3], flat):
        assert relative_error(e, g) < TIGHT


# ---------------------------------------------------------------------------------------------- loss
def test_silog_loss_and_every_gradient_match_transformers(kitti_like):
    """Labels with pixels without depth (0), below 0 and NaN (both skipped by target > 0), an image of batch 3
    without any measured pixel among measured ones: the loss and the gradient of every parameter, in training
    mode (BatchNorm on batch statistics) and float64."""
    reference, folder = kitti_like
    reference = transformers.GLPNForDepthEstimation.from_pretrained(folder, dtype=torch.float64)
    model = PvtV2ForDepthEstimation.from_pretrained(folder, dtype="auto")
    reference.train(), model.train()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 3, 64, 64, generator=gen, dtype=torch.float64)
    labels = torch.rand(3, 64, 64, generator=gen, dtype=torch.float64) * 80
    labels[0, :20] = 0
    labels[0, 30, :5] = -1.0
    labels[1, 3, 3] = float("nan")
    labels[2] = 0
    expected, got = reference(x, labels=labels), model(x, labels=labels)
    assert abs(expected.loss.item() - got.loss.item()) < TIGHT * expected.loss.item()
    # The closed form, too: sqrt(mean(d^2) - 0.5 mean(d)^2), d = ln t - ln p over t > 0.
    valid = (labels > 0).numpy()
    d = np.log(labels.numpy()[valid]) - np.log(got.predicted_depth.detach().numpy()[valid])
    assert got.loss.item() == pytest.approx(np.sqrt(np.mean(d**2) - 0.5 * np.mean(d) ** 2), rel=1e-12)
    expected.loss.backward()
    got.loss.backward()
    theirs = dict(reference.named_parameters())
    compared = 0
    for name, p in model.named_parameters():
        ref_name = _glpn_name(name)
        if ref_name not in theirs:
            continue
        expected_grad = theirs[ref_name].grad
        if float(expected_grad.abs().max()) < 1e-15:
            # A conv bias ahead of a BatchNorm in training: its gradient is 0, up to rounding (1e-20)
            assert float(p.grad.abs().max()) < 1e-15, name
            continue
        assert relative_error(expected_grad, p.grad) < 1e-9, name
        compared += 1
    assert compared >= 30  # the decoder's, the head's and the patch embeddings' at least


def _glpn_name(name: str) -> str:
    """The transformers name of a pvtv2 depth model parameter, where the rename is a plain one (decoder, head,
    patch embeddings); others are returned unchanged (and then skipped)."""
    if name.startswith(("decoder.", "head.")):
        return name
    parts = name.split(".")
    if name.startswith("pvt_v2.encoder.layers.") and parts[4] == "patch_embedding":
        tail = {"proj": "proj", "layer_norm": "layer_norm"}[parts[5]]
        return f"glpn.encoder.patch_embeddings.{parts[3]}.{tail}.{parts[6]}"
    return name


# ---------------------------------------------------------------------------------------------- preprocessing
def _photos() -> list[PIL.Image.Image]:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    return [PIL.Image.fromarray(a) for a in sklearn_datasets.load_sample_images().images]


@pytest.mark.parametrize("crop", [(427, 640), (100, 70), (33, 200), (64, 96)])
def test_predict_depth_is_glpns_processor_model_and_a_bilinear_resize_back(kitti_like, crop):
    """On the real photographs (and crops of them): GLPN's processor (PIL's bilinear resize to the size rounded
    down to multiples of 32, rescale by 1/255, no normalisation), the model, then the depth resized to the image
    (bilinear: transformers' post_process_depth_estimation resizes bicubic, which overshoots outside
    [0, max_depth]; at a size already a multiple of 32 the two are the same: none)."""
    from transformers.models.glpn.image_processing_pil_glpn import GLPNImageProcessorPil

    reference, folder = kitti_like
    model = PvtV2ForDepthEstimation.from_pretrained(folder)  # float32, as predict_depth runs it
    reference32 = transformers.GLPNForDepthEstimation.from_pretrained(folder, dtype=torch.float32).eval()
    processor = GLPNImageProcessorPil()
    for photo in _photos():
        image = photo.crop((0, 0, crop[1], crop[0]))
        pixels = processor(image, return_tensors="pt")["pixel_values"]
        assert pixels.shape[-2:] == (crop[0] // 32 * 32, crop[1] // 32 * 32)
        with torch.no_grad():
            depth = reference32(pixels).predicted_depth[:, None]
        expected = F.interpolate(depth, size=crop, mode="bilinear", align_corners=False)[0, 0].numpy()
        got = predict_depth(model, image)
        assert got.shape == crop
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
        if crop[0] % 32 == 0 and crop[1] % 32 == 0:
            post = processor.post_process_depth_estimation(
                transformers.modeling_outputs.DepthEstimatorOutput(predicted_depth=depth[:, 0]), target_sizes=[crop]
            )[0]["predicted_depth"]
            np.testing.assert_allclose(got, post.numpy(), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------- metrics
def _numpy_metrics(pred: np.ndarray, gt: np.ndarray, min_depth: float, max_depth: float, crop=None):
    """BTS's eval: valid = min < gt < max (inside Eigen's crop rows 45:471, cols 41:601 of 480x640 when asked); the
    prediction's inf to max, NaN to min, then clipped to [min, max]; compute_errors on the valid pixels."""
    pred = pred.astype(np.float64).copy()
    pred[np.isinf(pred) & (pred > 0)] = max_depth
    pred[np.isinf(pred)] = min_depth
    pred[np.isnan(pred)] = min_depth
    pred = np.clip(pred, min_depth, max_depth)
    valid = (gt > min_depth) & (gt < max_depth)
    if crop is not None:
        mask = np.zeros_like(valid)
        mask[crop[0]:crop[1], crop[2]:crop[3]] = True
        valid &= mask
    if not valid.any():
        return None
    p, t = pred[valid], gt[valid]
    thresh = np.maximum(t / p, p / t)
    return {
        "abs_rel": np.mean(np.abs(t - p) / t),
        "sq_rel": np.mean((t - p) ** 2 / t),
        "rmse": np.sqrt(np.mean((t - p) ** 2)),
        "rmse_log": np.sqrt(np.mean((np.log(t) - np.log(p)) ** 2)),
        "log10": np.mean(np.abs(np.log10(t) - np.log10(p))),
        "delta1": np.mean(thresh < 1.25),
        "delta2": np.mean(thresh < 1.25**2),
        "delta3": np.mean(thresh < 1.25**3),
    }


def _ground_truth(rng: np.random.Generator, shape: tuple[int, ...], max_depth: float) -> np.ndarray:
    gt = rng.uniform(0.2, max_depth * 1.2, shape)  # some beyond max_depth
    gt[rng.random(shape) < 0.2] = 0.0  # no measurement
    gt[rng.random(shape) < 0.05] = 1e-3  # exactly the floor: not valid (strictly above)
    gt[rng.random(shape) < 0.05] = max_depth  # exactly the cap: not valid (strictly below)
    return gt


@pytest.mark.parametrize("max_depth", [10.0, 80.0])
def test_metrics_are_bts_closed_forms_with_masks_and_non_finite_predictions(max_depth):
    rng = np.random.default_rng(5)
    gt = _ground_truth(rng, (3, 24, 40), max_depth)
    pred = gt * rng.uniform(0.6, 1.6, gt.shape) + rng.normal(0, 0.05, gt.shape)
    pred[0, 0, :6] = [np.nan, np.inf, -np.inf, -2.0, 0.0, max_depth * 3]
    for p, t in zip(pred, gt):
        expected = _numpy_metrics(p, t, 1e-3, max_depth)
        got = depth_metrics(torch.from_numpy(p).float() if max_depth == 80 else p, t, max_depth=max_depth)
        for name in DEPTH_METRICS:
            assert got[name] == pytest.approx(expected[name], rel=1e-6 if max_depth == 80 else 1e-12), name
    # One image without a valid pixel: left out of the means and counted.
    gt[1] = 0.0
    sums = depth_metric_sums(pred, gt, max_depth=max_depth)
    result = finish_depth_metrics(sums)
    assert result["images"] == 2 and result["images_without_depth"] == 1
    per_image = [_numpy_metrics(pred[i], gt[i], 1e-3, max_depth) for i in (0, 2)]
    for name in DEPTH_METRICS:
        assert result[name] == pytest.approx(np.mean([m[name] for m in per_image]), rel=1e-12), name


def test_nyu_crop_is_eigens_rows_and_columns_on_the_480x640_frame():
    rng = np.random.default_rng(6)
    gt = _ground_truth(rng, (480, 640), 10.0)
    pred = gt * rng.uniform(0.7, 1.4, gt.shape)
    pred[:45] = 9.0  # outside the crop: must not count
    expected = _numpy_metrics(pred, gt, 1e-3, 10.0, crop=(45, 471, 41, 601))
    got = depth_metrics(pred, gt, nyu_crop=True)
    for name in DEPTH_METRICS:
        assert got[name] == pytest.approx(expected[name], rel=1e-12), name
    assert depth_metrics(pred, gt)["abs_rel"] != pytest.approx(expected["abs_rel"], rel=1e-3)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_ground_truth_is_refused_by_name(bad):
    gt = np.full((4, 4), 2.0)
    gt[1, 1] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        depth_metrics(np.full((4, 4), 2.0), gt)


def test_the_folder_pvtv2_writes_holds_glpns_encoder_for_transformers_and_its_head_for_pvtv2(kitti_like, tmp_path):
    """The reverse direction: pvtv2 writes its own layout (model_type pvt_v2, not GLPN's). transformers'
    PvtV2Model reads the encoder from it (the depth head left unused) with GLPN's hidden states; pvtv2 reads it back
    whole, with GLPN's depth and range."""
    reference, folder = kitti_like
    PvtV2ForDepthEstimation.from_pretrained(folder, dtype="auto").save_pretrained(tmp_path / "written")
    encoder = transformers.PvtV2Model.from_pretrained(tmp_path / "written", dtype=torch.float64).eval()
    back = PvtV2ForDepthEstimation.from_pretrained(tmp_path / "written", dtype="auto").eval()
    assert back.config.max_depth == 80.0
    x = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        expected = reference(x, output_hidden_states=True)
        hidden = encoder(x, output_hidden_states=True).hidden_states
        got = back(x).predicted_depth
    assert len(hidden) == len(expected.hidden_states) == 4
    for e, g in zip(expected.hidden_states, hidden):
        assert relative_error(e, g) < TIGHT
    assert relative_error(expected.predicted_depth, got) < TIGHT


def test_a_fractional_max_depth_and_labels_of_another_size(kitti_like):
    """max_depth 7.25 m (transformers 5's GLPNConfig takes whole metres only): the reference's sigmoid, read off
    its 80 m depth, times 7.25. Labels at a 29x30 input's own size, whose depth comes out 32x32 (as
    transformers'), are refused by name, not indexed with a mask of another shape."""
    reference, folder = kitti_like
    model = PvtV2ForDepthEstimation.from_pretrained(folder, dtype="auto", max_depth=7.25).eval()
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 64, 64, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        expected, got = reference(x).predicted_depth / 80 * 7.25, model(x).predicted_depth
    assert float(got.max()) < 7.25
    assert relative_error(expected, got) < TIGHT
    small = torch.randn(1, 3, 29, 30, generator=gen, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"depth labels must have the prediction's shape \(1, 32, 32\), got \(1, 29, 30\)"):
        model(small, labels=torch.ones(1, 29, 30, dtype=torch.float64))
