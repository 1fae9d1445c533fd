"""Image-folder datasets for classification, deterministic augmentation and sharding.

A dataset is a folder ``root/<split>/<class>/<image>``; classes are the sub-folder names in sorted order, as
torchvision's ``ImageFolder`` orders them, except that a hidden folder (a name starting with ``.``, such as
``.ipynb_checkpoints``) is no class: torchvision's would count it, so the classes after it would have other indices
there; each scan names the hidden folders it leaves out in a warning. Unreadable files are found when the folder is scanned (PIL ``verify``),
named in a warning and skipped, so a bad file fails no run half-way through an epoch.

Randomness never comes from global state here: the crop and flip of sample ``i`` in epoch ``e`` come from a generator
seeded with ``(seed, e, i)``, and the order of an epoch from one seeded with ``(seed, e)``. An interrupted run that
resumes at epoch ``e`` therefore sees exactly the images, crops and batches an uninterrupted run would have seen,
whatever the number of data-loading workers.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from .augment import PaperRandAugment, random_erasing, seeded
from .processing import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, PvtV2ImageProcessor, load_image

__all__ = [
    "ImageFolder",
    "TrainTransform",
    "EvalTransform",
    "find_image_files",
    "scan_split",
    "sample_rng",
    "epoch_indices",
    "split_samples",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- scanning
def find_image_files(folder: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """Image files (by extension) under ``folder``, recursively and sorted, and the sub-folders that could not be
    listed, each with the system's reason (e.g. ``"DIR/sub (Permission denied)"``).

    Symlinked folders are not followed (as ``Path.rglob`` does not), so a link loop cannot recurse forever; those
    below ``folder`` are named in a warning, as their images are left out (torchvision's ``ImageFolder`` follows
    them). Only regular files count (a FIFO named ``x.png`` would block the first read), and links to them; a link
    with an image extension whose target is missing (or a link loop) is listed too, so that reading it fails by name
    rather than the image being left out without a word. ``Path.rglob`` skips a folder it may not list without a
    word; here the caller gets it, to warn or refuse.
    """
    files: list[Path] = []
    unlisted: list[str] = []
    linked: list[str] = []

    def note(err: OSError) -> None:
        unlisted.append(f"{err.filename} ({err.strerror or err})")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=note):
        linked.extend(os.path.join(dirpath, name) for name in dirnames if os.path.islink(os.path.join(dirpath, name)))
        for name in filenames:
            path = Path(dirpath) / name
            dangling = path.is_symlink() and not path.exists()
            if path.suffix.lower() in IMAGE_EXTENSIONS and (path.is_file() or dangling):
                files.append(path)
    if linked:
        logger.warning(
            "not following %d symbolic link(s) to folders (their images are left out; link the files or copy the "
            "folders instead): %s", len(linked), ", ".join(sorted(linked)),
        )
    return sorted(files), sorted(unlisted)


def scan_split(root: str | os.PathLike, split: str, verify: bool = True) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes and ``(path, label)`` samples of ``root/split``.

    Classes are the sorted names of the sub-folders of ``root/split`` (links to folders included) that are not
    hidden: a name starting with ``.`` is no class, and a warning names the ones left out (torchvision's
    ``ImageFolder`` counts them, numbering the classes after them differently).
    Raises ``FileNotFoundError`` for a missing split and ``ValueError`` for a split without class folders, with an
    empty class folder (a class with no images cannot be learnt, and silently renumbering the others would be worse)
    or with a symbolic link whose target is missing (for the same reason; links to folders are classes).
    With ``verify``, files that PIL cannot open (corrupt, truncated, not readable by this user) are skipped with one
    warning that lists their paths and reasons. Folders that cannot be listed (no read permission) are named in a
    warning whatever ``verify`` says: their images are not in the samples.
    """
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"dataset split {split!r} not found: expected a folder {str(folder)!r} with one sub-folder per class "
            f"(layout DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg)"
        )
    listed = list(folder.iterdir())
    entries = [entry for entry in listed if not entry.name.startswith(".")]
    hidden = sorted(entry.name for entry in listed if entry.name.startswith(".") and entry.is_dir())
    if hidden:
        logger.warning(
            "leaving out hidden folder(s) %s of %s: a name starting with '.' is not a class (torchvision's ImageFolder "
            "would count it, and number the classes after it differently)", hidden, folder,
        )
    # A link whose target is gone would be left out as "not a folder": a class silently missing, the others renumbered.
    broken = sorted(entry.name for entry in entries if entry.is_symlink() and not entry.exists())
    if broken:
        raise ValueError(
            f"{str(folder)!r} has symbolic link(s) whose target is missing: {broken[:10]}; restore the targets or "
            f"remove the links (each class folder is a class)"
        )
    classes = sorted(entry.name for entry in entries if entry.is_dir())
    if not classes:
        raise ValueError(f"{str(folder)!r} has no class folders: put each class's images in {str(folder)}/<class>/")
    samples: list[tuple[str, int]] = []
    bad: list[str] = []
    unlisted: list[str] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        files, skipped = find_image_files(folder / name)
        unlisted.extend(skipped)
        good = 0
        for path in files:
            reason = _unreadable_reason(path) if verify else None
            if reason is not None:
                bad.append(f"{path} ({reason})")
                continue
            samples.append((str(path), label))
            good += 1
        if good == 0:
            empty.append(name)
    if unlisted:
        logger.warning(
            "skipping %d folder(s) in %s that cannot be listed (their images are left out): %s",
            len(unlisted), folder, ", ".join(unlisted),
        )
    if bad:
        logger.warning("skipping %d unreadable image(s) in %s: %s", len(bad), folder, ", ".join(bad))
    if empty:
        raise ValueError(
            f"class folder(s) {empty} in {str(folder)!r} contain no readable images (extensions "
            f"{', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
        )
    return classes, samples


