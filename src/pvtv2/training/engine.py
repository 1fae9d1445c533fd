"""The training engine: one epoch loop for every task, in one process or under ``torchrun``.

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
import logging
import math
import os
import signal
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..data.folders import epoch_indices
from ..fileio import atomic_write_json
from ..models.config import PvtV2Config
from ..progress import progress_bar
from .config import TrainConfig
from .curves import draw_curves, read_metrics, write_metrics
from .distributed import DistInfo, all_reduce, autocast, rng_state, seed_everything, set_rng_state
from .rundir import CURVES_FILE, METRICS_FILE, RUN_FILE, save_checkpoint

__all__ = ["Task", "run", "cosine_warmup_factor", "parameter_groups", "KILL_ENV"]

logger = logging.getLogger(__name__)

# Test-only fault injection: the process SIGKILLs itself when it reaches this global batch number (counted from 1
# over the whole run), to check that ``--resume`` recovers from a crash in the middle of an epoch.
KILL_ENV = "PVTV2_TEST_KILL_AT_STEP"

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

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device, bf16: bool, info: DistInfo) -> list[float]:
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


def run(task: Task, cfg: TrainConfig, state: dict[str, Any] | None, info: DistInfo, device: torch.device) -> dict[str, Any]:
    """The epochs of a run of any task, from the first or from where ``state`` (the last completed epoch's) stopped."""
    out = Path(cfg.output)
    train_set, val_set = task.train_set, task.val_set
    workers = cfg.workers if cfg.workers is not None else (0 if device.type == "cpu" else min(8, os.cpu_count() or 1))

    # Model: the same initial weights in every process (seeded), and DDP broadcasts rank 0's anyway.
    seed_everything(cfg.seed, 2**31 - 1, 0)  # a stream of its own, apart from the epochs'
    last = out / "last"
    if state is not None and (last / "config.json").is_file():
        model = task.model_class.from_pretrained(last)
    elif state is not None:
        model = task.model_class(PvtV2Config.from_dict(state["model_config"]))
    else:
        model = task.new_model()
    if info.main and state is None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RUN_FILE, cfg.run_fields())
        write_metrics(out, [])
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
            set_rng_state(rng[info.rank])
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
        seed_everything(cfg.seed, epoch, info.rank)
        train_set.set_epoch(epoch)
        order = epoch_indices(
            len(train_set), seed=cfg.seed, epoch=epoch, shuffle=True, rank=info.rank, world_size=info.world_size
        )
        loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, sampler=order, num_workers=workers)
        net.train()
        loss_sum = seen = 0.0
        bar = progress_bar(loader, enabled=cfg.progress and info.main, desc=f"epoch {epoch + 1}/{cfg.epochs}")
        for i, (images, labels) in enumerate(bar):
            step_now = epoch * batches_per_epoch + i + 1
            if kill_at and step_now == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            boundary = (i + 1) % cfg.grad_accum == 0 or i + 1 == batches_per_epoch
            sync = contextlib.nullcontext() if boundary or not info.enabled else net.no_sync()
            with sync:
                with autocast(device, bf16):
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
        total = all_reduce([loss_sum, seen, *val], info, device)
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
        rng_states = [rng_state()]
        if info.enabled:
            gathered: list[Any] = [None] * info.world_size
            dist.all_gather_object(gathered, rng_states[0])
            rng_states = gathered
        if info.main:
            records.append(record)
            write_metrics(out, records)
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
                save_checkpoint(out / "best", model, cfg.image_size)
            save_checkpoint(last, model, cfg.image_size, training_state)
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

