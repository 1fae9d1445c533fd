"""Seeded random search over the dense-prediction side, each case against an independent computation written here:

- segmentation scores (``segmentation_metrics``, the training evaluation, ``evaluate_segmenter`` on mask files of
  every mode it reads) against mmsegmentation's ``intersect_and_union`` / ``total_area_to_metrics`` definitions in
  numpy (histograms of the kept pixels; IoU NaN for a class absent from labels and predictions, left out of mIoU);
- sliding-window logits against mmsegmentation's ``slide_inference`` (grid count, windows clamped to the image end,
  each window's logits resized to it, padded into place and averaged by a count map), whole and multi-scale + flip
  against ``aug_test`` (each view resized back bilinearly, softmax, mirrored back, mean), in float64;
- depth metrics against BTS's closed forms, per image and as means over images from batch sums cut anywhere;
- random SegFormer / GLPN configurations against transformers in float64;
- the faults the search found: float64 logits rounded to float32, flipped or big-endian depth maps refused, a bad
  output_size reaching F.interpolate, a mask value beyond the classes stopping training without its file named (and,
  with --workers, under torch's worker traceback).
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
from pvtv2 import PvtV2Config, PvtV2ForDepthEstimation
from pvtv2.cli import main
from pvtv2.data.masks import SegmentationFolder, reduce_labels
from pvtv2.inference import segmentation_logits, segmentation_probabilities
from pvtv2.models.segmentation import PvtV2ForSemanticSegmentation
from pvtv2.training.depth import DEPTH_METRICS, depth_metric_sums, depth_metrics, finish_depth_metrics
from pvtv2.training.segmentation import evaluate_segmentation, segmentation_metrics

from conftest import TINY, random_weights_, relative_error, scramble_batch_norm_statistics_
from dense_references import bts_metrics, mmseg_scores, mmseg_slide, write_mask


@pytest.fixture(autouse=True)
def _one_thread():
    """Thousands of tiny tensor operations: one thread (conftest puts the count back). On the shared 2-core machine
    under load, two threads made them 60 times slower."""
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------ mmsegmentation's definitions
def assert_scores(got: dict, ref: dict, per_class) -> None:
    if ref["labelled"] == 0:  # nothing labelled: NaN for both, as mmsegmentation (0.0 read as every pixel wrong)
        assert math.isnan(got["pixel_accuracy"]) and math.isnan(got["mean_iou"])
        return
    per = np.array([np.nan if v is None else v for v in per_class], dtype=np.float64)
    np.testing.assert_allclose(per, ref["IoU"], rtol=0, atol=1e-12)  # NaN where NaN
    assert got["mean_iou"] == pytest.approx(ref["mIoU"], abs=1e-12)
    assert got["pixel_accuracy"] == pytest.approx(ref["aAcc"], abs=1e-12)


def test_segmentation_metrics_are_mmsegmentations_over_random_labels():
    rng = np.random.default_rng(3201)
    for case in range(1500):
        k = int(rng.integers(2, 9))
        reduce = bool(rng.random() < 0.3)
        ignore = 255 if reduce else int(rng.choice([255, k, k + int(rng.integers(1, 300))]))
        present = np.flatnonzero(rng.random(k) < 0.6)  # classes absent from labels (and often predictions)
        present = present if present.size else np.array([0])
        confusion = np.zeros((k, k), np.int64)
        preds, labels = [], []
        for _ in range(int(rng.integers(1, 4))):
            shape = (int(rng.integers(1, 12)), int(rng.integers(1, 12)))
            label = rng.choice(present + (1 if reduce else 0), size=shape)
            label[rng.random(shape) < rng.random() * 0.6] = 0 if reduce and rng.random() < 0.5 else ignore
            pred = rng.choice(present if rng.random() < 0.5 else np.arange(k), size=shape)
            mine = reduce_labels(label.astype(np.uint8), ignore) if reduce else label
            keep = mine != ignore
            np.add.at(confusion, (mine[keep].astype(np.int64), pred[keep]), 1)
            preds.append(pred)
            labels.append(label)
        got = segmentation_metrics(confusion)
        assert_scores(got, mmseg_scores(preds, labels, k, ignore, reduce), got["per_class_iou"])


class GivenLogits(torch.nn.Module):
    """A segmentation model whose logits are its input (``pixels`` are the (B, K, h, w) logits themselves)."""

    def __init__(self, num_labels: int, ignore_index: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_labels=num_labels, semantic_loss_ignore_index=ignore_index)
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, pixels: torch.Tensor, return_dict: bool = True) -> SimpleNamespace:
        return SimpleNamespace(logits=pixels + 0 * self.anchor)


def test_training_evaluation_scores_the_upsampled_argmax_as_mmsegmentation():
    rng = np.random.default_rng(3202)
    for case in range(300):
        k = int(rng.integers(1, 6))  # 1: a binary model, class 1 where the logit is positive
        classes = max(2, k)
        ignore = int(rng.choice([255, classes, classes + 3]))
        loader, preds, labels = [], [], []
        for _ in range(int(rng.integers(1, 4))):
            b, h, w = int(rng.integers(1, 3)), int(rng.integers(1, 9)), int(rng.integers(1, 9))
            height, width = h * int(rng.integers(1, 5)) + int(rng.integers(0, 2)), max(1, w * int(rng.integers(1, 5)) - 1)
            logits = torch.randn(b, k, h, w, generator=torch.Generator().manual_seed(case))
            label = torch.from_numpy(rng.integers(0, classes, size=(b, height, width)))
            label[torch.from_numpy(rng.random((b, height, width)) < 0.2)] = ignore
            loader.append((logits, label))
            # mmsegmentation's resize (bilinear, align_corners=False) of each image's logits to its labels, in float64
            up = F.interpolate(logits.double(), size=(height, width), mode="bilinear", align_corners=False).numpy()
            preds += list((up[:, 0] > 0).astype(np.int64) if k == 1 else up.argmax(1))
            labels += list(label.numpy())
        got = evaluate_segmentation(GivenLogits(k, ignore), loader)
        assert_scores(got, mmseg_scores(preds, labels, classes, ignore), got["per_class_iou"])


def test_evaluate_segmenter_reads_every_mask_mode_and_scores_as_mmsegmentation(tmp_path, monkeypatch):
    """Masks as 8-bit, palette and 16-bit PNGs; ADE20K-style 0s; the model's or a given ignore value (a negative
    model value ignores nothing but the reduced 0s); labels.json listing the model's classes in another order."""

    def predicted(model, image, size=None, **options):  # a prediction read off the pixels, known here
        rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
        return (rgb[..., 0] * 7 + rgb[..., 1]) % max(2, model.config.num_labels)

    monkeypatch.setattr(inference, "predict_segmentation", predicted)
    rng = np.random.default_rng(3203)
    for case in range(100):
        root = tmp_path / str(case)
        (root / "val/images").mkdir(parents=True)
        (root / "val/masks").mkdir(parents=True)
        k = int(rng.integers(1, 7))
        classes = max(2, k)
        reduce = bool(rng.random() < 0.4)
        model_ignore = int(rng.choice([255, -100, classes + int(rng.integers(0, 5)), 65535]))
        given = None if rng.random() < 0.5 else int(rng.choice([255, classes, classes + 7, 1000]))
        ignore = model_ignore if given is None else given
        names = {i: f"c{i}" for i in range(k)}
        model = SimpleNamespace(config=SimpleNamespace(num_labels=k, semantic_loss_ignore_index=model_ignore,
                                                       id2label=names))
        order = rng.permutation(k) if k > 1 and rng.random() < 0.3 else None  # mask value v is model class order[v]
        if order is not None:
            (root / "labels.json").write_text(json.dumps({str(v): names[int(order[v])] for v in range(k)}))
        preds, labels = [], []
        for i in range(int(rng.integers(1, 4))):
            shape = (int(rng.integers(1, 20)), int(rng.integers(1, 20)))
            pixels = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
            PIL.Image.fromarray(pixels).save(root / f"val/images/{i}.png")
            raw = rng.integers(0, classes + (1 if reduce else 0), size=shape)
            raw[rng.random(shape) < 0.2] = ignore if ignore >= 0 else 0
            write_mask(root / f"val/masks/{i}.png", raw, str(rng.choice(["L", "P", "I;16"]) if raw.max() < 256
                                                             else "I;16"), rng)
            label = raw.copy()
            if reduce:  # 0 is no label, k + 1 is class k; the ignore value stays itself
                label = np.where((raw == 0) | (raw == ignore), ignore, raw - 1)
            if order is not None:
                keep = label != ignore
                label[keep] = order[label[keep]]
            preds.append(predicted(model, PIL.Image.fromarray(pixels)))
            labels.append(label)
        ref = mmseg_scores(preds, labels, classes, ignore)
        if ref["labelled"] == 0:  # nothing to score: an error, not the NaNs (or, before, 0.0) of the metrics
            with pytest.raises(ValueError, match="no mask in .* holds a labelled pixel"):
                inference.evaluate_segmenter(model, root, reduce_labels=reduce, ignore_index=given)
            continue
        got = inference.evaluate_segmenter(model, root, reduce_labels=reduce, ignore_index=given)
        assert_scores(got, ref, list(got["per_class_iou"].values()))


