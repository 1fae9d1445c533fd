"""COCO-format detection data: annotation files read and checked, images with boxes, labels and masks, aspect-ratio
grouped batches, and COCO's own metrics (pycocotools' ``COCOeval``).

Folder layout (what ``pvtv2 train --task detection`` and ``pvtv2 eval --task detection`` read)::

    DIR/annotations/instances_train.json   DIR/train/<file_name>
    DIR/annotations/instances_val.json     DIR/val/<file_name>

COCO 2017's own names (``instances_train2017.json`` and ``train2017/``) are accepted too.

Checks. An annotation file that is not COCO (bad JSON, missing lists, an annotation naming an unknown image or
category, duplicate ids, a malformed box or mask) is a ``ValueError`` naming the file and the entry; a listed image
that is missing is a ``FileNotFoundError`` naming it. Boxes are clipped to their image; a box with no area, before or
after clipping, is left out of training with a count in the log (COCO itself has a few), as are crowd regions
(``iscrowd=1``, which COCOeval uses as "ignore" regions). Images without annotations are kept as negatives. An
annotation without ``area`` gets COCO's: its mask's pixels where it has a mask, else its box's (COCOeval's small /
medium / large ranges read it).

Labels. The categories, sorted by id, become the contiguous labels ``0 .. K-1`` of the model's ``id2label``; any ids
work (COCO's run from 1 to 90 with gaps). :attr:`CocoAnnotations.category_ids` maps labels back for evaluation.

pycocotools is an optional dependency (``pip install 'pvtv2[detection]'``), imported where it is used.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import math
import numbers
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..fileio import existing_folder
from ..runtime import import_optional
from .processing import load_image

__all__ = [
    "BOX_METRICS",
    "CocoAnnotations",
    "CocoDetection",
    "find_coco_split",
    "read_coco_annotations",
    "collate_detection",
    "image_to_tensor",
    "grouped_batches",
    "detections_to_coco",
    "coco_evaluate",
    "import_pycocotools",
]

logger = logging.getLogger(__name__)

# COCOeval's twelve summary numbers, in the order it prints them.
BOX_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def import_pycocotools() -> Any:
    """pycocotools' ``mask`` module (importing the package), or a clear error naming the extra that installs it."""
    import_optional("pycocotools", "detection", "COCO data and metrics")
    return import_optional("pycocotools.mask", "detection", "COCO data and metrics")


