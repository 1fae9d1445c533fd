"""COCO-format data and metrics: annotation files, targets, masks, grouped batches, and COCOeval through our code
against COCOeval run directly on files."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("pycocotools")
pytest.importorskip("torchvision")

from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from pvtv2 import PvtV2Config  # noqa: E402
from pvtv2.data.coco import (  # noqa: E402
    BOX_METRICS,
    CocoDetection,
    coco_evaluate,
    detections_to_coco,
    find_coco_split,
    grouped_batches,
    read_coco_annotations,
)
from pvtv2.data.digit_scenes import make_detection_example  # noqa: E402
from pvtv2.inference import evaluate_detector  # noqa: E402

# Category ids out of order and with gaps, as COCO's (1..90 with holes).
CATEGORIES = [{"id": 90, "name": "toothbrush"}, {"id": 3, "name": "car"}, {"id": 17, "name": "cat"}]
SIZES = [(160, 200), (120, 90), (200, 160), (96, 128)]  # (height, width): wide and tall images


def rectangle_rle(height: int, width: int, x1: int, y1: int, x2: int, y2: int) -> dict:
    """Uncompressed COCO RLE of a filled rectangle, written out by hand: runs in column-major order, zeros first."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y1:y2, x1:x2] = 1
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": [height, width], "counts": [int(c) for c in counts]}


