"""Training and evaluation of PVTv2 classifiers on image folders, in one process or under ``torchrun``.

The defaults are the PVTv2 paper's ImageNet recipe (itself DeiT's): AdamW, a cosine learning-rate schedule after a
linear warmup, weight decay 0.05 except on norms and biases, label smoothing 0.1, stochastic depth at the variant's
rate, random resized crops and horizontal flips. The peak learning rate follows the authors' linear scaling rule,
``5e-4 * global batch / 512``, unless given.

Every epoch writes ``OUT/last`` (and ``OUT/best`` when validation top-1 improves): folders that ``from_pretrained``
loads, written to a temporary folder and renamed into place, so a run killed at any moment leaves the previous
complete checkpoint. ``OUT/last/training_state.pt`` holds what ``resume`` needs to continue exactly where the run
stopped; with the same seed, a resumed run ends with the same weights, bit for bit, as an uninterrupted one (on the
same hardware and software), because no randomness comes from global state that a restart would lose:

- the sample order of epoch ``e`` comes from a generator seeded with ``seed + e``;
- the crop and flip of sample ``i`` in epoch ``e`` from one seeded with ``(seed, e, i)``;
- the global torch generator (stochastic depth, dropout) is reseeded from ``(seed, e, rank)`` at each epoch start;
- ``torch.use_deterministic_algorithms(True)`` (warn-only for operations without a deterministic kernel),
  cuDNN autotuning off, ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` on GPUs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .config import PRESETS, PvtV2Config
from .data import EvalTransform, ImageFolder, TrainTransform, epoch_indices, scan_split
from .layers import init_weights
from .modeling import PvtV2ForImageClassification
from .processing import PvtV2ImageProcessor
from .runtime import parse_device

__all__ = [
    "TrainConfig",
    "Task",
    "ClassificationTask",
    "train",
    "evaluate",
    "cosine_warmup_factor",
    "parameter_groups",
    "draw_curves",
    "read_metrics",
    "TRAINING_STATE_NAME",
    "KILL_ENV",
]

logger = logging.getLogger(__name__)

TRAINING_STATE_NAME = "training_state.pt"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
# Test-only fault injection: the process SIGKILLs itself when it reaches this global batch number (counted from 1
# over the whole run), to check that ``--resume`` recovers from a crash in the middle of an epoch.
KILL_ENV = "PVTV2_TEST_KILL_AT_STEP"
TASKS = ("classification", "segmentation")
# What --overwrite removes from the output folder: only what a run writes there.
_RUN_ENTRIES = ("last", "best", ".last.tmp", ".last.old", ".best.tmp", ".best.old", RUN_FILE, METRICS_FILE, CURVES_FILE)


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


# ---------------------------------------------------------------------------------------------- schedule
def cosine_warmup_factor(step: int, *, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a fraction of the peak.

    Linear warmup ``(step + 1) / warmup_steps`` over the first ``warmup_steps`` steps (so no step is wasted at 0),
    then a half cosine from 1 at ``warmup_steps`` down to ``min_ratio`` at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay on weight matrices and kernels only: not on biases and norm scales (1-d tensors), as in DeiT and PVT."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------- distributed
@dataclasses.dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_name: str | None) -> tuple[_Dist, torch.device]:
    """Join the process group that ``torchrun`` describes in RANK / WORLD_SIZE / LOCAL_RANK (NCCL on GPUs, gloo on
    CPUs), and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = _Dist(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device_name is None:
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = parse_device(device_name)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if device.index is None:
            device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def _all_reduce(values: Sequence[float], info: _Dist, device: torch.device) -> list[float]:
    if not info.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _broadcast(obj: Any, info: _Dist) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------- RNG state
def _rng_state() -> dict[str, Any]:
    """This process's generators as tensors and plain numbers (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state(legacy=False)
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
        "numpy_pos": int(np_state["state"]["pos"]),
        "python": torch.tensor(py_internal, dtype=torch.int64),
        "python_version": int(py_version),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_key"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((state["python_version"], tuple(state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _seed_everything(seed: int, epoch: int, rank: int) -> None:
    """Reseed the global generators from (seed, epoch, rank): stochastic depth of an epoch does not depend on
    anything before it, so a resumed epoch draws what the uninterrupted one drew."""
    value = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)


def _set_deterministic() -> None:
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


# ---------------------------------------------------------------------------------------------- output folder
def _write_folder_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling folder, then swap it in with renames; :func:`_recover_folder` repairs the one
    window (between the two renames) in which only the ``.old`` copy exists."""
    tmp = target.with_name(f".{target.name}.tmp")
    old = target.with_name(f".{target.name}.old")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)


