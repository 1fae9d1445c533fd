"""`pvtv2 train --task detection`: the 1x recipe's schedule against mmdetection's formulas, the flags, and (slow) short
runs on generated COCO data: the loss falls and the AP beats a trivial detector's; a run killed mid-epoch and
resumed ends with the same weights as an uninterrupted one."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

import pvtv2.training  # noqa: E402
from pvtv2.cli import main  # noqa: E402
from pvtv2.data.coco import coco_evaluate, grouped_batches, read_coco_annotations  # noqa: E402
from pvtv2.data.folders import epoch_indices  # noqa: E402
from pvtv2.training.detection import DETECTION_RECIPE, DetectionTask, detection_sizes, resolve_detector, step_schedule  # noqa: E402
from pvtv2.training.engine import KILL_ENV, Schedule  # noqa: E402
from pvtv2.weights.files import read_state_dict  # noqa: E402
from conftest import TINY_SMALL_IMAGES  # noqa: E402


def _schedule(steps_per_epoch: int, epochs: int, warmup: int) -> Schedule:
    total = steps_per_epoch * epochs
    return Schedule(steps_per_epoch, steps_per_epoch, total, min(total, warmup), 1e-4, 0.0)


def test_step_schedule_is_mmdetections_1x():
    # 12 epochs of 1000 steps, 500 warmup steps: mmdetection's `lr_config = dict(policy='step', warmup='linear',
    # warmup_iters=500, warmup_ratio=0.001, step=[8, 11])`, written out: lr(k) = 1 - (1 - k / 500) * (1 - 0.001) in
    # the warmup, then 1, x0.1 from epoch 8 (step 8000), x0.01 from epoch 11 (step 11000).
    f = step_schedule(_schedule(1000, 12, 500), 12)
    assert f(0) == pytest.approx(0.001)
    assert f(250) == pytest.approx(1 - 0.5 * 0.999)
    assert f(499) == pytest.approx(1 - 0.999 / 500)
    assert [f(500), f(7999)] == [1.0, 1.0]
    assert [f(8000), f(10999)] == pytest.approx([0.1, 0.1])
    assert [f(11000), f(11999)] == pytest.approx([0.01, 0.01])
    # 3x (36 epochs): the milestones scale to epochs 24 and 33
    g = step_schedule(_schedule(10, 36, 0), 36)
    assert [g(239), g(240), g(329), g(330)] == pytest.approx([1.0, 0.1, 0.1, 0.01])
    # a short run: the warmup is at most a fifth of it (10 epochs of 4 steps: 8 warmup steps)
    h = step_schedule(_schedule(4, 10, 500), 10)
    assert h(4) == pytest.approx(1 - 0.5 * 0.999) and h(8) == 1.0


def test_start_line_reports_the_warmup_the_schedule_uses(caplog):
    """The start line printed the recipe's warmup after step_schedule had shortened it ("warmup shortened from 8 to 1
    steps", then "8 steps (8 warmup)"); the warmup printed is where the rate first reaches its peak."""
    from pvtv2.training.config import TrainConfig
    from pvtv2.training.distributed import DistInfo
    from pvtv2.training.engine import RunContext, Training, _log_start

    cfg = TrainConfig(task="detection", output="OUT", epochs=2, warmup_steps=8)
    task = DetectionTask(cfg)
    task.train_set, task.val_set, task.classes = [0] * 8, [0] * 2, ["a", "b"]
    schedule = _schedule(4, 2, 8)  # 8 steps, 8 warmup steps asked: a fifth of the run is 1
    factor = task.lr_factor(schedule)
    used = next(step for step in range(schedule.total_steps) if factor(step) == 1.0)
    assert used == 1
    training = Training(None, None, None, None, schedule)
    ctx = RunContext(torch.device("cpu"), False, DistInfo())
    with caplog.at_level("INFO", logger="pvtv2"):
        _log_start(task, cfg, training, None, ctx)
    assert "8 steps (1 warmup)" in caplog.text, caplog.text


