"""Training ``PvtV2ForSemanticSegmentation`` on an image / mask folder, reporting mean IoU and pixel accuracy.

This is the ``task="segmentation"`` branch of :func:`pvtv2.train.train` (``pvtv2 train --task segmentation``): the
run folder, ``--resume`` / ``--overwrite`` checks, atomic ``last/`` and ``best/`` checkpoints, the training state,
the per-epoch reseeding, deterministic sharding and ``torchrun`` (DDP, gloo on CPUs) are the classifier's, from
``pvtv2.train``; only the data (:class:`pvtv2.dense_data.SegmentationFolder`), the model, the loss and the metrics
differ. ``best/`` is the epoch with the highest validation mean IoU. With the same seed, a resumed run ends with the
same weights as an uninterrupted one.

A model trained from scratch ("tiny" or a preset name) gets PyTorch's default initialisation in its decode head,
not SegFormer's normal(0, 0.02): with a random encoder, the small head weights leave the encoder almost no gradient
and the model settles on predicting the majority class everywhere (measured on the shapes example: mean IoU stuck
at the all-background 0.20 for 8 epochs, against 0.3 and rising with the default initialisation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import PRESETS, PvtV2Config
from .data import epoch_indices
from .dense import PvtV2ForSemanticSegmentation, semantic_segmentation_loss
from .dense_data import SegmentationFolder, read_id2label, scan_segmentation_split
from .train import (
    CURVES_FILE,
    KILL_ENV,
    METRICS_FILE,
    RUN_FILE,
    TrainConfig,
    _all_reduce,
    _autocast,
    _Dist,
    _progress,
    _rng_state,
    _save_checkpoint,
    _seed_everything,
    _set_rng_state,
    _write_metrics,
    cosine_warmup_factor,
    draw_curves,
    parameter_groups,
    read_metrics,
    train,
)

__all__ = [
    "TINY_SEGMENTATION",
    "EXAMPLE_RECIPE",
    "segmentation_config",
    "train_segmentation",
    "train_segmentation_run",
    "evaluate_segmentation",
    "segmentation_metrics",
    "build_segmentation_model",
]

logger = logging.getLogger(__name__)

# A small encoder that trains on two CPU cores in minutes (the shapes example's model, ``--model tiny``).
TINY_SEGMENTATION: dict[str, Any] = dict(
    depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 128, 160], num_attention_heads=[1, 2, 4, 5], mlp_ratios=[4, 4, 4, 4],
    sr_ratios=[4, 2, 1, 1], decoder_hidden_size=64, classifier_dropout_prob=0.0, drop_path_rate=0.0,
)

# The settings of the shapes example (``pvtv2 train-seg`` / ``demo-seg`` defaults): TrainConfig's classification
# defaults are the ImageNet recipe, far too long and too gentle for a small model on a small dataset.
EXAMPLE_RECIPE: dict[str, Any] = dict(
    model="tiny", image_size=64, epochs=8, batch_size=8, lr=2e-3, min_lr=2e-5, warmup_epochs=1.0, weight_decay=0.01,
    hflip=0.5,
)

_SCORE_PANEL = ("validation", [("mean_iou", (44, 160, 44)), ("pixel_accuracy", (214, 39, 40))], (0.0, 1.0))


def segmentation_config(**changes: Any) -> TrainConfig:
    """A :class:`TrainConfig` for segmentation: the example's recipe, overridden by ``changes``."""
    return TrainConfig(**{**EXAMPLE_RECIPE, **changes, "task": "segmentation"})


