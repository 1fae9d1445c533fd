"""COCO metrics and annotation checks held against pycocotools run directly (mask metrics sized by the mask, as
mmdetection and torchvision's reference scripts score them), negative box sizes, undecodable compressed RLE, and
segmentation masks that cannot be decoded."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pycocotools")

import pycocotools.mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from pvtv2.data.coco import BOX_METRICS, coco_evaluate, read_coco_annotations  # noqa: E402

H, W = 100, 100


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}


def _direct(path: Path, results: list[dict], iou_type: str) -> list[float]:
    """COCOeval on the file and the result list, nothing of pvtv2's in between."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        evaluator = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iou_type)
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def _write(path: Path, annotations: list[dict]) -> Path:
    path.write_text(json.dumps({
        "images": [{"id": 7, "file_name": "a.png", "width": W, "height": H}],
        "categories": [{"id": 3, "name": "thing"}],
        "annotations": annotations,
    }))
    return path


def test_mask_metrics_size_detections_by_their_masks_not_their_boxes(tmp_path):
    # Ground truth: a small object (a triangle of 450 px in a 22x40 box) and a medium one (35x35 square).
    triangle = np.zeros((H, W), dtype=np.uint8)
    for r in range(40):
        triangle[10 + r, 10 : 10 + int(r * 0.55) + 1] = 1
    square = np.zeros((H, W), dtype=np.uint8)
    square[60:95, 60:95] = 1
    path = _write(tmp_path / "gt.json", [
        {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 10, 22, 40], "area": float(triangle.sum()),
         "iscrowd": 0, "segmentation": _rle(triangle)},
        {"id": 2, "image_id": 7, "category_id": 3, "bbox": [60, 60, 35, 35], "area": 1225.0, "iscrowd": 0,
         "segmentation": _rle(square)},
    ])
    # Detections as a Mask R-CNN gives them: a box and a mask each. The top-scoring one matches nothing; its mask is
    # small (300 px) but its box medium (40x40 = 1600 px).
    stray = np.zeros((H, W), dtype=np.uint8)
    stray[0:10, 50:80] = 1
    results = [
        {"image_id": 7, "category_id": 3, "bbox": [45, 0, 40, 40], "score": 0.95, "segmentation": _rle(stray)},
        {"image_id": 7, "category_id": 3, "bbox": [9, 9, 24, 42], "score": 0.9, "segmentation": _rle(triangle)},
        {"image_id": 7, "category_id": 3, "bbox": [60, 60, 35, 35], "score": 0.5, "segmentation": _rle(square)},
    ]
    ours = coco_evaluate(read_coco_annotations(path), results, ("bbox", "segm"))
    # The reference: results without their boxes, as torchvision's reference scripts write them and mmdetection
    # evaluates them, so that loadRes takes each detection's area from its mask.
    by_mask = _direct(path, [{k: v for k, v in r.items() if k != "bbox"} for r in results], "segm")
    assert [ours["segm"][name] for name in BOX_METRICS] == pytest.approx(by_mask, abs=1e-12)
    # The stray detection counts against the small objects, not the medium ones (by its box it would be the reverse).
    assert ours["segm"]["APs"] == pytest.approx(0.5) and ours["segm"]["APm"] == pytest.approx(1.0)
    assert by_mask != _direct(path, results, "segm")  # the case tells the two ways apart
    # Box metrics are COCOeval's on the same list, boxes and all.
    assert [ours["bbox"][name] for name in BOX_METRICS] == pytest.approx(_direct(path, results, "bbox"), abs=1e-12)


def test_a_box_with_negative_width_or_height_is_an_error_naming_it(tmp_path):
    for n, bbox in enumerate(([5, 5, -20, 20], [5, 5, 20, -0.5])):
        path = _write(tmp_path / f"gt{n}.json", [{"id": 4, "image_id": 7, "category_id": 3, "bbox": bbox, "iscrowd": 0}])
        with pytest.raises(ValueError, match=r"gt\d.json.*annotation 4 .*negative width or height"):
            read_coco_annotations(path)
    # zero width stays a box without area: skipped in training, no error
    path = _write(tmp_path / "zero.json", [{"id": 4, "image_id": 7, "category_id": 3, "bbox": [5, 5, 0, 20]}])
    assert read_coco_annotations(path).skipped == {"zero area": 1}


@pytest.mark.parametrize("area", [-5, -0.5, "12"])
def test_an_area_that_is_negative_or_not_a_number_is_an_error_naming_it(tmp_path, area):
    path = _write(tmp_path / "gt.json", [{"id": 4, "image_id": 7, "category_id": 3, "bbox": [5, 5, 20, 20], "area": area,
                                          "iscrowd": 0}])
    with pytest.raises(ValueError, match=r"gt.json.*annotation 4 has 'area' .*expected a non-negative number"):
        read_coco_annotations(path)
    # COCOeval run on such a file ignores the object in every size range: a perfect detection gains nothing.
    if not isinstance(area, str):
        results = [{"image_id": 7, "category_id": 3, "bbox": [5, 5, 20, 20], "score": 0.9}]
        assert _direct(path, results, "bbox")[0] == -1


