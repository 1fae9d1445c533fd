"""A hostile review of the day's refusals (another run's last/, split folders read as classes, detect --json's COCO
masks), each fault against an independent answer: the run's own records, a hand computation over the model, the
command's output with pycocotools importable.

Faults found:

- ``--resume`` refused a run's own last/ as "another run's checkpoint" when ``--model`` was typed absolute but not as
  run.json spells it (``/data/pre/`` with tab completion's trailing slash, ``/data/x/../pre``) and the model folder was
  gone by then (only the run's start reads it: a cleaned /tmp, a run folder moved to another machine). The training
  state records ``--model`` as typed, run.json its ``abspath``: compared as paths, both are the same.
- ``pvtv2 eval`` refused a dataset whose class named ``train`` (``test``, ``valid``) keeps its images in sub-folders of
  its own, beside other classes (``car/``, ``plane/``, ``train/freight/``, ``train/passenger/``), as "dataset splits":
  eval reads a class's images recursively, and scored it before. A split-named folder beside other class folders is a
  class; the refusal stays for a folder of splits only.
- Beside ``DIR/Val/`` (capitalised: ``DIR/val/`` does not find it), the same refusal advised ``--data DIR/train``
  alone, the training split: ``Val`` is named with the others. MNIST's ``training/`` and ``testing/`` folders of PNGs
  were scored as two classes: they are splits too.
- ``pvtv2 detect --json`` of a mask_rcnn detector without pycocotools detected every image (and drew
  ``--output-dir``'s pictures) before failing with "COCO data and metrics needs pycocotools": it is refused before
  the first image, naming ``--json`` and the extra. The other detectors' JSON, and mask_rcnn's without --json, need
  no pycocotools (checked).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import TINY_SHALLOW, TINY_SMALL_IMAGES, perturb_
from pvtv2 import PvtV2Config, PvtV2ForImageClassification, PvtV2ImageProcessor
from pvtv2.cli import main


def _run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _image(path: Path, seed: int, size: tuple[int, int] = (16, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)


# ---------------------------------------------------------------------------------------------- resume
def _classification_data(root: Path) -> Path:
    seed = 0
    for split, count in (("train", 4), ("val", 2)):
        for label in ("a", "b"):
            for i in range(count):
                seed += 1
                _image(root / split / label / f"{i}.png", seed=seed)
    return root


def _one_epoch_of_two(tmp_path: Path, capsys, model: str) -> Path:
    """A 2-epoch run stopped after its first epoch (a finished 1-epoch run whose run.json asks for 2)."""
    out = tmp_path / "run"
    code, _, err = _run(capsys, "train", "--data", _classification_data(tmp_path / "data"), "--model", model,
                        "--output", out, "--epochs", 1, "--image-size", 16, "--batch-size", 4, "--lr", "3e-3",
                        "--warmup-epochs", 0, "--no-progress")
    assert code == 0, err
    stored = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**stored, "epochs": 2}))
    return out


@pytest.mark.parametrize("spelt", ["{}/", "{}/./", "{}/../pre"])
def test_a_run_resumes_when_its_model_typed_absolute_otherwise_spelt_is_gone(tmp_path, capsys, spelt):
    """Refused as "another run's checkpoint" (the state's '/x/pre/' against run.json's '/x/pre'); before the day's
    check it resumed. The resumed run ends at its second epoch, its first epoch's record kept."""
    torch.manual_seed(0)
    PvtV2ForImageClassification(PvtV2Config(**TINY_SMALL_IMAGES, num_labels=2)).save_pretrained(tmp_path / "pre")
    (tmp_path / "sub").mkdir()
    typed = spelt.format(tmp_path / ("sub" if ".." in spelt else "pre"))
    out = _one_epoch_of_two(tmp_path, capsys, typed)
    assert json.loads((out / "run.json").read_text())["model"] == str(tmp_path / "pre")
    assert torch.load(out / "last" / "training_state.pt", weights_only=True)["run"]["model"] == typed
    first = (out / "metrics.jsonl").read_text().splitlines()
    shutil.rmtree(tmp_path / "pre")
    code, _, err = _run(capsys, "train", "--output", out, "--resume", "--no-progress")
    assert code == 0, err
    records = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in records] == [1, 2] and records[0] == first[0]

    # Another absolute model recorded by the state is still another run's checkpoint.
    path = out / "last" / "training_state.pt"
    state = torch.load(path, weights_only=True)
    torch.save({**state, "epoch": 1, "run": {**state["run"], "model": str(tmp_path / "other") + "/"}}, path)
    code, _, err = _run(capsys, "train", "--output", out, "--resume", "--no-progress")
    assert code == 2 and "another run's checkpoint" in err and f"--model '{tmp_path / 'other'}/'" in err


