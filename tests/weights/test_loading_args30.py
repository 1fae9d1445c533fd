"""transformers' loading arguments in from_pretrained (ignore_mismatched_sizes, output_loading_info, variant,
use_safetensors, weights_only, device_map, low_cpu_mem_usage, trust_remote_code) and variant in save_pretrained,
each checked against transformers' own PvtV2 on the same files: they all raised a TypeError before."""

from __future__ import annotations

import logging
import os
import re
import shutil

import pytest
import torch
import transformers

from pvtv2 import (
    PvtV2Backbone, PvtV2Config, PvtV2ForImageClassification, PvtV2ForObjectDetection, PvtV2ForSemanticSegmentation,
    PvtV2Model,
)
from pvtv2.weights.files import CheckpointError
from pvtv2.weights.hub import HubFileNotFound

from conftest import TINY, random_weights_
from test_hub import make_cache as _make_cache

IMAGE = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
LABELS = {i: f"class{i}" for i in range(10)}
_FINE_TUNE = dict(num_labels=10, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})


def _theirs(num_labels: int = 3, seed: int = 0, **extra) -> transformers.PvtV2ForImageClassification:
    config = transformers.PvtV2Config(**TINY, num_labels=num_labels, **extra)
    return random_weights_(transformers.PvtV2ForImageClassification(config), seed=seed).eval()


def _ours(seed: int = 0, num_labels: int = 5) -> PvtV2ForImageClassification:
    return random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=num_labels)), seed=seed).eval()


def _weights(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n != "config.json")


def _same_tensors(model, reference, skip=()) -> None:
    """Every tensor of ``model`` equal to ``reference``'s of the same name (but those in ``skip``)."""
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        if key not in skip:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)


def _logits(model):
    with torch.no_grad():
        return model(IMAGE).logits


def _cache_of(folder, root, repo_id="owner/tiny") -> dict:
    _make_cache(root, repo_id, {name: (folder / name).read_bytes() for name in os.listdir(folder)})
    return {"cache_dir": root, "local_files_only": True}


# ---------------------------------------------------------------------------------------------- ignore_mismatched_sizes
def test_the_fine_tuning_idiom_gives_transformers_model_and_info(tmp_path, caplog):
    _theirs(num_labels=3).save_pretrained(tmp_path)
    reference, expected = transformers.PvtV2ForImageClassification.from_pretrained(
        tmp_path, ignore_mismatched_sizes=True, output_loading_info=True, **_FINE_TUNE)
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        model, info = PvtV2ForImageClassification.from_pretrained(
            tmp_path, ignore_mismatched_sizes=True, output_loading_info=True, **_FINE_TUNE)
    assert info == expected
    assert info["mismatched_keys"] == {("classifier.weight", torch.Size([3, 64]), torch.Size([10, 64])),
                                       ("classifier.bias", torch.Size([3]), torch.Size([10]))}
    assert type(info["missing_keys"]) is set and type(info["unexpected_keys"]) is set and info["error_msgs"] == []
    assert all(type(shape) is torch.Size for _, *shapes in info["mismatched_keys"] for shape in shapes)
    assert model.config.id2label == reference.config.id2label == LABELS and model.config.num_labels == 10
    _same_tensors(model, reference, skip={"classifier.weight", "classifier.bias"})  # the encoder: the checkpoint's
    assert model.newly_initialized_keys == ("classifier.bias", "classifier.weight")
    assert "classifier.weight: checkpoint (3, 64) vs model (10, 64)" in caplog.text
    assert not model.training


def test_a_mismatch_inside_the_encoder_keeps_what_fits_of_the_module(tmp_path):
    # four input channels: the first patch embedding's weight has another shape, its bias the same. transformers
    # initialises the weight anew and keeps the checkpoint's bias; pvtv2 re-initialised the whole module.
    _theirs().save_pretrained(tmp_path)
    reference, expected = transformers.PvtV2ForImageClassification.from_pretrained(
        tmp_path, num_channels=4, ignore_mismatched_sizes=True, output_loading_info=True)
    model, info = PvtV2ForImageClassification.from_pretrained(
        tmp_path, num_channels=4, ignore_mismatched_sizes=True, output_loading_info=True)
    key = "pvt_v2.encoder.layers.0.patch_embedding.proj.weight"
    assert info == expected == {"missing_keys": set(), "unexpected_keys": set(), "error_msgs": [],
                                "mismatched_keys": {(key, torch.Size([16, 3, 7, 7]), torch.Size([16, 4, 7, 7]))}}
    _same_tensors(model, reference, skip={key})  # the bias of that convolution among them
    assert model.newly_initialized_keys == (key,)
    assert model.state_dict()[key].shape == (16, 4, 7, 7) and model.state_dict()[key].std() > 0
    with pytest.raises(CheckpointError, match=re.escape(f"{key}: checkpoint (16, 3, 7, 7) vs model (16, 4, 7, 7)")):
        PvtV2ForImageClassification.from_pretrained(tmp_path, num_channels=4)  # pvtv2's default: only the classifier


