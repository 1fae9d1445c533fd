"""`pvtv2 eval --task detection` on COCO files whose categories share a name: the model's labels reach the right
category ids (COCOeval run directly on the same detections is the reference), or the ambiguity is an error.
`pvtv2 eval --task segmentation` against a hand-computed mean IoU for 8-bit, palette and 16-bit masks, and a
truncated mask named."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from pvtv2 import PvtV2Config  # noqa: E402
from pvtv2.data.coco import read_coco_annotations  # noqa: E402
from pvtv2.inference import detection_label_map, load_detector  # noqa: E402
from pvtv2.models.detection import PvtV2ForObjectDetection  # noqa: E402

from conftest import TINY_SHALLOW, perturb_  # noqa: E402

# Two categories named alike (COCO files merged from two sources), ids with gaps.
CATEGORIES = [{"id": 1, "name": "sign"}, {"id": 4, "name": "sign"}, {"id": 90, "name": "car"}]


def run_here(capsys, *args: str) -> subprocess.CompletedProcess:
    from pvtv2.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


def _data(root: Path) -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / "val").mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(3):
        PIL.Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(root / "val" / f"{i}.png")
        images.append({"id": 10 + i, "file_name": f"{i}.png", "width": 64, "height": 48})
        for j, category in enumerate((1, 4, 90)):
            x, y = 4 + 18 * j, 6 + 10 * i
            annotations.append({"id": len(annotations) + 1, "image_id": 10 + i, "category_id": category,
                                "bbox": [x, y, 16, 14], "area": 224.0, "iscrowd": 0})
    (root / "annotations" / "instances_val.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return root


def test_a_model_trained_on_the_file_maps_shared_names_by_position_and_other_models_are_refused(tmp_path):
    annotations = read_coco_annotations(_data(tmp_path) / "annotations" / "instances_val.json")
    # The classes a training run on this file gives the model (pvtv2 train reads id2label from the file).
    assert detection_label_map(annotations.id2label, annotations) == {0: 1, 1: 4, 2: 90}
    # Generic labels, as many as categories: id order too.
    assert detection_label_map({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, annotations) == {0: 1, 1: 4, 2: 90}
    # Another model naming "sign": which of ids 1 and 4? An error, not every "sign" detection scored as id 1.
    with pytest.raises(ValueError, match=r"instances_val.json.*several categories with the same name.*'sign': ids \[1, 4\]"):
        detection_label_map({0: "car", 1: "sign"}, annotations)
    # A model whose names are all unique in the file maps by name.
    assert detection_label_map({0: "car", 1: "bus"}, annotations) == {0: 90}


def test_eval_detection_with_shared_category_names_equals_cocoeval_on_files(tmp_path, capsys):
    data = _data(tmp_path / "data")
    annotations = read_coco_annotations(data / "annotations" / "instances_val.json")
    torch.manual_seed(0)
    config = PvtV2Config(**TINY_SHALLOW, id2label=annotations.id2label, detector="retinanet", min_size=64,
                         max_size=96, score_threshold=0.0, fpn_channels=32)
    model = perturb_(PvtV2ForObjectDetection(config), scale=0.05, seed=0).eval()
    with torch.no_grad():  # no 1% prior: scores near 0.5, so every class keeps detections
        model.detector.head.classification_head.cls_logits.bias.zero_()
    model.save_pretrained(tmp_path / "model")
    out = run_here(capsys, "eval", "--task", "detection", "--model", str(tmp_path / "model"), "--data", str(data),
                   "--json", "--no-progress")
    assert out.returncode == 0, out.stderr
    ours = json.loads(out.stdout)
    # The reference: each image through the model, label k written as the k-th category id by hand, COCOeval on files.
    loaded = load_detector(tmp_path / "model")
    entries = []
    for image in annotations.images:
        pixels = np.asarray(PIL.Image.open(data / "val" / image["file_name"]).convert("RGB"), dtype=np.float32) / 255
        with torch.no_grad():
            result = loaded([torch.from_numpy(pixels).permute(2, 0, 1)])[0]
        for (x1, y1, x2, y2), label, score in zip(result["boxes"].tolist(), result["labels"].tolist(),
                                                  result["scores"].tolist()):
            entries.append({"image_id": image["id"], "category_id": [1, 4, 90][label],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    assert {e["category_id"] for e in entries} == {1, 4, 90}
    (tmp_path / "results.json").write_text(json.dumps(entries))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(data / "annotations" / "instances_val.json"))
        evaluator = COCOeval(coco, coco.loadRes(str(tmp_path / "results.json")), "bbox")
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    assert [ours["box"][n] for n in names] == pytest.approx([float(v) for v in evaluator.stats], abs=1e-6)
    assert ours["detections"] == len(entries)


# ---------------------------------------------------------------------------------------------- segmentation
@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    from pvtv2 import PvtV2ForSemanticSegmentation

    folder = tmp_path_factory.mktemp("segmenter")
    torch.manual_seed(0)
    model = PvtV2ForSemanticSegmentation(PvtV2Config(**TINY_SHALLOW, num_labels=4, decoder_hidden_size=32))
    perturb_(model, scale=0.05, seed=0).eval().save_pretrained(folder)
    return folder


def _segmentation_data(root: Path, write_mask) -> Path:
    rng = np.random.default_rng(1)
    for folder in ("images", "masks"):
        (root / "val" / folder).mkdir(parents=True)
    for i in range(2):
        PIL.Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "val" / "images" / f"{i}.png")
        labels = rng.integers(0, 3, (40, 56)).astype(np.uint8)  # class 3 in neither labels (nor, likely, predictions)
        labels[:6] = 255  # ignored
        write_mask(labels, root / "val" / "masks" / f"{i}.png")
    return root


def _palette(labels, path):
    image = PIL.Image.fromarray(labels, "P")
    image.putpalette([v for i in range(256) for v in ((37 * i) % 256, (91 * i) % 256, (11 * i) % 256)])
    image.save(path)


@pytest.mark.parametrize("write_mask", [
    lambda labels, path: PIL.Image.fromarray(labels).save(path),  # 8-bit greyscale
    _palette,  # palette PNG: the indices are the classes, whatever the colours
    lambda labels, path: PIL.Image.fromarray(labels.astype(np.uint16)).save(path),  # 16-bit
], ids=["L", "P", "I16"])
def test_eval_segmentation_equals_a_hand_computed_mean_iou(tmp_path, capsys, segmenter, write_mask):
    from pvtv2.inference import load_segmenter, predict_segmentation

    data = _segmentation_data(tmp_path, write_mask)
    out = run_here(capsys, "eval", "--task", "segmentation", "--model", str(segmenter), "--data", str(data), "--json",
                   "--no-progress")
    assert out.returncode == 0, out.stderr
    ours = json.loads(out.stdout)
    model = load_segmenter(segmenter)
    intersection, union, correct, counted = np.zeros(4), np.zeros(4), 0, 0
    for i in range(2):
        raw = np.asarray(PIL.Image.open(data / "val" / "masks" / f"{i}.png")).astype(np.int64)
        labels = raw if raw.ndim == 2 else raw[..., 0]
        predicted = predict_segmentation(model, PIL.Image.open(data / "val" / "images" / f"{i}.png").convert("RGB"))
        keep = labels != 255
        for c in range(4):
            intersection[c] += ((labels == c) & (predicted == c) & keep).sum()
            union[c] += (((labels == c) | (predicted == c)) & keep).sum()
        correct += ((labels == predicted) & keep).sum()
        counted += keep.sum()
    present = union > 0
    assert ours["mean_iou"] == pytest.approx(float((intersection[present] / union[present]).mean()), abs=1e-12)
    assert ours["pixel_accuracy"] == pytest.approx(correct / counted, abs=1e-12)
    for c, name in enumerate(json.loads((segmenter / "config.json").read_text())["id2label"].values()):
        expected = None if not present[c] else pytest.approx(intersection[c] / union[c], abs=1e-12)
        assert ours["per_class_iou"][name] == expected


def test_eval_segmentation_names_a_truncated_mask(tmp_path, capsys, segmenter):
    def truncated(labels, path):
        PIL.Image.fromarray(labels).save(path)
        path.write_bytes(path.read_bytes()[:60])

    data = _segmentation_data(tmp_path, truncated)
    out = run_here(capsys, "eval", "--task", "segmentation", "--model", str(segmenter), "--data", str(data),
                   "--no-progress")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"pvtv2 eval: error: cannot read mask {str(data / 'val' / 'masks' / '0.png')!r}: image file is truncated")
