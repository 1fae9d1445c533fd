"""Segmentation's ignore value as a setting (round 28): ``--ignore-index N`` (TrainConfig.ignore_index, and
``pvtv2 eval --task segmentation``), 255 by default. Pixels of value N leave the loss (against F.cross_entropy with
``ignore_index=N``) and the confusion behind mean IoU and pixel accuracy (against one computed with NumPy here); a
value that is one of the classes, out of [1, 65535], or given to another task is refused."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from pvtv2.cli import main
from pvtv2.data.masks import (
    SegmentationFolder,
    check_ignore_index,
    read_id2label,
    reduce_labels,
    scan_segmentation_split,
)
from pvtv2.inference import evaluate_segmenter, predict_segmentation
from pvtv2.training import TrainConfig
from pvtv2.training.distributed import DistInfo
from pvtv2.training.engine import RunContext
from pvtv2.training.segmentation import SegmentationTask, evaluate_segmentation

IGNORE = 7  # classes 0, 1, 2; 7 is the unlabelled value


def _write(root, split: str, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (root / split / "images").mkdir(parents=True)
    (root / split / "masks").mkdir(parents=True)
    for i in range(count):
        pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        mask = rng.integers(0, 3, (32, 32)).astype(np.uint8)
        mask[rng.random((32, 32)) < 0.3] = IGNORE
        mask[0, 0] = IGNORE
        PIL.Image.fromarray(pixels).save(root / split / "images" / f"{i}.png")
        PIL.Image.fromarray(mask).save(root / split / "masks" / f"{i}.png")


@pytest.fixture
def data(tmp_path):
    _write(tmp_path / "d", "train", 3, 0)
    _write(tmp_path / "d", "val", 2, 1)
    return tmp_path / "d"


def _task(data, tmp_path, **changes) -> SegmentationTask:
    cfg = TrainConfig(task="segmentation", data=str(data), model="tiny", image_size=32, output=str(tmp_path / "o"),
                      **changes)
    cfg.validate()
    task = SegmentationTask(cfg)
    task.load_data()
    return task


def _numpy_metrics(labels: np.ndarray, predicted: np.ndarray, k: int, ignore: int) -> tuple[float, float]:
    """Mean IoU (over the classes present in labels or predictions) and pixel accuracy, kept pixels only."""
    keep = labels != ignore
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels[keep], predicted[keep]), 1)
    ious = []
    for c in range(k):
        inter = confusion[c, c]
        union = confusion[c, :].sum() + confusion[:, c].sum() - inter
        if union:
            ious.append(inter / union)
    return float(np.mean(ious)), float(np.trace(confusion) / confusion.sum())


def test_training_loss_skips_the_given_value(data, tmp_path):
    task = _task(data, tmp_path, ignore_index=IGNORE)
    assert task.classes == ["class_0", "class_1", "class_2"]  # 7 is not counted as a class (it was: 8 classes)
    torch.manual_seed(0)
    model = task.new_model()
    assert model.config.semantic_loss_ignore_index == IGNORE
    pixels, labels = torch.utils.data.default_collate([task.train_set[i] for i in range(3)])
    assert (labels == IGNORE).any() and set(labels.unique().tolist()) == {0, 1, 2, IGNORE}
    ctx = RunContext(torch.device("cpu"), False, DistInfo())
    loss = task.training_loss(model, (pixels, labels), ctx)
    logits = F.interpolate(model(pixels).logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    expected = F.cross_entropy(logits, labels, ignore_index=IGNORE)
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)
    # the default 255 would have refused the 7s as out of range for 3 classes, and ignoring nothing differs
    assert not torch.allclose(loss, F.cross_entropy(logits, torch.where(labels == IGNORE, 0, labels)), rtol=1e-3)


def test_validation_metrics_leave_the_value_out(data, tmp_path):
    task = _task(data, tmp_path, ignore_index=IGNORE)
    torch.manual_seed(0)
    model = task.new_model().eval()
    loader = torch.utils.data.DataLoader(task.val_set, batch_size=2)
    got = evaluate_segmentation(model, loader)
    pixels, labels = next(iter(loader))
    with torch.no_grad():
        logits = F.interpolate(model(pixels).logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    mean_iou, accuracy = _numpy_metrics(labels.numpy(), logits.argmax(1).numpy(), 3, IGNORE)
    assert got["mean_iou"] == pytest.approx(mean_iou, abs=1e-9)
    assert got["pixel_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert got["loss"] == pytest.approx(float(F.cross_entropy(logits, labels, ignore_index=IGNORE)), rel=1e-5)


def test_eval_segmenter_takes_the_model_value_and_an_explicit_one(data, tmp_path):
    task = _task(data, tmp_path, ignore_index=IGNORE)
    torch.manual_seed(0)
    model = task.new_model().eval()
    model.save_pretrained(tmp_path / "model")
    pairs = scan_segmentation_split(data, "val")
    labels, predicted = [], []
    for image_path, mask_path in pairs:
        labels.append(np.asarray(PIL.Image.open(mask_path), dtype=np.int64).ravel())
        predicted.append(predict_segmentation(model, PIL.Image.open(image_path).convert("RGB")).ravel())
    mean_iou, accuracy = _numpy_metrics(np.concatenate(labels), np.concatenate(predicted), 3, IGNORE)
    got = evaluate_segmenter(model, data)  # the model's own semantic_loss_ignore_index: 7
    assert (got["mean_iou"], got["pixel_accuracy"]) == pytest.approx((mean_iou, accuracy), abs=1e-9)
    assert evaluate_segmenter(model, data, ignore_index=IGNORE)["mean_iou"] == pytest.approx(mean_iou, abs=1e-9)
    # the same model told 255: the 7s are masks values beyond its 3 classes
    with pytest.raises(ValueError, match="has class 7 but the model has 3 classes"):
        evaluate_segmenter(model, data, ignore_index=255)
    with pytest.raises(ValueError, match="--ignore-index 2 is class 2"):
        evaluate_segmenter(model, data, ignore_index=2)
    # a model whose config says -1 (no mask value): nothing is left out, the 7s are out of range
    model.config.semantic_loss_ignore_index = -1
    with pytest.raises(ValueError, match="has class 7 but the model has 3 classes"):
        evaluate_segmenter(model, data)
    model.config.semantic_loss_ignore_index = 1
    with pytest.raises(ValueError, match="the model's semantic_loss_ignore_index 1 is class 1"):
        evaluate_segmenter(model, data)
    # the command
    assert main(["eval", "--task", "segmentation", "--model", str(tmp_path / "model"), "--data", str(data),
                 "--ignore-index", "7", "--json"]) == 0
    assert main(["eval", "--model", str(tmp_path / "model"), "--data", str(data), "--ignore-index", "7"]) == 2


def test_the_value_is_checked(data, tmp_path):
    with pytest.raises(ValueError, match=r"--ignore-index 1 is class 1 \('class_1'\) of the 8 classes"):  # the 7s count as classes here
        _task(data, tmp_path, ignore_index=1)
    for bad in (0, -1, 65536):
        with pytest.raises(ValueError, match="--ignore-index"):
            TrainConfig(task="segmentation", output="o", ignore_index=bad).validate()
    with pytest.raises(TypeError, match="--ignore-index"):
        TrainConfig(task="segmentation", output="o", ignore_index=7.5).validate()
    with pytest.raises(ValueError, match="--ignore-index applies to --task segmentation only"):
        TrainConfig(task="classification", output="o", ignore_index=7).validate()
    TrainConfig(task="segmentation", output="o", ignore_index=65535).validate()
    # 256 classes named by labels.json: the default 255 is one of them (its pixels were silently left out)
    with pytest.raises(ValueError, match="--ignore-index 255 is class 255"):
        check_ignore_index(255, {i: f"c{i}" for i in range(256)})
    check_ignore_index(256, {i: f"c{i}" for i in range(256)})


def test_reduce_labels_and_class_count_use_the_value(data):
    raw = np.array([[0, 1, 3], [IGNORE, 2, 0]], dtype=np.uint8)
    assert reduce_labels(raw, IGNORE).tolist() == [[IGNORE, 0, 2], [IGNORE, 1, IGNORE]]
    # an ignore value beyond uint8: not wrapped to 300 % 256 = 44
    wide = reduce_labels(raw, 300)
    assert wide.tolist() == [[300, 0, 2], [6, 1, 300]]
    pairs = scan_segmentation_split(data, "train")
    assert read_id2label(data, pairs, IGNORE) == {0: "class_0", 1: "class_1", 2: "class_2"}
    assert len(read_id2label(data, pairs)) == 8  # 255 ignored: 7 counts as a class
    folder = SegmentationFolder(data, "train", 32, reduce_labels=True, ignore_index=IGNORE)
    mask = np.asarray(PIL.Image.open(pairs[0][1]), dtype=np.int64)
    expected = np.where((mask == 0) | (mask == IGNORE), IGNORE, mask - 1)
    assert folder[0][1].numpy().tolist() == expected.tolist()


def test_cli_train_passes_the_value(monkeypatch):
    import pvtv2.training

    calls: list = []
    monkeypatch.setattr(pvtv2.training, "train", lambda cfg, *, explicit=None: calls.append(cfg) or {"rank": 1})
    assert main(["train", "--task", "segmentation", "--data", "D", "-o", "O", "--ignore-index", "7"]) == 0
    assert main(["train", "--task", "segmentation", "--data", "D", "-o", "O"]) == 0
    assert [c.ignore_index for c in calls] == [7, 255]


def test_resume_keeps_the_run_value():
    """A run stored before the setting existed ignored 255: --ignore-index 7 on --resume is refused as any changed
    run setting is (the resumed model's loss would still skip 255 while the data skipped 7); left out, it is 255."""
    from pvtv2.training.rundir import _merge_resumed

    stored = TrainConfig(task="segmentation", data="/d", output="/o").run_fields()
    del stored["ignore_index"]
    given = TrainConfig(task="segmentation", data="/d", output="/o", resume=True, ignore_index=7)
    with pytest.raises(ValueError, match="--ignore-index 255, not 7"):
        _merge_resumed(given, stored, {"ignore_index", "resume"})
    kept = _merge_resumed(TrainConfig(task="segmentation", data="/d", output="/o", resume=True), stored, {"resume"})
    assert kept.ignore_index == 255
    stored["ignore_index"] = 7
    assert _merge_resumed(TrainConfig(task="segmentation", data="/d", output="/o", resume=True), stored,
                          {"resume"}).ignore_index == 7
