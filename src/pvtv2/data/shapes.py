"""The offline segmentation example: circles, squares and triangles on textured backgrounds, with exact masks.

:func:`make_segmentation_example` pastes shapes of random colours, sizes and positions on textured, noisy
backgrounds: four classes that a small model separates in minutes. It writes the mask-folder layout that
:mod:`pvtv2.data.masks` reads.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

__all__ = ["EXAMPLE_CLASSES", "make_segmentation_example"]

logger = logging.getLogger(__name__)

EXAMPLE_CLASSES = ("background", "circle", "square", "triangle")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random colour gradient, soft stripes and pixel noise: texture the model must learn to ignore."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, np.pi)
    t = (np.cos(angle) * x + np.sin(angle) * y)[..., None]
    image = a * (1 - t) + b * t
    freq, phase = rng.uniform(4, 14), rng.uniform(0, 2 * np.pi)
    image += rng.uniform(10, 40) * np.sin(2 * np.pi * freq * (x * np.sin(angle) - y * np.cos(angle)) + phase)[..., None]
    image += rng.normal(0, rng.uniform(5, 25), image.shape)
    return image


# radius factors giving a square (2 r^2) and a triangle (1.3 r^2) a circle's area (pi r^2)
_AREA_SCALE = {1: 1.0, 2: float(np.sqrt(np.pi / 2)), 3: float(np.sqrt(np.pi / (3 * np.sqrt(3) / 4)))}


def _shape_polygon(kind: int, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    if kind == 2:  # square, tilted a little
        corners = [angle + np.pi / 4 + k * np.pi / 2 for k in range(4)]
    elif kind == 3:  # equilateral triangle, pointing up (tilted a little)
        corners = [angle + k * 2 * np.pi / 3 for k in range(3)]
    else:
        return None
    return [(cx + r * np.cos(c), cy + r * np.sin(c)) for c in corners]


def _example(rng: np.random.Generator, size: int) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    image = PIL.Image.fromarray(np.clip(_background(rng, size), 0, 255).astype(np.uint8))
    mask = PIL.Image.new("L", (size, size), 0)
    draw_image, draw_mask = PIL.ImageDraw.Draw(image), PIL.ImageDraw.Draw(mask)
    placed: list[tuple[float, float, float]] = []
    for _ in range(int(rng.integers(1, 4))):  # 1 to 3 shapes that do not overlap
        kind = int(rng.integers(1, len(EXAMPLE_CLASSES)))
        # Radii scaled per kind so every class covers about the same area (a circle of radius r): the classes stay
        # balanced, and every shape spans several pixels of the model's 1/4-resolution output.
        r = rng.uniform(0.13, 0.22) * size * _AREA_SCALE[kind]
        cx, cy = rng.uniform(0.7 * r, size - 0.7 * r), rng.uniform(0.7 * r, size - 0.7 * r)
        if any(np.hypot(cx - x, cy - y) < r + q for x, y, q in placed):
            continue  # would overlap an earlier shape: skip it
        placed.append((cx, cy, r))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        polygon = _shape_polygon(kind, cx, cy, r, rng.uniform(-0.3, 0.3) - (np.pi / 2 if kind == 3 else 0.0))
        for draw, fill in ((draw_image, colour), (draw_mask, kind)):
            if polygon is None:
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            else:
                draw.polygon(polygon, fill=fill)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (size, size, 3))
    return PIL.Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), mask


def make_segmentation_example(
    folder: str | os.PathLike, n_train: int = 400, n_val: int = 100, size: int = 64, seed: int = 0
) -> Path:
    """Write the shapes example into ``folder`` (train / val images and masks, ``labels.json``); returns the folder.

    The same arguments give the same files, byte for byte.
    """
    for name, value in (("n_train", n_train), ("n_val", n_val), ("size", size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels for the shapes to be told apart, got {size}")
    root = Path(folder)
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, mask = _example(rng, size)
            image.save(root / split / "images" / f"{i:05d}.png")
            mask.save(root / split / "masks" / f"{i:05d}.png")
        # An earlier, larger example in the same folder left pairs numbered past `count`: the mask folders are read
        # whole, so they would be trained on (as another --size's images) under this example's name.
        stale = [p for kind in ("images", "masks") for p in (root / split / kind).glob("[0-9][0-9][0-9][0-9][0-9].png")
                 if int(p.stem) >= count]
        for path in stale:
            path.unlink()
        if stale:
            logger.info("removed %d file(s) of an earlier, larger example from %s", len(stale), root / split)
    (root / "labels.json").write_text(json.dumps({str(i): n for i, n in enumerate(EXAMPLE_CLASSES)}, indent=2) + "\n")
    logger.info("wrote the segmentation example (%d train, %d val, %dx%d) to %s", n_train, n_val, size, size, root)
    return root