@pytest.mark.parametrize(("flags", "steps", "epochs"), [
    ([], 500, 5.0),  # the recipe's 500 steps
    (["--warmup-epochs", "2"], None, 2.0),  # was overridden by the recipe's 500 steps, silently
    (["--warmup-steps", "20"], 20, 5.0),
    (["--warmup-epochs", "2", "--warmup-steps", "20"], 20, 2.0),  # both given: the steps, as documented
])
def test_warmup_epochs_replaces_the_recipes_warmup_steps(monkeypatch, tmp_path, flags, steps, epochs):
    """The detection recipe's warmup is 500 steps, and a warmup in steps overrides one in epochs: `--warmup-epochs 2`
    alone was ignored, the run warming up over min(500, a fifth of the run) steps."""
    seen = []
    monkeypatch.setattr(pvtv2.training, "train", lambda cfg, explicit: seen.append(cfg) or {"rank": 1})
    assert main(["train", "--task", "detection", "--data", str(tmp_path), "--output", str(tmp_path / "run"),
                 *flags]) == 0
    assert (seen[0].warmup_steps, seen[0].warmup_epochs) == (steps, epochs)
    assert DETECTION_RECIPE["warmup_steps"] == 500  # the recipe itself unchanged


def test_image_size_sets_the_shorter_side_and_multiscale_the_3x_range():
    assert detection_sizes(800) == {"min_size": 800, "max_size": 1333}
    assert detection_sizes(800, multiscale=True) == {"min_size": list(range(480, 801, 32)), "max_size": 1333}
    assert detection_sizes(400, multiscale=True) == {"min_size": list(range(240, 401, 16)), "max_size": 666}


@pytest.fixture
def captured(monkeypatch) -> list:
    calls: list = []
    monkeypatch.setattr(pvtv2.training, "train", lambda cfg, *, explicit=None: calls.append(cfg) or {"rank": 1})
    return calls


def test_detection_flags_default_to_the_1x_recipe(captured):
    assert main(["train", "--task", "detection", "--data", "D", "-o", "O", "--detector", "mask_rcnn"]) == 0
    assert main(["train", "--task", "detection", "--data", "D", "-o", "O", "--image-size", "640", "--epochs", "36",
                 "--multiscale", "--warmup-steps", "100"]) == 0
    one, two = captured
    assert (one.detector, one.image_size, one.epochs, one.batch_size, one.weight_decay, one.warmup_steps, one.hflip) == (
        "mask_rcnn", 800, 12, 2, 1e-4, 500, 0.5)
    assert one.lr is None and not one.multiscale
    # no --detector: decided when the run starts (the saved detector's kind, else retinanet; the default model is a
    # preset, so retinanet)
    assert (two.detector, two.image_size, two.epochs, two.multiscale, two.warmup_steps) == (None, 640, 36, True, 100)
    assert resolve_detector(two).detector == "retinanet"
    assert DETECTION_RECIPE["weight_decay"] == 1e-4


