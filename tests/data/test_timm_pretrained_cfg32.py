"""A timm hub repository's preprocessing is the one its config.json's ``pretrained_cfg`` records: pvtv2's pixels
against timm's own eval transform (``create_transform(**resolve_data_config({}, pretrained_cfg=...))``) for seeded
random pretrained_cfgs and real photographs cut to odd sizes, and bad pretrained_cfgs refused naming the file."""

from __future__ import annotations

import json
import random

import numpy as np
import PIL.Image
import pytest
import torch

from pvtv2 import PvtV2ImageProcessor
from pvtv2.inference import load_processor

timm = pytest.importorskip("timm")
from timm.data import create_transform, resolve_data_config  # noqa: E402

sklearn_datasets = pytest.importorskip("sklearn.datasets")
PHOTOS = [PIL.Image.fromarray(a) for a in sklearn_datasets.load_sample_images().images]  # 427 x 640 each


def _repo(folder, pretrained_cfg: dict) -> None:
    """A timm repository's config.json as timm's save_for_hf writes it (weights are not needed here)."""
    config = {"architecture": "pvt_v2_b0", "num_classes": 3, "num_features": 256, "pretrained_cfg": pretrained_cfg}
    (folder / "config.json").write_text(json.dumps(config))


def _timm_pixels(pretrained_cfg: dict, image: PIL.Image.Image) -> torch.Tensor:
    return create_transform(**resolve_data_config({}, pretrained_cfg=pretrained_cfg))(image)


def _random_cfg(rng: random.Random) -> dict:
    mode = rng.choice(["center", "center", "squash"])
    side = rng.randint(32, 96)
    height, width = (side, side) if mode == "center" else (side, rng.randint(32, 96))
    return {
        "input_size": [3, height, width],
        "crop_pct": round(rng.uniform(0.75, 1.0), 4),
        "crop_mode": mode,
        "interpolation": rng.choice(["bicubic", "bilinear", "nearest", "lanczos", "box", "hamming"]),
        "mean": [round(rng.uniform(-0.3, 0.8), 3) for _ in range(3)],
        "std": [round(rng.uniform(0.1, 0.5), 3) for _ in range(3)],
    }


@pytest.mark.parametrize("seed", range(20))
def test_a_random_pretrained_cfg_gives_timms_pixels(tmp_path, seed):
    rng = random.Random(seed)
    cfg = _random_cfg(rng)
    _repo(tmp_path, cfg)
    photo = rng.choice(PHOTOS)
    height, width = rng.randint(17, 427), rng.randint(17, 640)
    top, left = rng.randint(0, 427 - height), rng.randint(0, 640 - width)
    image = photo.crop((left, top, left + width, top + height))
    want = _timm_pixels(cfg, image)
    processor = PvtV2ImageProcessor.from_pretrained(tmp_path)
    got = processor(image, return_tensors="pt").pixel_values[0]
    assert got.shape == want.shape == (3, cfg["input_size"][1], cfg["input_size"][2])
    # float32 rounding of (x / 255 - mean) / std: a few ulps of the largest value
    assert (got - want).abs().max() <= 4 * torch.finfo(torch.float32).eps * want.abs().max(), cfg
    # The CLI's predict / eval read a timm repository the same way (not its file's origin protocol at 224)
    assert load_processor(tmp_path, 224, None, "timm") == processor


def test_a_published_pretrained_cfg_gives_the_timm_protocol_and_timms_pixels(tmp_path):
    cfg = dict(timm.create_model("pvt_v2_b0", pretrained=False).pretrained_cfg)
    _repo(tmp_path, json.loads(json.dumps(cfg)))  # as written to JSON (tuples become lists)
    processor = PvtV2ImageProcessor.from_pretrained(tmp_path)
    assert processor == PvtV2ImageProcessor.from_protocol("timm", 224)  # what a timm repository got before
    assert load_processor(tmp_path, 224, None, "timm") == processor
    image = PHOTOS[1].crop((3, 5, 300, 222))
    want = _timm_pixels(cfg, image)
    got = processor(image, return_tensors="pt").pixel_values[0]
    assert (got - want).abs().max() <= 4 * torch.finfo(torch.float32).eps * want.abs().max()


