"""Today's refusals, attacked as a user would meet them: what they now refuse that they should not, and what they say.

Found: a folder whose config.json has other classes than its own classifier, now refused as transformers refuses it,
was refused with "mis-shaped keys" and the advice ``ignore_mismatched_sizes=True`` (a random head: what the refusal
is there to prevent, and no flag of ``pvtv2 export`` / ``convert`` / ``inspect``), where those commands used to say
"Fix num_labels / id2label in its config.json"; depth training with ``--nyu-crop`` whose depth lies only outside
Eigen's crop was told to pass a larger ``--max-depth``, which changes nothing; ``label2id=`` alone (which must invert
the file's own id2label) let such a folder load a random head; the float32 overflow check ran before the cast to
float32, so a float64 image beyond float32's range came back as infinity, and its message blamed the settings; memory
running out while turning an image upright was called corrupt EXIF; sparse depth maps that the resize to
``--image-size`` leaves without a measurement were told to raise ``--max-depth`` too.

Checked and kept: training checkpoints as pytorch/examples, DeiT (EMA and optimizer beside the weights) and
torch.compile around DataParallel save them load the model's own weights; fine-tuning for another number of classes
through the Python API and ``pvtv2 train``; palette, 1-bit and 16-bit PNG masks read as their class indices, and
``pvtv2 eval --task segmentation --json`` stays strict JSON with a class absent.
"""

from __future__ import annotations

import collections
import json
import re

import numpy as np
import PIL.Image
import pytest
import torch

from pvtv2 import CheckpointError, PvtV2Config, PvtV2ForImageClassification, PvtV2ForSemanticSegmentation
from pvtv2.cli import main
from pvtv2.data.depth import write_depth_png
from pvtv2.data.masks import read_mask

from conftest import TINY, TINY_SMALL_IMAGES, random_weights_, save_tiny_classifier


def _with_classes(folder, names) -> None:
    """Rewrite ``folder/config.json`` to name the classes ``names`` (its weights untouched)."""
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data["id2label"] = {str(i): n for i, n in enumerate(names)}
    data["label2id"] = {n: i for i, n in enumerate(names)}
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------------- a folder's classes against its classifier
@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_a_folder_with_more_classes_than_its_classifier_names_the_classes_not_a_random_head(tmp_path, capsys, command):
    save_tiny_classifier(tmp_path / "model")  # three classes
    _with_classes(tmp_path / "model", ["a", "b", "c", "d", "e"])
    argv = [command, str(tmp_path / "model")] + ([str(tmp_path / "out")] if command == "convert" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    # the file's five classes against the three rows it holds, and the fix: the file's classes, or a new head asked for
    assert "its id2label gives 5 classes, for which classifier has 5 outputs where the checkpoint's has 3" in err
    assert "set id2label to the checkpoint's classes" in err and "num_labels=" in err


def test_the_class_note_names_a_missing_id2label_and_a_segmentation_head(tmp_path):
    torch.manual_seed(0)
    config = PvtV2Config(**TINY_SMALL_IMAGES, num_labels=3, decoder_hidden_size=16, image_size=32)
    PvtV2ForSemanticSegmentation(config).save_pretrained(tmp_path / "seg")
    _with_classes(tmp_path / "seg", ["sky", "road", "car", "tree"])
    with pytest.raises(CheckpointError, match=re.escape(
            "its id2label gives 4 classes, for which decode_head.classifier has 4 outputs where the checkpoint's has 3")):
        PvtV2ForSemanticSegmentation.from_pretrained(tmp_path / "seg")
    # a config.json without any class field: the default two classes (PvtV2Config().num_labels) were used
    save_tiny_classifier(tmp_path / "cls")
    data = json.loads((tmp_path / "cls" / "config.json").read_text())
    for key in ("id2label", "label2id", "num_labels"):
        data.pop(key, None)
    (tmp_path / "cls" / "config.json").write_text(json.dumps(data))
    assert PvtV2Config().num_labels == 2
    with pytest.raises(CheckpointError, match=re.escape(
            "it has no 'id2label', so the default 2 classes were used, for which classifier has 2 outputs where the "
            "checkpoint's has 3")):
        PvtV2ForImageClassification.from_pretrained(tmp_path / "cls")
    # the fine-tuning idioms still replace the head, and keep the encoder's weights as saved
    saved = PvtV2ForImageClassification.from_pretrained(tmp_path / "cls", num_labels=3)
    for kwargs in ({"num_labels": 5}, {"id2label": {i: f"x{i}" for i in range(5)}}):
        tuned = PvtV2ForImageClassification.from_pretrained(tmp_path / "cls", **kwargs)
        assert tuned.classifier.weight.shape == (5, 64)
        assert torch.equal(tuned.pvt_v2.encoder.layers[3].blocks[0].mlp.dense2.weight,
                           saved.pvt_v2.encoder.layers[3].blocks[0].mlp.dense2.weight)


def test_pvtv2_train_fine_tunes_a_saved_classifier_for_another_number_of_classes(tmp_path):
    save_tiny_classifier(tmp_path / "model")  # a, b, c
    rng = np.random.default_rng(35)
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(2):
                PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / name / f"{i}.png")
    argv = ["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--output",
            str(tmp_path / "run"), "--epochs", "1", "--batch-size", "2", "--image-size", "32", "--no-progress"]
    assert main(argv) == 0
    tuned = PvtV2ForImageClassification.from_pretrained(tmp_path / "run" / "last")
    assert tuned.config.id2label == {0: "cat", 1: "dog"} and tuned.classifier.weight.shape == (2, 64)


