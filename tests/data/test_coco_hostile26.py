"""COCO detection data and metrics, hostile pass 26: an annotation file with every irregularity COCO allows (category
ids from 0, unsorted, with gaps; compressed and uncompressed RLE and polygon masks; a crowd region; a zero-width box;
a box outside its image; annotations without 'iscrowd' or 'area'; file names in subfolders; an image without
objects; an image stored sideways with an EXIF orientation) scored through ``evaluate_detector`` and by pycocotools'
COCOeval run directly on the file, and ``detections_to_coco`` against a closed form and its malformed inputs.

References: pycocotools' COCO / COCOeval on JSON files (with COCO's own defaults filled in by hand for the fields the
file leaves out), and the conversion written out by hand."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("pycocotools")
pytest.importorskip("torchvision")

import pycocotools.mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from pvtv2 import PvtV2Config  # noqa: E402
from pvtv2.data.coco import BOX_METRICS, CocoDetection, detections_to_coco  # noqa: E402
from pvtv2.inference import evaluate_detector  # noqa: E402

# (height, width) as shown (upright); image 2 is stored sideways with EXIF orientation 6
SIZES = [(60, 80), (70, 50), (64, 64), (40, 56)]
CATEGORIES = [{"id": 5, "name": "five"}, {"id": 0, "name": "zero"}, {"id": 2, "name": "two"}]


def box_mask(height: int, width: int, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y1:y2, x1:x2] = 1
    return mask


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major runs, zeros first, written out by hand."""
    flat = mask.flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat[0] == 1:
        runs = [0, *runs]
    return {"size": list(mask.shape), "counts": [int(r) for r in runs]}


def write_hostile(root: Path) -> tuple[dict, list[dict]]:
    """The split ``val`` under ``root``: each image a constant colour whose red channel is its index (an EXIF turn
    keeps it), in the subfolder ``a/b/``."""
    images = [{"id": 100 - 7 * i, "file_name": f"a/b/im{i}.png", "height": h, "width": w} for i, (h, w) in enumerate(SIZES)]
    (root / "annotations").mkdir(parents=True)
    (root / "val" / "a" / "b").mkdir(parents=True)
    for i, image in enumerate(images):
        pixels = np.full((image["height"], image["width"], 3), (i, 90, 180), dtype=np.uint8)
        picture = PIL.Image.fromarray(pixels)
        if i == 2:  # stored turned by 90 degrees; orientation 6 turns it back when shown
            picture = picture.transpose(PIL.Image.Transpose.ROTATE_90)
            exif = PIL.Image.Exif()
            exif[0x0112] = 6
            picture.save(root / "val" / image["file_name"], exif=exif)
        else:
            picture.save(root / "val" / image["file_name"])
    ids = [image["id"] for image in images]
    annotations = [
        # no 'area' and no 'iscrowd': COCO's defaults (the mask's pixels, not a crowd)
        {"id": 1, "image_id": ids[0], "category_id": 0, "bbox": [10, 10, 20, 20],
         "segmentation": compressed_rle(box_mask(60, 80, 10, 10, 30, 30))},
        {"id": 2, "image_id": ids[0], "category_id": 5, "bbox": [40, 5, 30, 40], "iscrowd": 0, "area": 1200,
         "segmentation": [[40, 5, 70, 5, 70, 45, 40, 45]]},
        {"id": 3, "image_id": ids[0], "category_id": 2, "bbox": [70, 50, 30, 30], "iscrowd": 0,  # reaches outside
         "segmentation": [[70, 50, 80, 50, 80, 60, 70, 60]]},
        {"id": 4, "image_id": ids[1], "category_id": 5, "bbox": [0, 0, 50, 70], "iscrowd": 1, "area": 3500,
         "segmentation": compressed_rle(box_mask(70, 50, 0, 0, 50, 70))},  # a crowd region over the whole image
        {"id": 5, "image_id": ids[1], "category_id": 0, "bbox": [5, 5, 10, 10], "iscrowd": 0, "area": 100,
         "segmentation": uncompressed_rle(box_mask(70, 50, 5, 5, 15, 15))},
        {"id": 6, "image_id": ids[1], "category_id": 2, "bbox": [20, 30, 0, 10],  # no width
         "segmentation": [[20, 30, 21, 30, 21, 40, 20, 40]]},
        {"id": 7, "image_id": ids[2], "category_id": 2, "bbox": [8, 4, 40, 50], "iscrowd": 0, "area": 2000,
         "segmentation": [[8, 4, 48, 4, 48, 54, 8, 54]]},  # in the upright image's pixels
    ]  # image 3 has no objects
    data = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (root / "annotations" / "instances_val.json").write_text(json.dumps(data))
    return data, images