def write_dataset(root: Path, split: str = "val", annotations: list | None = None, images: list | None = None,
                  categories: list | None = None, year: str = "") -> Path:
    """A small COCO-format split: each image's top-left pixel holds its index (the oracle below reads it back)."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}{year}").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if images is None:
        images = [{"id": 10 + i, "file_name": f"im{i}.png", "height": h, "width": w} for i, (h, w) in enumerate(SIZES)]
    for i, image in enumerate(images):
        pixels = rng.integers(0, 256, (image["height"], image["width"], 3), dtype=np.uint8)
        pixels[0, 0] = (i, 0, 0)
        PIL.Image.fromarray(pixels).save(root / f"{split}{year}" / image["file_name"])
    if annotations is None:
        annotations = default_annotations(images)
    data = {"images": images, "annotations": annotations, "categories": categories or CATEGORIES}
    path = root / "annotations" / f"instances_{split}{year}.json"
    path.write_text(json.dumps(data))
    return path


def default_annotations(images: list) -> list:
    """Small (< 32^2), medium and large (>= 96^2) boxes with rectangle masks (polygons and RLE), a crowd region, and
    one image without objects."""
    anns = []

    def add(image, category, x1, y1, x2, y2, polygon=True, crowd=0):
        h, w = image["height"], image["width"]
        segmentation = ([[x1, y1, x2, y1, x2, y2, x1, y2]] if polygon else rectangle_rle(h, w, x1, y1, x2, y2))
        anns.append({"id": len(anns) + 1, "image_id": image["id"], "category_id": category,
                     "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": crowd,
                     "segmentation": segmentation})

    add(images[0], 3, 10, 10, 30, 30)  # small
    add(images[0], 17, 40, 20, 140, 130, polygon=False)  # large
    add(images[0], 90, 150, 100, 190, 150)  # medium
    add(images[1], 17, 5, 5, 60, 70, polygon=False)  # medium
    add(images[1], 3, 70, 80, 85, 110)  # small
    add(images[2], 90, 20, 20, 140, 180)  # large
    add(images[2], 3, 100, 10, 150, 40, crowd=1)  # a crowd region: ignored by COCOeval, not trained on
    return anns  # images[3] has no objects: a negative


class Oracle(torch.nn.Module):
    """A stand-in detector that answers with given detections per image (found by the index in pixel (0, 0))."""

    def __init__(self, answers: dict[int, dict[str, torch.Tensor]], id2label: dict[int, str], detector: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.answers = answers
        self.config = PvtV2Config(depths=[1, 1, 1, 1], id2label=id2label, detector=detector)

    def forward(self, images):
        return [self.answers[round(float(image[0, 0, 0]) * 255)] for image in images]


def ground_truth_answers(root: Path, split: str = "val", with_masks: bool = True) -> tuple[dict, CocoDetection]:
    dataset = CocoDetection(root, split, masks=with_masks)
    answers = {}
    for i in range(len(dataset)):
        image, target = dataset[i]
        n = len(target["labels"])
        answer = {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(n)}
        if with_masks:
            answer["masks"] = target["masks"][:, None].float()
        answers[i] = answer
    return answers, dataset


# ---------------------------------------------------------------------------------------------- metrics
def test_cocoeval_of_the_ground_truth_itself_gives_ap_one_through_our_code(tmp_path):
    write_dataset(tmp_path)
    answers, dataset = ground_truth_answers(tmp_path)
    result = evaluate_detector(Oracle(answers, dataset.id2label, "mask_rcnn"), tmp_path)
    for kind in ("box", "mask"):
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            assert result[kind][name] == pytest.approx(1.0), (kind, name)
    assert result["images"] == 4 and result["categories"] == 3 and result["detections"] == 6


def test_our_metrics_are_cocoevals_on_files(tmp_path):
    """Noisy boxes, wrong classes, false positives and misses: the numbers equal COCOeval's, run on the annotation
    file and a results JSON without any of our code (the independent reference)."""
    gt_path = write_dataset(tmp_path)
    answers, dataset = ground_truth_answers(tmp_path, with_masks=False)
    rng = torch.Generator().manual_seed(0)
    for i, answer in answers.items():
        n = len(answer["labels"])
        boxes = answer["boxes"] + torch.randn(n, 4, generator=rng) * 4
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        extra = torch.tensor([[5.0, 5.0, 50.0, 40.0]])
        answers[i] = {
            "boxes": torch.cat([boxes, extra]),
            "labels": torch.cat([answer["labels"].roll(1) if i == 1 else answer["labels"], torch.tensor([i % 3])]),
            "scores": torch.rand(n + 1, generator=rng),
        }
    answers[2] = {k: v[1:] for k, v in answers[2].items()}  # miss the large object
    ours = evaluate_detector(Oracle(answers, dataset.id2label, "retinanet"), tmp_path)["box"]

    entries = detections_to_coco([answers[i] for i in range(4)], [10, 11, 12, 13], dataset.annotations.category_ids)
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(entries))
    gt = COCO(str(gt_path))
    evaluator = COCOeval(gt, gt.loadRes(str(results_path)), "bbox")
    evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    assert [ours[name] for name in BOX_METRICS] == pytest.approx(list(evaluator.stats), abs=1e-12)
    assert 0.1 < ours["AP"] < 0.9  # neither trivial nor perfect: the comparison means something


def test_no_detections_score_zero_and_sizes_without_ground_truth_minus_one(tmp_path):
    write_dataset(tmp_path)
    annotations = read_coco_annotations(tmp_path / "annotations" / "instances_val.json")
    result = coco_evaluate(annotations, [], ["bbox"])
    assert result["bbox"]["AP"] == 0.0 and result["bbox"]["AR100"] == 0.0
    only_small = [a for a in annotations.dataset["annotations"] if a["area"] < 32**2]
    annotations.dataset["annotations"] = only_small
    assert coco_evaluate(annotations, [], ["bbox"])["bbox"]["APl"] == -1.0  # COCOeval's "no ground truth"


def test_category_ids_map_to_contiguous_labels_and_back(tmp_path):
    write_dataset(tmp_path)
    dataset = CocoDetection(tmp_path, "val")
    assert dataset.annotations.category_ids == [3, 17, 90]
    assert dataset.id2label == {0: "car", 1: "cat", 2: "toothbrush"}
    by_id = {a["id"]: a for a in json.loads((tmp_path / "annotations" / "instances_val.json").read_text())["annotations"]}
    _, target = dataset[0]
    file_categories = [by_id[k]["category_id"] for k in (1, 2, 3)]
    assert [dataset.annotations.category_ids[label] for label in target["labels"].tolist()] == file_categories
    back = detections_to_coco([{"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(3)}], [10],
                              dataset.annotations.category_ids)
    assert [e["category_id"] for e in back] == file_categories
    assert [e["bbox"] for e in back] == [by_id[k]["bbox"] for k in (1, 2, 3)]


def test_a_model_labels_map_to_categories_by_name(tmp_path):
    """A model trained on other data: its classes map to the file's categories by name, whatever their order; classes
    the file lacks are not scored."""
    write_dataset(tmp_path)
    answers, dataset = ground_truth_answers(tmp_path, with_masks=False)
    id2label = {0: "toothbrush", 1: "dog", 2: "car", 3: "cat"}
    relabel = {0: 2, 1: 3, 2: 0}  # the file's labels (car, cat, toothbrush) as the model's
    for answer in answers.values():
        answer["labels"] = torch.tensor([relabel[v] for v in answer["labels"].tolist()], dtype=torch.int64)
    result = evaluate_detector(Oracle(answers, id2label, "retinanet"), tmp_path)
    assert result["box"]["AP"] == pytest.approx(1.0)


def test_categories_the_model_cannot_predict_count_at_ap_zero_with_one_warning(tmp_path, caplog):
    """A model without a 'toothbrush' class, on a file whose toothbrushes are objects: COCOeval's mean includes the
    category at AP 0 (2/3 here, every other object found), which went without a word. One warning names it; a
    category with crowd regions only (no AP at all) is not named."""
    categories = [*CATEGORIES, {"id": 5, "name": "kite"}]
    annotations = default_annotations([{"id": 10 + i, "height": h, "width": w} for i, (h, w) in enumerate(SIZES)])
    annotations.append({**annotations[-1], "id": 99, "category_id": 5})  # kite: one crowd region only
    write_dataset(tmp_path, annotations=annotations, categories=categories)
    answers, dataset = ground_truth_answers(tmp_path, with_masks=False)
    assert dataset.id2label == {0: "car", 1: "kite", 2: "cat", 3: "toothbrush"}  # the file's labels, by category id
    model_label = {0: 0, 2: 1}  # car and cat are the model's classes 0 and 1; toothbrush it lacks
    for answer in answers.values():
        found = [i for i, v in enumerate(answer["labels"].tolist()) if v in model_label]
        labels = torch.tensor([model_label[v] for v in answer["labels"][found].tolist()], dtype=torch.int64)
        answer.update(boxes=answer["boxes"][found], scores=answer["scores"][found], labels=labels)
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        result = evaluate_detector(Oracle(answers, {0: "car", 1: "cat"}, "retinanet"), tmp_path)
    assert result["box"]["AP"] == pytest.approx(2 / 3)  # (1 + 1 + 0) / 3: kite has no AP, toothbrush 0
    entries = detections_to_coco([answers[i] for i in range(4)], [10, 11, 12, 13], [3, 17])  # model label -> id
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / "annotations" / "instances_val.json"))
        evaluator = COCOeval(gt, gt.loadRes(entries), "bbox")
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    assert result["box"]["AP"] == pytest.approx(evaluator.stats[0], abs=1e-12)
    warnings = [r.getMessage() for r in caplog.records if "categories with objects in" in r.getMessage()]
    assert warnings == [("1 of the 3 categories with objects in instances_val.json is not a class of the model "
                         "('toothbrush'): each scores AP 0, and the mean AP includes it")]


def test_no_warning_when_the_model_predicts_every_category(tmp_path, caplog):
    write_dataset(tmp_path)
    answers, dataset = ground_truth_answers(tmp_path, with_masks=False)
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        evaluate_detector(Oracle(answers, dataset.id2label, "retinanet"), tmp_path)
    assert not [r for r in caplog.records if "categories with objects in" in r.getMessage()]


# ---------------------------------------------------------------------------------------------- data
def test_targets_boxes_masks_crowds_and_negatives(tmp_path):
    write_dataset(tmp_path)
    dataset = CocoDetection(tmp_path, "val", masks=True)
    image, target = dataset[0]
    assert image.shape == (3, 160, 200) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert target["image_id"] == 10
    assert target["boxes"].tolist() == [[10, 10, 30, 30], [40, 20, 140, 130], [150, 100, 190, 150]]
    for box, mask in zip(target["boxes"].int().tolist(), target["masks"]):  # polygons and RLE, decoded
        expected = torch.zeros(160, 200, dtype=torch.uint8)
        x1, y1, x2, y2 = box
        expected[y1:y2, x1:x2] = 1
        # pycocotools rasterises a polygon's outline one pixel wider than the half-open rectangle
        assert (mask.int() - expected.int()).abs().sum() <= (x2 - x1) + (y2 - y1) + 1
    assert torch.equal(dataset[1][1]["masks"][0, 5:70, 5:60], torch.ones(65, 55, dtype=torch.uint8))  # RLE: exact
    _, crowded = dataset[2]
    assert crowded["labels"].tolist() == [2]  # the crowd region is not a training target
    _, negative = dataset[3]
    assert negative["boxes"].shape == (0, 4) and negative["masks"].shape == (0, 96, 128)


def test_boxes_are_clipped_and_degenerate_ones_skipped_with_a_count(tmp_path, caplog):
    images = [{"id": 1, "file_name": "a.png", "height": 100, "width": 100}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [-10, 50, 40, 70]},  # partly outside: clipped
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [10, 10, 0, 20]},  # zero width
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [120, 10, 20, 20]},  # outside the image
        {"id": 4, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20]},
    ]
    write_dataset(tmp_path, annotations=anns, images=images)
    with caplog.at_level(logging.WARNING):
        dataset = CocoDetection(tmp_path, "val")
    assert "1 annotation(s) left out of training: zero area (ids 2)" in caplog.text
    assert "1 annotation(s) left out of training: outside its image (ids 3)" in caplog.text
    assert dataset.annotations.skipped == {"zero area": 1, "outside its image": 1}
    assert dataset[0][1]["boxes"].tolist() == [[0, 50, 30, 100], [10, 10, 30, 30]]
    # COCOeval still sees every annotation of the file, as written.
    assert [a["bbox"] for a in dataset.annotations.dataset["annotations"]] == [a["bbox"] for a in anns]


def test_coco_2017_names_are_accepted(tmp_path):
    write_dataset(tmp_path, split="train", year="2017")
    annotations, images = find_coco_split(tmp_path, "train")
    assert annotations.name == "instances_train2017.json" and images.name == "train2017"
    assert len(CocoDetection(tmp_path, "train")) == 4


def test_flips_move_boxes_with_masks_and_are_reproducible(tmp_path):
    write_dataset(tmp_path)
    plain = CocoDetection(tmp_path, "val", masks=True)
    flipping = CocoDetection(tmp_path, "val", masks=True, hflip=1.0)
    for i in range(3):
        (image, target), (flipped, ftarget) = plain[i], flipping[i]
        assert torch.equal(flipped, image.flip(-1)) and torch.equal(ftarget["masks"], target["masks"].flip(-1))
        for box, mask in zip(ftarget["boxes"].tolist(), ftarget["masks"]):  # the box of the flipped mask
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert abs(box[0] - xs.min().item()) <= 1 and abs(box[2] - (xs.max().item() + 1)) <= 1
    half = CocoDetection(tmp_path, "val", hflip=0.5, seed=3)

    def draws() -> list[bool]:
        out = []
        for epoch in range(6):
            half.set_epoch(epoch)
            out += [torch.equal(half[i][0], plain[i][0]) for i in range(4)]
        return out

    first = draws()
    assert first == draws() and 0 < sum(first) < 24  # the same flips again; some images flipped, some not


def test_grouped_batches_keep_aspect_groups_and_cover_the_epoch():
    ratios = [1.5 if i % 3 else 0.7 for i in range(23)]
    batches = grouped_batches(ratios, 4, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(23))
    full = [b for b in batches if len(b) == 4]
    mixed = 0
    for b in full:
        if len({ratios[i] >= 1 for i in b}) > 1:
            mixed += 1
    assert mixed <= 1  # only the leftover batch may mix wide and tall images
    assert grouped_batches(ratios, 4, seed=0, epoch=0) == batches != grouped_batches(ratios, 4, seed=0, epoch=1)
    shards = [grouped_batches(ratios, 4, seed=0, epoch=0, rank=r, world_size=3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    assert sorted({i for s in shards for b in s for i in b}) == list(range(23))


# ---------------------------------------------------------------------------------------------- hostile files
def _edit(data: dict, change) -> dict:
    change(data)
    return data


HOSTILE = [
    ("not json", lambda p: p.write_text("{ not json"), "not valid JSON"),
    ("a list", lambda p: p.write_text("[]"), "must hold a JSON object"),
    ("no images", lambda p: p.write_text(json.dumps({"annotations": [], "categories": CATEGORIES})), "no 'images' list"),
    ("no categories", lambda p: p.write_text(json.dumps({"images": [], "annotations": [], "categories": []})), "lists no categories"),
]


def _hostile_change(name):
    return {
        "unknown image": (lambda d: d["annotations"][0].update(image_id=999), "refers to image 999"),
        "unknown category": (lambda d: d["annotations"][0].update(category_id=5), "has category 5"),
        "duplicate annotation id": (lambda d: d["annotations"][1].update(id=1), "annotation id 1 appears twice"),
        "duplicate image id": (lambda d: d["images"][1].update(id=10), "image id 10 appears twice"),
        "bad bbox": (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "4 finite numbers"),
        "nan bbox": (lambda d: d["annotations"][0].update(bbox=[1, 2, float("nan"), 3]), "4 finite numbers"),
        "short polygon": (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4]]), "at least 3"),
        "odd polygon": (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4, 5, 6, 7]]), "at least 3"),
        "rle size": (lambda d: d["annotations"][1].update(segmentation={"size": [1, 1], "counts": [1]}), "RLE size"),
        "rle counts": (lambda d: d["annotations"][1]["segmentation"].update(counts=[5, 5]), "summing to height x width"),
        "crowd value": (lambda d: d["annotations"][0].update(iscrowd=2), "'iscrowd' 2"),
        "absolute file": (lambda d: d["images"][0].update(file_name="/etc/passwd"), "relative to the image folder"),
        "parent file": (lambda d: d["images"][0].update(file_name="../x.png"), "relative to the image folder"),
        "no size": (lambda d: d["images"][0].pop("width"), "positive integer 'width'"),
        "category name": (lambda d: d["categories"][0].update(name=None), "string 'name'"),
    }[name]


@pytest.mark.parametrize("name, write, message", HOSTILE)
def test_malformed_annotation_files_are_clear_errors(tmp_path, name, write, message):
    path = write_dataset(tmp_path)
    write(path)
    with pytest.raises(ValueError, match=message):
        CocoDetection(tmp_path, "val")


@pytest.mark.parametrize("name", [
    "unknown image", "unknown category", "duplicate annotation id", "duplicate image id", "bad bbox", "nan bbox",
    "short polygon", "odd polygon", "rle size", "rle counts", "crowd value", "absolute file", "parent file", "no size",
    "category name",
])
def test_inconsistent_annotations_are_clear_errors(tmp_path, name):
    path = write_dataset(tmp_path)
    change, message = _hostile_change(name)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        CocoDetection(tmp_path, "val")


def test_missing_and_mismatched_images_are_named(tmp_path):
    write_dataset(tmp_path)
    (tmp_path / "val" / "im2.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 image\\(s\\) listed .* missing .*'im2.png'"):
        CocoDetection(tmp_path, "val")
    PIL.Image.new("RGB", (50, 50)).save(tmp_path / "val" / "im2.png")
    with pytest.raises(ValueError, match="im2.png' is 50x50 but instances_val.json says 160x200"):
        CocoDetection(tmp_path, "val")[2]


def test_a_folder_without_a_split_says_what_it_expects(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotations/instances_val.json"):
        CocoDetection(tmp_path, "val")


# ---------------------------------------------------------------------------------------------- the example
def test_the_detection_example_has_exact_boxes_and_is_reproducible(tmp_path):
    first = make_detection_example(tmp_path / "a", n_train=6, n_val=3, size=64, seed=1, backgrounds="synthetic")
    second = make_detection_example(tmp_path / "b", n_train=6, n_val=3, size=64, seed=1, backgrounds="synthetic")
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 11
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    dataset = CocoDetection(first, "train", masks=True)
    assert dataset.annotations.category_ids == list(range(1, 11)) and dataset.id2label[0] == "0"
    count = 0
    for i in range(len(dataset)):
        _, target = dataset[i]
        assert 1 <= len(target["boxes"]) <= 6  # two to six drawn; one without a free place may be left out
        for box, mask in zip(target["boxes"].tolist(), target["masks"]):
            ys, xs = np.nonzero(mask.numpy())
            assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # the mask's tight box, exactly
            count += 1
        # No overlaps: no pixel belongs to two digits, and no two boxes intersect.
        assert int(target["masks"].sum(0).max()) == 1
        boxes = target["boxes"]
        for a in range(len(boxes)):
            for b in range(a):
                (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = boxes[a].tolist(), boxes[b].tolist()
                assert min(ax2, bx2) <= max(ax1, bx1) or min(ay2, by2) <= max(ay1, by1)
    assert count >= 2 * len(dataset)  # dense scenes: at least two digits per image on average
    info = json.loads((first / "annotations" / "instances_val.json").read_text())["info"]
    assert info["backgrounds"] == "synthetic textures"


def test_annotations_without_area_take_their_masks_area_as_coco_defines_it(tmp_path):
    """A missing 'area' was the box's for every annotation. COCO's area is the mask's where there is one (the
    official files', pycocotools' annToRLE + area, detectron2's convert_to_coco_dict): a thin diagonal object has a
    medium-sized box (40 x 40 = 1600 px > 32**2) but a small mask, so APs / APm / APl moved. Each annotation's area
    and the twelve numbers are checked against COCOeval on the same file with pycocotools' areas written in."""
    import pycocotools.mask as mask_utils

    size = 100
    stripe = [10, 10, 14, 10, 50, 46, 50, 50, 46, 50, 10, 14]  # a diagonal band in the box [10, 10, 40, 40]
    square = np.zeros((size, size), np.uint8, order="F")
    square[60:90, 55:95] = 1  # 30 x 40 = 1200 px: medium, in a box given larger than it (a loose box)
    compressed = mask_utils.encode(square)
    uncompressed_counts, value, run = [], 0, 0  # COCO's RLE: runs of the column-major pixels, zeros first
    for pixel in square.flatten(order="F").tolist():
        if pixel != value:
            uncompressed_counts.append(run)
            value, run = pixel, 0
        run += 1
    uncompressed_counts.append(run)
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 40, 40], "segmentation": [stripe], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 17, "bbox": [50, 55, 48, 40], "iscrowd": 0,
         "segmentation": {"size": [size, size], "counts": compressed["counts"].decode("ascii")}},
        {"id": 3, "image_id": 2, "category_id": 17, "bbox": [50, 55, 48, 40], "iscrowd": 0,
         "segmentation": {"size": [size, size], "counts": uncompressed_counts}},
        {"id": 4, "image_id": 2, "category_id": 3, "bbox": [5, 5, 20, 30], "iscrowd": 0},  # box only: 600 px
        {"id": 5, "image_id": 2, "category_id": 3, "bbox": [70, 5, 25, 25], "iscrowd": 0, "segmentation": []},
    ]
    data = {"images": [{"id": i, "file_name": f"{i}.png", "width": size, "height": size} for i in (1, 2)],
            "categories": CATEGORIES, "annotations": annotations}
    without = tmp_path / "without_area.json"
    without.write_text(json.dumps(data))
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCO(str(without))  # pycocotools' own areas: annToRLE then area; the box's where there is no mask
    for ann in reference.dataset["annotations"]:
        ann["area"] = float(mask_utils.area(reference.annToRLE(ann))) if ann.get("segmentation") else ann["bbox"][2] * ann["bbox"][3]
    with_area = tmp_path / "with_area.json"
    with_area.write_text(json.dumps(reference.dataset))

    ours = read_coco_annotations(without)
    areas = {a["id"]: a["area"] for a in ours.dataset["annotations"]}
    assert areas == {a["id"]: a["area"] for a in reference.dataset["annotations"]}
    assert areas[1] < 32**2 < 40 * 40 and areas[2] == areas[3] == 1200 and areas[4] == 600 and areas[5] == 625
    # detections: the stripe found, one of the squares found, the box-only object missed, a false positive
    results = [
        {"image_id": 1, "category_id": 3, "bbox": [10, 10, 40, 40], "score": 0.9},
        {"image_id": 1, "category_id": 17, "bbox": [50, 55, 48, 40], "score": 0.8},
        {"image_id": 2, "category_id": 17, "bbox": [0, 60, 30, 30], "score": 0.7},
        {"image_id": 2, "category_id": 3, "bbox": [70, 5, 25, 25], "score": 0.6},
    ]
    got = coco_evaluate(ours, results, ["bbox"])["bbox"]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(with_area))
        evaluator = COCOeval(gt, gt.loadRes([dict(r) for r in results]), "bbox")
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    assert [got[name] for name in BOX_METRICS] == pytest.approx(list(evaluator.stats), abs=1e-12)
    assert got["APs"] > 0.0  # the stripe is a small object now (its box made it medium)


