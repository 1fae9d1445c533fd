"""How the dense tasks read ``--model``: ``tiny``, a preset name and a config.json make the same encoder in every task
(held against a ``PvtV2Config`` built here and against ``PvtV2Model``'s parameters), and a config.json that is not
there is refused the same way by each, before anything is read or written."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import TINY_SHALLOW

from pvtv2.cli import main
from pvtv2.models.config import PvtV2Config
from pvtv2.models.modeling import PvtV2Model
from pvtv2.training import TrainConfig
from pvtv2.training.depth_task import build_depth_model
from pvtv2.training.detection import build_detector
from pvtv2.training.runner import TASK_CLASSES
from pvtv2.training.segmentation import build_segmentation_model

DENSE = ("segmentation", "detection", "depth")
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


@pytest.mark.parametrize("task", DENSE)
def test_a_missing_config_json_is_refused_in_one_line_naming_it(tmp_path, capsys, task):
    missing = tmp_path / "missing.json"
    out = tmp_path / "run"
    code = main(["train", "--task", task, "--data", str(tmp_path / "data"), "--model", str(missing), "--output",
                 str(out), "--epochs", "1", "--image-size", str(SIZE), "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    # Refused before the (absent) data is looked at, with the same words in every task.
    assert lines[0] == f"pvtv2 train: error: config file not found: {str(missing)!r} (--model X.json names the " \
                       "architecture to train)", lines
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="missing.json"):
        _build(task, TrainConfig(task=task, model=str(missing), image_size=SIZE, output="unused"))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_config_json_that_is_a_fifo_is_named_not_read(tmp_path):
    fifo = tmp_path / "arch.json"
    os.mkfifo(fifo)
    for task in DENSE:
        with pytest.raises(ValueError, match=r"arch\.json' is a FIFO \(named pipe\), not a file"):
            _build(task, TrainConfig(task=task, model=str(fifo), image_size=SIZE, output="unused"))
