"""Seeded random search over COCO-format data (pass 32): random annotation files (category ids with gaps and out of
order, images without objects, polygons of several parts, uncompressed and compressed RLE, boxes without area or
reaching outside their image, crowd regions, missing masks and areas) read by ``CocoDetection``, against
pycocotools' own reading (``COCO.annToMask``, ``annToRLE``, the box arithmetic and the documented skips written out
here); random detections through ``detections_to_coco`` and ``coco_evaluate``, against results written by hand and
``COCOeval`` run directly on the file; and the hostile files the search found a raw traceback or a hang for."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from pvtv2 import PvtV2Config  # noqa: E402
from pvtv2.cli import main  # noqa: E402
from pvtv2.data.coco import (  # noqa: E402
    BOX_METRICS,
    CocoDetection,
    coco_evaluate,
    detections_to_coco,
    read_coco_annotations,
)
from pvtv2.inference import evaluate_detector  # noqa: E402


# ---------------------------------------------------------------------------------------------- random files
def _runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts, by hand: column-major runs, zeros first."""
    flat = mask.flatten(order="F").astype(np.int64)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return [int(edges[0])] + np.diff(edges).tolist()


def _random_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(0, 3)):
        x1, y1 = rng.integers(0, w), rng.integers(0, h)
        mask[y1 : rng.integers(y1, h + 1), x1 : rng.integers(x1, w + 1)] = 1
    if rng.random() < 0.3:
        mask ^= (rng.random((h, w)) < 0.1).astype(np.uint8)
    return mask


def _random_polygons(rng: np.random.Generator, h: int, w: int) -> list[list[float]]:
    parts = []
    for _ in range(rng.integers(1, 4)):
        cx, cy, r = rng.uniform(-0.2 * w, 1.2 * w), rng.uniform(-0.2 * h, 1.2 * h), rng.uniform(0.5, max(h, w) / 2)
        points = []
        for a in np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 8))):
            x = float(np.clip(cx + r * np.cos(a), -w + 0.5, 2 * w - 0.5))
            y = float(np.clip(cy + r * np.sin(a), -h + 0.5, 2 * h - 0.5))
            points += [round(x), round(y)] if rng.random() < 0.3 else [x, y]
        parts.append(points)
    return parts


def _random_box(rng: np.random.Generator, h: int, w: int) -> list[float]:
    kind = rng.random()
    x, y, bw, bh = rng.uniform(-0.3 * w, w), rng.uniform(-0.3 * h, h), rng.uniform(0, w), rng.uniform(0, h)
    if kind < 0.1:
        bw = 0.0
    elif kind < 0.2:
        bh = 0.0
    elif kind < 0.3:
        x = w + rng.uniform(0, 5)  # wholly to the right of the image
    elif kind < 0.4:
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        bw, bh = int(rng.integers(0, w - x + 1)), int(rng.integers(0, h - y + 1))
    elif kind < 0.45:
        x = -bw - rng.uniform(0, 3)  # wholly to the left
    return [x, y, bw, bh]


ALL_MASKS = ("polygons", "rle", "compressed", "null", "missing", "empty")


