"""Audit of detection (round 27), each against something independent: every detector against torchvision's own
assembled by hand on timm's ``features_only`` encoder (odd sizes, batch 3, outputs and losses); the learning rate of
each optimizer step of a real run against mmdetection's closed form; frozen stages through a run; and the defects
found: box-only data trained as Mask R-CNN, NaN pixels, 0/255 masks, float64 boxes, an image too small for the
encoder found mid-run, a saved detector of another kind than --detector."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")
timm = pytest.importorskip("timm")

from conftest import TINY_SHALLOW, TimmFeaturePyramid, perturb_, timm_features_twin, write_square_coco
from torchvision.models import detection as tvd
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from pvtv2 import PvtV2Config, fast
from pvtv2.cli import main
from pvtv2.data.coco import CocoDetection
from pvtv2.models.detection import DETECTORS, PvtV2ForObjectDetection


def _write(root: Path, split: str, boxes: list[list[int]], masks: bool) -> None:
    write_square_coco(root, split, boxes, masks=masks, category_id=7)


def test_mask_training_on_boxes_without_any_mask_is_refused(tmp_path, capsys, caplog):
    """Box-only COCO data given to Mask R-CNN: every object was left out of training (objects without a mask are),
    so the detector trained on images it was told were empty, and the run ended with exit 0, a box AP and a log
    warning. The annotation file holds 3 objects and no mask: refused, naming the problem and the way out."""
    _write(tmp_path / "d", "train", [[5, 5, 20, 20], [30, 10, 25, 25], [10, 30, 20, 30]], masks=False)
    _write(tmp_path / "d", "val", [[8, 8, 20, 20]], masks=False)
    with pytest.raises(ValueError, match="no mask"):
        CocoDetection(tmp_path / "d", "train", masks=True)
    # the same file without masks=True is fine: 3 objects for box training
    assert sum(len(CocoDetection(tmp_path / "d", "train")[i][1]["boxes"]) for i in range(3)) == 3
    # one mask among the 3: the two others leave the targets entirely (boxes too), and the warning says so
    path = tmp_path / "d" / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    data["annotations"][1]["segmentation"] = [[30, 10, 55, 10, 55, 35, 30, 35]]
    path.write_text(json.dumps(data))
    with caplog.at_level("WARNING", logger="pvtv2.data.coco"):
        partial = CocoDetection(tmp_path / "d", "train", masks=True)
    assert [len(partial[i][1]["boxes"]) for i in range(3)] == [0, 1, 0]
    assert "2 of 3 object(s) have no mask and are left out of training (their boxes too" in caplog.text
    data["annotations"][1].pop("segmentation")
    path.write_text(json.dumps(data))
    out = tmp_path / "run"
    code = main(["train", "--task", "detection", "--detector", "mask_rcnn", "--model", "tiny", "--image-size", "64",
                 "--data", str(tmp_path / "d"), "--output", str(out), "--epochs", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "no mask" in err and "faster_rcnn" in err, err
    assert not (out / "last").exists()


# ---------------------------------------------------------------------------------------------- torchvision by hand



def _by_hand(model: PvtV2ForObjectDetection) -> torch.nn.Module:
    """torchvision's detector assembled from its defaults (anchors, RoI pools, heads), the mmdetection settings the
    docs promise passed explicitly; every weight loaded from ``model``'s state dict by name."""
    c = model.config
    body = timm_features_twin(model)
    size = {"min_size": c.min_size, "max_size": c.max_size}
    if c.detector == "retinanet":
        backbone = TimmFeaturePyramid(body, [2, 3, 4], LastLevelP6P7(c.hidden_sizes[3], c.fpn_channels), c.fpn_channels)
        backbone.fpn.extra_blocks.use_P5 = False  # mmdetection's add_extra_convs="on_input": P6 from C5
        det = tvd.RetinaNet(backbone, c.num_labels, **size)  # torchvision's _default_anchorgen, thresholds 0.05 / 0.5
    elif c.detector == "fcos":
        backbone = TimmFeaturePyramid(body, [2, 3, 4], LastLevelP6P7(c.fpn_channels, c.fpn_channels), c.fpn_channels)
        backbone.fpn.extra_blocks.use_P5 = True
        det = tvd.FCOS(backbone, c.num_labels, score_thresh=0.05, **size)  # mmdetection's test score_thr
    else:
        backbone = TimmFeaturePyramid(body, [1, 2, 3, 4], LastLevelMaxPool(), c.fpn_channels)
        cls = tvd.FasterRCNN if c.detector == "faster_rcnn" else tvd.MaskRCNN
        det = cls(backbone, c.num_labels + 1, **size)  # _default_anchorgen ((32,) ... (512,)), RoIAlign on "0".."3"
    ours = {k[len("detector."):]: v for k, v in model.state_dict().items() if k.startswith("detector.")}
    missing, unexpected = det.load_state_dict(ours, strict=False)
    assert not unexpected and all(k.startswith("backbone.body.") for k in missing), (missing, unexpected)
    return det.eval()


