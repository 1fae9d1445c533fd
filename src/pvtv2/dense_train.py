"""Fine-tuning ``PvtV2ForSemanticSegmentation`` on an image / mask folder, with mean IoU and pixel accuracy.

A single-process loop (AdamW, linear warmup then cosine decay from ``pvtv2.train``), evaluated every epoch. The
output folder holds ``last/`` and ``best/`` (each a ``save_pretrained`` folder, ``last/`` with the optimizer and
random state in ``training_state.pt``) and ``metrics.jsonl``; ``resume=True`` continues from ``last/``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .config import PRESETS, PvtV2Config
from .dense import PvtV2ForSemanticSegmentation
from .dense_data import SegmentationFolder, read_id2label, scan_segmentation_split
from .train import cosine_warmup_factor, parameter_groups

__all__ = ["SegTrainConfig", "TINY_SEGMENTATION", "train_segmentation", "evaluate_segmentation", "segmentation_metrics"]

logger = logging.getLogger(__name__)

# A small model that trains on two CPU cores in minutes (the synthetic example's default).
TINY_SEGMENTATION: dict[str, Any] = dict(
    depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128], num_attention_heads=[1, 2, 4, 8], mlp_ratios=[4, 4, 4, 4],
    sr_ratios=[4, 2, 1, 1], decoder_hidden_size=64, classifier_dropout_prob=0.0,
)
STATE_NAME = "training_state.pt"


@dataclasses.dataclass
class SegTrainConfig:
    data: str  # folder with train/ and val/ (see pvtv2.dense_data)
    output: str  # run folder: last/, best/, metrics.jsonl
    model: str = "tiny"  # "tiny", a preset name (untrained), or a checkpoint folder / file / hub id to fine-tune
    image_size: int = 64
    epochs: int = 10
    batch_size: int = 8
    lr: float = 4e-3
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    seed: int = 0
    resume: bool = False
    num_workers: int = 0
    progress: bool = True

    def validate(self) -> None:
        for name in ("image_size", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


def segmentation_metrics(confusion: np.ndarray) -> dict[str, float]:
    """Mean IoU over the classes that occur (in labels or predictions), and pixel accuracy, from a confusion matrix
    (rows: true class, columns: predicted class)."""
    confusion = confusion.astype(np.float64)
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
def evaluate_segmentation(model: PvtV2ForSemanticSegmentation, loader: DataLoader) -> dict[str, float]:
    """Loss, mean IoU and pixel accuracy at the label maps' resolution (logits upsampled bilinearly)."""
    model.eval()
    k = model.config.num_labels
    ignore = model.config.semantic_loss_ignore_index
    confusion = np.zeros((k, k), dtype=np.int64)
    loss_sum, count = 0.0, 0
    for pixels, labels in loader:
        out = model(pixels, labels=labels)
        loss_sum += float(out.loss) * pixels.shape[0]
        count += pixels.shape[0]
        logits = torch.nn.functional.interpolate(out.logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        pred = logits.argmax(1)
        valid = labels != ignore
        index = labels[valid] * k + pred[valid]
        confusion += torch.bincount(index, minlength=k * k).view(k, k).numpy()
    metrics = segmentation_metrics(confusion)
    metrics["loss"] = loss_sum / max(count, 1)
    return metrics


def _build_model(cfg: SegTrainConfig, id2label: dict[int, str]) -> PvtV2ForSemanticSegmentation:
    # image_size records the training resolution, which `pvtv2 segment` uses by default.
    name = cfg.model.replace("-", "_").lower()
    size = cfg.image_size
    if name == "tiny":
        return PvtV2ForSemanticSegmentation(PvtV2Config(**TINY_SEGMENTATION, id2label=id2label, image_size=size))
    if name in PRESETS and not os.path.exists(cfg.model):
        return PvtV2ForSemanticSegmentation(PvtV2Config.from_preset(name, id2label=id2label, image_size=size))
    # A classification or segmentation checkpoint: its encoder, a new head sized for these classes where needed.
    return PvtV2ForSemanticSegmentation.from_pretrained(cfg.model, id2label=id2label, image_size=size)


def _save(model: PvtV2ForSemanticSegmentation, folder: Path, state: dict[str, Any] | None) -> None:
    """Write ``folder`` whole or not at all: fill a temporary sibling, then rename it into place."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    if state is not None:
        torch.save(state, tmp / STATE_NAME)
    old = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)


def train_segmentation(cfg: SegTrainConfig) -> dict[str, Any]:
    """Train, evaluating each epoch; returns the best epoch's validation metrics and where the model is."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    output = Path(cfg.output)
    pairs = scan_segmentation_split(cfg.data, "train")
    id2label = read_id2label(cfg.data, pairs)
    train_set = SegmentationFolder(cfg.data, "train", cfg.image_size, augment=True)
    val_set = SegmentationFolder(cfg.data, "val", cfg.image_size)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train_set) > cfg.batch_size,
                              num_workers=cfg.num_workers, generator=generator)
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, num_workers=cfg.num_workers)

    resume_state = None
    last = output / "last"
    if cfg.resume and (last / STATE_NAME).is_file():
        model = PvtV2ForSemanticSegmentation.from_pretrained(last)
        resume_state = torch.load(last / STATE_NAME, map_location="cpu", weights_only=True)
        logger.info("resuming from %s (epoch %d done)", last, resume_state["epoch"])
    else:
        if output.exists() and any(output.iterdir()) and not cfg.resume:
            raise FileExistsError(f"output folder {os.fspath(output)!r} is not empty; pass --resume or choose another")
        model = _build_model(cfg, id2label)
    output.mkdir(parents=True, exist_ok=True)

    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr)
    steps_per_epoch = len(train_loader)
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_warmup_factor(s, total_steps=total, warmup_steps=warmup, min_ratio=0.01)
    )
    start_epoch, best, records = 0, None, []
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        torch.set_rng_state(resume_state["rng"])
        generator.set_state(resume_state["loader_rng"])
        start_epoch, best, records = resume_state["epoch"], resume_state["best"], resume_state["records"]

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        started, loss_sum, seen = time.perf_counter(), 0.0, 0
        batches = train_loader
        if cfg.progress and sys.stderr.isatty():
            from tqdm import tqdm

            batches = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for pixels, labels in batches:
            loss = model(pixels, labels=labels).loss
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"the loss became {loss.item()} at epoch {epoch + 1}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * pixels.shape[0]
            seen += pixels.shape[0]
        metrics = evaluate_segmentation(model, val_loader)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "val_loss": metrics["loss"],
                  "mean_iou": metrics["mean_iou"], "pixel_accuracy": metrics["pixel_accuracy"],
                  "per_class_iou": metrics["per_class_iou"], "seconds": time.perf_counter() - started}
        records.append(record)
        logger.info("epoch %d/%d: train loss %.4f, val loss %.4f, mIoU %.4f, pixel acc %.4f", epoch + 1, cfg.epochs,
                    record["train_loss"], record["val_loss"], record["mean_iou"], record["pixel_accuracy"])
        if best is None or record["mean_iou"] > best["mean_iou"]:
            best = record
            _save(model, output / "best", None)
        state = {"epoch": epoch + 1, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": torch.get_rng_state(), "loader_rng": generator.get_state(), "best": best, "records": records,
                 "config": dataclasses.asdict(cfg)}
        _save(model, last, state)
        (output / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"best": best, "best_model": os.fspath(output / "best"), "last_model": os.fspath(last), "epochs": records}