def _unreadable_reason(path: Path) -> str | None:
    """Why PIL cannot identify and fully decode the file (``verify`` alone misses some truncated files), or None."""
    try:
        with PIL.Image.open(path) as image:
            image.verify()
        with PIL.Image.open(path) as image:
            image.load()
            # load_image turns the image upright: an EXIF block it cannot parse would stop training at that image
            PIL.ImageOps.exif_transpose(image)
        return None
    except OSError as err:  # a permission or I/O error, or PIL's "cannot identify image file"
        return err.strerror or str(err) or type(err).__name__
    except Exception as err:  # PIL raises many kinds for corrupt data: SyntaxError, ValueError, struct.error...
        return str(err) or type(err).__name__


def split_samples(
    samples: Sequence[tuple[Any, int | None]], fraction: float, seed: int
) -> tuple[list[tuple[Any, int | None]], list[tuple[Any, int | None]]]:
    """A validation split carved from training samples: ``(train, val)``, each in the original order.

    Per class (the second item of each sample; all together when it is None), ``round(fraction * n)`` samples, at
    least one and never all, go to validation, chosen by a generator seeded with ``(seed, class)``: the same seed
    gives the same split, whatever else changes. A class with a single sample stays in training (and is named).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"the validation split must be a fraction in (0, 1), e.g. 0.1, got {fraction!r}")
    by_class: dict[int | None, list[int]] = {}
    for index, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(index)
    chosen: set[int] = set()
    alone = []
    for label, members in sorted(by_class.items(), key=lambda item: -1 if item[0] is None else item[0]):
        if len(members) < 2:
            alone.append(label)
            continue
        count = min(len(members) - 1, max(1, round(fraction * len(members))))
        rng = np.random.default_rng([seed, 0 if label is None else int(label) + 1])
        chosen.update(members[i] for i in rng.permutation(len(members))[:count])
    if not chosen:  # evaluating on nothing would report a loss and accuracy of 0 as if measured
        raise ValueError(
            f"a validation split of {fraction:g} would be empty: none of the {len(by_class)} class(es) of the "
            f"{len(samples)} sample(s) has more than one sample; add samples or a separate validation set"
        )
    if alone:
        logger.warning("class(es) %s have a single training sample: kept in training, none in the validation split", alone)
    train = [s for i, s in enumerate(samples) if i not in chosen]
    val = [s for i, s in enumerate(samples) if i in chosen]
    return train, val


# --------------------------------------------------------------------------------------------- randomness
def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation generator of one sample in one epoch: a pure function of its arguments."""
    return np.random.default_rng([seed, epoch, index])


