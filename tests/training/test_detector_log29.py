"""`pvtv2 train --task detection` without --detector on a saved detector says once which kind it took (the settings'
check, which builds a task before the run, said it a second time)."""

from __future__ import annotations

import logging

from test_detector_default28 import _saved, _write

from pvtv2.cli import main


def test_saved_kind_is_announced_once(tmp_path, caplog):
    _saved(tmp_path / "ckpt", "fcos")
    _write(tmp_path / "d", "train", [[5, 5, 20, 20], [30, 10, 25, 25]])
    _write(tmp_path / "d", "val", [[8, 8, 20, 20]])
    args = ["train", "--task", "detection", "--model", str(tmp_path / "ckpt"), "--image-size", "64", "--data",
            str(tmp_path / "d"), "--epochs", "1", "--batch-size", "2", "--no-progress", "--output", str(tmp_path / "r")]
    with caplog.at_level(logging.INFO, logger="pvtv2"):
        assert main(args) == 0
    lines = [r.getMessage() for r in caplog.records if "the kind of the saved detector" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("--detector fcos:")