@pytest.mark.parametrize("detector", DETECTORS)
def test_detector_equals_torchvisions_own_assembled_by_hand_at_odd_sizes_batch_3(detector):
    torch.manual_seed(0)
    config = PvtV2Config(**TINY_SHALLOW, patch_embed_layer_norm_eps=1e-5, reduction_layer_norm_eps=1e-5,
                         id2label={0: "a", 1: "b", 2: "c"}, detector=detector, min_size=97, max_size=131)
    model = perturb_(PvtV2ForObjectDetection(config).eval(), scale=0.02)
    twin = _by_hand(model)
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 77, 101, generator=gen), torch.rand(3, 93, 61, generator=gen), torch.rand(3, 50, 50, generator=gen)]
    shift = 1 if detector in ("faster_rcnn", "mask_rcnn") else 0
    with torch.no_grad(), fast.fast_path(False):
        ours, theirs = model(images), twin(images)
    for a, b, image in zip(ours, theirs, images):
        if "masks" in a:
            assert a["masks"].shape[1:] == (1, *image.shape[1:])  # pasted into the input image's pixels
        assert len(a["scores"]) == len(b["scores"]) > 0
        for i in range(min(20, len(a["scores"]))):
            same = ((b["labels"] == a["labels"][i] + shift) & ((b["scores"] - a["scores"][i]).abs() < 1e-4)
                    & ((b["boxes"] - a["boxes"][i]).abs().max(dim=1).values < 1e-2))
            assert same.any(), (i, a["boxes"][i], a["scores"][i])
            if "masks" in a:
                j = int(same.nonzero()[0])
                assert (a["masks"][i] - b["masks"][j]).abs().mean() < 1e-3
    # the losses, the R-CNNs' proposal sampling drawn the same
    boxes = [torch.tensor([[3.0, 4.0, 40.0, 50.0], [60.0, 10.0, 99.0, 70.0]]), torch.tensor([[5.0, 5.0, 55.0, 80.0]]),
             torch.zeros(0, 4)]
    labels = [torch.tensor([0, 2]), torch.tensor([1]), torch.zeros(0, dtype=torch.int64)]
    targets = []
    for image, b, l in zip(images, boxes, labels):
        t = {"boxes": b, "labels": l}
        if detector == "mask_rcnn":
            m = torch.zeros(len(b), *image.shape[1:], dtype=torch.uint8)
            for n, (x1, y1, x2, y2) in enumerate(b.int().tolist()):
                m[n, y1:y2, x1:x2] = 1
            t["masks"] = m
        targets.append(t)
    model.train(), twin.train()
    torch.manual_seed(5)
    with fast.fast_path(False):
        ours = model(images, targets)
    torch.manual_seed(5)
    theirs = twin(images, [dict(t, labels=t["labels"] + shift) for t in targets])
    assert ours.keys() == theirs.keys()
    for key in ours:
        second = key in ("loss_classifier", "loss_box_reg", "loss_mask")
        assert torch.allclose(ours[key], theirs[key], rtol=1e-2 if second else 1e-4, atol=1e-5), (key, ours[key], theirs[key])