def write_random_coco(rng: np.random.Generator, root: Path, mask_kinds=ALL_MASKS) -> tuple[Path, dict]:
    """A random split ``val`` under ``root`` with real PNG / JPEG images (some in a subfolder)."""
    (root / "annotations").mkdir(parents=True)
    category_ids = [int(c) for c in rng.choice(np.arange(1, 300), size=int(rng.integers(1, 7)), replace=False)]
    if rng.random() < 0.2:
        category_ids[0] = int(rng.integers(10**6, 10**9))
    categories = [{"id": c, "name": f"c{c}", "supercategory": "s"} for c in category_ids]
    rng.shuffle(categories)
    image_ids = [int(i) for i in rng.choice(np.arange(0, 10000), size=int(rng.integers(1, 5)), replace=False)]
    annotation_ids = iter(int(a) for a in rng.choice(np.arange(1, 100000), size=50, replace=False))
    images, annotations = [], []
    for i, image_id in enumerate(image_ids):
        h, w = int(rng.integers(8, 48)), int(rng.integers(8, 48))
        name = f"im{i}.png" if rng.random() < 0.7 else f"sub/im{i}.jpg"
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        (root / "val" / name).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "val" / name)
        for _ in range(int(rng.integers(0, 6))):
            ann = {"id": next(annotation_ids), "image_id": image_id, "category_id": int(rng.choice(category_ids)),
                   "bbox": _random_box(rng, h, w), "iscrowd": int(rng.random() < 0.15)}
            kind = mask_kinds[int(rng.integers(0, len(mask_kinds)))]
            if kind == "polygons":
                ann["segmentation"] = _random_polygons(rng, h, w)
            elif kind == "rle":
                ann["segmentation"] = {"size": [h, w], "counts": _runs(_random_mask(rng, h, w))}
            elif kind == "compressed":
                rle = mask_utils.encode(np.asfortranarray(_random_mask(rng, h, w)))
                ann["segmentation"] = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
            elif kind in ("null", "empty"):
                ann["segmentation"] = None if kind == "null" else []
            if rng.random() < 0.5:
                ann["area"] = float(rng.uniform(0, h * w))
            annotations.append(ann)
    rng.shuffle(annotations)
    rng.shuffle(images)
    data = {"images": images, "annotations": annotations, "categories": categories}
    path = root / "annotations" / "instances_val.json"
    path.write_text(json.dumps(data))
    return path, data