# ------------------------------------------------------------------------------- training checkpoints, as saved
@pytest.fixture(scope="module")
def trained():
    """A tiny classifier after one AdamW step (so an optimizer state exists), its weights and its logits."""
    torch.manual_seed(35)
    model = random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=4)), seed=35).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model(x).logits.sum().backward()
    optimizer.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(x).logits
    return state, optimizer.state_dict(), x, logits


def _saved(state, optimizer):
    dp = collections.OrderedDict(("module." + k, v) for k, v in state.items())
    ema = {k: v + 1 for k, v in state.items()}  # another model's numbers: taken, the logits would differ
    return {
        # pytorch/examples' ImageNet script: DataParallel names, a tensor best_acc1, the optimizer
        "imagenet-example": {"epoch": 3, "arch": "pvt_v2", "state_dict": dp, "best_acc1": torch.tensor(71.5),
                             "optimizer": optimizer},
        # DeiT's (the PVTv2 authors' training code): the model, its EMA, the optimizer, counters
        "deit": {"model": state, "model_ema": ema, "optimizer": optimizer, "epoch": 2},
        "compile-around-dataparallel": {"_orig_mod.module." + k: v for k, v in state.items()},
        "dataparallel-around-compile": {"module._orig_mod." + k: v for k, v in state.items()},
        "tutorial": {"model_state_dict": state, "optimizer_state_dict": optimizer, "loss": torch.tensor(0.25)},
    }


@pytest.mark.parametrize("layout", ["imagenet-example", "deit", "compile-around-dataparallel",
                                    "dataparallel-around-compile", "tutorial"])
def test_training_checkpoints_load_their_model_weights(tmp_path, trained, layout):
    state, optimizer, x, logits = trained
    torch.save(_saved(state, optimizer)[layout], tmp_path / "checkpoint.pth")
    model = PvtV2ForImageClassification.from_pretrained(tmp_path / "checkpoint.pth", num_attention_heads=[1, 2, 3, 4])
    with torch.no_grad():
        assert torch.equal(model(x).logits, logits)


def test_a_weight_under_its_name_and_a_wrappers_is_refused_naming_both(tmp_path, trained):
    state = dict(trained[0])
    state["module.classifier.bias"] = state["classifier.bias"] + 1
    torch.save(state, tmp_path / "both.pth")
    with pytest.raises(CheckpointError, match=r"holds 'classifier.bias' and 'module.classifier.bias', which both name "
                                              r"the weight 'classifier.bias'"):
        PvtV2ForImageClassification.from_pretrained(tmp_path / "both.pth")


