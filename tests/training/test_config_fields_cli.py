"""``pvtv2 train --model X.json``: a config.json written by hand for a new architecture. A misspelt field in it
({"depth": ...} for depths) used to train the default architecture without a word; the command now refuses it in
one line, naming the field it may mean, before the data is read or the run folder made."""

from __future__ import annotations

import json

import pytest
import transformers

from pvtv2 import PvtV2Config
from pvtv2.cli import main
from pvtv2.training.engine import known_architecture, new_architecture

from conftest import TINY_SMALL_IMAGES


def _misspelt(tmp_path):
    arch = tmp_path / "arch.json"
    fields = {k: v for k, v in TINY_SMALL_IMAGES.items() if k != "depths"}
    arch.write_text(json.dumps({**fields, "depth": [1, 1, 1, 1]}))
    return arch


@pytest.mark.parametrize("task", ["classification", "segmentation", "detection", "depth"])
def test_train_refuses_a_misspelt_field_of_a_new_architecture(tmp_path, capsys, task):
    arch, out = _misspelt(tmp_path), tmp_path / "run"
    code = main(["train", "--task", task, "--model", str(arch), "--data", str(tmp_path / "data"), "--output", str(out),
                 "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"pvtv2 train: error: {arch}: unknown field 'depth' (did you mean 'depths'?)"]
    assert not out.exists()


def test_both_readers_of_an_architecture_file_refuse_it(tmp_path):
    arch = _misspelt(tmp_path)
    for read in (new_architecture, known_architecture):
        with pytest.raises(ValueError, match=r"unknown field 'depth' \(did you mean 'depths'\?\)"):
            read(str(arch))


def test_a_config_json_that_transformers_wrote_is_a_new_architecture(tmp_path):
    """A hub or transformers config.json copied as the architecture of a new run keeps working (its generic keys,
    architectures, transformers_version ..., are transformers' own)."""
    theirs = transformers.PvtV2Config(**TINY_SMALL_IMAGES, num_labels=3)
    theirs.architectures = ["PvtV2ForImageClassification"]
    theirs.save_pretrained(tmp_path)
    config = new_architecture(str(tmp_path / "config.json"))
    assert config == PvtV2Config(**TINY_SMALL_IMAGES, num_labels=3)
    assert config.architectures == ["PvtV2ForImageClassification"]
