"""Hostile inputs to `pvtv2 eval --task detection` and `pvtv2 detect` (round 27)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

from conftest import TINY_SHALLOW, perturb_

from pvtv2 import PvtV2Config
from pvtv2.cli import main
from pvtv2.models.detection import PvtV2ForObjectDetection


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    """A saved FCOS detector with every weight set (random but not freshly initialised), one class 'square'."""
    torch.manual_seed(0)
    config = PvtV2Config(**TINY_SHALLOW, id2label={0: "square"}, detector="fcos", min_size=64, max_size=107,
                         fpn_channels=64)
    path = tmp_path_factory.mktemp("det") / "model"
    perturb_(PvtV2ForObjectDetection(config), 0.02).save_pretrained(path)
    return path


def _data(root: Path, annotations: list[dict], crowd: bool = False) -> Path:
    (root / "val").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    images = []
    for i in range(2):
        PIL.Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "val" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 64, "height": 48})
    data = {"images": images, "annotations": annotations, "categories": [{"id": 4, "name": "square"}]}
    (root / "annotations" / "instances_val.json").write_text(json.dumps(data))
    return root


@pytest.mark.parametrize("annotations", [
    [],  # no annotation at all
    [{"id": 1, "image_id": 1, "category_id": 4, "bbox": [2, 2, 30, 30], "iscrowd": 1,
      "segmentation": {"size": [48, 64], "counts": [2 * 48 + 2, 30 * 48 - 2 * 48 - 2 + 48 * 64 - 30 * 48]}}],
], ids=["empty", "crowd-only"])
def test_eval_on_a_file_without_objects_is_a_clear_error_not_ap_minus_one(tmp_path, capsys, detector, annotations):
    """COCOeval gives -1 for every number when there is nothing to find (no annotation, or crowd regions only):
    `pvtv2 eval` printed "box AP -1.0000" and exited 0. Training refuses such a validation file; so does eval."""
    data = _data(tmp_path / "d", annotations)
    code = main(["eval", "--task", "detection", "--model", str(detector), "--data", str(data), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2, captured.out
    assert "no objects" in captured.err and "instances_val.json" in captured.err, captured.err
    assert "-1.0000" not in captured.out


def _detect(capsys, detector: Path, *images: Path) -> list[dict]:
    assert main(["detect", "--model", str(detector), *map(str, images), "--json", "--no-progress",
                 "--score-threshold", "0"]) == 0
    return json.loads(capsys.readouterr().out)


def test_detect_reads_grey_rgba_16_bit_and_exif_rotated_images_as_their_upright_8_bit_rgb(tmp_path, capsys, detector):
    """Each file holds the same picture as a plain RGB PNG (a photograph, sklearn's, cropped): detections must be
    those of that PNG, boxes in the upright image's pixels (EXIF orientation 6: stored turned a quarter)."""
    datasets = pytest.importorskip("sklearn.datasets")
    photo = datasets.load_sample_images().images[0][100:172:, 200:296]  # (72, 96, 3) uint8
    grey = photo.mean(axis=2).round().astype(np.uint8)
    files = {
        "rgb": (photo, PIL.Image.fromarray(photo)),
        "rgba": (photo, PIL.Image.fromarray(np.dstack([photo, np.full(grey.shape, 255, np.uint8)]))),
        "grey": (np.dstack([grey] * 3), PIL.Image.fromarray(grey)),
        "grey16": (np.dstack([grey] * 3), PIL.Image.fromarray(grey.astype(np.uint16) * 257)),
    }
    stored = PIL.Image.fromarray(np.ascontiguousarray(np.rot90(photo, 1)))  # orientation 6 turns it back upright
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "exif.png", exif=exif)
    paths = {}
    for name, (reference, picture) in files.items():
        picture.save(tmp_path / f"{name}.png")
        PIL.Image.fromarray(reference).save(tmp_path / f"{name}-reference.png")
        paths[name] = tmp_path / f"{name}.png"
    assert PIL.Image.open(paths["grey16"]).mode.startswith("I")
    for name, path in [*paths.items(), ("exif", tmp_path / "exif.png")]:
        reference = tmp_path / ("rgb-reference.png" if name == "exif" else f"{name}-reference.png")
        ours, theirs = _detect(capsys, detector, path, reference)
        assert ours["detections"] and ours["detections"] == theirs["detections"], name
        assert (ours["width"], ours["height"]) == (96, 72), name


