"""Hostile inputs to today's config, run-folder and checkpoint changes: each is refused in one line (a ValueError for
the library, exit status 2 for the command) instead of a traceback."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from pvtv2 import CheckpointError, PvtV2Config, PvtV2ForImageClassification
from pvtv2.cli import main
from pvtv2.data.shapes import make_segmentation_example
from pvtv2.training.rundir import resolve_recorded_data
from pvtv2.weights.files import save_state_dict
from pvtv2.weights.loading import read_config

from conftest import TINY, random_weights_

_HUGE = "1" + "0" * 400  # a JSON integer no float holds (float() raises OverflowError)


@pytest.mark.parametrize("text", [
    f'{{"layer_norm_eps": {_HUGE}}}',
    f'{{"initializer_range": {_HUGE}}}',
    f'{{"patch_embed_layer_norm_eps": {_HUGE}}}',
    f'{{"mlp_ratios": [{_HUGE}, 8, 4, 4]}}',
    f'{{"hidden_dropout_prob": {_HUGE}}}',
])
def test_an_integer_beyond_any_float_is_refused_by_name(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_text(text)
    field = text.split('"')[1]
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: {field} must "):  # the file's value: named
        PvtV2Config.from_json_file(path)


def test_json_nested_too_deeply_is_refused_by_both_readers(tmp_path):
    depth = sys.getrecursionlimit() * 2  # deeper than json's decoder can recurse
    path = tmp_path / "config.json"
    path.write_text('{"a":' * depth + "1" + "}" * depth)
    for read in (PvtV2Config.from_json_file, lambda p: PvtV2Config.from_json_file(p, strict=True), read_config):
        with pytest.raises(ValueError, match="nested too deeply"):
            read(path)


def test_train_with_a_deeply_nested_architecture_file_is_one_line(tmp_path, capsys):
    depth = sys.getrecursionlimit() * 2
    arch = tmp_path / "arch.json"
    arch.write_text('{"a":' * depth + "1" + "}" * depth)
    (tmp_path / "data").mkdir()
    code = main(["train", "--data", str(tmp_path / "data"), "--model", str(arch), "--output", str(tmp_path / "out"),
                 "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("pvtv2 train: error: ") and "nested too deeply" in err[-1]
    assert not any("Traceback" in line for line in err)


# ---------------------------------------------------------------------------------------------- sharded indexes
_SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@pytest.fixture(scope="module")
def tiny_classifier():
    torch.manual_seed(0)
    return random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5))).eval()


def _sharded(model, folder, shards, weight_map):
    folder.mkdir()
    model.config.save_pretrained(folder)
    for name, state in shards.items():
        save_state_dict(state, folder / name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_a_tensor_in_two_shards_is_refused_not_taken_from_the_last(tiny_classifier, tmp_path):
    """The second shard also holds a stale (zeroed) copy of the first shard's tensors, as a re-save interrupted
    half-way leaves it; the index maps them to the first. They used to be taken from the second shard, without a
    word: a model of zeros where the index promised the trained weights."""
    state = tiny_classifier.state_dict()
    keys = sorted(state)
    first, second = keys[: len(keys) // 2], keys[len(keys) // 2:]
    stale = {k: torch.zeros_like(state[k]) for k in first}
    folder = _sharded(tiny_classifier, tmp_path / "stale", {
        _SHARDS[0]: {k: state[k] for k in first},
        _SHARDS[1]: {**stale, **{k: state[k] for k in second}},
    }, {k: _SHARDS[k in second] for k in keys})
    with pytest.raises(CheckpointError, match=re.escape(
            f"the tensor {first[0]!r} is in two shards, {_SHARDS[0]!r} and {_SHARDS[1]!r} ({len(first)} tensor(s) in "
            "all), so which one is meant is ambiguous")):
        PvtV2ForImageClassification.from_pretrained(folder)
    # The same shards without the stale copy load the model's own weights.
    folder = _sharded(tiny_classifier, tmp_path / "whole", {
        _SHARDS[0]: {k: state[k] for k in first}, _SHARDS[1]: {k: state[k] for k in second},
    }, {k: _SHARDS[k in second] for k in keys})
    loaded = PvtV2ForImageClassification.from_pretrained(folder).state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in keys)


@pytest.mark.parametrize("weight_map, message", [
    ({}, "names no shards: its weight_map is empty"),
    ({"a": _SHARDS[0], "b": 3}, "names the shard 3, which is not a file name in its folder"),
])
def test_an_index_naming_no_usable_shard_says_so(tiny_classifier, tmp_path, weight_map, message):
    folder = _sharded(tiny_classifier, tmp_path / "index", {_SHARDS[0]: tiny_classifier.state_dict()}, weight_map)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        PvtV2ForImageClassification.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------- demo-seg again
def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_smaller_example_over_a_larger_one_is_the_smaller_one(tmp_path):
    """`pvtv2 demo-seg --epochs 0` run again with fewer images (or another --size) into the same OUTPUT: the pairs
    numbered past the new counts used to stay, so OUTPUT/data held 4 training images (two of another size) where the
    log said 2. The folder now holds what a fresh folder does, byte for byte; files the example never writes stay."""
    again = tmp_path / "again"
    make_segmentation_example(again, 4, 3, 48, seed=1)
    (again / "train" / "images" / "mine.png").write_bytes(b"kept")
    make_segmentation_example(again, 2, 1, 32, seed=0)
    fresh = make_segmentation_example(tmp_path / "fresh", 2, 1, 32, seed=0)
    assert _files(again) == {**_files(fresh), "train/images/mine.png": b"kept"}


# ---------------------------------------------------------------------------------------------- --resume's data
def test_an_older_runs_relative_data_is_a_folder_not_a_file_of_that_name(tmp_path, monkeypatch):
    """A run that recorded its data as 'example/data' (relative, as before), continued from a folder that holds a
    *file* of that name: the file used to win over the run's data folder beside the run, and the run was refused as
    'needs the folder .../train/images'. The data is a folder; the one beside the run is found."""
    run = tmp_path / "started" / "example" / "run"
    run.mkdir(parents=True)
    (tmp_path / "started" / "example" / "data").mkdir()
    (tmp_path / "here" / "example").mkdir(parents=True)
    (tmp_path / "here" / "example" / "data").write_text("not a dataset")
    monkeypatch.chdir(tmp_path / "here")
    assert resolve_recorded_data("example/data", run) == str(tmp_path / "started" / "example" / "data")
    # A folder here still comes first, as it always did.
    (tmp_path / "here" / "example" / "data").unlink()
    (tmp_path / "here" / "example" / "data").mkdir()
    assert resolve_recorded_data("example/data", run) == str(tmp_path / "here" / "example" / "data")


# ---------------------------------------------------------------------------------------------- return_dict false
def test_inference_reads_outputs_of_a_config_that_asks_for_tuples(tmp_path):
    """A config.json with "return_dict": false (transformers honours it, so the field loads): predict, the
    segmentation and the depth helpers read `.logits` / `.predicted_depth` and failed with "'tuple' object has no
    attribute 'logits'" (exit status 1 and a traceback from `pvtv2 predict`). They ask for an output object."""
    import copy

    from PIL import Image

    from pvtv2 import PvtV2ForDepthEstimation, PvtV2ForSemanticSegmentation
    from pvtv2.inference import predict_depth, segmentation_logits, torch_runtime

    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 64, 64)
    for cls in (PvtV2ForImageClassification, PvtV2ForSemanticSegmentation, PvtV2ForDepthEstimation):
        model = random_weights_(cls(PvtV2Config(**TINY, num_labels=3))).eval()
        tuples = copy.deepcopy(model)
        tuples.config.return_dict = False
        assert isinstance(tuples(pixels), tuple)  # the config is honoured by a plain call
        with torch.no_grad():
            if cls is PvtV2ForImageClassification:
                expected = model(pixels).logits
                got = torch_runtime(tuples)(pixels)
            elif cls is PvtV2ForSemanticSegmentation:
                expected = model(pixels).logits
                got = segmentation_logits(tuples, pixels)
                expected = torch.nn.functional.interpolate(expected, size=got.shape[-2:], mode="bilinear",
                                                           align_corners=False)
            else:
                image = Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy())
                expected = torch.as_tensor(predict_depth(model, image))
                got = torch.as_tensor(predict_depth(tuples, image))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # The command: the folder of a classifier whose config.json says so predicts (exit status 0).
    model = random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=3, return_dict=False)))
    model.save_pretrained(tmp_path / "tuples")
    Image.new("RGB", (40, 40)).save(tmp_path / "image.png")
    assert main(["predict", "--model", str(tmp_path / "tuples"), str(tmp_path / "image.png")]) == 0