def test_a_weights_file_beside_a_timm_config_and_missing_fields_take_timms_defaults(tmp_path):
    cfg = {"input_size": [3, 40, 40]}  # crop_pct 0.875, bicubic, ImageNet statistics, as resolve_data_config says
    _repo(tmp_path, cfg)
    (tmp_path / "model.safetensors").write_bytes(b"")  # only its folder is read here
    processor = load_processor(tmp_path / "model.safetensors", 224, None, "timm")
    image = PHOTOS[0].crop((10, 10, 71, 100))
    want = _timm_pixels(cfg, image)
    got = processor(image, return_tensors="pt").pixel_values[0]
    assert got.shape == (3, 40, 40) and (got - want).abs().max() <= 1e-5
    # An explicit protocol still wins over the file
    assert load_processor(tmp_path, 56, "transformers", "timm") == PvtV2ImageProcessor(size=56)


@pytest.mark.parametrize(("edit", "message"), [
    ({"crop_pct": -0.5}, "crop_pct must be in (0, 1]"),  # 0, as null, is timm's default (tested elsewhere)
    ({"crop_pct": 1.2}, "crop_pct must be in (0, 1]"),
    ({"std": [0.2, 0.0, 0.2]}, "image_std must not contain 0"),
    ({"mean": [0.5, 0.5]}, "image_mean must have 3 values"),
    ({"mean": "0.5"}, "image_mean must be a number or 3 numbers"),
    ({"input_size": [3, 64, 48]}, "not square"),
    ({"input_size": [1, 64, 64]}, "PVTv2 takes 3"),
    ({"input_size": [3, 0, 64]}, "positive integers"),
    ({"crop_mode": "border"}, "crop_mode 'border' is not supported"),
    ({"interpolation": "random"}, "interpolation must be one of"),
])
def test_a_bad_pretrained_cfg_is_refused_naming_the_file(tmp_path, edit, message):
    _repo(tmp_path, {"input_size": [3, 64, 64], "crop_pct": 0.9, "interpolation": "bicubic", **edit})
    with pytest.raises((ValueError, TypeError)) as info:
        PvtV2ImageProcessor.from_pretrained(tmp_path)
    assert message in str(info.value) and "config.json" in str(info.value) and "pretrained_cfg" in str(info.value)
    with pytest.raises((ValueError, TypeError), match="config.json"):
        load_processor(tmp_path, 224, None, "timm")


def test_a_negative_mean_is_timms_arithmetic_not_an_error(tmp_path):
    cfg = {"input_size": [3, 33, 33], "crop_pct": 1.0, "interpolation": "bilinear", "mean": [-0.5, 0.0, 1.5],
           "std": [0.5, 2.0, 0.25]}
    _repo(tmp_path, cfg)
    image = PHOTOS[0].crop((0, 0, 50, 37))
    got = PvtV2ImageProcessor.from_pretrained(tmp_path)(image, return_tensors="pt").pixel_values[0]
    want = _timm_pixels(cfg, image)
    assert np.allclose(got.numpy(), want.numpy(), rtol=0, atol=4e-6 * float(want.abs().max()))


def test_convert_and_predict_of_a_timm_repository_use_its_pretrained_cfg(tmp_path):
    """pvtv2 convert writes the repository's preprocessing into the folder it makes (so the folder predicts what its
    source did), and predict's processor for the source is that one: timm's pixels at its input_size."""
    from timm.models._hub import save_for_hf

    from pvtv2.export import convert_checkpoint

    model = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=3, depths=(1, 1), embed_dims=(16, 32),
                              num_heads=(1, 2), mlp_ratios=(2, 2), sr_ratios=(2, 1))
    source = tmp_path / "repo"
    save_for_hf(model, source, safe_serialization=True)
    cfg = {"input_size": [3, 48, 48], "crop_pct": 0.8, "interpolation": "bilinear", "mean": [0.5] * 3,
           "std": [0.25] * 3}
    data = json.loads((source / "config.json").read_text())
    data["pretrained_cfg"].update(cfg)
    (source / "config.json").write_text(json.dumps(data))
    convert_checkpoint(source, tmp_path / "out")
    converted = PvtV2ImageProcessor.from_pretrained(tmp_path / "out")
    assert converted == PvtV2ImageProcessor.from_pretrained(source) == load_processor(source, 224, None, "timm")
    image = PHOTOS[0].crop((100, 50, 333, 190))
    want = _timm_pixels(data["pretrained_cfg"], image)
    got = converted(image, return_tensors="pt").pixel_values[0]
    assert got.shape == (3, 48, 48) and (got - want).abs().max() <= 4 * torch.finfo(torch.float32).eps * want.abs().max()
