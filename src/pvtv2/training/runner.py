"""``train``: the entry point of a training run, whatever its task."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from .classification import ClassificationTask
from .config import TrainConfig
from .distributed import DistInfo, broadcast, init_distributed, set_deterministic
from .engine import Task, run
from .rundir import prepare_output
from .segmentation import SegmentationTask

__all__ = ["TASK_CLASSES", "train"]

# ``TrainConfig.task`` -> the task that supplies its data, model, loss and metrics.
TASK_CLASSES: dict[str, type[Task]] = {"classification": ClassificationTask, "segmentation": SegmentationTask}


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns a summary: output paths, best and last epoch metrics."""
    cfg.validate()
    info, device = init_distributed(cfg.device)
    # Deterministic kernels for the run only: a caller's process gets its settings back.
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    try:
        set_deterministic()
        return _train(cfg, info, device)
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, info: DistInfo, device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] | None = None
    if info.main:
        cfg, state = prepare_output(cfg)
    cfg, state = broadcast((cfg, state), info)
    cfg.validate()
    # Data. Every process scans (they need the file lists); only rank 0 reports the bad files.
    if not info.main:
        logging.getLogger("pvtv2").setLevel(logging.ERROR)
    task = TASK_CLASSES[cfg.task](cfg)
    return run(task, cfg, state, info, device)
