"""`pvtv2 eval --data X` where X is no folder: each task names what X is (a FIFO, a file) instead of "not found", in
one line with exit status 2, and never opens a FIFO (which would block until a writer comes): run in a subprocess
with a timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_SHALLOW

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, PvtV2ForSemanticSegmentation

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LABELS = {0: "a", 1: "b", 2: "c"}


def _model(task: str, folder: Path) -> Path:
    config = PvtV2Config(**TINY_SHALLOW, id2label=LABELS)
    if task == "classification":
        PvtV2ForImageClassification(config).save_pretrained(folder)
    elif task == "segmentation":
        PvtV2ForSemanticSegmentation(config.replace(decoder_hidden_size=32)).save_pretrained(folder)
    else:
        pytest.importorskip("torchvision")
        pytest.importorskip("pycocotools")
        from pvtv2.models.detection import PvtV2ForObjectDetection

        PvtV2ForObjectDetection(config.replace(detector="fcos", fpn_channels=32)).save_pretrained(folder)
    return folder


def _eval(task: str, model: Path, data: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pvtv2", "eval", "--task", task, "--model", str(model), "--data",
                           str(data), "--no-progress"], env=ENV, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
@pytest.mark.parametrize("task", ["classification", "segmentation", "detection"])
def test_eval_names_a_fifo_given_as_data(tmp_path, task):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result = _eval(task, _model(task, tmp_path / "model"), fifo)
    lines = result.stderr.strip().splitlines()
    # The loader logs at INFO on stderr before the data is looked at; the error is the last line, and the only one.
    errors = [line for line in lines if not line.startswith("INFO ")]
    assert result.returncode == 2 and errors == [
        f"pvtv2 eval: error: dataset folder {str(fifo)!r} is a FIFO (named pipe), not a folder"], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_eval_names_a_file_given_as_data_and_still_says_not_found(tmp_path):
    model = _model("classification", tmp_path / "model")
    text = tmp_path / "data.txt"
    text.write_text("not a dataset\n")
    result = _eval("classification", model, text)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"pvtv2 eval: error: dataset folder {str(text)!r} is a file, " \
                                                     "not a folder"
    result = _eval("classification", model, tmp_path / "gone")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        f"pvtv2 eval: error: dataset folder not found: {str(tmp_path / 'gone')!r}"
