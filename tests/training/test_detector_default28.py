"""`pvtv2 train --task detection` without --detector (round 28): the kind of the saved detector --model names, not
retinanet (which stopped fine-tuning a saved FCOS with an error naming fcos); retinanet where there is no saved kind
(a preset, tiny, a classification checkpoint); an explicit --detector that the saved weights do not fit still
refused, naming both kinds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

from conftest import TINY_SHALLOW, perturb_, write_square_coco

from pvtv2 import PvtV2Config, PvtV2ForImageClassification
from pvtv2.cli import main
from pvtv2.models.detection import PvtV2ForObjectDetection
from pvtv2.training import TrainConfig
from pvtv2.training.detection import DetectionTask, build_detector, resolve_detector


_write = write_square_coco  # category id 1


def _saved(path: Path, detector: str) -> PvtV2ForObjectDetection:
    torch.manual_seed(0)
    config = PvtV2Config(**TINY_SHALLOW, id2label={0: "square"}, detector=detector, min_size=64, max_size=107,
                         fpn_channels=64)
    model = perturb_(PvtV2ForObjectDetection(config))
    model.save_pretrained(path)
    return model


def test_default_detector_is_the_saved_kind(tmp_path):
    """build_detector with no detector given loads a saved FCOS as the FCOS it is: every saved weight comes back."""
    saved = _saved(tmp_path / "fcos", "fcos")
    cfg = TrainConfig(task="detection", model=str(tmp_path / "fcos"), image_size=64)
    assert cfg.detector is None
    assert resolve_detector(cfg).detector == "fcos"
    model = build_detector(cfg, {0: "square"})
    assert model.config.detector == "fcos"
    expected = saved.state_dict()
    got = model.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    # a task built directly decides it too (the data's masks depend on it)
    assert DetectionTask(cfg).cfg.detector == "fcos"


@pytest.mark.parametrize("source", ["tiny", "pvt_v2_b0", "classifier", "config"])
def test_default_detector_without_a_saved_kind_is_retinanet(tmp_path, source):
    if source == "classifier":
        PvtV2ForImageClassification(PvtV2Config(**TINY_SHALLOW, num_labels=3)).save_pretrained(tmp_path / "cls")
        source = str(tmp_path / "cls")
    elif source == "config":
        (tmp_path / "arch.json").write_text(json.dumps(dict(TINY_SHALLOW)))
        source = str(tmp_path / "arch.json")
    cfg = resolve_detector(TrainConfig(task="detection", model=source, image_size=64))
    assert cfg.detector == "retinanet"


def test_config_json_with_a_detector_kind_is_that_kind(tmp_path):
    (tmp_path / "arch.json").write_text(json.dumps({**TINY_SHALLOW, "detector": "faster_rcnn"}))
    cfg = TrainConfig(task="detection", model=str(tmp_path / "arch.json"), image_size=64)
    assert resolve_detector(cfg).detector == "faster_rcnn"
    assert build_detector(cfg, {0: "a", 1: "b"}).config.detector == "faster_rcnn"


def test_explicit_detector_is_kept_and_a_contradiction_refused(tmp_path):
    _saved(tmp_path / "fcos", "fcos")
    cfg = TrainConfig(task="detection", model=str(tmp_path / "fcos"), image_size=64, detector="retinanet")
    assert resolve_detector(cfg).detector == "retinanet"
    with pytest.raises(ValueError, match=r"saved fcos detector, --detector is retinanet.*--detector fcos"):
        build_detector(cfg, {0: "square"})


def test_cli_fine_tunes_a_saved_fcos_without_detector_and_records_it(tmp_path, capsys):
    """The command: no --detector fine-tunes the saved FCOS (it stopped with exit 2 before), run.json and last/ say
    fcos; --detector retinanet on the same checkpoint exits 2 naming fcos."""
    _saved(tmp_path / "ckpt", "fcos")
    _write(tmp_path / "d", "train", [[5, 5, 20, 20], [30, 10, 25, 25]])
    _write(tmp_path / "d", "val", [[8, 8, 20, 20]])
    args = ["train", "--task", "detection", "--model", str(tmp_path / "ckpt"), "--image-size", "64", "--data",
            str(tmp_path / "d"), "--epochs", "1", "--batch-size", "2", "--no-progress"]
    out = tmp_path / "run"
    assert main([*args, "--output", str(out)]) == 0, capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["detector"] == "fcos"
    assert json.loads((out / "last" / "config.json").read_text())["detector"] == "fcos"
    capsys.readouterr()
    assert main([*args, "--output", str(tmp_path / "run2"), "--detector", "retinanet"]) == 2
    err = capsys.readouterr().err
    assert "saved fcos detector" in err and "--detector fcos" in err, err
