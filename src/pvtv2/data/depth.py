"""Depth data: a folder of RGB images and 16-bit depth PNGs.

Folder layout (the one ``pvtv2 train --task depth`` reads)::

    DIR/train/images/NAME.jpg|png|...   DIR/train/depth/NAME.png   (same stem; 16-bit grey, one depth per pixel)
    DIR/val/images/...                  DIR/val/depth/...

A depth PNG holds integers: depth in metres times ``depth_scale`` (1000 by default: millimetres, as NYU Depth v2's
and most RGB-D sensors' PNGs; KITTI's use 256). 0 means "no measurement" and stays 0 after reading: the loss and the
metrics skip those pixels.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .augment import derive_seed
from .processing import IMAGE_EXTENSIONS, load_image

__all__ = ["DepthFolder", "read_depth_png", "scan_depth_split", "write_depth_png"]

logger = logging.getLogger(__name__)

# The unit of a depth PNG by default: millimetres.
DEFAULT_DEPTH_SCALE = 1000.0


def scan_depth_split(root: str | os.PathLike, split: str) -> list[tuple[Path, Path]]:
    """(image, depth) pairs of ``root/split``, sorted by name; every image needs a depth PNG with the same stem."""
    base = Path(root) / split
    images_dir, depth_dir = base / "images", base / "depth"
    for folder in (images_dir, depth_dir):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"depth data needs the folder {os.fspath(folder)!r} (layout: DIR/{split}/images, DIR/{split}/depth)"
            )
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {os.fspath(images_dir)!r}")
    pairs = []
    seen: dict[str, Path] = {}
    for image in images:
        # Two images of one stem (a copy in another format, a depth visualisation left beside the photograph) both
        # took the same depth map: one of them is not what the map measures.
        if image.stem in seen:
            raise ValueError(
                f"{seen[image.stem].name!r} and {image.name!r} in {os.fspath(images_dir)!r} share the stem of depth "
                f"map {image.stem + '.png'!r}: keep one image per depth map"
            )
        seen[image.stem] = image
        depth = depth_dir / f"{image.stem}.png"
        if not depth.is_file():
            raise FileNotFoundError(
                f"image {image.name!r} has no depth map {os.fspath(depth)!r} (16-bit PNGs with the same stem)"
            )
        pairs.append((image, depth))
    return pairs


def _check_scale(depth_scale: float) -> float:
    if isinstance(depth_scale, bool) or not isinstance(depth_scale, (int, float)) or not math.isfinite(depth_scale):
        raise ValueError(f"depth_scale must be a positive number (PNG units per metre), got {depth_scale!r}")
    if depth_scale <= 0:
        raise ValueError(f"depth_scale must be a positive number (PNG units per metre), got {depth_scale!r}")
    return float(depth_scale)


def read_depth_png(path: str | os.PathLike, depth_scale: float = DEFAULT_DEPTH_SCALE) -> np.ndarray:
    """A depth PNG as float32 metres (H, W): the stored integers divided by ``depth_scale``; 0 stays 0 (invalid).

    Only single-channel integer PNGs are depth maps: an 8-bit or colour PNG (a visualisation, not a measurement)
    is refused, naming the file and its mode.
    """
    scale = _check_scale(depth_scale)
    text = os.fspath(path)
    try:
        with PIL.Image.open(text) as image:
            image.load()
            mode = image.mode
            values = np.asarray(image)
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, PIL.Image.DecompressionBombError) as error:
        # As load_image reads images: a size Pillow refuses (a decompression bomb) is named with its file too
        raise ValueError(f"cannot read depth map {text!r}: {str(error) or type(error).__name__}") from error
    if mode not in ("I;16", "I;16B", "I;16L", "I"):
        raise ValueError(
            f"depth map {text!r} has mode {mode}; expected a 16-bit single-channel PNG of depth x depth_scale "
            f"(an 8-bit or colour PNG cannot hold depth)"
        )
    values = values.astype(np.int64)
    if values.min() < 0:
        raise ValueError(f"depth map {text!r} holds negative values (down to {int(values.min())})")
    return (values / scale).astype(np.float32)


def write_depth_png(path: str | os.PathLike, depth: np.ndarray, depth_scale: float = DEFAULT_DEPTH_SCALE) -> Path:
    """Write depth in metres (0 = invalid) as a 16-bit PNG of ``round(depth * depth_scale)``."""
    scale = _check_scale(depth_scale)
    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim != 2 or not np.isfinite(depth).all() or depth.min() < 0:
        raise ValueError("depth must be a finite, non-negative (H, W) array of metres")
    values = np.round(depth * scale)
    if values.max() > 65535:
        raise ValueError(
            f"depth up to {depth.max():.3f} m does not fit a 16-bit PNG at depth_scale={scale:g} "
            f"(at most {65535 / scale:.3f} m)"
        )
    target = Path(path)
    PIL.Image.fromarray(values.astype(np.uint16)).save(target)
    return target


class DepthFolder(torch.utils.data.Dataset):
    """Images and depth maps, resized to ``size``. Items: ``(pixel_values (3, H, W) in [0, 1], depth (H, W) float32
    metres)``.

    Images are resized bilinearly and rescaled to [0, 1], not normalised, as GLPN's image processor (and
    :func:`pvtv2.inference.predict_depth`) prepares them; depth maps are resized nearest-neighbour (so that invalid
    zeros are never blended into valid depth). GLPN's decoder needs ``size`` in multiples of 32.
    With ``hflip`` > 0 both are flipped together, drawn from ``(seed, epoch, index)`` (:meth:`set_epoch`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        size: int | tuple[int, int],
        *,
        depth_scale: float = DEFAULT_DEPTH_SCALE,
        hflip: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.pairs = scan_depth_split(root, split)
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if any(s < 32 or s % 32 for s in self.size):
            raise ValueError(f"depth images must be resized to multiples of 32 (GLPN's decoder), got {self.size}")
        self.depth_scale = _check_scale(depth_scale)
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip!r}")
        self.hflip = hflip
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, depth_path = self.pairs[index]
        height, width = self.size
        # Upright (EXIF orientation applied, as pvtv2 depth reads it) and 16-bit greyscale scaled, not clipped.
        image = load_image(image_path)
        depth = read_depth_png(depth_path, self.depth_scale)
        if depth.shape != (image.height, image.width):
            raise ValueError(
                f"depth map {os.fspath(depth_path)!r} is {depth.shape[1]}x{depth.shape[0]} but its image is "
                f"{image.width}x{image.height} (after its EXIF orientation)"
            )
        if image.size != (width, height):
            image = image.resize((width, height), PIL.Image.Resampling.BILINEAR)
            depth = np.asarray(PIL.Image.fromarray(depth).resize((width, height), PIL.Image.Resampling.NEAREST))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
        target = torch.from_numpy(np.array(depth, dtype=np.float32))  # (H, W), a writable copy
        if self.hflip > 0 and np.random.default_rng(derive_seed(self.seed, self.epoch, index)).random() < self.hflip:
            pixels, target = pixels.flip(-1), target.flip(-1)
        return pixels, target
