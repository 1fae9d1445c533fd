"""The offline detection example: handwritten digits on photographs, as a COCO-format dataset with exact boxes and masks.

:func:`make_detection_example` pastes two to six of the bundled handwritten digits (scikit-learn's, 8x8, upscaled
bicubically to 18-40% of the image side) in random colours onto backgrounds, without overlaps (a digit that finds no
free place in ten random tries is left out, so some images hold fewer). The backgrounds are
random crops of scikit-learn's two sample photographs (``china.jpg`` and ``flower.jpg``, CC BY 2.0, by
danielbuechele and vultilion on Flickr) when scikit-learn is installed (they ship with it; it is not imported), and
synthetic textures otherwise; ``info.backgrounds`` in the annotation files says which.

Each digit is blended in with its upscaled ink (saturated at 70% of full strength) as the opacity; its mask is where that opacity is at least 0.5, and
its box is the mask's tight bounding box, so boxes and masks are exact. Masks are stored as compressed RLE (digits
such as 0, 6, 8 and 9 have holes, which one polygon cannot describe). The training and validation digits are
different handwritten samples (a stratified 80/20 split of the 1797), and the validation backgrounds are other
crops. The ten classes are the digits, category ids 1-10 for the digits 0-9. It writes the layout that
:mod:`pvtv2.data.coco` reads.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from ..fileio import atomic_write_text
from .coco import import_pycocotools
from .digits import load_digits

__all__ = ["DIGIT_CATEGORIES", "make_detection_example", "sample_photos"]

logger = logging.getLogger(__name__)

DIGIT_CATEGORIES = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]
_PHOTOS = ("china.jpg", "flower.jpg")
# Digits drawn per image, each placed at the first of a few random positions that overlaps no earlier one. Dense
# scenes give a detector more objects to learn from per image, at the same cost per training step.
_MIN_DIGITS, _MAX_DIGITS, _PLACEMENT_TRIES = 2, 6, 10
_PHOTO_CREDIT = (
    "scikit-learn's sample photographs china.jpg and flower.jpg (CC BY 2.0, https://creativecommons.org/licenses/by/2.0/; "
    "by danielbuechele and vultilion on Flickr), random crops"
)


def sample_photos() -> list[PIL.Image.Image] | None:
    """scikit-learn's two sample photographs as RGB images, or None when scikit-learn is not installed."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "images"
    paths = [folder / name for name in _PHOTOS]
    if not all(p.is_file() for p in paths):
        return None
    return [PIL.Image.open(p).convert("RGB") for p in paths]


def _photo_crop(rng: np.random.Generator, photos: list[PIL.Image.Image], size: int) -> np.ndarray:
    photo = photos[int(rng.integers(len(photos)))]
    side = int(rng.uniform(0.3, 0.9) * min(photo.size))
    left, top = int(rng.integers(0, photo.width - side + 1)), int(rng.integers(0, photo.height - side + 1))
    crop = photo.crop((left, top, left + side, top + side)).resize((size, size), PIL.Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        crop = crop.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop, dtype=np.float32)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A colour gradient, soft stripes and pixel noise (when no photographs are at hand)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, np.pi)
    t = (np.cos(angle) * x + np.sin(angle) * y)[..., None]
    image = a * (1 - t) + b * t
    freq, phase = rng.uniform(3, 10), rng.uniform(0, 2 * np.pi)
    image = image + rng.uniform(10, 40) * np.sin(2 * np.pi * freq * (x * np.sin(angle) - y * np.cos(angle)) + phase)[..., None]
    return np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.float32)


