"""The segmentation recipe in `pvtv2 train` (--reduce-labels, --seg-augment, --head-lr-mult, --schedule poly) and the
inference flags of `pvtv2 segment` (--mode slide, --crop, --stride, --scales, --flip)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from pvtv2 import PvtV2Config, PvtV2ForSemanticSegmentation
from pvtv2.cli import main
from pvtv2.data.shapes import make_segmentation_example
from pvtv2.inference import predict_segmentation
from pvtv2.training import TrainConfig
from pvtv2.training.segmentation import SegmentationTask
from conftest import TINY_SHALLOW

SIZE = 32


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_segmentation_example(tmp_path_factory.mktemp("shapes"), n_train=16, n_val=8, size=SIZE, seed=4)


@pytest.fixture(scope="module")
def shifted(shapes, tmp_path_factory) -> Path:
    """The same data written ADE20K's way: every class one higher, 0 unused (no label)."""
    root = tmp_path_factory.mktemp("shifted")
    shutil.copytree(shapes, root, dirs_exist_ok=True)
    for mask in root.glob("*/masks/*.png"):
        values = np.asarray(PIL.Image.open(mask)).astype(np.uint8)
        PIL.Image.fromarray(values + 1).save(mask)
    return root


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--task", "segmentation", "--data", str(data), "--model", "tiny", "--output", str(out),
            "--epochs", "2", "--image-size", str(SIZE), "--batch-size", "8", "--lr", "1e-3", "--min-lr", "0",
            "--warmup-epochs", "0", "--no-progress", *extra]


BAD = [
    (["--schedule", "linear"], "--schedule must be one of cosine, poly"),
    (["--head-lr-mult", "0"], "--head-lr-mult"),
    (["--head-lr-mult", "nan"], "--head-lr-mult"),
]


@pytest.mark.parametrize(("extra", "named"), BAD, ids=[" ".join(e) for e, _ in BAD])
def test_bad_segmentation_flags_are_refused(shapes, tmp_path, capsys, extra, named):
    out = tmp_path / "run"
    code = main(_args(shapes, out, *extra))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and named in lines[0], lines
    assert not out.exists()


def test_segmentation_flags_are_refused_for_classification(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path), "--output", str(tmp_path / "run"), "--reduce-labels"])
    assert code == 2 and "--reduce-labels applies to --task segmentation only" in capsys.readouterr().err


def test_reduced_classes_are_counted_without_the_no_label_value(shifted, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shifted, data)
    (data / "labels.json").unlink()
    task = SegmentationTask(TrainConfig(data=str(data), task="segmentation", image_size=SIZE, reduce_labels=True,
                                        output=str(tmp_path / "run")))
    task.load_data()
    # Raw values 1..4: four classes, 0..3 once reduced (raw 0 is no label).
    assert task.classes == ["class_0", "class_1", "class_2", "class_3"]
    _, labels = task.val_set[0]
    raw = np.asarray(PIL.Image.open(task.val_set.pairs[0][1])).astype(np.int64)
    assert torch.equal(labels, torch.from_numpy(np.where(raw == 0, 255, raw - 1)))


@pytest.mark.slow
def test_reduce_labels_poly_and_head_lr(shapes, shifted, tmp_path):
    recipe = ["--seg-augment", "--schedule", "poly", "--head-lr-mult", "10"]
    plain, reduced = tmp_path / "plain", tmp_path / "reduced"
    assert main(_args(shapes, plain, *recipe)) == 0
    assert main(_args(shifted, reduced, *recipe, "--reduce-labels")) == 0
    # The shifted masks, reduced, are the original ones: the same run, bit for bit.
    a, b = load_file(plain / "last" / "model.safetensors"), load_file(reduced / "last" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines()]
    # 16 images in batches of 8: 2 steps an epoch, 4 in all. After epoch 1 the head's lr is 10 x 1e-3 x poly's
    # (1 - 2/4) ** 0.9, and the encoder's a tenth of it.
    assert records[0]["lr"] == pytest.approx(1e-2 * 0.5**0.9, rel=1e-9)
    state = torch.load(plain / "last" / "training_state.pt", weights_only=True)
    lrs = sorted({group["initial_lr"] for group in state["optimizer"]["param_groups"]})
    assert lrs == pytest.approx([1e-3, 1e-2])


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("segmenter")
    torch.manual_seed(0)
    model = PvtV2ForSemanticSegmentation(PvtV2Config(**TINY_SHALLOW, decoder_hidden_size=32,
                                                     id2label={0: "a", 1: "b", 2: "c"}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.3)
    model.save_pretrained(folder)
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)).save(folder / "in.png")
    return folder


def test_segment_slides_windows_over_scales_and_flips(segmenter, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["segment", str(segmenter / "in.png"), "-m", str(segmenter), "-o", str(out), "--mode", "slide",
                 "--crop", "64", "--stride", "32", "--scales", "0.75,1.0", "--flip"]) == 0
    counts = json.loads(capsys.readouterr().out.split("pixels per class: ")[1])
    model = PvtV2ForSemanticSegmentation.from_pretrained(segmenter)
    image = PIL.Image.open(segmenter / "in.png").convert("RGB")
    expected = predict_segmentation(model, image, mode="slide", crop=64, stride=32, scales=(0.75, 1.0), flip=True)
    names = model.config.id2label
    assert counts == {names[int(c)]: int((expected == c).sum()) for c in np.unique(expected)}
    plain = predict_segmentation(model, image)
    assert not np.array_equal(plain, expected)  # the flags changed the prediction