# ---------------------------------------------------------------------------------------------- files
def find_coco_split(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of ``split`` under ``root``: ``annotations/instances_{split}.json`` and
    ``{split}/``, or COCO 2017's ``instances_{split}2017.json`` and ``{split}2017/``."""
    base = existing_folder(root)
    for name in (split, f"{split}2017"):
        annotations, images = base / "annotations" / f"instances_{name}.json", base / name
        if annotations.is_file() and images.is_dir():
            return annotations, images
    raise FileNotFoundError(
        f"no COCO-format {split} split in {os.fspath(base)!r}: expected annotations/instances_{split}.json and a "
        f"{split}/ image folder (or COCO 2017's instances_{split}2017.json and {split}2017/)"
    )


@dataclass
class CocoAnnotations:
    """The checked content of a COCO annotation file.

    ``images``: ``{id, file_name, width, height}`` per image, in file order. ``category_ids`` / ``id2label``: the
    categories sorted by id, as labels ``0 .. K-1``. ``objects``: per image id, the annotations training uses
    (``bbox`` clipped, in x1 y1 x2 y2, ``label``, ``segmentation``, ``id``). ``skipped``: why others were left out.
    ``dataset``: the file's content with COCO's optional fields filled in, for ``COCOeval``.
    """

    path: Path
    images: list[dict[str, Any]]
    category_ids: list[int]
    id2label: dict[int, str]
    objects: dict[int, list[dict[str, Any]]]
    skipped: Counter = field(default_factory=Counter)
    dataset: dict[str, Any] = field(default_factory=dict)

    @property
    def category_to_label(self) -> dict[int, int]:
        return {c: i for i, c in enumerate(self.category_ids)}

    def coco(self) -> Any:
        """A pycocotools ``COCO`` of :attr:`dataset` (the ground truth of ``COCOeval``), built without printing."""
        import_pycocotools()
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = self.dataset
            gt.createIndex()
        return gt


_MAX_SIDE = 2**31 - 1  # the largest image width or height an annotation file may state
_MAX_POLYGON_LENGTH = 10**7  # pixels along a polygon's edges: some 500 MB of pycocotools' rasterisation


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite number, as a JSON file, a caller's pycocotools ``COCO`` or a detection mask holds one (numpy's
    too); not a bool."""
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond float's range (JSON has no limit): an OverflowError came out of reading
        return False


def read_coco_annotations(path: str | os.PathLike) -> CocoAnnotations:
    """Read and check a COCO annotation file (see the module docstring for what is an error and what is skipped)."""
    path = Path(path)
    where = os.fspath(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{where!r} is not valid JSON: {err}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{where!r} is not a UTF-8 text file") from None
    except (ValueError, RecursionError) as err:
        # Valid JSON that Python's reader refuses: an integer of more than 4300 digits (a ValueError that named no
        # file) or arrays nested thousands deep (a RecursionError and its traceback)
        raise ValueError(f"{where!r} cannot be read as JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where!r} must hold a JSON object with 'images', 'annotations' and 'categories', got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{where!r} has no {key!r} list: not a COCO instances file")
    if not data["categories"]:
        raise ValueError(f"{where!r} lists no categories")

    images: list[dict[str, Any]] = []
    by_id: dict[int, dict[str, Any]] = {}
    for n, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not _is_int(image.get("id")):
            raise ValueError(f"{where!r}: images[{n}] needs an integer 'id'")
        name = image.get("file_name")
        if not isinstance(name, str) or not name or PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            raise ValueError(f"{where!r}: image {image['id']} needs a 'file_name' relative to the image folder, got {name!r}")
        width, height = image.get("width"), image.get("height")
        # bounded: a side of 10**400 passed and then stopped the aspect-ratio grouping with an OverflowError
        if not (_is_int(width) and _is_int(height) and 0 < width <= _MAX_SIDE and 0 < height <= _MAX_SIDE):
            raise ValueError(f"{where!r}: image {image['id']} needs positive integer 'width' and 'height' (at most "
                             f"{_MAX_SIDE}), got {repr(width)[:40]} x {repr(height)[:40]}")
        if image["id"] in by_id:
            raise ValueError(f"{where!r}: image id {image['id']} appears twice")
        entry = {"id": image["id"], "file_name": name, "width": width, "height": height}
        by_id[image["id"]] = entry
        images.append(entry)

    names: dict[int, str] = {}
    for n, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or not _is_int(category.get("id")) or not isinstance(category.get("name"), str):
            raise ValueError(f"{where!r}: categories[{n}] needs an integer 'id' and a string 'name', got {category!r}")
        if category["id"] in names:
            raise ValueError(f"{where!r}: category id {category['id']} appears twice")
        names[category["id"]] = category["name"]
    category_ids = sorted(names)
    label_of = {c: i for i, c in enumerate(category_ids)}

    objects: dict[int, list[dict[str, Any]]] = {image["id"]: [] for image in images}
    skipped: Counter = Counter()
    examples: dict[str, list[int]] = {}
    seen: set[int] = set()
    beyond: list[int] = []  # boxes reaching more than a pixel outside their image
    eval_annotations = []
    for n, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            raise ValueError(f"{where!r}: annotations[{n}] needs an integer 'id'")
        ident = ann["id"]
        if ident in seen:
            raise ValueError(f"{where!r}: annotation id {ident} appears twice")
        seen.add(ident)
        for key in ("image_id", "category_id"):
            # as the images' and categories' own ids: a list or an object stopped the reading with "unhashable type",
            # naming no file, and true or 1.0 took image (or category) 1
            if not _is_int(ann.get(key)):
                raise ValueError(f"{where!r}: annotation {ident} needs an integer {key!r}, got {ann.get(key)!r}"[:300])
        if ann.get("image_id") not in by_id:
            raise ValueError(f"{where!r}: annotation {ident} refers to image {ann.get('image_id')!r}, which 'images' does not list")
        if ann.get("category_id") not in names:
            raise ValueError(
                f"{where!r}: annotation {ident} has category {ann.get('category_id')!r}, which 'categories' does not "
                f"list (known: {category_ids[:20]})"
            )
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise ValueError(f"{where!r}: annotation {ident} needs 'bbox' [x, y, width, height] of 4 finite numbers, got {bbox!r}")
        if bbox[2] < 0 or bbox[3] < 0:
            # Not a box without area (those are skipped below) but a malformed one: COCOeval would take its negative
            # area as outside every size range and ignore the object without a word.
            raise ValueError(f"{where!r}: annotation {ident} has 'bbox' {bbox!r} with a negative width or height; "
                             f"COCO boxes are [x, y, width, height]")
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1) or isinstance(crowd, float):
            raise ValueError(f"{where!r}: annotation {ident} has 'iscrowd' {crowd!r}; expected 0 or 1")
        image = by_id[ann["image_id"]]
        segmentation = ann.get("segmentation")
        if segmentation is not None and segmentation != []:
            _check_segmentation(segmentation, image, f"{where!r}: annotation {ident}")
        area = ann.get("area")
        if area is not None and not (_is_number(area) and area >= 0):
            # a negative area puts the object outside every size range: COCOeval would ignore it without a word
            raise ValueError(f"{where!r}: annotation {ident} has 'area' {area!r}; expected a non-negative number")
        if area is None:
            # COCO's area is the mask's where there is one (its size ranges, APs / APm / APl, are of masks), else the box's
            has_mask = segmentation is not None and segmentation != []
            # in floats: two integer sides of 10**200 (each a float) made an integer area beyond float's range
            if has_mask:
                area = _mask_area(segmentation, image["height"], image["width"])
            else:
                area = float(bbox[2]) * float(bbox[3])
        eval_annotations.append({**ann, "iscrowd": int(crowd), "area": float(area)})

        x, y, w, h = (float(v) for v in bbox)
        if not crowd and (x < -1 or y < -1 or x + w > image["width"] + 1 or y + h > image["height"] + 1):
            beyond.append(ident)
        if w <= 0 or h <= 0:
            reason = "zero area"
        else:
            x1, y1 = min(max(x, 0.0), image["width"]), min(max(y, 0.0), image["height"])
            x2, y2 = min(max(x + w, 0.0), image["width"]), min(max(y + h, 0.0), image["height"])
            reason = "outside its image" if x2 <= x1 or y2 <= y1 else ("crowd region" if crowd else "")
        if reason:
            skipped[reason] += 1
            examples.setdefault(reason, []).append(ident)
            continue
        objects[image["id"]].append({
            "id": ident, "bbox": [x1, y1, x2, y2], "label": label_of[ann["category_id"]], "segmentation": segmentation,
        })
    if beyond:
        # Clipped for training, scored as written: said, since [x1, y1, x2, y2] boxes written where COCO wants
        # [x, y, width, height] look just like this (each box grows by its corner's offset), and went without a word.
        shown = ", ".join(map(str, beyond[:5])) + (" ..." if len(beyond) > 5 else "")
        logger.warning(
            "%s: %d of %d box(es) reach more than a pixel outside their image (ids %s); they are clipped for "
            "training. COCO boxes are [x, y, width, height]: are these [x1, y1, x2, y2]?",
            path.name, len(beyond), len(data["annotations"]), shown,
        )
    for reason, count in skipped.items():
        shown = ", ".join(map(str, examples[reason][:5])) + (" ..." if count > 5 else "")
        level = logging.INFO if reason == "crowd region" else logging.WARNING
        logger.log(level, "%s: %d annotation(s) left out of training: %s (ids %s)", path.name, count, reason, shown)

    dataset = {
        "info": data.get("info", {}) if isinstance(data.get("info"), dict) else {},
        "images": [dict(image) for image in images],
        "categories": [{"id": c, "name": names[c]} for c in category_ids],
        "annotations": eval_annotations,
    }
    return CocoAnnotations(
        path=path, images=images, category_ids=category_ids, id2label={i: names[c] for i, c in enumerate(category_ids)},
        objects=objects, skipped=skipped, dataset=dataset,
    )


def _check_segmentation(segmentation: Any, image: dict[str, Any], what: str) -> None:
    """Polygons: a list of lists of x, y pairs (at least three points each); RLE: ``{"size": [h, w], "counts": ...}``
    with the image's size."""
    width, height = image["width"], image["height"]
    if isinstance(segmentation, list):
        for polygon in segmentation:
            if (
                not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2
                or not all(_is_number(v) for v in polygon)
            ):
                raise ValueError(f"{what}: a polygon must be a list of at least 3 (x, y) pairs of numbers, got {str(polygon)[:80]}")
            # pycocotools rasterises a polygon along its edges, 5 points a pixel in int: a point 10**9 pixels away
            # takes gigabytes, and one beyond 2**31 / 5 a segmentation fault (reading the file would kill the process).
            # A real polygon lies in its image, give or take a rounding; one image size beyond an edge is far enough.
            far = next(((x, y) for x, y in zip(polygon[::2], polygon[1::2])
                        if not (-width <= x <= 2 * width and -height <= y <= 2 * height)), None)
            if far is not None:
                raise ValueError(f"{what}: polygon point ({far[0]:g}, {far[1]:g}) lies more than the image's size beyond "
                                 f"its {width} x {height} area; polygon coordinates are pixels of the image")
            # The same cost within an image that the file says is huge (any side up to 2**31 - 1 passes): a polygon
            # 2 * 10**9 pixels across crashed the process, 4 * 10**6 took 600 MB. The rasterisation takes the
            # longer of each edge's width and height (closed polygon), 5 points a pixel.
            # Summed only where it could exceed the limit: each edge runs at most 3 image sides (the check above),
            # so COCO's polygons (a few dozen points in 640 pixels) cost nothing more to read.
            if len(polygon) // 2 * 3 * max(width, height) <= _MAX_POLYGON_LENGTH:
                continue
            xs, ys = polygon[::2], polygon[1::2]
            length = sum(max(abs(x - px), abs(y - py)) for x, y, px, py in zip(xs, ys, xs[-1:] + xs[:-1], ys[-1:] + ys[:-1]))
            if length > _MAX_POLYGON_LENGTH:
                raise ValueError(f"{what}: a polygon whose edges run {length:.4g} pixels (more than "
                                 f"{_MAX_POLYGON_LENGTH:.0e}), which pycocotools would rasterise with gigabytes of memory")
        return
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if size != [image["height"], image["width"]]:
            raise ValueError(f"{what}: RLE size {size!r} is not the image's [height, width] {[image['height'], image['width']]}")
        if isinstance(counts, list):
            if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != size[0] * size[1]:
                raise ValueError(f"{what}: uncompressed RLE counts must be non-negative integers summing to height x width")
            return
        if isinstance(counts, str) and counts and counts.isascii():
            decoded = _compressed_rle_counts(counts)
            if decoded is None or any(c < 0 for c in decoded) or sum(decoded) != size[0] * size[1]:
                # pycocotools decodes such a string without a check: garbage masks, or writes past the mask's end
                raise ValueError(f"{what}: compressed RLE counts {counts[:40]!r} do not decode to non-negative runs "
                                 f"summing to height x width ({size[0]} x {size[1]})")
            return
        raise ValueError(f"{what}: RLE 'counts' must be a list of integers or a compressed (ASCII) string, got {type(counts).__name__}")
    raise ValueError(f"{what}: 'segmentation' must be polygons (a list) or RLE (a dict), got {type(segmentation).__name__}")


