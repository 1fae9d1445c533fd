"""Seeded search over the dense-prediction protocols, each case against a computation written here:

- ``evaluate_segmenter`` end to end (image and mask files of every mode it reads, SegFormer's preprocessing,
  whole-image and sliding-window inference of a float64 tiny SegFormer, ADE20K-style masks, any ignore value) against
  transformers' rescale / normalise arithmetic, mmsegmentation's ``slide_inference`` and its ``intersect_and_union`` /
  ``total_area_to_metrics`` (aAcc, per-class IoU NaN for a class absent from labels and predictions, nanmean) in numpy;
- the depth task's validation metrics read from 16-bit PNG files against BTS's errors by hand, means over images;
- what the search found: nothing labelled scored mean IoU 0 and pixel accuracy 0 (mmsegmentation: NaN; a model wrong
  at every pixel), in ``segmentation_metrics``, ``pvtv2 eval`` and training; masks holding nothing but the ignore
  value refused with the advice for black-and-white pictures; a negative mask value stopping evaluation inside
  NumPy; a JPEG mask under a .png name scored with its compression errors; classes sharing a name losing their
  per-class IoU; depth training whose validation pixels all lie outside the metrics' range (beyond ``max_depth``,
  or outside Eigen's crop) ending with exit 0, every metric NaN and no ``best/``.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

import pvtv2.inference as inference
from pvtv2 import PvtV2Config
from pvtv2.cli import main
from pvtv2.data.depth import write_depth_png
from pvtv2.data.masks import read_mask
from pvtv2.inference import evaluate_segmenter
from pvtv2.models.segmentation import PvtV2ForSemanticSegmentation
from pvtv2.training.segmentation import evaluate_segmentation, segmentation_metrics

from conftest import TINY_SMALL_IMAGES, random_weights_
from dense_references import bts_metrics, mmseg_scores, mmseg_slide, write_mask

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)  # ImageNet's, as SegFormer's processor normalises
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # many tiny forward passes (conftest puts the count back)


# ------------------------------------------------------------------------------------ independent definitions
def segformer_pixels(rgb: np.ndarray) -> torch.Tensor:
    """transformers' ``SegformerImageProcessor`` arithmetic at the image's own size: rescale by 1/255 (float64, then
    float32), normalise in float32; (1, 3, H, W)."""
    scaled = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
    return torch.from_numpy(((scaled - MEAN) / STD).transpose(2, 0, 1).copy())[None]


# ---------------------------------------------------------------------------------------- segmentation, end to end
def test_evaluate_segmenter_is_mmsegmentations_protocol_end_to_end(tmp_path):
    """24 random data sets of 1-3 images (17-70 px a side) scored by a float64 tiny SegFormer, whole or sliding
    window (random crop and stride), raw or ADE20K-style masks (8-bit, palette or 16-bit PNG), ignore value 255 or
    another above the classes."""
    rng = np.random.default_rng(3501)
    for case in range(24):
        k = int(rng.integers(2, 6))
        torch.manual_seed(case)
        config = PvtV2Config(**TINY_SMALL_IMAGES, num_labels=k, decoder_hidden_size=16, classifier_dropout_prob=0.0)
        model = random_weights_(PvtV2ForSemanticSegmentation(config), seed=3500 + case).double().eval()
        reduce = bool(rng.random() < 0.4)
        ignore = 255 if reduce or rng.random() < 0.5 else int(rng.choice([k, k + 9, 1000]))
        slide = bool(rng.random() < 0.6)
        crop = (int(rng.integers(16, 48)), int(rng.integers(16, 48)))
        stride = (int(rng.integers(1, crop[0] + 1)), int(rng.integers(1, crop[1] + 1))) if rng.random() < 0.7 else None
        root = tmp_path / str(case)
        (root / "val/images").mkdir(parents=True)
        (root / "val/masks").mkdir(parents=True)
        preds, labels = [], []
        height, width = int(rng.integers(17, 71)), int(rng.integers(17, 71))
        for n in range(int(rng.integers(1, 4))):
            if slide:  # each image at its own size; whole-image inference takes one size (given: no resizing)
                height, width = int(rng.integers(17, 71)), int(rng.integers(17, 71))
            rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            PIL.Image.fromarray(rgb).save(root / f"val/images/{n}.png")
            raw = rng.integers(0, k + 1 if reduce else k, (height, width))
            raw[rng.random((height, width)) < 0.15] = ignore
            mode = str(rng.choice(["L", "P", "I;16"])) if ignore < 256 else "I;16"
            write_mask(root / f"val/masks/{n}.png", raw, mode, rng)
            pixels = segformer_pixels(rgb).double()
            with torch.no_grad():
                if slide:
                    steps = stride or (crop[0] * 2 // 3, crop[1] * 2 // 3)
                    logits = mmseg_slide(model, pixels, crop, steps)
                else:
                    logits = F.interpolate(model(pixels).logits, size=(height, width), mode="bilinear",
                                           align_corners=False)
            preds.append(logits[0].argmax(0).numpy())
            labels.append(raw)
        options = dict(mode="slide", crop=crop, stride=stride) if slide else dict(size=(height, width))
        got = evaluate_segmenter(model, root, reduce_labels=reduce, ignore_index=ignore, **options)
        ref = mmseg_scores(preds, labels, k, ignore, reduce)
        per_class = np.array([np.nan if v is None else v for v in got["per_class_iou"].values()], dtype=np.float64)
        np.testing.assert_allclose(per_class, ref["IoU"], rtol=0, atol=1e-12, err_msg=str(case))  # NaN where NaN
        assert got["mean_iou"] == pytest.approx(ref["mIoU"], abs=1e-12), case
        assert got["pixel_accuracy"] == pytest.approx(ref["aAcc"], abs=1e-12), case
        assert got["images"] == len(labels)


# ---------------------------------------------------------------------------------------------- nothing labelled
def test_segmentation_metrics_without_a_labelled_pixel_are_nan_as_mmsegmentations():
    """An empty confusion matrix scored mean IoU 0.0 and pixel accuracy 0.0: the numbers of a model wrong at every
    pixel, for a data set with nothing to score. mmsegmentation's ``total_area_to_metrics`` gives NaN (0 / 0)."""
    for k in (2, 3, 7):
        got = segmentation_metrics(np.zeros((k, k), dtype=np.int64))
        ref = mmseg_scores([np.zeros((2, 2), np.int64)], [np.full((2, 2), 255)], k, 255, False)
        assert math.isnan(ref["mIoU"]) and math.isnan(ref["aAcc"])
        assert math.isnan(got["mean_iou"]) and math.isnan(got["pixel_accuracy"])
        assert got["per_class_iou"] == [None] * k
    # The training evaluation of a model on labels that are all ignored: no loss either (it said 0.0).
    torch.manual_seed(0)
    model = PvtV2ForSemanticSegmentation(PvtV2Config(**TINY_SMALL_IMAGES, num_labels=3)).eval()
    got = evaluate_segmentation(model, [(torch.randn(2, 3, 32, 32), torch.full((2, 32, 32), 255))])
    assert math.isnan(got["loss"]) and math.isnan(got["mean_iou"]) and math.isnan(got["pixel_accuracy"])
    one = segmentation_metrics(np.array([[0, 0], [0, 3]]))  # one labelled class: its IoU is the mean
    assert one["mean_iou"] == 1.0 and one["pixel_accuracy"] == 1.0 and one["per_class_iou"] == [None, 1.0]