def reference_file(data: dict, path: Path) -> Path:
    """The file with COCO's defaults written in (pycocotools reads 'iscrowd' and 'area' without a default)."""
    data = copy.deepcopy(data)
    sizes = {image["id"]: (image["height"], image["width"]) for image in data["images"]}
    for ann in data["annotations"]:
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            height, width = sizes[ann["image_id"]]
            segmentation = ann["segmentation"]
            if isinstance(segmentation, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
            elif isinstance(segmentation["counts"], list):
                rle = mask_utils.frPyObjects(segmentation, height, width)
            else:
                rle = segmentation
            ann["area"] = float(mask_utils.area(rle))
    path.write_text(json.dumps(data))
    return path


class Oracle(torch.nn.Module):
    """A stand-in Mask R-CNN answering given detections per image, found by the image's red value."""

    def __init__(self, answers: dict[int, dict[str, torch.Tensor]], id2label: dict[int, str]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.answers = answers
        self.seen: dict[int, tuple[int, ...]] = {}
        self.config = PvtV2Config(depths=[1, 1, 1, 1], id2label=id2label, detector="mask_rcnn")

    def forward(self, images):
        found = []
        for image in images:
            index = round(float(image[0].mean()) * 255)
            self.seen[index] = tuple(image.shape)
            found.append(self.answers[index])
        return found


def answer(height: int, width: int, boxes: list, labels: list, scores: list) -> dict[str, torch.Tensor]:
    masks = torch.zeros(len(boxes), 1, height, width)
    for n, (x1, y1, x2, y2) in enumerate(boxes):
        masks[n, 0, round(y1):round(y2), round(x1):round(x2)] = 0.8
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels),
            "scores": torch.tensor(scores), "masks": masks}


def test_metrics_on_a_hostile_file_are_cocoevals_on_the_file(tmp_path):
    data, images = write_hostile(tmp_path)
    dataset = CocoDetection(tmp_path, "val")
    assert dataset.annotations.category_ids == [0, 2, 5]
    assert dataset.id2label == {0: "zero", 1: "two", 2: "five"}
    # labels: zero 0, two 1, five 2. Hits, near misses, a wrong class, a detection on the crowd region (ignored), a
    # false positive on the empty image, and the sideways image's object found in its upright pixels.
    answers = {
        0: answer(60, 80, [[10, 10, 30, 30], [42, 8, 69, 44], [70, 50, 80, 60], [0, 0, 9, 9]], [0, 2, 1, 0],
                  [0.9, 0.7, 0.6, 0.95]),
        1: answer(70, 50, [[2, 2, 48, 68], [5, 6, 15, 15], [20, 30, 22, 40]], [2, 1, 1], [0.99, 0.5, 0.4]),
        2: answer(64, 64, [[8, 4, 48, 54], [4, 8, 54, 48]], [1, 1], [0.8, 0.85]),
        3: answer(40, 56, [[3, 3, 20, 20]], [2], [0.3]),
    }
    oracle = Oracle(answers, dataset.id2label)
    ours = evaluate_detector(oracle, tmp_path, batch_size=3)
    assert oracle.seen[2] == (3, 64, 64) and oracle.seen[1] == (3, 70, 50)  # upright, as the file's sizes say

    entries = detections_to_coco([answers[i] for i in range(4)], [image["id"] for image in images], [0, 2, 5])
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(reference_file(data, tmp_path / "reference.json")))
        for iou_type, key in (("bbox", "box"), ("segm", "mask")):
            # mask results without boxes: each detection's size from its mask (docs/detection.md)
            results = [{k: v for k, v in e.items() if not (iou_type == "segm" and k == "bbox")} for e in entries]
            evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
            evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
            assert [ours[key][name] for name in BOX_METRICS] == pytest.approx(list(evaluator.stats), abs=1e-12), key
            assert 0.2 < ours[key]["AP"] < 0.9, key  # neither trivial nor perfect
    assert ours["images"] == 4 and ours["annotations"] == 7 and ours["detections"] == 10