def test_training_evaluations_read_outputs_of_a_config_that_asks_for_tuples():
    """The training loops and evaluations of a model built from such a config.json (pvtv2 train --model FOLDER)
    failed the same way. The sums equal those computed from the model's own logits."""
    from pvtv2 import PvtV2ForSemanticSegmentation
    from pvtv2.training.classification import evaluate_classifier
    from pvtv2.training.segmentation import evaluate_segmentation

    torch.manual_seed(0)
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    model = random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=3, return_dict=False)))
    with torch.no_grad():
        logits = model.eval()(images)[0]
    loss, top1, _, count = evaluate_classifier(model, [(images, labels)], torch.device("cpu"))
    assert count == 2 and top1 == (logits.argmax(1) == labels).sum().item()
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item(), rel=1e-5)

    segmenter = random_weights_(PvtV2ForSemanticSegmentation(PvtV2Config(**TINY, num_labels=3, return_dict=False)))
    masks = torch.randint(0, 3, (2, 64, 64))
    with torch.no_grad():
        up = torch.nn.functional.interpolate(segmenter.eval()(images)[0], size=(64, 64), mode="bilinear",
                                             align_corners=False)
    accuracy = (up.argmax(1) == masks).float().mean().item()
    assert evaluate_segmentation(segmenter, [(images, masks)])["pixel_accuracy"] == pytest.approx(accuracy, abs=1e-6)


@pytest.mark.slow
def test_train_from_a_folder_whose_config_asks_for_tuples(tmp_path, capsys):
    from pvtv2 import PvtV2ForSemanticSegmentation

    data = make_segmentation_example(tmp_path / "data", 2, 1, 32)
    model = PvtV2ForSemanticSegmentation(PvtV2Config(**TINY, num_labels=4, return_dict=False))
    model.save_pretrained(tmp_path / "tuples")
    code = main(["train", "--task", "segmentation", "--model", str(tmp_path / "tuples"), "--data", str(data),
                 "--output", str(tmp_path / "run"), "--epochs", "1", "--image-size", "32", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "last" / "training_state.pt").is_file()


# ---------------------------------------------------------------------------------------------- num_labels
def test_an_absurd_num_labels_is_refused_not_a_hang():
    """{"num_labels": 10**30} used to build 10**30 generic names (a hang, then out of memory); refused by name now,
    in the constructor and the setter alike, while a large real one still names its classes."""
    for build in (lambda n: PvtV2Config(num_labels=n), lambda n: setattr(PvtV2Config(), "num_labels", n)):
        with pytest.raises(ValueError, match=r"^num_labels=10{30} is more classes than a classifier head can have"):
            build(10**30)
    config = PvtV2Config(num_labels=21841)
    assert len(config.id2label) == 21841 and config.id2label[21840] == "LABEL_21840"
