"""The classification task: image folders ``DIR/{train,val}/<class>/``, cross-entropy with label smoothing, top-1 /
top-5 accuracy; and the model a run starts from (from scratch, or fine-tuning a checkpoint)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..data.augment import MixUpCutMix, PaperRandAugment, repeated_epoch_indices
from ..data.folders import EvalTransform, ImageFolder, TrainTransform, scan_split, split_samples
from ..models.config import PvtV2Config, is_preset_name
from ..models.labels import has_generic_labels
from ..models.layers import init_weights
from ..models.modeling import PvtV2ForImageClassification
from .config import NO_RECIPE, TrainConfig, resolve_recipe
from .distributed import DistInfo, autocast
from .engine import RunContext, Task, new_architecture, permute_rows_, reconcile_classes

__all__ = ["ClassificationTask", "build_classifier", "evaluate_classifier"]

logger = logging.getLogger(__name__)


def _label_map(classes: Sequence[str]) -> dict[int, str]:
    return dict(enumerate(classes))


def build_classifier(cfg: TrainConfig, classes: Sequence[str]) -> PvtV2ForImageClassification:
    """From scratch for a preset name or a ``config.json`` path (:func:`~pvtv2.training.engine.new_architecture`, as
    the dense tasks: a missing ``X.json`` is refused naming it); otherwise fine-tune ``from_pretrained``.

    Fine-tuning on a dataset whose classes are not the checkpoint's: another number of classes replaces the head (and
    says so); the same names in another order permute the head's rows; the same number under other names is an
    error unless ``replace_head`` (a silent relabelling would keep a head that means something else).
    """
    id2label = _label_map(classes)
    overrides: dict[str, Any] = {}
    if cfg.drop_path is not None:
        overrides["drop_path_rate"] = cfg.drop_path
    name = cfg.model
    # The dense tasks' resolver, without their ``tiny``: a --model X.json that is not there is refused naming it.
    config = new_architecture(name, id2label=id2label, image_size=cfg.image_size, **overrides)
    if config is not None:
        if is_preset_name(name):
            logger.info("training %s from scratch (drop path %.2f)", name, config.drop_path_rate)
        else:
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
    decision = reconcile_classes(
        names, list(classes), replace_head=cfg.replace_head, generic=has_generic_labels(dict(enumerate(names))),
        new_layers="a new head",
    )
    if decision == "replace":
        init_weights(model.classifier, model.config.initializer_range)
        logger.info("--replace-head: a new classifier head for the dataset's classes %s", list(classes)[:10])
    elif decision == "take":
        logger.warning("the checkpoint's classes have no names (%s...); taking the dataset's", names[:3])
    else:
        permute_rows_(model.classifier, decision)
        logger.info("the dataset lists the checkpoint's classes in another order: head rows permuted to match")
    config = model.config.replace(id2label=id2label, label2id={label: i for i, label in id2label.items()})
    model.config = config
    model.pvt_v2.config = config
    return model


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, loader: Any, device: torch.device, bf16: bool = False
) -> tuple[float, float, float, float]:
    """Sums over ``loader``: (cross-entropy, top-1 correct, top-5 correct, count)."""
    model.eval()
    loss_sum = top1 = top5 = count = 0.0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast(device, bf16):
            # return_dict: a --model folder's config.json may say false (a tuple has no .logits)
            logits = model(images, return_dict=True).logits
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        k = min(5, logits.shape[1])
        best = logits.topk(k, dim=1).indices  # (B, k)
        hits = best == labels[:, None]
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=1).sum().item()
        count += labels.numel()
    return loss_sum, top1, top5, count


class ClassificationTask(Task):
    """Image folders ``DIR/{train,val}/<class>/``, cross-entropy with label smoothing, top-1 / top-5 accuracy."""

    model_class = PvtV2ForImageClassification
    best_metric = "val_top1"
    best_state_key = "best_top1"
    intro = "training on %d images"

    def architecture(self) -> PvtV2Config | None:
        # new_architecture first: it refuses a missing --model X.json here, before the run folder or the data.
        config = new_architecture(self.cfg.model, image_size=self.cfg.image_size)
        return config if config is not None else super().architecture()

    def load_data(self) -> None:
        if any(getattr(self.cfg, name) is None for name in NO_RECIPE):
            # train() decides the recipe before it builds the task; a task built by hand decides it here, the same way.
            world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            self.cfg = resolve_recipe(self.cfg, world_size)[0]
        cfg = self.cfg
        if not cfg.data:
            raise ValueError("a dataset folder is needed (--data DIR with DIR/train/<class>/ and DIR/val/<class>/)")
        classes, train_samples = scan_split(cfg.data, "train")
        if cfg.val_split is not None:
            if os.path.isdir(os.path.join(cfg.data, "val")):
                raise ValueError(
                    f"--val-split carves a validation split from train/, but {cfg.data!r} has its own val/ folder; "
                    "leave out --val-split to use it"
                )
            train_samples, val_samples = split_samples(train_samples, cfg.val_split, cfg.seed)
            val_classes = classes
            logger.info("validation split: %d of the %d training images (--val-split %g, seed %d)",
                        len(val_samples), len(train_samples) + len(val_samples), cfg.val_split, cfg.seed)
        else:
            val_classes, val_samples = scan_split(cfg.data, "val")
        if val_classes != classes:
            only_train = sorted(set(classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(classes))
            raise ValueError(f"the train and val splits have different classes: only in train {only_train}, only in val {only_val}")
        if len(classes) < 2:
            raise ValueError(f"a classifier needs at least 2 classes, {cfg.data!r} has {classes}")
        self.classes = list(classes)
        randaugment = PaperRandAugment(interpolation=cfg.train_interpolation) if cfg.randaugment else None
        transform = TrainTransform(cfg.image_size, scale=(cfg.crop_scale, 1.0), hflip=cfg.hflip,
                                   interpolation=cfg.train_interpolation, randaugment=randaugment, erasing=cfg.reprob)
        self.train_set = ImageFolder(train_samples, transform, seed=cfg.seed)
        # MixUp / CutMix act on batches, with the label-smoothed soft targets this task's loss takes.
        self.mixer = (
            MixUpCutMix(len(classes), mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                        label_smoothing=cfg.label_smoothing)
            if cfg.mixup > 0 or cfg.cutmix > 0 else None
        )
        self.val_set = ImageFolder(val_samples, EvalTransform(cfg.image_size), seed=cfg.seed)

    def new_model(self) -> nn.Module:
        return build_classifier(self.cfg, self.classes)

    def default_lr(self, global_batch: int) -> float:
        return 5e-4 * global_batch / 512

    def train_order(self, epoch: int, info: DistInfo) -> list[int]:
        if self.cfg.repeated_aug == 1:
            return super().train_order(epoch, info)
        return repeated_epoch_indices(len(self.train_set), repeats=self.cfg.repeated_aug, seed=self.cfg.seed,
                                      epoch=epoch, rank=info.rank, world_size=info.world_size)

    def training_loss(self, model: nn.Module, batch: Any, ctx: RunContext) -> torch.Tensor:
        images, labels = batch
        if self.mixer is None:
            with ctx.autocast():
                logits = model(images, return_dict=True).logits
            return nn.functional.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.label_smoothing)
        # The batch's mixing seed comes from the global generator, which the engine reseeds from (seed, epoch,
        # rank) at each epoch start: a resumed run draws the same seeds.
        seed = int(torch.randint(0, 2**62, ()))
        images, targets = self.mixer(images, labels, seed)
        with ctx.autocast():
            logits = model(images, return_dict=True).logits
        # Soft-target cross-entropy; the label smoothing is already in the targets.
        return torch.sum(-targets * nn.functional.log_softmax(logits.float(), dim=-1), dim=-1).mean()

    def evaluate(self, model: nn.Module, loader: Any, ctx: RunContext) -> dict[str, Any]:
        loss, top1, top5, count = ctx.sum(evaluate_classifier(model, loader, ctx.device, ctx.bf16))
        return {
            "val_loss": loss / max(count, 1),
            "val_top1": 100.0 * top1 / max(count, 1),
            "val_top5": 100.0 * top5 / max(count, 1),
        }

    def epoch_summary(self, record: dict[str, Any]) -> str:
        ema = f", EMA top-1 {record['ema_val_top1']:.2f}%" if "ema_val_top1" in record else ""
        return "val loss %.4f, top-1 %.2f%%, top-5 %.2f%%%s, %.1f s, %.0f images/s" % (
            record["val_loss"], record["val_top1"], record["val_top5"], ema, record["seconds"],
            record["images_per_second"],
        )

    def result(self, records: list[dict[str, Any]], best_epoch: int) -> dict[str, Any]:
        return {"best_top1": max((r["val_top1"] for r in records), default=None)}
