"""Hostile checks of `pvtv2 train --task detection` saying once which kind of saved detector it fine-tunes (round 29):
under torchrun every process decided the kind, and each said it (rank 0's log only should: the others' loggers are
turned down to errors a few lines later, after the decision).

Held: a resumed run and an explicit --detector say nothing (the kind is already decided), one process says it once
(tests/training/test_detector_log29.py); build_detector called directly on undecided settings says it once.
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

pytest.importorskip("torchvision")

from test_detector_default28 import _saved

from pvtv2.training import TrainConfig, runner
from pvtv2.training.detection import build_detector
from pvtv2.training.distributed import DistInfo

MESSAGE = "the kind of the saved detector"


class _Stop(Exception):
    """Raised just after the runner decided the detector: the rest of the run is not under test."""


def _decisions(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if MESSAGE in r.getMessage()]


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_says_the_saved_kind(tmp_path, monkeypatch, caplog, rank):
    _saved(tmp_path / "ckpt", "fcos")
    cfg = TrainConfig(task="detection", model=str(tmp_path / "ckpt"), image_size=64, output=str(tmp_path / "r"))
    monkeypatch.setattr(runner, "on_main", lambda fn, info, share=False: (cfg, None, None))  # a new run

    def stop(decided, device):
        assert decided.detector == "fcos"  # every process decides the same kind
        raise _Stop

    monkeypatch.setattr(runner, "_check_fp16", stop)
    with caplog.at_level(logging.INFO, logger="pvtv2"), pytest.raises(_Stop):
        runner._train(cfg, DistInfo(rank=rank, world_size=2), torch.device("cpu"), None, None)
    assert len(_decisions(caplog)) == (1 if rank == 0 else 0), _decisions(caplog)


def test_build_detector_on_undecided_settings_says_it_once(tmp_path, caplog):
    _saved(tmp_path / "ckpt", "fcos")
    cfg = TrainConfig(task="detection", model=str(tmp_path / "ckpt"), image_size=64)
    with caplog.at_level(logging.INFO, logger="pvtv2"):
        model = build_detector(cfg, {0: "square"})
    assert model.config.detector == "fcos"
    assert len(_decisions(caplog)) == 1


def test_a_resumed_run_and_an_explicit_detector_say_nothing(tmp_path, caplog):
    from test_detector_default28 import _write

    from pvtv2.cli import main

    _saved(tmp_path / "ckpt", "fcos")
    _write(tmp_path / "d", "train", [[5, 5, 20, 20], [30, 10, 25, 25]])
    _write(tmp_path / "d", "val", [[8, 8, 20, 20]])
    common = ["train", "--task", "detection", "--image-size", "64", "--data", str(tmp_path / "d"), "--batch-size", "2",
              "--no-progress"]
    runs = {
        "first": ["--model", str(tmp_path / "ckpt"), "--epochs", "1", "--output", str(tmp_path / "r")],
        "resumed": ["--model", str(tmp_path / "ckpt"), "--epochs", "1", "--output", str(tmp_path / "r"), "--resume"],
        "explicit": ["--model", str(tmp_path / "ckpt"), "--detector", "fcos", "--epochs", "1", "--output",
                     str(tmp_path / "e")],
    }
    said = {}
    for name, args in runs.items():
        if name == "resumed":  # the run as if stopped before its first epoch ended: run.json and no state
            shutil.rmtree(tmp_path / "r" / "last")
            shutil.rmtree(tmp_path / "r" / "best", ignore_errors=True)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pvtv2"):
            assert main(common + args) == 0, name
        said[name] = len(_decisions(caplog))
    assert said == {"first": 1, "resumed": 0, "explicit": 0}