@pytest.mark.parametrize("counts", ["!!!!", "0", "PPYo", "1", "abc~"])
def test_compressed_rle_that_does_not_decode_to_the_image_is_an_error(tmp_path, counts):
    path = _write(tmp_path / "gt.json", [{"id": 4, "image_id": 7, "category_id": 3, "bbox": [5, 5, 20, 20],
                                          "segmentation": {"size": [H, W], "counts": counts}}])
    with pytest.raises(ValueError, match=r"annotation 4: compressed RLE counts .* summing to height x width"):
        read_coco_annotations(path)


def test_compressed_rle_from_pycocotools_is_accepted_and_decodes_to_its_mask(tmp_path):
    rng = np.random.default_rng(0)
    masks = [rng.random((H, W)) < 0.3, np.zeros((H, W), bool), np.ones((H, W), bool)]
    path = _write(tmp_path / "gt.json", [
        {"id": n + 1, "image_id": 7, "category_id": 3, "bbox": [5, 5, 20, 20], "segmentation": _rle(m)}
        for n, m in enumerate(masks)
    ])
    annotations = read_coco_annotations(path)
    gt = annotations.coco()
    for n, mask in enumerate(masks):
        assert np.array_equal(gt.annToMask(gt.anns[n + 1]), mask)


# ---------------------------------------------------------------------------------------------- segmentation masks
def test_a_truncated_mask_is_an_error_naming_it(tmp_path):
    import PIL.Image

    from pvtv2.data.masks import SegmentationFolder, read_mask

    for folder in ("images", "masks"):
        (tmp_path / "val" / folder).mkdir(parents=True)
    PIL.Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "val" / "images" / "a.png")
    path = tmp_path / "val" / "masks" / "a.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 3, (32, 32), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ValueError, match=r"cannot read mask '.*a\.png': image file is truncated"):
        read_mask(path)
    with pytest.raises(ValueError, match=r"cannot read mask '.*a\.png'"):
        SegmentationFolder(tmp_path, "val", 32)[0]


def test_metrics_equal_cocoeval_with_crowds_large_ids_gapped_categories_and_mixed_mask_formats(tmp_path):
    """Images with no detections and with no annotations, crowd regions, ids beyond 32 bits, category ids 1, 3, 90,
    polygons beside compressed and uncompressed RLE: our numbers are COCOeval's on the file, for boxes and masks."""
    rng = np.random.default_rng(3)
    image_ids = [7, 2**40 + 1, 3, 99]  # 3: no detections; 99: no annotations
    images = [{"id": i, "file_name": f"{n}.png", "width": W, "height": H} for n, i in enumerate(image_ids)]
    annotations, results = [], []
    for image_id in image_ids[:3]:
        for _ in range(5):
            w, h = rng.uniform(4, 60, 2)
            x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
            n = len(annotations) + 1
            box = np.zeros((H, W), dtype=np.uint8)
            box[int(y) : int(y + h), int(x) : int(x + w)] = 1
            segmentation = [
                [[x, y, x + w, y, x + w / 2, y + h]],  # a triangle: its area is half its box's
                _rle(box),
                _uncompressed(box),
            ][n % 3]
            annotations.append({"id": n, "image_id": image_id, "category_id": int(rng.choice([1, 3, 90])),
                                "bbox": [x, y, w, h], "area": float(w * h), "iscrowd": int(n % 7 == 0),
                                "segmentation": segmentation})
            if image_id == 3:
                continue
            for category in (annotations[-1]["category_id"], 3):  # the right class, and often a wrong one
                noise = rng.normal(0, 2.5, 4)
                x1, y1 = x + noise[0], y + noise[1]
                w1, h1 = max(1.0, w + noise[2]), max(1.0, h + noise[3])
                mask = np.zeros((H, W), dtype=np.uint8)
                mask[max(0, int(y1)) : int(y1 + h1), max(0, int(x1)) : int(x1 + w1 * 0.7)] = 1
                results.append({"image_id": image_id, "category_id": category, "bbox": [x1, y1, w1, h1],
                                "score": float(rng.uniform(0.05, 1)), "segmentation": _rle(mask)})
    results.append({"image_id": 99, "category_id": 90, "bbox": [10, 10, 40, 10], "score": 0.9,
                    "segmentation": _rle(np.pad(np.ones((10, 40), np.uint8), ((10, 80), (10, 50))))})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 90, "name": "c"}, {"id": 1, "name": "a"}, {"id": 3, "name": "b"}]}))
    ours = coco_evaluate(read_coco_annotations(path), results, ("bbox", "segm"))
    assert [ours["bbox"][n] for n in BOX_METRICS] == pytest.approx(_direct(path, results, "bbox"), abs=1e-12)
    without_boxes = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    assert [ours["segm"][n] for n in BOX_METRICS] == pytest.approx(_direct(path, without_boxes, "segm"), abs=1e-12)
    assert 0 < ours["bbox"]["AP"] < 1 and 0 < ours["segm"]["AP"] < 1


def _uncompressed(mask: np.ndarray) -> dict:
    """Uncompressed RLE written out by hand: column-major runs, zeros first."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": [H, W], "counts": [int(c) for c in counts]}