# ---------------------------------------------------------------------------------------------- eval
@pytest.fixture
def vehicles(tmp_path) -> Path:
    """A three-class model (car, plane, train) saved with its preprocessing at 16 px."""
    torch.manual_seed(0)
    names = {0: "car", 1: "plane", 2: "train"}
    config = PvtV2Config(**TINY_SMALL_IMAGES, id2label=names, label2id={v: k for k, v in names.items()})
    perturb_(PvtV2ForImageClassification(config), scale=0.2).save_pretrained(tmp_path / "model")
    PvtV2ImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_a_class_named_train_with_images_in_sub_folders_beside_other_classes_is_evaluated(tmp_path, capsys, vehicles):
    files = {"car/0.png": 0, "plane/0.png": 1, "plane/1.png": 1, "train/freight/0.png": 2, "train/passenger/0.png": 2}
    for i, name in enumerate(files):
        _image(tmp_path / "data" / name, seed=i)
    code, out, err = _run(capsys, "eval", "--model", vehicles, "--data", tmp_path / "data", "--json", "--no-progress")
    assert code == 0, err
    result = json.loads(out)
    # By hand: the saved model over the saved preprocessing, the images in any order.
    model = PvtV2ForImageClassification.from_pretrained(vehicles).eval()
    processor = PvtV2ImageProcessor.from_pretrained(vehicles)
    pixels = processor([PIL.Image.open(tmp_path / "data" / name).convert("RGB") for name in files])["pixel_values"]
    with torch.no_grad():
        logits = model(pixels).logits
    labels = torch.tensor(list(files.values()))
    assert result["images"] == 5 and result["classes"] == 3
    assert result["top1"] == pytest.approx((logits.argmax(1) == labels).double().mean().item())
    assert result["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


def test_split_folders_beside_a_capitalised_val_name_it_and_splits_alone_are_still_refused(tmp_path, capsys,
                                                                                            vehicles):
    for split in ("Val", "train"):
        for i, name in enumerate(("car", "plane")):
            _image(tmp_path / "data" / split / name / "0.png", seed=i)
    code, out, err = _run(capsys, "eval", "--model", vehicles, "--data", tmp_path / "data", "--no-progress")
    assert code == 2 and out == ""
    assert f"--data {tmp_path / 'data' / 'Val'} or --data {tmp_path / 'data' / 'train'}" in err, err
    # The split named is a dataset of the model's classes.
    code, out, err = _run(capsys, "eval", "--model", vehicles, "--data", tmp_path / "data" / "Val", "--json",
                          "--no-progress")
    assert code == 0 and json.loads(out)["images"] == 2, err
    # MNIST's PNG folders: training/ and testing/ (scored as two classes before).
    for split in ("training", "testing"):
        for i, name in enumerate(("car", "plane")):
            _image(tmp_path / "mnist" / split / name / "0.png", seed=i)
    code, out, err = _run(capsys, "eval", "--model", vehicles, "--data", tmp_path / "mnist", "--no-progress")
    assert code == 2 and f"--data {tmp_path / 'mnist' / 'testing'} or --data {tmp_path / 'mnist' / 'training'}" in err
    # A hidden folder beside the splits is no class: still splits alone.
    (tmp_path / "data" / ".cache" / "x").mkdir(parents=True)
    code, _, err = _run(capsys, "eval", "--model", vehicles, "--data", tmp_path / "data", "--no-progress")
    assert code == 2 and "no val/ folder" in err


# ---------------------------------------------------------------------------------------------- detect --json
def _tiny_detector(folder: Path, detector: str) -> None:
    torch.manual_seed(0)
    from pvtv2 import PvtV2ForObjectDetection

    config = PvtV2Config(**TINY_SHALLOW, id2label={0: "a", 1: "b"}, detector=detector, min_size=64, max_size=64,
                         score_threshold=0.0, fpn_channels=16)
    model = perturb_(PvtV2ForObjectDetection(config), scale=0.05).eval()
    if detector == "retinanet":
        with torch.no_grad():  # no 1% prior: scores around 0.5, so that the threshold keeps some detections
            model.detector.head.classification_head.cls_logits.bias.zero_()
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def detectors(tmp_path_factory) -> Path:
    pytest.importorskip("torchvision")
    pytest.importorskip("pycocotools")
    root = tmp_path_factory.mktemp("detectors")
    for kind in ("retinanet", "mask_rcnn"):
        _tiny_detector(root / kind, kind)
    _image(root / "a.png", seed=0, size=(48, 64))
    return root


def _without_pycocotools(monkeypatch) -> None:
    for name in [n for n in sys.modules if n == "pycocotools" or n.startswith("pycocotools.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)


def test_detect_json_of_mask_rcnn_without_pycocotools_is_refused_before_detecting(detectors, capsys, monkeypatch,
                                                                                    tmp_path):
    import pvtv2.inference

    with_it = _run(capsys, "detect", "--model", detectors / "retinanet", detectors / "a.png", "--json",
                   "--score-threshold", 0.3, "--no-progress")
    _without_pycocotools(monkeypatch)
    # RetinaNet's JSON needs no pycocotools: the same output.
    without = _run(capsys, "detect", "--model", detectors / "retinanet", detectors / "a.png", "--json",
                   "--score-threshold", 0.3, "--no-progress")
    assert without[:2] == with_it[:2] and with_it[0] == 0 and json.loads(with_it[1])[0]["detections"]
    calls = []
    detect = pvtv2.inference.detect_objects
    monkeypatch.setattr(pvtv2.inference, "detect_objects", lambda *a, **k: calls.append(1) or detect(*a, **k))
    # mask_rcnn without --json draws and prints its objects.
    code, out, err = _run(capsys, "detect", "--model", detectors / "mask_rcnn", detectors / "a.png", "--no-progress")
    assert code == 0 and "object(s)" in out and calls == [1], err
    code, out, err = _run(capsys, "detect", "--model", detectors / "mask_rcnn", detectors / "a.png", "--json",
                          "--output-dir", tmp_path / "pictures", "--no-progress")
    assert code == 2 and out == "" and calls == [1] and not (tmp_path / "pictures").exists()
    assert "detect --json" in err and "pip install 'pvtv2[detection]'" in err, err


# ---------------------------------------------------------------------------------------------- crops
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_training_crops_are_torchvisions_resized_crop_of_the_same_box(interpolation):
    """The crop cut out, then resized, for boxes drawn over odd image sizes, crops smaller and larger than the output
    (torchvision's resized_crop on the PIL image, as timm's RandomResizedCropAndInterpolation calls it)."""
    tv = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode

    from pvtv2.data.folders import TrainTransform

    rng = np.random.default_rng(36)
    for trial in range(40):
        width, height, size = int(rng.integers(3, 120)), int(rng.integers(3, 120)), int(rng.integers(1, 48))
        image = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        transform = TrainTransform(size=size, hflip=0.0, interpolation=interpolation, mean=(0, 0, 0), std=(1, 1, 1))
        left, top, w, h = transform.crop_box(width, height, np.random.default_rng(trial))
        ours = transform(image, np.random.default_rng(trial))
        theirs = tv.resized_crop(image, top, left, h, w, [size, size], InterpolationMode(interpolation))
        expected = torch.from_numpy(np.asarray(theirs, dtype=np.float32) / 255).permute(2, 0, 1)
        assert torch.allclose(ours, expected, rtol=0, atol=1e-6), (width, height, size, (left, top, w, h))
