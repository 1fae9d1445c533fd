"""Segmentation data: a folder of images and label-map PNGs.

Folder layout (the one ``pvtv2 train --task segmentation`` reads)::

    DIR/train/images/NAME.jpg|png|... DIR/train/masks/NAME.png   (same stem; one class index per pixel, 255 = ignore,
                                                                  or the value of ``ignore_index``)
    DIR/val/images/...               DIR/val/masks/...
    DIR/labels.json                  optional: {"0": "background", "1": "circle", ...}
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .augment import SegmentationTrainTransform, derive_seed
from .processing import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, load_image

__all__ = [
    "check_ignore_index",
    "check_not_binary_255",
    "read_mask",
    "scan_segmentation_split",
    "read_id2label",
    "reduce_labels",
    "SegmentationFolder",
]

logger = logging.getLogger(__name__)


def scan_segmentation_split(root: str | os.PathLike, split: str) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of ``root/split``, sorted by name; every image needs a mask with the same stem."""
    base = Path(root) / split
    images_dir, masks_dir = base / "images", base / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"segmentation data needs the folder {os.fspath(folder)!r} (layout: DIR/{split}/images, DIR/{split}/masks)")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {os.fspath(images_dir)!r}")
    pairs = []
    seen: dict[str, Path] = {}
    for image in images:
        # Two images of one stem (a copy in another format, a prediction picture left beside the photograph) both
        # took the same mask: one of them is not what the mask labels.
        if image.stem in seen:
            raise ValueError(
                f"{seen[image.stem].name!r} and {image.name!r} in {os.fspath(images_dir)!r} share the stem of mask "
                f"{image.stem + '.png'!r}: keep one image per mask"
            )
        seen[image.stem] = image
        mask = masks_dir / f"{image.stem}.png"
        if not mask.is_file():
            raise FileNotFoundError(f"image {image.name!r} has no mask {os.fspath(mask)!r} (masks are PNGs with the same stem)")
        pairs.append((image, mask))
    return pairs


_MASK_MODES = ("L", "P", "I", "I;16")


def read_mask(path: str | os.PathLike) -> PIL.Image.Image:
    """A label-map PNG, decoded, as a PIL image of one channel (modes L, P, I, I;16: class indices; a 1-bit PNG comes
    back as L with values 0 and 1). A file that cannot be decoded (truncated, not an image) or has colour channels
    is a ``ValueError`` naming it."""
    text = os.fspath(path)
    try:
        with PIL.Image.open(text) as opened:
            opened.load()  # decode now: a truncated file fails here, not later without its name
            mask = opened.copy()
            encoding = opened.format
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read mask {text!r}: {str(error) or type(error).__name__}") from error
    if encoding in ("JPEG", "MPO"):
        # Lossy: the compression moves class values at every edge (1 next to 3 read as 2), and they were scored as
        # those classes without a word. A JPEG renamed to .png opens as one.
        raise ValueError(f"mask {text!r} is a JPEG (lossy compression changes the class values along every edge); "
                         f"save label maps as PNG")
    if mask.mode == "1":
        # A 1-bit PNG (what PIL writes for a boolean array): classes 0 and 1. Not convert("L"), which makes 1 into 255,
        # the ignore value.
        return PIL.Image.fromarray(np.asarray(mask, dtype=np.uint8))
    if mask.mode not in _MASK_MODES:
        raise ValueError(f"mask {text!r} must be a single-channel PNG of class indices, got mode {mask.mode}")
    if mask.mode == "I" and mask.getextrema()[0] < 0:
        # 32-bit signed (a TIFF under a .png name): a negative value is no class, and stopped evaluation inside
        # NumPy's bincount ("'list' argument must have no negative elements"), naming no file.
        raise ValueError(f"mask {text!r} holds negative values (down to {mask.getextrema()[0]}); class indices are 0 "
                         f"or more")
    return mask


def reduce_labels(labels: np.ndarray | torch.Tensor, ignore_index: int = 255) -> np.ndarray | torch.Tensor:
    """ADE20K-style label maps, where 0 means "no label" and classes start at 1: 0 becomes ``ignore_index``, every
    other value goes down by one, and ``ignore_index`` stays itself (transformers' ``do_reduce_labels``,
    mmsegmentation's ``reduce_zero_label``). Returns a new array or tensor of the same type and shape (int64 for
    tensors; NumPy arrays keep an unsigned 8-bit type when they have one)."""
    if isinstance(labels, torch.Tensor):
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"label maps must hold integer class indices, got dtype {labels.dtype}")
        labels = labels.long()
        reduced = labels - 1
        reduced[(labels == 0) | (labels == ignore_index)] = ignore_index
        return reduced
    array = np.asarray(labels)
    if array.dtype.kind not in "ui":
        raise TypeError(f"label maps must hold integer class indices, got dtype {array.dtype}")
    wide = array.astype(np.int64)
    reduced = wide - 1
    reduced[(wide == 0) | (wide == ignore_index)] = ignore_index
    # uint8 kept only where the ignore value fits in it (a larger one would wrap around to a class index)
    return reduced.astype(array.dtype) if array.dtype == np.uint8 and 0 <= ignore_index <= 255 else reduced