# ---------------------------------------------------------------------------------------------- detections_to_coco
def test_detections_to_coco_is_the_closed_form():
    mask = torch.zeros(3, 1, 20, 30)
    mask[0, 0, 2:9, 3:12] = 0.7
    mask[1, 0, 0:20, 0:30] = 0.5  # exactly the threshold: in
    mask[2, 0, 5:6, 5:6] = 0.49  # below: an empty mask
    output = {"boxes": torch.tensor([[3.0, 2.0, 12.5, 9.0], [0.0, 0.0, 30.0, 20.0], [5.0, 5.0, 6.0, 6.0]]),
              "labels": torch.tensor([2, 0, 1]), "scores": torch.tensor([0.2, 0.9, 0.5]), "masks": mask}
    entries = detections_to_coco([output], [7], [11, 3, 40])
    assert [(e["image_id"], e["category_id"], e["score"]) for e in entries] == [
        (7, 40, pytest.approx(0.2)), (7, 11, pytest.approx(0.9)), (7, 3, pytest.approx(0.5))]  # the model's order
    assert [e["bbox"] for e in entries] == [[3.0, 2.0, 9.5, 7.0], [0.0, 0.0, 30.0, 20.0], [5.0, 5.0, 1.0, 1.0]]
    decoded = [mask_utils.decode({"size": e["segmentation"]["size"], "counts": e["segmentation"]["counts"].encode()})
               for e in entries]
    assert [int(d.sum()) for d in decoded] == [63, 600, 0]
    assert np.array_equal(decoded[0], (mask[0, 0] >= 0.5).numpy().astype(np.uint8))
    # a mapping leaves out labels it lacks
    assert [e["category_id"] for e in detections_to_coco([output], [7], {0: 11, 2: 40})] == [40, 11]


def _output(**changes) -> dict[str, torch.Tensor]:
    output = {"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0], [2.0, 2.0, 8.0, 9.0]]), "labels": torch.tensor([0, 1]),
              "scores": torch.tensor([0.9, 0.8]), "masks": torch.zeros(2, 1, 10, 12)}
    output.update(changes)
    return output


@pytest.mark.parametrize("changes, message", [
    # a negative label took the last category through Python's negative indexing: a wrong category, no error
    (dict(labels=torch.tensor([-1, 0])), "label -1"),
    (dict(labels=torch.tensor([0, 2])), "label 2"),
    # more scores than boxes: zip dropped the extra ones without a word
    (dict(scores=torch.tensor([0.9, 0.8, 0.7])), "3 scores"),
    (dict(labels=torch.tensor([0])), "1 labels"),
    # (N, H, W) masks: the first row of each was taken as its mask ("'NoneType' object is not subscriptable")
    (dict(masks=torch.zeros(2, 10, 12)), "(N, 1, H, W)"),
    (dict(masks=torch.zeros(1, 1, 10, 12)), "1 masks"),
    (dict(boxes=torch.tensor([1.0, 1.0, 5.0, 5.0])), "(N, 4)"),
])
def test_malformed_detections_are_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        detections_to_coco([_output(**changes)], [3], [10, 20])