# -------------------------------------------------------------------------------------------- masks, depth
def test_palette_one_bit_and_sixteen_bit_masks_read_as_their_class_indices(tmp_path):
    rng = np.random.default_rng(3535)
    classes = rng.integers(0, 3, (8, 8)).astype(np.uint8)
    palette = PIL.Image.fromarray(classes, mode="L").convert("P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)  # colours: the indices stay 0, 1, 2
    palette.save(tmp_path / "palette.png")
    PIL.Image.fromarray(classes == 1).save(tmp_path / "bits.png")  # a boolean array: a 1-bit PNG
    wide = rng.integers(0, 300, (8, 8)).astype(np.uint16)
    PIL.Image.fromarray(wide).save(tmp_path / "wide.png")
    assert PIL.Image.open(tmp_path / "bits.png").mode == "1" and PIL.Image.open(tmp_path / "palette.png").mode == "P"
    assert np.array_equal(np.asarray(read_mask(tmp_path / "palette.png")), classes)
    assert np.array_equal(np.asarray(read_mask(tmp_path / "bits.png")), (classes == 1).astype(np.uint8))
    assert np.array_equal(np.asarray(read_mask(tmp_path / "wide.png")), wide)


def test_eval_json_with_an_absent_class_is_strict_json(tmp_path, capsys):
    torch.manual_seed(0)
    config = PvtV2Config(**TINY_SMALL_IMAGES, num_labels=3, decoder_hidden_size=16, image_size=32)
    random_weights_(PvtV2ForSemanticSegmentation(config), seed=35).eval().save_pretrained(tmp_path / "model")
    for part in ("images", "masks"):
        (tmp_path / "data" / "val" / part).mkdir(parents=True)
    rng = np.random.default_rng(35)
    PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "data/val/images/0.png")
    PIL.Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(tmp_path / "data/val/masks/0.png")  # class 0 only
    assert main(["eval", "--task", "segmentation", "--model", str(tmp_path / "model"), "--data",
                 str(tmp_path / "data"), "--json"]) == 0

    def no_constant(name):
        raise AssertionError(f"{name} is not JSON")

    result = json.loads(capsys.readouterr().out, parse_constant=no_constant)
    assert 0.0 <= result["pixel_accuracy"] <= 1.0 and 0.0 <= result["mean_iou"] <= 1.0
    assert set(result["per_class_iou"]) == {"LABEL_0", "LABEL_1", "LABEL_2"}


def _depth_data(root, depth: np.ndarray) -> None:
    rng = np.random.default_rng(35)
    for split in ("train", "val"):
        for part in ("images", "depth"):
            (root / split / part).mkdir(parents=True)
        for i in range(2):
            image = rng.integers(0, 256, (*depth.shape, 3), dtype=np.uint8)
            PIL.Image.fromarray(image).save(root / split / "images" / f"{i}.png")
            write_depth_png(root / split / "depth" / f"{i}.png", depth)


def test_depth_outside_eigens_crop_only_is_told_to_leave_the_crop_out_not_to_raise_max_depth(tmp_path, capsys):
    depth = np.zeros((32, 32))
    depth[:3] = 2.0  # rows 0-2: above Eigen's crop at 32 x 32 (45/480 of the height is row 3), inside max_depth 10
    _depth_data(tmp_path / "data", depth)
    argv = ["train", "--task", "depth", "--data", str(tmp_path / "data"), "--model", "tiny", "--output",
            str(tmp_path / "run"), "--epochs", "1", "--image-size", "32", "--batch-size", "2", "--no-progress"]
    assert main([*argv, "--nyu-crop"]) == 2
    err = capsys.readouterr().err
    assert "leave out --nyu-crop" in err and "--max-depth above" not in err
    # beyond max_depth, inside the crop: there the advice is --max-depth
    _depth_data(tmp_path / "far", np.full((32, 32), 15.0))
    assert main([*argv[:4], str(tmp_path / "far"), *argv[5:], "--nyu-crop"]) == 2
    err = capsys.readouterr().err
    assert "pass a --max-depth above the data's depths" in err and "leave out --nyu-crop" not in err


def test_the_class_note_counts_a_detectors_class_layer_and_is_not_given_for_a_head_of_another_kind(tmp_path):
    from pvtv2.models.detection import PvtV2ForObjectDetection

    torch.manual_seed(0)
    config = PvtV2Config(**TINY_SMALL_IMAGES, detector="retinanet", num_labels=3)
    PvtV2ForObjectDetection(config).save_pretrained(tmp_path / "det")
    # a RetinaNet read as an FCOS: its class layer differs (9 anchors x 3 classes against 3) with every other layer of
    # the head; the classes are not the cause
    with pytest.raises(CheckpointError) as info:
        PvtV2ForObjectDetection.from_pretrained(tmp_path / "det", detector="fcos")
    assert "classes, for which" not in str(info.value)
    _with_classes(tmp_path / "det", ["a", "b", "c", "d", "e"])
    with pytest.raises(CheckpointError, match=re.escape(
            "its id2label gives 5 classes, for which detector.head.classification_head.cls_logits has 45 outputs "
            "where the checkpoint's has 27")):
        PvtV2ForObjectDetection.from_pretrained(tmp_path / "det")


