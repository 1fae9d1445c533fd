"""What a training run is: :class:`TrainConfig`, its defaults (the PVTv2 paper's ImageNet recipe) and its checks.

The defaults are the PVTv2 paper's ImageNet recipe (itself DeiT's): AdamW, a cosine learning-rate schedule after a
linear warmup, weight decay 0.05 except on norms and biases, label smoothing 0.1, stochastic depth at the variant's
rate, random resized crops and horizontal flips. The peak learning rate follows the authors' linear scaling rule,
``5e-4 * global batch / 512``, unless given.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["TASKS", "TrainConfig"]

TASKS = ("classification", "segmentation")


@dataclasses.dataclass
class TrainConfig:
    """What a training run is. The fields up to ``replace_head`` define the result and are stored with the run
    (``resume`` reuses them); the rest only say how to execute it."""

    data: str = ""
    model: str = "pvt_v2_b0"
    output: str = ""
    image_size: int = 224
    epochs: int = 300
    batch_size: int = 128  # per process and per forward pass
    lr: float | None = None  # peak; None: 5e-4 * batch_size * grad_accum * world_size / 512
    min_lr: float = 1e-5
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    drop_path: float | None = None  # None: the preset's (from scratch) or the checkpoint's (fine-tuning)
    grad_accum: int = 1
    crop_scale: float = 0.08  # smallest area fraction of a random resized crop
    hflip: float = 0.5
    clip_grad: float | None = None
    bf16: bool = False
    seed: int = 0
    replace_head: bool = False
    task: str = "classification"  # or "segmentation": DIR/{train,val}/{images,masks}, pvtv2.dense_train
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
        for name in ("image_size", "epochs", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("warmup_epochs", "weight_decay", "min_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must be non-negative, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.drop_path is not None and not 0 <= self.drop_path < 1:
            raise ValueError(f"drop-path must be in [0, 1), got {self.drop_path}")
        if not 0 < self.crop_scale <= 1:
            raise ValueError(f"crop-scale must be in (0, 1], got {self.crop_scale}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip must be a probability, got {self.hflip}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: pass one of them")
        if not self.output:
            raise ValueError("an output folder is needed (--output)")