def _recover_folder(target: Path) -> None:
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and old.exists():
        os.replace(old, target)


def _load_training_state(folder: Path) -> dict[str, Any]:
    path = folder / TRAINING_STATE_NAME
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read the training state {str(path)!r}: {err}") from err


def _prepare_output(cfg: TrainConfig) -> tuple[TrainConfig, dict[str, Any] | None]:
    """Check the output folder against --resume / --overwrite; return the run's settings and, when resuming from a
    completed epoch, its training state."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {str(out)!r} is a file, not a folder")
    _recover_folder(out / "last")
    _recover_folder(out / "best")
    run_file = out / RUN_FILE
    state_file = out / "last" / TRAINING_STATE_NAME
    has_run = run_file.is_file()
    if cfg.overwrite:
        for name in _RUN_ENTRIES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        return cfg, None
    if cfg.resume:
        if not has_run:
            raise FileNotFoundError(f"nothing to resume in {str(out)!r}: it holds no {RUN_FILE} of a training run")
        stored = json.loads(run_file.read_text(encoding="utf-8"))
        merged = _merge_resumed(cfg, stored)
        state = _load_training_state(out / "last") if state_file.is_file() else None
        return merged, state
    if has_run:
        state = _load_training_state(out / "last") if state_file.is_file() else None
        stored = json.loads(run_file.read_text(encoding="utf-8"))
        if state is not None and state["epoch"] >= stored["epochs"]:
            raise FileExistsError(
                f"{str(out)!r} holds a finished training run ({stored['epochs']} epochs); pass --overwrite to replace "
                f"it, or choose another --output"
            )
        done = 0 if state is None else state["epoch"]
        raise FileExistsError(
            f"{str(out)!r} holds an unfinished training run ({done} of {stored['epochs']} epochs done); pass --resume "
            f"to continue it or --overwrite to start again"
        )
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(
            f"--output {str(out)!r} is not empty and holds no training run; choose an empty or new folder"
        )
    return cfg, None


def _merge_resumed(cfg: TrainConfig, stored: dict[str, Any]) -> TrainConfig:
    """The stored run's settings, with this invocation's execution settings; differing run settings are ignored
    (changing them mid-run would break the equality with an uninterrupted run) and said so."""
    defaults = TrainConfig()
    for key, value in stored.items():
        given = getattr(cfg, key, None)
        if given not in (value, getattr(defaults, key, None), "") and key in cfg.run_fields():
            logger.warning("--resume: ignoring %s=%r; the run continues with %s=%r", key, given, key, value)
    fields = {k: v for k, v in stored.items() if k in cfg.run_fields()}
    return dataclasses.replace(cfg, **fields)


# ---------------------------------------------------------------------------------------------- the model
def _label_map(classes: Sequence[str]) -> dict[int, str]:
    return dict(enumerate(classes))


def build_model(cfg: TrainConfig, classes: Sequence[str]) -> PvtV2ForImageClassification:
    """From scratch for a preset name or a ``config.json`` path; otherwise fine-tune ``from_pretrained``.

    Fine-tuning on a dataset whose classes are not the checkpoint's: another number of classes replaces the head (and
    says so); the same names in another order permute the head's rows; the same number under other names is an
    error unless ``replace_head`` (a silent relabelling would keep a head that means something else).
    """
    id2label = _label_map(classes)
    overrides: dict[str, Any] = {}
    if cfg.drop_path is not None:
        overrides["drop_path_rate"] = cfg.drop_path
    name = cfg.model
    if not os.path.exists(name) and name.replace("-", "_").lower() in PRESETS:
        config = PvtV2Config.from_preset(name, id2label=id2label, image_size=cfg.image_size, **overrides)
        logger.info("training %s from scratch (drop path %.2f)", name, config.drop_path_rate)
        return PvtV2ForImageClassification(config)
    if name.endswith(".json") and os.path.isfile(name):
        config = PvtV2Config.from_json_file(name, id2label=id2label, image_size=cfg.image_size, **overrides)
        logger.info("training the architecture of %s from scratch", name)
        return PvtV2ForImageClassification(config)

    model = PvtV2ForImageClassification.from_pretrained(name, **overrides)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if names == list(classes):
        return model
    if len(names) != len(classes):
        logger.info(
            "replacing the classifier head: %s classifies %d classes, the dataset has %d", name, len(names), len(classes)
        )
        label2id = {label: i for i, label in id2label.items()}
        return PvtV2ForImageClassification.from_pretrained(
            name, num_labels=len(classes), id2label=id2label, label2id=label2id, **overrides
        )
    generic = all(label == f"LABEL_{i}" for i, label in enumerate(names))
    if set(names) == set(classes):
        order = torch.tensor([names.index(c) for c in classes])
        with torch.no_grad():
            model.classifier.weight.copy_(model.classifier.weight[order])
            model.classifier.bias.copy_(model.classifier.bias[order])
        logger.info("the dataset lists the checkpoint's classes in another order: head rows permuted to match")
    elif cfg.replace_head:
        init_weights(model.classifier, model.config.initializer_range)
        logger.info("--replace-head: a new classifier head for the dataset's classes %s", list(classes)[:10])
    elif generic:
        logger.warning("the checkpoint's classes have no names (%s...); taking the dataset's", names[:3])
    else:
        differ = [(a, b) for a, b in zip(names, classes) if a != b][:5]
        raise ValueError(
            f"the dataset's {len(classes)} classes are not the checkpoint's: (checkpoint, dataset) pairs differ, e.g. "
            f"{differ}. Pass --replace-head to train a new head for the dataset's classes."
        )
    config = model.config.replace(id2label=id2label, label2id={label: i for i, label in id2label.items()})
    model.config = config
    model.pvt_v2.config = config
    return model


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Any, device: torch.device, bf16: bool = False
) -> tuple[float, float, float, float]:
    """Sums over ``loader``: (cross-entropy, top-1 correct, top-5 correct, count)."""
    model.eval()
    loss_sum = top1 = top5 = count = 0.0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with _autocast(device, bf16):
            logits = model(images).logits
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        k = min(5, logits.shape[1])
        best = logits.topk(k, dim=1).indices  # (B, k)
        hits = best == labels[:, None]
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=1).sum().item()
        count += labels.numel()
    return loss_sum, top1, top5, count


def _autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------- metrics and curves
def read_metrics(output: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(output) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_metrics(output: Path, records: list[dict[str, Any]]) -> None:
    tmp = output / f".{METRICS_FILE}.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, output / METRICS_FILE)


_ACCURACY_PANEL = ("val accuracy (%)", [("val_top1", (44, 160, 44)), ("val_top5", (214, 39, 40))], (0.0, 100.0))


def draw_curves(
    records: Sequence[dict[str, Any]], path: str | os.PathLike, score_panel: tuple | None = None
) -> None:
    """Loss (train, val) and a score panel (default: val top-1 and top-5 accuracy; ``score_panel`` is
    ``(title, [(key, rgb), ...], (low, high) or None)``) against the epoch, drawn with Pillow."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, margin = 460, 320, 48
    image = Image.new("RGB", (2 * width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    epochs = [r["epoch"] for r in records]
    panels = [
        ("loss", [("train_loss", (31, 119, 180)), ("val_loss", (255, 127, 14))], None),
        score_panel or _ACCURACY_PANEL,
    ]
    for p, (title, series, fixed) in enumerate(panels):
        x0 = p * width
        left, right, top, bottom = x0 + margin, x0 + width - 16, 28, height - margin
        values = [r[k] for r in records for k, _ in series if r.get(k) is not None and math.isfinite(r[k])]
        lo, hi = fixed if fixed else (min(values, default=0.0), max(values, default=1.0))
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        e_lo, e_hi = (min(epochs), max(epochs)) if epochs else (0, 1)
        e_span = max(1, e_hi - e_lo)

        def at(epoch: float, value: float) -> tuple[float, float]:
            return (left + (epoch - e_lo) / e_span * (right - left), bottom - (value - lo) / (hi - lo) * (bottom - top))

        draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
        draw.text((left, 8), title, fill=(0, 0, 0), font=font)
        for frac in (0.0, 0.5, 1.0):
            value = lo + frac * (hi - lo)
            y = at(e_lo, value)[1]
            draw.line([left - 4, y, left, y], fill=(0, 0, 0))
            draw.text((x0 + 4, y - 6), f"{value:.3g}", fill=(0, 0, 0), font=font)
        draw.text((left, bottom + 6), f"epoch {e_lo}", fill=(0, 0, 0), font=font)
        draw.text((right - 50, bottom + 6), f"{e_hi}", fill=(0, 0, 0), font=font)
        for s, (key, color) in enumerate(series):
            points = [at(r["epoch"], r[key]) for r in records if r.get(key) is not None and math.isfinite(r[key])]
            if len(points) > 1:
                draw.line(points, fill=color, width=2)
            for x, y in points:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
            draw.text((left + 8, bottom - 16 - 12 * s), key, fill=color, font=font)
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- training
def _save_checkpoint(
    folder: Path, model: PvtV2ForImageClassification, image_size: int, state: dict[str, Any] | None = None
) -> None:
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        PvtV2ImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(tmp)
        if state is not None:
            torch.save(state, tmp / TRAINING_STATE_NAME)

    _write_folder_atomically(folder, write)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns a summary: output paths, best and last epoch metrics."""
    cfg.validate()
    info, device = _init_distributed(cfg.device)
    # Deterministic kernels for the run only: a caller's process gets its settings back.
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    try:
        _set_deterministic()
        return _train(cfg, info, device)
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()


class Task:
    """What a task adds to the run driver :func:`_run`, which owns the rest (run folder, resume, seeding, sharding,
    DDP, gradient accumulation, bf16, schedule, checkpoints, metrics, curves), so every task resumes, shards and
    checkpoints the same way. Subclasses read their data in ``__init__`` (setting ``train_set``, ``val_set``,
    ``classes``) and fill in the rest."""

    model_class: type[nn.Module]
    best_metric: str  # the record field whose maximum picks ``best/``
    best_state_key: str  # its best value's name in training_state.pt
    intro: str  # the start of the first log line, with a %d for the training images
    score_panel: tuple | None = None  # draw_curves' second panel; None: accuracy
    train_set: Any
    val_set: Any
    classes: list[str]

    def new_model(self) -> nn.Module:
        """The model of a run that starts (not a resumed one)."""
        raise NotImplementedError

    def default_lr(self, global_batch: int) -> float:
        raise NotImplementedError

    def criterion(self, model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The training loss of (float32 logits, labels)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device, bf16: bool, info: _Dist) -> list[float]:
        """This process's validation sums; summed over the processes, :meth:`metrics` turns them into the record."""
        raise NotImplementedError

    def metrics(self, sums: list[float]) -> dict[str, Any]:
        """The record's validation fields (``val_loss`` first) from the summed :meth:`evaluate` values."""
        raise NotImplementedError

    def epoch_summary(self, record: dict[str, Any]) -> str:
        """The end of an epoch's log line, after the losses."""
        raise NotImplementedError

    def result(self, records: list[dict[str, Any]], best_epoch: int) -> dict[str, Any]:
        """The task's fields of :func:`train`'s summary."""
        raise NotImplementedError


class ClassificationTask(Task):
    """Image folders ``DIR/{train,val}/<class>/``, cross-entropy with label smoothing, top-1 / top-5 accuracy."""

    model_class = PvtV2ForImageClassification
    best_metric = "val_top1"
    best_state_key = "best_top1"
    intro = "training on %d images"

    def __init__(self, cfg: TrainConfig) -> None:
        if not cfg.data:
            raise ValueError("a dataset folder is needed (--data DIR with DIR/train/<class>/ and DIR/val/<class>/)")
        classes, train_samples = scan_split(cfg.data, "train")
        val_classes, val_samples = scan_split(cfg.data, "val")
        if val_classes != classes:
            only_train = sorted(set(classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(classes))
            raise ValueError(f"the train and val splits have different classes: only in train {only_train}, only in val {only_val}")
        if len(classes) < 2:
            raise ValueError(f"a classifier needs at least 2 classes, {cfg.data!r} has {classes}")
        self.cfg = cfg
        self.classes = list(classes)
        self.train_set = ImageFolder(
            train_samples, TrainTransform(cfg.image_size, scale=(cfg.crop_scale, 1.0), hflip=cfg.hflip), seed=cfg.seed
        )
        self.val_set = ImageFolder(val_samples, EvalTransform(cfg.image_size), seed=cfg.seed)

    def new_model(self) -> nn.Module:
        return build_model(self.cfg, self.classes)

    def default_lr(self, global_batch: int) -> float:
        return 5e-4 * global_batch / 512

    def criterion(self, model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return nn.CrossEntropyLoss(label_smoothing=self.cfg.label_smoothing)

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device, bf16: bool, info: _Dist) -> list[float]:
        return list(evaluate(model, loader, device, bf16))

    def metrics(self, sums: list[float]) -> dict[str, Any]:
        v_loss, v_top1, v_top5, v_count = sums
        return {
            "val_loss": v_loss / max(v_count, 1),
            "val_top1": 100.0 * v_top1 / max(v_count, 1),
            "val_top5": 100.0 * v_top5 / max(v_count, 1),
        }

    def epoch_summary(self, record: dict[str, Any]) -> str:
        return "top-1 %.2f%%, top-5 %.2f%%, %.1f s, %.0f images/s" % (
            record["val_top1"], record["val_top5"], record["seconds"], record["images_per_second"]
        )

    def result(self, records: list[dict[str, Any]], best_epoch: int) -> dict[str, Any]:
        return {"best_top1": max((r["val_top1"] for r in records), default=None)}


def _train(cfg: TrainConfig, info: _Dist, device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] | None = None
    if info.main:
        cfg, state = _prepare_output(cfg)
    cfg, state = _broadcast((cfg, state), info)
    cfg.validate()
    # Data. Every process scans (they need the file lists); only rank 0 reports the bad files.
    if not info.main:
        logging.getLogger("pvtv2").setLevel(logging.ERROR)
    if cfg.task == "segmentation":
        from .dense_train import SegmentationTask

        task: Task = SegmentationTask(cfg)
    else:
        task = ClassificationTask(cfg)
    return _run(task, cfg, state, info, device)


def _run(task: Task, cfg: TrainConfig, state: dict[str, Any] | None, info: _Dist, device: torch.device) -> dict[str, Any]:
    """The epochs of a run of any task, from the first or from where ``state`` (the last completed epoch's) stopped."""
    out = Path(cfg.output)
    train_set, val_set = task.train_set, task.val_set
    workers = cfg.workers if cfg.workers is not None else (0 if device.type == "cpu" else min(8, os.cpu_count() or 1))

    # Model: the same initial weights in every process (seeded), and DDP broadcasts rank 0's anyway.
    _seed_everything(cfg.seed, 2**31 - 1, 0)  # a stream of its own, apart from the epochs'
    last = out / "last"
    if state is not None and (last / "config.json").is_file():
        model = task.model_class.from_pretrained(last)
    elif state is not None:
        model = task.model_class(PvtV2Config.from_dict(state["model_config"]))
    else:
        model = task.new_model()
    if info.main and state is None:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_FILE).write_text(json.dumps(cfg.run_fields(), indent=2) + "\n", encoding="utf-8")
        _write_metrics(out, [])
    model.to(device).train()
    net: nn.Module = model
    if info.enabled:
        # Depthwise kernels (C, 1, 3, 3) have an ambiguous stride on their size-1 axis: harmless, but DDP warns.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    bf16 = cfg.bf16
    if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        logger.warning("--bf16: %s does not support bfloat16; training in float32", torch.cuda.get_device_name(device))
        bf16 = False

    # Optimisation.
    global_batch = cfg.batch_size * cfg.grad_accum * info.world_size
    peak_lr = cfg.lr if cfg.lr is not None else task.default_lr(global_batch)
    shard = len(epoch_indices(len(train_set), seed=cfg.seed, epoch=0, shuffle=False, rank=info.rank, world_size=info.world_size))
    batches_per_epoch = math.ceil(shard / cfg.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = min(total_steps, round(cfg.warmup_epochs * steps_per_epoch))
    min_ratio = min(1.0, cfg.min_lr / peak_lr)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=peak_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: cosine_warmup_factor(step, total_steps=total_steps, warmup_steps=warmup_steps, min_ratio=min_ratio),
    )
    criterion = task.criterion(model)

    start_epoch, best_score, best_epoch = 0, -1.0, -1
    records: list[dict[str, Any]] = []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_score, best_epoch = state["epoch"], state[task.best_state_key], state["best_epoch"]
        rng = state["rng"]
        if len(rng) == info.world_size:
            _set_rng_state(rng[info.rank])
        if info.main:
            records = [r for r in read_metrics(out) if r["epoch"] <= start_epoch]  # epochs count from 1
            logger.info("resuming %s after epoch %d of %d", out, start_epoch, cfg.epochs)
    elif info.main:
        logger.info(
            "%s of %d classes (val %d), %d process(es) on %s; global batch %d, peak lr %.3g, %d steps (%d warmup)",
            task.intro % len(train_set), len(task.classes), len(val_set), info.world_size, device,
            global_batch, peak_lr, total_steps, warmup_steps,
        )

    if info.main and start_epoch >= cfg.epochs:
        logger.info("the run in %s is already finished (%d epochs); nothing to do", out, cfg.epochs)
    kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
    for epoch in range(start_epoch, cfg.epochs):
        began = time.perf_counter()
        _seed_everything(cfg.seed, epoch, info.rank)
        train_set.set_epoch(epoch)
        order = epoch_indices(
            len(train_set), seed=cfg.seed, epoch=epoch, shuffle=True, rank=info.rank, world_size=info.world_size
        )
        loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, sampler=order, num_workers=workers)
        net.train()
        loss_sum = seen = 0.0
        bar = _progress(loader, cfg.progress and info.main, f"epoch {epoch + 1}/{cfg.epochs}")
        for i, (images, labels) in enumerate(bar):
            step_now = epoch * batches_per_epoch + i + 1
            if kill_at and step_now == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            boundary = (i + 1) % cfg.grad_accum == 0 or i + 1 == batches_per_epoch
            sync = contextlib.nullcontext() if boundary or not info.enabled else net.no_sync()
            with sync:
                with _autocast(device, bf16):
                    logits = net(images).logits
                loss = criterion(logits.float(), labels)
                # Each micro-batch weighs by its share of the accumulated group.
                group = min(cfg.grad_accum, batches_per_epoch - (i // cfg.grad_accum) * cfg.grad_accum)
                (loss / group).backward()
            if boundary:
                if cfg.clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(
                    f"the training loss became {loss.item()} at epoch {epoch + 1}, batch {i + 1}; lower the learning rate"
                )
            loss_sum += loss.item() * images.shape[0]
            seen += images.shape[0]
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        train_seconds = time.perf_counter() - began

        val_order = epoch_indices(
            len(val_set), seed=cfg.seed, epoch=epoch, shuffle=False, rank=info.rank, world_size=info.world_size, pad=False
        )
        val_loader = torch.utils.data.DataLoader(val_set, batch_size=cfg.batch_size, sampler=val_order, num_workers=workers)
        val = task.evaluate(model, val_loader, device, bf16, info)
        model.train()
        total = _all_reduce([loss_sum, seen, *val], info, device)
        loss_sum, seen = total[:2]
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            **task.metrics(total[2:]),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - began,
            "images_per_second": seen / max(train_seconds, 1e-9),
        }
        improved = record[task.best_metric] > best_score
        if improved:
            best_score, best_epoch = record[task.best_metric], epoch + 1
        rng_states = [_rng_state()]
        if info.enabled:
            gathered: list[Any] = [None] * info.world_size
            dist.all_gather_object(gathered, rng_states[0])
            rng_states = gathered
        if info.main:
            records.append(record)
            _write_metrics(out, records)
            training_state = {
                "epoch": epoch + 1,
                "epochs": cfg.epochs,
                task.best_state_key: best_score,
                "best_epoch": best_epoch,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_states,
                "world_size": info.world_size,
                "run": cfg.run_fields(),
                "model_config": model.config.to_dict(),
            }
            if improved:
                _save_checkpoint(out / "best", model, cfg.image_size)
            _save_checkpoint(last, model, cfg.image_size, training_state)
            draw_curves(records, out / CURVES_FILE, score_panel=task.score_panel)
            logger.info(
                "epoch %d/%d: train loss %.4f, val loss %.4f, %s",
                epoch + 1, cfg.epochs, record["train_loss"], record["val_loss"], task.epoch_summary(record),
            )
    if info.enabled:
        dist.barrier()
    records = read_metrics(out) if info.main else records
    return {
        "output": str(out),
        "last": str(last),
        "best": str(out / "best"),
        "metrics": str(out / METRICS_FILE),
        "curves": str(out / CURVES_FILE),
        **task.result(records, best_epoch),
        "best_epoch": best_epoch,
        "final": records[-1] if records else None,
        "classes": list(task.classes),
        "rank": info.rank,
    }


def _progress(iterable: Any, enabled: bool, desc: str) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)