# ------------------------------------------------------------------------------------------- sliding windows
class Context(torch.nn.Module):
    """Logits at 1/4 of the input (ceil) with context: a 3x3 conv, 4x4 mean pooling, the global mean added."""

    def __init__(self, num_labels: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(6, 3, 3, 3, generator=gen, dtype=torch.float64))
        self.w2 = torch.nn.Parameter(torch.randn(num_labels, 6, 1, 1, generator=gen, dtype=torch.float64))

    def forward(self, pixels: torch.Tensor) -> SimpleNamespace:
        hidden = F.avg_pool2d(F.conv2d(pixels, self.w1, padding=1).tanh(), 4, ceil_mode=True)
        return SimpleNamespace(logits=F.conv2d(hidden + hidden.mean((2, 3), keepdim=True), self.w2))


def test_slide_is_mmsegmentations_slide_inference_in_float64():
    """Images smaller than, equal to and larger than the crop, 1 px sides, very wide or tall, any stride up to the
    crop or the default two thirds; float64 throughout (the logits were rounded to float32: 1e-7, not 1e-12)."""
    rng = np.random.default_rng(3204)
    cases = 0
    while cases < 120:
        height = int(rng.choice([1, 2, 3, 5, 31, 32, 33, 64, 65, 97, int(rng.integers(1, 160))]))
        width = int(rng.choice([1, 2, 4, 31, 32, 33, 100, 200, int(rng.integers(1, 260))]))
        crop_h = int(rng.integers(1, 80))
        crop_w = crop_h if rng.random() < 0.4 else int(rng.integers(1, 80))
        if rng.random() < 0.3:
            stride, steps = None, (max(1, crop_h * 2 // 3), max(1, crop_w * 2 // 3))
        else:
            steps = (int(rng.integers(1, crop_h + 1)), int(rng.integers(1, crop_w + 1)))
            stride = steps[0] if steps[0] == steps[1] and rng.random() < 0.5 else steps
        if len(inference.window_starts(height, crop_h, steps[0])) * len(inference.window_starts(width, crop_w, steps[1])) > 48:
            continue
        cases += 1
        model = Context(int(rng.integers(1, 6)), cases)
        image = torch.randn(int(rng.integers(1, 3)), 3, height, width, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(cases))
        crop = crop_h if crop_h == crop_w and rng.random() < 0.5 else (crop_h, crop_w)
        got = segmentation_logits(model, image, mode="slide", crop=crop, stride=stride)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, mmseg_slide(model, image, (crop_h, crop_w), steps), rtol=1e-12, atol=1e-12)


def test_slide_of_a_float64_pvtv2_segmenter_is_mmsegmentations():
    torch.manual_seed(0)
    model = random_weights_(PvtV2ForSemanticSegmentation(PvtV2Config(**TINY, num_labels=3)), seed=32).double().eval()
    rng = np.random.default_rng(3205)
    with torch.no_grad():
        for case in range(6):
            height, width = int(rng.integers(32, 100)), int(rng.integers(32, 100))
            crop = (int(rng.integers(32, 56)), int(rng.integers(32, 56)))
            stride = None if case % 3 == 0 else (int(rng.integers(8, crop[0] + 1)), int(rng.integers(8, crop[1] + 1)))
            image = torch.randn(2, 3, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(case))
            expected = mmseg_slide(model, image, crop, stride or (crop[0] * 2 // 3, crop[1] * 2 // 3))
            torch.testing.assert_close(segmentation_logits(model, image, mode="slide", crop=crop, stride=stride),
                                       expected, rtol=1e-10, atol=1e-10)


def test_multiscale_flip_is_mmsegmentations_aug_test():
    rng = np.random.default_rng(3206)
    for case in range(80):
        k = int(rng.integers(1, 5))  # 1: sigmoid, not softmax
        model = Context(k, case)
        height, width = int(rng.integers(1, 50)), int(rng.integers(1, 50))
        scales = [float(s) for s in rng.choice([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 0.3], size=int(rng.integers(1, 4)))]
        flip, mode = bool(rng.random() < 0.5), str(rng.choice(["whole", "slide"]))
        crop = int(rng.integers(8, 40))
        stride = int(rng.integers(crop // 2, crop + 1))
        output_size = None if rng.random() < 0.5 else (int(rng.integers(1, 60)), int(rng.integers(1, 60)))
        image = torch.randn(int(rng.integers(1, 3)), 3, height, width, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(case))
        got = segmentation_probabilities(model, image, scales=scales, flip=flip, mode=mode, crop=crop, stride=stride,
                                         output_size=output_size)
        views = []
        for scale in scales:
            size = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))  # mmcv's rescale_size
            scaled = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
            for mirrored in (False, True) if flip else (False,):
                view = scaled.flip(3) if mirrored else scaled
                if mode == "slide":
                    logits = mmseg_slide(model, view, (crop, crop), (stride, stride))
                else:
                    logits = F.interpolate(model(view).logits, size=size, mode="bilinear", align_corners=False)
                logits = F.interpolate(logits, size=output_size or (height, width), mode="bilinear",
                                       align_corners=False)
                probs = logits.sigmoid() if k == 1 else logits.softmax(1)
                views.append(probs.flip(3) if mirrored else probs)
        torch.testing.assert_close(got, sum(views) / len(views), rtol=1e-12, atol=1e-12)



@pytest.mark.parametrize("size", [(0, 5), (-1, 3), (5,), (5, 6, 7), (5.5, 3), (True, 3), "ab", 0])
def test_a_bad_output_size_is_refused_by_name(size):
    """They reached F.interpolate ("Input and output sizes should be greater than 0", "'int' object is not
    iterable", an argument-signature dump for a bool)."""
    with pytest.raises(ValueError, match="output_size must be a positive integer or a \\(height, width\\) pair"):
        segmentation_probabilities(Context(3, 0), torch.randn(1, 3, 8, 8, dtype=torch.float64), output_size=size)


def test_one_output_side_is_a_square():
    model, image = Context(2, 1), torch.randn(1, 3, 9, 13, dtype=torch.float64)
    torch.testing.assert_close(segmentation_probabilities(model, image, output_size=7),
                               segmentation_probabilities(model, image, output_size=(7, 7)), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------- depth
def test_depth_metrics_are_bts_closed_forms_and_their_batch_sums_the_means_over_images():
    rng = np.random.default_rng(3207)
    for case in range(400):
        lo, hi = float(rng.choice([1e-3, 0.1, 0.5])), float(rng.choice([10.0, 80.0, 1.0, 3.7]))
        b = int(rng.integers(1, 6))
        height = int(rng.choice([1, 2, 3, 7, 16, 33, 48, int(rng.integers(1, 60))]))
        width = int(rng.choice([1, 5, 64, int(rng.integers(1, 70))]))
        gt = rng.uniform(0, hi * 1.3, (b, height, width))
        for value in (0.0, -1.0, lo, hi, hi * 5):  # none of them valid: at or outside (lo, hi)
            gt[rng.random(gt.shape) < 0.05] = value
        if rng.random() < 0.2:
            gt[0] = 0.0  # an image without depth: left out of the means, counted
        pred = gt * rng.uniform(0.5, 1.8, gt.shape) + rng.normal(0, 0.1, gt.shape)
        for value in (np.nan, np.inf, -np.inf, 0.0, -3.0, 1e9):
            pred[rng.random(pred.shape) < 0.02] = value
        crop = bool(rng.random() < 0.4)
        kind = str(rng.choice(["numpy", "numpy32", "torch32", "torch", "flipped"]))
        if kind == "flipped":  # a mirrored view (negative strides), as np.fliplr gives
            gt, pred = gt[:, :, ::-1], pred[:, :, ::-1]
        convert = {"numpy32": lambda a: a.astype(np.float32), "torch32": lambda a: torch.from_numpy(a).float(),
                   "torch": torch.from_numpy}.get(kind, lambda a: a)
        p, t = convert(pred), convert(gt)
        tol = 1e-5 if kind.endswith("32") else 1e-12
        expected = [bts_metrics(np.asarray(p[i], np.float64), np.asarray(t[i], np.float64), lo, hi, crop) for i in range(b)]
        for i in range(b):
            got = depth_metrics(p[i], t[i], min_depth=lo, max_depth=hi, nyu_crop=crop)
            assert (got is None) == (expected[i] is None), (case, i)
            for name in DEPTH_METRICS if got else ():
                assert got[name] == pytest.approx(expected[i][name], rel=tol, abs=tol), (case, name)
        cuts = sorted({*rng.integers(1, b + 1, size=int(rng.integers(0, 3))).tolist(), b})
        sums, start = [0.0] * (len(DEPTH_METRICS) + 2), 0
        for cut in cuts:  # batches of any size, added up as the training evaluation adds them
            sums = [a + c for a, c in zip(sums, depth_metric_sums(p[start:cut], t[start:cut], min_depth=lo,
                                                                  max_depth=hi, nyu_crop=crop))]
            start = cut
        result = finish_depth_metrics(sums)
        scored = [e for e in expected if e is not None]
        assert (result["images"], result["images_without_depth"]) == (len(scored), b - len(scored))
        for name in DEPTH_METRICS:
            if scored:
                assert result[name] == pytest.approx(np.mean([e[name] for e in scored]), rel=tol, abs=tol), name
            else:
                assert math.isnan(result[name])


def test_depth_maps_in_any_numpy_layout_are_scored():
    """A mirrored view and a big-endian array (a file's bytes read as '>f8') were refused with torch's "negative
    strides" / "byte order" errors; an array of strings or objects is refused by name."""
    rng = np.random.default_rng(3208)
    gt = rng.uniform(0.5, 9.0, (12, 16))
    pred = gt * rng.uniform(0.8, 1.25, gt.shape)
    expected = bts_metrics(pred[:, ::-1], gt[:, ::-1], 1e-3, 10.0, False)
    for p, t in [(pred[:, ::-1], gt[:, ::-1]), (np.fliplr(pred), np.ascontiguousarray(gt[:, ::-1])),
                 (pred[:, ::-1].astype(">f8"), gt[:, ::-1].astype(">f8"))]:
        got = depth_metrics(p, t)
        for name in DEPTH_METRICS:
            assert got[name] == pytest.approx(expected[name], rel=1e-12), name
    with pytest.raises(TypeError, match="pred must hold real numbers.*<U"):
        depth_metrics(np.full((2, 2), "1.5"), np.ones((2, 2)))


# ------------------------------------------------------------------------------ masks beyond the data's classes
def _segmentation_data(root, bad_split: str, bad_value: int = 5) -> None:
    rng = np.random.default_rng(3209)
    for split, n in (("train", 4), ("val", 2)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(n):
            PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / "images" / f"{i}.png")
            mask = rng.integers(0, 2, (32, 32)).astype(np.uint8)
            if split == bad_split and i == 1:
                mask[3, 4] = bad_value
            PIL.Image.fromarray(mask).save(root / split / "masks" / f"{i}.png")
    (root / "labels.json").write_text(json.dumps({"0": "background", "1": "thing"}))


@pytest.mark.parametrize("reduce", [False, True])
def test_a_mask_value_beyond_the_classes_is_named_with_its_file(tmp_path, reduce):
    _segmentation_data(tmp_path, "train")
    folder = SegmentationFolder(tmp_path, "train", 32, num_classes=2, reduce_labels=reduce)
    folder[0]  # noqa: B018 - 0 and 1 only: fine (reduced: 255 and 0)
    value = 4 if reduce else 5
    with pytest.raises(ValueError, match=rf"masks/1\.png' holds class\(es\) \[{value}\].*classes are 0\.\.1"):
        folder[1]


def test_training_names_the_mask_that_holds_a_class_labels_json_does_not(tmp_path, capsys):
    """It stopped at the batch holding it with the loss's "label values [5] are out of range for 2 classes", no file
    named (a validation mask: after a whole epoch of training)."""
    _segmentation_data(tmp_path / "data", "train")
    argv = ["train", "--task", "segmentation", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "run"),
            "--model", "tiny", "--epochs", "1", "--image-size", "32", "--batch-size", "2"]
    assert main(argv) == 2
    assert "train/masks/1.png' holds class(es) [5]" in capsys.readouterr().err


# ------------------------------------------------------------------------------ random SegFormer / GLPN configs
@pytest.mark.parametrize("case", range(4))
def test_random_segformer_and_glpn_configs_load_and_match_transformers_in_float64(case, tmp_path):
    """1 to 4 stages, ReLU or GELU, 3/5/7 patch kernels, any spatial reduction, one to five classes (one: the binary
    loss), ignore values 255, -100 or above the classes, GLPN's depth ranges; odd input sizes for SegFormer. The
    campaign behind it ran 210 such configurations."""
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng([3210, case])
    depth = case == 3
    stages = 4 if depth else int(rng.integers(1, 5))
    heads = [int(rng.choice([1, 2, 3])) for _ in range(stages)]
    kw = dict(num_encoder_blocks=stages, depths=[int(rng.integers(1, 3)) for _ in range(stages)],
              hidden_sizes=[h * int(rng.integers(2, 9)) for h in heads], num_attention_heads=heads,
              sr_ratios=[int(rng.choice([1, 2, 4, 8])) for _ in range(stages)],
              mlp_ratios=[int(rng.integers(1, 5)) for _ in range(stages)],
              patch_sizes=[int(rng.choice([3, 5, 7]))] + [int(rng.choice([3, 5])) for _ in range(stages - 1)],
              strides=[4] + [2] * (stages - 1), decoder_hidden_size=int(rng.choice([8, 16, 24])),
              classifier_dropout_prob=0.0, drop_path_rate=0.0, hidden_act=str(rng.choice(["gelu", "relu"])))
    gen = torch.Generator().manual_seed(case)
    if depth:
        config = transformers.GLPNConfig(**kw, max_depth=int(rng.choice([2, 10, 80])))
        reference_cls, ours_cls = transformers.GLPNForDepthEstimation, PvtV2ForDepthEstimation
    else:
        k = [1, 3, 5][case]
        config = transformers.SegformerConfig(**kw, num_labels=k, semantic_loss_ignore_index=[255, -100, k + 2][case])
        reference_cls, ours_cls = transformers.SegformerForSemanticSegmentation, PvtV2ForSemanticSegmentation
    torch.manual_seed(case)
    reference = reference_cls(config).double()
    with torch.no_grad():
        for _, p in sorted(reference.named_parameters()):
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1)
    scramble_batch_norm_statistics_(reference, gen).eval().save_pretrained(tmp_path)
    model = ours_cls.from_pretrained(tmp_path, dtype="auto").eval()
    least = 4 * 2 ** (stages - 1) * max(kw["sr_ratios"])  # every stage's grid at least its reduction
    if depth:
        height, width = max(least, 32 * int(rng.integers(1, 4))), max(least, 32 * int(rng.integers(1, 4)))
    else:
        height, width = int(rng.integers(least, least + 70)), int(rng.integers(least, least + 70))
    x = torch.randn(2, 3, height, width, generator=gen, dtype=torch.float64)
    if depth:
        labels = torch.rand(2, height, width, generator=gen, dtype=torch.float64) * config.max_depth
        labels[torch.rand(2, height, width, generator=gen) < 0.2] = 0.0
    else:
        labels = torch.randint(0, max(2, k), (2, height, width), generator=gen)
        labels[torch.rand(2, height, width, generator=gen) < 0.2] = max(config.semantic_loss_ignore_index, 0)
    with torch.no_grad():
        expected, got = reference(x, labels=labels), model(x, labels=labels)
    name = "predicted_depth" if depth else "logits"
    assert relative_error(getattr(expected, name), getattr(got, name)) < 1e-10
    assert float(got.loss) == pytest.approx(float(expected.loss), rel=1e-10)


def test_a_data_loading_worker_error_is_one_line_naming_the_file(tmp_path, capsys):
    """With --workers (the default on a GPU) torch re-raises a worker's error as "Caught ValueError in DataLoader
    worker process 0." and the worker's whole traceback, which the command printed as its error."""
    _segmentation_data(tmp_path / "data", "train")
    argv = ["train", "--task", "segmentation", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "run"),
            "--model", "tiny", "--epochs", "1", "--image-size", "32", "--batch-size", "2", "--workers", "1",
            "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "DataLoader worker" not in err
    line = next(line for line in err.splitlines() if line.startswith("pvtv2 train: error: "))
    assert line.endswith("train/masks/1.png' holds class(es) [5] but the classes are 0..1 (DIR/labels.json names "
                         "them) and 255 is the ignore value")
