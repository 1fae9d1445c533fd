"""How the tasks read ``--model``: ``tiny``, a preset name and a config.json make the same encoder in every dense task
(held against a ``PvtV2Config`` built here and against ``PvtV2Model``'s parameters), the classification task builds
the configuration a preset or a config.json names, and a config.json that is not there is refused the same way by all
four, before anything is read or written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY_SHALLOW

from pvtv2.cli import main
from pvtv2.data.digits import write_digits_folder
from pvtv2.models.config import PvtV2Config
from pvtv2.models.modeling import PvtV2Model
from pvtv2.training import TrainConfig
from pvtv2.training.classification import build_classifier
from pvtv2.training.depth_task import build_depth_model
from pvtv2.training.detection import build_detector
from pvtv2.training.runner import TASK_CLASSES
from pvtv2.training.segmentation import build_segmentation_model

DENSE = ("segmentation", "detection", "depth")
TASKS = ("classification", *DENSE)
SIZE = 64
ID2LABEL = {0: "a", 1: "b", 2: "c"}
# The fields that decide the encoder; the heads' (labels, decoder and FPN widths) differ between tasks on purpose.
ENCODER_FIELDS = (
    "image_size", "num_channels", "num_encoder_blocks", "depths", "sr_ratios", "hidden_sizes", "patch_sizes",
    "strides", "num_attention_heads", "mlp_ratios", "hidden_act", "hidden_dropout_prob",
    "attention_probs_dropout_prob", "initializer_range", "drop_path_rate", "layer_norm_eps", "qkv_bias",
    "linear_attention", "patch_embed_layer_norm_eps", "reduction_layer_norm_eps",
)


def _build(task: str, cfg: TrainConfig) -> torch.nn.Module:
    if task == "classification":
        return build_classifier(cfg, list(ID2LABEL.values()))
    if task == "segmentation":
        return build_segmentation_model(cfg, ID2LABEL)
    if task == "detection":
        return build_detector(cfg, ID2LABEL)
    return build_depth_model(cfg)


def _expected(kind: str, drop_path: float | None, json_file: str) -> tuple[str, PvtV2Config]:
    """The --model of ``kind`` and the encoder it means, written out independently of the tasks' code."""
    path_rate = {} if drop_path is None else {"drop_path_rate": drop_path}
    if kind == "tiny":  # the examples' small encoder (docs: 32-64-128-160 channels, one block a stage)
        return "tiny", PvtV2Config(depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 128, 160], num_attention_heads=[1, 2, 4, 5],
                                   mlp_ratios=[4, 4, 4, 4], sr_ratios=[4, 2, 1, 1], image_size=SIZE,
                                   drop_path_rate=0.0 if drop_path is None else drop_path)
    if kind == "preset":
        return "pvt_v2_b0", PvtV2Config.from_preset("pvt_v2_b0", image_size=SIZE, **path_rate)
    return json_file, PvtV2Config(**{**TINY_SHALLOW, "drop_path_rate": 0.05, "image_size": SIZE, **path_rate})


@pytest.mark.parametrize("drop_path", [None, 0.2])
@pytest.mark.parametrize("kind", ["tiny", "preset", "config.json"])
def test_the_dense_tasks_resolve_a_new_architecture_to_the_same_encoder(tmp_path, kind, drop_path):
    json_file = tmp_path / "arch.json"
    json_file.write_text(json.dumps({"model_type": "pvt_v2", **TINY_SHALLOW, "drop_path_rate": 0.05}), encoding="utf-8")
    model, expected = _expected(kind, drop_path, str(json_file))
    want = {name: getattr(expected, name) for name in ENCODER_FIELDS}
    want_shapes = {k: v.shape for k, v in PvtV2Model(expected).state_dict().items()}
    for task in DENSE:
        cfg = TrainConfig(task=task, model=model, image_size=SIZE, drop_path=drop_path, output="unused")
        built = _build(task, cfg)
        # The detector records its sizes as min_size / max_size (the shorter and longer side), not image_size.
        fields = [name for name in ENCODER_FIELDS if not (task == "detection" and name == "image_size")]
        assert {name: getattr(built.config, name) for name in fields} == {name: want[name] for name in fields}, task
        assert {k: v.shape for k, v in built.pvt_v2.state_dict().items()} == want_shapes, task
        # What the run checks against --image-size before reading data is the same encoder (no drop path: the
        # check does not need it).
        checked = TASK_CLASSES[task](cfg).architecture()
        assert {name: getattr(checked, name) for name in ENCODER_FIELDS if name != "drop_path_rate"} == {
            name: value for name, value in want.items() if name != "drop_path_rate"}, task


@pytest.mark.parametrize("drop_path", [None, 0.2])
@pytest.mark.parametrize("kind", ["preset", "config.json"])
def test_the_classification_task_builds_the_architecture_it_is_given(tmp_path, kind, drop_path):
    """Every field of the classifier's config, labels included, against a ``PvtV2Config`` built here."""
    json_file = tmp_path / "arch.json"
    json_file.write_text(json.dumps({"model_type": "pvt_v2", **TINY_SHALLOW, "drop_path_rate": 0.05}), encoding="utf-8")
    model, expected = _expected(kind, drop_path, str(json_file))
    expected = expected.replace(id2label=ID2LABEL, label2id={name: i for i, name in ID2LABEL.items()})
    cfg = TrainConfig(model=model, image_size=SIZE, drop_path=drop_path, output="unused")
    built = _build("classification", cfg)
    assert built.config.num_labels == len(ID2LABEL)
    assert built.config.to_dict() == expected.to_dict()
    assert {k: v.shape for k, v in built.state_dict().items()} == {
        k: v.shape for k, v in type(built)(expected).state_dict().items()}
    checked = TASK_CLASSES["classification"](cfg).architecture()
    assert {name: getattr(checked, name) for name in ENCODER_FIELDS if name != "drop_path_rate"} == {
        name: getattr(expected, name) for name in ENCODER_FIELDS if name != "drop_path_rate"}


