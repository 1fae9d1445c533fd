"""The fast CPU paths, kept apart from the reference model they must equal.

``pvtv2.models.layers.PvtV2Stage.forward`` hands a whole stage over to :func:`stage_forward` at one point when
:func:`applies` says so:

- in eval mode with autograd off, to the inference path of :mod:`pvtv2.fast.cpu` (oneDNN's fused operations,
  optionally on weights packed once by ``pvtv2.fast.freeze(model)``; ``pvtv2.fast.unfreeze(model)`` drops them);
- in training mode with autograd on, to the training path of :mod:`pvtv2.fast.train` (Mix-FFNs in cache-sized
  pieces that recompute their wide hidden activation in the backward pass).

Each module states its contract. ``with pvtv2.fast.fast_path(False): ...`` runs the reference path in a block (this
thread only); ``PVTV2_FAST_PATH=0`` does so for a whole program.
"""

from __future__ import annotations

import torch
from torch import nn

from . import cpu, train
from .cpu import FAST_PATH_ENV, fast_path, fast_path_available, fast_path_enabled, freeze, is_frozen, unfreeze
from .train import mix_ffn, train_applies, train_stage_forward

__all__ = [
    "FAST_PATH_ENV",
    "applies",
    "fast_path",
    "fast_path_available",
    "fast_path_enabled",
    "freeze",
    "is_frozen",
    "mix_ffn",
    "stage_forward",
    "train_applies",
    "train_stage_forward",
    "unfreeze",
]


def applies(x: torch.Tensor, stage: nn.Module | None = None) -> bool:
    """Whether ``stage`` (a ``PvtV2Stage``, called without attention maps) hands over to :func:`stage_forward` on
    ``x``: the training path for a stage in training mode, else the inference path (also when no stage is given)."""
    if stage is not None and stage.training:
        return train.train_applies(stage, x)
    return cpu.applies(x)


def stage_forward(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The stage on ``x`` (B, C_in, H, W) by the fast path for its mode: (B, C, H', W'), channels-last."""
    return train.train_stage_forward(stage, x) if stage.training else cpu.stage_forward(stage, x)