def train_segmentation(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a segmentation run: :func:`pvtv2.train.train` with ``task="segmentation"``."""
    return train(dataclasses.replace(cfg, task="segmentation"))


def segmentation_metrics(confusion: np.ndarray) -> dict[str, Any]:
    """Mean IoU over the classes that occur (in labels or predictions), pixel accuracy and per-class IoU (None for
    a class that never occurs), from a confusion matrix (rows: true class, columns: predicted class)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    intersection = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    iou = np.where(present, intersection / np.maximum(union, 1), np.nan)
    total = confusion.sum()
    return {
        "mean_iou": float(np.nanmean(iou)) if present.any() else 0.0,
        "pixel_accuracy": float(intersection.sum() / total) if total else 0.0,
        "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
    }


@torch.no_grad()
def _evaluate_sums(
    model: PvtV2ForSemanticSegmentation, loader: Any, device: torch.device, bf16: bool = False
) -> tuple[float, int, np.ndarray]:
    """(summed loss, images, confusion matrix) at the label maps' resolution (logits upsampled bilinearly)."""
    model.eval()
    k = model.config.num_labels
    ignore = model.config.semantic_loss_ignore_index
    confusion = torch.zeros(k * k, dtype=torch.int64, device=device)
    loss_sum, count = 0.0, 0
    for pixels, labels in loader:
        pixels, labels = pixels.to(device), labels.to(device)
        with _autocast(device, bf16):
            logits = model(pixels).logits
        logits = logits.float()
        loss_sum += float(semantic_segmentation_loss(logits, labels, ignore)) * pixels.shape[0]
        count += pixels.shape[0]
        upsampled = nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        valid = labels != ignore
        confusion += torch.bincount(labels[valid] * k + upsampled.argmax(1)[valid], minlength=k * k)
    return loss_sum, count, confusion.view(k, k).cpu().numpy()


def evaluate_segmentation(model: PvtV2ForSemanticSegmentation, loader: Any, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Loss, mean IoU, pixel accuracy and per-class IoU of ``model`` on ``loader`` (batches of images, label maps)."""
    loss_sum, count, confusion = _evaluate_sums(model, loader, torch.device(device))
    metrics = segmentation_metrics(confusion)
    metrics["loss"] = loss_sum / max(count, 1)
    return metrics


def _reset_head(model: PvtV2ForSemanticSegmentation) -> None:
    # PyTorch's default (Kaiming-uniform) initialisation; see the module docstring for why.
    for module in model.decode_head.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            module.reset_parameters()


def build_segmentation_model(cfg: TrainConfig, id2label: dict[int, str]) -> PvtV2ForSemanticSegmentation:
    """``tiny`` or a preset name: a new model; a config.json: that architecture, new; anything else: a classification
    or segmentation checkpoint whose encoder (and, for the same classes, head) to fine-tune."""
    name = cfg.model.replace("-", "_").lower()
    size = cfg.image_size  # recorded: `pvtv2 segment` resizes to it by default
    overrides: dict[str, Any] = {"id2label": id2label, "image_size": size}
    if cfg.drop_path is not None:
        overrides["drop_path_rate"] = cfg.drop_path
    if name == "tiny" or (name in PRESETS and not os.path.exists(cfg.model)) or cfg.model.endswith(".json"):
        if name == "tiny":
            config = PvtV2Config(**{**TINY_SEGMENTATION, **overrides})
        elif name in PRESETS and not os.path.exists(cfg.model):
            config = PvtV2Config.from_preset(name, **overrides)
        else:
            config = PvtV2Config.from_dict(json.loads(Path(cfg.model).read_text(encoding="utf-8"))).replace(**overrides)
        model = PvtV2ForSemanticSegmentation(config)
        _reset_head(model)
        return model
    return PvtV2ForSemanticSegmentation.from_pretrained(cfg.model, **overrides)


def train_segmentation_run(
    cfg: TrainConfig, state: dict[str, Any] | None, info: _Dist, device: torch.device
) -> dict[str, Any]:
    """The epoch loop of a segmentation run; ``pvtv2.train`` has already prepared the output folder and, when
    resuming, read ``state``. Call :func:`train_segmentation` (or ``train``), not this."""
    out = Path(cfg.output)
    if not cfg.data:
        raise ValueError("a dataset folder is needed (--data DIR with DIR/{train,val}/images and DIR/{train,val}/masks)")
    if not info.main:
        logging.getLogger("pvtv2").setLevel(logging.ERROR)
    pairs = scan_segmentation_split(cfg.data, "train")
    id2label = read_id2label(cfg.data, pairs)
    train_set = SegmentationFolder(cfg.data, "train", cfg.image_size, hflip=cfg.hflip, seed=cfg.seed)
    val_set = SegmentationFolder(cfg.data, "val", cfg.image_size)
    workers = cfg.workers if cfg.workers is not None else (0 if device.type == "cpu" else min(8, os.cpu_count() or 1))

    _seed_everything(cfg.seed, 2**31 - 1, 0)  # the initial weights: a stream apart from the epochs'
    last = out / "last"
    if state is not None and (last / "config.json").is_file():
        model = PvtV2ForSemanticSegmentation.from_pretrained(last)
    elif state is not None:
        model = PvtV2ForSemanticSegmentation(PvtV2Config.from_dict(state["model_config"]))
    else:
        model = build_segmentation_model(cfg, id2label)
    if len(model.config.id2label) != len(id2label) and state is None:
        logger.warning("the model has %d classes, the data %d", len(model.config.id2label), len(id2label))
    if info.main and state is None:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_FILE).write_text(json.dumps(cfg.run_fields(), indent=2) + "\n", encoding="utf-8")
        _write_metrics(out, [])
    model.to(device).train()
    net: nn.Module = model
    if info.enabled:
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        # The decode head's BatchNorm keeps per-process batch statistics (no SyncBatchNorm), as a 1-process run does.
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    bf16 = cfg.bf16 and (device.type != "cuda" or torch.cuda.is_bf16_supported())

    global_batch = cfg.batch_size * cfg.grad_accum * info.world_size
    peak_lr = cfg.lr if cfg.lr is not None else 6e-5 * global_batch / 16  # SegFormer's recipe: 6e-5 at batch 16
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
    ignore = model.config.semantic_loss_ignore_index

    start_epoch, best_iou, best_epoch = 0, -1.0, -1
    records: list[dict[str, Any]] = []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_iou, best_epoch = state["epoch"], state["best_mean_iou"], state["best_epoch"]
        if len(state["rng"]) == info.world_size:
            _set_rng_state(state["rng"][info.rank])
        if info.main:
            records = [r for r in read_metrics(out) if r["epoch"] <= start_epoch]
            logger.info("resuming %s after epoch %d of %d", out, start_epoch, cfg.epochs)
    elif info.main:
        logger.info(
            "segmentation: %d training images of %d classes (val %d), %d process(es) on %s; global batch %d, peak lr "
            "%.3g, %d steps (%d warmup)", len(train_set), len(id2label), len(val_set), info.world_size, device,
            global_batch, peak_lr, total_steps, warmup_steps,
        )

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
        for i, (pixels, labels) in enumerate(bar):
            if kill_at and epoch * batches_per_epoch + i + 1 == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            pixels, labels = pixels.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            boundary = (i + 1) % cfg.grad_accum == 0 or i + 1 == batches_per_epoch
            sync = contextlib.nullcontext() if boundary or not info.enabled else net.no_sync()
            with sync:
                with _autocast(device, bf16):
                    logits = net(pixels).logits
                loss = semantic_segmentation_loss(logits.float(), labels, ignore)
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
            loss_sum += loss.item() * pixels.shape[0]
            seen += pixels.shape[0]
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        train_seconds = time.perf_counter() - began

        val_order = epoch_indices(
            len(val_set), seed=cfg.seed, epoch=epoch, shuffle=False, rank=info.rank, world_size=info.world_size, pad=False
        )
        val_loader = torch.utils.data.DataLoader(val_set, batch_size=cfg.batch_size, sampler=val_order, num_workers=workers)
        if info.enabled:
            # BatchNorm's running statistics: each process updated its own copy in its last forward pass. Evaluate
            # every shard with rank 0's, the ones that are saved, so the metrics are those of the saved model.
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        v_loss, v_count, confusion = _evaluate_sums(model, val_loader, device, bf16)
        model.train()
        k = confusion.shape[0]
        total = _all_reduce([loss_sum, seen, v_loss, v_count, *confusion.reshape(-1).tolist()], info, device)
        loss_sum, seen, v_loss, v_count = total[:4]
        metrics = segmentation_metrics(np.asarray(total[4:]).reshape(k, k))
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "val_loss": v_loss / max(v_count, 1),
            "mean_iou": metrics["mean_iou"],
            "pixel_accuracy": metrics["pixel_accuracy"],
            "per_class_iou": metrics["per_class_iou"],
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - began,
            "images_per_second": seen / max(train_seconds, 1e-9),
        }
        improved = record["mean_iou"] > best_iou
        if improved:
            best_iou, best_epoch = record["mean_iou"], epoch + 1
        rng_states = [_rng_state()]
        if info.enabled:
            gathered: list[Any] = [None] * info.world_size
            torch.distributed.all_gather_object(gathered, rng_states[0])
            rng_states = gathered
        if info.main:
            records.append(record)
            _write_metrics(out, records)
            training_state = {
                "epoch": epoch + 1,
                "epochs": cfg.epochs,
                "best_mean_iou": best_iou,
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
            draw_curves(records, out / CURVES_FILE, score_panel=_SCORE_PANEL)
            logger.info(
                "epoch %d/%d: train loss %.4f, val loss %.4f, mean IoU %.4f, pixel accuracy %.4f, %.1f s",
                epoch + 1, cfg.epochs, record["train_loss"], record["val_loss"], record["mean_iou"],
                record["pixel_accuracy"], record["seconds"],
            )
    if info.enabled:
        torch.distributed.barrier()
    records = read_metrics(out) if info.main else records
    best = next((r for r in records if r["epoch"] == best_epoch), None)
    return {
        "task": "segmentation",
        "output": str(out),
        "last": str(last),
        "best": str(out / "best"),
        "metrics": str(out / METRICS_FILE),
        "curves": str(out / CURVES_FILE),
        "best_mean_iou": best["mean_iou"] if best else None,
        "best_epoch": best_epoch,
        "best_record": best,
        "final": records[-1] if records else None,
        "classes": [id2label[i] for i in sorted(id2label)],
        "rank": info.rank,
    }
