"""What ``from_pretrained`` initialised at random is recorded on the model, and paths that cannot hold weights (a
symlink loop, a dangling symlink, a FIFO) are named as what they are, not as missing hub repositories."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import TINY_SHALLOW, perturb_
from safetensors.torch import load_file

from pvtv2 import CheckpointError, PvtV2Config, PvtV2ForImageClassification, PvtV2Model
from pvtv2.models.depth import PvtV2ForDepthEstimation
from pvtv2.models.segmentation import PvtV2ForSemanticSegmentation
from pvtv2.weights.loading import locate_checkpoint

LABELS = {0: "cat", 1: "dog", 2: "fish"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A classifier, an encoder, a segmenter and a depth model, each saved with save_pretrained."""
    root = tmp_path_factory.mktemp("heads")
    torch.manual_seed(0)
    config = PvtV2Config(**TINY_SHALLOW, id2label=LABELS, image_size=64)
    perturb_(PvtV2ForImageClassification(config)).save_pretrained(root / "classifier")
    perturb_(PvtV2Model(config)).save_pretrained(root / "encoder")
    dense = PvtV2Config(**TINY_SHALLOW, decoder_hidden_size=32, id2label=LABELS)
    perturb_(PvtV2ForSemanticSegmentation(dense)).save_pretrained(root / "segmenter")
    perturb_(PvtV2ForDepthEstimation(dense)).save_pretrained(root / "depth")
    return root


def absent_from_file(model: torch.nn.Module, folder) -> set[str]:
    """The model's state-dict keys whose tensors the saved file does not provide with the model's shape: what a
    loader had to invent (computed from the file, independently of the loader's own bookkeeping). A bare encoder's
    keys lack the task models' ``pvt_v2.`` prefix."""
    saved = load_file(folder / "model.safetensors")
    saved.update({f"pvt_v2.{k}": v for k, v in saved.items() if k.startswith("encoder.")})
    return {k for k, v in model.state_dict().items() if k not in saved or saved[k].shape != v.shape}


def test_a_complete_checkpoint_records_nothing_new(folders):
    model = PvtV2ForImageClassification.from_pretrained(folders / "classifier")
    assert model.newly_initialized_keys == ()
    assert absent_from_file(model, folders / "classifier") == set()


@pytest.mark.parametrize(
    "cls, folder",
    [
        (PvtV2ForImageClassification, "encoder"),  # backbone weights: no classifier
        (PvtV2ForSemanticSegmentation, "classifier"),  # no decode head
        (PvtV2ForSemanticSegmentation, "depth"),
        (PvtV2ForDepthEstimation, "classifier"),  # no decoder, no head
        (PvtV2ForDepthEstimation, "segmenter"),
    ],
)
def test_a_missing_head_is_recorded_key_by_key(folders, cls, folder):
    model = cls.from_pretrained(folders / folder)
    new = model.newly_initialized_keys
    assert new == tuple(sorted(new)) and len(new) > 0
    assert set(new) == absent_from_file(model, folders / folder)
    assert all(k.startswith(cls.head_prefixes) for k in new)  # the encoder came from the checkpoint
    assert not any("newly_initialized" in k for k in model.state_dict())  # a plain attribute, not saved


def test_a_head_sized_for_other_classes_is_recorded(folders, tmp_path):
    # config.json claims five labels, the weights have three, and no other head was asked for: the folder contradicts
    # itself and is refused, as transformers refuses it (it loaded a random head under the five names, a warning its
    # only sign); ignore_mismatched_sizes=True replaces the head, as there
    folder = tmp_path / "more_labels"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((folders / "classifier" / "model.safetensors").read_bytes())
    config = json.loads((folders / "classifier" / "config.json").read_text())
    config["id2label"] = {str(i): f"class {i}" for i in range(5)}
    config.pop("label2id", None)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"classifier.weight: checkpoint \(3, \d+\) vs model \(5, \d+\)"):
        PvtV2ForImageClassification.from_pretrained(folder)
    model = PvtV2ForImageClassification.from_pretrained(folder, ignore_mismatched_sizes=True)
    assert model.config.num_labels == 5
    assert model.newly_initialized_keys == ("classifier.bias", "classifier.weight")
    assert set(model.newly_initialized_keys) == absent_from_file(model, folder)
    # fine-tuning's override gives the same record
    tuned = PvtV2ForImageClassification.from_pretrained(folders / "classifier", num_labels=7)
    assert tuned.newly_initialized_keys == ("classifier.bias", "classifier.weight")


def test_a_symlink_loop_is_named_as_one(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="symlink loop") as caught:
        PvtV2ForImageClassification.from_pretrained(tmp_path / "a")
    assert "hub" not in str(caught.value)


def test_a_dangling_symlink_names_its_target(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "gone.safetensors")
    with pytest.raises(FileNotFoundError, match=r"symlink to .*gone\.safetensors.*does not exist"):
        locate_checkpoint(tmp_path / "link", None, None)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "weights.safetensors"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes: the test would hang
    with pytest.raises(ValueError, match=r"FIFO \(named pipe\), not a checkpoint file or folder"):
        locate_checkpoint(fifo, None, None)
