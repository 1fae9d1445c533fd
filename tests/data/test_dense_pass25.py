"""Hostile pass 25 over the dense-prediction features (segmentation, depth, detection): each test holds a defect that
was found, against an independent computation (NumPy by hand, a closed form, pycocotools)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from pvtv2 import PvtV2Config, PvtV2ForSemanticSegmentation
from pvtv2.data.depth import DepthFolder, write_depth_png
from pvtv2.data.masks import SegmentationFolder
from pvtv2.inference import evaluate_segmenter
from pvtv2.models.segmentation import semantic_segmentation_loss
from pvtv2.training.segmentation import evaluate_segmentation
from conftest import detections_by_name

TINY = dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 8, 8, 8], num_attention_heads=[1, 1, 1, 1], image_size=32)


def _save_rotated(path: Path, stored: np.ndarray) -> None:
    """``stored`` as a PNG whose EXIF orientation 6 says "rotate 90 degrees clockwise to show upright"."""
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    PIL.Image.fromarray(stored).save(path, exif=exif.tobytes())


def _folders(root: Path, split: str, second: str) -> tuple[Path, Path]:
    images, other = root / split / "images", root / split / second
    images.mkdir(parents=True)
    other.mkdir(parents=True)
    return images, other


# ---------------------------------------------------------------------------------------------- EXIF orientation
def test_segmentation_training_reads_images_upright_as_evaluation_does(tmp_path):
    """A phone photo stored 40 wide x 60 tall with EXIF orientation 6 shows 60 x 40; its mask is drawn on what is
    shown. SegmentationFolder read the stored pixels and stretched them over the mask (half the pixels wrong), while
    evaluate_segmenter and pvtv2 segment read the upright image."""
    images, masks = _folders(tmp_path, "train", "masks")
    stored = np.zeros((60, 40, 3), dtype=np.uint8)
    stored[:, :20] = 255  # the stored left half is white
    _save_rotated(images / "a.png", stored)
    upright = np.rot90(stored, k=-1)  # 90 degrees clockwise, by hand: (40, 60), the white half is now on top
    mask = (upright[..., 0] > 0).astype(np.uint8)  # 1 on the white half
    assert mask[:20].all() and not mask[20:].any()
    PIL.Image.fromarray(mask).save(masks / "a.png")

    pixels, labels = SegmentationFolder(tmp_path, "train", (40, 60), mean=(0, 0, 0), std=(1, 1, 1))[0]
    assert torch.equal(labels, torch.from_numpy(mask.astype(np.int64)))
    assert torch.equal(pixels[0] > 0.5, labels == 1)  # the image agrees with its mask at every pixel


def test_a_mask_of_another_shape_than_its_image_is_refused_by_name(tmp_path):
    images, masks = _folders(tmp_path, "train", "masks")
    PIL.Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(images / "a.png")
    PIL.Image.fromarray(np.zeros((60, 40), dtype=np.uint8)).save(masks / "a.png")
    with pytest.raises(ValueError, match=r"mask .*a\.png' is 40x60 but its image .* is 60x40"):
        SegmentationFolder(tmp_path, "train", 32)[0]


def test_depth_training_reads_images_upright(tmp_path):
    images, depth = _folders(tmp_path, "train", "depth")
    stored = np.zeros((64, 32, 3), dtype=np.uint8)
    stored[:, :16] = 255
    _save_rotated(images / "a.png", stored)
    upright = np.rot90(stored, k=-1)  # (32, 64)
    metres = np.where(upright[..., 0] > 0, 2.0, 5.0)
    write_depth_png(depth / "a.png", metres)
    pixels, target = DepthFolder(tmp_path, "train", (32, 64))[0]
    assert torch.equal(target, torch.from_numpy(metres.astype(np.float32)))
    assert torch.equal(pixels[0] > 0.5, target == 2.0)


# ---------------------------------------------------------------------------------------------- binary models
def _binary_model(bias: float) -> PvtV2ForSemanticSegmentation:
    """A one-class model whose logit is ``bias`` at every pixel."""
    model = PvtV2ForSemanticSegmentation(PvtV2Config(**TINY, id2label={0: "crack"}))
    with torch.no_grad():
        model.decode_head.classifier.weight.zero_()
        model.decode_head.classifier.bias.fill_(bias)
    return model


def test_training_evaluation_of_a_binary_model_scores_its_sigmoid():
    """A one-class model (binary cross-entropy) predicting the class everywhere, on labels half 0, half 1: IoU 0 for
    the background and 1/2 for the class, by hand. The argmax over its one channel said class 0 everywhere: mean IoU
    1.0 on all-background labels, and a shape error as soon as a label was 1."""
    x = torch.randn(2, 3, 32, 32)
    half = torch.zeros(2, 32, 32, dtype=torch.int64)
    half[..., 16:] = 1
    metrics = evaluate_segmentation(_binary_model(5.0), [(x, half)])
    assert metrics["per_class_iou"] == [0.0, 0.5]
    assert metrics["mean_iou"] == pytest.approx(0.25) and metrics["pixel_accuracy"] == pytest.approx(0.5)
    background = torch.zeros(2, 32, 32, dtype=torch.int64)
    metrics = evaluate_segmentation(_binary_model(5.0), [(x, background)])
    assert metrics["per_class_iou"] == [0.0, 0.0] and metrics["mean_iou"] == 0.0  # class 1 predicted, never true
    metrics = evaluate_segmentation(_binary_model(-5.0), [(x, half)])  # never the class
    assert metrics["per_class_iou"] == [0.5, 0.0] and metrics["mean_iou"] == pytest.approx(0.25)


def test_binary_labels_other_than_0_and_1_are_refused():
    logits = torch.zeros(1, 1, 8, 8)
    labels = torch.zeros(1, 32, 32, dtype=torch.int64)
    labels[0, 0, :3] = torch.tensor([1, 255, 0])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(torch.zeros(32, 32), labels[0].float().clamp(max=1),
                                                                    reduction="none")
    expected[0, 1] = 0  # the ignored pixel
    assert float(semantic_segmentation_loss(logits, labels)) == pytest.approx(float(expected.mean()))
    labels[0, 5, 5] = 2
    with pytest.raises(ValueError, match=r"label values \[2\] are out of range for a one-class"):
        semantic_segmentation_loss(logits, labels)


def test_per_class_names_of_a_binary_model_name_the_class_where_it_is_predicted(tmp_path):
    """evaluate_segmenter reported the background's IoU under the class's own name (id2label[0])."""
    images, masks = _folders(tmp_path, "val", "masks")
    PIL.Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8)).save(images / "a.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, :8] = 1  # a quarter is the class
    PIL.Image.fromarray(mask).save(masks / "a.png")
    result = evaluate_segmenter(_binary_model(5.0), tmp_path)  # predicts the class everywhere
    assert result["per_class_iou"] == {"not crack": 0.0, "crack": 0.25}
    from pvtv2.inference import label_map_names

    assert label_map_names(PvtV2Config(**TINY, id2label={0: "a", 1: "b"})) == {0: "a", 1: "b"}


# ---------------------------------------------------------------------------------------------- depth range
def test_depth_deeper_than_max_depth_is_counted_and_warned_and_max_depth_covers_it(tmp_path, caplog, capsys):
    """The rooms' millimetre PNGs read with --depth-scale 200 are 8.7-44 m deep (mostly KITTI's range). The model's
    max_depth was fixed at 10: it could not predict them and the metrics left out every pixel at 10 m or more, so a
    run scored the near pixels only, without a word. The share is now logged and warned, and --max-depth sets it."""
    import json
    import logging

    from pvtv2.cli import main
    from pvtv2.data.depth import read_depth_png
    from pvtv2.data.scenes import make_depth_example
    from pvtv2.models.depth import PvtV2ForDepthEstimation

    data = make_depth_example(tmp_path / "rooms", n_train=4, n_val=3, size=32, seed=1)
    depths = np.stack([read_depth_png(p, 200) for p in sorted((data / "val" / "depth").iterdir())])
    expected = float(((depths >= 10) & (depths > 1e-3)).sum() / (depths > 1e-3).sum())  # by hand
    assert 0.9 < expected < 1

    def run(out: Path, *extra: str) -> dict:
        args = ["train", "--task", "depth", "--data", str(data), "--model", "tiny", "--output", str(out), "--epochs",
                "1", "--image-size", "32", "--batch-size", "4", "--depth-scale", "200", "--no-progress", *extra]
        assert main(args) == 0
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])

    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        record = run(tmp_path / "capped")
    assert record["beyond_max_depth"] == pytest.approx(expected, abs=1e-12)
    assert f"{100 * expected:.1f}% of the validation pixels with depth are 10 m or deeper" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        record = run(tmp_path / "covered", "--max-depth", "100")
    assert record["beyond_max_depth"] == 0.0 and "or deeper" not in caplog.text
    assert PvtV2ForDepthEstimation.from_pretrained(tmp_path / "covered" / "last").config.max_depth == 100
    capsys.readouterr()
    # Read at --depth-scale 100 every pixel is 10 m or deeper: no metric could be computed (each was NaN, the run
    # ended with exit 0 naming a best/ it never wrote): refused before training.
    argv = ["train", "--task", "depth", "--data", str(data), "--model", "tiny", "--output", str(tmp_path / "none"),
            "--epochs", "1", "--image-size", "32", "--depth-scale", "100", "--no-progress"]
    assert main(argv) == 2 and not (tmp_path / "none").exists()
    assert "no validation pixel in" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "x"), "--max-depth", "80"]) == 2
    assert "--max-depth applies to --task depth only" in capsys.readouterr().err
    assert main(["train", "--task", "depth", "--data", str(data), "--output", str(tmp_path / "y"), "--max-depth",
                 "0"]) == 2
    assert "--max-depth" in capsys.readouterr().err


def test_an_image_without_any_depth_adds_nothing_to_the_loss_instead_of_stopping_training(tmp_path, capsys):
    """A frame without a single measured pixel made GLPN's loss a mean over nothing, NaN, and the run stopped
    claiming that the loss diverged (lower --lr). Its loss is now 0 with a zero gradient; a batch that also holds
    measured images gets the loss of those alone (closed form)."""
    import json

    from pvtv2.cli import main
    from pvtv2.data.scenes import make_depth_example
    from pvtv2.models.depth import silog_loss

    pred = torch.full((2, 4, 4), 2.0, requires_grad=True)
    target = torch.zeros(2, 4, 4)
    loss = silog_loss(pred, target)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(pred.grad, torch.zeros(2, 4, 4))
    target[1] = torch.linspace(1.0, 4.0, 16).reshape(4, 4)
    d = np.log(np.linspace(1.0, 4.0, 16)) - np.log(2.0)
    assert float(silog_loss(pred.detach(), target)) == pytest.approx(np.sqrt(np.mean(d**2) - 0.5 * np.mean(d) ** 2))

    data = make_depth_example(tmp_path / "rooms", n_train=3, n_val=2, size=32, seed=1)
    for split in ("train", "val"):
        write_depth_png(data / split / "depth" / "00001.png", np.zeros((32, 32)))
    out = tmp_path / "run"
    assert main(["train", "--task", "depth", "--data", str(data), "--model", "tiny", "--output", str(out), "--epochs",
                 "1", "--image-size", "32", "--batch-size", "1", "--no-progress"]) == 0, capsys.readouterr().err
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["images"] == 1 and record["images_without_depth"] == 1
    assert np.isfinite(record["val_loss"]) and np.isfinite(record["train_loss"])


def test_a_batch_whose_every_pixel_is_ignored_has_segmentation_loss_zero():
    """An unlabelled image (ADE20K's 0 everywhere, reduced to 255) or crop made cross-entropy a mean over nothing:
    NaN, and the run stopped as if it diverged. Now 0 with a zero gradient; other batches keep the mean over their
    labelled pixels (by hand with NumPy)."""
    logits = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ignored = torch.full((2, 4, 4), 255, dtype=torch.int64)
    loss = semantic_segmentation_loss(logits, ignored)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    labels = ignored.clone()
    labels[0, 1, 2], labels[1, 3, 0], labels[1, 0, 0] = 2, 0, 1
    z = logits.detach().double().numpy()
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    picks = [log_p[0, 2, 1, 2], log_p[1, 0, 3, 0], log_p[1, 1, 0, 0]]  # same size: no resampling
    assert float(semantic_segmentation_loss(logits.detach(), labels)) == pytest.approx(-np.mean(picks), rel=1e-6)


# ---------------------------------------------------------------------------------------------- SegFormer checkpoints
def test_a_segformer_checkpoint_is_predicted_at_its_processors_size_as_transformers_does(tmp_path):
    """transformers' SegFormer config.json has no image size, so pvtv2 segment / eval resized every image to the
    default 224x224 where the checkpoint's preprocessor_config.json says 512x512 (ADE20K): on a random SegFormer,
    48% of the labels agreed with transformers' own pipeline. The processor's size is now the default."""
    transformers = pytest.importorskip("transformers")
    from pvtv2.inference import load_segmenter, predict_segmentation

    torch.manual_seed(0)
    config = transformers.SegformerConfig(depths=[1, 1, 1, 1], hidden_sizes=[16, 16, 32, 32], decoder_hidden_size=32,
                                          num_attention_heads=[1, 1, 1, 1], num_labels=4)
    reference = transformers.SegformerForSemanticSegmentation(config).eval()
    with torch.no_grad():  # a head that says something: random decode weights, unit running variance
        for p in reference.decode_head.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    reference.save_pretrained(tmp_path)
    processor = transformers.SegformerImageProcessor(size={"height": 96, "width": 128})
    processor.save_pretrained(tmp_path)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 150, 3), dtype=np.uint8))
    with torch.no_grad():
        logits = reference(**processor(image, return_tensors="pt")).logits
    expected = torch.nn.functional.interpolate(logits, size=(70, 150), mode="bilinear").argmax(1)[0].numpy()

    model = load_segmenter(tmp_path)
    assert tuple(model.config.image_size) == (96, 128)
    # transformers 5 resizes tensors, pvtv2 with PIL (one uint8 step apart on some pixels): near-ties may flip
    assert (predict_segmentation(model, image) == expected).mean() > 0.98


def test_classes_counted_off_the_masks_include_those_only_validation_masks_hold(tmp_path, capsys):
    """Without labels.json the classes were counted off the training masks only: a class that only validation masks
    hold stopped the run after its first epoch ("label values [2] are out of range for 2 classes")."""
    import json

    from pvtv2.cli import main

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        images, masks = _folders(tmp_path / "data", split, "masks")
        for i in range(2):
            PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
            mask = np.zeros((32, 32), dtype=np.uint8)
            mask[:, 16:] = 1
            if split == "val":
                mask[:8, :8] = 2
            PIL.Image.fromarray(mask).save(masks / f"{i}.png")
    out = tmp_path / "run"
    assert main(["train-seg", str(tmp_path / "data"), "--output", str(out), "--epochs", "1", "--image-size", "32",
                 "--batch-size", "2", "--no-progress"]) == 0, capsys.readouterr().err
    config = json.loads((out / "last" / "config.json").read_text())
    assert config["id2label"] == {"0": "class_0", "1": "class_1", "2": "class_2"}
    assert len(json.loads((out / "metrics.jsonl").read_text())["per_class_iou"]) == 3


def test_a_one_bit_mask_png_holds_classes_0_and_1(tmp_path):
    """PIL writes a boolean array as a 1-bit PNG, a common binary mask; it was refused as "must be a single-channel
    PNG ... got mode 1", though it is one (and PIL's convert("L") would make its 1 into 255, the ignore value)."""
    from pvtv2.data.masks import read_mask

    images, masks = _folders(tmp_path, "val", "masks")
    truth = np.zeros((32, 32), dtype=bool)
    truth[4:20, 8:30] = True
    PIL.Image.fromarray(truth).save(masks / "a.png")
    assert PIL.Image.open(masks / "a.png").mode == "1"
    assert np.array_equal(np.asarray(read_mask(masks / "a.png")), truth.astype(np.uint8))
    PIL.Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8)).save(images / "a.png")
    result = evaluate_segmenter(_binary_model(5.0), tmp_path)  # the class everywhere: IoU = its share, by hand
    assert result["per_class_iou"]["crack"] == pytest.approx(truth.mean())