def _write_coco(root: Path, split: str, boxes_per_image: list[list[list[int]]], size: int = 64, seed: int = 0,
                categories=({"id": 3, "name": "square"},), sizes: list[tuple[int, int]] | None = None) -> None:
    """White squares on dark noise, one category (id 3: not 0-based on purpose), with the exact boxes and their
    polygons; every image ``size`` x ``size``, or ``sizes`` (width, height) one per image."""
    rng = np.random.default_rng([seed, len(split)])
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for i, boxes in enumerate(boxes_per_image):
        width, height = sizes[i] if sizes is not None else (size, size)
        pixels = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
        for x, y, w, h in boxes:
            pixels[y : y + h, x : x + w] = 255
            polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": categories[0]["id"],
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0, "segmentation": [polygon]})
        PIL.Image.fromarray(pixels).save(root / split / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": width, "height": height})
    data = {"images": images, "annotations": annotations, "categories": list(categories)}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


def _random_boxes(n: int, seed: int, size: int = 64) -> list[list[list[int]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        side = int(rng.integers(20, 31))
        x, y = (int(v) for v in rng.integers(0, size - side, 2))
        out.append([[x, y, side, side]])
    return out


def test_bad_flags_and_data_exit_2_with_one_line_and_write_nothing(tmp_path, capsys):
    _write_coco(tmp_path / "d", "train", _random_boxes(2, 0))
    _write_coco(tmp_path / "d", "val", _random_boxes(1, 1), categories=({"id": 3, "name": "circle"},))
    out = tmp_path / "out"
    cases = [
        (["--detector", "fcos"], "--detector and --multiscale are detection settings: add --task detection"),
        (["--task", "detection", "--warmup-steps", "-1"], "--warmup-steps must be an integer >= 0, got -1"),
        (["--task", "detection", "--image-size", "0"], "--image-size must be a positive integer, got 0"),
        (["--task", "detection", "--model", "tiny", "--image-size", "8"], "--image-size 8 is too small"),
        (["--task", "detection", "--model", "tiny", "--image-size", "64"], "are not those of"),  # val: other category
    ]
    for extra, message in cases:
        code = main(["train", "--data", str(tmp_path / "d"), "--output", str(out), "--no-progress", *extra])
        err = capsys.readouterr().err
        assert code == 2, (extra, err)
        lines = [line for line in err.splitlines() if line.startswith("pvtv2 train: error:")]
        assert len(lines) == 1 and message in lines[0], (extra, err)
        assert not out.exists(), extra


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


TRAIN_ARGS = ["--task", "detection", "--model", "tiny", "--image-size", "64", "--batch-size", "4", "--lr", "1e-3",
              "--warmup-steps", "4", "--no-progress"]


@pytest.mark.slow
def test_short_run_lowers_the_loss_and_beats_a_trivial_detector(tmp_path, capsys):
    data = tmp_path / "data"
    train_boxes, val_boxes = _random_boxes(32, 0), _random_boxes(12, 1)
    _write_coco(data, "train", train_boxes)
    _write_coco(data, "val", val_boxes)
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "run"), "--epochs", "6", *TRAIN_ARGS]) == 0
    records = _records(tmp_path / "run")
    assert records[-1]["train_loss"] < 0.8 * records[0]["train_loss"], [r["train_loss"] for r in records]
    # The trivial detector: every validation image gets the mean training box, with score 1.
    mean = np.mean([b[0] for b in train_boxes], axis=0).tolist()
    trivial = [{"image_id": i + 1, "category_id": 3, "bbox": mean, "score": 1.0} for i in range(len(val_boxes))]
    val = read_coco_annotations(data / "annotations" / "instances_val.json")
    trivial_ap = coco_evaluate(val, trivial)["bbox"]["AP"]
    best = max(r["box_ap"] for r in records)
    assert best > trivial_ap + 0.05, (best, trivial_ap)
    # the record's AP is COCOeval's on the saved best/ model, recomputed by `pvtv2 eval --task detection`
    capsys.readouterr()
    assert main(["eval", "--task", "detection", "--model", str(tmp_path / "run" / "best"), "--data", str(data),
                 "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["box"]["AP"] == pytest.approx(best, abs=1e-6)


@pytest.mark.slow
def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    data = tmp_path / "data"
    # 7 wide and 5 tall images: one full batch of 4 of each, then one of the 3 + 1 left over (grouped batches);
    # accumulated two at a time (the second group of an epoch is one batch)
    _write_coco(data, "train", _random_boxes(12, 2, size=48), sizes=[(64, 48)] * 7 + [(48, 64)] * 5)
    _write_coco(data, "val", _random_boxes(4, 3))
    args = ["train", "--data", str(data), "--epochs", "2", "--grad-accum", "2", *TRAIN_ARGS]
    assert main(args + ["--output", str(tmp_path / "full")]) == 0
    env = {**os.environ, KILL_ENV: "5"}  # 3 batches per epoch: step 5 is the 2nd batch of epoch 2
    killed = subprocess.run([sys.executable, "-m", "pvtv2.cli", *args, "--output", str(tmp_path / "cut")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [r["epoch"] for r in _records(tmp_path / "cut")] == [1]
    assert main(["train", "--output", str(tmp_path / "cut"), "--resume", "--no-progress"]) == 0
    full, cut = _records(tmp_path / "full"), _records(tmp_path / "cut")
    assert [r["epoch"] for r in cut] == [1, 2]
    for a, b in zip(full, cut):
        assert a["train_loss"] == b["train_loss"] and a["box_ap"] == b["box_ap"] and a["lr"] == b["lr"]
    assert math.isfinite(full[-1]["train_loss"])
    one = read_state_dict(tmp_path / "full" / "last" / "model.safetensors")
    two = read_state_dict(tmp_path / "cut" / "last" / "model.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.slow
def test_training_batches_hold_one_orientation_but_the_leftovers(tmp_path, monkeypatch):
    # 9 wide and 5 tall images in batches of 4: each orientation's full batches (2 wide, 1 tall), then one batch of
    # the 1 + 1 left over: 4 batches, of which only the last may mix.
    wide, tall = (64, 48), (48, 64)
    sizes = [wide if i % 3 else tall for i in range(14)][::-1]
    assert sizes.count(wide) == 9
    data = tmp_path / "data"
    _write_coco(data, "train", _random_boxes(14, 4, size=48), sizes=sizes)
    _write_coco(data, "val", _random_boxes(2, 5, size=48))
    seen: list[list[tuple[int, bool]]] = []
    original = DetectionTask.training_loss

    def spy(self, model, batch, ctx):
        images, targets = batch
        # the orientation of what the detector receives (the tensors' shapes), not what the annotation file says
        seen.append([(t["image_id"], image.shape[-1] >= image.shape[-2]) for image, t in zip(images, targets)])
        return original(self, model, batch, ctx)

    monkeypatch.setattr(DetectionTask, "training_loss", spy)
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "run"), "--epochs", "1", *TRAIN_ARGS]) == 0
    assert sorted(image_id for batch in seen for image_id, _ in batch) == list(range(1, 15))  # each image once
    assert [len(batch) for batch in seen] == [4, 4, 4, 2]
    assert all(len({is_wide for _, is_wide in batch}) == 1 for batch in seen[:3]), seen
    # The same epoch in the engine's plain shuffled order (what it trained on before) mixes orientations.
    flat = epoch_indices(14, seed=0, epoch=0, shuffle=True)
    mixed = [len({sizes[i] for i in flat[k : k + 4]}) > 1 for k in range(0, 14, 4)]
    assert sum(mixed) >= 2, mixed


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, capsys):
    # Mask R-CNN (the detector whose heads could leave parameters without gradients), with images of both
    # orientations: 6 wide and 4 tall in batches of 2 make 3 + 2 grouped batches, dealt to the 2 processes with one
    # repeated so that each makes 3 steps. Images 3 and 5 have no box: process 1's first batch has none at all (its
    # mask head gets no positive RoI) while process 0's has some. 5 validation images: shards of 3 and 2.
    data = tmp_path / "data"
    sizes = [(64, 48), (48, 64)] * 4 + [(64, 48)] * 2
    boxes = [[] if i in (3, 5) else b for i, b in enumerate(_random_boxes(10, 6, size=48))]
    _write_coco(data, "train", boxes, sizes=sizes)
    _write_coco(data, "val", _random_boxes(5, 7))
    ratios = [w / h for w, h in sizes]
    shards = [grouped_batches(ratios, 2, seed=0, epoch=0, rank=r, world_size=2) for r in range(2)]
    assert [len(s) for s in shards] == [3, 3]
    assert sorted(shards[1][0]) == [3, 5] and not {3, 5} & set(shards[0][0])
    config = tmp_path / "tiny.json"
    # every detection kept (an untrained detector scores few above the usual 0.05): COCOeval then has something to rank
    config.write_text(json.dumps({**TINY_SMALL_IMAGES, "fpn_channels": 32, "score_threshold": 0.0}))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pvtv2",
               "train", "--task", "detection", "--detector", "mask_rcnn", "--model", str(config), "--data", str(data),
               "--output", str(out), "--image-size", "64", "--batch-size", "2", "--epochs", "1", "--lr", "1e-3",
               "--warmup-steps", "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = _records(out)
    assert [r["epoch"] for r in records] == [1]
    assert result.stdout.count("trained 1 epoch:") == 1  # one writer
    state = torch.load(out / "last" / "training_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    # rank 0 made its 3 steps; a process with another count would have left the other waiting in DDP's gradient
    # all-reduce (a hang, or gloo's error), not exited 0
    assert state["scheduler"]["last_epoch"] == 3
    # the logged metrics are COCOeval's over the whole validation split: those `pvtv2 eval` computes on last/
    capsys.readouterr()
    assert main(["eval", "--task", "detection", "--model", str(out / "last"), "--data", str(data), "--json",
                 "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["detections"] == records[-1]["detections"] > 0
    assert records[-1]["box_ap"] > 0  # measured 0.217: the comparison below is no 0 == 0
    assert evaluated["box"]["AP"] == pytest.approx(records[-1]["box_ap"], abs=1e-6)
    assert evaluated["mask"]["AP"] == pytest.approx(records[-1]["mask_ap"], abs=1e-6)
