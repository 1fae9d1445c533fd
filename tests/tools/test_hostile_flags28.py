"""Hostile uses of round 28's flags (--ignore-index, --clip-grad, --detector left out), each against a value computed
here independently of the code under test."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_SHALLOW

from pvtv2 import PvtV2Config, PvtV2ForSemanticSegmentation
from pvtv2.inference import evaluate_segmenter, predict_segmentation


def test_eval_reduce_labels_with_a_negative_model_ignore_value_and_renamed_classes(tmp_path):
    """A model whose semantic_loss_ignore_index is -100 (transformers' cross-entropy default), evaluated with
    --reduce-labels on data whose labels.json lists the model's classes in another order: the reduced 0s become -100
    and must stay out of the metrics. The name mapping's lookup table indexed them as table[-100], counting every
    "no label" pixel as class len(table) - 100 (here 10 of 110) without a word."""
    k = 110
    rng = np.random.default_rng(0)
    (tmp_path / "val" / "images").mkdir(parents=True)
    (tmp_path / "val" / "masks").mkdir(parents=True)
    image = PIL.Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    image.save(tmp_path / "val" / "images" / "0.png")
    raw = rng.integers(1, k + 1, (32, 32)).astype(np.uint8)
    raw[:8] = 0  # ADE20K's "no label"
    PIL.Image.fromarray(raw).save(tmp_path / "val" / "masks" / "0.png")
    names = {i: f"c{i}" for i in range(k)}
    (tmp_path / "labels.json").write_text(json.dumps({"0": "c1", "1": "c0", **{str(i): f"c{i}" for i in range(2, k)}}))
    torch.manual_seed(0)
    config = PvtV2Config(**TINY_SHALLOW, id2label=names, semantic_loss_ignore_index=-100)
    model = PvtV2ForSemanticSegmentation(config).eval()
    predicted = predict_segmentation(model, image)
    # By hand: reduce (k -> k - 1), swap mask values 0 and 1 to the model's classes, keep the labelled pixels.
    labels = raw.astype(np.int64) - 1
    labels = np.where(labels == 0, 1, np.where(labels == 1, 0, labels))
    keep = raw != 0
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels[keep], predicted[keep]), 1)
    accuracy = np.trace(confusion) / confusion.sum()
    assert confusion.sum() == 24 * 32
    got = evaluate_segmenter(model, tmp_path, reduce_labels=True)
    assert got["pixel_accuracy"] == pytest.approx(accuracy, abs=1e-12)


def test_resume_takes_clip_grad_zero_for_a_run_without_clipping():
    """--clip-grad 0 is documented as "off, as leaving it out": --resume --clip-grad 0 of a run started without the
    flag was refused ("started with --clip-grad (not set), not 0.0"), and of one started with 0 given -0 too. A run
    that clipped is still refused an unclipped resume, naming its norm."""
    from pvtv2.training import TrainConfig
    from pvtv2.training.rundir import _merge_resumed

    for stored_clip, given in ((None, 0.0), (None, -0.0), (0.0, -0.0), (0.0, None), (-0.0, 0.0)):
        stored = TrainConfig(data="/d", output="/o", clip_grad=stored_clip).run_fields()
        asked = TrainConfig(data="/d", output="/o", resume=True, clip_grad=given)
        merged = _merge_resumed(asked, stored, {"resume", "clip_grad"} if given is not None else {"resume"})
        assert not merged.clip_grad, (stored_clip, given)
    stored = TrainConfig(data="/d", output="/o", clip_grad=1.0).run_fields()
    with pytest.raises(ValueError, match=r"--clip-grad 1(\.0)?, not 0"):
        _merge_resumed(TrainConfig(data="/d", output="/o", resume=True, clip_grad=0.0), stored, {"resume", "clip_grad"})
    stored = TrainConfig(data="/d", output="/o").run_fields()
    with pytest.raises(ValueError, match=r"--clip-grad \(not set\), not 0\.5"):
        _merge_resumed(TrainConfig(data="/d", output="/o", resume=True, clip_grad=0.5), stored, {"resume", "clip_grad"})


@pytest.mark.parametrize("text", ["1e-400", "2e-324", "-1e-400"])
def test_clip_grad_that_underflows_to_zero_is_refused(text, capsys, monkeypatch):
    """A norm written non-zero that a float cannot hold (1e-400 parses as 0.0) meant the tightest clipping and was
    taken as 0: no clipping at all, the opposite, without a word."""
    import pvtv2.training
    from pvtv2.cli import main

    calls: list = []
    monkeypatch.setattr(pvtv2.training, "train", lambda cfg, *, explicit=None: calls.append(cfg) or {"rank": 1})
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", "D", "-o", "O", f"--clip-grad={text}"])
    assert exit_info.value.code == 2 and not calls
    err = capsys.readouterr().err
    assert "--clip-grad" in err and text in err, err
    for fine in ("0", "-0", "0.0", "0e5", "1e-300"):
        assert main(["train", "--data", "D", "-o", "O", "--clip-grad", fine]) == 0
    assert [c.clip_grad for c in calls] == [0.0, -0.0, 0.0, 0.0, 1e-300]


def _saved_detector(path, detector: str, classes: int = 2):
    from conftest import perturb_

    from pvtv2.models.detection import PvtV2ForObjectDetection

    torch.manual_seed(0)
    config = PvtV2Config(**TINY_SHALLOW, id2label={i: f"k{i}" for i in range(classes)}, detector=detector,
                         min_size=64, max_size=107, fpn_channels=32)
    model = perturb_(PvtV2ForObjectDetection(config))
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("detector", ["fcos", "faster_rcnn", "mask_rcnn", "retinanet"])
def test_a_lone_detector_weights_file_fine_tunes_as_its_own_kind(tmp_path, detector):
    """A detector's model.safetensors without its config.json (copied out of a run's best/): --detector left out
    took retinanet (no config to read) and an FCOS failed with "the RetinaNet class scores ... not 9 anchors", even
    with --detector fcos given; the R-CNNs' FPN width was not read off the tensors (256 assumed: "mis-shaped keys").
    The kind, classes and FPN now come from the tensors: every saved weight comes back."""
    import shutil

    pytest.importorskip("torchvision")
    from pvtv2.training import TrainConfig
    from pvtv2.training.detection import build_detector, resolve_detector

    saved = _saved_detector(tmp_path / "folder", detector)
    lone = tmp_path / "lone.safetensors"
    shutil.copy(tmp_path / "folder" / "model.safetensors", lone)
    labels = {0: "k0", 1: "k1"}
    for given in (None, detector):
        cfg = TrainConfig(task="detection", model=str(lone), image_size=64, detector=given)
        assert resolve_detector(cfg).detector == detector
        model = build_detector(cfg, labels)
        assert model.config.detector == detector
        assert model.config.fpn_channels == 32 and model.config.num_labels == 2
        expected, got = saved.state_dict(), model.state_dict()
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert torch.equal(got[key], value), key


def test_a_saved_config_naming_no_known_detector_is_named(tmp_path):
    """A config.json whose detector is not one of the four (hand-edited, another tool's): refused naming the file and
    the value, not as "unknown detector 'bogus'" from a --detector the user never typed."""
    pytest.importorskip("torchvision")
    from pvtv2.training import TrainConfig
    from pvtv2.training.detection import resolve_detector

    _saved_detector(tmp_path / "d", "fcos")
    path = tmp_path / "d" / "config.json"
    for value in ("bogus", "FCOS", 5):
        path.write_text(json.dumps({**json.loads(path.read_text()), "detector": value}))
        with pytest.raises(ValueError, match=r"config\.json.*detector .*(bogus|FCOS|5).*--detector"):
            resolve_detector(TrainConfig(task="detection", model=str(tmp_path / "d"), image_size=64))


@pytest.mark.slow
def test_segmentation_run_with_the_new_flags_killed_and_resumed_ends_as_an_uninterrupted_one(tmp_path):
    """--ignore-index 7, --clip-grad (tight enough to clip), --grad-accum 2, --seg-augment and --bf16 (CPU autocast):
    a run SIGKILLed in its second epoch and resumed with --resume alone (the flags come from run.json) ends with the
    very weights of an uninterrupted run, and run.json records the flags."""
    import os
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        (tmp_path / "d" / split / "images").mkdir(parents=True)
        (tmp_path / "d" / split / "masks").mkdir(parents=True)
        for i in range(count):
            PIL.Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "d" / split / "images" / f"{i}.png")
            mask = rng.integers(0, 3, (32, 32)).astype(np.uint8)
            mask[rng.random((32, 32)) < 0.3] = 7
            PIL.Image.fromarray(mask).save(tmp_path / "d" / split / "masks" / f"{i}.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--task", "segmentation", "--model", "tiny", "--data", str(tmp_path / "d"), "--image-size", "32",
            "--epochs", "2", "--batch-size", "2", "--grad-accum", "2", "--ignore-index", "7", "--clip-grad", "0.05",
            "--seg-augment", "--bf16", "--no-progress"]

    def train(extra, kill=None):
        run_env = {**env, "PVTV2_TEST_KILL_AT_STEP": str(kill)} if kill else env
        return subprocess.run([sys.executable, "-m", "pvtv2", "train", *extra], env=run_env, capture_output=True,
                              text=True, timeout=600, check=False)

    full = train([*args, "--output", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-2000:]
    killed = train([*args, "--output", str(tmp_path / "k")], kill=5)  # the 2nd batch of epoch 2
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = train(["--output", str(tmp_path / "k"), "--resume", "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    run = json.loads((tmp_path / "k" / "run.json").read_text())
    assert (run["ignore_index"], run["clip_grad"], run["grad_accum"], run["bf16"]) == (7, 0.05, 2, True)
    expected = load_file(tmp_path / "full" / "last" / "model.safetensors")
    got = load_file(tmp_path / "k" / "last" / "model.safetensors")
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    config = json.loads((tmp_path / "k" / "last" / "config.json").read_text())
    assert config["semantic_loss_ignore_index"] == 7


def test_a_lone_detector_file_of_another_kind_than_detector_is_named(tmp_path):
    """An explicit --detector that a lone weights file's heads do not fit: refused naming the file's kind (as for a
    saved folder), not with a bare list of missing keys."""
    import shutil

    pytest.importorskip("torchvision")
    from pvtv2.training import TrainConfig
    from pvtv2.training.detection import build_detector

    _saved_detector(tmp_path / "folder", "fcos")
    lone = tmp_path / "lone.safetensors"
    shutil.copy(tmp_path / "folder" / "model.safetensors", lone)
    for asked in ("retinanet", "mask_rcnn"):
        cfg = TrainConfig(task="detection", model=str(lone), image_size=64, detector=asked)
        with pytest.raises(ValueError, match=rf"is a saved fcos detector, --detector is {asked}.*--detector fcos"):
            build_detector(cfg, {0: "k0", 1: "k1"})


def test_binary_masks_with_the_object_class_as_ignore_index_get_advice_that_fits(tmp_path):
    """0/1 masks trained with --ignore-index 1: refused (every object pixel would be ignored), but the advice was the
    one for 0/255 pictures, "save mask // 255 (0 and 1)", which these masks already are."""
    from pvtv2.data.masks import check_not_binary_255, scan_segmentation_split

    (tmp_path / "train" / "images").mkdir(parents=True)
    (tmp_path / "train" / "masks").mkdir(parents=True)
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:5, 2:5] = 1
    PIL.Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "train" / "images" / "0.png")
    PIL.Image.fromarray(mask).save(tmp_path / "train" / "masks" / "0.png")
    pairs = scan_segmentation_split(tmp_path, "train")
    with pytest.raises(ValueError, match="hold only 0 and 1") as info:
        check_not_binary_255(pairs, 1)
    assert "mask // 255" not in str(info.value) and "--ignore-index" in str(info.value), str(info.value)
    PIL.Image.fromarray(mask * 255).save(tmp_path / "train" / "masks" / "0.png")
    with pytest.raises(ValueError, match=r"hold only 0 and 255.*save mask // 255"):
        check_not_binary_255(pairs)


def test_a_folder_of_detector_weights_without_config_fine_tunes_as_its_own_kind(tmp_path):
    """The same for a folder that holds a detector's model.safetensors and no config.json (copied without it): the
    folder is read as a weights file, so its kind comes from the tensors too (retinanet was assumed)."""
    pytest.importorskip("torchvision")
    from pvtv2.training import TrainConfig
    from pvtv2.training.detection import build_detector, resolve_detector

    saved = _saved_detector(tmp_path / "folder", "fcos")
    (tmp_path / "folder" / "config.json").unlink()
    cfg = TrainConfig(task="detection", model=str(tmp_path / "folder"), image_size=64)
    assert resolve_detector(cfg).detector == "fcos"
    model = build_detector(cfg, {0: "k0", 1: "k1"})
    expected, got = saved.state_dict(), model.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
