"""Dense prediction on real photographs (scikit-learn's two sample images) against the protocols' own reference
computations: COCO detection files with every irregularity real files have (category ids 1, 5, 90 and one without
objects, images without objects, crowd RLE as a list and as a compressed string, polygons of several parts, boxes at
the border or disagreeing with their mask, sub-folders, unsorted ids from 2**40, an EXIF-rotated photograph) scored
by ``pvtv2 eval --task detection`` and written by ``pvtv2 detect --json`` (boxes, labels, masks as COCO RLE), both
against pycocotools' ``COCOeval`` run here on the file itself; segmentation masks scored by ``pvtv2 eval --task
segmentation`` against mmsegmentation's reference (``tests/data/dense_references.py``); depth PNGs read at KITTI's and
NYU's scales and scored against BTS's errors."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

import pvtv2.inference  # noqa: E402
from pvtv2 import PvtV2Config  # noqa: E402
from pvtv2.cli import main  # noqa: E402

PHOTOS = [np.asarray(p) for p in sklearn_datasets.load_sample_images().images]  # two (427, 640, 3) uint8 photographs


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random crop of one of the photographs, resized to (height, width) where the crop is smaller."""
    photo = PHOTOS[int(rng.integers(2))]
    h, w = min(height, photo.shape[0]), min(width, photo.shape[1])
    y, x = int(rng.integers(0, photo.shape[0] - h + 1)), int(rng.integers(0, photo.shape[1] - w + 1))
    crop = PIL.Image.fromarray(photo[y:y + h, x:x + w])
    if (h, w) != (height, width):
        crop = crop.resize((width, height), PIL.Image.Resampling.BILINEAR)
    return np.asarray(crop)