def _compressed_rle_counts(text: str) -> list[int] | None:
    """The run lengths of a compressed RLE string (pycocotools' ``rleFrString``: 5-bit groups in characters from
    48, a continuation bit, sign extension, each count after the second stored as a difference from the one two
    before), or None where the string is not such an encoding."""
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                return None  # a continuation bit on the last character
            c = ord(text[position]) - 48
            if not 0 <= c < 64:
                return None
            if c & 0x1F and shift > 60:
                # a count of 2**60 or more, which no mask has: refused here, as a run of such characters made the
                # value an ever longer integer (a few megabytes of them took hours to read)
                return None
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            position += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def _compressed_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """The compressed RLE of a polygon list or an RLE, as pycocotools' ``COCO.annToRLE`` makes it."""
    mask_utils = import_pycocotools()
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):  # uncompressed RLE
        return mask_utils.frPyObjects(segmentation, height, width)
    return {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}


def _decode_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """(height, width) uint8 mask of a polygon list or an RLE (pycocotools)."""
    return import_pycocotools().decode(_compressed_rle(segmentation, height, width)).astype(np.uint8)


def _mask_area(segmentation: Any, height: int, width: int) -> float:
    """The pixels of a polygon list or an RLE: COCO's 'area' of an object with a mask (pycocotools' ``area``, as
    detectron2's ``convert_to_coco_dict`` fills it in)."""
    return float(import_pycocotools().area(_compressed_rle(segmentation, height, width)))