def test_eval_data_reads_exif_rotated_and_16_bit_images_upright_under_their_boxes(tmp_path):
    """The boxes of an annotation file are of the upright image (as shown, as detectron2 and mmdetection read it):
    the white square they name must be white in what the evaluation feeds the detector."""
    from pvtv2.data.coco import CocoDetection

    up = np.zeros((80, 60, 3), np.uint8)
    up[10:30, 5:25] = 255  # upright: 60 wide, 80 high; the square at x 5..25, y 10..30
    (tmp_path / "val").mkdir()
    (tmp_path / "annotations").mkdir()
    stored = PIL.Image.fromarray(np.ascontiguousarray(np.rot90(up, 1)))  # 80 wide, 60 high as stored
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "val" / "a.png", exif=exif)
    PIL.Image.fromarray(up[..., 0].astype(np.uint16) * 257).save(tmp_path / "val" / "b.png")
    images = [{"id": n + 1, "file_name": f, "width": 60, "height": 80} for n, f in enumerate(["a.png", "b.png"])]
    annotations = [{"id": n + 1, "image_id": n + 1, "category_id": 1, "bbox": [5, 10, 20, 20], "iscrowd": 0}
                   for n in range(2)]
    (tmp_path / "annotations" / "instances_val.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "square"}]}))
    data = CocoDetection(tmp_path, "val")
    for i in range(2):
        image, target = data[i]
        assert image.shape == (3, 80, 60)
        assert target["boxes"].tolist() == [[5.0, 10.0, 25.0, 30.0]]
        assert torch.equal(image, torch.from_numpy(up).permute(2, 0, 1).float() / 255)


def test_detect_reports_an_image_too_thin_for_the_encoder_by_name_and_goes_on(tmp_path, capsys, detector):
    """A 3 x 600 strip (shorter side 3 px; resized to the longer side's cap it is 1 px tall) stopped the whole command
    with "the input is too small for this model" naming no file, and the other images' detections were lost.
    Reported as unreadable images are: by name, the rest detected (as alone), exit status 2."""
    PIL.Image.fromarray(np.zeros((3, 600, 3), np.uint8)).save(tmp_path / "thin.png")
    photo = np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    PIL.Image.fromarray(photo).save(tmp_path / "photo.png")
    alone = _detect(capsys, detector, tmp_path / "photo.png")[0]
    code = main(["detect", "--model", str(detector), str(tmp_path / "thin.png"), str(tmp_path / "photo.png"), "--json",
                 "--no-progress", "--score-threshold", "0", "--batch-size", "2"])
    captured = capsys.readouterr()
    assert code == 2
    thin, rest = json.loads(captured.out)
    assert "thin.png" in thin["image"] and "too small" in thin["error"]
    assert rest["detections"] == alone["detections"]
    assert "thin.png" in captured.err


def test_eval_names_the_file_of_an_image_too_small_for_the_encoder(tmp_path, capsys, detector):
    """The evaluation stops on such an image (a COCO score needs every image), but it said only "the input is too
    small for this model", not which of the split's images."""
    data = _data(tmp_path / "d", [{"id": 1, "image_id": 1, "category_id": 4, "bbox": [2, 2, 30, 30], "iscrowd": 0}])
    PIL.Image.fromarray(np.zeros((3, 600, 3), np.uint8)).save(data / "val" / "1.png")
    listing = json.loads((data / "annotations" / "instances_val.json").read_text())
    listing["images"][1].update(width=600, height=3)
    (data / "annotations" / "instances_val.json").write_text(json.dumps(listing))
    code = main(["eval", "--task", "detection", "--model", str(detector), "--data", str(data), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "too small" in err and "1.png" in err, err


def test_detect_score_threshold_below_the_saved_one_shows_those_scores(tmp_path, capsys, detector):
    """`--score-threshold 0` showed only scores of at least 0.05: the detector's own threshold (the config's
    score_threshold, mmdetection's test setting) dropped the rest first, without a word. The reference: the model
    run here with its threshold at 0, filtered at 0.02."""
    from pvtv2.data.coco import image_to_tensor
    from pvtv2.data.processing import load_image

    photo = np.random.default_rng(3).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    PIL.Image.fromarray(photo).save(tmp_path / "p.png")
    # no cap on the count; FCOS's scores sqrt(sigmoid(class) x sigmoid(centre-ness)) around 0.035
    model = PvtV2ForObjectDetection.from_pretrained(detector, detections_per_image=1000)
    assert model.config.score_threshold == 0.05
    with torch.no_grad():
        model.detector.head.classification_head.cls_logits.bias.fill_(-6.0)
    model.save_pretrained(tmp_path / "low")
    model = PvtV2ForObjectDetection.from_pretrained(tmp_path / "low", score_threshold=0.0).eval()
    with torch.no_grad():
        out = model([image_to_tensor(load_image(tmp_path / "p.png"))])[0]
    expected = sorted(round(float(s), 4) for s in out["scores"] if s >= 0.02)
    assert min(expected) < 0.05 and len(expected) < 1000  # the case at hand: scores below 0.05, under the cap
    assert main(["detect", "--model", str(tmp_path / "low"), str(tmp_path / "p.png"), "--json", "--no-progress",
                 "--score-threshold", "0.02"]) == 0
    shown = sorted(d["score"] for d in json.loads(capsys.readouterr().out)[0]["detections"])
    assert shown == pytest.approx(expected, abs=2e-4)


def test_detect_objects_says_when_its_threshold_is_below_the_detectors_own(tmp_path, caplog, detector):
    """The Python function has no say over the loaded model's threshold: asked for 0.01 of a model that drops
    scores below 0.05, it is told so (the command sets the model's threshold itself, above)."""
    from pvtv2.inference import detect_objects, load_detector

    PIL.Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "p.png")
    model = load_detector(detector)
    with caplog.at_level("WARNING", logger="pvtv2.inference"):
        detect_objects(model, [tmp_path / "p.png"], score_threshold=0.01)
    assert "score_threshold=0.01" in caplog.text and "0.05" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pvtv2.inference"):
        detect_objects(model, [tmp_path / "p.png"], score_threshold=0.3)
    assert "score_threshold" not in caplog.text
