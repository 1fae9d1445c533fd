"""Training ``PvtV2ForSemanticSegmentation`` on an image / mask folder, reporting mean IoU and pixel accuracy.

This is the ``task="segmentation"`` task of :func:`pvtv2.training.train` (``pvtv2 train --task segmentation``): the
run folder, ``--resume`` / ``--overwrite`` checks, atomic ``last/`` and ``best/`` checkpoints, the training state,
the per-epoch reseeding, deterministic sharding, the epoch loop and ``torchrun`` (DDP, gloo on CPUs) are the
engine's (:mod:`pvtv2.training.engine`); :class:`SegmentationTask` supplies only the data
(:class:`pvtv2.data.masks.SegmentationFolder`), the model, the loss and the metrics. ``best/`` is the epoch with the highest validation mean IoU. With the same seed, a resumed run ends with the
same weights as an uninterrupted one.

A model trained from scratch ("tiny" or a preset name) gets PyTorch's default initialisation in its decode head,
not SegFormer's normal(0, 0.02): with a random encoder, the small head weights leave the encoder almost no gradient
and the model settles on predicting the majority class everywhere (measured on the shapes example: mean IoU stuck
at the all-background 0.20 for 8 epochs, against 0.3 and rising with the default initialisation).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.augment import SegmentationTrainTransform
from ..data.folders import split_samples
from ..data.masks import (
    SegmentationFolder,
    check_ignore_index,
    check_not_binary_255,
    read_id2label,
    scan_segmentation_split,
)
from ..models.config import PvtV2Config
from ..models.labels import has_generic_labels
from ..models.segmentation import PvtV2ForSemanticSegmentation, semantic_segmentation_loss
from .config import TrainConfig
from .distributed import autocast
from .engine import RunContext, Task, held_logs, new_architecture, permute_rows_, reconcile_classes, release_logs

__all__ = [
    "TINY_SEGMENTATION",
    "EXAMPLE_RECIPE",
    "example_config",
    "SegmentationTask",
    "evaluate_segmentation",
    "segmentation_metrics",
    "build_segmentation_model",
    "carve_val_split",
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


def example_config(**changes: Any) -> TrainConfig:
    """A :class:`TrainConfig` for segmentation: the example's recipe, overridden by ``changes``."""
    return TrainConfig(**{**EXAMPLE_RECIPE, **changes, "task": "segmentation"})


def segmentation_metrics(confusion: np.ndarray) -> dict[str, Any]:
    """Mean IoU over the classes that occur (in labels or predictions), pixel accuracy and per-class IoU (None for
    a class that never occurs), from a confusion matrix (rows: true class, columns: predicted class).

    Without a labelled pixel (an empty matrix) mean IoU and pixel accuracy are NaN, as mmsegmentation's
    ``total_area_to_metrics`` gives them: 0.0 read as a model that got every pixel wrong."""
    confusion = np.asarray(confusion, dtype=np.float64)
    intersection = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    iou = np.where(present, intersection / np.maximum(union, 1), np.nan)
    total = confusion.sum()
    return {
        "mean_iou": float(np.nanmean(iou)) if present.any() else math.nan,
        "pixel_accuracy": float(intersection.sum() / total) if total else math.nan,
        "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
    }


@torch.no_grad()
def _evaluate_sums(
    model: PvtV2ForSemanticSegmentation, loader: Any, device: torch.device, bf16: bool = False
) -> tuple[float, int, np.ndarray]:
    """(summed loss, pixels it is the sum over, confusion matrix) at the label maps' resolution (logits upsampled
    bilinearly). Each batch's mean loss is weighted by the pixels it averages (those not ignored; every pixel for a
    one-class model), so the mean is that of every pixel of the split, whatever the batches: weighted by images, masks
    with ignored pixels gave another loss at another --batch-size or number of processes."""
    model.eval()
    # A one-class model (binary cross-entropy) predicts class 1 where its logit is positive, class 0 elsewhere, as
    # predict_segmentation does: its confusion matrix is 2x2 (an argmax over its one channel was always class 0).
    binary = model.config.num_labels == 1
    k = max(2, model.config.num_labels)
    ignore = model.config.semantic_loss_ignore_index
    confusion = torch.zeros(k * k, dtype=torch.int64, device=device)
    loss_sum, count = 0.0, 0
    for pixels, labels in loader:
        pixels, labels = pixels.to(device), labels.to(device)
        with autocast(device, bf16):
            # return_dict: a --model folder's config.json may say false (a tuple has no .logits)
            logits = model(pixels, return_dict=True).logits
        logits = logits.float()
        valid = labels != ignore
        averaged = labels.numel() if binary else int(valid.sum())  # what semantic_segmentation_loss averages over
        if averaged:
            loss_sum += float(semantic_segmentation_loss(logits, labels, ignore)) * averaged
            count += averaged
        upsampled = nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        predicted = (upsampled[:, 0] > 0).long() if binary else upsampled.argmax(1)
        confusion += torch.bincount(labels[valid] * k + predicted[valid], minlength=k * k)
    return loss_sum, count, confusion.view(k, k).cpu().numpy()


