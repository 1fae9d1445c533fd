"""`pvtv2 segment`, `pvtv2 depth`, `pvtv2 train-seg` / `demo-seg`: pictures of the right size and content, and the
synthetic example trained above a mean-IoU floor."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from pvtv2 import PvtV2Config
from pvtv2.cli import main
from pvtv2.dense import LEGEND_WIDTH, PvtV2ForDepthEstimation, PvtV2ForSemanticSegmentation, viridis_lut
from pvtv2.dense_data import EXAMPLE_CLASSES, SegmentationFolder, make_segmentation_example

TINY = dict(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4], decoder_hidden_size=32)


def _image(path, height=50, width=70):
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return np.asarray(PIL.Image.open(path).convert("RGB"))


def test_segment_writes_blend_and_legend(tmp_path, capsys):
    torch.manual_seed(0)
    PvtV2ForSemanticSegmentation(PvtV2Config(**TINY, id2label={0: "sky", 1: "road", 2: "car"})).save_pretrained(tmp_path / "m")
    pixels = _image(tmp_path / "in.png")
    out = tmp_path / "out.png"
    assert main(["segment", str(tmp_path / "in.png"), "--model", str(tmp_path / "m"), "-o", str(out), "--size", "64"]) == 0
    picture = np.asarray(PIL.Image.open(out))
    counts = json.loads(capsys.readouterr().out.split("pixels per class: ")[1])
    assert sum(counts.values()) == 50 * 70 and set(counts) <= {"sky", "road", "car"}
    assert picture.shape == (max(50, 10 + 20 * len(counts)), 70 + LEGEND_WIDTH, 3)  # legend: one row per class found
    # with alpha 0 the image is untouched; the legend area is white apart from swatches and names
    assert main(["segment", str(tmp_path / "in.png"), "-m", str(tmp_path / "m"), "-o", str(out), "--size", "64",
                 "--alpha", "0"]) == 0
    picture = np.asarray(PIL.Image.open(out))
    assert np.array_equal(picture[:50, :70], pixels)
    assert (picture[:, 70:] == 255).mean() > 0.8


def test_depth_writes_image_and_colour_map(tmp_path):
    torch.manual_seed(0)
    PvtV2ForDepthEstimation(PvtV2Config(**TINY)).save_pretrained(tmp_path / "m")
    pixels = _image(tmp_path / "in.png", 64, 96)
    out = tmp_path / "out.png"
    assert main(["depth", str(tmp_path / "in.png"), "--model", str(tmp_path / "m"), "-o", str(out)]) == 0
    picture = np.asarray(PIL.Image.open(out))
    assert picture.shape == (64, 192, 3)
    assert np.array_equal(picture[:, :96], pixels)
    lut = {tuple(c) for c in viridis_lut()}
    right = picture[:, 96:].reshape(-1, 3)
    assert all(tuple(c) in lut for c in right[::37])
    assert tuple(right.min(0)) != tuple(right.max(0))  # stretched over the map's range, not one colour


def test_example_data_is_exact_and_reproducible(tmp_path):
    make_segmentation_example(tmp_path / "a", 3, 2, 48, seed=5)
    make_segmentation_example(tmp_path / "b", 3, 2, 48, seed=5)
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            for kind in ("images", "masks"):
                a = (tmp_path / "a" / split / kind / f"{i:05d}.png").read_bytes()
                assert a == (tmp_path / "b" / split / kind / f"{i:05d}.png").read_bytes()
    labels = json.loads((tmp_path / "a" / "labels.json").read_text())
    assert list(labels.values()) == list(EXAMPLE_CLASSES)
    pixels, mask = SegmentationFolder(tmp_path / "a", "train", 48)[0]
    assert pixels.shape == (3, 48, 48) and mask.shape == (48, 48)
    assert set(mask.unique().tolist()) <= {0, 1, 2, 3} and len(mask.unique()) >= 2


def test_example_trains_above_mean_iou_floor_and_resumes(tmp_path, capsys):
    """A few epochs on the shapes example beat the all-background prediction's mean IoU (about 0.22) clearly."""
    assert main(["demo-seg", "-o", str(tmp_path), "--train", "160", "--val", "40", "--seed", "1"]) == 0
    data, run = tmp_path / "data", tmp_path / "run"
    args = ["train-seg", str(data), "-o", str(run), "--epochs", "3", "--batch-size", "8", "--no-progress"]
    assert main(args) == 0
    assert main(args[:-3] + ["4", "--batch-size", "8", "--no-progress", "--resume"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    best = max(r["mean_iou"] for r in records)
    assert best > MEAN_IOU_FLOOR, records
    model = PvtV2ForSemanticSegmentation.from_pretrained(run / "best")
    assert model.config.id2label == dict(enumerate(EXAMPLE_CLASSES)) and model.config.image_size == (64, 64)


MEAN_IOU_FLOOR = 0.3