def _segmentation_folder(root, split: str, masks: list[np.ndarray]) -> None:
    (root / split / "images").mkdir(parents=True)
    (root / split / "masks").mkdir(parents=True)
    rng = np.random.default_rng(len(masks))
    for n, mask in enumerate(masks):
        rgb = rng.integers(0, 256, (*mask.shape, 3), dtype=np.uint8)
        PIL.Image.fromarray(rgb).save(root / split / "images" / f"{n}.png")
        PIL.Image.fromarray(mask.astype(np.uint8)).save(root / split / "masks" / f"{n}.png")


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    config = PvtV2Config(**TINY_SMALL_IMAGES, num_labels=3, decoder_hidden_size=16, image_size=32)
    return random_weights_(PvtV2ForSemanticSegmentation(config), seed=35).eval()


def test_eval_of_masks_without_a_labelled_pixel_is_an_error_not_a_score_of_zero(tmp_path, segmenter, capsys):
    """ADE20K-style masks that are all 0 (no label) read with --reduce-labels: every pixel ignored. It printed mean
    IoU 0.0000 and pixel accuracy 0.0000 with exit 0."""
    _segmentation_folder(tmp_path, "val", [np.zeros((32, 40)), np.zeros((32, 32))])
    with pytest.raises(ValueError, match=r"no mask in '.*val/masks' holds a labelled pixel: every pixel is the ignore "
                                         r"value 255 or 0 \(no label, with --reduce-labels\)"):
        evaluate_segmenter(segmenter, tmp_path, reduce_labels=True)
    model_dir = tmp_path / "model"
    segmenter.save_pretrained(model_dir)
    code = main(["eval", "--task", "segmentation", "--model", str(model_dir), "--data", str(tmp_path),
                 "--reduce-labels"])
    err = capsys.readouterr().err
    assert code == 2 and "holds a labelled pixel" in err and "Traceback" not in err
    # One labelled pixel is enough to score, as mmsegmentation would: class 1 at (3, 4) after the reduction.
    mask = np.zeros((32, 32))
    mask[3, 4] = 2
    _segmentation_folder(tmp_path / "one", "val", [mask])
    got = evaluate_segmenter(segmenter, tmp_path / "one", reduce_labels=True)
    assert got["pixel_accuracy"] in (0.0, 1.0) and not math.isnan(got["mean_iou"])