@pytest.mark.parametrize(("extra", "named"), [
    (["--stride", "0"], "--stride"), (["--crop", "16"], "--crop"), (["--stride", "100", "--crop", "64"], "--stride"),
    (["--scales", "0"], "--scales"), (["--scales", "a,b"], "--scales"), (["--scales", "nan"], "--scales"),
])
def test_segment_refuses_bad_inference_flags(segmenter, tmp_path, capsys, extra, named):
    out = tmp_path / "out.png"
    code = main(["segment", str(segmenter / "in.png"), "-m", str(segmenter), "-o", str(out), "--mode", "slide", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("pvtv2 segment: error: ") and named in err[0]
    assert not out.exists()


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shapes_model")
    torch.manual_seed(1)
    labels = dict(enumerate(["background", "circle", "square", "triangle"]))
    model = PvtV2ForSemanticSegmentation(PvtV2Config(**TINY_SHALLOW, decoder_hidden_size=32, id2label=labels,
                                                     image_size=SIZE))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.3)
    model.save_pretrained(folder)
    return folder


def _iou_by_hand(model_dir: Path, data: Path) -> tuple[float, float]:
    """Whole-image inference written out: resize to the config's size, normalise, forward, upsample, argmax; then
    IoU per class over all images (classes absent from labels and predictions left out)."""
    model = PvtV2ForSemanticSegmentation.from_pretrained(model_dir).eval()
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    inter, union, correct, total = np.zeros(4), np.zeros(4), 0, 0
    for image_path in sorted((data / "val" / "images").iterdir()):
        image = PIL.Image.open(image_path).convert("RGB")
        resized = np.asarray(image.resize((SIZE, SIZE), PIL.Image.Resampling.BILINEAR), np.float64) / 255.0
        pixels = torch.from_numpy(((resized - mean) / std).transpose(2, 0, 1)[None].astype(np.float32))
        with torch.no_grad():
            logits = model(pixels).logits
        logits = torch.nn.functional.interpolate(logits, size=(image.height, image.width), mode="bilinear",
                                                 align_corners=False)
        pred = logits.argmax(1)[0].numpy()
        truth = np.asarray(PIL.Image.open(data / "val" / "masks" / f"{image_path.stem}.png")).astype(np.int64)
        for c in range(4):
            inter[c] += ((pred == c) & (truth == c)).sum()
            union[c] += ((pred == c) | (truth == c)).sum()
        correct += (pred == truth).sum()
        total += truth.size
    present = union > 0
    return float(np.mean(inter[present] / union[present])), correct / total


def test_eval_segmentation_matches_a_computation_by_hand(shapes, shifted, shapes_model, capsys):
    assert main(["eval", "--task", "segmentation", "-m", str(shapes_model), "--data", str(shapes), "--json",
                 "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out)
    mean_iou, accuracy = _iou_by_hand(shapes_model, shapes)
    assert got["images"] == 8
    assert got["mean_iou"] == pytest.approx(mean_iou, abs=1e-9)
    assert got["pixel_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    # ADE20K-style masks, reduced, give the same numbers.
    assert main(["eval", "--task", "segmentation", "-m", str(shapes_model), "--data", str(shifted), "--json",
                 "--reduce-labels", "--no-progress"]) == 0
    reduced = json.loads(capsys.readouterr().out)
    assert (reduced["mean_iou"], reduced["pixel_accuracy"]) == (got["mean_iou"], got["pixel_accuracy"])
    # Unreduced, the shifted masks hold a class the model does not have: named, with the remedy.
    assert main(["eval", "--task", "segmentation", "-m", str(shapes_model), "--data", str(shifted)]) == 2
    assert "pass --reduce-labels" in capsys.readouterr().err


def test_eval_segmentation_takes_the_inference_flags(shapes, shapes_model, capsys):
    assert main(["eval", "--task", "segmentation", "-m", str(shapes_model), "--data", str(shapes), "--json",
                 "--mode", "slide", "--crop", "32", "--stride", "16", "--size", "48", "--scales", "0.75,1", "--flip",
                 "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out)
    model = PvtV2ForSemanticSegmentation.from_pretrained(shapes_model)
    confusion = np.zeros((4, 4), dtype=np.int64)
    for image_path in sorted((shapes / "val" / "images").iterdir()):
        image = PIL.Image.open(image_path).convert("RGB")
        pred = predict_segmentation(model, image, (48, 48), mode="slide", crop=32, stride=16, scales=(0.75, 1.0),
                                    flip=True)
        truth = np.asarray(PIL.Image.open(shapes / "val" / "masks" / f"{image_path.stem}.png")).astype(np.int64)
        np.add.at(confusion, (truth.ravel(), pred.ravel()), 1)
    inter = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - inter
    assert got["mean_iou"] == pytest.approx(np.mean(inter[union > 0] / union[union > 0]), abs=1e-9)
    assert (got["mode"], got["crop"], got["stride"], got["scales"], got["flip"]) == ("slide", 32, 16, [0.75, 1.0], True)


@pytest.mark.parametrize(("extra", "named"), [
    (["--task", "segmentation", "--preprocess", "timm"], "--preprocess applies to --task classification only"),
    (["--mode", "slide"], "--mode slide applies to --task segmentation only"),
    (["--task", "segmentation", "--scales", "-1"], "--scales"),
])
def test_eval_refuses_flags_of_the_other_task(shapes, shapes_model, capsys, extra, named):
    assert main(["eval", "-m", str(shapes_model), "--data", str(shapes), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
