"""save_pretrained takes transformers' keyword arguments: safe_serialization, is_main_process, state_dict,
max_shard_size (sharded as huggingface_hub shards), push_to_hub refused (variant: test_loading_args30.py), token / save_function accepted;
stale weight files of another form are removed, other files kept; a failed write leaves the previous save."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
import transformers
from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.serialization._base import parse_size_to_int
from transformers.utils.hub import convert_file_size_to_int

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, PvtV2Model
from pvtv2.weights import files
from pvtv2.weights.loading import shard_size_bytes

from conftest import TINY, random_weights_

IMAGE = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _classifier(seed: int = 0) -> PvtV2ForImageClassification:
    return random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5)), seed=seed).eval()


def _weight_files(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n != "config.json")


def _logits(model, image=IMAGE):
    with torch.no_grad():
        return model(image).logits


def _their_classifier(folder):
    theirs, info = transformers.PvtV2ForImageClassification.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return theirs.eval()


@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("max_shard_size", [None, "20KB", 30_000])
def test_round_trip_ours_and_transformers(tmp_path, safe, max_shard_size):
    model = _classifier()
    kwargs = {"safe_serialization": safe} | ({} if max_shard_size is None else {"max_shard_size": max_shard_size})
    model.save_pretrained(tmp_path, **kwargs)
    stem, suffix = ("model", ".safetensors") if safe else ("pytorch_model", ".bin")
    state = model.state_dict()
    if max_shard_size is None:
        assert _weight_files(tmp_path) == [stem + suffix]
    else:
        # the same split, file names and index as huggingface_hub's (which transformers' save_pretrained calls)
        split = split_torch_state_dict_into_shards(state, filename_pattern=stem + "{suffix}" + suffix,
                                                   max_shard_size=max_shard_size)
        assert split.is_sharded and len(split.filename_to_tensors) > 2
        assert _weight_files(tmp_path) == sorted([*split.filename_to_tensors, f"{stem}{suffix}.index.json"])
        index = json.loads((tmp_path / f"{stem}{suffix}.index.json").read_text())
        assert index["weight_map"] == split.tensor_to_filename
        assert index["metadata"]["total_size"] == split.metadata["total_size"] == sum(
            t.numel() * t.element_size() for t in state.values())
        for name, keys in split.filename_to_tensors.items():
            part = files.read_state_dict(tmp_path / name)
            assert sorted(part) == sorted(keys)
    if not safe:
        # a plain dict of tensors: readable with weights_only=True
        name = _weight_files(tmp_path)[0]
        loaded = torch.load(tmp_path / name, weights_only=True)
        assert type(loaded) is dict and all(isinstance(v, torch.Tensor) for v in loaded.values())
    expected = _logits(model)
    ours = PvtV2ForImageClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(ours), expected, rtol=0, atol=0)
    torch.testing.assert_close(_their_classifier(tmp_path)(IMAGE).logits.detach(), expected, rtol=1e-5, atol=1e-5)


def test_encoder_round_trip_sharded_bin(tmp_path):
    model = random_weights_(PvtV2Model(PvtV2Config(**TINY)), seed=1).eval()
    model.save_pretrained(tmp_path, safe_serialization=False, max_shard_size="10KB")
    assert "pytorch_model.bin.index.json" in os.listdir(tmp_path)
    with torch.no_grad():
        expected = model(IMAGE).last_hidden_state
        ours = PvtV2Model.from_pretrained(tmp_path)(IMAGE).last_hidden_state
        theirs = transformers.PvtV2Model.from_pretrained(tmp_path).eval()(IMAGE).last_hidden_state
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    torch.testing.assert_close(theirs, expected, rtol=1e-5, atol=1e-5)


def test_tensor_over_the_limit_gets_a_shard_of_its_own(tmp_path):
    model = _classifier()
    state = model.state_dict()
    biggest = max(state, key=lambda k: state[k].numel())
    limit = state[biggest].numel() * state[biggest].element_size() - 1
    model.save_pretrained(tmp_path, max_shard_size=limit)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][biggest]
    assert [k for k, v in index["weight_map"].items() if v == shard] == [biggest]
    for name in set(index["weight_map"].values()) - {shard}:
        part = files.read_state_dict(tmp_path / name)
        assert 0 < sum(t.numel() * t.element_size() for t in part.values()) <= limit


def test_shard_sizes_parse_as_transformers_does():
    for text in ("5GB", "500MB", "10KB", "1.5GB", "7mb", "2TB"):
        assert shard_size_bytes(text) == parse_size_to_int(text), text
    for text in ("1GiB", "3MiB", "10KiB"):
        assert shard_size_bytes(text) == convert_file_size_to_int(text), text
    assert shard_size_bytes(12345) == 12345
    for bad in ("5 gigabytes", "GB", "", "-5MB", 0, -3, True, 1.5, None):
        with pytest.raises(ValueError, match="max_shard_size"):
            shard_size_bytes(bad)


def test_not_main_process_writes_nothing(tmp_path):
    _classifier().save_pretrained(tmp_path, is_main_process=False)
    assert os.listdir(tmp_path) == []


def test_state_dict_written_instead_of_the_models(tmp_path):
    model, other = _classifier(0), _classifier(1)
    merged = {k: (v + other.state_dict()[k]) / 2 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path, state_dict=merged)
    reference = _classifier(0)
    reference.load_state_dict(merged)
    expected = _logits(reference)
    assert not torch.allclose(expected, _logits(model))
    torch.testing.assert_close(_logits(PvtV2ForImageClassification.from_pretrained(tmp_path)), expected, rtol=0, atol=0)
    torch.testing.assert_close(_their_classifier(tmp_path)(IMAGE).logits.detach(), expected, rtol=1e-5, atol=1e-5)


def test_state_dict_that_does_not_fit_is_written_with_a_warning(tmp_path, caplog):
    model = _classifier()
    state = model.state_dict()
    filtered = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    norm = next(k for k in state if k.endswith("norm.weight"))
    filtered[norm] = torch.ones(3)
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        model.save_pretrained(tmp_path, state_dict=filtered)
    assert "2 of the model's tensors are not in it (classifier)" in caplog.text
    assert f"{norm} (3,) (model {tuple(state[norm].shape)})" in caplog.text
    written = files.read_state_dict(tmp_path / "model.safetensors")
    assert sorted(written) == sorted(filtered)
    torch.testing.assert_close(written[norm], torch.ones(3))


@pytest.mark.parametrize("bad, match", [
    ({"classifier.weight": [1.0, 2.0]}, "state_dict\\['classifier.weight'\\] is a list, not a tensor"),
    ({3: torch.zeros(2)}, "key 3"),
    ({"x": torch.empty(2, device="meta")}, "meta tensor"),
    ([("x", torch.zeros(2))], "mapping"),
    ({}, "empty"),
])
def test_state_dict_of_non_tensors_refused_and_nothing_written(tmp_path, bad, match):
    model = _classifier()
    state = dict(model.state_dict())
    if isinstance(bad, dict) and bad:
        state.update(bad)
        bad = state
    with pytest.raises((TypeError, ValueError), match=match):
        model.save_pretrained(tmp_path, state_dict=bad)
    assert os.listdir(tmp_path) == []


def _sharded(folder, count, safe=True):
    stem, suffix = ("model", ".safetensors") if safe else ("pytorch_model", ".bin")
    names = [f"{stem}-{i:05d}-of-{count:05d}{suffix}" for i in range(1, count + 1)]
    for name in names + [f"{stem}{suffix}.index.json"]:
        (folder / name).write_bytes(b"stale")
    return names


@pytest.mark.parametrize("kwargs", [{}, {"safe_serialization": False}, {"max_shard_size": "20KB"},
                                    {"max_shard_size": "20KB", "safe_serialization": False}])
def test_stale_weight_files_removed_others_kept(tmp_path, kwargs):
    (tmp_path / "model.safetensors").write_bytes(b"stale")
    (tmp_path / "pytorch_model.bin").write_bytes(b"stale")
    _sharded(tmp_path, 99)
    _sharded(tmp_path, 99, safe=False)
    keep = ["README.md", "preprocessor_config.json", "model.fp16.safetensors", "model-1-of-2.safetensors",
            "my_model-00001-of-00002.safetensors", "optimizer.pt"]
    for name in keep:
        (tmp_path / name).write_bytes(b"keep")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "model.safetensors").write_bytes(b"keep")
    model = _classifier()
    model.save_pretrained(tmp_path, **kwargs)
    for name in keep:
        assert (tmp_path / name).read_bytes() == b"keep"
    assert (tmp_path / "sub" / "model.safetensors").read_bytes() == b"keep"
    weights = sorted(set(_weight_files(tmp_path)) - set(keep) - {"sub"})
    assert all((tmp_path / n).read_bytes() != b"stale" for n in weights)
    safe = kwargs.get("safe_serialization", True)
    stem, suffix = ("model", ".safetensors") if safe else ("pytorch_model", ".bin")
    if "max_shard_size" in kwargs:
        assert f"{stem}{suffix}.index.json" in weights and len(weights) > 3
        assert all(n.startswith(stem + "-") or n == f"{stem}{suffix}.index.json" for n in weights)
    else:
        assert weights == [stem + suffix]
    expected = _logits(model)
    torch.testing.assert_close(_logits(PvtV2ForImageClassification.from_pretrained(tmp_path)), expected, rtol=0, atol=0)
    torch.testing.assert_close(_their_classifier(tmp_path)(IMAGE).logits.detach(), expected, rtol=1e-5, atol=1e-5)


def test_resave_with_fewer_shards_removes_the_extra_ones(tmp_path):
    old = _classifier(0)
    old.save_pretrained(tmp_path, max_shard_size="10KB")
    before = len(_weight_files(tmp_path))
    new = _classifier(1)
    new.save_pretrained(tmp_path, max_shard_size="40KB")
    after = _weight_files(tmp_path)
    assert 2 < len(after) < before
    count = len(after) - 1
    assert all(f"-of-{count:05d}" in n for n in after if n != "model.safetensors.index.json")
    torch.testing.assert_close(_logits(PvtV2ForImageClassification.from_pretrained(tmp_path)), _logits(new),
                               rtol=0, atol=0)


def test_unknown_and_refused_arguments(tmp_path):
    model = _classifier()
    with pytest.raises(TypeError, match="unexpected keyword argument 'safe_serialisation'"):
        model.save_pretrained(tmp_path, safe_serialisation=False)
    with pytest.raises(ValueError, match="push_to_hub=True is not supported"):
        model.save_pretrained(tmp_path, push_to_hub=True)
    # a variant is written now (tests/weights/test_loading_args30.py); one that is no plain name is refused
    with pytest.raises(ValueError, match="variant='../fp16' is not a plain variant name"):
        model.save_pretrained(tmp_path, variant="../fp16")
    with pytest.raises(TypeError, match="safe_serialization must be True or False, got 'False'"):
        model.save_pretrained(tmp_path, safe_serialization="False")
    with pytest.raises(TypeError, match="is_main_process must be True or False"):
        model.save_pretrained(tmp_path, is_main_process=None)
    with pytest.raises(ValueError, match="max_shard_size"):
        model.save_pretrained(tmp_path, max_shard_size="5 GB please")
    assert os.listdir(tmp_path) == []


def test_token_and_save_function_accepted(tmp_path):
    def save_function(*args, **kwargs):
        raise AssertionError("not called")

    model = _classifier()
    model.save_pretrained(save_directory=tmp_path, token="hf_x", save_function=save_function, safe_serialization=False)
    torch.testing.assert_close(_logits(PvtV2ForImageClassification.from_pretrained(tmp_path)), _logits(model),
                               rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [{}, {"max_shard_size": "20KB"}])
def test_failed_write_leaves_the_previous_save(tmp_path, monkeypatch, kwargs):
    old = _classifier(0)
    old.save_pretrained(tmp_path, **kwargs)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    serialize = files._serialize
    weight_files = len(before) - 2 if kwargs else 1  # config.json and the index aside
    calls = []

    def failing(state, safetensors, metadata):
        calls.append(1)
        if len(calls) == weight_files:  # the last shard (or the only file): the others were written
            raise OSError(28, "No space left on device")
        return serialize(state, safetensors, metadata)

    monkeypatch.setattr(files, "_serialize", failing)
    with pytest.raises(OSError, match="No space left on device"):
        _classifier(1).save_pretrained(tmp_path, **kwargs)
    assert len(calls) == weight_files
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before  # no temporaries left either
    torch.testing.assert_close(_logits(PvtV2ForImageClassification.from_pretrained(tmp_path)), _logits(old),
                               rtol=0, atol=0)


@pytest.mark.parametrize("name", ["PvtV2Backbone", "PvtV2ForSemanticSegmentation", "PvtV2ForDepthEstimation",
                                  "PvtV2ForObjectDetection"])
def test_task_models_round_trip_sharded_bin(tmp_path, name):
    import pvtv2

    if name == "PvtV2ForObjectDetection":
        pytest.importorskip("torchvision")
    cls = getattr(pvtv2, name)
    model = random_weights_(cls(PvtV2Config(**TINY)), seed=2).eval()
    model.save_pretrained(tmp_path, safe_serialization=False, max_shard_size="30KB")
    assert (tmp_path / "pytorch_model.bin.index.json").is_file()
    saved, loaded = model.state_dict(), cls.from_pretrained(tmp_path).state_dict()
    assert sorted(saved) == sorted(loaded)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