def test_tiny_names_no_classifier(tmp_path, monkeypatch):
    """``tiny`` is the dense tasks' small model; to the classification task it is a checkpoint's name, as before."""
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(model="tiny", image_size=SIZE, output="unused")
    assert TASK_CLASSES["classification"](cfg).architecture() is None
    with pytest.raises(FileNotFoundError, match="'tiny' is not an existing file or folder, a preset name, nor a hub id"):
        _build("classification", cfg)


@pytest.mark.parametrize("task", TASKS)
def test_a_missing_config_json_is_refused_in_one_line_naming_it(tmp_path, capsys, task):
    missing = tmp_path / "missing.json"
    out = tmp_path / "run"
    code = main(["train", "--task", task, "--data", str(tmp_path / "data"), "--model", str(missing), "--output",
                 str(out), "--epochs", "1", "--image-size", str(SIZE), "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    # Refused before the (absent) data is looked at, with the same words in every task.
    assert lines[0] == f"pvtv2 train: error: config file not found: {str(missing)!r} (--model X.json names an " \
                       "architecture: a config.json file)", lines
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="missing.json"):
        _build(task, TrainConfig(task=task, model=str(missing), image_size=SIZE, output="unused"))


@pytest.mark.parametrize("task", TASKS)
def test_a_config_json_in_capitals_is_read_as_one(tmp_path, capsys, task):
    """ARCH.JSON names the architecture like arch.json (it used to be loaded as a checkpoint: 'not a readable PyTorch
    checkpoint', or, missing, a message about hub ids)."""
    json_file = tmp_path / "ARCH.JSON"
    json_file.write_text(json.dumps({"model_type": "pvt_v2", **TINY_SHALLOW, "drop_path_rate": 0.05}), encoding="utf-8")
    built = _build(task, TrainConfig(task=task, model=str(json_file), image_size=SIZE, output="unused"))
    expected = PvtV2Config(**{**TINY_SHALLOW, "drop_path_rate": 0.05, "image_size": SIZE})
    # The detector records its sizes as min_size / max_size, not image_size.
    fields = [name for name in ENCODER_FIELDS if not (task == "detection" and name == "image_size")]
    assert {name: getattr(built.config, name) for name in fields} == {name: getattr(expected, name) for name in fields}
    missing, out = tmp_path / "missing.JSON", tmp_path / "run"
    code = main(["train", "--task", task, "--data", str(tmp_path / "data"), "--model", str(missing), "--output",
                 str(out), "--epochs", "1", "--image-size", str(SIZE), "--no-progress"])
    assert code == 2 and capsys.readouterr().err.strip().splitlines() == [
        f"pvtv2 train: error: config file not found: {str(missing)!r} (--model X.json names an architecture: a config.json file)"]
    assert not out.exists()


@pytest.mark.parametrize("target", ["nowhere.json", "loop.json"], ids=["dangling", "loop"])
def test_a_config_json_link_that_does_not_resolve_is_named(tmp_path, capsys, target):
    link = tmp_path / "arch.json"
    link.symlink_to(target)
    if target == "loop.json":
        (tmp_path / "loop.json").symlink_to("arch.json")
    out = tmp_path / "run"
    code = main(["train", "--data", str(tmp_path / "data"), "--model", str(link), "--output", str(out), "--epochs", "1",
                 "--image-size", str(SIZE), "--no-progress"])
    line = f"pvtv2 train: error: config file {str(link)!r} is a symbolic link to {target!r}, which does not resolve to a file"
    assert code == 2 and capsys.readouterr().err.strip().splitlines() == [line]
    assert not out.exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_config_json_that_is_a_fifo_is_named_not_read(tmp_path):
    fifo = tmp_path / "arch.json"
    os.mkfifo(fifo)
    for task in TASKS:
        with pytest.raises(ValueError, match=r"arch\.json' is a FIFO \(named pipe\), not a file"):
            _build(task, TrainConfig(task=task, model=str(fifo), image_size=SIZE, output="unused"))


@pytest.mark.slow
def test_train_refuses_a_missing_config_json_before_reading_the_images(tmp_path):
    """The classification task (the default) on a real image folder: the same one line as the dense tasks, exit
    status 2, and no run folder (it used to scan the images, then answer with a message about hub ids)."""
    data, out, missing = tmp_path / "digits", tmp_path / "run", tmp_path / "missing.json"
    write_digits_folder(data, size=16, limit_per_class=2, val_fraction=0.5, seed=0)
    done = subprocess.run(
        [sys.executable, "-m", "pvtv2", "train", "--data", str(data), "--model", str(missing), "--output", str(out),
         "--epochs", "1", "--image-size", "16", "--no-progress"],
        capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"pvtv2 train: error: config file not found: {str(missing)!r} (--model X.json names an architecture: a config.json file)"]
    assert not out.exists()
