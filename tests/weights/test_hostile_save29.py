"""save_pretrained's keyword arguments used as a hostile user would: shared and view tensors, a model with no data,
bad arguments on a process that is not the main one, a dangling symlink for the folder, symlinks in the folder."""

from __future__ import annotations

import os

import pytest
import torch

from pvtv2 import PvtV2Config, PvtV2ForImageClassification
from pvtv2.weights import files

from conftest import TINY, random_weights_


def _classifier(seed: int = 0) -> PvtV2ForImageClassification:
    return random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5)), seed=seed).eval()


@pytest.mark.parametrize("safe", [True, False])
def test_tensors_sharing_storage_are_saved_each_with_its_own_values(tmp_path, safe):
    # safetensors refused two keys on one storage ("Some tensors share memory"), and torch.save of a row of a large
    # tensor wrote the whole large storage. Each key is written with its own values, as a copy of them.
    model = _classifier()
    state = model.state_dict()
    key = "classifier.weight"
    big = torch.arange(1000 * 100, dtype=torch.float32).reshape(1000, 100)
    shared = dict(state, **{"extra.tied": state[key], "extra.row": big[3]})
    model.save_pretrained(tmp_path, state_dict=shared, safe_serialization=safe)
    name = "model.safetensors" if safe else "pytorch_model.bin"
    back = files.read_state_dict(tmp_path / name)
    assert torch.equal(back["extra.tied"], state[key]) and torch.equal(back[key], state[key])
    assert torch.equal(back["extra.row"], torch.arange(300, 400, dtype=torch.float32))
    # the file holds the row, not the 400 kB storage it was a view of
    total = sum(t.numel() * t.element_size() for t in shared.values())
    assert os.path.getsize(tmp_path / name) < total + 100_000


def test_a_model_on_the_meta_device_is_named_and_nothing_written(tmp_path):
    # It failed inside the serialiser with torch's "Cannot copy out of meta tensor; no data!"
    with torch.device("meta"):
        model = PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5))
    with pytest.raises(ValueError, match=r"'pvt_v2\.encoder\.layers\.0\.patch_embedding\.proj\.weight' is a meta tensor"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad, error, match", [
    ([1, 2], TypeError, "state_dict must be a mapping"),
    ({"a": 1}, TypeError, r"state_dict\['a'\] is a int"),
    ({}, ValueError, "state_dict is empty"),
])
def test_bad_arguments_are_refused_on_every_process(tmp_path, bad, error, match):
    # With is_main_process=False a state_dict that is no state dict was accepted silently: the error showed on the
    # main process alone, after the others had gone on.
    with pytest.raises(error, match=match):
        _classifier().save_pretrained(tmp_path, is_main_process=False, state_dict=bad)
    with pytest.raises(ValueError, match="max_shard_size"):
        _classifier().save_pretrained(tmp_path, is_main_process=False, max_shard_size="0GB")
    assert os.listdir(tmp_path) == []


def test_a_model_on_the_meta_device_is_named_on_every_process(tmp_path):
    with torch.device("meta"):
        model = PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5))
    with pytest.raises(ValueError, match="is a meta tensor"):
        model.save_pretrained(tmp_path, is_main_process=False)


def test_a_dangling_symlink_for_the_folder_is_named(tmp_path):
    # It was mkdir's bare "[Errno 17] File exists"
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(FileExistsError, match=r"link': it is a symlink to '.*gone', which does not exist"):
        _classifier().save_pretrained(tmp_path / "link")


def test_symlinks_in_the_folder_are_replaced_never_written_through(tmp_path):
    # A model.safetensors symlink, and a stale shard symlink, point out of the folder: the save replaces the first
    # with a file and removes the second; neither target is touched.
    folder, outside, other = tmp_path / "save", tmp_path / "outside.safetensors", tmp_path / "other.safetensors"
    folder.mkdir()
    outside.write_bytes(b"precious")
    other.write_bytes(b"precious too")
    (folder / "model.safetensors").symlink_to(outside)
    (folder / "model-00001-of-00009.safetensors").symlink_to(other)
    model = _classifier()
    model.save_pretrained(folder)
    assert outside.read_bytes() == b"precious" and other.read_bytes() == b"precious too"
    assert not (folder / "model.safetensors").is_symlink()
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    back = files.read_state_dict(folder / "model.safetensors")
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_a_folder_reached_through_a_symlink_is_written_into(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    model = _classifier()
    model.save_pretrained(tmp_path / "link", max_shard_size="50KB")
    assert (tmp_path / "real" / "model.safetensors.index.json").is_file()
    back = PvtV2ForImageClassification.from_pretrained(tmp_path / "real")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("text, expected", [("1.5 GB", 1_500_000_000), ("5gb", 5 * 10**9), ("5GiB", 5 * 2**30),
                                            (".5KB", 500), ("99999TB", 99999 * 10**12)])
def test_shard_sizes_in_hostile_spellings(text, expected):
    from pvtv2.weights.loading import shard_size_bytes
    assert shard_size_bytes(text) == expected


def test_only_files_of_the_forms_it_writes_are_removed(tmp_path):
    # Another save's shards (either form) and indexes go; files that only look like them stay, and so does every
    # file of the new save.
    stale = ["model-00001-of-00002.safetensors", "pytorch_model-00003-of-00007.bin", "pytorch_model.bin",
             "pytorch_model.bin.index.json"]
    kept = ["model-00001-of-00002.safetensors.bak", "my-model-00001-of-00002.safetensors", "model-1-of-2.safetensors",
            "model-00001-of-00002.safetensors.index.json", "tf_model.h5", "notes.txt"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"theirs")
    model = _classifier()
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    names = sorted(os.listdir(tmp_path))
    new = sorted(n for n in names if n not in kept)
    assert all((tmp_path / n).read_bytes() == b"theirs" for n in kept)
    count = len(new) - 2  # config.json and the index
    assert new == sorted(["config.json", "model.safetensors.index.json"]
                         + [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)])
    back = PvtV2ForImageClassification.from_pretrained(tmp_path)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