def epoch_indices(
    num_samples: int, *, seed: int, epoch: int, shuffle: bool, rank: int = 0, world_size: int = 1, pad: bool = True
) -> list[int]:
    """The sample order of one process in one epoch.

    Shuffles with a generator seeded by ``seed + epoch`` (as ``DistributedSampler`` does) and deals the result to the
    processes round-robin. With ``pad`` the list is first extended by wrapping around so that every process gets
    the same number of samples (DistributedDataParallel needs equal step counts); without it, shards may differ by
    one and every sample is seen exactly once (for evaluation).
    """
    if shuffle:
        generator = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(num_samples, generator=generator).tolist()
    else:
        order = list(range(num_samples))
    if pad and world_size > 1:
        total = math.ceil(num_samples / world_size) * world_size
        order = (order * math.ceil(total / max(num_samples, 1)))[:total]
    return order[rank::world_size]


# --------------------------------------------------------------------------------------------- transforms
def _to_tensor(image: PIL.Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))  # (3, H, W)


@dataclass
class TrainTransform:
    """Random resized crop, horizontal flip, optionally RandAugment, normalisation, optionally random erasing: the
    per-image augmentation of the PVTv2 paper (DeiT's recipe; MixUp and CutMix act on batches,
    :class:`~pvtv2.data.augment.MixUpCutMix`), in timm's order.

    The crop follows torchvision's ``RandomResizedCrop``: up to ten tries at an area fraction in ``scale`` and a
    log-uniform aspect ratio in ``ratio``, else a centre crop clamped to ``ratio``; the crop cut out, then resized with
    ``interpolation`` (the recipe: bicubic). The crop and flip come from the sample's NumPy generator; RandAugment
    and erasing from torch's generator seeded by the next draw of it, so they too are a function of
    ``(seed, epoch, index)``, and with both off the generator is used exactly as before they existed.
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    randaugment: PaperRandAugment | None = None
    erasing: float = 0.0

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}")
        self._eraser = random_erasing(self.erasing) if self.erasing != 0 else None

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(left, top, crop width, crop height)."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return left, top, w, h
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, image: PIL.Image.Image, rng: np.random.Generator) -> torch.Tensor:
        left, top, w, h = self.crop_box(image.width, image.height, rng)
        resample = _RESAMPLE[self.interpolation]
        # Cut out, then resize, as torchvision's resized_crop: a resize restricted to the box (PIL's box=) reads pixels
        # outside it for the border rows and columns.
        image = image.crop((left, top, left + w, top + h)).resize((self.size, self.size), resample)
        if rng.uniform() < self.hflip:
            image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        if self.randaugment is None and self._eraser is None:
            return _to_tensor(image, self.mean, self.std)
        with seeded(int(rng.integers(2**63))):
            if self.randaugment is not None:
                image = self.randaugment(image)
            tensor = _to_tensor(image, self.mean, self.std)
            return self._eraser(tensor) if self._eraser is not None else tensor


_RESAMPLE = {"bilinear": PIL.Image.Resampling.BILINEAR, "bicubic": PIL.Image.Resampling.BICUBIC}


class EvalTransform:
    """What ``processor`` does (by default ``PvtV2ImageProcessor(size=size)``: resize to ``size`` x ``size`` and
    normalise), so that a saved checkpoint with its ``preprocessor_config.json`` predicts as it was evaluated."""

    def __init__(self, size: int, processor: PvtV2ImageProcessor | None = None) -> None:
        self.processor = processor if processor is not None else PvtV2ImageProcessor(size={"height": size, "width": size})

    def __call__(self, image: PIL.Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        return self.processor(image, return_tensors="pt")["pixel_values"][0]


# --------------------------------------------------------------------------------------------- dataset
class ImageFolder(torch.utils.data.Dataset):
    """``(pixel_values, label)`` pairs from scanned samples; the transform gets a per-sample, per-epoch generator.

    An index past the end is a repeated draw (:func:`~pvtv2.data.augment.repeated_epoch_indices`): it reads sample
    ``index % len(self)`` and seeds the augmentation with the whole index, so every copy is augmented differently.
    """

    def __init__(
        self, samples: Sequence[tuple[str, int]], transform: TrainTransform | EvalTransform, seed: int = 0
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index % len(self.samples)]
        image = load_image(path)
        return self.transform(image, sample_rng(self.seed, self.epoch, index)), label
