"""The engine's task interface: a task whose batches are not "images + labels" plugs in without touching the engine,
batches of any nesting reach the device, and `train-seg` is `train --task segmentation` with the example's defaults."""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import pvtv2.training
from pvtv2.cli import main
from pvtv2.data.digits import write_digits_folder
from pvtv2.training import TrainConfig
from pvtv2.training import runner
from pvtv2.training.classification import ClassificationTask
from pvtv2.training.engine import to_device
from conftest import TINY_SMALL_IMAGES


def test_to_device_moves_every_tensor_of_a_nested_batch():
    Pair = namedtuple("Pair", "image name")
    batch = {
        "images": [torch.zeros(3, 4, 4), torch.ones(3, 5, 5)],  # detection: images of different sizes, in a list
        "targets": ({"boxes": torch.ones(2, 4), "image_id": 7},),
        "pair": Pair(torch.arange(3), "x"),
    }
    moved = to_device(batch, torch.device("meta"))
    assert [t.device.type for t in moved["images"]] == ["meta", "meta"]
    assert [t.shape for t in moved["images"]] == [(3, 4, 4), (3, 5, 5)]
    assert isinstance(moved["targets"], tuple) and moved["targets"][0]["boxes"].is_meta
    assert moved["targets"][0]["image_id"] == 7
    assert isinstance(moved["pair"], Pair) and moved["pair"].image.is_meta and moved["pair"].name == "x"
    assert not batch["images"][0].is_meta  # the input is left as it was


class ListBatchTask(ClassificationTask):
    """Classification fed the way detection is: a batch is a dict of a list of images and a list of per-image
    target dicts, the task makes its epoch's batches itself (detection groups them by aspect ratio; here they are
    the engine's own, ``batch_size`` consecutive samples of the shuffled order), and validation gathers every
    process's per-image results (as COCO evaluation must) instead of summing counts. Only the task changes; the loss
    is the same function of the same numbers."""

    def train_batches(self, epoch, info, batch_size):
        order = self.train_order(epoch, info)
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def collate(self, samples):
        return {"images": [image for image, _ in samples], "targets": [{"label": torch.tensor(label)} for _, label in samples]}

    def count(self, batch) -> int:
        return len(batch["images"])

    def training_loss(self, model, batch, ctx):
        labels = torch.stack([target["label"] for target in batch["targets"]])
        with ctx.autocast():
            logits = model(torch.stack(batch["images"])).logits
        return nn.functional.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.label_smoothing)

    @torch.no_grad()
    def evaluate(self, model, loader, ctx):
        model.eval()
        hits = []
        for batch in loader:
            batch = to_device(batch, ctx.device)
            logits = model(torch.stack(batch["images"])).logits
            hits += [int(row.argmax()) == int(target["label"]) for row, target in zip(logits, batch["targets"])]
        everyone = [hit for part in ctx.gather(hits) for hit in part]
        return {"val_top1": 100.0 * sum(everyone) / len(everyone)}

    def epoch_summary(self, record):
        return f"top-1 {record['val_top1']:.2f}%"


class ShrinkingBatchesTask(ListBatchTask):
    def train_batches(self, epoch, info, batch_size):
        batches = super().train_batches(epoch, info, batch_size)
        return batches[:-1] if epoch else batches  # a batch fewer from the second epoch on


def test_a_task_with_other_batches_plugs_in_without_touching_the_engine(tmp_path, monkeypatch):
    data = tmp_path / "digits"
    write_digits_folder(data, size=16, limit_per_class=8, val_fraction=0.25, seed=3)
    model = tmp_path / "tiny.json"
    model.write_text(json.dumps(TINY_SMALL_IMAGES))
    common = ["--data", str(data), "--model", str(model), "--epochs", "2", "--image-size", "16", "--batch-size", "12",
              "--grad-accum", "2", "--lr", "3e-3", "--warmup-epochs", "1", "--hflip", "0", "--no-progress"]
    assert main(["train", *common, "--output", str(tmp_path / "tuples")]) == 0
    monkeypatch.setitem(runner.TASK_CLASSES, "classification", ListBatchTask)
    assert main(["train", *common, "--output", str(tmp_path / "lists")]) == 0

    def records(name: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    tuples, lists = records("tuples"), records("lists")
    assert [r["train_loss"] for r in lists] == [r["train_loss"] for r in tuples]  # same samples, same weights
    assert [r["val_top1"] for r in lists] == [r["val_top1"] for r in tuples]
    assert "val_top5" not in lists[0] and (tmp_path / "lists" / "curves.png").is_file()
    assert [r["lr"] for r in lists] == [r["lr"] for r in tuples]  # the same schedule from the task's own batches
    for folder in ("last", "best"):
        one = load_file(tmp_path / "tuples" / folder / "model.safetensors")
        two = load_file(tmp_path / "lists" / folder / "model.safetensors")
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_a_task_whose_batch_count_changes_is_stopped(tmp_path, monkeypatch, capsys):
    data = tmp_path / "digits"
    write_digits_folder(data, size=16, limit_per_class=4, val_fraction=0.25, seed=3)
    model = tmp_path / "tiny.json"
    model.write_text(json.dumps(TINY_SMALL_IMAGES))
    monkeypatch.setitem(runner.TASK_CLASSES, "classification", ShrinkingBatchesTask)
    code = main(["train", "--data", str(data), "--model", str(model), "--epochs", "2", "--image-size", "16",
                 "--batch-size", "8", "--no-progress", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "ShrinkingBatchesTask.train_batches gave 3 batches for epoch 2" in err, err
    assert "planned for 4 non-empty batches per epoch" in err


@pytest.fixture
def captured(monkeypatch) -> list:
    """The (config, explicit flags) that the command hands to `train`, instead of training."""
    calls: list = []

    def fake_train(cfg, *, explicit=None):
        calls.append((cfg, explicit))
        return {"rank": 1}  # not rank 0: the command prints nothing

    monkeypatch.setattr(pvtv2.training, "train", fake_train)
    return calls


def test_train_seg_is_train_with_the_example_defaults(captured):
    assert main(["train-seg", "DATA", "-o", "OUT", "--lr", "1e-3"]) == 0
    # The example's recipe, written out by hand (docs/training.md): what `train` needs to be told to do the same.
    assert main(["train", "--task", "segmentation", "--data", "DATA", "--output", "OUT", "--model", "tiny",
                 "--image-size", "64", "--epochs", "8", "--batch-size", "8", "--lr", "1e-3", "--min-lr", "2e-5",
                 "--warmup-epochs", "1", "--weight-decay", "0.01", "--hflip", "0.5"]) == 0
    (alias, alias_given), (full, _) = captured
    assert alias == full
    assert alias_given == {"data", "output", "lr", "task"}  # what --resume would warn about: the flags given


def test_the_command_tells_given_flags_from_defaults(captured):
    assert main(["train", "--output", "OUT", "--resume", "--epochs", "300", "--hflip", "0.5"]) == 0
    cfg, given = captured[0]
    assert given == {"output", "resume", "epochs", "hflip"}
    assert (cfg.epochs, cfg.hflip, cfg.batch_size) == (300, 0.5, TrainConfig().batch_size)
    assert Path(cfg.output) == Path("OUT")