def _json_out(capsys, *argv) -> object:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------------------------------------- detection
class _Answers(torch.nn.Module):
    """A stand-in detector: its outputs per image are given, found by the image's pixels; classes ``id2label``."""

    def __init__(self, id2label: dict[int, str], answers: dict[bytes, dict]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = PvtV2Config(id2label=id2label, detector="mask_rcnn")
        self.answers = answers

    def forward(self, images):
        return [copy.deepcopy(self.answers[image.numpy().tobytes()]) for image in images]


def _paste(rng: np.random.Generator, pixels: np.ndarray) -> np.ndarray:
    """Paste an object (a filled ellipse or rectangle of one colour) somewhere in the picture, at times touching its
    border; its mask."""
    h, w = pixels.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    oh, ow = int(rng.integers(6, h * 3 // 4)), int(rng.integers(6, w * 3 // 4))
    y0 = 0 if rng.random() < 0.2 else (h - oh if rng.random() < 0.25 else int(rng.integers(0, h - oh + 1)))
    x0 = 0 if rng.random() < 0.2 else (w - ow if rng.random() < 0.25 else int(rng.integers(0, w - ow + 1)))
    if rng.random() < 0.5:
        mask = (yy >= y0) & (yy < y0 + oh) & (xx >= x0) & (xx < x0 + ow)
    else:
        cy, cx = y0 + oh / 2, x0 + ow / 2
        mask = ((yy + 0.5 - cy) / (oh / 2)) ** 2 + ((xx + 0.5 - cx) / (ow / 2)) ** 2 <= 1
    pixels[mask] = rng.integers(0, 256, 3)
    return mask


def _box_of(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


def _polygons(mask: np.ndarray) -> list[list[float]]:
    """The mask's rows' runs as rectangles, several parts of one object (pycocotools merges them)."""
    parts = []
    for y in np.flatnonzero(mask.any(1))[::3]:
        band = mask[y:y + 3].any(0)
        xs = np.flatnonzero(band)
        x1, x2, y2 = float(xs.min()), float(xs.max() + 1), float(min(y + 3, mask.shape[0]))
        parts.append([x1, float(y), x2, float(y), x2, y2, x1, y2])
    return parts


def write_real_coco(rng: np.random.Generator, root) -> dict:
    """``root/annotations/instances_val.json`` and ``root/val/<sub-folders>/*.png`` of cropped photographs with pasted
    objects; one photograph stored turned, with EXIF orientation 6, its annotations of the upright picture."""
    categories = [{"id": 90, "name": "kite"}, {"id": 1, "name": "person"}, {"id": 42, "name": "nothing here"},
                  {"id": 5, "name": "plane"}]
    with_objects = [90, 1, 5]
    images, annotations, pictures = [], [], {}
    ids = [2**40 + int(v) for v in rng.permutation(1000)[:5]]  # not from 1, not sorted
    ann_id = 7 * 2**40
    for n, image_id in enumerate(ids):
        height, width = int(rng.integers(60, 260)), int(rng.integers(60, 260))  # objects of all three COCO sizes
        pixels = _photo(rng, height, width).copy()
        name = f"set{n % 2}/part {n}/{image_id}.png" if n else f"turned/{image_id}.jpg"
        count = 0 if n == 3 else int(rng.integers(1, 5))  # image 3: no annotation
        for k in range(count):
            mask = _paste(rng, pixels)
            category = int(rng.choice(with_objects))
            box = _box_of(mask)
            kind = ["polygons", "rle", "compressed", "crowd-list", "crowd-string"][int(rng.integers(5))]
            if kind in ("polygons",):
                segmentation = _polygons(mask)
            else:
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                if kind in ("compressed", "crowd-string"):
                    segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
                else:
                    flat = mask.flatten(order="F").astype(np.int64)
                    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
                    segmentation = {"size": [height, width], "counts": np.diff(np.concatenate([[0], edges])).tolist()}
            if k == 1:  # a box that disagrees with its mask (shifted, clipped to the image)
                box = [max(box[0] - 3.0, 0.0), box[1], box[2] * 0.75, box[3]]
            area = float(mask_utils.area(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))))
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": category, "bbox": box,
                                "segmentation": segmentation, "area": area,
                                "iscrowd": int(kind.startswith("crowd"))})
            ann_id -= int(rng.integers(1, 1000))
        path = root / "val" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if n == 0:  # stored turned a quarter clockwise from upright; EXIF orientation 6 turns it back
            stored = PIL.Image.fromarray(pixels).transpose(PIL.Image.Transpose.ROTATE_90)
            exif = PIL.Image.Exif()
            exif[0x0112] = 6
            stored.save(path, exif=exif.tobytes(), quality=100, subsampling=0)
            pixels = np.asarray(PIL.Image.open(path).transpose(PIL.Image.Transpose.ROTATE_270).convert("RGB"))
        else:
            PIL.Image.fromarray(pixels).save(path)
        pictures[image_id] = pixels
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    data = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / "instances_val.json").write_text(json.dumps(data))
    return {"data": data, "pictures": pictures}


def _detections(rng: np.random.Generator, data: dict, height: int, width: int, image_id: int) -> dict:
    """Some of the image's objects found again (jittered boxes on a 1/4-pixel grid, masks shifted), some false
    detections (the category without objects among them); labels are the model's (categories sorted by id), scores
    distinct multiples of 1e-4."""
    label_of = {90: 3, 1: 0, 42: 2, 5: 1}
    boxes, labels, masks = [], [], []
    for ann in data["annotations"]:
        if ann["image_id"] != image_id or rng.random() < 0.2:
            continue
        x, y, w, h = ann["bbox"]
        jitter = rng.integers(-8, 9, 4) / 4
        x1, y1 = np.clip([x + jitter[0], y + jitter[1]], 0, [width - 1, height - 1])
        boxes.append([x1, y1, min(max(x + w + jitter[2], x1 + 1), width), min(max(y + h + jitter[3], y1 + 1), height)])
        same = rng.random() < 0.8
        labels.append(label_of[ann["category_id"]] if same else int(rng.integers(4)))
        rle = ann["segmentation"]
        if isinstance(rle, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(rle, height, width))
        elif isinstance(rle["counts"], list):
            rle = mask_utils.frPyObjects(rle, height, width)
        shift = rng.integers(-2, 3, 2)
        masks.append(np.roll(mask_utils.decode(rle), tuple(shift), (0, 1)) * rng.uniform(0.4, 1.0))
    for _ in range(int(rng.integers(0, 4))):
        x1, y1 = rng.integers(0, width - 4) + 0.25, rng.integers(0, height - 4) + 0.5
        boxes.append([x1, y1, min(x1 + rng.integers(2, 40), width), min(y1 + rng.integers(2, 40), height)])
        labels.append(int(rng.integers(4)))
        mask = np.zeros((height, width))
        mask[int(y1):int(boxes[-1][3]), int(x1):int(boxes[-1][2])] = rng.uniform(0.3, 1.0)
        masks.append(mask)
    n = len(boxes)
    scores = rng.permutation(np.arange(1, 10000))[:n] / 10000
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "scores": torch.tensor(scores, dtype=torch.float32),
            "masks": torch.tensor(np.array(masks), dtype=torch.float32).reshape(n, 1, height, width)}


