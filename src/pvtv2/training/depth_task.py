"""The depth task: folders ``DIR/{train,val}/{images,depth}`` (RGB images and 16-bit depth PNGs, ``--depth-scale``
units per metre, 0 = no measurement), GLPN's head and scale-invariant log loss, the standard metrics of
:mod:`pvtv2.training.depth`; ``best/`` is the epoch with the highest validation delta < 1.25."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..data.depth import DepthFolder, read_depth_png
from ..data.processing import PvtV2ImageProcessor
from ..models.config import PvtV2Config
from ..models.depth import PvtV2ForDepthEstimation, silog_loss
from .config import TrainConfig
from .depth import DEPTH_METRICS, depth_metric_sums, eigen_crop_mask, finish_depth_metrics
from .engine import RunContext, Task, new_architecture
from .segmentation import carve_val_split

__all__ = ["DepthTask", "build_depth_model"]

logger = logging.getLogger(__name__)

# The same tiny encoder as the segmentation example's, for quick runs (`--model tiny`).
TINY_DEPTH: dict[str, Any] = dict(
    depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 128, 160], num_attention_heads=[1, 2, 4, 5], mlp_ratios=[4, 4, 4, 4],
    sr_ratios=[4, 2, 1, 1], decoder_hidden_size=64, drop_path_rate=0.0,
)
# Depths below this are no measurement for the metrics (GLPN's and BTS's evaluation: 1e-3 m).
MIN_DEPTH = 1e-3

_SCORE_PANEL = ("validation", [("delta1", (44, 160, 44)), ("abs_rel", (214, 39, 40))], (0.0, 1.0))


def build_depth_model(cfg: TrainConfig) -> PvtV2ForDepthEstimation:
    """``tiny`` or a preset name: a new model; a config.json: that architecture, new; anything else: a checkpoint
    (classification, depth) whose encoder (and GLPN head, when it has one) to fine-tune."""
    overrides: dict[str, Any] = {"image_size": cfg.image_size}
    if cfg.drop_path is not None:
        overrides["drop_path_rate"] = cfg.drop_path
    if cfg.max_depth is not None:
        overrides["max_depth"] = cfg.max_depth
    config = new_architecture(cfg.model, TINY_DEPTH, **overrides)
    if config is not None:
        return PvtV2ForDepthEstimation(config)
    return PvtV2ForDepthEstimation.from_pretrained(cfg.model, **overrides)


class DepthTask(Task):
    """Monocular depth: GLPN's scale-invariant log loss on the pixels with depth, AbsRel / SqRel / RMSE / RMSE log /
    log10 / delta metrics (optionally inside Eigen's NYU crop, ``--nyu-crop``)."""

    model_class = PvtV2ForDepthEstimation
    best_metric = "delta1"
    best_state_key = "best_delta1"
    intro = "depth: %d training images"
    score_panel = _SCORE_PANEL

    def architecture(self) -> PvtV2Config | None:
        config = new_architecture(self.cfg.model, TINY_DEPTH, image_size=self.cfg.image_size)
        return config if config is not None else super().architecture()

    def load_data(self) -> None:
        cfg = self.cfg
        if not cfg.data:
            raise ValueError("a dataset folder is needed (--data DIR with DIR/{train,val}/images and DIR/{train,val}/depth)")
        if cfg.image_size % 32:
            raise ValueError(f"--image-size must be a multiple of 32 for depth (GLPN's decoder), got {cfg.image_size}")
        self.classes = ["depth"]
        self.train_set = DepthFolder(cfg.data, "train", cfg.image_size, depth_scale=cfg.depth_scale, hflip=cfg.hflip,
                                     seed=cfg.seed)
        if cfg.val_split is None:
            self.val_set = DepthFolder(cfg.data, "val", cfg.image_size, depth_scale=cfg.depth_scale)
        else:
            # Evaluated as a val/ folder would be (resized, not flipped); the images come out of train/.
            self.val_set = DepthFolder(cfg.data, "train", cfg.image_size, depth_scale=cfg.depth_scale)
            self.train_set.pairs, self.val_set.pairs = carve_val_split(cfg.data, self.train_set.pairs, cfg.val_split,
                                                                       cfg.seed)
        # Read until the first map with a measurement (the first, as a rule). Without any, every metric was NaN, no
        # epoch beat the start and best/ was never written while the run named it.
        if not any((read_depth_png(path, cfg.depth_scale) > MIN_DEPTH).any() for _, path in self.val_set.pairs):
            raise ValueError(
                f"no validation depth map in {cfg.data!r} holds a measurement (every pixel is 0): there is nothing to "
                f"evaluate the depth metrics on"
            )

    def processor(self) -> PvtV2ImageProcessor:
        # GLPN's preprocessing, as DepthFolder and pvtv2 depth do it: resized and rescaled to [0, 1], not normalised.
        size = self.cfg.image_size
        return PvtV2ImageProcessor(size={"height": size, "width": size}, do_normalize=False)

    def new_model(self) -> nn.Module:
        model = build_depth_model(self.cfg)
        self._check_depth_in_range(float(model.config.max_depth))
        return model

    def _check_depth_in_range(self, max_depth: float) -> None:
        """Some validation pixel, as evaluated (resized, inside Eigen's crop with --nyu-crop), must lie in the metrics'
        range (MIN_DEPTH, max_depth): without one every metric was NaN, no epoch beat the start, and the run ended
        with exit 0 naming a best/ it never wrote (data deeper than the model's range: KITTI's at the default 10 m)."""
        cfg = self.cfg
        in_range = False  # a pixel in the range outside Eigen's crop: then the crop is the cause, not max_depth
        measured = False  # a measured pixel once resized: sparse maps (LiDAR's) may keep none at a small size
        for _, depth in self.val_set:  # read until the first such pixel (in the first map, as a rule)
            measured = measured or bool((depth > MIN_DEPTH).any())
            valid = (depth > MIN_DEPTH) & (depth < max_depth)
            in_range = in_range or bool(valid.any())
            if cfg.nyu_crop:
                valid &= eigen_crop_mask(*depth.shape)
            if bool(valid.any()):
                return
        advice = ("every pixel in that range lies outside the crop: leave out --nyu-crop (Eigen's crop of NYU's "
                  "frames)" if in_range else
                  "pass a --max-depth above the data's depths (e.g. 80 for KITTI)" if measured else
                  "resized to that size (nearest neighbour) the sparse maps keep no measured pixel: pass a larger "
                  "--image-size")
        raise ValueError(
            f"no validation pixel in {cfg.data!r} has a depth the metrics count, between {MIN_DEPTH:g} m and the "
            f"model's max_depth {max_depth:g} m" + (" inside Eigen's crop (--nyu-crop)" if cfg.nyu_crop else "")
            + f" at --image-size {cfg.image_size}: every metric would be NaN; {advice}"
        )

    def default_lr(self, global_batch: int) -> float:
        return 1e-4 * global_batch / 16  # GLPN's peak learning rate, scaled linearly from batch 16

    def training_loss(self, model: nn.Module, batch: Any, ctx: RunContext) -> torch.Tensor:
        pixels, depth = batch
        with ctx.autocast():
            # return_dict: a --model folder's config.json may say false (a tuple has no .logits)
            predicted = model(pixels, return_dict=True).predicted_depth
        return silog_loss(predicted.float(), depth)

    def evaluate(self, model: nn.Module, loader: Any, ctx: RunContext) -> dict[str, Any]:
        model.eval()
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        max_depth = float(inner.config.max_depth)
        loss_sum = count = 0.0
        measured = beyond = 0.0  # pixels with depth, and those at or beyond max_depth among them
        sums = [0.0] * (len(DEPTH_METRICS) + 2)
        with torch.no_grad():
            for pixels, depth in loader:
                pixels, depth = pixels.to(ctx.device), depth.to(ctx.device)
                with ctx.autocast():
                    predicted = model(pixels, return_dict=True).predicted_depth
                predicted = predicted.float()
                if bool((depth > 0).any()):  # a batch without any measured pixel has no loss to average in
                    loss_sum += float(silog_loss(predicted, depth)) * len(depth)
                    count += len(depth)
                batch = depth_metric_sums(predicted.cpu(), depth.cpu(), min_depth=MIN_DEPTH, max_depth=max_depth,
                                          nyu_crop=self.cfg.nyu_crop)
                sums = [a + b for a, b in zip(sums, batch)]
                measured += float((depth > MIN_DEPTH).sum())
                beyond += float((depth >= max_depth).sum())
        totals = ctx.sum([loss_sum, count, measured, beyond, *sums])
        metrics = finish_depth_metrics(totals[4:])
        share = totals[3] / totals[2] if totals[2] else 0.0
        if share > 0 and not getattr(self, "_warned_max_depth", False):
            # The model cannot predict them (sigmoid x max_depth) and the metrics leave them out, as BTS's and GLPN's
            # evaluation cap: on data deeper than the cap (KITTI's 80 m against the default 10) the numbers would
            # describe the near pixels only, without a word.
            logger.warning(
                "%.1f%% of the validation pixels with depth are %g m or deeper, the model's max_depth: it cannot "
                "predict them and the metrics leave them out; pass --max-depth (e.g. 80 for KITTI) to cover them",
                100 * share, max_depth,
            )
            self._warned_max_depth = True
        return {"val_loss": totals[0] / max(totals[1], 1), **metrics, "beyond_max_depth": share}

    def epoch_summary(self, record: dict[str, Any]) -> str:
        return (f"val loss {record['val_loss']:.4f}, AbsRel {record['abs_rel']:.4f}, RMSE {record['rmse']:.4f}, "
                f"delta1 {record['delta1']:.4f}, {record['seconds']:.1f} s")

    def result(self, records: list[dict[str, Any]], best_epoch: int) -> dict[str, Any]:
        best = next((r for r in records if r["epoch"] == best_epoch), None)
        return {"task": "depth", "best_delta1": best["delta1"] if best else None, "best_record": best}