# ---------------------------------------------------------------------------------------------- COCO data
def test_a_coco_image_whose_exif_orientation_turns_it_says_so(tmp_path):
    """Stored 40 wide x 60 tall with EXIF orientation 6, listed as 40 x 60 (the stored pixels, as a tool that ignores
    EXIF writes it): read upright (60 x 40, as detectron2 and mmdetection read it), it fits no box. The error said
    only "is 60x40 but says 40x60", while every image viewer that ignores EXIF shows 40 x 60."""
    import json

    from pvtv2.data.coco import CocoDetection

    (tmp_path / "annotations").mkdir()
    (tmp_path / "val").mkdir()
    _save_rotated(tmp_path / "val" / "a.png", np.zeros((60, 40, 3), dtype=np.uint8))
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 60}], "annotations": [],
            "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"is 60x40 but instances_val.json says 40x60: .* EXIF orientation 6 turns "
                                         r"the stored 40x60 pixels upright"):
        CocoDetection(tmp_path, "val")[0]
    data["images"][0].update(width=60, height=40)  # the upright size: read as it is shown
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(data))
    assert CocoDetection(tmp_path, "val")[0][0].shape == (3, 40, 60)


# ---------------------------------------------------------------------------------------------- resuming
def test_a_depth_run_killed_after_an_epoch_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    """Every depth run killed after its first saved epoch refused --resume: the run's classes were read off its
    weights' generic id2label (LABEL_0, LABEL_1) and compared with the task's ["depth"]."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from pvtv2.cli import main
    from pvtv2.data.scenes import make_depth_example
    from pvtv2.training.engine import KILL_ENV
    from pvtv2.weights.files import read_state_dict

    data = make_depth_example(tmp_path / "rooms", n_train=8, n_val=2, size=32, seed=2)
    args = ["train", "--task", "depth", "--data", str(data), "--model", "tiny", "--image-size", "32", "--epochs", "3",
            "--batch-size", "4", "--lr", "1e-3", "--warmup-epochs", "1", "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "full")]) == 0
    env = {**os.environ, KILL_ENV: "3"}  # step 3: the first batch of epoch 2
    killed = subprocess.run([sys.executable, "-m", "pvtv2.cli", *args, "--output", str(tmp_path / "cut")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert main(["train", "--output", str(tmp_path / "cut"), "--resume", "--no-progress"]) == 0

    def records(run: str) -> list:
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert [r["epoch"] for r in records("cut")] == [1, 2, 3]
    for a, b in zip(records("full"), records("cut")):
        assert a["train_loss"] == b["train_loss"] and a["delta1"] == b["delta1"]
    one = read_state_dict(tmp_path / "full" / "last" / "model.safetensors")
    two = read_state_dict(tmp_path / "cut" / "last" / "model.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


# ---------------------------------------------------------------------------------------------- 0/255 masks
def _black_and_white(root: Path, splits=("train", "val")) -> None:
    rng = np.random.default_rng(0)
    for split in splits:
        images, masks = _folders(root, split, "masks")
        for i in range(3):
            pixels = rng.integers(0, 80, (32, 32, 3), dtype=np.uint8)
            mask = np.zeros((32, 32), dtype=np.uint8)
            mask[8:24, 8:24] = 255  # the object, drawn white
            pixels[8:24, 8:24] = 220
            PIL.Image.fromarray(pixels).save(images / f"{i}.png")
            PIL.Image.fromarray(mask).save(masks / f"{i}.png")


def test_black_and_white_binary_masks_are_refused_before_they_train_on_background_only(tmp_path, capsys):
    """Masks saved as 0/255 pictures (the usual binary mask): 255 is the ignore value, so every object pixel was left
    out, the classes counted off the masks were background alone, and the run reported mean IoU 1.0000 (background
    IoU 1, the object's never scored)."""
    from pvtv2.cli import main

    _black_and_white(tmp_path / "data")
    out = tmp_path / "run"
    code = main(["train-seg", str(tmp_path / "data"), "--output", str(out), "--epochs", "1", "--image-size", "32",
                 "--batch-size", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "hold only 0 and 255 (all 3 of them): 255 is the ignore value" in err
    assert not out.exists()
    with pytest.raises(ValueError, match=r"hold only 0 and 255 .* save mask // 255"):
        evaluate_segmenter(_binary_model(5.0), tmp_path / "data")


def test_the_same_masks_as_0_and_1_train_and_masks_with_some_ignored_pixels_pass(tmp_path):
    from pvtv2.data.masks import check_not_binary_255, scan_segmentation_split

    _black_and_white(tmp_path, ("val",))
    for path in (tmp_path / "val" / "masks").iterdir():
        PIL.Image.fromarray(np.asarray(PIL.Image.open(path)) // 255).save(path)
    check_not_binary_255(scan_segmentation_split(tmp_path, "val"))
    result = evaluate_segmenter(_binary_model(5.0), tmp_path)  # the class everywhere: its IoU is its share
    assert result["per_class_iou"]["crack"] == pytest.approx(16 * 16 / (32 * 32))
    path = tmp_path / "val" / "masks" / "0.png"
    mask = np.asarray(PIL.Image.open(path)).copy()
    mask[0, :4] = 255  # a few ignored pixels among classes 0 and 1: a normal mask
    PIL.Image.fromarray(mask).save(path)
    check_not_binary_255(scan_segmentation_split(tmp_path, "val"))


# ---------------------------------------------------------------------------------------------- class names
def _constant_model(id2label: dict, label: int) -> PvtV2ForSemanticSegmentation:
    """A model that predicts class ``label`` at every pixel."""
    model = PvtV2ForSemanticSegmentation(PvtV2Config(**TINY, id2label=id2label))
    bias = torch.zeros(len(id2label))
    bias[label] = 5.0
    with torch.no_grad():
        model.decode_head.classifier.weight.zero_()
        model.decode_head.classifier.bias.copy_(bias)
    return model


def test_eval_segmentation_matches_mask_values_to_the_models_classes_by_labels_json(tmp_path):
    """A model trained on data that listed its classes as a, b, c, evaluated on data whose labels.json lists b, a, c:
    mask value 0 (b) was scored against the model's class 0 (a), silently. Here the model predicts b everywhere and
    b covers the left three quarters: IoU(b) = 3/4, IoU(a) = 0, c absent (by hand)."""
    import json

    images, masks = _folders(tmp_path, "val", "masks")
    PIL.Image.fromarray(np.full((32, 32, 3), 100, dtype=np.uint8)).save(images / "a.png")
    mask = np.zeros((32, 32), dtype=np.uint8)  # 0 = b
    mask[:, 24:] = 1  # 1 = a
    PIL.Image.fromarray(mask).save(masks / "a.png")
    (tmp_path / "labels.json").write_text(json.dumps({"0": "b", "1": "a", "2": "c"}))
    model = _constant_model({0: "a", 1: "b", 2: "c"}, 1)
    result = evaluate_segmenter(model, tmp_path)
    assert result["per_class_iou"] == {"a": 0.0, "b": 0.75, "c": None}
    assert result["mean_iou"] == pytest.approx(0.375) and result["pixel_accuracy"] == pytest.approx(0.75)

    (tmp_path / "labels.json").write_text(json.dumps({"0": "a", "1": "b", "2": "c"}))  # the model's own order
    assert evaluate_segmenter(model, tmp_path)["per_class_iou"] == {"a": 0.0, "b": 0.25, "c": None}  # 0 is a now
    (tmp_path / "labels.json").write_text(json.dumps({"0": "b", "1": "dog"}))
    with pytest.raises(ValueError, match=r"classes \['dog'\] of .*labels.json' are not classes of the model"):
        evaluate_segmenter(model, tmp_path)
    (tmp_path / "labels.json").write_text(json.dumps({"0": "b"}))
    with pytest.raises(ValueError, match=r"holds class\(es\) \[1\] that labels.json does not name"):
        evaluate_segmenter(model, tmp_path)
    generic = _constant_model({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, 1)  # no names: the values are its classes
    (tmp_path / "labels.json").write_text(json.dumps({"0": "b", "1": "a", "2": "c"}))
    assert evaluate_segmenter(generic, tmp_path)["per_class_iou"] == {"LABEL_0": 0.0, "LABEL_1": 0.25, "LABEL_2": None}


def test_fine_tuning_a_segmenter_on_its_classes_in_another_order_permutes_its_classifier(tmp_path, caplog):
    """The checkpoint's classifier was kept under the data's class names whatever they were: the same classes listed
    in another order started from a head whose rows meant other classes, and other classes of the same count kept a
    head meaning something else, where classification permutes the rows, or refuses without --replace-head (which
    segmentation ignored)."""
    import logging

    from pvtv2.training import TrainConfig
    from pvtv2.training.segmentation import build_segmentation_model

    source = PvtV2ForSemanticSegmentation(PvtV2Config(**TINY, id2label={0: "a", 1: "b", 2: "c"}))
    source.save_pretrained(tmp_path / "ckpt")
    weight, bias = source.decode_head.classifier.weight.detach(), source.decode_head.classifier.bias.detach()

    def build(id2label: dict, **changes) -> PvtV2ForSemanticSegmentation:
        cfg = TrainConfig(task="segmentation", model=str(tmp_path / "ckpt"), image_size=32, **changes)
        return build_segmentation_model(cfg, id2label)

    model = build({0: "b", 1: "c", 2: "a"})
    assert model.config.id2label == {0: "b", 1: "c", 2: "a"}
    assert torch.equal(model.decode_head.classifier.weight, weight[[1, 2, 0]])
    assert torch.equal(model.decode_head.classifier.bias, bias[[1, 2, 0]])
    with pytest.raises(ValueError, match=r"pairs differ, e.g. \[\('a', 'x'\).*--replace-head"):
        build({0: "x", 1: "y", 2: "z"})
    replaced = build({0: "x", 1: "y", 2: "z"}, replace_head=True)
    assert replaced.config.id2label == {0: "x", 1: "y", 2: "z"}
    assert not torch.equal(replaced.decode_head.classifier.weight, weight)
    assert torch.equal(build({0: "a", 1: "b", 2: "c"}).decode_head.classifier.weight, weight)  # its own classes
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        other = build({0: "a", 1: "b"})  # another count: a new classifier, announced once
    assert other.config.id2label == {0: "a", 1: "b"} and other.decode_head.classifier.weight.shape[0] == 2
    assert sum("replacing the classifier head" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("detector", ["fcos", "retinanet", "mask_rcnn"])
def test_fine_tuning_a_detector_on_its_classes_in_another_order_detects_the_same_objects(tmp_path, detector):
    """A saved detector fine-tuned on data listing its classes in another order kept its class-sized layers under
    the new names: every detection changed class. Now the layers are permuted: the same boxes and scores come out
    under the same class names as the checkpoint's own (torchvision's detector run on both)."""
    pytest.importorskip("torchvision")
    from pvtv2.models.detection import PvtV2ForObjectDetection
    from pvtv2.training import TrainConfig
    from pvtv2.training.detection import build_detector

    torch.manual_seed(0)
    config = PvtV2Config(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 32, 64], num_attention_heads=[1, 1, 1, 1],
                         id2label={0: "a", 1: "b", 2: "c"}, detector=detector, fpn_channels=64, min_size=64,
                         max_size=128, score_threshold=0.0)
    source = PvtV2ForObjectDetection(config)
    with torch.no_grad():  # class layers whose rows differ clearly
        for prefix in source.classifier_prefix:
            for p in source.get_submodule(prefix.rstrip(".")).parameters():
                p.add_(torch.randn_like(p))
    source.save_pretrained(tmp_path / "ckpt")
    cfg = TrainConfig(task="detection", model=str(tmp_path / "ckpt"), detector=detector, image_size=64)
    model = build_detector(cfg, {0: "c", 1: "a", 2: "b"})
    assert model.config.id2label == {0: "c", 1: "a", 2: "b"}
    image = torch.rand(3, 64, 80)

    expected = detections_by_name(source, image)
    assert len(expected) > 10 and len({e[0] for e in expected}) >= 2  # classes told apart, not one everywhere
    assert detections_by_name(model, image) == expected
    with pytest.raises(ValueError, match="--replace-head"):
        build_detector(cfg, {0: "x", 1: "y", 2: "z"})
    replaced = build_detector(dataclasses_replace(cfg, replace_head=True), {0: "x", 1: "y", 2: "z"})
    first = replaced.classifier_prefix[0].rstrip(".")
    assert not torch.equal(replaced.get_submodule(first).weight, source.get_submodule(first).weight)


def dataclasses_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def test_pvtv2_depth_predicts_a_depth_run_at_the_size_it_was_evaluated_at(tmp_path, capsys):
    """A depth run trained and evaluated at --image-size 32 on 64 px rooms: pvtv2 depth predicted at the image's own
    64 px, a scale the model never saw, so its depth was not what the run's metrics describe (on 96 px rooms
    trained at 64: AbsRel 0.21 at 96 px against the run's 0.16). The run's preprocessor_config.json size is now the
    default; computed here by hand (PIL bilinear resize, [0, 1], the model, bilinear back)."""
    import re

    from pvtv2.cli import main
    from pvtv2.data.scenes import make_depth_example
    from pvtv2.models.depth import PvtV2ForDepthEstimation

    data = make_depth_example(tmp_path / "rooms", n_train=4, n_val=1, size=64, seed=4)
    out = tmp_path / "run"
    assert main(["train", "--task", "depth", "--data", str(data), "--model", "tiny", "--output", str(out), "--epochs",
                 "1", "--image-size", "32", "--batch-size", "4", "--no-progress"]) == 0
    capsys.readouterr()
    image_path = data / "val" / "images" / "00000.png"
    assert main(["depth", str(image_path), "--model", str(out / "last"), "--output", str(tmp_path / "d.png")]) == 0
    low, high = map(float, re.search(r"depth from ([\d.]+) to ([\d.]+)", capsys.readouterr().out).groups())

    model = PvtV2ForDepthEstimation.from_pretrained(out / "last").eval()

    def by_hand(side: int) -> np.ndarray:
        image = PIL.Image.open(image_path).convert("RGB").resize((side, side), PIL.Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        with torch.no_grad():
            depth = model(pixels).predicted_depth[:, None]
        return torch.nn.functional.interpolate(depth, size=(64, 64), mode="bilinear")[0, 0].numpy()

    expected = by_hand(32)
    assert low == pytest.approx(expected.min(), abs=6e-4) and high == pytest.approx(expected.max(), abs=6e-4)
    own = by_hand(64)
    assert abs(own.max() - expected.max()) > 3e-3 or abs(own.min() - expected.min()) > 3e-3  # the test can tell


def test_detect_and_eval_refuse_an_imagenet_classifier_as_one_without_a_detector(tmp_path, capsys):
    """An ImageNet classifier given to pvtv2 detect / eval --task detection said "pass the object classes,
    id2label={0: 'cat', ...} or num_labels=K", advice for building a detector in Python that no command takes."""
    from pvtv2 import PvtV2ForImageClassification
    from pvtv2.cli import main
    from pvtv2.models.labels import imagenet_id2label

    config = PvtV2Config(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 32, 64], num_attention_heads=[1, 1, 1, 1],
                         id2label=imagenet_id2label())
    PvtV2ForImageClassification(config).save_pretrained(tmp_path / "inet")
    PIL.Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    assert main(["detect", str(tmp_path / "x.png"), "--model", str(tmp_path / "inet"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "has no trained detector: it is an ImageNet classifier" in err and "pvtv2 train --task detection" in err
    assert "id2label" not in err


def test_resuming_a_depth_run_with_its_depth_flags_is_checked_against_the_run_not_refused_as_classification(
        tmp_path, capsys):
    """`pvtv2 train --output RUN --resume --depth-scale 500` (the run's own flags repeated) was refused with
    "--depth-scale applies to --task depth only, not --task classification": the task of a resumed run was not yet
    known when task-only flags were checked."""
    from pvtv2.cli import main
    from pvtv2.data.scenes import make_depth_example

    data = make_depth_example(tmp_path / "rooms", n_train=2, n_val=1, size=32, seed=5)
    out = str(tmp_path / "run")
    assert main(["train", "--task", "depth", "--data", str(data), "--model", "tiny", "--output", out, "--epochs", "1",
                 "--image-size", "32", "--batch-size", "2", "--depth-scale", "500", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--output", out, "--resume", "--depth-scale", "500", "--no-progress"]) == 0
    assert "trained 1 epoch:" in capsys.readouterr().out
    assert main(["train", "--output", out, "--resume", "--depth-scale", "400", "--no-progress"]) == 2
    assert "it was started with --depth-scale 500.0, not 400.0" in capsys.readouterr().err


def test_detection_training_refuses_a_validation_split_without_objects(tmp_path, capsys):
    """A val file without objects: COCOeval gave -1 every epoch, no epoch beat the start, best/ was never written,
    and the run ended with "best box AP 0.0000 at epoch -1" and a best/ path that did not exist."""
    import json

    from pvtv2.cli import main

    rng = np.random.default_rng(0)
    (tmp_path / "data" / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir()
        PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "data" / split / "a.png")
        annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0}]
        if split == "val":
            annotations = [{**annotations[0], "iscrowd": 1}]  # a crowd region only: nothing COCOeval scores
        data = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}], "annotations": annotations,
                "categories": [{"id": 1, "name": "thing"}]}
        (tmp_path / "data" / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    out = tmp_path / "run"
    assert main(["train", "--task", "detection", "--detector", "fcos", "--data", str(tmp_path / "data"), "--model",
                 "tiny", "--output", str(out), "--epochs", "1", "--image-size", "64", "--no-progress"]) == 2
    assert "instances_val.json' lists no objects" in capsys.readouterr().err
    assert not out.exists()


def test_depth_training_refuses_validation_maps_without_any_measurement(tmp_path, capsys):
    """Every metric NaN, no best/ written while the run named one: refused before training."""
    from pvtv2.cli import main
    from pvtv2.data.scenes import make_depth_example

    data = make_depth_example(tmp_path / "rooms", n_train=2, n_val=2, size=32, seed=6)
    for path in (data / "val" / "depth").iterdir():
        write_depth_png(path, np.zeros((32, 32)))
    out = tmp_path / "run"
    assert main(["train", "--task", "depth", "--data", str(data), "--model", "tiny", "--output", str(out), "--epochs",
                 "1", "--image-size", "32", "--no-progress"]) == 2
    assert "no validation depth map in" in capsys.readouterr().err and not out.exists()


def test_boxes_reaching_outside_their_image_are_counted_in_a_warning(tmp_path, caplog):
    """[x1, y1, x2, y2] boxes written where COCO wants [x, y, w, h] were clipped to their image without a word (each
    box grown by its corner's offset). Two of the three here reach out, counted by hand; crowd regions are not."""
    import json
    import logging

    from pvtv2.data.coco import read_coco_annotations

    boxes = [[10, 10, 20, 20], [40, 30, 60, 50], [5, 50, 30, 60], [30, 30, 60, 60]]  # as x1 y1 x2 y2
    annotations = [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": 100.0, "iscrowd": int(i == 3)}
                   for i, b in enumerate(boxes)]
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}], "annotations": annotations,
            "categories": [{"id": 1, "name": "x"}]}
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(data))
    by_hand = [a["id"] for a in annotations[:3] if a["bbox"][0] + a["bbox"][2] > 65 or a["bbox"][1] + a["bbox"][3] > 65]
    assert by_hand == [2, 3]
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        read_coco_annotations(path)
    assert ("instances_val.json: 2 of 4 box(es) reach more than a pixel outside their image (ids 2, 3)"
            in caplog.text)
    caplog.clear()
    for a in annotations:  # as COCO writes them
        a["bbox"] = [a["bbox"][0], a["bbox"][1], a["bbox"][2] - a["bbox"][0], a["bbox"][3] - a["bbox"][1]]
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        read_coco_annotations(path)
    assert "outside their image" not in caplog.text