def _cocoeval(gt: COCO, results: list[dict], iou_type: str) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


BOX_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@pytest.mark.parametrize("seed", range(4))
def test_eval_and_detect_on_real_photographs_are_cocoeval_on_the_file(tmp_path, capsys, monkeypatch, seed):
    """``pvtv2 eval --task detection`` prints COCOeval's twelve numbers (box and mask) run here on the annotation
    file with the detections written by hand; ``pvtv2 detect --json`` writes, for every image of the folder
    (sub-folders, the EXIF-turned one upright), boxes x1 y1 x2 y2, model labels and masks as COCO RLE that, turned
    into COCO results here, score the same."""
    logging.disable(logging.WARNING)
    try:
        rng = np.random.default_rng([36, seed])
        root = tmp_path / "coco"
        written = write_real_coco(rng, root)
        data, pictures = written["data"], written["pictures"]
        category_ids = sorted(c["id"] for c in data["categories"])  # the model's labels: categories sorted by id
        id2label = {i: {c["id"]: c["name"] for c in data["categories"]}[c] for i, c in enumerate(category_ids)}
        answers, outputs = {}, {}
        for image in data["images"]:
            pixels = pictures[image["id"]]
            outputs[image["id"]] = _detections(rng, data, image["height"], image["width"], image["id"])
            key = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255).contiguous().numpy().tobytes()
            answers[key] = outputs[image["id"]]
        assert len(answers) == len(outputs)
        model = _Answers(id2label, answers)
        monkeypatch.setattr(pvtv2.inference, "load_detector", lambda *args, **kwargs: model)

        results = []
        for image_id, out in outputs.items():
            for box, label, score, mask in zip(out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist(),
                                               out["masks"][:, 0].numpy()):
                rle = mask_utils.encode(np.asfortranarray((mask >= 0.5).astype(np.uint8)))
                results.append({"image_id": image_id, "category_id": category_ids[label], "score": score,
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                "segmentation": {"size": rle["size"], "counts": rle["counts"]}})
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(root / "annotations" / "instances_val.json"))
        expected_box = _cocoeval(gt, results, "bbox")
        # masks scored by their own area (torchvision's reference scripts and mmdetection write no box with them)
        expected_mask = _cocoeval(gt, [{k: v for k, v in r.items() if k != "bbox"} for r in results], "segm")
        assert expected_box[0] > 0 and expected_mask[0] > 0

        got = _json_out(capsys, "eval", "--task", "detection", "--data", str(root), "--model", "stand-in", "--json",
                        "--batch-size", str(1 + seed % 3), "--no-progress")
        assert got["detections"] == len(results) and got["images"] == len(data["images"])
        assert [got["box"][k] for k in BOX_KEYS] == pytest.approx(expected_box, abs=1e-12)
        assert [got["mask"][k] for k in BOX_KEYS] == pytest.approx(expected_mask, abs=1e-12)

        found = _json_out(capsys, "detect", str(root / "val"), "--model", "stand-in", "--json", "--score-threshold",
                          "0", "--no-progress")
        id_of = {str(root / "val" / image["file_name"]): image["id"] for image in data["images"]}
        assert sorted(entry["image"] for entry in found) == sorted(id_of)
        converted = []
        for entry in found:
            image = next(im for im in data["images"] if im["id"] == id_of[entry["image"]])
            assert (entry["width"], entry["height"]) == (image["width"], image["height"])  # the upright frame
            masks = outputs[image["id"]]["masks"][:, 0].numpy() >= 0.5
            assert [d["mask_pixels"] for d in entry["detections"]] == masks.sum((1, 2)).tolist()
            for d, mask in zip(entry["detections"], masks):
                np.testing.assert_array_equal(mask_utils.decode(d["mask"]), mask)  # the JSON's text, as it is
                x1, y1, x2, y2 = d["box"]
                converted.append({"image_id": image["id"], "category_id": category_ids[d["index"]],
                                  "bbox": [x1, y1, x2 - x1, y2 - y1], "score": d["score"], "segmentation": d["mask"]})
        assert len(converted) == len(results)
        assert _cocoeval(gt, converted, "bbox") == pytest.approx(expected_box, abs=1e-12)
        masks_only = [{k: v for k, v in r.items() if k != "bbox"} for r in converted]
        assert _cocoeval(gt, masks_only, "segm") == pytest.approx(expected_mask, abs=1e-12)
    finally:
        logging.disable(logging.NOTSET)