def test_a_polygon_far_outside_its_image_is_refused_before_pycocotools_rasterises_it(tmp_path):
    """pycocotools rasterises a polygon along its edges, 5 points a pixel in C ints: a point at 1e30 killed the
    process with a segmentation fault as the file was read (an annotation without 'area' gets its mask's), 1e9 takes
    gigabytes. Such a point is refused, naming the annotation; a polygon crossing the image's edges by less than the
    image's size keeps pycocotools' own area."""
    import pycocotools.mask as mask_utils

    path = write_dataset(tmp_path)
    data = json.loads(path.read_text())
    image = next(i for i in data["images"] if i["id"] == data["annotations"][0]["image_id"])
    w, h = image["width"], image["height"]
    for far in ([[0, 0, 1e30, 0, 1e30, 1e30]], [[0, 0, 5, 0, 5, -2.5 * h]]):
        data["annotations"][0].pop("area", None)
        data["annotations"][0]["segmentation"] = far
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=r"annotation 1: polygon point \(.*\) lies more than the image's size"):
            read_coco_annotations(path)
    crossing = [-w / 2, -h / 2, 1.5 * w, -h / 2, 1.5 * w, 1.5 * h]  # a triangle over the image and beyond two edges
    data["annotations"][0]["segmentation"] = [crossing]
    path.write_text(json.dumps(data))
    area = {a["id"]: a["area"] for a in read_coco_annotations(path).dataset["annotations"]}[1]
    expected = mask_utils.area(mask_utils.merge(mask_utils.frPyObjects([crossing], h, w)))
    assert area == float(expected) and 0 < area < w * h