# ---------------------------------------------------------------------------------------------- the schedule, as run
@pytest.mark.slow
def test_the_learning_rate_of_every_optimizer_step_of_a_run_is_mmdetections_closed_form(tmp_path, monkeypatch):
    """Not the schedule function: the rate the optimizer held at each of a real run's 48 steps (8 images, batch 2,
    12 epochs, warmup 3), against lr * 0.1^(#milestones passed) * (1 - (1 - k/3)(1 - 0.001)) for k < 3, milestones
    after epochs 8 and 11 (steps 32 and 44)."""
    from pvtv2.training import engine

    rates = []
    step = engine._optimizer_step

    def spy(cfg, training):
        rates.append(training.optimizer.param_groups[0]["lr"])
        step(cfg, training)

    monkeypatch.setattr(engine, "_optimizer_step", spy)
    _write(tmp_path / "d", "train", [[4 + i, 6 + i, 20 + i, 22] for i in range(8)], masks=False)
    _write(tmp_path / "d", "val", [[8, 8, 20, 20], [20, 12, 30, 25]], masks=False)
    assert main(["train", "--task", "detection", "--detector", "fcos", "--model", "tiny", "--image-size", "64",
                 "--data", str(tmp_path / "d"), "--output", str(tmp_path / "run"), "--epochs", "12", "--batch-size",
                 "2", "--lr", "1e-3", "--warmup-steps", "3", "--no-progress"]) == 0
    expected = []
    for k in range(48):
        decay = 0.1 ** ((k >= 32) + (k >= 44))
        expected.append(1e-3 * decay * ((1 - (1 - k / 3) * 0.999) if k < 3 else 1.0))
    assert rates == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------------------------------------- hostile tensors
