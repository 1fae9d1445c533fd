"""Training ``PvtV2ForObjectDetection`` on COCO-format data, scored by COCO box AP (and mask AP for ``mask_rcnn``).

This is the ``task="detection"`` task of :func:`pvtv2.training.train` (``pvtv2 train --task detection --detector
...``): the run folder, ``--resume``, checkpoints, seeding, sharding, DDP, bf16 and accumulation are the engine's
(:mod:`pvtv2.training.engine`). :class:`DetectionTask` supplies the data (:class:`pvtv2.data.coco.CocoDetection`:
lists of images at their own sizes and per-image target dicts), the model, the loss of a batch (the sum of the
detector's losses, as torchvision's and mmdetection's training scripts take it) and the evaluation (pycocotools'
COCOeval on the whole validation split, the processes' detections gathered first). ``best/`` is the epoch with
the highest box AP.

The defaults (:data:`DETECTION_RECIPE`) are the original repository's 1x recipe: AdamW at 1e-4 for a global batch
of 16 (scaled linearly to other batches, as the other tasks' rates are), weight decay 1e-4, 12 epochs with the
rate x0.1 after epochs 8 and 11 (scaled to ``--epochs``: after 24 and 33 for the 3x recipe's 36), mmdetection's
linear warmup from 0.001 of the rate over the first 500 optimizer steps (at most a fifth of a short run), shorter
side 800 (``--image-size``), longer at most 1333 in proportion, horizontal flips. ``--multiscale`` draws the
shorter side of each training image from the 3x recipe's 480 ... 800 (step 32), scaled to ``--image-size``.

Batches are grouped by aspect ratio, as mmdetection's and torchvision's samplers group them: each training batch
holds only wide (width >= height) or only tall images, except the epoch's last one or two made of what is left over
(:func:`pvtv2.data.coco.grouped_batches`, on the sizes the annotation file states), so that padding a batch to its
largest image wastes little. Difference from mmdetection, on purpose: weight decay skips biases and norm scales (as
every pvtv2 task's does).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..data.coco import CocoDetection, coco_evaluate, collate_detection, detections_to_coco, grouped_batches
from ..data.processing import PvtV2ImageProcessor
from ..models.config import PvtV2Config, is_preset_name
from ..models.detection import PvtV2ForObjectDetection
from ..models.labels import has_generic_labels
from .config import DETECTORS, TrainConfig
from .distributed import DistInfo
from .engine import RunContext, Schedule, Task, new_architecture, permute_rows_, reconcile_classes

__all__ = [
    "DETECTION_RECIPE",
    "EXAMPLE_DATA",
    "EXAMPLE_RECIPE",
    "example_config",
    "TINY_DETECTION",
    "DetectionTask",
    "build_detector",
    "detection_sizes",
    "detection_warmup",
    "resolve_detector",
    "step_schedule",
]

logger = logging.getLogger(__name__)

# The 1x recipe of the original repository's detection configs (see the module docstring).
DETECTION_RECIPE: dict[str, Any] = dict(
    image_size=800, epochs=12, batch_size=2, lr=None, min_lr=0.0, warmup_steps=500, weight_decay=1e-4, hflip=0.5,
)

# ``--model tiny``: a small encoder and a 64-channel FPN that train on two CPU cores in minutes (the example's).
TINY_DETECTION: dict[str, Any] = dict(
    depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 128, 160], num_attention_heads=[1, 2, 4, 5], mlp_ratios=[4, 4, 4, 4],
    sr_ratios=[4, 2, 1, 1], drop_path_rate=0.0, fpn_channels=64,
)

# The offline example's settings (``pvtv2 demo-det``): a small FCOS from scratch on 96 px digits, about 2250 steps,
# a few minutes on two CPU cores (docs/detection.md, "Measured"). FCOS, not RetinaNet: from scratch it scored far more
# in the same steps (anchor-free: its positives are the locations near a digit's centre, not anchors of fixed sizes
# that few digits match). The 1x recipe's rate and warmup are for pretrained encoders and batch 16, far too
# gentle for a random one.
EXAMPLE_RECIPE: dict[str, Any] = dict(
    model="tiny", detector="fcos", image_size=96, epochs=12, batch_size=8, lr=1e-3, min_lr=0.0, warmup_steps=50,
    weight_decay=1e-4, hflip=0.0,  # no flips: a mirrored 2, 3, 4, 5, 6, 7 or 9 is no digit
)
# The example's data: training and validation images (``pvtv2 demo-det --train``, ``--val``).
EXAMPLE_DATA: dict[str, int] = dict(train=1500, val=150)

_WARMUP_RATIO = 0.001  # mmdetection's warmup_ratio: the first step's rate as a fraction of the peak
_MILESTONES_1X = (8, 11)  # the rate is multiplied by 0.1 after these epochs of 12

_SCORE_PANEL = ("validation", [("box_ap", (44, 160, 44)), ("box_ap50", (214, 39, 40))], (0.0, 1.0))


def detection_sizes(image_size: int, multiscale: bool = False) -> dict[str, Any]:
    """The detector's resize settings for ``--image-size S``: shorter side S, longer at most S x 1333 / 800; with
    ``multiscale`` the shorter side of each training image is drawn from the 3x recipe's 480 ... 800 (step 32)
    scaled to S (evaluation uses S, the list's last)."""
    max_size = round(image_size * 1333 / 800)
    if not multiscale:
        return {"min_size": image_size, "max_size": max_size}
    sizes = sorted({max(1, round(image_size * s / 800)) for s in range(480, 801, 32)})
    return {"min_size": sizes, "max_size": max_size}


def detection_warmup(schedule: Schedule) -> int:
    """The warmup of :func:`step_schedule`: ``schedule.warmup_steps``, but at most a fifth of the run."""
    return min(schedule.warmup_steps, schedule.total_steps // 5)


def step_schedule(schedule: Schedule, epochs: int) -> Callable[[int], float]:
    """The learning rate of each optimizer step as a fraction of the peak: mmdetection's linear warmup (from
    0.001) over ``schedule.warmup_steps`` (at most a fifth of the run: :func:`detection_warmup`), then x0.1 after epochs
    8 and 11 of 12, scaled to ``epochs``."""
    warmup = detection_warmup(schedule)
    if warmup < schedule.warmup_steps:
        logger.info("warmup shortened from %d to %d steps (a fifth of this %d-step run)", schedule.warmup_steps, warmup,
                    schedule.total_steps)
    milestones = [round(m * epochs / 12) * schedule.steps_per_epoch for m in _MILESTONES_1X]

    def factor(step: int) -> float:
        decay = 0.1 ** sum(step >= m for m in milestones)
        if step < warmup:
            return decay * (1.0 - (1.0 - step / warmup) * (1.0 - _WARMUP_RATIO))
        return decay

    return factor


def example_config(**changes: Any) -> TrainConfig:
    """A :class:`TrainConfig` for the detection example: :data:`EXAMPLE_RECIPE`, overridden by ``changes``."""
    return TrainConfig(**{**EXAMPLE_RECIPE, **changes, "task": "detection"})


def resolve_detector(cfg: TrainConfig, announce: bool = True) -> TrainConfig:
    """``cfg`` with ``detector`` decided: the one given, else the kind of the saved detector ``--model`` names (its
    config.json's, or the heads a weights file without one holds, so that fine-tuning a saved FCOS needs no
    ``--detector fcos``), else retinanet (a new detector: a preset, ``tiny``, a classification checkpoint or an
    encoder file). ``announce``: log the choice of a saved kind (the runner's call does; the settings' check, which
    builds a task before, does not, so the run's log says it once)."""
    if cfg.detector is not None:
        return cfg
    saved = saved_detector_kind(cfg.model)
    if saved is not None and announce:
        logger.info("--detector %s: the kind of the saved detector %s", saved, cfg.model)
    return dataclasses.replace(cfg, detector=saved or "retinanet")


def saved_detector_kind(model: str) -> str | None:
    """The ``detector`` field of the config.json ``model`` names (a folder, a JSON file, a hub id in the cache), or
    for a weights file or folder without a config.json the kind its tensors hold; None: a preset, ``tiny``, a
    configuration without a detector, or weights without a detector's heads. A config.json naming an unknown kind
    is a ``ValueError`` naming it."""
    if (model.lower() == "tiny" and not os.path.exists(model)) or is_preset_name(model):
        return None
    if os.path.isdir(model) or (os.path.isfile(model) and not model.lower().endswith(".json")):
        # A weights file, or a folder without a config.json: the loader reads its settings off the tensors, and so
        # is the kind read here (retinanet was assumed, and refused for an FCOS's or an R-CNN's heads).
        from ..weights.loading import locate_checkpoint

        try:
            config_path, weights = locate_checkpoint(model, None, None)
        except Exception:  # noqa: BLE001 - no weights there: the load that follows says so in its own words
            return None
        if config_path is None:
            return _weights_detector_kind(os.fspath(weights))
    try:
        config = PvtV2Config.from_pretrained(model)
    except Exception:  # noqa: BLE001 - no config.json to read: whatever --model is, from_pretrained reports it later
        return None
    kind = getattr(config, "detector", None)
    if kind is None or kind == "":  # no kind recorded: a new detector's default, as the model reads it
        return None
    if kind not in DETECTORS:
        # Named here: "unknown detector 'bogus'" spoke of a --detector the user never typed.
        raise ValueError(f"the config.json of {model!r} names the detector {kind!r}, which is none of "
                         f"{', '.join(DETECTORS)}; correct its \"detector\" field, or pass --detector")
    return kind


def _weights_detector_kind(path: str) -> str | None:
    """The kind of detector a weights file without a config.json holds, read off its tensors' names (None: none, or
    a file that cannot be read, which the load reports)."""
    from ..weights.files import read_checkpoint
    from ..weights.layouts import detect_layout, to_canonical
    from ..weights.loading import detector_kind

    try:
        state, _ = read_checkpoint(path)
        return detector_kind(to_canonical(state, detect_layout(state)))
    except Exception:  # noqa: BLE001 - the load that follows reports an unreadable file with its own words
        return None


def build_detector(cfg: TrainConfig, id2label: dict[int, str]) -> PvtV2ForObjectDetection:
    """``tiny``, a preset name or a config.json: a new detector (random encoder); anything else: a checkpoint whose
    encoder (any classification layout, an mmdetection backbone) or whole detector (same classes) to fine-tune.
    ``cfg.detector`` None: :func:`resolve_detector`'s choice."""
    cfg = resolve_detector(cfg)
    settings: dict[str, Any] = {
        "detector": cfg.detector, "id2label": id2label, **detection_sizes(cfg.image_size, cfg.multiscale),
    }
    if cfg.drop_path is not None:
        settings["drop_path_rate"] = cfg.drop_path
    config = new_architecture(cfg.model, TINY_DETECTION, **settings)
    if config is not None:
        return PvtV2ForObjectDetection(config)
    names = _detector_classes(cfg.model)
    try:
        model = PvtV2ForObjectDetection.from_pretrained(cfg.model, **settings)
    except ValueError as err:
        # A saved detector of another kind than --detector asked for failed with a list of key names that never
        # said so.
        # The kind of a saved folder's config.json, or of a lone weights file's tensors (which have no names).
        saved = saved_detector_kind(cfg.model)
        if saved is None or saved == cfg.detector:
            raise
        raise ValueError(f"{cfg.model!r} is a saved {saved} detector, --detector is {cfg.detector}: leave --detector "
                         f"out (or pass --detector {saved}) to fine-tune it ({err})") from None
    classes = [id2label[i] for i in range(len(id2label))]
    new = set(getattr(model, "newly_initialized_keys", ()))
    # Any class-sized layer the checkpoint provided means its classes: a Faster R-CNN fine-tuned as a Mask R-CNN
    # loads its box predictor with a new mask predictor, and counting that as untrained kept the box predictor's rows
    # under the data's names (neither permuted nor refused).
    loaded = [p for p in model.classifier_prefix if not any(k.startswith(p) for k in new)]
    if names is None or not loaded or len(names) != len(classes) or names == classes:
        return model
    # A saved detector with as many classes: from_pretrained kept its class-sized layers under the data's names,
    # whatever they were (as segmentation did): the same classes in another order started from layers whose rows
    # meant other classes, other classes from layers meaning something else, and --replace-head did nothing.
    decision = reconcile_classes(
        names, classes, replace_head=cfg.replace_head, generic=has_generic_labels(dict(enumerate(names))),
        new_layers="new class-sized layers", names_from="the annotation files' categories",
    )
    if decision == "replace":
        for prefix in model.classifier_prefix:
            model.init_new_module(model.get_submodule(prefix.rstrip(".")))
        logger.info("--replace-head: new class-sized layers for the dataset's classes %s", classes[:10])
    elif decision == "take":
        logger.warning("the checkpoint's classes have no names (%s...); taking the dataset's", names[:3])
    else:
        _permute_class_layers(model, decision)
        logger.info("the dataset lists the checkpoint's classes in another order: class-sized layers permuted")
    return model


def _detector_classes(source: str) -> list[str] | None:
    """The class names of a saved detector's config.json (a ``save_pretrained`` folder), or None: not a detector's
    (its class-sized layers, if any, are not loaded into a detector)."""
    try:
        config = PvtV2Config.from_pretrained(source)
    except Exception:  # noqa: BLE001 - no config.json to read (a weights file, a hub id offline): left to from_pretrained
        return None
    if getattr(config, "detector", None) is None:
        return None
    return [config.id2label[i] for i in range(config.num_labels)]


def _permute_class_layers(model: PvtV2ForObjectDetection, order: list[int]) -> None:
    """Reorder the class-sized layers so that the data's class ``j`` is the checkpoint's class ``order[j]``:
    RetinaNet's and FCOS's ``cls_logits`` (anchor-major, ``a * K + k``), the R-CNNs' class scores, box deltas (4 per
    class) and mask logits, whose background class 0 stays first."""
    k = len(order)
    if model.config.detector in ("retinanet", "fcos"):
        layer = model.detector.head.classification_head.cls_logits
        anchors = layer.out_channels // k
        rows = [[a * k + order[j] for j in range(k)] for a in range(anchors)]
        layers = [(layer, [r for block in rows for r in block])]
    else:
        classes = [0] + [1 + o for o in order]
        predictor = model.detector.roi_heads.box_predictor
        layers = [(predictor.cls_score, classes), (predictor.bbox_pred, [4 * c + i for c in classes for i in range(4)])]
        if model.config.detector == "mask_rcnn":
            layers.append((model.detector.roi_heads.mask_predictor.mask_fcn_logits, classes))
    for layer, index in layers:
        permute_rows_(layer, index)


class DetectionTask(Task):
    """COCO-format data ``DIR/annotations/instances_{train,val}.json`` + ``DIR/{train,val}/``, the detector's summed
    losses, COCOeval's box AP (and mask AP); ``best/`` is the epoch with the highest box AP."""

    model_class = PvtV2ForObjectDetection
    best_metric = "box_ap"
    best_state_key = "best_box_ap"
    intro = "detection: %d training images"
    score_panel = _SCORE_PANEL
    collate = staticmethod(collate_detection)

    def __init__(self, cfg: TrainConfig) -> None:
        # --detector left out: the saved detector's kind, else retinanet (the runner decides it before run.json is
        # written; a task built directly decides it here).
        super().__init__(resolve_detector(cfg, announce=False))

    def architecture(self) -> PvtV2Config | None:
        config = new_architecture(self.cfg.model, TINY_DETECTION, image_size=self.cfg.image_size)
        return config if config is not None else super().architecture()

    def processor(self) -> PvtV2ImageProcessor:
        # The detector resizes (shorter side min_size) and normalises itself: it takes RGB images in [0, 1].
        return PvtV2ImageProcessor(do_resize=False, do_normalize=False)

    def load_data(self) -> None:
        cfg = self.cfg
        if not cfg.data:
            raise ValueError("a dataset folder is needed (--data DIR with DIR/annotations/instances_{train,val}.json)")
        masks = cfg.detector == "mask_rcnn"
        self.train_set = CocoDetection(cfg.data, "train", masks=masks, hflip=cfg.hflip, seed=cfg.seed)
        self.val_set = CocoDetection(cfg.data, "val")
        train, val = self.train_set.annotations, self.val_set.annotations
        if (train.category_ids, train.id2label) != (val.category_ids, val.id2label):
            raise ValueError(
                f"the categories of {os.fspath(val.path)!r} are not those of {os.fspath(train.path)!r} (the same ids "
                f"and names are needed): {dict(zip(val.category_ids, val.id2label.values()))} against "
                f"{dict(zip(train.category_ids, train.id2label.values()))}"
            )
        if not any(not a.get("iscrowd") for a in val.dataset["annotations"]):
            # COCOeval scores -1 (no ground truth) every epoch: no epoch beat the start, best/ was never written, and
            # the run ended saying "best box AP 0.0000 at epoch -1" and naming a best/ that did not exist.
            raise ValueError(
                f"{os.fspath(val.path)!r} lists no objects (no annotation, or crowd regions only): the validation "
                f"split has nothing to score box AP on; annotate its images (or use some of the training ones)"
            )
        self.id2label = dict(train.id2label)
        self.classes = [self.id2label[i] for i in sorted(self.id2label)]
        self.iou_types = ["bbox"]
        if masks:
            if all(a.get("segmentation") for a in val.dataset["annotations"]):
                self.iou_types.append("segm")
            else:
                logger.warning("some annotations of %s have no mask: mask AP is not computed", val.path.name)

    def new_model(self) -> nn.Module:
        model = build_detector(self.cfg, self.id2label)
        # An image too small for the encoder stopped the run at whichever step drew it, naming no file: checked
        # here on the sizes the annotation files list (shapes only; each split at the sizes it is resized to).
        training = model.training
        for data, mode in ((self.train_set, True), (self.val_set, False)):
            model.train(mode)
            checked = set()
            for info in data.images:
                if (info["height"], info["width"]) in checked:
                    continue
                checked.add((info["height"], info["width"]))
                try:
                    model.check_image_sizes([torch.empty(3, info["height"], info["width"], device="meta")])
                except ValueError as err:
                    raise ValueError(f"{os.fspath(data.image_dir / info['file_name'])!r}: {err}") from None
        model.train(training)
        return model

    def default_lr(self, global_batch: int) -> float:
        return 1e-4 * global_batch / 16  # the 1x recipe: 1e-4 at 8 GPUs x 2 images

    def lr_factor(self, schedule: Schedule) -> Callable[[int], float]:
        return step_schedule(schedule, self.cfg.epochs)

    def warmup_steps(self, schedule: Schedule) -> int:
        return detection_warmup(schedule)

    def train_batches(self, epoch: int, info: DistInfo, batch_size: int) -> list[list[int]]:
        # Wide and tall images in separate batches; the batches (not the images) are dealt to the processes, the
        # same number to each. The count is the same in every epoch: each group's full batches, then the leftovers.
        return grouped_batches(self.train_set.aspect_ratios(), batch_size, seed=self.cfg.seed, epoch=epoch,
                               rank=info.rank, world_size=info.world_size)

    def training_loss(self, model: nn.Module, batch: Any, ctx: RunContext) -> torch.Tensor:
        images, targets = batch
        with ctx.autocast():
            losses = model(images, targets)
        # torchvision's detectors return each loss already averaged (over anchors, proposals or images): the
        # batch's loss is their sum, as torchvision's reference scripts and mmdetection take it.
        return sum(value.float() for value in losses.values())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, ctx: RunContext) -> dict[str, Any]:
        model.eval()
        category_ids = self.val_set.annotations.category_ids
        results: list[dict[str, Any]] = []
        for images, targets in loader:
            with ctx.autocast():
                outputs = model([image.to(ctx.device) for image in images])
            results.extend(detections_to_coco(outputs, [t["image_id"] for t in targets], category_ids))
        # COCO's AP is no sum over shards: every process scores all the detections (the same numbers everywhere).
        everything = [entry for part in ctx.gather(results) for entry in part]
        metrics = coco_evaluate(self.val_set.annotations, everything, self.iou_types)
        record: dict[str, Any] = {}
        for iou_type, prefix in (("bbox", "box"), ("segm", "mask")):
            if iou_type in metrics:
                for name, value in metrics[iou_type].items():
                    record[f"{prefix}_{name.lower()}"] = value
        record["detections"] = len(everything)
        return record

    def count(self, batch: Any) -> int:
        return len(batch[0])

    def epoch_summary(self, record: dict[str, Any]) -> str:
        text = f"box AP {record['box_ap']:.4f}, AP50 {record['box_ap50']:.4f}"
        if "mask_ap" in record:
            text += f", mask AP {record['mask_ap']:.4f}"
        return f"{text}, {record['seconds']:.1f} s"

    def result(self, records: list[dict[str, Any]], best_epoch: int) -> dict[str, Any]:
        best = next((r for r in records if r["epoch"] == best_epoch), None)
        return {"task": "detection", "best_box_ap": best["box_ap"] if best else None, "best_record": best}
