"""The pieces of the training recipes that act on the model and the optimizer, independent of the epoch loop.

- :class:`WeightEma`: an exponential moving average of the weights (and buffers) with
  ``torch.optim.swa_utils.AveragedModel`` and ``get_ema_multi_avg_fn``: after every optimizer step
  ``ema = decay * ema + (1 - decay) * weights``, the first update copying the weights: timm's ``ModelEmaV3`` as
  timm's ``train.py`` steps it (``step=1`` copies). DeiT's ``ModelEma`` (and ``ModelEmaV2``) start from the weights
  they are made from, so after n updates they differ from this one by ``decay ** n * (w1 - w0)``.
- :func:`parameter_groups`: AdamW groups with no weight decay on 1-d tensors (biases, norm scales), optional
  layer-wise learning-rate decay over the encoder's blocks (BEiT / ConvNeXt fine-tuning) and a learning-rate
  multiplier for everything outside the encoder (SegFormer's decode head trains at 10x).
- :func:`freeze_stages`: the first k stages of the encoder fixed for fine-tuning (mmdetection's ``frozen_stages``).
- :func:`capped_warmup_steps`: a warmup that never takes more than a fraction of a short run.
- :func:`poly_factor`: mmsegmentation's poly schedule (power 0.9) after a linear warmup.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = [
    "WeightEma",
    "capped_warmup_steps",
    "encoder_layer_ids",
    "freeze_stages",
    "parameter_groups",
    "poly_factor",
]

logger = logging.getLogger(__name__)

# A warmup longer than this fraction of the run is cut to it (the run would end before its peak learning rate).
MAX_WARMUP_FRACTION = 0.25

_STAGE = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.(patch_embedding|blocks\.(\d+)|layer_norm)\.")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _check_unit_interval(name: str, value: Any, *, open_low: bool = True, open_high: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    low_ok = value > 0 if open_low else value >= 0
    high_ok = value < 1 if open_high else value <= 1
    if not (low_ok and high_ok):
        low, high = "(" if open_low else "[", ")" if open_high else "]"
        raise ValueError(f"{name} must be in {low}0, 1{high}, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------- EMA
class WeightEma:
    """The exponential moving average of a model's weights and buffers (``AveragedModel``, ``use_buffers=True``).

    Call :meth:`update` after each optimizer step; :attr:`module` is the averaged model (evaluate it, save it). Its
    :meth:`state_dict` (the averaged module's tensors and the update count) goes into ``training_state.pt`` so that
    a resumed run continues the same average.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = _check_unit_interval("the EMA decay", decay)
        source = _unwrap(model)
        self.averaged = AveragedModel(source, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)
        self.averaged.eval()

    @property
    def module(self) -> nn.Module:
        """The averaged model (same class and config as the trained one)."""
        return self.averaged.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(_unwrap(model))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.averaged.load_state_dict(state)


# --------------------------------------------------------------------------------------------- optimizer groups
def encoder_layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Each parameter's depth for layer-wise decay, and the number of depths below the head.

    The first patch embedding is depth 0; block b of the encoder (counted over all stages) is b + 1; a later stage's
    patch embedding belongs with the block after it, a stage's closing LayerNorm with its last block (with its patch
    embedding in a stage of no blocks). Everything outside the encoder (classifier, decode head) is
    ``num_blocks + 1``.
    """
    config = _unwrap(model).config
    depths = list(config.depths)
    starts = [sum(depths[:s]) for s in range(len(depths))]
    top = sum(depths) + 1
    ids: dict[str, int] = {}
    for name, _ in _unwrap(model).named_parameters():
        match = _STAGE.search(name)
        if match is None:
            ids[name] = top
            continue
        stage, part, block = int(match.group(1)), match.group(2), match.group(3)
        embedding = 0 if stage == 0 else starts[stage] + 1
        if part == "patch_embedding":
            ids[name] = embedding
        elif part == "layer_norm":
            # a stage of no blocks: its norm goes with its patch embedding (starts + 0 would put it below that)
            ids[name] = starts[stage] + depths[stage] if depths[stage] else embedding
        else:
            ids[name] = starts[stage] + int(block) + 1
    return ids, top


def parameter_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    layer_decay: float | None = None,
    head_lr_mult: float = 1.0,
) -> list[dict[str, Any]]:
    """AdamW parameter groups, each with its own ``lr``: ``lr`` times ``layer_decay ** (top - depth)`` for the
    encoder's parameters (:func:`encoder_layer_ids`; no decay without ``layer_decay``), times ``head_lr_mult`` for
    the parameters outside the encoder; weight decay on matrices and kernels, none on 1-d tensors. Frozen
    parameters (``requires_grad=False``) are left out."""
    if layer_decay is not None:
        layer_decay = _check_unit_interval("layer_decay", layer_decay, open_high=False)
    if isinstance(head_lr_mult, bool) or not isinstance(head_lr_mult, (int, float)) or not head_lr_mult > 0:
        raise ValueError(f"head_lr_mult must be a positive number, got {head_lr_mult!r}")
    ids, top = encoder_layer_ids(model)
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, param in _unwrap(model).named_parameters():
        if not param.requires_grad:
            continue
        depth = ids[name]
        scale = 1.0 if layer_decay is None else layer_decay ** (top - depth)
        if depth == top:
            scale *= head_lr_mult
        decays = param.ndim > 1
        key = (scale, decays)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr * scale, "weight_decay": weight_decay if decays else 0.0,
                           "lr_scale": scale}
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0], not k[1]))]


# --------------------------------------------------------------------------------------------- freezing
def freeze_stages(model: nn.Module, stages: int) -> int:
    """Fix the first ``stages`` stages of the encoder (patch embedding, blocks, closing norm): no gradients, and no
    dropout or stochastic depth in them (set to 0, so that ``model.train()`` does not bring noise back into features
    that cannot adapt to it). Returns the number of parameters frozen."""
    config = _unwrap(model).config
    if isinstance(stages, bool) or not isinstance(stages, int) or not 0 <= stages <= len(config.depths):
        raise ValueError(f"stages must be an integer in [0, {len(config.depths)}] (the model's stages), got {stages!r}")
    frozen = 0
    for name, module in _unwrap(model).named_modules():
        match = re.search(r"(?:^|\.)encoder\.layers\.(\d+)$", name)
        if match is None or int(match.group(1)) >= stages:
            continue
        for param in module.parameters():
            param.requires_grad_(False)
            frozen += param.numel()
        for inner in module.modules():
            if isinstance(inner, nn.Dropout):
                inner.p = 0.0
            elif hasattr(inner, "drop_prob"):
                inner.drop_prob = 0.0
    if stages:
        logger.info("froze the first %d encoder stage(s): %d parameters", stages, frozen)
    return frozen


# --------------------------------------------------------------------------------------------- schedules
def capped_warmup_steps(
    warmup_epochs: float, steps_per_epoch: int, total_steps: int, max_fraction: float = MAX_WARMUP_FRACTION
) -> int:
    """The warmup in optimizer steps: ``warmup_epochs`` of them, but at most ``max_fraction`` of the run (logged
    when it is cut), so that a short run still reaches its peak learning rate."""
    if warmup_epochs < 0:
        raise ValueError(f"warmup epochs must be >= 0, got {warmup_epochs!r}")
    asked = round(warmup_epochs * steps_per_epoch)
    cap = math.floor(max_fraction * total_steps)
    if asked > cap:
        logger.info(
            "warmup of %g epoch(s) (%d steps) capped at %d steps, %d%% of this %d-step run, so that it reaches its "
            "peak learning rate",
            warmup_epochs, asked, cap, round(100 * max_fraction), total_steps,
        )
        return cap
    return asked


def poly_factor(step: int, *, total_steps: int, warmup_steps: int = 0, power: float = 0.9, min_ratio: float = 0.0) -> float:
    """mmsegmentation's poly schedule as a factor of the peak learning rate: a linear warmup ``(step + 1) /
    warmup_steps``, then ``(1 - progress) ** power`` (progress over the steps after the warmup) scaled into
    [``min_ratio``, 1]."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * (1.0 - progress) ** power
