"""Audit of detection (round 27): data, training and evaluation defects, each checked against something independent
(the annotation file's own content, pycocotools' COCOeval run here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

from pvtv2.cli import main  # noqa: E402
from pvtv2.data.coco import CocoDetection  # noqa: E402


def _write(root: Path, split: str, boxes: list[list[int]], masks: bool, size: int = 64) -> None:
    """One white square per image on dark noise, category id 7, with (``masks``) or without its polygon."""
    rng = np.random.default_rng(len(split))
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for i, (x, y, w, h) in enumerate(boxes):
        pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        pixels[y : y + h, x : x + w] = 255
        ann = {"id": i + 1, "image_id": i + 1, "category_id": 7, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
        if masks:
            ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        annotations.append(ann)
        PIL.Image.fromarray(pixels).save(root / split / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": size, "height": size})
    data = {"images": images, "annotations": annotations, "categories": [{"id": 7, "name": "square"}]}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


def test_mask_training_on_boxes_without_any_mask_is_refused(tmp_path, capsys):
    """Box-only COCO data given to Mask R-CNN: every object was left out of training (objects without a mask are),
    so the detector trained on images it was told were empty, and the run ended with exit 0, a box AP and a log
    warning. The annotation file holds 3 objects and no mask: refused, naming the problem and the way out."""
    _write(tmp_path / "d", "train", [[5, 5, 20, 20], [30, 10, 25, 25], [10, 30, 20, 30]], masks=False)
    _write(tmp_path / "d", "val", [[8, 8, 20, 20]], masks=False)
    with pytest.raises(ValueError, match="no mask"):
        CocoDetection(tmp_path / "d", "train", masks=True)
    # the same file without masks=True is fine: 3 objects for box training
    assert sum(len(CocoDetection(tmp_path / "d", "train")[i][1]["boxes"]) for i in range(3)) == 3
    out = tmp_path / "run"
    code = main(["train", "--task", "detection", "--detector", "mask_rcnn", "--model", "tiny", "--image-size", "64",
                 "--data", str(tmp_path / "d"), "--output", str(out), "--epochs", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "no mask" in err and "faster_rcnn" in err, err
    assert not (out / "last").exists()