def test_ignore_mismatched_sizes_false_refuses_as_transformers_does(tmp_path):
    _theirs(num_labels=3).save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.PvtV2ForImageClassification.from_pretrained(tmp_path, num_labels=10)
    # pvtv2 names the keys and both shapes in the error itself (transformers in the report it logs before)
    for value in (False,):
        with pytest.raises(CheckpointError, match=r"(?s)classifier\.bias: checkpoint \(3,\) vs model \(10,\).*"
                                                  r"classifier\.weight: checkpoint \(3, 64\) vs model \(10, 64\).*"
                                                  r"ignore_mismatched_sizes=True"):
            PvtV2ForImageClassification.from_pretrained(tmp_path, num_labels=10, ignore_mismatched_sizes=value)
    # the same shapes load with False as without it
    model = PvtV2ForImageClassification.from_pretrained(tmp_path, ignore_mismatched_sizes=False)
    _same_tensors(model, transformers.PvtV2ForImageClassification.from_pretrained(tmp_path))


def test_left_out_the_classifier_is_replaced_and_reported_as_mismatched(tmp_path, caplog):
    # pvtv2's default (a warning, the class-sized layers replaced): the info is transformers' with
    # ignore_mismatched_sizes=True, the one load of transformers that gives this model
    _theirs(num_labels=3).save_pretrained(tmp_path)
    _, expected = transformers.PvtV2ForImageClassification.from_pretrained(
        tmp_path, num_labels=10, ignore_mismatched_sizes=True, output_loading_info=True)
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        model, info = PvtV2ForImageClassification.from_pretrained(tmp_path, num_labels=10, output_loading_info=True)
    assert info == expected and len(info["mismatched_keys"]) == 2
    assert "replacing the classifier head" in caplog.text
    assert PvtV2ForImageClassification.from_pretrained(tmp_path, num_labels=10).config.num_labels == 10


def test_a_backbone_checkpoint_into_a_classifier(tmp_path):
    transformers.PvtV2Model(transformers.PvtV2Config(**TINY)).save_pretrained(tmp_path)
    reference, expected = transformers.PvtV2ForImageClassification.from_pretrained(
        tmp_path, ignore_mismatched_sizes=True, output_loading_info=True, **_FINE_TUNE)
    model, info = PvtV2ForImageClassification.from_pretrained(
        tmp_path, ignore_mismatched_sizes=True, output_loading_info=True, **_FINE_TUNE)
    assert info == expected == {"missing_keys": {"classifier.weight", "classifier.bias"}, "unexpected_keys": set(),
                                "mismatched_keys": set(), "error_msgs": []}
    _same_tensors(model, reference, skip={"classifier.weight", "classifier.bias"})


@pytest.mark.parametrize("ours, theirs", [(PvtV2Model, transformers.PvtV2Model),
                                          (PvtV2Backbone, transformers.PvtV2Backbone)])
def test_a_classifier_checkpoint_into_an_encoder_reports_its_head_unexpected(tmp_path, ours, theirs):
    _theirs().save_pretrained(tmp_path)
    reference, expected = theirs.from_pretrained(tmp_path, output_loading_info=True)
    model, info = ours.from_pretrained(tmp_path, output_loading_info=True)
    assert info == expected == {"missing_keys": set(), "unexpected_keys": {"classifier.weight", "classifier.bias"},
                                "mismatched_keys": set(), "error_msgs": []}
    _same_tensors(model, reference)


