"""The training augmentations of the PVTv2 recipes, built on torchvision's ``transforms.v2``.

Classification (DeiT's recipe, which the PVTv2 paper trains with; ``classification/main.py`` of the authors):

- :class:`PaperRandAugment`: timm's ``rand-m9-mstd0.5-inc1`` expressed with torchvision's ``RandAugment`` ops:
  two ops per image, each applied with probability 0.5 at a magnitude drawn from N(9, 0.5) on timm's 0-10 scale.
  torchvision's op set is not timm's; ``docs/training.md`` lists the differences.
- :func:`random_erasing`: torchvision's ``RandomErasing`` with per-pixel normal noise (timm's ``remode="pixel"``).
- :class:`MixUpCutMix`: a batch goes through torchvision's ``MixUp`` (alpha 0.8) or ``CutMix`` (alpha 1.0), one of
  the two chosen per batch, on label-smoothed one-hot targets: the soft targets of timm's ``Mixup`` with
  ``label_smoothing``; train on them with ``F.cross_entropy(logits, targets)`` (probabilities as targets).
- :func:`repeated_epoch_indices`: repeated augmentation (DeiT's ``RASampler``): every image several times per epoch,
  each copy with its own augmentation, the copies dealt to different processes.

Segmentation (the SegFormer / mmsegmentation ADE20K pipeline): :class:`SegmentationTrainTransform`, random rescale,
random crop with a cap on the share of one class, flip, photometric distortion, normalisation and padding, image
and mask together (``tv_tensors.Image`` and ``tv_tensors.Mask``, so that geometric ops move both and colour ops only
the image).

Randomness. torchvision's transforms draw from torch's global generator. Every call here runs inside
:func:`seeded`, which forks that generator, seeds it from the caller's key, and restores it afterwards: the same
key gives the same output, and nothing outside changes. The keys are derived from ``(seed, epoch, sample index)``
for per-image transforms and ``(seed, epoch, step)`` for batch ones (:func:`derive_seed`), so a resumed run and any
number of data-loading workers see exactly the augmentations an uninterrupted run sees.

torchvision is needed only here (``pip install 'pvtv2[train]'``); it is imported when a transform is built.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from .processing import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "MixUpCutMix",
    "PaperRandAugment",
    "SegmentationTrainTransform",
    "derive_seed",
    "random_erasing",
    "repeated_epoch_indices",
    "seeded",
    "smooth_one_hot",
]

logger = logging.getLogger(__name__)

# timm's RandAugment levels run from 0 to 10 (its _LEVEL_DENOM): "m9" is 9/10 of each op's largest change.
MAX_MAGNITUDE = 10


def _torchvision_v2() -> Any:
    try:
        from torchvision.transforms import v2
    except ImportError as error:  # torchvision is an optional dependency of the library
        raise ImportError(
            "the training augmentations need torchvision (transforms.v2): pip install 'pvtv2[train]' "
            "(or torchvision matching your torch)"
        ) from error
    return v2


# --------------------------------------------------------------------------------------------- randomness
def derive_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of ``keys`` (e.g. ``seed, epoch, index``); different keys give
    independent streams (NumPy's ``SeedSequence`` hashing)."""
    for key in keys:
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or key < 0:
            raise ValueError(f"seed keys must be non-negative integers, got {keys!r}")
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's CPU generator seeded to ``seed``, and give the caller's state back afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------- classification
class PaperRandAugment:
    """RandAugment as the PVTv2 / DeiT recipe configures it in timm (``rand-m9-mstd0.5-inc1``), with torchvision's ops.

    ``num_ops`` times: with probability ``prob`` apply one op drawn uniformly from torchvision's RandAugment space at
    a level drawn from N(``magnitude``, ``magnitude_std``) and clipped to [0, 10]. The level is timm's scale: level
    10 is each op's largest change in torchvision's table (rotate 30 degrees, shear 0.3, translate 150/331 of the
    side, colour factors 1 +- 0.9, posterize to 4 bits, solarize at 0), so m9 means what it means in timm. Every op
    of torchvision's space grows stronger with the level (timm's "increasing" ops). Geometric ops fill with
    ``fill`` (timm: the ImageNet mean colour) and resample with ``interpolation`` (timm: the training one).

    Call it on a PIL image or a uint8 tensor (C, H, W) under :func:`seeded` for reproducible results.
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 9.0,
        magnitude_std: float = 0.5,
        prob: float = 0.5,
        interpolation: str = "bicubic",
        fill: Sequence[int] | None = None,
    ) -> None:
        v2 = _torchvision_v2()
        if isinstance(num_ops, bool) or not isinstance(num_ops, int) or num_ops < 0:
            raise ValueError(f"num_ops must be a non-negative integer, got {num_ops!r}")
        if not _is_number(magnitude) or not 0 <= magnitude <= MAX_MAGNITUDE:
            raise ValueError(f"the RandAugment magnitude must be a number in [0, {MAX_MAGNITUDE}], got {magnitude!r}")
        if not _is_number(magnitude_std) or magnitude_std < 0 or not math.isfinite(magnitude_std):
            raise ValueError(f"magnitude_std must be a finite number >= 0, got {magnitude_std!r}")
        if not _is_number(prob) or not 0 <= prob <= 1:
            raise ValueError(f"prob must be a number in [0, 1], got {prob!r}")
        self.num_ops = num_ops
        self.magnitude = float(magnitude)
        self.magnitude_std = float(magnitude_std)
        self.prob = float(prob)
        self.interpolation = _interpolation(v2, interpolation)
        # timm fills with the mean colour, round(255 * mean) per channel: (124, 116, 104) for ImageNet.
        self.fill = list(fill) if fill is not None else [min(255, round(255 * m)) for m in IMAGENET_MEAN]
        self._v2 = v2

    def level(self) -> float:
        """One op's level: N(magnitude, magnitude_std) clipped to [0, 10], drawn from torch's generator."""
        level = self.magnitude
        if self.magnitude_std > 0:
            level += self.magnitude_std * float(torch.randn(()))
        return min(max(level, 0.0), float(MAX_MAGNITUDE))

    def __call__(self, image: Any) -> Any:
        for _ in range(self.num_ops):
            if float(torch.rand(())) >= self.prob:
                continue
            # torchvision's RandAugment takes an integer bin; 1001 bins over [0, 10] give levels in steps of 0.01.
            op = self._v2.RandAugment(
                num_ops=1,
                magnitude=round(self.level() * 100),
                num_magnitude_bins=MAX_MAGNITUDE * 100 + 1,
                interpolation=self.interpolation,
                fill=self.fill,
            )
            image = op(image)
        return image

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_ops={self.num_ops}, magnitude={self.magnitude}, "
            f"magnitude_std={self.magnitude_std}, prob={self.prob})"
        )


def random_erasing(prob: float = 0.25) -> Any:
    """torchvision's ``RandomErasing`` as timm's ``RandomErasing(mode="pixel", max_count=1)`` is set in DeiT: one
    rectangle of 2% to 1/3 of the image, aspect ratio log-uniform in [0.3, 3.3], filled with N(0, 1) noise per pixel
    (on the normalised image), with probability ``prob``."""
    v2 = _torchvision_v2()
    if not _is_number(prob) or not 0 <= prob <= 1:
        raise ValueError(f"the random-erasing probability must be in [0, 1], got {prob!r}")
    return v2.RandomErasing(p=float(prob), scale=(0.02, 1 / 3), ratio=(0.3, 3.3), value="random")


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B,) class indices to (B, K) targets: ``1 - smoothing + smoothing / K`` on the class, ``smoothing / K``
    elsewhere (timm's ``mixup_target`` and ``F.cross_entropy(label_smoothing=...)`` spread it the same way)."""
    if labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"labels must be a 1-d tensor of class indices, got {labels.dtype} of shape {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes - 1}], got values in [{int(labels.min())}, {int(labels.max())}]")
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32)
    return targets.scatter_(1, labels.long()[:, None], 1.0 - smoothing + off)


