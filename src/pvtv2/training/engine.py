"""The training engine: one epoch loop for every task, in one process or under ``torchrun``.

A :class:`Task` says what is learnt: its data (datasets, collation), the model a run starts from, the loss of a
batch (forward pass included) and the evaluation. The engine does the rest, the same way for every task: seeding,
sharding, DistributedDataParallel, bf16 autocast, the optimizer step (gradient accumulation, clipping), the learning
rate schedule, the run folder's checkpoints, metrics and curves, and resumption. :func:`run` reads as its parts:

- :func:`_build`: the model, optimizer and schedule of a new run, or of a resumed one;
- :func:`_train_epoch`: one pass over this process's shard, with :func:`_optimizer_step` at each accumulation
  boundary and :func:`_stop_if_diverged` after each backward pass;
- :func:`_validate`: the task's evaluation of this process's validation shard, combined over the processes;
- :func:`_end_epoch`: the epoch's record, ``best/``, ``last/`` (with the training state), metrics and curves.

Every epoch writes ``OUT/last`` (and ``OUT/best`` when the task's score improves), whole or not at all (see
:mod:`pvtv2.training.rundir`). With the same seed, a resumed run ends with the same weights, bit for bit, as an
uninterrupted one (on the same hardware and software), because no randomness comes from global state that a
restart would lose:

- the sample order of epoch ``e`` comes from a generator seeded with ``seed + e`` (a task that makes its own
  batches, :meth:`Task.train_batches`, makes them from the seed and the epoch alone);
- the augmentation of sample ``i`` in epoch ``e`` from one seeded with ``(seed, e, i)``;
- the global torch generator (stochastic depth, dropout, and whatever a task draws from it, such as a MixUp
  coefficient) is reseeded from ``(seed, e, rank)`` at each epoch start;
- ``torch.use_deterministic_algorithms(True)`` (warn-only for operations without a deterministic kernel),
  cuDNN autotuning off, ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` on GPUs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..data.folders import epoch_indices
from ..data.processing import PvtV2ImageProcessor
from ..fileio import path_kind
from ..models.config import PvtV2Config, is_preset_name, short_repr
from ..models.modeling import check_input_size
from ..progress import progress_bar
from ..weights.loading import non_finite
from .config import TrainConfig
from .curves import draw_curves, read_metrics, write_metrics
from .distributed import DistInfo, all_reduce, autocast, on_main, rng_state, seed_everything, set_rng_state
from .recipes import WeightEma, capped_warmup_steps, freeze_stages, poly_factor
from .recipes import parameter_groups as decayed_parameter_groups
from .rundir import CURVES_FILE, METRICS_FILE, TRAINING_STATE_NAME, save_checkpoint, start_run

__all__ = [
    "Task",
    "default_peak_lr",
    "RunContext",
    "TrainingDiverged",
    "run",
    "to_device",
    "names_json_file",
    "known_architecture",
    "new_architecture",
    "check_image_size",
    "check_freeze_stages",
    "cosine_warmup_factor",
    "parameter_groups",
    "KILL_ENV",
    "request_stop",
    "clear_stop",
    "honour_stop",
]

logger = logging.getLogger(__name__)

# Test-only fault injection: the process SIGKILLs itself when it reaches this global batch number (counted from 1
# over the whole run), to check that ``--resume`` recovers from a crash in the middle of an epoch.
KILL_ENV = "PVTV2_TEST_KILL_AT_STEP"


class TrainingDiverged(ValueError):
    """The training loss stopped being a finite number."""


# ---------------------------------------------------------------------------------------------- stop requests
# The exception a stop signal's handler raised (SIGTERM's SystemExit, Ctrl-C's KeyboardInterrupt), made again by
# honour_stop: a signal that arrives while a DataLoader forks its workers has its handler run inside an
# os.register_at_fork callback (logging's lock release), where CPython prints the exception and ignores it (as it does
# in a finalizer that the garbage collector runs). The run went on to its last epoch, and SIGTERM, which its handler
# had set to be ignored, could no longer stop it.
_stop_requests: list[Callable[[], BaseException]] = []


def request_stop(make: Callable[[], BaseException]) -> None:
    """Record that a signal handler raised ``make()``, so that :func:`honour_stop` raises it again if it was lost."""
    _stop_requests.append(make)


def clear_stop() -> None:
    """Forget the stop requests (a run's end: the next run in this process starts without them). Only in the main
    thread, whose run's signal handlers made them (:func:`honour_stop`)."""
    if threading.current_thread() is threading.main_thread():
        _stop_requests.clear()


def honour_stop() -> None:
    """Raise the exception of the first stop request, if any: called at every batch and before an epoch's writes.
    Only in the main thread: signal handlers run there, and a run started from another thread sets none; a Ctrl-C
    meant for the main thread's run stopped a run training in another thread at the same time."""
    if _stop_requests and threading.current_thread() is threading.main_thread():
        raise _stop_requests[0]()


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


# ---------------------------------------------------------------------------------------------- the task interface
@dataclasses.dataclass
class RunContext:
    """Where and how a run computes: what a task's hooks need from the engine."""

    device: torch.device
    bf16: bool  # autocast to bfloat16 (already turned off where the device lacks it)
    dist: DistInfo
    fp16: bool = False  # autocast to float16 (CUDA), with the engine's gradient scaler

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context of a forward pass (bf16 or fp16 autocast, or nothing); compute losses in float32 outside it."""
        if self.fp16:
            return torch.autocast(device_type=self.device.type, dtype=torch.float16)
        return autocast(self.device, self.bf16)

    def sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over the processes (themselves in one process)."""
        return all_reduce(values, self.dist, self.device)

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable), in rank order: for evaluations that are no sums (COCO's AP)."""
        if not self.dist.enabled:
            return [obj]
        gathered: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(gathered, obj)
        return gathered


class Task:
    """What is learnt; the engine (:func:`run`) owns how. Subclasses set the class attributes and fill in the
    methods; ``__init__`` only keeps the settings (cheap), :meth:`load_data` reads the data.

    Batches are whatever the datasets and :attr:`collate` make of them: a tuple ``(images, labels)`` for
    classification, ``(images, label maps)`` for segmentation; a detection task would collate lists of images and
    per-image target dicts. The engine moves a batch to the device (:func:`to_device`: nested lists, tuples and
    dicts of tensors) and hands it to :meth:`training_loss`, which owns the forward pass and the loss (so soft
    targets from MixUp, or a model that returns a dict of losses, need nothing from the engine).
    """

    model_class: type[nn.Module]  # what ``last/`` is loaded with on --resume
    best_metric: str  # the record field whose maximum picks ``best/``
    best_state_key: str  # its best value's name in training_state.pt
    intro: str  # the start of the first log line, with a %d for the training samples
    score_panel: tuple | None = None  # draw_curves' second panel; None: accuracy
    collate: Callable[[list[Any]], Any] | None = None  # the DataLoader's collate_fn; None: PyTorch's default
    train_set: Any  # set by load_data: datasets with __len__, __getitem__ (and set_epoch for augmentation)
    val_set: Any
    classes: list[str]  # the names of the model's outputs; --resume refuses data whose classes differ

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def architecture(self) -> PvtV2Config | None:
        """The model's configuration when it is known without data or weights (checked against --image-size
        before anything is read or written); None: checked once the model is built."""
        return known_architecture(self.cfg.model, image_size=self.cfg.image_size)

    def processor(self) -> PvtV2ImageProcessor:
        """The preprocessing saved with each checkpoint (``preprocessor_config.json``): what the validation images go
        through, so that a loaded checkpoint predicts as it was evaluated. By default a resize to --image-size and
        ImageNet's normalisation."""
        return PvtV2ImageProcessor(size={"height": self.cfg.image_size, "width": self.cfg.image_size})

    def load_data(self) -> None:
        """Read the data: set ``train_set``, ``val_set`` and ``classes``; raise on a bad dataset."""
        raise NotImplementedError

    def new_model(self) -> nn.Module:
        """The model of a run that starts (not a resumed one)."""
        raise NotImplementedError

    def default_lr(self, global_batch: int) -> float:
        raise NotImplementedError

    def lr_factor(self, schedule: Schedule) -> Callable[[int], float]:
        """The learning rate of each optimizer step (0-based) as a fraction of the peak; by default a linear
        warmup, then the run's schedule (:meth:`Schedule.factor`: a half cosine, or poly)."""
        return schedule.factor

    def warmup_steps(self, schedule: Schedule) -> int:
        """The warmup steps that :meth:`lr_factor` actually uses (the start line reports them): the schedule's, unless
        the task's own rate shortens it (detection: at most a fifth of the run)."""
        return schedule.warmup_steps

    def training_loss(self, model: nn.Module, batch: Any, ctx: RunContext) -> torch.Tensor:
        """The mean loss of a batch (already on the device) as a float32 scalar: forward pass under
        ``ctx.autocast()``, loss outside it. ``model`` may be wrapped in DistributedDataParallel."""
        raise NotImplementedError

    def train_order(self, epoch: int, info: DistInfo) -> list[int]:
        """The indices of ``train_set`` this process reads in ``epoch`` (a function of the seed and the epoch only,
        so that a resumed run reads the same); a task with repeated augmentation returns draw indices."""
        return epoch_indices(len(self.train_set), seed=self.cfg.seed, epoch=epoch, shuffle=True, rank=info.rank,
                             world_size=info.world_size)

    def train_batches(self, epoch: int, info: DistInfo, batch_size: int) -> list[list[int]] | None:
        """This process's batches of ``epoch`` as lists of ``train_set`` indices, for a task that composes its own
        (detection groups images by aspect ratio); None (the default): ``batch_size`` consecutive indices of
        :meth:`train_order` at a time.

        Like :meth:`train_order`, a function of the seed and the epoch only (a resumed run reads the same batches).
        Every epoch must have the same number of batches in every process: the schedule is planned from epoch 0's,
        and DistributedDataParallel needs equal step counts."""
        return None

    def count(self, batch: Any) -> int:
        """The number of samples in a batch: the weight of its loss in the epoch's mean training loss."""
        return len(batch[0])

    def evaluate(self, model: nn.Module, loader: Any, ctx: RunContext) -> dict[str, Any]:
        """The record's validation fields over the whole validation split. ``loader`` yields this process's shard;
        combine the processes' results with ``ctx.sum`` or ``ctx.gather`` (every process must call them)."""
        raise NotImplementedError

    def epoch_summary(self, record: dict[str, Any]) -> str:
        """The end of an epoch's log line, after the training loss."""
        raise NotImplementedError

    def result(self, records: list[dict[str, Any]], best_epoch: int) -> dict[str, Any]:
        """The task's fields of :func:`pvtv2.training.train`'s summary."""
        raise NotImplementedError


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (in nested lists, tuples, named tuples and dicts) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def names_json_file(model: str) -> bool:
    """Whether ``--model`` names a config.json file by its suffix, in any case (``ARCH.JSON`` too)."""
    return model.lower().endswith(".json")


def known_architecture(model: str, **overrides: Any) -> PvtV2Config | None:
    """The configuration named by ``--model`` when reading it needs no weights: a preset name, a config.json, or a
    folder with a PVTv2 config.json; None otherwise (a checkpoint file, a hub id, another model type's folder)."""
    if is_preset_name(model):
        return PvtV2Config.from_preset(model, **overrides)
    if names_json_file(model) and os.path.isfile(model):
        return PvtV2Config.from_json_file(model, strict=True, **overrides)  # a new architecture: as new_architecture
    config_file = Path(model) / "config.json"
    if config_file.is_file():
        try:
            return PvtV2Config.from_json_file(config_file, **overrides)
        except ValueError:
            return None  # e.g. transformers' SegFormer layout: loading the checkpoint tells
    return None


@contextlib.contextmanager
def held_logs(names: Sequence[str] = ("pvtv2.weights.loading", "pvtv2.models.modeling", "pvtv2.models.segmentation",
                                      "pvtv2.models.detection")) -> Iterator[list[logging.LogRecord]]:
    """Hold back what these loggers log inside the block: the records are collected in the list it yields, to be
    given out (:func:`release_logs`) or dropped, e.g. the load of a checkpoint that is then loaded again otherwise."""
    records: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        records.append(record)
        return False

    loggers = [logging.getLogger(name) for name in names]
    for one in loggers:
        one.addFilter(hold)
    try:
        yield records
    finally:
        for one in loggers:
            one.removeFilter(hold)


def release_logs(records: Sequence[logging.LogRecord]) -> None:
    """Log the records :func:`held_logs` held back, as they would have been."""
    for record in records:
        logger_ = logging.getLogger(record.name)
        if logger_.isEnabledFor(record.levelno):
            logger_.handle(record)


def reconcile_classes(
    names: list[str], classes: list[str], *, replace_head: bool, generic: bool, new_layers: str,
    names_from: str | None = None,
) -> list[int] | str:
    """How a checkpoint trained on ``names`` starts fine-tuning on data listing as many ``classes`` (in another order
    or under other names): the order in which to take its class-sized rows where the names are the same ones
    (each once), ``"replace"`` with ``--replace-head``, ``"take"`` where the checkpoint's names are generic (then the
    data's names are taken); otherwise a ValueError naming the differing pairs and what to do (``new_layers``: what
    --replace-head trains; ``names_from``: where the data's names come from, to rename them)."""
    if set(names) == set(classes) and len(set(names)) == len(names) == len(classes):
        return [names.index(c) for c in classes]
    if replace_head:
        return "replace"
    if generic:
        return "take"
    differ = [(a, b) for a, b in zip(names, classes) if a != b][:5]
    twice = ""
    if set(names) == set(classes):  # the same names, one given twice: say so, "not the checkpoint's" alone misleads
        counts = {n: max(names.count(n), classes.count(n)) for n in names}
        repeated = [f"{n!r} {'twice' if k == 2 else f'{k} times'}" for n, k in counts.items() if k > 1][:5]
        twice = f" The names hold {', '.join(repeated)}: classes named alike cannot be matched by name."
    message = (
        f"the dataset's {len(classes)} classes are not the checkpoint's: (checkpoint, dataset) pairs differ, e.g. "
        f"{differ}.{twice} Pass --replace-head to train {new_layers} for the dataset's classes"
    )
    if names_from is None:
        raise ValueError(message + ".")
    raise ValueError(
        f"{message}, or, where they are the same classes spelt otherwise, name them as the checkpoint does "
        f"({names_from})"
    )


def permute_rows_(layer: nn.Module, rows: Sequence[int]) -> None:
    """Reorder a class-sized layer's output rows in place (weight and bias): row ``j`` becomes row ``rows[j]``."""
    index = torch.tensor(list(rows))
    with torch.no_grad():
        layer.weight.copy_(layer.weight[index])
        layer.bias.copy_(layer.bias[index])


def new_architecture(model: str, tiny: Mapping[str, Any] | None = None, **overrides: Any) -> PvtV2Config | None:
    """The configuration of the model a run builds anew from ``--model``, with ``overrides``: ``tiny`` (the task's
    small model, given as the config arguments ``tiny``; a file or folder of that name wins), a preset name or a
    config.json file; None: ``model`` names a checkpoint to load (a folder, a weights file, a hub id).

    A name ending in ``.json`` (in any case) that is not a folder must be an existing file: otherwise loading it as a checkpoint
    would fail later with a message about hub ids, or after the data was read. Its keys must all be known
    (:func:`pvtv2.models.config.unknown_fields`): a ``ValueError`` names a misspelt one and the field it may mean."""
    if tiny is not None and model.lower() == "tiny" and not os.path.exists(model):
        return PvtV2Config(**{**tiny, **overrides})
    if is_preset_name(model):
        return PvtV2Config.from_preset(model, **overrides)
    if names_json_file(model):
        kind = path_kind(model)  # stat only: a FIFO or a device is never opened (opening a FIFO blocks)
        if kind == "file":
            # Written by hand for this run: a misspelt field ({"depth": ...}) would train the default architecture.
            return PvtV2Config.from_json_file(model, strict=True, **overrides)
        if kind in ("dangling symlink", "symlink loop"):
            raise FileNotFoundError(f"config file {model!r} is a symbolic link to {os.readlink(model)!r}, which does "
                                    "not resolve to a file")
        if kind == "nothing":
            raise FileNotFoundError(f"config file not found: {model!r} (--model X.json names an architecture: a config.json file)")
        if kind != "folder":  # a folder named x.json is a checkpoint folder
            raise ValueError(f"config file {model!r} is a {kind}, not a file")
    return None


def check_image_size(config: PvtV2Config, image_size: int, model: str) -> None:
    """Refuse an ``--image-size`` that a stage's spatial reduction does not fit, naming the smallest that does."""

    def problem(size: int) -> str | None:
        try:
            check_input_size(size, size, config)
        except ValueError as err:
            return str(err).removeprefix("the input is too small for this model: ").removesuffix("; use larger images")
        return None

    reason = problem(image_size)
    if reason is None:
        return
    # Every stage's token grid grows with the input, so the first size that fits is the smallest of all that do.
    smallest = next((s for s in range(image_size + 1, 4097) if problem(s) is None), None)
    advice = f"; use --image-size {smallest} or more" if smallest else ""
    raise ValueError(f"--image-size {image_size} is too small for the model {model!r}: {reason}{advice}")


def check_freeze_stages(config: PvtV2Config, freeze_stages: int, model: str) -> None:
    """Refuse a ``--freeze-stages`` beyond the model's stages by its flag (:func:`freeze_stages` names its own
    argument, which the user of the command never typed)."""
    stages = len(config.depths)
    if freeze_stages > stages:
        raise ValueError(f"--freeze-stages {short_repr(freeze_stages)} is more than the {stages} stages of the model {model!r}; "
                         f"use at most {stages}")


# ---------------------------------------------------------------------------------------------- a run
def default_peak_lr(cfg: TrainConfig, task: Task, world_size: int) -> float:
    """The peak learning rate of a run without --lr: the task's, for the global batch of ``world_size`` processes."""
    return task.default_lr(cfg.batch_size * cfg.grad_accum * world_size)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How many batches and optimizer steps the run makes, and its learning rates."""

    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float
    min_ratio: float  # min_lr / peak_lr
    kind: str = "cosine"  # or "poly"

    @classmethod
    def plan(cls, cfg: TrainConfig, task: Task, info: DistInfo) -> Schedule:
        peak_lr = cfg.lr if cfg.lr is not None else default_peak_lr(cfg, task, info.world_size)
        explicit = task.train_batches(0, info, cfg.batch_size)
        if explicit is not None:
            batches_per_epoch = len(explicit)
        else:
            shard = len(epoch_indices(len(task.train_set), seed=cfg.seed, epoch=0, shuffle=False, rank=info.rank,
                                      world_size=info.world_size))
            batches_per_epoch = math.ceil(shard / cfg.batch_size)
        steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
        total_steps = steps_per_epoch * cfg.epochs
        # An explicit step count (a task's recipe, e.g. detection's 500) is the task's to shorten; a warmup in epochs
        # longer than a quarter of a short run is cut (logged), so that the run reaches its peak lr.
        if cfg.warmup_steps is not None:
            warmup_steps = min(total_steps, cfg.warmup_steps)
        else:
            warmup_steps = capped_warmup_steps(cfg.warmup_epochs, steps_per_epoch, total_steps)
        return cls(batches_per_epoch, steps_per_epoch, total_steps, warmup_steps, peak_lr,
                   min(1.0, cfg.min_lr / peak_lr), cfg.schedule)

    def factor(self, step: int) -> float:
        if self.kind == "poly":
            return poly_factor(step, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                               min_ratio=self.min_ratio)
        return cosine_warmup_factor(step, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                                    min_ratio=self.min_ratio)


@dataclasses.dataclass
class Training:
    """What the epochs work on, and where the run stands."""

    model: nn.Module  # the weights that are evaluated and saved
    net: nn.Module  # what forward passes go through: the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    schedule: Schedule
    ema: WeightEma | None = None  # the weights' moving average (--ema): evaluated and saved beside them
    scaler: torch.amp.GradScaler | None = None  # --amp fp16: the loss scale that keeps float16 gradients finite
    start_epoch: int = 0
    best_score: float = -1.0
    best_epoch: int = -1
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # rank 0's metrics.jsonl


def run(task: Task, cfg: TrainConfig, state: dict[str, Any] | None, ctx: RunContext) -> dict[str, Any]:
    """The epochs of a run of any task, from the first or from where ``state`` (the last completed epoch's) stopped.

    The task's data is loaded and every check has passed; the caller holds the run folder's lock (rank 0).
    """
    out, info = Path(cfg.output), ctx.dist
    training = _build(task, cfg, state, ctx)
    if state is None:
        on_main(lambda: start_run(cfg, task.classes), info)  # the run's first writes: every check has passed
    _log_start(task, cfg, training, state, ctx)
    if state is not None and training.start_epoch >= cfg.epochs:
        # Killed after the last epoch's checkpoint, before its curves were drawn: curves.png stayed an epoch short
        # (missing after one epoch), as nothing is left to train. Drawn from the records, as that epoch draws them.
        on_main(lambda: training.records and draw_curves(training.records, out / CURVES_FILE,
                                                         score_panel=task.score_panel), info)
    for epoch in range(training.start_epoch, cfg.epochs):
        began = time.perf_counter()
        loss_sum, seen = _train_epoch(task, cfg, training, epoch, ctx)
        train_seconds = time.perf_counter() - began
        _stop_if_weights_diverged(epoch, cfg, training, ctx)
        fields = _validate(task, cfg, training, epoch, ctx)
        honour_stop()  # one lost while the validation loader forked its workers
        loss_sum, seen = ctx.sum([loss_sum, seen])
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            **fields,
            "lr": max(group["lr"] for group in training.optimizer.param_groups),  # the peak group's
            "seconds": time.perf_counter() - began,
            "images_per_second": seen / max(train_seconds, 1e-9),
        }
        _end_epoch(task, cfg, training, record, ctx)
    if info.enabled:
        dist.barrier()
    records = read_metrics(out) if info.main else training.records
    return {
        "output": str(out),
        "last": str(out / "last"),
        "best": str(out / "best"),
        "metrics": str(out / METRICS_FILE),
        "curves": str(out / CURVES_FILE),
        **task.result(records, training.best_epoch),
        "best_epoch": training.best_epoch,
        "final": records[-1] if records else None,
        "classes": list(task.classes),
        "rank": info.rank,
    }


def _build(task: Task, cfg: TrainConfig, state: dict[str, Any] | None, ctx: RunContext) -> Training:
    """The model (new, or ``last/``'s), DistributedDataParallel, AdamW and the schedule; a resumed run's optimizer,
    scheduler, progress and random generators restored from ``state``."""
    # The same initial weights in every process (seeded; DDP broadcasts rank 0's anyway), from a stream of its own.
    seed_everything(cfg.seed, 2**31 - 1, 0)
    last = Path(cfg.output) / "last"
    if state is not None:
        model = _load_last(task, last)
    else:
        model = task.new_model()
        # Weights of --model that are NaN where no output sees them (saved by a run before the weight check below
        # existed) keep the loss finite: the run trained an epoch, then said they became NaN, advising a lower --lr.
        bad = non_finite(model.state_dict())
        if bad:
            raise ValueError(f"--model {cfg.model!r} holds NaN or infinite weights in {bad}: a run cannot start from "
                             f"them (the checkpoint is damaged, or was saved after training diverged)")
    check_image_size(model.config, cfg.image_size, cfg.model)
    check_freeze_stages(model.config, cfg.freeze_stages, cfg.model)
    if cfg.freeze_stages:
        freeze_stages(model, cfg.freeze_stages)
    model.to(ctx.device).train()
    ema = WeightEma(model, cfg.ema) if cfg.ema is not None else None
    net: nn.Module = model
    if ctx.dist.enabled:
        # Depthwise kernels (C, 1, 3, 3) have an ambiguous stride on their size-1 axis: harmless, but DDP warns.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        net = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    schedule = Schedule.plan(cfg, task, ctx.dist)
    if ctx.dist.enabled:
        counts = ctx.gather(schedule.batches_per_epoch)
        if len(set(counts)) > 1:  # a task's own batches (Task.train_batches): DDP would wait forever at the end
            raise ValueError(f"the processes would train different numbers of batches per epoch ({counts}); "
                             f"DistributedDataParallel needs the same number in every process")
    if cfg.layer_decay is not None or cfg.head_lr_mult != 1:
        groups = decayed_parameter_groups(model, lr=schedule.peak_lr, weight_decay=cfg.weight_decay,
                                          layer_decay=cfg.layer_decay, head_lr_mult=cfg.head_lr_mult)
    else:
        groups = parameter_groups(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=schedule.peak_lr)
    if state is not None:
        schedule = _trained_peak(schedule, cfg, optimizer, state)
    # Only now: a resumed run's peak is the one it was started with, not this invocation's default (another number
    # of processes gives another), so that the warning names the rate the schedule really starts from.
    if cfg.min_lr > schedule.peak_lr and ctx.dist.main:
        logger.warning("--min-lr %.3g is above the %s peak lr %.3g: the lr stays at the peak", cfg.min_lr,
                       "default" if state is None else "run's", schedule.peak_lr)
    # A lambda, not a bound method: LambdaLR saves no state for plain functions, so training_state.pt stays tensors.
    factor = task.lr_factor(schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step))
    scaler = torch.amp.GradScaler(ctx.device.type) if ctx.fp16 else None
    training = Training(model, net, optimizer, scheduler, schedule, ema, scaler)
    if state is not None:
        _restore(task, cfg, training, state, ctx)
    return training


def _trained_peak(schedule: Schedule, cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                  state: dict[str, Any]) -> Schedule:
    """The schedule of a resumed run at the peak rate it was started with, which its restored optimizer and scheduler
    keep: without --lr, the default peak of this invocation's processes (the global batch's) is another where their
    number changed, and --min-lr, a fraction of the peak, was taken of that one (a run of 2 processes resumed by 1
    ended at twice --min-lr). A run started with --lr keeps it: nothing changes."""
    try:
        saved = float(state["scheduler"]["base_lrs"][0])
    except (KeyError, IndexError, TypeError, ValueError):
        return schedule  # a damaged state, which _restore names
    planned = optimizer.param_groups[0]["lr"]  # the first group's share of the peak, as the saved one was planned
    if not (saved > 0 and planned > 0) or math.isclose(saved, planned, rel_tol=1e-12):
        return schedule
    peak = schedule.peak_lr * saved / planned
    return dataclasses.replace(schedule, peak_lr=peak, min_ratio=min(1.0, cfg.min_lr / peak))


def _load_last(task: Task, last: Path) -> nn.Module:
    """The weights of ``last/`` that a resumed run continues from. Anything wrong with them stops the resume by name:
    its config.json missing used to build a new, randomly initialised model that the restored optimizer state then
    went on training, without a word; NaN weights would only show up as a diverged loss."""
    try:
        config = last / "config.json"
        if path_kind(config) != "file":
            raise FileNotFoundError(f"{str(config)!r} is missing")
        model = task.model_class.from_pretrained(last)
        bad = non_finite(model.state_dict())
        if bad:
            raise ValueError(f"it holds NaN or infinite weights in {bad}")
    except (ValueError, TypeError, OSError) as err:
        raise ValueError(f"the last checkpoint {str(last)!r} cannot be loaded: {err}; the run cannot be resumed from "
                         f"it: pass --overwrite to start again") from None
    return model


def _restore(task: Task, cfg: TrainConfig, training: Training, state: dict[str, Any], ctx: RunContext) -> None:
    source = Path(cfg.output) / "last" / TRAINING_STATE_NAME
    if task.best_state_key not in state:
        raise ValueError(f"{str(source)!r} is not the training state of a {cfg.task} run (no {task.best_state_key!r})")
    try:
        training.optimizer.load_state_dict(state["optimizer"])
        _check_optimizer_shapes(training)
        training.scheduler.load_state_dict(state["scheduler"])
        if training.ema is not None:
            if "ema" not in state:
                raise ValueError("it holds no weight average (--ema), which this run keeps")
            training.ema.load_state_dict(state["ema"])
        if training.scaler is not None and "scaler" in state:
            training.scaler.load_state_dict(state["scaler"])
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError, IndexError) as err:
        raise ValueError(f"{str(source)!r} does not fit the model in {str(source.parent)!r}: {err}; pass --overwrite "
                         f"to start again") from None
    training.start_epoch, training.best_epoch = state["epoch"], state["best_epoch"]
    training.best_score = state[task.best_state_key]
    rng = state["rng"]
    if len(rng) == ctx.dist.world_size:
        try:
            set_rng_state(rng[ctx.dist.rank])
        except (ValueError, KeyError, TypeError, RuntimeError, AttributeError, IndexError) as err:
            raise ValueError(f"{str(source)!r} is damaged: its random generator state cannot be restored ({err}); "
                             f"the run cannot be resumed from it: pass --overwrite to start again") from None
    elif ctx.dist.main:
        logger.warning(
            "the run was trained by %d process(es), this one by %d: the samples are dealt differently, and the result "
            "will differ from an uninterrupted run", len(rng), ctx.dist.world_size,
        )
    _realign_schedule(training)
    if ctx.dist.main:
        training.records = [r for r in read_metrics(cfg.output) if r["epoch"] <= training.start_epoch]  # epochs from 1


def _check_optimizer_shapes(training: Training) -> None:
    """Refuse a restored optimizer state whose moments are not the shapes of the weights they step. The optimizer
    checks only the number of parameters, so last/'s weights of another architecture with as many tensors (copied
    from another run) loaded, and the first step stopped with a traceback about tensor sizes."""
    names = {id(param): name for name, param in training.model.named_parameters()}
    for group in training.optimizer.param_groups:
        for param in group["params"]:
            for key, value in training.optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(f"its optimizer state {key!r} of {names.get(id(param), 'a weight')} has the shape "
                                     f"{tuple(value.shape)}, the weight {tuple(param.shape)}")


def _realign_schedule(training: Training) -> None:
    """Put the restored scheduler at the first step of the epoch the run continues with, as this invocation counts
    steps. Another number of processes (or training images added or removed since) makes another number of steps per
    epoch: the saved step count, kept as it was, put a 2-process run resumed by 1 process at 3/4 of its cosine
    after 2 epochs of 4 (its learning rate never came down to --min-lr), and a 1-process run resumed by 2 at its end
    with half of it left to train. Where the counts agree (a resume by as many processes) nothing changes."""
    scheduler, step = training.scheduler, training.start_epoch * training.schedule.steps_per_epoch
    if scheduler.last_epoch == step:
        return
    logger.warning(
        "the run made %d optimizer step(s) per epoch, this invocation makes %d (another number of processes, or of "
        "training images): its learning rate schedule continues from step %d of %d, the first of epoch %d, and the "
        "result will differ from an uninterrupted run", scheduler.last_epoch // max(1, training.start_epoch),
        training.schedule.steps_per_epoch, step, training.schedule.total_steps, training.start_epoch + 1,
    )
    scheduler.last_epoch = step
    rates = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(training.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports, as LambdaLR.step() would set it


def _log_start(task: Task, cfg: TrainConfig, training: Training, state: dict[str, Any] | None, ctx: RunContext) -> None:
    if not ctx.dist.main:
        return
    s = training.schedule
    if state is not None:
        logger.info("resuming %s after epoch %d of %d", cfg.output, training.start_epoch, cfg.epochs)
    else:
        logger.info(
            "%s of %d classes (val %d), %d process(es) on %s; global batch %d, peak lr %.3g, %d steps (%d warmup)",
            task.intro % len(task.train_set), len(task.classes), len(task.val_set), ctx.dist.world_size, ctx.device,
            cfg.batch_size * cfg.grad_accum * ctx.dist.world_size, s.peak_lr, s.total_steps, task.warmup_steps(s),
        )
    if training.start_epoch >= cfg.epochs:
        logger.info("the run in %s is already finished (%d epochs); nothing to do", cfg.output, cfg.epochs)


def _workers(cfg: TrainConfig, device: torch.device) -> int:
    return cfg.workers if cfg.workers is not None else (0 if device.type == "cpu" else min(8, os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------------- an epoch
def _train_epoch(task: Task, cfg: TrainConfig, training: Training, epoch: int, ctx: RunContext) -> tuple[float, float]:
    """One pass over this process's shard of the training set; returns (summed loss, samples)."""
    info, batches = ctx.dist, training.schedule.batches_per_epoch
    seed_everything(cfg.seed, epoch, info.rank)
    if hasattr(task.train_set, "set_epoch"):
        task.train_set.set_epoch(epoch)
    loader = _train_loader(task, cfg, epoch, batches, ctx)
    # Each micro-batch weighs by its share of its accumulation group's samples, so that k micro-batches make the
    # gradient of one batch of their samples also where the last micro-batch is shorter (11 images in batches of
    # 2 + 2 + 2 + 2 + 2 + 1): a weight of 1/k each counted its one image as much as the two of the one before.
    sizes = [len(indices) for indices in loader.batch_sampler]
    group_samples = [sum(sizes[start:start + cfg.grad_accum]) for start in range(0, len(sizes), cfg.grad_accum)]
    training.net.train()
    loss_sum = seen = 0.0
    bar = progress_bar(loader, enabled=cfg.progress and info.main, desc=f"epoch {epoch + 1}/{cfg.epochs}")
    for i, batch in enumerate(bar):
        honour_stop()  # one lost while the loader forked its workers
        _crash_for_test(epoch * batches + i + 1)
        batch = to_device(batch, ctx.device)
        boundary = (i + 1) % cfg.grad_accum == 0 or i + 1 == batches
        # Between boundaries the processes accumulate their own gradients; DDP averages them at the boundary.
        with contextlib.nullcontext() if boundary or not info.enabled else training.net.no_sync():
            loss = task.training_loss(training.net, batch, ctx)
            scaled = loss * (sizes[i] / group_samples[i // cfg.grad_accum])
            (training.scaler.scale(scaled) if training.scaler is not None else scaled).backward()
        value = loss.item()
        _stop_if_diverged(value, epoch, i, cfg, training, ctx)
        if boundary:
            _optimizer_step(cfg, training)
        count = task.count(batch)
        loss_sum += value * count
        seen += count
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", lr=f"{training.optimizer.param_groups[0]['lr']:.2e}")
    return loss_sum, seen


def _train_loader(task: Task, cfg: TrainConfig, epoch: int, batches: int, ctx: RunContext) -> torch.utils.data.DataLoader:
    """The DataLoader of this process's epoch: the task's own batches (:meth:`Task.train_batches`), or
    ``cfg.batch_size`` samples at a time in :meth:`Task.train_order`."""
    workers = _workers(cfg, ctx.device)
    explicit = task.train_batches(epoch, ctx.dist, cfg.batch_size)
    if explicit is None:
        order = task.train_order(epoch, ctx.dist)
        return torch.utils.data.DataLoader(task.train_set, batch_size=cfg.batch_size, sampler=order,
                                           num_workers=workers, collate_fn=task.collate)
    # The schedule (accumulation boundaries, the learning rate of each step, the crash-test step numbers) and DDP's
    # equal step counts were planned from epoch 0's batches: another count would silently shift them.
    if len(explicit) != batches or not all(explicit):
        raise ValueError(
            f"{type(task).__name__}.train_batches gave {len(explicit)} batches for epoch {epoch + 1} (empty ones: "
            f"{sum(1 for b in explicit if not b)}); the run was planned for {batches} non-empty batches per epoch"
        )
    return torch.utils.data.DataLoader(task.train_set, batch_sampler=explicit, num_workers=workers,
                                       collate_fn=task.collate)


def _crash_for_test(step: int) -> None:
    """Test-only: SIGKILL this process at global batch ``step`` when PVTV2_TEST_KILL_AT_STEP names it."""
    if os.environ.get(KILL_ENV) and int(os.environ[KILL_ENV]) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _optimizer_step(cfg: TrainConfig, training: Training) -> None:
    scaler = training.scaler
    clip = bool(cfg.clip_grad)  # None or 0: no clipping (a norm of 0 would zero every step)
    if scaler is not None and clip:
        scaler.unscale_(training.optimizer)  # clip the true gradients, not the scaled ones
    if clip:
        nn.utils.clip_grad_norm_(training.model.parameters(), cfg.clip_grad)
    if scaler is not None:
        scaler.step(training.optimizer)  # skipped when a gradient overflowed; the scale then shrinks
        scaler.update()
    else:
        training.optimizer.step()
    training.optimizer.zero_grad(set_to_none=True)
    training.scheduler.step()
    if training.ema is not None:
        training.ema.update(training.model)


def _stop_if_diverged(value: float, epoch: int, index: int, cfg: TrainConfig, training: Training, ctx: RunContext) -> None:
    """Stop before a non-finite loss reaches the weights. Under torchrun the processes decide together (one tiny
    all-reduce per batch), so all stop at the same batch and none waits for another in a collective."""
    bad = not math.isfinite(value)
    if ctx.dist.enabled:
        bad = ctx.sum([float(bad)])[0] > 0
    if not bad:
        return
    saved = (f"the checkpoint of epoch {epoch} in {str(Path(cfg.output) / 'last')!r} is intact" if epoch
             else "no epoch was completed, so nothing was saved")
    what = f"became {value}" if not math.isfinite(value) else "stopped being finite in another process"
    raise TrainingDiverged(
        f"the training loss {what} at epoch {epoch + 1}, step {index + 1} of {training.schedule.batches_per_epoch}; "
        f"training stopped ({saved}). Start again (--overwrite) with a lower --lr, with --clip-grad (e.g. 1.0)"
        + (", or without --bf16" if ctx.bf16 else "")
    )


def _stop_if_weights_diverged(epoch: int, cfg: TrainConfig, training: Training, ctx: RunContext) -> None:
    """Stop before weights holding NaN or infinity are evaluated and saved. The loss check does not see a NaN in
    weights that touch no output (a kernel tap that only meets padding, such as those of a stage whose grid is one
    pixel): PyTorch's bfloat16 convolutions on CPUs put NaN gradients there now and then, and the run finished as
    if nothing happened, saving last/ and best/ that --resume refused and larger images turned into NaN. Every
    process holds the same weights (DistributedDataParallel), so all stop here together."""
    bad = non_finite(training.model.state_dict())
    if bad is None:
        return
    saved = (f"the checkpoint of epoch {epoch} in {str(Path(cfg.output) / 'last')!r} is intact" if epoch
             else "no epoch was completed, so nothing was saved")
    raise TrainingDiverged(
        f"the weights became NaN or infinite in epoch {epoch + 1} ({bad}) while the training loss stayed finite; "
        f"training stopped ({saved}). Resume it (--resume), or start again (--overwrite) with a lower --lr or "
        f"--clip-grad" + (", or without --bf16 (or with a larger --image-size)" if ctx.bf16 else "")
    )


def _validate(task: Task, cfg: TrainConfig, training: Training, epoch: int, ctx: RunContext) -> dict[str, Any]:
    """The task's validation fields; this process evaluates its shard (not padded: every sample counts once)."""
    info = ctx.dist
    order = epoch_indices(len(task.val_set), seed=cfg.seed, epoch=epoch, shuffle=False, rank=info.rank,
                          world_size=info.world_size, pad=False)
    loader = torch.utils.data.DataLoader(task.val_set, batch_size=cfg.batch_size, sampler=order,
                                         num_workers=_workers(cfg, ctx.device), collate_fn=task.collate)
    if info.enabled:
        # BatchNorm's running statistics (segmentation's decode head, depth's decoder; no SyncBatchNorm): each process
        # updated its own copy in its last forward pass. Every shard is scored with rank 0's, the ones that are saved;
        # process 1 scored its shard of the depth metrics with statistics that no checkpoint holds.
        for module in (training.model, training.ema.module if training.ema is not None else None):
            for buffer in module.buffers() if module is not None else ():
                dist.broadcast(buffer, src=0)
    fields = task.evaluate(training.model, loader, ctx)
    if training.ema is not None:
        fields.update({f"ema_{key}": value for key, value in task.evaluate(training.ema.module, loader, ctx).items()})
    training.model.train()
    return fields


def _end_epoch(task: Task, cfg: TrainConfig, training: Training, record: dict[str, Any], ctx: RunContext) -> None:
    """Keep the record, pick ``best/``, and (rank 0) write metrics, checkpoints and curves."""
    epoch = record["epoch"]
    improved = record[task.best_metric] > training.best_score
    if improved:
        training.best_score, training.best_epoch = record[task.best_metric], epoch
    rng_states = ctx.gather(rng_state())  # every process's generators: each resumes its own stream
    out = Path(cfg.output)
    processor = task.processor()

    def write() -> None:
        training.records.append(record)
        write_metrics(out, training.records)
        training_state = {
            "epoch": epoch,
            "epochs": cfg.epochs,
            task.best_state_key: training.best_score,
            "best_epoch": training.best_epoch,
            "optimizer": training.optimizer.state_dict(),
            "scheduler": training.scheduler.state_dict(),
            "rng": rng_states,
            "world_size": ctx.dist.world_size,
            "run": cfg.run_fields(),
            "model_config": training.model.config.to_dict(),
        }
        if training.scaler is not None:
            training_state["scaler"] = training.scaler.state_dict()
        if training.ema is not None:
            training_state["ema"] = training.ema.state_dict()
            save_checkpoint(out / "ema", training.ema.module, cfg.image_size, processor=processor)
        if improved:
            save_checkpoint(out / "best", training.model, cfg.image_size, processor=processor)
        save_checkpoint(out / "last", training.model, cfg.image_size, training_state, processor=processor)
        draw_curves(training.records, out / CURVES_FILE, score_panel=task.score_panel)
        logger.info("epoch %d/%d: train loss %.4f, %s", epoch, cfg.epochs, record["train_loss"], task.epoch_summary(record))

    on_main(write, ctx.dist)  # a failed write stops every process, not only rank 0
