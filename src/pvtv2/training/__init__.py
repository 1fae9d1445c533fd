"""Training: one engine (run folder, resume, DDP, schedule, accumulation, checkpoints, metrics, curves) and one
module per task that plugs into it (``classification``, ``segmentation``)."""

from .config import TrainConfig
from .runner import check_config, train

__all__ = ["TrainConfig", "check_config", "train"]