def test_masks_of_nothing_but_the_ignore_value_are_not_called_black_and_white(tmp_path, segmenter):
    """All-255 masks were refused as 0/255 pictures with the advice to save mask // 255, which makes every pixel
    class 1. They hold no labelled pixel at all, and say so."""
    _segmentation_folder(tmp_path, "val", [np.full((32, 32), 255), np.full((32, 36), 255)])
    with pytest.raises(ValueError, match=r"hold only the ignore value 255 \(all 2 of them\): no pixel is labelled") as info:
        evaluate_segmenter(segmenter, tmp_path)
    assert "mask // 255" not in str(info.value)
    seven = tmp_path / "seven"
    _segmentation_folder(seven, "val", [np.full((32, 32), 7)])
    with pytest.raises(ValueError, match="hold only the ignore value 7"):
        evaluate_segmenter(segmenter, seven, ignore_index=7)


def test_a_negative_mask_value_is_refused_naming_the_file(tmp_path, segmenter):
    """A 32-bit signed mask (a TIFF saved under the .png name) with -1 in it stopped evaluation inside NumPy's
    bincount ("'list' argument must have no negative elements"), naming no file."""
    _segmentation_folder(tmp_path, "val", [np.zeros((32, 32))])
    labels = np.zeros((32, 32), dtype=np.int32)
    labels[5, 5] = -1
    PIL.Image.fromarray(labels).save(tmp_path / "val/masks/0.png", format="TIFF")
    with pytest.raises(ValueError, match=r"mask '.*0\.png' holds negative values \(down to -1\)"):
        read_mask(tmp_path / "val/masks/0.png")
    with pytest.raises(ValueError, match=r"mask '.*0\.png' holds negative values"):
        evaluate_segmenter(segmenter, tmp_path)
    labels[5, 5] = 2  # the same file of non-negative 32-bit values is read as it was
    PIL.Image.fromarray(labels).save(tmp_path / "val/masks/0.png", format="TIFF")
    assert np.array_equal(np.asarray(read_mask(tmp_path / "val/masks/0.png")), labels)


def test_training_refuses_validation_masks_without_a_labelled_pixel(tmp_path, capsys):
    """Validation masks all 0 with --reduce-labels: every epoch scored mean IoU 0 (now NaN), best/ picked by it."""
    rng = np.random.default_rng(3502)
    _segmentation_folder(tmp_path / "data", "train", [rng.integers(1, 3, (32, 32)) for _ in range(2)])
    _segmentation_folder(tmp_path / "data", "val", [np.zeros((32, 32)), np.zeros((32, 32))])
    argv = ["train", "--task", "segmentation", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "run"),
            "--model", "tiny", "--epochs", "1", "--image-size", "32", "--batch-size", "2", "--reduce-labels",
            "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no pixel of the validation masks in" in err and "is labelled at --image-size 32" in err
    assert "or 0 (no label, with --reduce-labels)" in err and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------- depth, end to end
class DepthOfPixels(torch.nn.Module):
    """A depth model whose prediction is a known function of its input: up to 1.2 x max_depth (beyond the range)."""

    def __init__(self, max_depth: float, seed: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(max_depth=max_depth)
        self.weights = torch.randn(3, generator=torch.Generator().manual_seed(seed))
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, pixels: torch.Tensor, return_dict: bool = True) -> SimpleNamespace:
        depth = torch.sigmoid(3 * (pixels * self.weights[:, None, None]).sum(1)) * 1.2 * self.config.max_depth
        return SimpleNamespace(predicted_depth=depth + 0 * self.anchor)


