"""`pvtv2 train --task depth` on the rendered-rooms example: its refusals, and a short real run (slow) whose logged
metrics equal the saved checkpoint's, recomputed here with NumPy from the PNG files."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from pvtv2.cli import main
from pvtv2.data.processing import PvtV2ImageProcessor
from pvtv2.data.scenes import make_depth_example
from pvtv2.models.depth import PvtV2ForDepthEstimation

SIZE = 64


@pytest.fixture(scope="module")
def rooms(tmp_path_factory) -> Path:
    return make_depth_example(tmp_path_factory.mktemp("rooms"), n_train=16, n_val=6, size=SIZE, seed=3)


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--task", "depth", "--data", str(data), "--model", "tiny", "--output", str(out), "--epochs", "2",
            "--image-size", str(SIZE), "--batch-size", "8", "--lr", "1e-3", "--warmup-epochs", "0", "--no-progress",
            *extra]


BAD = [
    (["--depth-scale", "0"], "--depth-scale"),
    (["--depth-scale", "nan"], "--depth-scale"),
    (["--image-size", "48"], "multiple of 32"),
    (["--mixup", "0.8"], "--mixup is a classification augmentation"),
    (["--val-split", "0.25"], "has its own val/ folder"),
]


@pytest.mark.parametrize(("extra", "named"), BAD, ids=[" ".join(e) for e, _ in BAD])
def test_bad_depth_flags_are_refused_before_anything_is_written(rooms, tmp_path, capsys, extra, named):
    out = tmp_path / "run"
    code = main(_args(rooms, out, *extra))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("pvtv2 train: error: ") and named in lines[0], lines
    assert not out.exists()


def test_depth_flags_are_refused_for_other_tasks(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path), "--output", str(tmp_path / "run"), "--nyu-crop"])
    assert code == 2 and "--nyu-crop applies to --task depth only" in capsys.readouterr().err


def _numpy_metrics(pred: np.ndarray, target: np.ndarray, max_depth: float) -> dict[str, float]:
    valid = (target > 1e-3) & (target < max_depth)
    p, t = np.clip(pred[valid].astype(np.float64), 1e-3, max_depth), target[valid].astype(np.float64)
    ratio = np.maximum(p / t, t / p)
    return {"abs_rel": np.mean(np.abs(p - t) / t), "rmse": np.sqrt(np.mean((p - t) ** 2)),
            "rmse_log": np.sqrt(np.mean((np.log(p) - np.log(t)) ** 2)), "delta1": np.mean(ratio < 1.25)}


@pytest.mark.slow
def test_a_depth_run_with_val_split_evaluates_the_held_out_images(rooms, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(rooms / "train", data / "train")
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="pvtv2"):
        assert main([*_args(data, out, "--val-split", "0.25"), "--epochs", "1"]) == 0
    assert "validation split: 4 of the 16 training images (--val-split 0.25, seed 0)" in caplog.text
    assert "depth: 12 training images" in caplog.text
    assert [json.loads(line)["images"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [4]


@pytest.mark.slow
def test_a_short_depth_run_logs_the_metrics_of_its_checkpoint(rooms, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(rooms, out)) == 0
    assert "trained 2 epochs: val AbsRel" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    model = PvtV2ForDepthEstimation.from_pretrained(out / "last").eval()
    processor = PvtV2ImageProcessor.from_pretrained(out / "last")  # the run's own, saved with the weights
    per_image = []
    for image_path in sorted((rooms / "val" / "images").iterdir()):
        # The depth PNGs are millimetres; the images go in as [0, 1] RGB, unnormalised (GLPN's processor).
        target = np.asarray(PIL.Image.open(rooms / "val" / "depth" / image_path.name), dtype=np.float64) / 1000.0
        pixels = torch.from_numpy(np.asarray(PIL.Image.open(image_path).convert("RGB"), np.float32) / 255.0)
        torch.testing.assert_close(processor(PIL.Image.open(image_path))["pixel_values"][0], pixels.permute(2, 0, 1))
        with torch.no_grad():
            pred = model(pixels.permute(2, 0, 1)[None]).predicted_depth[0].numpy()
        per_image.append(_numpy_metrics(pred, target, model.config.max_depth))
    for name in ("abs_rel", "rmse", "rmse_log", "delta1"):
        assert records[-1][name] == pytest.approx(np.mean([m[name] for m in per_image]), abs=1e-5), name
    assert records[-1]["images"] == 6