def test_a_misfit_stays_an_error_under_ignore_mismatched_sizes(tmp_path):
    # fewer blocks: keys unexpected, not sizes; transformers loads and reports them, pvtv2 refuses as it always did
    _theirs().save_pretrained(tmp_path)
    _, theirs = transformers.PvtV2ForImageClassification.from_pretrained(
        tmp_path, depths=[1, 1, 1, 1], ignore_mismatched_sizes=True, output_loading_info=True)
    assert len(theirs["unexpected_keys"]) == 22 and not theirs["mismatched_keys"]
    with pytest.raises(CheckpointError, match="22 unexpected keys"):
        PvtV2ForImageClassification.from_pretrained(tmp_path, depths=[1, 1, 1, 1], ignore_mismatched_sizes=True)
    with pytest.raises(TypeError, match="ignore_mismatched_sizes must be True or False"):
        PvtV2ForImageClassification.from_pretrained(tmp_path, ignore_mismatched_sizes="yes")
    with pytest.raises(TypeError, match="output_loading_info must be True or False"):
        PvtV2ForImageClassification.from_pretrained(tmp_path, output_loading_info=None)


# ---------------------------------------------------------------------------------------------- output_loading_info
def test_output_loading_info_of_a_sharded_folder(tmp_path):
    _theirs().save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(_weights(tmp_path)) > 3
    reference, expected = transformers.PvtV2ForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    model, info = PvtV2ForImageClassification.from_pretrained(tmp_path, output_loading_info=True, device="cpu")
    assert info == expected == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(),
                                "error_msgs": []}
    _same_tensors(model, reference)
    assert not model.training
    assert isinstance(PvtV2ForImageClassification.from_pretrained(tmp_path, output_loading_info=False),
                      PvtV2ForImageClassification)


@pytest.mark.parametrize("cls, kwargs, head", [(PvtV2ForObjectDetection, {"detector": "retinanet"}, "detector."),
                                               (PvtV2ForSemanticSegmentation, {}, "decode_head.")])
def test_the_task_models_return_the_info_too(tmp_path, cls, kwargs, head):
    # (the detector's from_pretrained is its own: it returned the tuple unwrapped)
    encoder = random_weights_(PvtV2Model(PvtV2Config(**TINY)))
    encoder.save_pretrained(tmp_path)
    model, info = cls.from_pretrained(tmp_path, num_labels=3, output_loading_info=True, **kwargs)
    assert isinstance(model, cls) and not model.training
    new = {k for k in model.state_dict() if k.startswith(head)}
    assert len(new) > 10 and info == {"missing_keys": new, "unexpected_keys": set(), "mismatched_keys": set(),
                                      "error_msgs": []}
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(model.state_dict()["pvt_v2." + key], value, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- variant
@pytest.mark.parametrize("shard", [None, "100KB"])
def test_a_transformers_variant_loads_here(tmp_path, shard):
    theirs = _theirs()
    theirs.save_pretrained(tmp_path, variant="fp16", **({"max_shard_size": shard} if shard else {}))
    assert ("model.fp16.safetensors" in _weights(tmp_path)) == (shard is None)
    reference = transformers.PvtV2ForImageClassification.from_pretrained(tmp_path, variant="fp16")
    model = PvtV2ForImageClassification.from_pretrained(tmp_path, variant="fp16")
    _same_tensors(model, reference)
    _same_tensors(model, theirs)
    # a folder without that variant: transformers and pvtv2 name the file looked for
    empty = _moved(tmp_path)
    with pytest.raises(OSError, match=r"model\.fp16\.safetensors"):
        transformers.PvtV2ForImageClassification.from_pretrained(empty, variant="fp16")
    with pytest.raises(FileNotFoundError, match=r"variant='fp16'.*'model\.fp16\.safetensors'"):
        PvtV2ForImageClassification.from_pretrained(empty, variant="fp16")


def _moved(folder):
    """A copy of ``folder`` with its config.json alone: no weights of any variant."""
    other = folder.parent / (folder.name + "-empty")
    other.mkdir()
    shutil.copy(folder / "config.json", other / "config.json")
    return other


@pytest.mark.parametrize("variant", ["fp16", "fp16.ema"])
@pytest.mark.parametrize("shard", [None, "100KB"])
def test_our_variant_has_transformers_names_and_loads_there(tmp_path, shard, variant):
    model = _ours()
    extra = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path / "ours", variant=variant, **extra)
    # the names transformers gives the same weights (its own save of the same state dict)
    theirs = transformers.PvtV2ForImageClassification(transformers.PvtV2Config(**TINY, num_labels=5))
    theirs.load_state_dict(model.state_dict())
    theirs.save_pretrained(tmp_path / "theirs", variant=variant, **extra)
    assert _weights(tmp_path / "ours") == _weights(tmp_path / "theirs")
    if shard:
        assert f"model.safetensors.index.{variant}.json" in _weights(tmp_path / "ours")
    loaded, info = transformers.PvtV2ForImageClassification.from_pretrained(
        tmp_path / "ours", variant=variant, output_loading_info=True)
    assert not any(info.values())
    _same_tensors(loaded, model)
    with pytest.raises(OSError, match="model.safetensors"):  # transformers too finds nothing without the variant
        transformers.PvtV2ForImageClassification.from_pretrained(tmp_path / "ours")
    with pytest.raises(FileNotFoundError, match=r"expected one of \['model\.safetensors'"):
        PvtV2ForImageClassification.from_pretrained(tmp_path / "ours")
    _same_tensors(PvtV2ForImageClassification.from_pretrained(tmp_path / "ours", variant=variant), model)


