"""The run folder: its files, the checks of ``--resume`` / ``--overwrite``, and the atomic checkpoints.

Every epoch writes ``OUT/last`` (and ``OUT/best`` when the task's score improves): folders that ``from_pretrained``
loads, written to a temporary folder and renamed into place, so a run killed at any moment leaves the previous
complete checkpoint. ``OUT/last/training_state.pt`` holds what ``--resume`` needs to continue exactly where the run
stopped. ``OUT/run.json`` holds the run's settings, ``OUT/metrics.jsonl`` one record per epoch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.processing import PvtV2ImageProcessor
from ..fileio import recover_folder, write_folder_atomically
from .config import TrainConfig

__all__ = [
    "TRAINING_STATE_NAME",
    "RUN_FILE",
    "METRICS_FILE",
    "CURVES_FILE",
    "prepare_output",
    "load_training_state",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

TRAINING_STATE_NAME = "training_state.pt"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
# What --overwrite removes from the output folder: only what a run writes there.
_RUN_ENTRIES = ("last", "best", ".last.tmp", ".last.old", ".best.tmp", ".best.old", RUN_FILE, METRICS_FILE, CURVES_FILE)

def load_training_state(folder: Path) -> dict[str, Any]:
    path = folder / TRAINING_STATE_NAME
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read the training state {str(path)!r}: {err}") from err


def prepare_output(cfg: TrainConfig) -> tuple[TrainConfig, dict[str, Any] | None]:
    """Check the output folder against --resume / --overwrite; return the run's settings and, when resuming from a
    completed epoch, its training state."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {str(out)!r} is a file, not a folder")
    recover_folder(out / "last")
    recover_folder(out / "best")
    run_file = out / RUN_FILE
    state_file = out / "last" / TRAINING_STATE_NAME
    has_run = run_file.is_file()
    if cfg.overwrite:
        for name in _RUN_ENTRIES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        return cfg, None
    if cfg.resume:
        if not has_run:
            raise FileNotFoundError(f"nothing to resume in {str(out)!r}: it holds no {RUN_FILE} of a training run")
        stored = json.loads(run_file.read_text(encoding="utf-8"))
        merged = _merge_resumed(cfg, stored)
        state = load_training_state(out / "last") if state_file.is_file() else None
        return merged, state
    if has_run:
        state = load_training_state(out / "last") if state_file.is_file() else None
        stored = json.loads(run_file.read_text(encoding="utf-8"))
        if state is not None and state["epoch"] >= stored["epochs"]:
            raise FileExistsError(
                f"{str(out)!r} holds a finished training run ({stored['epochs']} epochs); pass --overwrite to replace "
                f"it, or choose another --output"
            )
        done = 0 if state is None else state["epoch"]
        raise FileExistsError(
            f"{str(out)!r} holds an unfinished training run ({done} of {stored['epochs']} epochs done); pass --resume "
            f"to continue it or --overwrite to start again"
        )
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(
            f"--output {str(out)!r} is not empty and holds no training run; choose an empty or new folder"
        )
    return cfg, None


def _merge_resumed(cfg: TrainConfig, stored: dict[str, Any]) -> TrainConfig:
    """The stored run's settings, with this invocation's execution settings; differing run settings are ignored
    (changing them mid-run would break the equality with an uninterrupted run) and said so."""
    defaults = TrainConfig()
    for key, value in stored.items():
        given = getattr(cfg, key, None)
        if given not in (value, getattr(defaults, key, None), "") and key in cfg.run_fields():
            logger.warning("--resume: ignoring %s=%r; the run continues with %s=%r", key, given, key, value)
    fields = {k: v for k, v in stored.items() if k in cfg.run_fields()}
    return dataclasses.replace(cfg, **fields)


def save_checkpoint(
    folder: Path, model: nn.Module, image_size: int, state: dict[str, Any] | None = None
) -> None:
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        PvtV2ImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(tmp)
        if state is not None:
            torch.save(state, tmp / TRAINING_STATE_NAME)

    write_folder_atomically(folder, write)
