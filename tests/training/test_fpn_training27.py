"""``--decode-head fpn``: Semantic FPN trained from the command line, new or on a classification checkpoint's encoder."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, PvtV2ForSemanticSegmentation
from pvtv2.cli import main
from pvtv2.data.shapes import make_segmentation_example
from pvtv2.models.segmentation import DECODE_HEAD_TYPES
from pvtv2.training import TrainConfig
from pvtv2.training.config import DECODE_HEADS
from pvtv2.training.segmentation import build_segmentation_model

from conftest import TINY

CLASSES = {0: "background", 1: "circle", 2: "square", 3: "triangle"}


def test_the_names_are_the_models():
    assert DECODE_HEADS == DECODE_HEAD_TYPES


def test_a_classification_checkpoint_gets_a_semantic_fpn_head(tmp_path):
    torch.manual_seed(0)
    classifier = PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5))
    classifier.save_pretrained(tmp_path / "cls")
    cfg = TrainConfig(model=str(tmp_path / "cls"), task="segmentation", image_size=64, decode_head="fpn")
    model = build_segmentation_model(cfg, CLASSES)
    assert model.head_type == "fpn" and model.config.num_labels == 4
    for key, value in classifier.pvt_v2.state_dict().items():
        assert torch.equal(model.pvt_v2.state_dict()[key], value), key
    # mmsegmentation's initialisation of the new head: the classifier normal(0, 0.01), biases zero
    weight = model.decode_head.classifier.weight
    assert abs(weight.std().item() - 0.01) < 0.003 and model.decode_head.classifier.bias.abs().max() == 0
    # Without the flag: SegFormer's head, as before.
    plain = build_segmentation_model(dataclasses.replace(cfg, decode_head=None), CLASSES)
    assert plain.head_type == "segformer"


def test_train_a_new_semantic_fpn_and_resume_it(tmp_path):
    make_segmentation_example(tmp_path / "data", 16, 8, 32, seed=1)
    args = ["train", "--task", "segmentation", "--data", str(tmp_path / "data"), "--model", "tiny", "--image-size",
            "32", "--batch-size", "8", "--lr", "2e-3", "--warmup-epochs", "0", "--no-progress", "--decode-head", "fpn"]
    out = tmp_path / "run"
    assert main([*args, "--epochs", "1", "--output", str(out)]) == 0
    model = PvtV2ForSemanticSegmentation.from_pretrained(out / "last")
    assert model.head_type == "fpn" and model.config.decode_head_type == "fpn"
    with torch.device("meta"):
        expected = PvtV2ForSemanticSegmentation(model.config, head="fpn")
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in expected.parameters())
    # Fine-tuning a Semantic FPN checkpoint keeps its head (trained weights, not a new one) without the flag.
    cfg = TrainConfig(model=str(out / "last"), task="segmentation", image_size=32)
    again = build_segmentation_model(cfg, CLASSES)
    assert again.head_type == "fpn" and again.newly_initialized_keys == ()
    assert torch.equal(again.decode_head.classifier.weight, model.decode_head.classifier.weight)


@pytest.mark.parametrize("flags, message", [
    (["--decode-head", "fpn"], "--task segmentation only"),
    (["--task", "segmentation", "--decode-head", "uper"], "invalid choice"),
])
def test_bad_decode_head_flags(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) if "uper" in flags else contextlib.nullcontext():
        assert main(["train", "--data", str(tmp_path), "--model", "tiny", "-o", str(tmp_path / "o"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