def test_a_pytorch_variant_loads_in_transformers(tmp_path):
    model = _ours()
    model.save_pretrained(tmp_path, variant="fp16", safe_serialization=False)
    assert _weights(tmp_path) == ["pytorch_model.fp16.bin"]
    _same_tensors(transformers.PvtV2ForImageClassification.from_pretrained(tmp_path, variant="fp16"), model)
    _same_tensors(PvtV2ForImageClassification.from_pretrained(tmp_path, variant="fp16"), model)
    model.save_pretrained(tmp_path, variant="fp16", safe_serialization=False, max_shard_size="100KB")
    assert "pytorch_model.bin.index.fp16.json" in _weights(tmp_path)
    assert "pytorch_model.fp16.bin" not in _weights(tmp_path)  # the same variant's earlier form is removed
    _same_tensors(PvtV2ForImageClassification.from_pretrained(tmp_path, variant="fp16"), model)


def test_a_variant_lives_beside_the_plain_weights(tmp_path):
    plain, half = _ours(seed=1), _ours(seed=2)
    plain.save_pretrained(tmp_path)
    half.save_pretrained(tmp_path, variant="fp16", max_shard_size="100KB")
    half.save_pretrained(tmp_path, variant="fp16")  # its shards and index go, the plain file stays
    assert _weights(tmp_path) == ["model.fp16.safetensors", "model.safetensors"]
    plain.save_pretrained(tmp_path, max_shard_size="100KB")  # and the other way round
    assert "model.fp16.safetensors" in _weights(tmp_path) and "model.safetensors" not in _weights(tmp_path)
    for variant, expected in ((None, plain), ("fp16", half)):
        _same_tensors(PvtV2ForImageClassification.from_pretrained(tmp_path, variant=variant), expected)
        _same_tensors(transformers.PvtV2ForImageClassification.from_pretrained(tmp_path, variant=variant), expected)


@pytest.mark.parametrize("variant", ["../fp16", "a/b", "fp16/..", "", ".hidden", "fp16\n", "f p", "..", "a\\b"])
def test_a_variant_that_is_no_plain_name_is_refused(tmp_path, variant):
    _ours().save_pretrained(tmp_path / "m")
    expected = f"variant={variant!r} is not a plain variant name"
    with pytest.raises(ValueError, match=re.escape(expected)):
        PvtV2ForImageClassification.from_pretrained(tmp_path / "m", variant=variant)
    with pytest.raises(ValueError, match=re.escape(expected)):
        _ours().save_pretrained(tmp_path / "s", variant=variant)
    assert not (tmp_path / "s").exists() and _weights(tmp_path / "m") == ["model.safetensors"]


def test_a_variant_of_a_file_or_of_another_type_is_refused(tmp_path):
    _ours().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="variant='fp16' names a variant's weights file inside a folder"):
        PvtV2ForImageClassification.from_pretrained(tmp_path / "model.safetensors", variant="fp16")
    with pytest.raises(TypeError, match="variant must be a string"):
        PvtV2ForImageClassification.from_pretrained(tmp_path, variant=16)
    with pytest.raises(TypeError, match="variant must be a string"):
        _ours().save_pretrained(tmp_path, variant=16)


