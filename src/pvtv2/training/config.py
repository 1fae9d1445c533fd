"""What a training run is: :class:`TrainConfig`, its defaults (the PVTv2 paper's ImageNet recipe) and its checks.

The defaults are the PVTv2 paper's ImageNet recipe (itself DeiT's): AdamW, a cosine learning-rate schedule after a
linear warmup, weight decay 0.05 except on norms and biases, label smoothing 0.1, stochastic depth at the variant's
rate, random resized crops and horizontal flips. The peak learning rate follows the authors' linear scaling rule,
``5e-4 * global batch / 512``, unless given.

The recipe's augmentation (:data:`DEIT_RECIPE`: RandAugment, MixUp, CutMix, random erasing, bicubic crops, repeated
augmentation under DDP) is on by default when a classifier is trained from scratch from a preset, and off otherwise
(fine-tuning, a config.json architecture, the dense tasks): :func:`resolve_recipe` decides, once, when a run starts.
Each of its fields is ``None`` until then ("the recipe's value"), so that a value given on purpose, ``mixup=0.0``
included, always wins over the recipe.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..models.config import is_preset_name, short_repr

__all__ = ["DEIT_RECIPE", "MAX_IMAGE_SIDE", "MAX_SEED", "NO_RECIPE", "RECIPES", "TASKS", "TrainConfig",
           "describe_recipe", "flag", "resolve_recipe"]

TASKS = ("classification", "segmentation", "detection", "depth")
# pvtv2.models.detection.DETECTORS (not imported: reading a config needs no model code)
DETECTORS = ("retinanet", "faster_rcnn", "mask_rcnn", "fcos")
# pvtv2.models.segmentation.DECODE_HEAD_TYPES, likewise
DECODE_HEADS = ("segformer", "fpn")
# The learning-rate schedules after the warmup.
SCHEDULES = ("cosine", "poly")
# The resampling filters of the training crop.
INTERPOLATIONS = ("bilinear", "bicubic")
# --recipe: "auto" (the default) is "deit" for a classifier trained from scratch from a preset, "none" otherwise.
RECIPES = ("auto", "deit", "none")
# The PVTv2 paper's (DeiT's) ImageNet augmentation, as TrainConfig fields. Repeated augmentation is DeiT's only under
# DDP (its 3 copies of an image land on different processes); in one process it is left at 1.
DEIT_RECIPE: dict[str, Any] = {
    "randaugment": True, "mixup": 0.8, "cutmix": 1.0, "reprob": 0.25, "train_interpolation": "bicubic",
    "repeated_aug": 3,
}
# The same fields turned off: fine-tuning's default, and the dense tasks'.
NO_RECIPE: dict[str, Any] = {
    "randaugment": False, "mixup": 0.0, "cutmix": 0.0, "reprob": 0.0, "train_interpolation": "bilinear",
    "repeated_aug": 1,
}


# The largest input side the commands accept (train, info, benchmark, demo-det...): a larger one is far more likely a
# typo than a plan, and would otherwise start a run that only fails, or swaps, once the first batch is allocated.
MAX_IMAGE_SIDE = 4096
# Segmentation's ignored mask value: SegFormer's and mmsegmentation's 255 by default; at most a 16-bit PNG's largest.
DEFAULT_IGNORE_INDEX = 255
MAX_IGNORE_INDEX = 65535
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
    clip_grad: float | None = None  # the gradient's largest global 2-norm; None or 0: no clipping
    bf16: bool = False  # bfloat16 autocast (--amp bf16, or --bf16)
    fp16: bool = False  # float16 autocast with a gradient scaler, CUDA only (--amp fp16)
    seed: int = 0
    replace_head: bool = False
    # detection: retinanet, faster_rcnn, mask_rcnn or fcos; None: a saved detector's own kind, else retinanet
    detector: str | None = None
    multiscale: bool = False  # detection: the 3x recipe's random shorter side in training (480 ... 800, scaled)
    # The paper's (DeiT's) augmentation (docs/training.md). None: the recipe's value (DEIT_RECIPE when --recipe is
    # deit, NO_RECIPE when none; resolve_recipe fills them in when the run starts).
    recipe: str = "auto"  # "deit" for a preset trained from scratch (classification), else "none"
    randaugment: bool | None = None  # timm's rand-m9-mstd0.5-inc1 on torchvision's ops (data/augment.py)
    mixup: float | None = None  # MixUp's Beta alpha (the recipe: 0.8); 0: off
    cutmix: float | None = None  # CutMix's Beta alpha (the recipe: 1.0); 0: off; with both on, one of them per batch
    reprob: float | None = None  # random-erasing probability (the recipe: 0.25)
    repeated_aug: int | None = None  # copies of each image per epoch, each augmented differently (the recipe: 3 under DDP)
    train_interpolation: str | None = None  # of the random resized crop (the recipe: bicubic; otherwise bilinear)
    ema: float | None = None  # decay of an EMA of the weights, evaluated and saved as OUT/ema; None: off
    val_split: float | None = None  # a seeded validation split carved from train/ when there is no val/ (not detection)
    freeze_stages: int = 0  # fine-tuning: the first k encoder stages fixed
    layer_decay: float | None = None  # fine-tuning: layer-wise learning-rate decay over the encoder's blocks
    # Segmentation (SegFormer's recipe): ADE20K-style maps, the rescale/crop/flip/photometric pipeline, the head's lr.
    reduce_labels: bool = False  # 0 = no label, class k + 1 -> k
    seg_augment: bool = False  # random rescale (0.5-2x), crop --image-size (at most 75% one class), flip, photometric
    head_lr_mult: float = 1.0  # the learning rate of everything outside the encoder (SegFormer: 10)
    # segmentation: the mask value left out of the loss and the metrics (1 ... 65535, above every class index)
    ignore_index: int = 255
    decode_head: str | None = None  # segmentation: "segformer" or "fpn" (Semantic FPN); None: the checkpoint's, else SegFormer's
    schedule: str = "cosine"  # or "poly" (mmsegmentation's, power 0.9), after the warmup
    depth_scale: float = 1000.0  # depth: PNG units per metre (1000: millimetres, NYU's)
    nyu_crop: bool = False  # depth: evaluate inside Eigen's NYU crop only
    max_depth: float | None = None  # depth: the model's range, sigmoid x max_depth, and the metrics' (None: the model's, 10)
    task: str = "classification"  # or "segmentation" (DIR/{train,val}/{images,masks}), "detection" (COCO), "depth"
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
        # On --resume the command line's --min-lr is its default unless given: the run's own, stored, is compared
        # once read (an --lr equal to the rate of a run started without one was refused against the default 1e-5).
        if self.lr is not None and self.min_lr > self.lr and not self.resume:
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
            # 0 means no clipping (a norm of 0 would zero every step); a negative norm would reverse every step
            # (gradient ascent).
            _number("clip_grad", self.clip_grad, low=0.0, hint="0 or left out: no clipping")
        if self.bf16 and self.fp16:
            raise ValueError("--amp fp16 and --bf16 (--amp bf16) contradict each other: pass one of them")
        for name in ("bf16", "fp16", "replace_head", "multiscale", "progress", "resume", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{flag(name)} must be true or false, got {getattr(self, name)!r}")
        for name in ("data", "model", "output"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{flag(name)} must be a string, got {getattr(self, name)!r}")
        if not self.model:
            raise ValueError("--model must name a preset, a config.json or a checkpoint")
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.detector is not None and self.detector not in DETECTORS:
            raise ValueError(f"--detector must be one of {', '.join(DETECTORS)}, got {self.detector!r}")
        self._validate_recipe()
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: pass one of them")
        if not self.output:
            raise ValueError("an output folder is needed (--output)")
        if self.device is not None and not isinstance(self.device, str):
            raise TypeError(f"--device must be a string such as cpu or cuda:0, got {self.device!r}")
        if self.device is not None and self.device.strip().split(":")[0] == "meta":
            raise ValueError("--device meta holds shapes without data: nothing can be trained there; use cpu or cuda")

    def _validate_recipe(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if self.recipe == "deit" and self.task != "classification":
            raise ValueError(f"--recipe deit is the ImageNet classification recipe; --task {self.task} has its own")
        if self.randaugment is not None and not isinstance(self.randaugment, bool):
            raise TypeError(f"--randaugment must be true or false, got {self.randaugment!r}")
        if self.mixup is not None:
            _number("mixup", self.mixup, low=0.0, hint="the Beta distribution's alpha, e.g. 0.8; 0 turns it off")
        if self.cutmix is not None:
            _number("cutmix", self.cutmix, low=0.0, hint="the Beta distribution's alpha, e.g. 1.0; 0 turns it off")
        if self.reprob is not None:
            _number("reprob", self.reprob, low=0.0, high=1.0)
        if self.repeated_aug is not None:
            _integer("repeated_aug", self.repeated_aug, minimum=1)
        if self.train_interpolation is not None and self.train_interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"--train-interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.train_interpolation!r}"
            )
        if self.ema is not None:
            _number("ema", self.ema, low=0.0, high=1.0, low_open=True, high_open=True, hint="e.g. 0.9998")
        if self.val_split is not None:
            _number("val_split", self.val_split, low=0.0, high=1.0, low_open=True, high_open=True, hint="e.g. 0.1")
            if self.task == "detection":
                raise ValueError(
                    "--val-split does not apply to --task detection: its validation split is "
                    "DIR/annotations/instances_val.json with DIR/val/ (make one from the training annotations)"
                )
        _integer("freeze_stages", self.freeze_stages, minimum=0)
        if self.layer_decay is not None:
            _number("layer_decay", self.layer_decay, low=0.0, high=1.0, low_open=True, hint="e.g. 0.75")
        for name in ("reduce_labels", "seg_augment"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{flag(name)} must be true or false, got {getattr(self, name)!r}")
            if getattr(self, name) and self.task != "segmentation":
                raise ValueError(f"{flag(name)} applies to --task segmentation only, not --task {self.task}")
        # A PNG mask holds 0 ... 65535; 0 is always a class (the data's classes are checked once read).
        _integer("ignore_index", self.ignore_index, minimum=1, maximum=MAX_IGNORE_INDEX)
        if self.ignore_index != DEFAULT_IGNORE_INDEX and self.task != "segmentation":
            raise ValueError(f"--ignore-index applies to --task segmentation only, not --task {self.task}")
        _number("head_lr_mult", self.head_lr_mult, low=0.0, low_open=True, hint="e.g. 10 for SegFormer's head")
        if self.decode_head is not None:
            if self.decode_head not in DECODE_HEADS:
                raise ValueError(f"--decode-head must be one of {', '.join(DECODE_HEADS)}, got {self.decode_head!r}")
            if self.task != "segmentation":
                raise ValueError(f"--decode-head applies to --task segmentation only, not --task {self.task}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        _number("depth_scale", self.depth_scale, low=0.0, low_open=True, hint="PNG units per metre, e.g. 1000")
        if not isinstance(self.nyu_crop, bool):
            raise TypeError(f"--nyu-crop must be true or false, got {self.nyu_crop!r}")
        if self.max_depth is not None:
            # Above the metrics' 1 mm floor (depth_task.MIN_DEPTH): below it every evaluation failed, after an epoch.
            _number("max_depth", self.max_depth, low=1e-3, low_open=True,
                    hint="metres, above the metrics' 1 mm floor; e.g. 10 for NYU, 80 for KITTI")
        if self.task != "depth" and (self.nyu_crop or self.depth_scale != 1000.0 or self.max_depth is not None):
            name = "nyu_crop" if self.nyu_crop else "depth_scale" if self.depth_scale != 1000.0 else "max_depth"
            raise ValueError(f"{flag(name)} applies to --task depth only, not --task {self.task}")
        if self.task != "classification":
            for name in ("randaugment", "mixup", "cutmix", "reprob"):
                if getattr(self, name):
                    raise ValueError(f"{flag(name)} is a classification augmentation; --task {self.task} has its own")
            changed = [name for name in ("repeated_aug", "train_interpolation")
                       if getattr(self, name) not in (None, NO_RECIPE[name])]
            if changed:
                name = changed[0]
                raise ValueError(f"{flag(name)} applies to classification only, not --task {self.task}")


def resolve_recipe(cfg: TrainConfig, world_size: int = 1) -> tuple[TrainConfig, str]:
    """The run's settings with the recipe decided: ``recipe`` "deit" or "none" and every recipe field a value (the
    ones left ``None`` take the recipe's), and the reason for the decision, for the log.

    ``recipe="auto"`` is "deit" for a classifier trained from scratch from a preset name (the paper's setting), and
    "none" for fine-tuning (a checkpoint folder, file or hub id), for a config.json architecture (small experiments
    that the ImageNet recipe would only slow down; ``recipe="deit"`` turns it on) and for the other tasks. Repeated
    augmentation is 3 only when ``world_size`` > 1 (DeiT's, over DDP's processes). Fields given a value keep it.
    """
    recipe, reason = cfg.recipe, f"--recipe {cfg.recipe}"
    if recipe == "auto":
        if cfg.task != "classification":
            recipe, reason = "none", f"--task {cfg.task} has its own recipe"
        elif is_preset_name(cfg.model):
            recipe, reason = "deit", f"the preset {cfg.model} is trained from scratch"
        elif cfg.model.lower().endswith(".json"):  # ARCH.JSON too, as engine.new_architecture reads it
            recipe, reason = "none", "a config.json architecture; --recipe deit turns it on"
        else:
            recipe, reason = "none", f"fine-tuning {cfg.model}; --recipe deit turns it on"
    values = dict(DEIT_RECIPE if recipe == "deit" else NO_RECIPE)
    if world_size <= 1:
        values["repeated_aug"] = 1
    changes = {name: value for name, value in values.items() if getattr(cfg, name) is None}
    return dataclasses.replace(cfg, recipe=recipe, **changes), reason


def describe_recipe(cfg: TrainConfig) -> str:
    """The augmentation of a decided run in one line, for the log."""
    return (
        f"RandAugment {'rand-m9-mstd0.5-inc1' if cfg.randaugment else 'off'}, mixup {cfg.mixup:g}, cutmix "
        f"{cfg.cutmix:g}, random erasing {cfg.reprob:g}, {cfg.train_interpolation} crops, repeated augmentation "
        f"x{cfg.repeated_aug}, label smoothing {cfg.label_smoothing:g}"
    )


def _integer(name: str, value: Any, *, minimum: int, maximum: int | None = None, maximum_text: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{flag(name)} must be an integer, got {short_repr(value)}")
    if maximum is not None and not minimum <= value <= maximum:
        raise ValueError(
            f"{flag(name)} must be an integer in [{minimum}, {maximum_text or maximum}], got {short_repr(value)}"
        )
    if value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{flag(name)} must be {what}, got {short_repr(value)}")


def _number(
    name: str, value: Any, *, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False,
    hint: str = "",
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{flag(name)} must be a number, got {short_repr(value)}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int beyond any float (10**400): too large, whatever the bounds
        finite = False
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (finite and above and below):
        lo, hi = ("(" if low_open else "[") + f"{low:g}", f"{high:g}" + (")" if high_open else "]")
        wanted = f"> {low:g}" if high == math.inf and low_open else f">= {low:g}" if high == math.inf else f"in {lo}, {hi}"
        raise ValueError(
            f"{flag(name)} must be a finite number {wanted}, got {short_repr(value)}" + (f" ({hint})" if hint else "")
        )