@pytest.mark.parametrize("detector", ["retinanet", "faster_rcnn"])
def test_a_nan_pixel_is_a_clear_error_not_an_image_without_objects(detector):
    """min() and max() of a tensor holding NaN are NaN, and NaN compares false: the [0, 1] check let a NaN pixel
    through, and the detector answered "no objects" (eval) or NaN losses (training), without a word."""
    torch.manual_seed(0)
    model = PvtV2ForObjectDetection(PvtV2Config(**TINY_SHALLOW, id2label={0: "a"}, detector=detector, min_size=64,
                                                max_size=107)).eval()
    image = torch.rand(3, 70, 90)
    image[1, 5, 7] = float("nan")
    with pytest.raises(ValueError, match="image 1 .*NaN"):
        model([torch.rand(3, 70, 90), image])
    model.train()
    target = {"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]), "labels": torch.tensor([0])}
    with pytest.raises(ValueError, match="image 0 .*NaN"):
        model([image], [target])


@pytest.mark.slow
def test_frozen_stages_keep_the_checkpoints_weights_through_a_run(tmp_path):
    """A saved detector with ``frozen_stages=2`` fine-tuned for an epoch at a large rate: stages 1-2 (patch
    embedding, blocks, norm; weights and buffers) come out equal to the checkpoint's bit for bit, stages 3-4 and
    the FPN changed (so the run did train)."""
    from pvtv2.weights.files import read_state_dict

    torch.manual_seed(0)
    config = PvtV2Config(**TINY_SHALLOW, id2label={0: "square"}, detector="fcos", min_size=64, max_size=107,
                         frozen_stages=2, fpn_channels=64)
    perturb_(PvtV2ForObjectDetection(config), 0.02).save_pretrained(tmp_path / "ckpt")
    _write(tmp_path / "d", "train", [[4 + 3 * i, 6 + i, 20, 22] for i in range(4)], masks=False)
    _write(tmp_path / "d", "val", [[8, 8, 20, 20]], masks=False)
    assert main(["train", "--task", "detection", "--detector", "fcos", "--model", str(tmp_path / "ckpt"),
                 "--image-size", "64", "--data", str(tmp_path / "d"), "--output", str(tmp_path / "run"), "--epochs",
                 "1", "--batch-size", "2", "--lr", "1e-2", "--warmup-steps", "0", "--no-progress"]) == 0
    before = read_state_dict(tmp_path / "ckpt" / "model.safetensors")
    after = read_state_dict(tmp_path / "run" / "last" / "model.safetensors")
    for stage, frozen in enumerate([True, True, False, False]):
        keys = [k for k in before if k.startswith(f"pvt_v2.encoder.layers.{stage}.")]
        assert keys and all(torch.equal(before[k], after[k]) for k in keys) == frozen, stage
    assert not all(torch.equal(before[k], after[k]) for k in before if ".fpn." in k)


def test_mask_targets_of_0_and_255_are_a_clear_error():
    """Masks read from 8-bit PNGs hold 0 and 255: torchvision's mask loss (binary cross-entropy against the RoIAligned
    target) took 255 as the target probability, a loss without a minimum (negative, falling as the logits grow),
    and trained without a word. Masks must be 0/1."""
    torch.manual_seed(0)
    model = PvtV2ForObjectDetection(PvtV2Config(**TINY_SHALLOW, id2label={0: "a"}, detector="mask_rcnn", min_size=64,
                                                max_size=107)).train()
    masks = torch.zeros(1, 70, 90, dtype=torch.uint8)
    masks[0, 2:40, 1:30] = 255
    target = {"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]), "labels": torch.tensor([0]), "masks": masks}
    with pytest.raises(ValueError, match="masks must hold 0 and 1"):
        model([torch.rand(3, 70, 90)], [target])
    ok = model([torch.rand(3, 70, 90)], [dict(target, masks=masks // 255)])  # 0/1: trains, loss_mask positive
    assert float(ok["loss_mask"]) > 0


@pytest.mark.parametrize("detector", ["fcos", "retinanet"])
def test_float64_boxes_train_as_their_float32_values(detector):
    """FCOS stopped on float64 boxes (numpy's default) with PyTorch's "Index put requires the source and destination
    dtypes match"; the boxes are taken as float32, the losses those of the float32 boxes."""
    torch.manual_seed(0)
    model = PvtV2ForObjectDetection(PvtV2Config(**TINY_SHALLOW, id2label={0: "a"}, detector=detector, min_size=64,
                                                max_size=107)).train()
    image = torch.rand(3, 70, 90)
    boxes = torch.tensor([[1.0, 2.0, 30.0, 40.0], [20.5, 10.25, 80.0, 66.0]])
    ours = model([image], [{"boxes": boxes.double(), "labels": torch.tensor([0, 0])}])
    reference = model([image], [{"boxes": boxes, "labels": torch.tensor([0, 0])}])
    assert {k: float(v) for k, v in ours.items()} == {k: float(v) for k, v in reference.items()}


def test_training_names_an_image_too_small_for_the_encoder_before_the_first_step(tmp_path, capsys):
    """A 600 x 3 strip among the training images (listed at that size): the run stopped at whichever step drew it,
    with "the input is too small for this model" and no file name. Now refused before training, naming it, from
    the sizes the annotation file lists."""
    _write(tmp_path / "d", "train", [[5, 5, 20, 20], [30, 10, 25, 25], [10, 30, 20, 30]], masks=False)
    _write(tmp_path / "d", "val", [[8, 8, 20, 20]], masks=False)
    path = tmp_path / "d" / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    data["images"][2].update(width=600, height=3)
    data["annotations"][2]["bbox"] = [10, 0, 30, 3]
    path.write_text(json.dumps(data))
    PIL.Image.fromarray(np.zeros((3, 600, 3), np.uint8)).save(tmp_path / "d" / "train" / "2.png")
    out = tmp_path / "run"
    code = main(["train", "--task", "detection", "--detector", "fcos", "--model", "tiny", "--image-size", "64",
                 "--data", str(tmp_path / "d"), "--output", str(out), "--epochs", "1", "--batch-size", "1",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "too small" in err and "2.png" in err, err
    assert not (out / "metrics.jsonl").exists()


def test_fine_tuning_a_saved_detector_of_another_kind_names_the_detector_flag(tmp_path, capsys):
    """A saved FCOS given to `pvtv2 train --task detection --detector retinanet`: the run stopped with "the weights
    ... do not fit PvtV2ForObjectDetection" and 50 key names, never saying that the checkpoint is an FCOS and
    --detector fcos (or none: round 28 made the saved kind the default) fine-tunes it."""
    torch.manual_seed(0)
    config = PvtV2Config(**TINY_SHALLOW, id2label={0: "square"}, detector="fcos", min_size=64, max_size=107,
                         fpn_channels=64)
    PvtV2ForObjectDetection(config).save_pretrained(tmp_path / "ckpt")
    _write(tmp_path / "d", "train", [[5, 5, 20, 20], [30, 10, 25, 25]], masks=False)
    _write(tmp_path / "d", "val", [[8, 8, 20, 20]], masks=False)
    args = ["train", "--task", "detection", "--model", str(tmp_path / "ckpt"), "--image-size", "64", "--data",
            str(tmp_path / "d"), "--epochs", "1", "--batch-size", "2", "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "run"), "--detector", "retinanet"]) == 2
    err = capsys.readouterr().err
    assert "fcos" in err and "--detector fcos" in err, err
    assert main([*args, "--output", str(tmp_path / "run2"), "--detector", "fcos"]) == 0