@pytest.mark.parametrize("shard", [None, "100KB"])
def test_a_variant_from_the_hub_cache(tmp_path, shard):
    theirs = _theirs()
    theirs.save_pretrained(tmp_path / "saved", variant="fp16", **({"max_shard_size": shard} if shard else {}))
    where = _cache_of(tmp_path / "saved", tmp_path / "cache")
    reference = transformers.PvtV2ForImageClassification.from_pretrained("owner/tiny", variant="fp16", **where)
    model = PvtV2ForImageClassification.from_pretrained("owner/tiny", variant="fp16", **where)
    _same_tensors(model, reference)
    _same_tensors(model, theirs)
    with pytest.raises(HubFileNotFound, match=r"no weights of 'owner/tiny' \(variant='bf16'\): looked for "
                                              r"model\.bf16\.safetensors, model\.safetensors\.index\.bf16\.json, "
                                              r"pytorch_model\.bf16\.bin, pytorch_model\.bin\.index\.bf16\.json"):
        PvtV2ForImageClassification.from_pretrained("owner/tiny", variant="bf16", **where)
    with pytest.raises(HubFileNotFound, match=r"looked for model\.safetensors, model\.safetensors\.index\.json\."):
        PvtV2ForImageClassification.from_pretrained("owner/tiny", use_safetensors=True, **where)


def test_a_variant_in_a_subfolder_of_the_hub_cache(tmp_path):
    theirs = _theirs()
    theirs.save_pretrained(tmp_path / "saved" / "sub", variant="fp16")
    _make_cache(tmp_path / "cache", "owner/tiny", {f"sub/{name}": (tmp_path / "saved" / "sub" / name).read_bytes()
                                                   for name in os.listdir(tmp_path / "saved" / "sub")})
    where = {"cache_dir": tmp_path / "cache", "local_files_only": True, "subfolder": "sub", "variant": "fp16"}
    reference = transformers.PvtV2ForImageClassification.from_pretrained("owner/tiny", **where)
    _same_tensors(PvtV2ForImageClassification.from_pretrained("owner/tiny", **where), reference)
    _same_tensors(PvtV2ForImageClassification.from_pretrained(tmp_path / "saved", **where | {"cache_dir": None}),
                  theirs)


# ---------------------------------------------------------------------------------------------- use_safetensors
def _both_forms(folder):
    """A folder with model.safetensors and pytorch_model.bin of different weights: (safetensors', .bin's model)."""
    safe, pickled = _ours(seed=3), _ours(seed=4)
    pickled.save_pretrained(folder / "bin", safe_serialization=False)
    safe.save_pretrained(folder)
    shutil.copy(folder / "bin" / "pytorch_model.bin", folder / "pytorch_model.bin")
    return safe, pickled


def test_use_safetensors_picks_the_file_transformers_picks(tmp_path):
    safe, pickled = _both_forms(tmp_path)
    for value, expected in ((None, safe), (True, safe), (False, pickled)):
        reference = transformers.PvtV2ForImageClassification.from_pretrained(tmp_path, use_safetensors=value)
        model = PvtV2ForImageClassification.from_pretrained(tmp_path, use_safetensors=value, weights_only=True)
        _same_tensors(reference, expected)
        _same_tensors(model, expected)


def test_use_safetensors_when_that_form_is_absent(tmp_path):
    _ours().save_pretrained(tmp_path / "safe")
    _ours().save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(OSError, match="model.safetensors"):
        transformers.PvtV2ForImageClassification.from_pretrained(tmp_path / "bin", use_safetensors=True)
    with pytest.raises(FileNotFoundError, match=r"\(use_safetensors=True\): expected one of \['model\.safetensors', "
                                                r"'model\.safetensors\.index\.json'\], found \['config\.json', "
                                                r"'pytorch_model\.bin'\]"):
        PvtV2ForImageClassification.from_pretrained(tmp_path / "bin", use_safetensors=True)
    with pytest.raises(OSError, match="pytorch_model.bin"):
        transformers.PvtV2ForImageClassification.from_pretrained(tmp_path / "safe", use_safetensors=False)
    with pytest.raises(FileNotFoundError, match=r"\(use_safetensors=False\): expected one of \['pytorch_model\.bin'"):
        PvtV2ForImageClassification.from_pretrained(tmp_path / "safe", use_safetensors=False)