def test_depth_validation_metrics_are_bts_means_over_images_read_from_files(tmp_path):
    """12 random validation folders (16-bit PNGs at depth scales 1000, 256, 100 or 5000, 20% missing, images of any
    size resized to --image-size, depth beyond max_depth, Eigen's crop or not, any batch size) scored by the depth
    task's evaluation against: the PNG's integers / scale, PIL's nearest-neighbour sampling by hand (source pixel
    floor((i + 0.5) * side / size)), the image resized bilinearly to [0, 1], BTS's errors per image, their mean over
    the images with a valid pixel."""
    from pvtv2.training.config import TrainConfig
    from pvtv2.training.depth_task import DepthTask
    from pvtv2.training.distributed import DistInfo
    from pvtv2.training.engine import RunContext

    rng = np.random.default_rng(3504)
    for case in range(12):
        root = tmp_path / str(case)
        scale, max_depth = float(rng.choice([1000, 256, 100, 5000])), float(rng.choice([10, 80, 3.5]))
        size, crop, n = int(rng.choice([32, 64])), bool(rng.random() < 0.4), int(rng.integers(1, 5))
        for split in ("train", "val"):
            (root / split / "images").mkdir(parents=True)
            (root / split / "depth").mkdir(parents=True)
        truths, images = [], []
        for i in range(n):
            height, width = int(rng.integers(20, 100)), int(rng.integers(20, 100))
            rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            stored = rng.integers(1, min(65536, int(max_depth * 1.3 * scale)), (height, width))
            stored[rng.random((height, width)) < 0.2] = 0
            if i == 1 and rng.random() < 0.5:
                stored[:] = 0  # an image without depth: left out of the means, counted
            PIL.Image.fromarray(rgb).save(root / "val/images" / f"{i}.png")
            PIL.Image.fromarray(stored.astype(np.uint16)).save(root / "val/depth" / f"{i}.png")
            truths.append(stored)
            images.append(rgb)
        PIL.Image.fromarray(images[0]).save(root / "train/images/0.png")
        PIL.Image.fromarray(truths[0].astype(np.uint16)).save(root / "train/depth/0.png")
        cfg = TrainConfig(task="depth", data=str(root), model="tiny", image_size=size, output=str(root / "run"),
                          batch_size=int(rng.integers(1, 4)), depth_scale=scale, nyu_crop=crop, max_depth=max_depth)
        task = DepthTask(cfg)
        task.load_data()
        model = DepthOfPixels(max_depth, case)
        loader = torch.utils.data.DataLoader(task.val_set, batch_size=cfg.batch_size, collate_fn=task.collate)
        got = task.evaluate(model, loader, RunContext(torch.device("cpu"), False, DistInfo()))
        expected = []
        for stored, rgb in zip(truths, images):
            height, width = stored.shape
            rows = np.floor((np.arange(size) + 0.5) * height / size).astype(int)
            cols = np.floor((np.arange(size) + 0.5) * width / size).astype(int)
            truth = (stored / scale).astype(np.float32)[rows][:, cols]
            pixels = np.asarray(PIL.Image.fromarray(rgb).resize((size, size), PIL.Image.BILINEAR), np.float32) / 255
            with torch.no_grad():
                pred = model(torch.from_numpy(pixels).permute(2, 0, 1)[None]).predicted_depth[0].numpy()
            expected.append(bts_metrics(pred, truth, 1e-3, max_depth, crop))
        scored = [e for e in expected if e is not None]
        assert (got["images"], got["images_without_depth"]) == (len(scored), n - len(scored)), case
        for name in scored[0]:
            assert got[name] == pytest.approx(np.mean([e[name] for e in scored]), rel=1e-5, abs=1e-7), (case, name)


# ------------------------------------------------------------------------------------------------- depth range
def _depth_folder(root, depth_of) -> None:
    rng = np.random.default_rng(3503)
    for split, n in (("train", 2), ("val", 2)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "depth").mkdir(parents=True)
        for i in range(n):
            PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / "images" / f"{i}.png")
            write_depth_png(root / split / "depth" / f"{i}.png", depth_of(rng))


def _train_depth(tmp_path, data, *extra) -> list[str]:
    return ["train", "--task", "depth", "--data", str(data), "--model", "tiny", "--output", str(tmp_path / "run"),
            "--epochs", "1", "--image-size", "32", "--batch-size", "2", "--no-progress", *extra]


def test_depth_training_refuses_validation_depth_the_metrics_cannot_count(tmp_path, capsys):
    """Every validation pixel 12-20 m deep against the default max_depth of 10 m: BTS's and GLPN's evaluation leaves
    them all out, every metric was NaN, and the run ended with exit 0, "best delta1 0.0000 at epoch -1" and a best/
    it named but never wrote. Refused before training, naming --max-depth; with it the run scores them."""
    data = tmp_path / "far"
    _depth_folder(data, lambda rng: rng.uniform(12, 20, (32, 32)))
    assert main(_train_depth(tmp_path, data)) == 2
    err = capsys.readouterr().err
    assert "has a depth the metrics count, between 0.001 m and the model's max_depth 10 m" in err
    assert "--max-depth" in err and not (tmp_path / "run").exists()
    assert main(_train_depth(tmp_path, data, "--max-depth", "25")) == 0
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["images"] == 2 and 0 <= record["delta1"] <= 1 and (tmp_path / "run" / "best").is_dir()


