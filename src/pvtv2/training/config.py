"""What a training run is: :class:`TrainConfig`, its defaults (the PVTv2 paper's ImageNet recipe) and its checks.

The defaults are the PVTv2 paper's ImageNet recipe (itself DeiT's): AdamW, a cosine learning-rate schedule after a
linear warmup, weight decay 0.05 except on norms and biases, label smoothing 0.1, stochastic depth at the variant's
rate, random resized crops and horizontal flips. The peak learning rate follows the authors' linear scaling rule,
``5e-4 * global batch / 512``, unless given.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = ["MAX_IMAGE_SIDE", "MAX_SEED", "TASKS", "TrainConfig", "flag"]

TASKS = ("classification", "segmentation", "detection")
# pvtv2.models.detection.DETECTORS (not imported: reading a config needs no model code)
DETECTORS = ("retinanet", "faster_rcnn", "mask_rcnn", "fcos")


# The largest input side the commands accept (train, info, benchmark, demo-det...): a larger one is far more likely a
# typo than a plan, and would otherwise start a run that only fails, or swaps, once the first batch is allocated.
MAX_IMAGE_SIDE = 4096
# Seeds go to torch.manual_seed and NumPy as 64-bit integers: a larger one overflows there, after the run has begun.
MAX_SEED = 2**63 - 1


def flag(name: str) -> str:
    """The command-line spelling of a field: ``clip_grad`` -> ``--clip-grad`` (errors name what the user typed)."""
    return "--" + name.replace("_", "-")


@dataclasses.dataclass
class TrainConfig:
    """What a training run is. The fields up to ``task`` define the result and are stored with the run (``resume``
    reuses them); the rest only say how to execute it."""

    data: str = ""
    model: str = "pvt_v2_b0"
    output: str = ""
    image_size: int = 224
    epochs: int = 300
    batch_size: int = 128  # per process and per forward pass
    lr: float | None = None  # peak; None: 5e-4 * batch_size * grad_accum * world_size / 512
    min_lr: float = 1e-5
    warmup_epochs: float = 5.0
    warmup_steps: int | None = None  # optimizer steps; overrides warmup_epochs when set
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    drop_path: float | None = None  # None: the preset's (from scratch) or the checkpoint's (fine-tuning)
    grad_accum: int = 1
    crop_scale: float = 0.08  # smallest area fraction of a random resized crop
    hflip: float = 0.5
    clip_grad: float | None = None  # None: no clipping
    bf16: bool = False
    seed: int = 0
    replace_head: bool = False
    detector: str = "retinanet"  # detection: retinanet, faster_rcnn, mask_rcnn or fcos
    multiscale: bool = False  # detection: the 3x recipe's random shorter side in training (480 ... 800, scaled)
    task: str = "classification"  # or "segmentation": DIR/{train,val}/{images,masks}; or "detection": COCO format
    # execution only
    workers: int | None = None  # None: 0 on CPU, min(8, cores) on GPU
    device: str | None = None
    progress: bool = True
    resume: bool = False
    overwrite: bool = False

    _EXECUTION = ("workers", "device", "progress", "resume", "overwrite", "output")

    def run_fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self._EXECUTION}

    def validate(self) -> None:
        """Raise ``ValueError`` / ``TypeError`` naming the first bad field (as its flag) and its value.

        Every number is checked for type, finiteness and range here, before anything reads the data or writes the
        run folder: a NaN compares False with every bound, so each check below asks for the good case.
        """
        for name in ("image_size", "epochs", "batch_size", "grad_accum"):
            _integer(name, getattr(self, name), minimum=1)
        _integer("image_size", self.image_size, minimum=1, maximum=MAX_IMAGE_SIDE)
        _integer("seed", self.seed, minimum=0, maximum=MAX_SEED, maximum_text="2**63-1")
        if self.workers is not None:
            _integer("workers", self.workers, minimum=0)
        if self.lr is not None:
            _number("lr", self.lr, low=0.0, low_open=True)
        _number("min_lr", self.min_lr, low=0.0)
        if self.lr is not None and self.min_lr > self.lr:
            raise ValueError(f"--min-lr ({self.min_lr:g}) must not exceed --lr ({self.lr:g}): the cosine decays to it")
        _number("warmup_epochs", self.warmup_epochs, low=0.0)
        if self.warmup_steps is not None:
            _integer("warmup_steps", self.warmup_steps, minimum=0)
        _number("weight_decay", self.weight_decay, low=0.0)
        _number("label_smoothing", self.label_smoothing, low=0.0, high=1.0, high_open=True)
        if self.drop_path is not None:
            _number("drop_path", self.drop_path, low=0.0, high=1.0, high_open=True)
        _number("crop_scale", self.crop_scale, low=0.0, low_open=True, high=1.0)
        _number("hflip", self.hflip, low=0.0, high=1.0)
        if self.clip_grad is not None:
            # 0 or a negative norm would zero or reverse every step (gradient ascent): leave the flag out instead.
            _number("clip_grad", self.clip_grad, low=0.0, low_open=True, hint="leave it out for no clipping")
        for name in ("bf16", "replace_head", "multiscale", "progress", "resume", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{flag(name)} must be true or false, got {getattr(self, name)!r}")
        for name in ("data", "model", "output"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{flag(name)} must be a string, got {getattr(self, name)!r}")
        if not self.model:
            raise ValueError("--model must name a preset, a config.json or a checkpoint")
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.detector not in DETECTORS:
            raise ValueError(f"--detector must be one of {', '.join(DETECTORS)}, got {self.detector!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: pass one of them")
        if not self.output:
            raise ValueError("an output folder is needed (--output)")
        if self.device is not None and not isinstance(self.device, str):
            raise TypeError(f"--device must be a string such as cpu or cuda:0, got {self.device!r}")
        if self.device is not None and self.device.strip().split(":")[0] == "meta":
            raise ValueError("--device meta holds shapes without data: nothing can be trained there; use cpu or cuda")


def _integer(name: str, value: Any, *, minimum: int, maximum: int | None = None, maximum_text: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{flag(name)} must be an integer, got {value!r}")
    if maximum is not None and not minimum <= value <= maximum:
        raise ValueError(f"{flag(name)} must be an integer in [{minimum}, {maximum_text or maximum}], got {value}")
    if value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{flag(name)} must be {what}, got {value}")


def _number(
    name: str, value: Any, *, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False,
    hint: str = "",
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{flag(name)} must be a number, got {value!r}")
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        lo, hi = ("(" if low_open else "[") + f"{low:g}", f"{high:g}" + (")" if high_open else "]")
        wanted = f"> {low:g}" if high == math.inf and low_open else f">= {low:g}" if high == math.inf else f"in {lo}, {hi}"
        raise ValueError(f"{flag(name)} must be a finite number {wanted}, got {value}" + (f" ({hint})" if hint else ""))