def _scene(
    rng: np.random.Generator, digits: np.ndarray, labels: np.ndarray, pool: np.ndarray, size: int,
    photos: list[PIL.Image.Image] | None,
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One image (H, W, 3) uint8 and its objects: (digit, mask (H, W) bool)."""
    image = _photo_crop(rng, photos, size) if photos else _texture(rng, size)
    taken = np.zeros((size, size), dtype=bool)
    objects: list[tuple[int, np.ndarray]] = []
    for _ in range(int(rng.integers(_MIN_DIGITS, _MAX_DIGITS + 1))):
        index = int(pool[int(rng.integers(len(pool)))])
        side = int(rng.uniform(0.18, 0.40) * size)
        ink = PIL.Image.fromarray(digits[index]).resize((side, side), PIL.Image.Resampling.BICUBIC)
        # Ink at full opacity from 70% of the strongest stroke up, so that digits read clearly at any size.
        alpha = np.clip(np.asarray(ink, dtype=np.float32) / (0.7 * 255.0), 0.0, 1.0)  # (side, side)
        for _ in range(_PLACEMENT_TRIES):
            top, left = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
            region = (slice(top, top + side), slice(left, left + side))
            if not taken[region].any():
                break
        else:
            continue  # no free place for it: left out
        mask = np.zeros((size, size), dtype=bool)
        mask[region] = alpha >= 0.5
        if mask.sum() < 4:
            continue
        # A colour away from the background under the digit, so that every digit can be seen.
        under = image[region].reshape(-1, 3).mean(axis=0)
        colour = np.where(under > 127, rng.uniform(0, 90, 3), rng.uniform(165, 255, 3)).astype(np.float32)
        image[region] = (1 - alpha[..., None]) * image[region] + alpha[..., None] * colour
        taken[region] = True
        objects.append((int(labels[index]), mask))
    noisy = image + rng.normal(0, 4, image.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8), objects


def _split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified 80/20 split of the digit samples (training, validation)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        members = members[rng.permutation(len(members))]
        n_val = max(1, round(0.2 * len(members)))
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return np.asarray(sorted(train)), np.asarray(sorted(val))


def make_detection_example(
    folder: str | os.PathLike, n_train: int = 600, n_val: int = 150, size: int = 128, seed: int = 0,
    backgrounds: str = "auto",
) -> Path:
    """Write the digits-on-photographs example into ``folder`` (``train/``, ``val/``, ``annotations/``); returns it.

    ``backgrounds``: ``"photos"`` (scikit-learn's sample photographs; an error without scikit-learn), ``"synthetic"``,
    or ``"auto"`` (photos when scikit-learn is installed). The same arguments give the same files, byte for byte.
    """
    for name, value in (("n_train", n_train), ("n_val", n_val), ("size", size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if size < 48:
        raise ValueError(f"size must be at least 48 pixels for digits to be told apart, got {size}")
    if backgrounds not in ("auto", "photos", "synthetic"):
        raise ValueError(f"backgrounds must be 'auto', 'photos' or 'synthetic', got {backgrounds!r}")
    photos = None if backgrounds == "synthetic" else sample_photos()
    if backgrounds == "photos" and photos is None:
        raise ValueError("backgrounds='photos' needs scikit-learn's sample photographs: pip install scikit-learn")
    mask_utils = import_pycocotools()
    digits, labels = load_digits()
    pools = dict(zip(("train", "val"), _split(labels, seed)))
    root = Path(folder)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    info = {
        "description": "pvtv2's detection example: handwritten digits (scikit-learn's, BSD licence) on backgrounds",
        "backgrounds": _PHOTO_CREDIT if photos else "synthetic textures",
        "size": size,
        "seed": seed,
    }
    counts = {}
    for offset, (split, count) in enumerate((("train", n_train), ("val", n_val))):
        rng = np.random.default_rng([seed, offset])
        (root / split).mkdir(parents=True, exist_ok=True)
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for i in range(count):
            pixels, objects = _scene(rng, digits, labels, pools[split], size, photos)
            name = f"{i:05d}.png"
            PIL.Image.fromarray(pixels).save(root / split / name)
            images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
            for digit, mask in objects:
                ys, xs = np.nonzero(mask)
                x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                annotations.append({
                    "id": len(annotations) + 1, "image_id": i + 1, "category_id": digit + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": int(mask.sum()), "iscrowd": 0,
                    "segmentation": {"size": [size, size], "counts": rle["counts"].decode("ascii")},
                })
        data = {"info": info, "images": images, "annotations": annotations, "categories": DIGIT_CATEGORIES}
        atomic_write_text(root / "annotations" / f"instances_{split}.json", json.dumps(data) + "\n")
        counts[split] = (len(images), len(annotations))
    logger.info(
        "wrote the detection example to %s: %d training images (%d digits), %d validation images (%d digits), %s",
        root, *counts["train"], *counts["val"], "on photographs" if photos else "on synthetic textures",
    )
    return root