def test_detection_masks_as_coco_rle_decode_to_themselves():
    """``coco_rle`` (the masks of ``pvtv2 detect --json``) read back through JSON by pycocotools' ``mask.decode``:
    random masks of photographs' objects, masks starting with an object pixel, empty and full masks, long runs after
    short ones, non-square masks (whose size order and column-major runs a transposition would break)."""
    from pvtv2.inference import coco_rle

    rng = np.random.default_rng(3600)
    masks = [np.zeros((7, 5), bool), np.ones((7, 5), bool), np.eye(6, 9, dtype=bool), np.eye(1, 1, dtype=bool)]
    for _ in range(40):
        height, width = int(rng.integers(1, 90)), int(rng.integers(1, 90))
        mask = _paste(rng, np.zeros((max(height, 14), max(width, 14), 3), np.uint8))[:height, :width]
        if rng.random() < 0.5:
            mask = mask ^ (rng.random((height, width)) < rng.choice([0.01, 0.5]))
        masks.append(mask)
    masks.append(np.pad(np.ones((300, 300), bool), ((0, 0), (700, 1))))  # runs past 2**17 next to runs of 1
    for mask in masks:
        got = json.loads(json.dumps(coco_rle(mask)))
        assert got["size"] == list(mask.shape)
        np.testing.assert_array_equal(mask_utils.decode(got).astype(bool), mask)
        assert mask_utils.area(got) == mask.sum()