def test_depth_training_with_nyu_crop_refuses_depth_only_outside_the_crop(tmp_path, capsys):
    """Depth measured only in the border Eigen's crop leaves out (rows 0-2 of 32, by its 45/480 fraction): with
    --nyu-crop no pixel is scored; without it the same data trains."""
    top = round(45 * 32 / 480)
    assert top == 3  # Eigen's crop at 32 x 32: rows 3:31, columns 2:30, by hand

    def border_only(rng):
        depth = np.zeros((32, 32))
        depth[:top] = rng.uniform(1, 5, (top, 32))
        return depth

    data = tmp_path / "border"
    _depth_folder(data, border_only)
    assert main(_train_depth(tmp_path, data, "--nyu-crop")) == 2
    assert "inside Eigen's crop (--nyu-crop)" in capsys.readouterr().err


def test_black_and_white_masks_after_32_of_the_ignore_value_alone_are_still_called_black_and_white(tmp_path):
    """The first 32 masks all 255, the 33rd 0 and 255: a black-and-white data set (its advice stands), not one
    without a labelled pixel (0 is background)."""
    from pvtv2.data.masks import check_not_binary_255

    folder = tmp_path / "masks"
    folder.mkdir()
    pairs = []
    for i in range(33):
        mask = np.full((4, 4), 255, dtype=np.uint8)
        mask[0, 0] = 0 if i == 32 else 255
        PIL.Image.fromarray(mask).save(folder / f"{i:03d}.png")
        pairs.append((folder / f"{i:03d}.png", folder / f"{i:03d}.png"))
    with pytest.raises(ValueError, match=r"hold only 0 and 255 .*save mask // 255"):
        check_not_binary_255(pairs)
    pairs.pop()
    with pytest.raises(ValueError, match=r"hold only the ignore value 255 \(all 32 of them\)"):
        check_not_binary_255(pairs)


def test_per_class_iou_of_classes_sharing_a_name_keeps_each_class(tmp_path, monkeypatch):
    """A checkpoint's id2label naming two classes alike: the per-class IoU, keyed by name, kept the last one's under
    the shared name and lost the other. By hand: labels [0 0 1 2], predicted [0 1 1 2]."""
    torch.manual_seed(0)
    config = PvtV2Config(**TINY_SMALL_IMAGES, num_labels=3, id2label={0: "wall", 1: "wall", 2: "sky"})
    model = PvtV2ForSemanticSegmentation(config).eval()
    _segmentation_folder(tmp_path, "val", [np.array([[0, 0, 1, 2]] * 16)])

    def predicted(model, image, size=None, **options):
        return np.array([[0, 1, 1, 2]] * 16)

    monkeypatch.setattr(inference, "predict_segmentation", predicted)  # a prediction known here
    got = evaluate_segmenter(model, tmp_path)
    assert got["per_class_iou"] == {"wall (0)": 0.5, "wall (1)": 0.5, "sky": 1.0}
    assert got["mean_iou"] == pytest.approx(2 / 3) and got["pixel_accuracy"] == 0.75


def test_a_jpeg_mask_under_a_png_name_is_refused_not_scored_with_its_compression_errors(tmp_path, segmenter):
    """Classes 0, 1 and 2 saved as JPEG (quality 90): dozens of the 1024 decoded values are other classes than the
    ones written (all still 0, 1 or 2), and they were read and scored without a word."""
    labels = np.zeros((32, 32), dtype=np.uint8)
    labels[:, 13:] = 2  # an edge inside a JPEG block
    labels[5:9, 3:6] = 1
    _segmentation_folder(tmp_path, "val", [labels])
    PIL.Image.fromarray(labels).save(tmp_path / "val/masks/0.png", format="JPEG", quality=90)
    with PIL.Image.open(tmp_path / "val/masks/0.png") as decoded:
        values = np.asarray(decoded)
        assert decoded.format == "JPEG" and values.max() <= 2 and (values != labels).sum() > 0
    with pytest.raises(ValueError, match=r"mask '.*0\.png' is a JPEG .*save label maps as PNG"):
        evaluate_segmenter(segmenter, tmp_path, ignore_index=255)