class MixUpCutMix:
    """Mix a batch as timm's ``Mixup`` does in DeiT's recipe, with torchvision's ``MixUp`` and ``CutMix``.

    Per batch: CutMix with probability ``switch_prob`` (when both are on), MixUp otherwise; the mixing weight
    ``lam`` ~ Beta(alpha, alpha); every image is mixed with its neighbour in the batch (torchvision pairs image i
    with image i - 1; timm pairs it with the batch's mirror, image B - 1 - i). CutMix's weight is the area actually
    pasted (its box is clipped at the border), as timm's ``correct_lam``. Targets are the label-smoothed one-hot
    vectors mixed with the same weight: each row sums to one.

    Call it with the batch and a seed (``derive_seed(seed, epoch, step)``); it returns the mixed images and the
    (B, num_classes) float targets.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        label_smoothing: float = 0.1,
        switch_prob: float = 0.5,
    ) -> None:
        v2 = _torchvision_v2()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"mixing needs at least 2 classes, got num_classes={num_classes!r}")
        for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if not _is_number(value) or value < 0 or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number >= 0 (0 turns it off), got {value!r}")
        if mixup_alpha == 0 and cutmix_alpha == 0:
            raise ValueError("MixUpCutMix needs mixup_alpha > 0 or cutmix_alpha > 0")
        if not _is_number(label_smoothing) or not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if not _is_number(switch_prob) or not 0 <= switch_prob <= 1:
            raise ValueError(f"switch_prob must be in [0, 1], got {switch_prob!r}")
        self.num_classes = num_classes
        self.label_smoothing = float(label_smoothing)
        self.switch_prob = float(switch_prob) if mixup_alpha > 0 and cutmix_alpha > 0 else float(cutmix_alpha > 0)
        self.mixup = v2.MixUp(alpha=float(mixup_alpha), num_classes=num_classes) if mixup_alpha > 0 else None
        self.cutmix = v2.CutMix(alpha=float(cutmix_alpha), num_classes=num_classes) if cutmix_alpha > 0 else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"MixUpCutMix takes images (B, C, H, W) and labels (B,), got {tuple(images.shape)} and "
                f"{tuple(labels.shape)}"
            )
        targets = smooth_one_hot(labels.cpu(), self.num_classes, self.label_smoothing).to(images.device)
        with seeded(seed):
            use_cutmix = float(torch.rand(())) < self.switch_prob
            mixer = self.cutmix if use_cutmix else self.mixup
            images, targets = mixer(images, targets)
        return images, targets

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, mixup={self.mixup}, cutmix={self.cutmix}, "
            f"label_smoothing={self.label_smoothing}, switch_prob={self.switch_prob})"
        )


def repeated_epoch_indices(
    num_samples: int, *, repeats: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> list[int]:
    """Repeated augmentation (DeiT's ``RASampler``): the order of one process in one epoch, as *draw* indices.

    The epoch's permutation (a generator seeded with ``seed + epoch``, as :func:`~pvtv2.data.folders.epoch_indices`)
    has each sample repeated ``repeats`` times in a row, wrapped around to a multiple of ``world_size`` and dealt
    round-robin, so the copies of one image go to different processes. Each process keeps
    ``ceil(num_samples / world_size)`` of them, an epoch as long as one without repetition (DeiT also rounds the
    epoch down to a multiple of 256 images, which would leave a small data set with nothing).

    A draw index ``copy * num_samples + sample`` names the sample (``draw % num_samples``) and its copy: a dataset
    that seeds augmentation with the draw index gives every copy its own crop, flip and RandAugment.
    """
    for name, value in (("num_samples", num_samples), ("repeats", repeats), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_samples, generator=generator).tolist()
    draws = [copy * num_samples + sample for sample in order for copy in range(repeats)]
    total = math.ceil(len(draws) / world_size) * world_size
    # Wrapped around as often as needed: fewer draws than processes (1 image x 2 copies for 5 processes) left the
    # last processes without a sample, and DistributedDataParallel's steps unmatched.
    draws = (draws * math.ceil(total / len(draws)))[:total]
    per_process = math.ceil(num_samples / world_size)
    return draws[rank:total:world_size][:per_process]


# --------------------------------------------------------------------------------------------- segmentation
class SegmentationTrainTransform:
    """The SegFormer / mmsegmentation training pipeline (ADE20K settings by default), image and mask together.

    1. Rescale keeping the aspect ratio so the image fits in ``scale`` x r (r ~ U(``ratio_range``)): the longer
       side at most ``max(scale) * r``, the shorter at most ``min(scale) * r`` (mmsegmentation's ``Resize`` with
       ``img_scale=(2048, 512), ratio_range=(0.5, 2.0)``); bilinear for the image, nearest for the mask.
    2. Random ``crop_size`` crop; up to ten tries for one in which no class (``ignore_index`` aside) covers more than
       ``cat_max_ratio`` of the labelled pixels, else the last try (mmsegmentation's ``RandomCrop``).
    3. Horizontal flip with probability ``hflip``.
    4. Photometric distortion (torchvision's ``RandomPhotometricDistort``: brightness, contrast before or after
       saturation and hue, each with probability 0.5; hue up to 0.1 of the circle as mmsegmentation's 18 of 180).
    5. Normalise, then pad at the bottom and right to ``crop_size``: the image with 0, the mask with
       ``ignore_index``.

    Call with a PIL image, a PIL or array mask of class indices and a seed (``derive_seed(seed, epoch, index)``);
    returns ``(pixel_values (3, h, w) float32, labels (h, w) int64)``.
    """

    def __init__(
        self,
        crop_size: int | tuple[int, int] = 512,
        scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        hflip: float = 0.5,
        photometric: bool = True,
        ignore_index: int = 255,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        v2 = _torchvision_v2()
        crop = (crop_size, crop_size) if isinstance(crop_size, int) and not isinstance(crop_size, bool) else crop_size
        if not (isinstance(crop, (tuple, list)) and len(crop) == 2 and all(_is_positive_int(c) for c in crop)):
            raise ValueError(f"crop_size must be a positive integer or an (height, width) pair, got {crop_size!r}")
        if not (isinstance(scale, (tuple, list)) and len(scale) == 2 and all(_is_positive_int(s) for s in scale)):
            raise ValueError(f"scale must be two positive integers (long, short), got {scale!r}")
        low, high = ratio_range if isinstance(ratio_range, (tuple, list)) and len(ratio_range) == 2 else (None, None)
        if not (_is_number(low) and _is_number(high) and 0 < low <= high):
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range!r}")
        if not _is_number(cat_max_ratio) or not 0 < cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1] (1 turns the cap off), got {cat_max_ratio!r}")
        if not _is_number(hflip) or not 0 <= hflip <= 1:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip!r}")
        self.crop_size = (int(crop[0]), int(crop[1]))
        self.scale = (max(scale), min(scale))
        self.ratio_range = (float(low), float(high))
        self.cat_max_ratio = float(cat_max_ratio)
        self.hflip = float(hflip)
        self.ignore_index = int(ignore_index)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        # mmsegmentation's PhotoMetricDistortion: brightness +-32 of 255 (here a factor of 0.875-1.125, torchvision's
        # default), contrast and saturation 0.5-1.5, hue +-18 of OpenCV's 180 = 0.1 of the circle.
        self.photometric = v2.RandomPhotometricDistort(hue=(-0.1, 0.1), p=0.5) if photometric else None
        self._v2 = v2

    def rescaled_size(self, height: int, width: int, ratio: float) -> tuple[int, int]:
        """mmcv's ``imrescale`` to ``scale * ratio``: the largest factor that keeps both sides within bounds."""
        long_bound, short_bound = int(self.scale[0] * ratio), int(self.scale[1] * ratio)
        factor = min(long_bound / max(height, width), short_bound / min(height, width))
        return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))

    def crop_box(self, labels: torch.Tensor) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop, with the class cap; draws from torch's generator."""
        full_h, full_w = labels.shape[-2:]
        crop_h, crop_w = min(self.crop_size[0], full_h), min(self.crop_size[1], full_w)
        for _ in range(10):
            top = int(torch.randint(full_h - crop_h + 1, ()))
            left = int(torch.randint(full_w - crop_w + 1, ()))
            if self.cat_max_ratio >= 1:
                break
            window = labels[..., top : top + crop_h, left : left + crop_w]
            counts = torch.bincount(window[window != self.ignore_index].flatten().long())
            counts = counts[counts > 0]
            if counts.numel() > 1 and int(counts.max()) < self.cat_max_ratio * int(counts.sum()):
                break
        return top, left, crop_h, crop_w

    def __call__(self, image: PIL.Image.Image, mask: Any, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        v2, tv_tensors = self._v2, _tv_tensors()
        pixels = tv_tensors.Image(torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1))
        labels = tv_tensors.Mask(torch.from_numpy(np.array(mask, dtype=np.int64)))
        if labels.shape != pixels.shape[-2:]:
            raise ValueError(f"the mask is {tuple(labels.shape)} but the image is {tuple(pixels.shape[-2:])} (height, width)")
        F = v2.functional
        with seeded(seed):
            low, high = self.ratio_range
            ratio = low + (high - low) * float(torch.rand(()))
            size = list(self.rescaled_size(*labels.shape, ratio))
            pixels = F.resize(pixels, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
            labels = F.resize(labels, size, interpolation=v2.InterpolationMode.NEAREST)
            top, left, crop_h, crop_w = self.crop_box(labels)
            pixels, labels = F.crop(pixels, top, left, crop_h, crop_w), F.crop(labels, top, left, crop_h, crop_w)
            if float(torch.rand(())) < self.hflip:
                pixels, labels = F.horizontal_flip(pixels), F.horizontal_flip(labels)
            if self.photometric is not None:
                pixels = self.photometric(pixels)
        values = (pixels.as_subclass(torch.Tensor).float() / 255.0 - self.mean) / self.std  # (3, h, w)
        labels = labels.as_subclass(torch.Tensor)
        pad_h, pad_w = self.crop_size[0] - crop_h, self.crop_size[1] - crop_w
        if pad_h or pad_w:
            values = torch.nn.functional.pad(values, (0, pad_w, 0, pad_h), value=0.0)
            labels = torch.nn.functional.pad(labels, (0, pad_w, 0, pad_h), value=self.ignore_index)
        return values.contiguous(), labels.contiguous()


# --------------------------------------------------------------------------------------------- helpers
def _tv_tensors() -> Any:
    _torchvision_v2()
    from torchvision import tv_tensors

    return tv_tensors


def _interpolation(v2: Any, name: str) -> Any:
    modes = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC,
             "nearest": v2.InterpolationMode.NEAREST}
    if name not in modes:
        raise ValueError(f"interpolation must be one of {sorted(modes)}, got {name!r}")
    return modes[name]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0