# ---------------------------------------------------------------------------------------------- segmentation
def _segmentation_scene(rng: np.random.Generator, height: int, width: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A photograph crop with objects of classes 1 .. k-1 pasted on it (0: the photograph), a band of unlabelled
    pixels (255) along an object's edge; (rgb, labels)."""
    rgb = _photo(rng, height, width).copy()
    labels = np.zeros((height, width), dtype=np.int64)
    for _ in range(int(rng.integers(1, 5))):
        mask = _paste(rng, rgb)
        labels[mask] = int(rng.integers(1, k))
        edge = mask ^ np.roll(mask, 1, 0)
        labels[edge] = 255
    return rgb, labels


@pytest.mark.parametrize("seed", range(2))
def test_segmentation_eval_on_real_photographs_is_mmsegmentations(tmp_path, capsys, monkeypatch, seed):
    """``pvtv2 eval --task segmentation`` of a float64 tiny SegFormer on photographs of sizes that no crop or stride
    divides, whole (at the config's size) and sliding window (over the image, and over it resized by --size), plain
    and ADE20K-style (``--reduce-labels``) masks in 8-bit grey, palette and 16-bit PNG, one image EXIF-turned:
    mmsegmentation's ``slide_inference`` / resize-and-upsample and its ``intersect_and_union`` written out; the same
    labels in grey and palette PNG score the same."""
    from conftest import TINY_SMALL_IMAGES, random_weights_
    from dense_references import mmseg_scores, mmseg_slide, write_mask

    from pvtv2.models.segmentation import PvtV2ForSemanticSegmentation

    rng = np.random.default_rng([3636, seed])
    k = int(rng.integers(3, 6))
    torch.manual_seed(seed)
    config = PvtV2Config(**TINY_SMALL_IMAGES, num_labels=k, decoder_hidden_size=16, classifier_dropout_prob=0.0,
                         image_size=int(rng.choice([40, 56, 72])))
    model = random_weights_(PvtV2ForSemanticSegmentation(config), seed=36 + seed).double().eval()
    monkeypatch.setattr(pvtv2.inference, "load_segmenter", lambda *args, **kwargs: model)
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    crop = (int(rng.integers(32, 48)),) * 2  # the command's windows are square, 32 px or more
    stride = (int(rng.integers(7, crop[0])),) * 2
    sizes = [(int(rng.integers(33, 90)), int(rng.integers(33, 90))) for _ in range(3)]
    scenes = [_segmentation_scene(rng, h, w, k) for h, w in sizes]
    resize_to = (int(rng.integers(40, 100)), int(rng.integers(40, 100)))  # slide over a resized image
    scores = {}
    for reduce in (False, True):
        for modes in (("L", "P", "I;16"), ("P", "L", "L")):
            root = tmp_path / f"{reduce}-{''.join(modes)}"
            (root / "val/images").mkdir(parents=True)
            (root / "val/masks").mkdir(parents=True)
            for n, ((rgb, labels), mode) in enumerate(zip(scenes, modes)):
                raw = np.where(labels == 255, 0, labels + 1) if reduce else labels
                write_mask(root / f"val/masks/{n}.png", raw, mode, rng)
                if n == 0:  # stored turned, EXIF orientation 8 turns it back (the mask is of the upright picture)
                    stored = PIL.Image.fromarray(rgb).transpose(PIL.Image.Transpose.ROTATE_270)
                    exif = PIL.Image.Exif()
                    exif[0x0112] = 8
                    stored.save(root / f"val/images/{n}.png", exif=exif.tobytes())
                else:
                    PIL.Image.fromarray(rgb).save(root / f"val/images/{n}.png")
            for mode in ("whole", "slide", "slide-resized"):
                preds = []
                for rgb, _ in scenes:
                    size = tuple(config.image_size) if mode == "whole" else resize_to
                    if mode != "slide":  # resized as transformers' processor: PIL bilinear on the 8-bit image
                        resized = np.asarray(PIL.Image.fromarray(rgb).resize(size[::-1], PIL.Image.Resampling.BILINEAR))
                    else:
                        resized = rgb
                    scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
                    pixels = torch.from_numpy(((scaled - mean) / std).transpose(2, 0, 1).copy())[None].double()
                    with torch.no_grad():
                        if mode.startswith("slide"):
                            logits = mmseg_slide(model, pixels, crop, stride)
                        else:
                            # mmsegmentation's whole_inference: upsampled to the input (encode_decode), then
                            # to the original size (rescale): two bilinear steps
                            logits = torch.nn.functional.interpolate(model(pixels).logits, size=size,
                                                                     mode="bilinear", align_corners=False)
                        logits = torch.nn.functional.interpolate(logits, size=rgb.shape[:2], mode="bilinear",
                                                                 align_corners=False)
                    preds.append(logits[0].argmax(0).numpy())
                raws = [np.where(lab == 255, 0, lab + 1) if reduce else lab for _, lab in scenes]
                ref = mmseg_scores(preds, raws, k, 255, reduce)
                argv = ["eval", "--task", "segmentation", "--data", str(root), "--model", "stand-in", "--json",
                        "--no-progress", "--mode", mode.split("-")[0]] + (["--reduce-labels"] if reduce else [])
                if mode.startswith("slide"):
                    argv += ["--crop", str(crop[0]), "--stride", str(stride[0])]
                if mode == "slide-resized":
                    argv += ["--size", f"{resize_to[0]}x{resize_to[1]}"]
                got = _json_out(capsys, *argv)
                per_class = np.array([np.nan if v is None else v for v in got["per_class_iou"].values()])
                np.testing.assert_allclose(per_class, ref["IoU"], rtol=0, atol=1e-12)
                assert got["mean_iou"] == pytest.approx(ref["mIoU"], abs=1e-12)
                assert got["pixel_accuracy"] == pytest.approx(ref["aAcc"], abs=1e-12)
                scores.setdefault((reduce, mode), []).append(got["mean_iou"])
    assert all(len(set(v)) == 1 for v in scores.values())  # grey or palette PNG: the same labels, the same scores


def test_masks_of_more_classes_than_the_model_are_refused_naming_the_file(tmp_path, capsys, monkeypatch):
    """A mask holding class 3 for a model of 3 classes (0 .. 2), plain or ADE20K-style: a clear error naming the
    mask and the class count, not a score."""
    from conftest import TINY_SMALL_IMAGES

    from pvtv2.models.segmentation import PvtV2ForSemanticSegmentation

    torch.manual_seed(0)
    model = PvtV2ForSemanticSegmentation(PvtV2Config(**TINY_SMALL_IMAGES, num_labels=3, image_size=32)).eval()
    monkeypatch.setattr(pvtv2.inference, "load_segmenter", lambda *args, **kwargs: model)
    rng = np.random.default_rng(36)
    for reduce in (False, True):
        root = tmp_path / str(reduce)
        (root / "val/images").mkdir(parents=True)
        (root / "val/masks").mkdir(parents=True)
        rgb, labels = _segmentation_scene(rng, 40, 50, 3)
        labels[5, 5] = 3
        PIL.Image.fromarray(rgb).save(root / "val/images/a.png")
        PIL.Image.fromarray(np.where(labels == 255, 0, labels + 1).astype(np.uint8) if reduce
                            else labels.astype(np.uint8), "L").save(root / "val/masks/a.png")
        capsys.readouterr()
        assert main(["eval", "--task", "segmentation", "--data", str(root), "--model", "m", "--no-progress"]
                    + (["--reduce-labels"] if reduce else [])) != 0
        err = capsys.readouterr().err
        assert "a.png" in err and "has class 3 but the model has 3 classes" in err, err
        assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------- depth
@pytest.mark.parametrize("scale, max_depth", [(256.0, 80.0), (1000.0, 10.0)])
def test_depth_pngs_of_kitti_and_nyu_scales_score_as_bts(tmp_path, scale, max_depth):
    """Depth of a real photograph's brightness (0 = no measurement where it is darkest, some depth beyond the cap)
    written as 16-bit PNG integers depth x scale (KITTI's 256, NYU's 1000), read by ``DepthFolder`` at that scale and
    scored by the validation metrics: BTS's errors on the integers divided here, the cap and the zeros left out."""
    from dense_references import bts_metrics

    from pvtv2.data.depth import DepthFolder
    from pvtv2.training.depth import depth_metric_sums, finish_depth_metrics
    from pvtv2.training.depth_task import MIN_DEPTH

    rng = np.random.default_rng([36, int(scale)])
    (tmp_path / "val/images").mkdir(parents=True)
    (tmp_path / "val/depth").mkdir(parents=True)
    truths, preds = [], []
    for n in range(3):
        rgb = _photo(rng, 64, 96)
        grey = rgb.astype(np.float64).mean(2) / 255
        stored = np.round(grey * max_depth * 1.1 * scale)  # about a tenth beyond the cap
        stored[grey < np.quantile(grey, 0.1)] = 0
        PIL.Image.fromarray(stored.astype(np.uint16)).save(tmp_path / f"val/depth/{n}.png")
        PIL.Image.fromarray(rgb).save(tmp_path / f"val/images/{n}.jpg", quality=95)
        truths.append(stored / scale)
        preds.append(np.abs(truths[-1] + rng.normal(0, max_depth / 20, truths[-1].shape)) + 0.01)
    data = DepthFolder(tmp_path, "val", (64, 96), depth_scale=scale)
    got = [data[n][1].numpy() for n in range(3)]
    for mine, truth in zip(got, truths):
        np.testing.assert_array_equal(mine, truth.astype(np.float32))
    sums = depth_metric_sums(torch.tensor(np.array(preds)), torch.tensor(np.array(got)), min_depth=MIN_DEPTH,
                             max_depth=max_depth)
    metrics = finish_depth_metrics(sums)
    refs = [bts_metrics(p, t.astype(np.float32), MIN_DEPTH, max_depth, crop=False) for p, t in zip(preds, got)]
    scored = [r for r in refs if r is not None]  # a bright sky's crop may hold nothing under the cap: left out
    assert scored
    for name in scored[0]:
        assert metrics[name] == pytest.approx(np.mean([r[name] for r in scored]), rel=1e-12, abs=1e-15), name
    assert (metrics["images"], metrics["images_without_depth"]) == (len(scored), 3 - len(scored))
