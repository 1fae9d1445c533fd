"""Hostile inputs around a timm repository's config.json ``pretrained_cfg`` as preprocessing: what is not a timm
repository keeps its own preprocessing, a preprocessor_config.json wins over the pretrained_cfg, an offline hub
cache (laid out as huggingface_hub lays it out) is read at the revision asked, and odd values get timm's answer
(``resolve_data_config`` + ``create_transform``'s pixels) or an error naming config.json."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import constants

from pvtv2 import PvtV2ImageProcessor
from pvtv2.inference import load_processor

timm = pytest.importorskip("timm")
from timm.data import create_transform, resolve_data_config  # noqa: E402

IMAGE = PIL.Image.fromarray(np.random.default_rng(32).integers(0, 256, (45, 61, 3), dtype=np.uint8))
TIMM = {"architecture": "pvt_v2_b0", "num_classes": 3, "num_features": 256}


def _pixels(processor: PvtV2ImageProcessor) -> torch.Tensor:
    return processor(IMAGE, return_tensors="pt")["pixel_values"][0]


def _timm_pixels(pretrained_cfg: dict) -> torch.Tensor:
    return create_transform(**resolve_data_config({}, pretrained_cfg=pretrained_cfg))(IMAGE)


def test_a_pvtv2_config_holding_a_pretrained_cfg_key_is_not_a_timm_repository(tmp_path):
    # A transformers PvtV2 config.json that happens to carry a pretrained_cfg: the defaults, not the key.
    config = {"model_type": "pvt_v2", "architectures": ["PvtV2ForImageClassification"], "architecture": "pvt_v2_b0",
              "pretrained_cfg": {"input_size": [3, 40, 40], "crop_pct": 0.5}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    processor = PvtV2ImageProcessor.from_pretrained(tmp_path)
    assert processor.size == {"height": 224, "width": 224} and not processor.do_center_crop
    assert load_processor(tmp_path, 32).size == {"height": 32, "width": 32}


def test_a_preprocessor_config_wins_over_the_pretrained_cfg_and_preprocess_over_both(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TIMM, "pretrained_cfg": {"input_size": [3, 40, 40]}}))
    PvtV2ImageProcessor(size={"height": 24, "width": 28}).save_pretrained(tmp_path)
    assert PvtV2ImageProcessor.from_pretrained(tmp_path).size == {"height": 24, "width": 28}
    assert load_processor(tmp_path, 32).size == {"height": 24, "width": 28}
    forced = load_processor(tmp_path, 32, protocol="transformers")
    assert forced.size == {"height": 32, "width": 32} and not forced.do_center_crop


def _snapshot(repo, commit: str, ref: str | None, files: dict[str, dict]) -> None:
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = repo / "blobs" / f"{commit}-{name}"
        blob.parent.mkdir(exist_ok=True)
        blob.write_text(json.dumps(data))
        (snapshot / name).symlink_to(blob)
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def test_an_offline_hub_cache_is_read_at_the_revision_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "models--org--name"
    main, other, third = "a" * 40, "b" * 40, "c" * 40
    _snapshot(repo, main, "main", {"config.json": {**TIMM, "pretrained_cfg": {"input_size": [3, 40, 40]}}})
    _snapshot(repo, other, "v2", {"config.json": {**TIMM, "pretrained_cfg": {"input_size": [3, 48, 48],
                                                                           "crop_pct": 1.0}}})
    _snapshot(repo, third, None, {"config.json": {**TIMM, "pretrained_cfg": {"input_size": [3, 40, 40]}},
                                  "preprocessor_config.json": PvtV2ImageProcessor(size=20).to_dict()})
    (repo / ".no_exist" / main).mkdir(parents=True)
    (repo / ".no_exist" / main / "preprocessor_config.json").write_text("")

    def crop(revision):
        processor = PvtV2ImageProcessor.from_pretrained("org/name", cache_dir=tmp_path, revision=revision)
        return processor.crop_size if processor.do_center_crop else processor.size

    assert crop(None) == crop("main") == crop(main) == {"height": 40, "width": 40}
    assert crop("v2") == crop(other) == {"height": 48, "width": 48}
    assert crop(third) == {"height": 20, "width": 20}  # that revision's preprocessor_config.json


@pytest.mark.parametrize("odd", [
    {"interpolation": ""}, {"crop_pct": 0}, {"crop_pct": None}, {"crop_mode": ""}, {"interpolation": None},
    {"mean": [0.5], "std": [0.25]}, {"mean": [0, 1, 0], "std": [1, 2, 1]}, {"input_size": None},
])
def test_odd_but_valid_values_give_timms_pixels(tmp_path, odd):
    cfg = {"input_size": [3, 40, 40], "crop_pct": 0.9, "interpolation": "bilinear", **odd}
    (tmp_path / "config.json").write_text(json.dumps({**TIMM, "pretrained_cfg": cfg}))
    ours = _pixels(PvtV2ImageProcessor.from_pretrained(tmp_path))
    theirs = _timm_pixels(cfg)
    assert ours.shape == theirs.shape
    assert np.allclose(ours.numpy(), theirs.numpy(), rtol=0, atol=4e-6 * float(theirs.abs().max()))


@pytest.mark.parametrize("bad, message", [
    ({"interpolation": ["bicubic"]}, "interpolation"), ({"interpolation": {"a": 1}}, "interpolation"),
    ({"crop_mode": ["center"]}, "crop_mode"), ({"input_size": [3, 224]}, "input_size"),
    ({"input_size": ["3", "224", "224"]}, "input_size"), ({"crop_pct": "0.9"}, "crop_pct"),
    ({"mean": [[0.1], 0.2, 0.3]}, "mean"), ({"std": [0, 1, 1]}, "std"), ({"crop_pct": 1.5}, "crop_pct"),
])
def test_bad_values_are_refused_naming_the_file_and_the_field(tmp_path, bad, message):
    (tmp_path / "config.json").write_text(json.dumps({**TIMM, "pretrained_cfg": bad}))
    with pytest.raises((TypeError, ValueError), match=message) as caught:
        PvtV2ImageProcessor.from_pretrained(tmp_path)
    assert "config.json" in str(caught.value) and "pretrained_cfg" in str(caught.value)