def _reference_coco(path: Path) -> COCO:
    """pycocotools' reading of the file, with COCO's optional fields as COCO defines them (pycocotools' COCOeval reads
    'iscrowd' and 'area' without a default): no crowd; the area of the mask (``area(annToRLE)``), else of the box."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
        for ann in coco.dataset["annotations"]:
            ann.setdefault("iscrowd", 0)
            if "area" not in ann:
                ann["area"] = (float(mask_utils.area(coco.annToRLE(ann))) if ann.get("segmentation")
                               else ann["bbox"][2] * ann["bbox"][3])
        coco.createIndex()
    return coco


def _expected_targets(data: dict, coco: COCO, masks: bool) -> dict:
    """Per image id: the documented targets. Boxes [x, y, w, h] -> x1 y1 x2 y2 clipped to the image, in file order;
    left out: crowd regions, boxes without area before or after clipping, and with ``masks`` objects without one.
    Labels: the categories sorted by id. Masks: ``COCO.annToMask``."""
    label = {c: i for i, c in enumerate(sorted(c["id"] for c in data["categories"]))}
    expected = {}
    for image in data["images"]:
        h, w = image["height"], image["width"]
        boxes, labels, stack = [], [], []
        for ann in data["annotations"]:
            if ann["image_id"] != image["id"] or ann.get("iscrowd", 0):
                continue
            x, y, bw, bh = ann["bbox"]
            x1, y1, x2, y2 = min(max(x, 0), w), min(max(y, 0), h), min(max(x + bw, 0), w), min(max(y + bh, 0), h)
            if bw <= 0 or bh <= 0 or x2 <= x1 or y2 <= y1 or (masks and not ann.get("segmentation")):
                continue
            boxes.append([x1, y1, x2, y2])
            labels.append(label[ann["category_id"]])
            if masks:
                stack.append(coco.annToMask(ann))
        expected[image["id"]] = (np.array(boxes, np.float32).reshape(-1, 4), labels,
                                 np.stack(stack) if stack else np.zeros((0, h, w), np.uint8))
    return expected


def _expected_skips(data: dict) -> dict:
    """Why annotations are left out of training, counted as the docs say: no area as written, none once clipped,
    crowd regions (a crowd region without area counts as one without area)."""
    sizes = {image["id"]: (image["width"], image["height"]) for image in data["images"]}
    counts: dict[str, int] = {}
    for ann in data["annotations"]:
        x, y, bw, bh = ann["bbox"]
        w, h = sizes[ann["image_id"]]
        if bw <= 0 or bh <= 0:
            reason = "zero area"
        elif min(max(x + bw, 0), w) <= min(max(x, 0), w) or min(max(y + bh, 0), h) <= min(max(y, 0), h):
            reason = "outside its image"
        elif ann.get("iscrowd"):
            reason = "crowd region"
        else:
            continue
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def test_targets_of_random_files_are_pycocotools_reading_with_and_without_flips(tmp_path):
    logging.disable(logging.WARNING)  # each file's skips and clipped boxes are logged: 150 files' worth
    try:
        checked = {"objects": 0, "masks": 0, "flipped": 0, "refused": 0}
        for seed in range(150):
            rng = np.random.default_rng([32, seed])
            root = tmp_path / str(seed)
            path, data = write_random_coco(rng, root)
            masks, hflip = bool(rng.random() < 0.7), float(rng.random() < 0.5)
            coco = _reference_coco(path)
            expected = _expected_targets(data, coco, masks)
            try:
                dataset = CocoDetection(root, "val", masks=masks, hflip=hflip)
            except ValueError as err:  # documented: mask training on a file none of whose objects has a mask
                unmasked = _expected_targets(data, coco, False)
                assert masks and "have no mask" in str(err) and any(len(e[1]) for e in unmasked.values())
                assert not any(len(e[1]) for e in expected.values())
                checked["refused"] += 1
                continue
            # COCOeval's ground truth: the file with the missing areas and crowd flags filled in as COCO defines them
            areas = {ann["id"]: ann["area"] for ann in coco.dataset["annotations"]}
            assert {a["id"]: a["area"] for a in dataset.annotations.dataset["annotations"]} == pytest.approx(areas)
            assert dict(dataset.annotations.skipped) == _expected_skips(data)
            ids = sorted(c["id"] for c in data["categories"])
            assert dataset.annotations.category_ids == ids
            assert dataset.id2label == {i: f"c{c}" for i, c in enumerate(ids)}
            for n, image in enumerate(data["images"]):
                pixels, target = dataset[n]
                boxes, labels, stack = expected[image["id"]]
                w = image["width"]
                if hflip:  # the image mirrored: x -> w - x, so x1 and x2 swap
                    boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
                    stack = stack[:, :, ::-1]
                    checked["flipped"] += 1
                picture = np.asarray(PIL.Image.open(root / "val" / image["file_name"]).convert("RGB"), np.float32) / 255
                picture = picture[:, ::-1] if hflip else picture
                torch.testing.assert_close(pixels, torch.from_numpy(picture.copy()).permute(2, 0, 1))
                assert target["image_id"] == image["id"]
                np.testing.assert_allclose(target["boxes"].numpy(), boxes, rtol=0, atol=1e-4)
                assert target["labels"].tolist() == labels and target["labels"].dtype == torch.int64
                checked["objects"] += len(labels)
                if masks:
                    assert target["masks"].dtype == torch.uint8
                    np.testing.assert_array_equal(target["masks"].numpy(), stack)
                    checked["masks"] += len(stack)
    finally:
        logging.disable(logging.NOTSET)
    # the search reached every branch: objects, masks, flips and the refusal of mask-less mask training
    assert checked["objects"] > 300 and checked["masks"] > 150 and checked["flipped"] > 150 and checked["refused"] >= 1, checked


# ---------------------------------------------------------------------------------------------- metrics
def _random_outputs(rng: np.random.Generator, data: dict, masks: bool) -> list[dict]:
    """Per image (in the file's order), detector outputs: boxes near ground-truth boxes or anywhere, scores with ties
    now and then, labels of any class, and mask probabilities."""
    outputs = []
    for image in data["images"]:
        h, w = image["height"], image["width"]
        truths = [a["bbox"] for a in data["annotations"] if a["image_id"] == image["id"]]
        boxes = []
        for _ in range(int(rng.integers(0, 8))):
            if truths and rng.random() < 0.6:
                x, y, bw, bh = truths[int(rng.integers(0, len(truths)))]
                box = np.array([x, y, x + bw, y + bh]) + rng.normal(0, 1.5, 4)
            else:
                x1, y1 = rng.uniform(0, w), rng.uniform(0, h)
                box = np.array([x1, y1, x1 + rng.uniform(0, w), y1 + rng.uniform(0, h)])
            box = np.clip(box, 0, [w, h, w, h])
            boxes.append([min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])])
        n = len(boxes)
        scores = rng.choice([0.1, 0.5, 0.9], n) if rng.random() < 0.3 else rng.random(n)
        out = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
               "scores": torch.tensor(scores, dtype=torch.float32),
               "labels": torch.from_numpy(rng.integers(0, len(data["categories"]), n))}
        if masks:
            yy, xx = np.mgrid[:h, :w]
            probabilities = 0.3 * rng.random((n, 1, h, w))
            for j, (x1, y1, x2, y2) in enumerate(boxes):
                probabilities[j, 0] += 0.7 * ((xx >= x1) & (xx < x2) & (yy >= y1) & (yy < y2))
            out["masks"] = torch.from_numpy(probabilities.astype(np.float32))
        outputs.append(out)
    return outputs


def _results_by_hand(outputs: list[dict], image_ids: list[int], category_ids: list[int]) -> list[dict]:
    """COCO results: bbox [x, y, w, h], the category id of the label (categories sorted by id), the score, and the
    mask thresholded at 0.5 as compressed RLE with its counts as a str (what json and loadRes take)."""
    results = []
    for out, image_id in zip(outputs, image_ids):
        for n in range(len(out["boxes"])):
            x1, y1, x2, y2 = out["boxes"][n].tolist()
            entry = {"image_id": image_id, "category_id": category_ids[int(out["labels"][n])],
                     "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(out["scores"][n])}
            if "masks" in out:
                rle = mask_utils.encode(np.asfortranarray((out["masks"][n, 0].numpy() >= 0.5).astype(np.uint8)))
                entry["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
            results.append(entry)
    return results


def _cocoeval(coco: COCO, results: list[dict], iou_type: str) -> list[float] | None:
    """COCOeval's twelve numbers, run directly; mask results without their boxes (the docs: a mask detection's size
    range is its mask's)."""
    if not results:
        return None
    results = copy.deepcopy(results)
    if iou_type == "segm":
        for r in results:
            r.pop("bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def test_metrics_of_random_detections_are_cocoevals_and_the_results_are_coco_results(tmp_path):
    logging.disable(logging.WARNING)
    try:
        scored = {"bbox": 0, "segm": 0, "detections": 0, "empty": 0}
        for seed in range(150):
            rng = np.random.default_rng([3232, seed])
            masks = bool(rng.random() < 0.5)
            kinds = ("polygons", "rle", "compressed") if masks else ALL_MASKS  # mask AP needs every object's mask
            path, data = write_random_coco(rng, tmp_path / str(seed), kinds)
            annotations = read_coco_annotations(path)
            outputs = _random_outputs(rng, data, masks)
            image_ids = [image["id"] for image in data["images"]]
            ours = detections_to_coco(outputs, image_ids, annotations.category_ids)
            expected = _results_by_hand(outputs, image_ids, annotations.category_ids)
            # valid COCO results: through JSON, with the original image and category ids, float scores, str counts
            written = json.loads(json.dumps(ours))
            assert len(written) == len(expected)
            for got, want in zip(written, expected):
                assert type(got["image_id"]) is int and type(got["category_id"]) is int and type(got["score"]) is float
                assert (got["image_id"], got["category_id"]) == (want["image_id"], want["category_id"])
                assert got["score"] == pytest.approx(want["score"], abs=1e-7)
                np.testing.assert_allclose(got["bbox"], want["bbox"], rtol=0, atol=1e-5)
                assert got.get("segmentation") == want.get("segmentation")
            coco = _reference_coco(path)
            if written:
                with contextlib.redirect_stdout(io.StringIO()):
                    loaded = coco.loadRes(copy.deepcopy(written))
                assert len(loaded.dataset["annotations"]) == len(written)
            scored["detections"] += len(written)
            if not any(not a.get("iscrowd") for a in data["annotations"]):
                continue  # every number -1: what pvtv2 eval refuses (tests/tools/test_detect_hostile27.py)
            iou_types = ("bbox", "segm") if masks else ("bbox",)
            metrics = coco_evaluate(annotations, ours, iou_types)
            for iou_type in iou_types:
                numbers = [metrics[iou_type][k] for k in BOX_METRICS]
                reference = _cocoeval(coco, expected, iou_type)
                if reference is None:  # loadRes refuses no results: 0 where there are objects, -1 where none
                    assert set(numbers) <= {0.0, -1.0} and numbers[0] == 0.0, numbers
                    scored["empty"] += 1
                    continue
                assert numbers == pytest.approx(reference, abs=1e-12), (seed, iou_type)
                scored[iou_type] += 1
    finally:
        logging.disable(logging.NOTSET)
    assert scored["bbox"] > 130 and scored["segm"] > 60 and scored["detections"] > 1200 and scored["empty"], scored


# ---------------------------------------------------------------------------------------------- hostile files
def _small_split(root: Path, split: str = "val") -> Path:
    """Two images, two categories, polygon and compressed-RLE masks: the base the hostile edits start from."""
    for folder in ("annotations", split):
        (root / folder).mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", (30, 20), (10, 20, 30)).save(root / split / "a.png")
    PIL.Image.new("RGB", (24, 16), (30, 20, 10)).save(root / split / "b.png")
    mask = np.zeros((20, 30), np.uint8)
    mask[2:10, 3:12] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 30, "height": 20},
                   {"id": 2, "file_name": "b.png", "width": 24, "height": 16}],
        "categories": [{"id": 5, "name": "x"}, {"id": 2, "name": "y"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 5, "bbox": [3, 2, 9, 8], "iscrowd": 0, "area": 72,
             "segmentation": [[3, 2, 12, 2, 12, 10, 3, 10]]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [3, 2, 9, 8], "iscrowd": 0,
             "segmentation": {"size": [20, 30], "counts": rle["counts"].decode("ascii")}},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6, 1, 6, 6]]},
        ],
    }
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(data))
    return path