def evaluate_segmentation(model: PvtV2ForSemanticSegmentation, loader: Any, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Loss, mean IoU, pixel accuracy and per-class IoU of ``model`` on ``loader`` (batches of images, label maps)."""
    loss_sum, count, confusion = _evaluate_sums(model, loader, torch.device(device))
    metrics = segmentation_metrics(confusion)
    metrics["loss"] = loss_sum / count if count else math.nan  # no labelled pixel: no loss, as no score (was 0)
    return metrics


def _reset_head(model: PvtV2ForSemanticSegmentation) -> None:
    # PyTorch's default (Kaiming-uniform) initialisation; see the module docstring for why.
    for module in model.decode_head.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            module.reset_parameters()


def _check_classes(id2label: dict[int, str]) -> None:
    """The data's classes as a model takes them: numbered 0..N-1, each name once. A gap stopped fine-tuning with a
    bare KeyError; a name given twice cannot be matched by name (fine-tuning's class order, eval's labels.json), and
    eval's per-class IoU, keyed by name, kept one of the two."""
    keys = sorted(id2label)
    if keys != list(range(len(keys))):
        raise ValueError(f"the classes must be numbered 0..{len(keys) - 1}, one per mask value (DIR/labels.json's "
                         f"keys), got {keys[:10]}")
    seen: set[str] = set()
    twice = [name for name in id2label.values() if name in seen or seen.add(name)]
    if twice:
        raise ValueError(f"the classes name {sorted(set(twice))[:10]} twice (DIR/labels.json): each class needs a "
                         f"name of its own, by which it is matched to a checkpoint's and reported")


def _check_head_type(cfg: TrainConfig) -> None:
    """After a failed load with ``--decode-head``: a segmentation checkpoint of the other head is refused in those
    words (the loader listed the two heads' keys as "missing" and "unexpected", never naming either head)."""
    if cfg.decode_head is None:
        return
    try:
        with held_logs():  # a second look, silent: the first load's own messages are the ones given out
            held = PvtV2ForSemanticSegmentation.from_pretrained(cfg.model).head_type
    except Exception:  # noqa: BLE001 - not a segmentation checkpoint that loads as it is: the first error stands
        return
    if held != cfg.decode_head:
        raise ValueError(
            f"{cfg.model!r} holds a decode head of type {held}, not {cfg.decode_head} as --decode-head asks: leave "
            f"--decode-head out to fine-tune its own (--decode-head picks the head of a new model or of a "
            f"classification checkpoint)"
        )


def build_segmentation_model(cfg: TrainConfig, id2label: dict[int, str]) -> PvtV2ForSemanticSegmentation:
    """``tiny`` or a preset name: a new model; a config.json: that architecture, new; anything else: a classification
    or segmentation checkpoint whose encoder (and, for the same classes, head) to fine-tune."""
    _check_classes(id2label)
    size = cfg.image_size  # recorded: `pvtv2 segment` resizes to it by default
    # The loss and the metrics read the model's ignore value (saved with it: pvtv2 eval takes it as its default).
    overrides: dict[str, Any] = {"id2label": id2label, "image_size": size, "semantic_loss_ignore_index": cfg.ignore_index}
    if cfg.drop_path is not None:
        overrides["drop_path_rate"] = cfg.drop_path
    if cfg.decode_head is not None:
        overrides["decode_head_type"] = cfg.decode_head
    config = new_architecture(cfg.model, TINY_SEGMENTATION, **overrides)
    if config is not None:
        model = PvtV2ForSemanticSegmentation(config)
        _reset_head(model)
        return model
    # As classification's fine-tuning: the checkpoint's own classes first. With an id2label override and as many
    # classes, its trained classifier was kept under the data's names whatever they were, so that the same classes
    # listed in another order started from a permuted head and --replace-head did nothing.
    base = {k: v for k, v in overrides.items() if k != "id2label"}
    held: list[logging.LogRecord] = []
    try:
        with held_logs() as held:  # said once: given out if this load is the one kept (or fails)
            model = PvtV2ForSemanticSegmentation.from_pretrained(cfg.model, **base)
    except Exception:
        _check_head_type(cfg)
        release_logs(held)
        raise
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    classes = [id2label[i] for i in range(len(id2label))]
    trained = not any(k.startswith("decode_head.classifier.") for k in getattr(model, "newly_initialized_keys", ()))
    if len(names) != len(classes) or (not trained and names != classes):
        return PvtV2ForSemanticSegmentation.from_pretrained(cfg.model, **overrides)
    release_logs(held)
    if names == classes:
        return model
    classifier = model.decode_head.classifier
    generic = has_generic_labels(dict(enumerate(names))) or all(n == f"class_{i}" for i, n in enumerate(names))
    decision = reconcile_classes(
        names, classes, replace_head=cfg.replace_head, generic=generic, new_layers="a new classifier",
        names_from="DIR/labels.json",
    )
    if decision == "replace":
        model.init_new_module(classifier)
        logger.info("--replace-head: a new classifier for the dataset's classes %s", classes[:10])
    elif decision == "take":
        logger.warning("the checkpoint's classes have no names (%s...); taking the dataset's", names[:3])
    else:
        permute_rows_(classifier, decision)
        logger.info("the dataset lists the checkpoint's classes in another order: classifier rows permuted to match")
    config = model.config.replace(id2label=dict(id2label), label2id={name: i for i, name in id2label.items()})
    model.config = config
    model.pvt_v2.config = config
    return model


class SegmentationTask(Task):
    """Image / mask folders ``DIR/{train,val}/{images,masks}``, SegFormer's loss, mean IoU and pixel accuracy; ``best/``
    is the epoch with the highest validation mean IoU."""

    model_class = PvtV2ForSemanticSegmentation
    best_metric = "mean_iou"
    best_state_key = "best_mean_iou"
    intro = "segmentation: %d training images"
    score_panel = _SCORE_PANEL

    def architecture(self) -> PvtV2Config | None:
        config = new_architecture(self.cfg.model, TINY_SEGMENTATION, image_size=self.cfg.image_size)
        return config if config is not None else super().architecture()

    def load_data(self) -> None:
        cfg = self.cfg
        if not cfg.data:
            raise ValueError("a dataset folder is needed (--data DIR with DIR/{train,val}/images and DIR/{train,val}/masks)")
        pairs = scan_segmentation_split(cfg.data, "train")
        ignore = cfg.ignore_index
        check_not_binary_255(pairs, ignore)  # 0/255 pictures: every object pixel ignored, mean IoU 1 for all-background
        # Without labels.json the classes are counted off the masks: the validation ones too, or a class that only
        # they hold stopped the run after its first epoch ("label values [k] are out of range").
        val_pairs = scan_segmentation_split(cfg.data, "val") if cfg.val_split is None else []
        # The validation masks too: 0/255 ones among 0/1 training masks scored background alone, best/ chosen by it.
        check_not_binary_255(val_pairs, ignore)
        self.id2label = read_id2label(cfg.data, pairs + val_pairs, ignore)
        if cfg.reduce_labels and not (Path(cfg.data) / "labels.json").is_file():
            # Names read off the masks count raw values 0..top; reduced, 0 is no label and the classes are 0..top-1.
            self.id2label = {i: f"class_{i}" for i in range(max(1, len(self.id2label) - 1))}
        # An ignore value among the classes (255 with 256 classes or more, or --ignore-index 3 with 5) left that
        # class out of the loss and the metrics without a word.
        check_ignore_index(ignore, self.id2label)
        self.classes = [self.id2label[i] for i in sorted(self.id2label)]
        # Mask values beyond the classes are named with their file when read (a one-class model takes 0 and 1).
        classes = max(2, len(self.id2label))
        transform = None
        if cfg.seg_augment:
            # mmsegmentation's ADE20K pipeline at this crop: img_scale (4 x crop, crop), ratio 0.5-2, class cap 0.75.
            transform = SegmentationTrainTransform(crop_size=cfg.image_size, scale=(4 * cfg.image_size, cfg.image_size),
                                                   hflip=cfg.hflip, ignore_index=ignore)
        self.train_set = SegmentationFolder(cfg.data, "train", cfg.image_size, hflip=cfg.hflip, seed=cfg.seed,
                                            reduce_labels=cfg.reduce_labels, transform=transform, ignore_index=ignore,
                                            num_classes=classes)
        if cfg.val_split is None:
            self.val_set = SegmentationFolder(cfg.data, "val", cfg.image_size, reduce_labels=cfg.reduce_labels,
                                              ignore_index=ignore, num_classes=classes)
        else:
            # Evaluated as a val/ folder would be (resized, no augmentation); the images come out of train/.
            self.val_set = SegmentationFolder(cfg.data, "train", cfg.image_size, reduce_labels=cfg.reduce_labels,
                                              ignore_index=ignore, num_classes=classes)
            self.train_set.pairs, self.val_set.pairs = carve_val_split(cfg.data, pairs, cfg.val_split, cfg.seed)
        # Read as evaluated (resized, labels reduced) until the first labelled pixel (the first mask, as a rule).
        # Without any, every epoch scored mean IoU 0 (now NaN, mmsegmentation's value) and best/ meant nothing.
        if not any(bool((labels != ignore).any()) for _, labels in self.val_set):
            where = "the validation masks" + (" (--val-split)" if cfg.val_split is not None else "")
            raise ValueError(
                f"no pixel of {where} in {cfg.data!r} is labelled at --image-size {cfg.image_size}: every one is the "
                f"ignore value {ignore}" + (" or 0 (no label, with --reduce-labels)" if cfg.reduce_labels else "")
                + "; there is nothing to evaluate mean IoU and pixel accuracy on"
            )

    def new_model(self) -> nn.Module:
        model = build_segmentation_model(self.cfg, self.id2label)
        if len(model.config.id2label) != len(self.id2label):
            logger.warning("the model has %d classes, the data %d", len(model.config.id2label), len(self.id2label))
        return model

    def default_lr(self, global_batch: int) -> float:
        return 6e-5 * global_batch / 16  # SegFormer's recipe: 6e-5 at batch 16

    def training_loss(self, model: nn.Module, batch: Any, ctx: RunContext) -> torch.Tensor:
        pixels, labels = batch
        try:
            with ctx.autocast():
                logits = model(pixels, return_dict=True).logits
        except ValueError as err:
            if "Expected more than 1 value per channel" not in str(err):
                raise
            # A batch of one image (the last of an epoch: what is left over of this process's shard) whose feature
            # map is one pixel where a BatchNorm of the head normalises it (Semantic FPN's stride-32 level at 32 px):
            # the run stopped with PyTorch's words only, naming no flag, after its run.json was written.
            info = ctx.dist
            shard = -(-len(self.train_set) // info.world_size)
            head = getattr(_unwrap(model).config, "decode_head_type", None) or "segformer"
            raise ValueError(
                f"a training batch of {len(pixels)} image at --image-size {self.cfg.image_size} leaves a BatchNorm of "
                f"the {head} decode head one value per channel to normalise ({err}); each process trains {shard} "
                f"image(s) an epoch in batches of --batch-size {self.cfg.batch_size}, so its last batch holds "
                f"{shard % self.cfg.batch_size or self.cfg.batch_size}: start again (--overwrite) with a larger "
                f"--image-size (64 or more for the fpn head), or a --batch-size that leaves no batch of one image"
            ) from None
        ignore = _unwrap(model).config.semantic_loss_ignore_index
        return semantic_segmentation_loss(logits.float(), labels, ignore_index=ignore)

    def evaluate(self, model: nn.Module, loader: Any, ctx: RunContext) -> dict[str, Any]:
        # The decode head's BatchNorm keeps per-process batch statistics (no SyncBatchNorm), as a 1-process run does;
        # the engine gives every process rank 0's running statistics before the evaluation (engine._validate).
        v_loss, v_count, confusion = _evaluate_sums(model, loader, ctx.device, ctx.bf16)
        sums = ctx.sum([v_loss, v_count, *confusion.reshape(-1).tolist()])
        k = confusion.shape[0]
        metrics = segmentation_metrics(np.asarray(sums[2:]).reshape(k, k))
        return {
            "val_loss": sums[0] / max(sums[1], 1),
            "mean_iou": metrics["mean_iou"],
            "pixel_accuracy": metrics["pixel_accuracy"],
            "per_class_iou": metrics["per_class_iou"],
        }

    def epoch_summary(self, record: dict[str, Any]) -> str:
        return (f"val loss {record['val_loss']:.4f}, mean IoU {record['mean_iou']:.4f}, pixel accuracy "
                f"{record['pixel_accuracy']:.4f}, {record['seconds']:.1f} s")

    def result(self, records: list[dict[str, Any]], best_epoch: int) -> dict[str, Any]:
        best = next((r for r in records if r["epoch"] == best_epoch), None)
        return {"task": "segmentation", "best_mean_iou": best["mean_iou"] if best else None, "best_record": best}


def carve_val_split(data: str, pairs: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """``--val-split`` for folders of image pairs (segmentation, depth) without ``val/``: ``(train, val)``, the
    validation pairs ``round(fraction * n)`` of ``pairs`` (at least one, never all) drawn by ``seed``
    (:func:`pvtv2.data.folders.split_samples`), each part in name order."""
    if os.path.isdir(os.path.join(data, "val")):
        raise ValueError(
            f"--val-split carves a validation split from train/, but {data!r} has its own val/ folder; leave out "
            "--val-split to use it"
        )
    if len(pairs) < 2:
        raise ValueError(f"--val-split needs at least 2 training images to split, {data!r} has {len(pairs)}")
    train, val = split_samples([(pair, None) for pair in pairs], fraction, seed)
    logger.info("validation split: %d of the %d training images (--val-split %g, seed %d)",
                len(val), len(pairs), fraction, seed)
    return [pair for pair, _ in train], [pair for pair, _ in val]


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (its config)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