def test_pixel_values_past_float32_from_the_image_itself_are_refused_naming_the_image_not_the_settings():
    from pvtv2 import PvtV2ImageProcessor

    huge = np.full((3, 8, 8), 1e300)  # float64, finite; float32 holds at most 3.4e38
    with np.errstate(over="ignore"):
        assert np.isfinite(huge).all() and not np.isfinite(huge.astype(np.float32)).all()
    processor = PvtV2ImageProcessor()
    for settings in ({"do_resize": False, "do_rescale": False},
                     {"do_resize": False, "do_rescale": False, "do_normalize": False}):
        # came back as infinity (float64 normalised, then cast), past the check
        with pytest.raises(ValueError, match=r"image 0: its pixel values overflow float32 .*the image's own values "
                                             r"reach 1e\+300, past float32's range"):
            processor(huge, **settings)
    # the settings' own overflow is still named as theirs, and ordinary float64 input gives float32's numbers
    with pytest.raises(ValueError, match="these settings give no finite pixel values"):
        processor(np.full((3, 8, 8), 100.0), do_resize=False, rescale_factor=1e300)
    ordinary = np.random.default_rng(35).uniform(0, 255, (3, 8, 8))
    got = processor(ordinary, do_resize=False, do_rescale=False, return_tensors="np").pixel_values[0]
    mean, std = np.array([0.485, 0.456, 0.406])[:, None, None], np.array([0.229, 0.224, 0.225])[:, None, None]
    assert got.dtype == np.float32 and np.array_equal(got, ((ordinary - mean) / std).astype(np.float32))


def test_label2id_alone_names_the_files_own_classes_and_does_not_ask_for_a_new_head(tmp_path):
    save_tiny_classifier(tmp_path / "model")  # three rows
    _with_classes(tmp_path / "model", ["a", "b", "c", "d", "e"])
    label2id = {n: i for i, n in enumerate("abcde")}
    # label2id must invert the config's id2label, so it names those five classes: a random five-row head was loaded
    # under them, a warning its only sign
    with pytest.raises(CheckpointError, match=re.escape("classifier.weight: checkpoint (3, 64) vs model (5, 64)")):
        PvtV2ForImageClassification.from_pretrained(tmp_path / "model", label2id=label2id)
    with pytest.raises(ValueError, match="label2id does not invert id2label"):
        PvtV2ForImageClassification.from_pretrained(tmp_path / "model", label2id={"x": 0, "y": 1})


def test_memory_running_out_while_turning_an_image_upright_is_not_called_corrupt_exif(tmp_path, monkeypatch):
    import PIL.ImageOps

    from pvtv2.data.processing import load_image

    PIL.Image.fromarray(np.zeros((6, 10, 3), dtype=np.uint8)).save(tmp_path / "a.png")

    def out_of_memory(image):  # what a copy of a large image raises where the memory is short
        raise MemoryError()

    monkeypatch.setattr(PIL.ImageOps, "exif_transpose", out_of_memory)
    with pytest.raises(ValueError, match=r"cannot read image '.*a\.png': PIL could not allocate the memory to decode "
                                         r"its 10 x 6 pixels \(MemoryError\)$"):
        load_image(tmp_path / "a.png")


def test_sparse_depth_that_the_resize_drops_is_told_to_take_a_larger_image_size_not_max_depth(tmp_path, capsys):
    depth = np.zeros((64, 64))
    depth[0, 0] = 3.0  # one measurement, inside max_depth; halved by nearest neighbour, PIL keeps the odd rows only
    resized = np.asarray(PIL.Image.fromarray(depth.astype(np.float32)).resize((32, 32), PIL.Image.Resampling.NEAREST))
    assert not resized.any()
    _depth_data(tmp_path / "data", depth)
    argv = ["train", "--task", "depth", "--data", str(tmp_path / "data"), "--model", "tiny", "--output",
            str(tmp_path / "run"), "--epochs", "1", "--image-size", "32", "--batch-size", "2", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "keep no measured pixel: pass a larger --image-size" in err and "--max-depth above" not in err