def _edited(edit):
    def write(path: Path) -> None:
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    return write


def _text_edit(old: str, new: str):
    def write(path: Path) -> None:
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new, 1))
    return write


HUGE = 10**400  # a JSON integer beyond float's range: math.isfinite raised OverflowError reading the file
HOSTILE32 = {
    # an OverflowError traceback (also through the command line, which shows OverflowErrors as tracebacks)
    "huge integer in a box": (_edited(lambda d: d["annotations"][0].update(bbox=[1, 2, HUGE, 4])),
                              "annotation 1 needs 'bbox' .* 4 finite numbers"),
    "huge integer area": (_edited(lambda d: d["annotations"][0].update(area=HUGE)),
                          "annotation 1 has 'area' .*expected a non-negative number"),
    "huge integer in a polygon": (_edited(lambda d: d["annotations"][0].update(segmentation=[[1, 2, HUGE, 4, 5, 6]])),
                                  "annotation 1: a polygon must be a list of at least 3 .* numbers"),
    # read, then an OverflowError from the aspect-ratio grouping of training batches
    "huge image width": (_edited(lambda d: [a.pop("segmentation") for a in d["annotations"]] and d["images"][0].update(width=HUGE)),
                         r"image 1 needs positive integer 'width' and 'height' \(at most 2147483647\), got 1000"),
    # inside an image the file says is 2**31 - 1 pixels wide, so past the check for polygon points far outside their
    # image: 4 * 10**6 pixels across took 600 MB and seconds to read, 2 * 10**9 crashed the process (pycocotools)
    "a polygon 4 million pixels across": (
        _edited(lambda d: d["images"][0].update(width=2**31 - 1, height=2**31 - 1) or d["annotations"].__setitem__(
            slice(0, 2), [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [0, 0, 5, 5],
                           "segmentation": [[0, 0, 4e6, 0, 4e6, 4e6]]}])),
        "annotation 1: a polygon whose edges run 1.2e\+07 pixels"),
    # a RecursionError traceback from the JSON reader
    "arrays nested 100000 deep": (_text_edit('"area": 72', '"area": 72, "extra": ' + "[" * 100000 + "]" * 100000),
                                  "cannot be read as JSON: maximum recursion depth"),
    # Python's ValueError naming no file: more than 4300 digits
    "an integer of 5000 digits": (_text_edit('"bbox": [3, 2, 9, 8]', '"bbox": [3, 2, 9' + "0" * 5000 + ", 8]"),
                                  "cannot be read as JSON: Exceeds the limit"),
    # a TypeError "unhashable type: 'list'" naming no file
    "an image_id that is a list": (_edited(lambda d: d["annotations"][0].update(image_id=[1])),
                                   r"annotation 1 needs an integer 'image_id', got \[1\]"),
    "a category_id that is an object": (_edited(lambda d: d["annotations"][2].update(category_id={"id": 2})),
                                        "annotation 3 needs an integer 'category_id', got {'id': 2}"),
    # taken as image 1 and category 5 (True == 1, 5.0 == 5), where the images' and categories' own ids must be integers
    "an image_id of true": (_edited(lambda d: d["annotations"][0].update(image_id=True)),
                            "annotation 1 needs an integer 'image_id', got True"),
    "a category_id of 5.0": (_edited(lambda d: d["annotations"][0].update(category_id=5.0)),
                             "annotation 1 needs an integer 'category_id', got 5.0"),
    # hours: every continuation character made the count a longer integer (quadratic time)
    "2 million RLE continuation characters": (
        _edited(lambda d: d["annotations"][1]["segmentation"].update(counts="o" * 2_000_000 + "0")),
        "annotation 2: compressed RLE counts 'oooo.*do not decode"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE32))