# ---------------------------------------------------------------------------------------------- the dataset
def image_to_tensor(picture: Any) -> torch.Tensor:
    """An RGB PIL image as the detectors take it: (3, H, W) float32 in [0, 1] (they resize and normalise)."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class CocoDetection(torch.utils.data.Dataset):
    """The images of a COCO-format split with their targets, as torchvision's detectors take them.

    Items: ``(image, target)``: ``image`` (3, H, W) float32 in [0, 1] at the file's resolution (the detector resizes
    and normalises); ``target``: ``boxes`` (N, 4) float32 x1 y1 x2 y2 in pixels, ``labels`` (N,) int64,
    ``image_id`` (int), and with ``masks=True`` ``masks`` (N, H, W) uint8 (annotations without a mask are then left
    out, counted in the log). With ``hflip`` > 0 an image and its targets are flipped together with that
    probability; the draw for sample ``i`` in epoch ``e`` comes from a generator seeded with ``(seed, e, i)``
    (:meth:`set_epoch`), so resumed runs and any number of workers see the same flips.
    """

    def __init__(
        self, root: str | os.PathLike, split: str, *, masks: bool = False, hflip: float = 0.0, seed: int = 0,
        annotations: CocoAnnotations | None = None, check_files: bool = True,
    ) -> None:
        path, self.image_dir = find_coco_split(root, split)
        self.annotations = annotations if annotations is not None else read_coco_annotations(path)
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be a probability, got {hflip}")
        self.masks, self.hflip, self.seed, self.epoch = masks, hflip, seed, 0
        self.images = self.annotations.images
        if not self.images:
            raise ValueError(f"{os.fspath(self.annotations.path)!r} lists no images")
        if check_files:
            missing = [im["file_name"] for im in self.images if not (self.image_dir / im["file_name"]).is_file()]
            if missing:
                shown = ", ".join(repr(m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise FileNotFoundError(
                    f"{len(missing)} image(s) listed in {os.fspath(self.annotations.path)!r} are missing from "
                    f"{os.fspath(self.image_dir)!r}: {shown}"
                )
        if masks:
            unmasked = sum(1 for objs in self.annotations.objects.values() for o in objs if not o["segmentation"])
            total = sum(len(objs) for objs in self.annotations.objects.values())
            if total and unmasked == total:
                # Every object would be left out: Mask R-CNN trained on images it was told were empty, and the run
                # ended with exit 0, a box AP and a log warning.
                raise ValueError(
                    f"{os.fspath(self.annotations.path)!r}: its {total} object(s) have no mask (no 'segmentation'),"
                    f" so mask training would see no object; train a box detector (--detector faster_rcnn, retinanet"
                    f" or fcos) or add polygon / RLE masks"
                )
            if unmasked:
                # Left out of the targets altogether, boxes too: their regions train as background.
                logger.warning("%s: %d of %d object(s) have no mask and are left out of training (their boxes too: "
                               "the detector learns their regions as background)",
                               self.annotations.path.name, unmasked, total)

    @property
    def id2label(self) -> dict[int, str]:
        return self.annotations.id2label

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def aspect_ratios(self) -> list[float]:
        """Width / height of every image, from the annotation file (no image is opened)."""
        return [im["width"] / im["height"] for im in self.images]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        info = self.images[index]
        path = self.image_dir / info["file_name"]
        picture = load_image(path)  # RGB, EXIF orientation applied
        if picture.size != (info["width"], info["height"]):
            raise ValueError(
                f"image {os.fspath(path)!r} is {picture.width}x{picture.height} but "
                f"{self.annotations.path.name} says {info['width']}x{info['height']}: its boxes would not fit"
                + _orientation_hint(path, picture.size, (info["width"], info["height"]))
            )
        image = image_to_tensor(picture)  # (3, H, W)
        objects = self.annotations.objects[info["id"]]
        if self.masks:
            objects = [o for o in objects if o["segmentation"]]
        boxes = torch.tensor([o["bbox"] for o in objects], dtype=torch.float32).reshape(-1, 4)  # (N, 4)
        target: dict[str, Any] = {
            "boxes": boxes,
            "labels": torch.tensor([o["label"] for o in objects], dtype=torch.int64),
            "image_id": info["id"],
        }
        if self.masks:
            height, width = info["height"], info["width"]
            stack = [_decode_mask(o["segmentation"], height, width) for o in objects]
            target["masks"] = torch.from_numpy(np.stack(stack)) if stack else torch.zeros(0, height, width, dtype=torch.uint8)
        if self.hflip > 0 and np.random.default_rng([self.seed, self.epoch, index]).random() < self.hflip:
            image = image.flip(-1)
            width = image.shape[-1]
            target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target


def _orientation_hint(path: Path, upright: tuple[int, int], listed: tuple[int, int]) -> str:
    """Why an image may look like the listed size elsewhere: its EXIF orientation turns it, and images are read
    upright (as detectron2 and mmdetection read them), while an annotation tool may have used the stored pixels."""
    try:
        with PIL.Image.open(path) as stored:
            orientation = stored.getexif().get(0x0112)
    except (OSError, ValueError):
        return ""
    if orientation not in (5, 6, 7, 8) or upright[::-1] != listed:
        return ""
    return (f" (its EXIF orientation {orientation} turns the stored {listed[0]}x{listed[1]} pixels upright; the "
            f"annotations must be of the upright image, as it is shown)")


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """A batch as the detectors take it: a list of images (sizes differ) and a list of targets."""
    return [image for image, _ in batch], [target for _, target in batch]


def grouped_batches(
    aspect_ratios: Sequence[float], batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
    rank: int = 0, world_size: int = 1,
) -> list[list[int]]:
    """This process's batches of one epoch, each of images on the same side of square (wide or tall), so that
    padding a batch to its largest image wastes little (torchvision's ``GroupedBatchSampler``).

    The order is a permutation seeded by ``seed + epoch`` (as :func:`pvtv2.data.folders.epoch_indices`); images are
    taken in that order into their group's open batch, which is emitted when full; what is left over at the end is
    batched regardless of group. The batches are dealt to the processes round-robin, wrapping around so that each
    gets the same number (DistributedDataParallel needs equal step counts).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    n = len(aspect_ratios)
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    else:
        order = list(range(n))
    open_batches: dict[bool, list[int]] = {True: [], False: []}
    batches: list[list[int]] = []
    for index in order:
        group = open_batches[aspect_ratios[index] >= 1.0]
        group.append(index)
        if len(group) == batch_size:
            batches.append(list(group))
            group.clear()
    leftover = sorted(open_batches[True] + open_batches[False], key=order.index)
    batches.extend(leftover[i : i + batch_size] for i in range(0, len(leftover), batch_size))
    if world_size > 1 and batches:
        total = math.ceil(len(batches) / world_size) * world_size
        batches = (batches * math.ceil(total / len(batches)))[:total]
    return batches[rank::world_size]


# ---------------------------------------------------------------------------------------------- metrics
def detections_to_coco(
    outputs: Iterable[dict[str, torch.Tensor]], image_ids: Iterable[int],
    label_to_category: Sequence[int] | Mapping[int, int], mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Detector outputs (``boxes`` x1 y1 x2 y2 in the image's pixels, ``labels`` 0..K-1, ``scores``, optional
    ``masks`` (N, 1, H, W) probabilities) as COCO result entries: ``bbox`` [x, y, w, h], ``category_id`` (the label
    mapped back through ``label_to_category``, e.g. :attr:`CocoAnnotations.category_ids`; detections of a label that
    a mapping lacks are left out), ``score`` and, with masks, ``segmentation`` (compressed RLE of
    ``mask >= mask_threshold``)."""
    results: list[dict[str, Any]] = []
    mask_utils = None
    # zip stopped at the shorter of the two: the last images' detections went without a word, and COCOeval scored
    # those images as ones where nothing was found
    counts = [0, 0]
    for output, image_id in itertools.zip_longest(outputs, image_ids, fillvalue=_NONE):
        counts[0] += output is not _NONE
        counts[1] += image_id is not _NONE
        if output is _NONE or image_id is _NONE:
            continue
        boxes = output["boxes"].detach().float().cpu()
        scores = output["scores"].detach().float().cpu().tolist()
        labels = output["labels"].detach().cpu().tolist()
        masks = output.get("masks")
        # zip would drop what one field has more of, and a negative label would index a category list from its end
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"image {image_id}: 'boxes' must be (N, 4) x1 y1 x2 y2, got shape {tuple(boxes.shape)}")
        count = len(boxes)
        if len(scores) != count or len(labels) != count:
            raise ValueError(f"image {image_id}: {count} boxes but {len(scores)} scores and {len(labels)} labels")
        if masks is not None and (masks.ndim != 4 or masks.shape[1] != 1 or len(masks) != count):
            raise ValueError(f"image {image_id}: 'masks' must be (N, 1, H, W) with one per box ({count} boxes), got "
                             f"{len(masks)} masks of shape {tuple(masks.shape)}")
        if not isinstance(label_to_category, Mapping):
            wrong = [label for label in labels if not 0 <= label < len(label_to_category)]
            if wrong:
                raise ValueError(f"image {image_id}: label {wrong[0]} is not one of the {len(label_to_category)} "
                                 f"labels 0 .. {len(label_to_category) - 1} that label_to_category maps")
        if masks is not None:
            mask_utils = mask_utils or import_pycocotools()
            binary = (masks.detach()[:, 0] >= mask_threshold).cpu().numpy().astype(np.uint8)  # (N, H, W)
        for n, (box, score, label) in enumerate(zip(boxes.tolist(), scores, labels)):
            if isinstance(label_to_category, Mapping) and label not in label_to_category:
                continue
            x1, y1, x2, y2 = box
            entry = {
                "image_id": int(image_id), "category_id": int(label_to_category[label]),
                "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score),
            }
            if masks is not None:
                rle = mask_utils.encode(np.asfortranarray(binary[n]))
                entry["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
            results.append(entry)
    if counts[0] != counts[1]:
        raise ValueError(f"detections_to_coco: {counts[0]} outputs but {counts[1]} image ids (one of each per image)")
    return results


_NONE = object()  # what zip_longest fills the shorter of outputs and image ids with


def coco_evaluate(
    ground_truth: CocoAnnotations | Any, results: list[dict[str, Any]], iou_types: Sequence[str] = ("bbox",),
) -> dict[str, Any]:
    """COCOeval's summary for each IoU type (``"bbox"``, ``"segm"``): ``{"bbox": {"AP": ..., "AP50": ..., ...},
    "summary": {"bbox": "<the text COCOeval prints>"}}``, the twelve numbers of :data:`BOX_METRICS` in COCOeval's
    own order and value (-1 where a size range has no ground truth), on the images of ``ground_truth`` (a
    :class:`CocoAnnotations` or a pycocotools ``COCO``)."""
    import_pycocotools()
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = ground_truth.coco() if isinstance(ground_truth, CocoAnnotations) else ground_truth
    known = set(gt.getImgIds())
    stray = {r["image_id"] for r in results} - known
    if stray:
        raise ValueError(f"detections for image ids {sorted(stray)[:10]} that the ground truth does not list")
    out: dict[str, Any] = {"summary": {}}
    for iou_type in iou_types:
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"unknown IoU type {iou_type!r}; use 'bbox' or 'segm'")
        if iou_type == "segm" and any("segmentation" not in r for r in results):
            raise ValueError("mask metrics need a 'segmentation' in every detection (a mask_rcnn model's)")
        if iou_type == "segm" and any(not a.get("segmentation") for a in gt.dataset["annotations"]):
            raise ValueError("mask metrics need a 'segmentation' in every ground-truth annotation")
        if iou_type == "segm":
            # pycocotools compares the runs of two masks as they are: a mask of another size than its image (one
            # of a resized or padded batch) scored IoU 0, or some other number, without a word. It rasterises every
            # mask at its image's 'height' and 'width': an image without them was a KeyError from inside COCOeval.
            used = {a["image_id"] for a in gt.dataset["annotations"]} | {r["image_id"] for r in results}
            for image_id in sorted(used, key=str):
                image = gt.imgs.get(image_id, {"height": 0, "width": 0})  # an image it lacks: pycocotools' own error
                if not all(_is_number(image.get(key)) for key in ("height", "width")):
                    raise ValueError(
                        f"mask metrics need the ground truth's image sizes: image {image_id} has 'height' "
                        f"{image.get('height')!r} and 'width' {image.get('width')!r}; expected integers"
                    )
            for r in results:
                # pycocotools' loadRes reads an RLE's 'size' (a polygon, or a dict without it, stopped it inside)
                size = r["segmentation"].get("size") if isinstance(r["segmentation"], Mapping) else None
                image = gt.imgs[r["image_id"]]
                if not isinstance(size, (Sequence, np.ndarray)) or len(size) != 2 or not all(_is_number(v) for v in size):
                    raise ValueError(
                        f"a detection in image {r['image_id']} has a mask 'size' {size!r}; expected an RLE "
                        f"{{'size': [height, width], 'counts': ...}} (as detections_to_coco writes it)"[:400]
                    )
                if [int(v) for v in size] != [image["height"], image["width"]]:
                    raise ValueError(
                        f"a detection in image {r['image_id']} has a mask of {size[0]} x {size[1]} pixels, but the "
                        f"image is {image['height']} x {image['width']}: masks must be of the image's pixels"
                    )
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            if results:
                # loadRes adds fields to its entries: copies. For masks without the box: given a 'bbox', loadRes
                # takes the box's area as the detection's, and COCOeval's small / medium / large mask numbers would
                # sort unmatched detections by their boxes; mmdetection (the paper's mask AP) and torchvision's
                # reference scripts score masks by the mask's area.
                drop = ("bbox",) if iou_type == "segm" else ()
                dt = gt.loadRes([{k: v for k, v in r.items() if k not in drop} for r in results])
            else:  # loadRes refuses an empty list; an empty result set scores 0 (or -1 where there is no ground truth)
                dt = COCO()
                dt.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]), "annotations": []}
                dt.createIndex()
            evaluator = COCOeval(gt, dt, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        out[iou_type] = {name: float(value) for name, value in zip(BOX_METRICS, evaluator.stats)}
        out["summary"][iou_type] = text.getvalue()
    return out