def test_use_safetensors_refuses_a_pickle_named_otherwise(tmp_path):
    _ours().save_pretrained(tmp_path / "bin", safe_serialization=False, max_shard_size="100KB")
    with pytest.raises(ValueError, match=r"use_safetensors=True reads safetensors files only, and .*pytorch_model"):
        PvtV2ForImageClassification.from_pretrained(tmp_path / "bin" / "pytorch_model.bin.index.json",
                                                    use_safetensors=True)
    # a safetensors index naming a pickled shard: it would have been unpickled
    (tmp_path / "bin" / "pytorch_model.bin.index.json").rename(tmp_path / "bin" / "model.safetensors.index.json")
    with pytest.raises(ValueError, match=r"names the shard 'pytorch_model-00001-of-"):
        PvtV2ForImageClassification.from_pretrained(tmp_path / "bin", use_safetensors=True)
    with pytest.raises(TypeError, match="use_safetensors must be True, False or None"):
        PvtV2ForImageClassification.from_pretrained(tmp_path / "bin", use_safetensors="yes")


# ---------------------------------------------------------------------------------------------- the others
def test_weights_only_false_is_refused(tmp_path):
    _ours().save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(ValueError, match=r"weights_only=False is not supported: it would unpickle .* can run code"):
        PvtV2ForImageClassification.from_pretrained(tmp_path, weights_only=False)
    with pytest.raises(TypeError, match="weights_only must be True or False"):
        PvtV2ForImageClassification.from_pretrained(tmp_path, weights_only=None)


def test_accepted_arguments_change_nothing(tmp_path):
    model = _ours()
    model.save_pretrained(tmp_path)
    for kwargs in ({"low_cpu_mem_usage": True}, {"low_cpu_mem_usage": False}, {"trust_remote_code": True},
                   {"trust_remote_code": False}, {"device_map": "cpu"}, {"device_map": torch.device("cpu")},
                   {"device_map": {"": "cpu"}}, {"device_map": {"pvt_v2": "cpu", "classifier": "cpu"}},
                   {"device_map": "cpu", "device": "cpu"}):
        loaded = PvtV2ForImageClassification.from_pretrained(tmp_path, **kwargs)
        assert loaded.device == torch.device("cpu") and not loaded.training
        _same_tensors(loaded, model)
    with pytest.raises(TypeError, match="low_cpu_mem_usage must be True, False or None"):
        PvtV2ForImageClassification.from_pretrained(tmp_path, low_cpu_mem_usage="yes")


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="device_map='auto' spreads over several GPUs here")
def test_device_map_auto_with_one_device_at_most(tmp_path):
    model = _ours()
    model.save_pretrained(tmp_path)
    loaded = PvtV2ForImageClassification.from_pretrained(tmp_path, device_map="auto")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert loaded.device == expected
    _same_tensors(loaded.cpu(), model)


@pytest.mark.parametrize("device_map, message", [
    ({"pvt_v2": "cpu", "classifier": "meta"}, r"places the model on \['cpu', 'meta'\]"),
    ({"pvt_v2": "cpu", "classifier": "disk"}, r"places the model on \['cpu', 'disk'\]"),
    ({}, "places the model on nothing"),
    (-1, "device_map=-1 is no accelerator index"),
    ("nowhere", "device_map='nowhere' is not a device name"),
    (["cpu"], "device_map must be a device"),
])
def test_a_device_map_over_several_devices_or_none_is_refused(tmp_path, device_map, message):
    _ours().save_pretrained(tmp_path)
    with pytest.raises((ValueError, TypeError), match=message):
        PvtV2ForImageClassification.from_pretrained(tmp_path, device_map=device_map)


def test_device_and_device_map_must_agree(tmp_path):
    _ours().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="name different devices"):
        PvtV2ForImageClassification.from_pretrained(tmp_path, device="cpu", device_map="meta")


@pytest.mark.parametrize("name", ["ignore_mismatched_sizes", "output_loading_info", "variant", "use_safetensors",
                                  "weights_only", "low_cpu_mem_usage", "device_map", "trust_remote_code"])
def test_the_config_refuses_the_weights_arguments(tmp_path, name):
    # a config reads no weights: kept as a field, it would be written into every config.json after
    _ours().save_pretrained(tmp_path)
    with pytest.raises(TypeError, match=rf"{name} is one of transformers' loading arguments for the weights, which "
                                        r"the model classes' from_pretrained takes"):
        PvtV2Config.from_pretrained(tmp_path, **{name: True})


def test_force_download_stays_refused(tmp_path):
    # nothing here can download again; the cache is used as it is
    _ours().save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="force_download is one of transformers' loading arguments.*--force-download"):
        PvtV2ForImageClassification.from_pretrained(tmp_path, force_download=True)