def test_hostile_annotation_files_found_by_the_search_are_clear_errors(tmp_path, name):
    path = _small_split(tmp_path)
    write, message = HOSTILE32[name]
    write(path)
    with pytest.raises(ValueError, match=message) as caught:
        CocoDetection(tmp_path, "val").aspect_ratios()  # what training reads first
    assert str(path) in str(caught.value)


def test_the_commands_say_a_hostile_annotation_file_in_one_line(tmp_path, capsys):
    """``pvtv2 train --task detection`` on a file with a 400-digit box width: an OverflowError traceback, now one line
    naming the file and the annotation, exit status 2."""
    _small_split(tmp_path / "d", "val")
    _edited(lambda d: d["annotations"][2].update(bbox=[1, 1, HUGE, 5]))(_small_split(tmp_path / "d", "train"))
    code = main(["train", "--task", "detection", "--model", "tiny", "--data", str(tmp_path / "d"), "--output",
                 str(tmp_path / "run"), "--epochs", "1", "--image-size", "64", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "instances_train.json" in err and "annotation 3 needs 'bbox'" in err, err


def test_masks_of_another_size_than_their_image_are_refused_not_scored(tmp_path):
    """pycocotools compares two masks' runs as they are: the object's exact mask on a canvas padded by 10 pixels (a
    padded batch's), or cropped, scored mask AP 0 without a word. The same mask at the image's size scores 1."""
    path = _small_split(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"] = data["annotations"][1:2]  # image 1's compressed RLE object alone (category 2: label 0)
    path.write_text(json.dumps(data))
    annotations = read_coco_annotations(path)
    mask = torch.zeros(1, 1, 20, 30)
    mask[0, 0, 2:10, 3:12] = 1

    def results(masks):
        found = {"boxes": torch.tensor([[3.0, 2.0, 12.0, 10.0]]), "labels": torch.tensor([0]),
                 "scores": torch.tensor([0.9]), "masks": masks}
        return detections_to_coco([found], [1], annotations.category_ids)

    assert coco_evaluate(annotations, results(mask), ("bbox", "segm"))["segm"]["AP"] == pytest.approx(1.0)
    for wrong, size in ((torch.nn.functional.pad(mask, (0, 10, 0, 10)), "30 x 40"), (mask[..., :16, :24], "16 x 24")):
        with pytest.raises(ValueError, match=f"image 1 has a mask of {size} pixels, but the image is 20 x 30"):
            coco_evaluate(annotations, results(wrong), ("bbox", "segm"))
        assert coco_evaluate(annotations, results(wrong), ("bbox",))["bbox"]["AP"] == pytest.approx(1.0)  # boxes only


class _Answers(torch.nn.Module):
    """A stand-in detector: given outputs per image, found by the image's bytes; classes ``id2label``."""

    def __init__(self, id2label: dict[int, str], detector: str, answers: dict[bytes, dict]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = PvtV2Config(id2label=id2label, detector=detector)
        self.answers = answers

    def forward(self, images):
        return [copy.deepcopy(self.answers[image.numpy().tobytes()]) for image in images]


def test_eval_of_a_model_whose_classes_are_some_of_the_files_in_another_order_is_cocoevals(tmp_path):
    """``evaluate_detector`` (``pvtv2 eval --task detection``) with a model whose classes are a random subset of the
    file's category names, shuffled, plus names the file lacks: labels map to categories by name (written out here),
    detections of the other classes are left out, and the numbers are COCOeval's on the file."""
    logging.disable(logging.WARNING)
    try:
        scored = 0
        for seed in range(25):
            rng = np.random.default_rng([323, seed])
            masks = bool(rng.random() < 0.5)
            kinds = ("polygons", "rle", "compressed") if masks else ALL_MASKS
            root = tmp_path / str(seed)
            path, data = write_random_coco(rng, root, kinds)
            if not any(not a.get("iscrowd") for a in data["annotations"]):
                continue
            annotations = read_coco_annotations(path)
            names = [annotations.id2label[i] for i in range(len(annotations.category_ids))]
            chosen = [n for n in names if rng.random() < 0.8] or names[:1]
            chosen = [str(n) for n in rng.permutation(chosen)] + ["stranger"] * int(rng.random() < 0.5)
            id2label = dict(enumerate(chosen))
            outputs = _random_outputs(rng, dict(data, categories=chosen), masks)
            dataset = CocoDetection(root, "val")
            answers = {dataset[n][0].numpy().tobytes(): outputs[data["images"].index(next(
                im for im in data["images"] if im["id"] == info["id"]))] for n, info in enumerate(dataset.images)}
            if len(answers) < len(outputs):
                continue  # two identical pictures
            model = _Answers(id2label, "mask_rcnn" if masks else "retinanet", answers)
            got = evaluate_detector(model, root, batch_size=int(rng.integers(1, 4)))
            category = dict(zip(names, annotations.category_ids))
            expected = []
            for out, image in zip(outputs, data["images"]):
                keep = [j for j, label in enumerate(out["labels"].tolist()) if id2label[label] in category]
                kept = {k: v[keep] for k, v in out.items()}
                ids = [category[id2label[label]] for label in kept["labels"].tolist()]
                expected += _results_by_hand([dict(kept, labels=torch.arange(len(keep)))], [image["id"]], ids)
            coco = _reference_coco(path)
            assert got["detections"] == len(expected)
            for iou_type, key in (("bbox", "box"), ("segm", "mask")):
                if key not in got:
                    assert iou_type == "segm" and not masks
                    continue
                reference = _cocoeval(coco, expected, iou_type)
                numbers = [got[key][k] for k in BOX_METRICS]
                if reference is None:
                    assert set(numbers) <= {0.0, -1.0}, numbers
                else:
                    assert numbers == pytest.approx(reference, abs=1e-12), (seed, iou_type)
                    scored += 1
    finally:
        logging.disable(logging.NOTSET)
    assert scored > 25, scored