def check_ignore_index(ignore_index: int, id2label: dict[int, str], flag: str = "--ignore-index") -> None:
    """Refuse an ignore value that is one of the classes (``0 .. len(id2label) - 1``): that class would be left out
    of the loss and the metrics without a word (its pixels never trained, its IoU never counted)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{flag} must be an integer, got {ignore_index!r}")
    if not 0 <= ignore_index <= 65535:
        raise ValueError(f"{flag} must be a mask value in [0, 65535] (8- or 16-bit PNG masks), got {ignore_index}")
    if ignore_index < len(id2label):
        example = 255 if len(id2label) <= 255 else 65535
        raise ValueError(
            f"{flag} {ignore_index} is class {ignore_index} ({id2label.get(ignore_index)!r}) of the {len(id2label)} "
            f"classes: its pixels would be left out of the loss and the metrics; pass an {flag} above the largest "
            f"class index, e.g. {example}"
        )


# Masks looked at first for the 0/255 check: enough to clear any other data set cheaply (the rest are read only when
# these all hold 0 and 255).
_BINARY_255_SAMPLE = 32


def check_not_binary_255(pairs: Sequence[tuple[Path, Path]], ignore_index: int = 255) -> None:
    """Refuse masks drawn as black and white pictures (0 and 255), the common way to save a binary mask: 255 is the
    ignore value, so every object pixel would be left out of the loss and the metrics, and a model predicting
    background everywhere would score a mean IoU of 1. Looks at the first masks (up to 32, in name order): all
    holding 0 and ``ignore_index`` only, with some ``ignore_index``, is that case, once the other masks are found to
    hold nothing else either (32 images of background with unlabelled borders may come before the first object)."""
    sample = pairs[:_BINARY_255_SAMPLE]
    if not sample:
        return
    seen: set[int] = set()
    for _, mask_path in sample:
        values = set(np.unique(np.asarray(read_mask(mask_path))).tolist())
        if not values <= {0, ignore_index}:
            return
        seen |= values
    if ignore_index not in seen:
        return
    for _, mask_path in pairs[_BINARY_255_SAMPLE:]:
        # Read only where the first masks look black-and-white: a class value anywhere clears the data set.
        values = set(np.unique(np.asarray(read_mask(mask_path))).tolist())
        if not values <= {0, ignore_index}:
            return
        seen |= values
    folder = os.fspath(Path(sample[0][1]).parent)
    if 0 not in seen:
        # Not a black-and-white picture: nothing at all is labelled (that advice, mask // 255, made every pixel 1).
        raise ValueError(
            f"the masks in {folder!r} hold only the ignore value {ignore_index} (all {len(pairs)} of them): no pixel "
            f"is labelled, so there is nothing to train on or to score"
        )
    # 0/255 pictures need their objects as class 1; masks whose object class was chosen as the ignore value (0/1
    # with --ignore-index 1) need another ignore value, not that advice.
    advice = ("A black-and-white binary mask needs its objects as class 1: save mask // 255 (0 and 1)"
              if ignore_index == 255 else
              f"Its objects are class {ignore_index}: pass an --ignore-index above every class (the default 255)")
    raise ValueError(
        f"the masks in {folder!r} hold only 0 and {ignore_index} (all {len(pairs)} of them): {ignore_index} is the "
        f"ignore value, so every object pixel would be left out of training and of the metrics. {advice}"
    )


def read_id2label(
    root: str | os.PathLike, pairs: Sequence[tuple[Path, Path]] | None = None, ignore_index: int = 255
) -> dict[int, str]:
    """Class names from ``root/labels.json``; without it, ``class_0`` ... up to the largest index in the masks
    (``ignore_index`` aside)."""
    path = Path(root) / "labels.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return {int(k): str(v) for k, v in data.items()}
        except (json.JSONDecodeError, ValueError, AttributeError) as err:
            raise ValueError(f"{os.fspath(path)!r} must map class indices to names: {err}") from None
    if pairs is None:
        pairs = scan_segmentation_split(root, "train")
    top = 0
    for _, mask in pairs:
        values = np.unique(np.asarray(read_mask(mask)))
        values = values[values != ignore_index]
        if values.size:
            top = max(top, int(values.max()))
    return {i: f"class_{i}" for i in range(top + 1)}


class SegmentationFolder(torch.utils.data.Dataset):
    """Images and their label maps. Items: ``(pixel_values (3, H, W), labels (H, W) int64)``.

    Without ``transform``: images resized (bilinear) and masks resized (nearest) to ``size``, images normalised with
    ``mean`` and ``std``; with ``hflip`` > 0, image and mask are flipped together with that probability. With a
    ``transform`` (:class:`~pvtv2.data.augment.SegmentationTrainTransform`: the rescale / crop / flip / photometric
    recipe), it does all of that instead and ``size`` is unused. ``reduce_labels`` reads ADE20K-style maps
    (:func:`reduce_labels`: 0 is "no label", classes from 1), whose 0 becomes ``ignore_index``. With
    ``num_classes``, a mask value outside ``0 .. num_classes - 1`` (``ignore_index`` aside) is a ``ValueError``
    naming the mask.

    The random draws for sample ``i`` in epoch ``e`` come from ``(seed, e, i)`` (:meth:`set_epoch`), not from global
    state, so a resumed run and any number of loader workers see the same augmentations.
    """

    def __init__(
        self, root: str | os.PathLike, split: str, size: int | tuple[int, int], hflip: float = 0.0, seed: int = 0,
        mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, *,
        reduce_labels: bool = False, transform: SegmentationTrainTransform | None = None, ignore_index: int = 255,
        num_classes: int | None = None,
    ) -> None:
        self.pairs = scan_segmentation_split(root, split)
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.hflip = hflip
        self.seed = seed
        self.epoch = 0
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.reduce_labels = reduce_labels
        self.transform = transform
        self.ignore_index = ignore_index
        self.num_classes = num_classes
        if transform is not None and transform.ignore_index != ignore_index:
            # The crop's padding and its class cap would use another ignore value than the labels and the loss.
            raise ValueError(f"the transform's ignore_index {transform.ignore_index} is not the dataset's {ignore_index}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def _check_classes(self, labels: np.ndarray, mask_path: Path) -> None:
        # A value beyond the classes (a mask of another labelling than labels.json's) stopped training at the batch
        # that held it, after any number of steps, with the loss's "label values [5] are out of range" naming no file.
        kept = labels[labels != self.ignore_index]
        if kept.size and (int(kept.min()) < 0 or int(kept.max()) >= self.num_classes):
            bad = np.unique(kept[(kept < 0) | (kept >= self.num_classes)])[:10].tolist()
            raise ValueError(
                f"mask {os.fspath(mask_path)!r} holds class(es) {bad}{' (after --reduce-labels)' if self.reduce_labels else ''}"
                f" but the classes are 0..{self.num_classes - 1} (DIR/labels.json names them) and {self.ignore_index} is "
                f"the ignore value"
            )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        # Upright (EXIF orientation applied) and 16-bit greyscale scaled to 8 bits, as evaluate_segmenter and
        # pvtv2 segment read images: a rotated photo read as stored was paired with a mask drawn on the upright one.
        image = load_image(image_path)
        mask = read_mask(mask_path)
        if mask.size != image.size:
            # Both are resized to one size below: a mask of another shape would be stretched over the wrong pixels.
            raise ValueError(
                f"mask {os.fspath(mask_path)!r} is {mask.width}x{mask.height} but its image {os.fspath(image_path)!r} "
                f"is {image.width}x{image.height} (after its EXIF orientation); a mask labels its image's pixels"
            )
        labels = np.asarray(mask)
        if self.reduce_labels:
            labels = reduce_labels(labels, self.ignore_index)
        if self.num_classes is not None:
            self._check_classes(labels, mask_path)
        if self.transform is not None:
            return self.transform(image, labels, derive_seed(self.seed, self.epoch, index))
        height, width = self.size
        image = image.resize((width, height), PIL.Image.BILINEAR)
        mask = mask.resize((width, height), PIL.Image.NEAREST)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
        labels = torch.from_numpy(np.asarray(mask).astype(np.int64))  # (H, W)
        if self.reduce_labels:  # a pointwise map: the same before or after a nearest-neighbour resize
            labels = reduce_labels(labels, self.ignore_index)
        if self.hflip > 0 and np.random.default_rng([self.seed, self.epoch, index]).random() < self.hflip:
            pixels, labels = pixels.flip(-1), labels.flip(-1)
        return (pixels - self.mean) / self.std, labels
