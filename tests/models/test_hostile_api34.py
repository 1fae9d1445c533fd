"""A hostile user's pass over the config / processor / num_parameters API that follows transformers 5: attributes set
on a config after it was built, dtype and architectures of odd kinds, both spellings of an argument at once, flags of
the wrong type, and wrapped or compiled models, each compared with transformers 5 running the same call or with a
closed form."""

from __future__ import annotations

import copy
import itertools
import json
import pickle
import warnings

import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_SHALLOW
from torch import nn
from transformers.image_utils import ChannelDimension

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, PvtV2ForSemanticSegmentation, PvtV2ImageProcessor

transformers.logging.set_verbosity_error()


def _theirs(**kwargs) -> transformers.PvtV2Config:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.PvtV2Config(**TINY_SHALLOW, **kwargs)


# ------------------------------------------------------------------------------------------- attributes set later
def test_attributes_set_after_construction_are_written_as_transformers_writes_them(tmp_path):
    """``config.foo = 1`` (or ``architectures``, or a torch ``dtype``) set on a built config: transformers' to_dict
    writes every attribute; ours wrote only the keys given to the constructor, so save_pretrained and a reload lost
    them without a word (and a dtype given first, then set to torch.float16, could not be written at all)."""
    ours, theirs = PvtV2Config(**TINY_SHALLOW), _theirs()
    for config in (ours, theirs):
        config.foo = 1
        config.architectures = ["PvtV2Model"]
        config.dtype = torch.float16
    expected = theirs.to_diff_dict()
    got = ours.to_diff_dict()
    for key in ("foo", "architectures", "dtype"):
        assert got[key] == expected[key], key
    assert got["dtype"] == "float16"
    reread = PvtV2Config.from_pretrained(ours.save_pretrained(tmp_path).parent)
    assert (reread.foo, reread.architectures, reread.dtype) == (1, ["PvtV2Model"], "float16")
    assert transformers.PvtV2Config.from_pretrained(tmp_path).dtype == torch.float16
    assert reread == ours and pickle.loads(pickle.dumps(ours)) == ours and copy.deepcopy(ours) == ours
    # set over a dtype the constructor was given: written by name, as transformers writes it
    given = PvtV2Config(**TINY_SHALLOW, dtype="bfloat16")
    given.dtype = torch.float16
    assert json.loads(given.to_json_string())["dtype"] == json.loads(theirs.to_json_string())["dtype"] == "float16"
    # a key deleted since is not written (it raised an AttributeError from to_dict)
    del ours.foo
    assert "foo" not in ours.to_dict() and ours.to_dict()["architectures"] == ["PvtV2Model"]
    # numpy's numbers set later are written as the constructor keeps them (json cannot write them; transformers fails)
    ours.ratio, ours.steps = np.float32(1.5), [np.int64(3), np.bool_(True)]
    reread = PvtV2Config.from_dict(json.loads(ours.to_json_string()))
    assert (reread.ratio, reread.steps) == (1.5, [3, True]) and type(reread.steps[0]) is int
    # a class attribute shadowed is no key: the class's model_type is written, as transformers writes it
    ours.model_type = theirs.model_type = "bert"
    assert ours.to_dict()["model_type"] == theirs.to_dict()["model_type"] == "pvt_v2"
    assert "bert" not in ours.to_json_string()
    # set later or given to the constructor, the key makes the same config (it was equal set later, unequal given)
    later = PvtV2Config(**TINY_SHALLOW)
    later.foo = 1
    assert later == PvtV2Config(**TINY_SHALLOW, foo=1) != PvtV2Config(**TINY_SHALLOW)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_configs_holding_an_array_compare_by_its_values(kind):
    """``config.mask = torch.ones(3)`` (or given to the constructor): ``==`` of two such configs raised torch's (or
    numpy's) "ambiguous truth value" from inside the dict comparison; pickle and deepcopy then could not be checked."""
    make = torch.tensor if kind == "torch" else np.array
    config = PvtV2Config(**TINY_SHALLOW)
    config.mask = make([1.0, 2.0, 3.0])
    assert config == copy.deepcopy(config) == pickle.loads(pickle.dumps(config))
    other = PvtV2Config(**TINY_SHALLOW, mask=make([1.0, 2.0, 4.0]))
    assert config != other and config != PvtV2Config(**TINY_SHALLOW)
    assert PvtV2Config(**TINY_SHALLOW, mask=make([1.0, 2.0, 3.0])) == config


def test_decode_head_type_set_as_an_attribute_builds_and_saves_the_fpn_head(tmp_path):
    """segmentation.py's docs: ``config.decode_head_type = "fpn"`` puts the FPN head. Set on a built config, the
    model filled in the head defaults with a copy that lost the attribute: SegFormer's head was built (and saved)."""
    config = PvtV2Config(**TINY_SHALLOW, num_labels=3)
    config.decode_head_type = "fpn"
    model = PvtV2ForSemanticSegmentation(config)
    assert model.head_type == "fpn" and type(model.decode_head).__name__ == "SemanticFPNHead"
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["decode_head_type"] == "fpn"
    assert type(PvtV2ForSemanticSegmentation.from_pretrained(tmp_path).decode_head).__name__ == "SemanticFPNHead"


# ------------------------------------------------------------------------------------------- dtype
@pytest.mark.parametrize("dtype", [torch.float16, "bfloat16", "float32", torch.float64])
def test_a_dtype_round_trips_through_transformers_both_ways(dtype, tmp_path):
    ours = PvtV2Config(**TINY_SHALLOW, dtype=dtype)
    ours.save_pretrained(tmp_path / "ours")
    theirs = transformers.PvtV2Config.from_pretrained(tmp_path / "ours")
    assert theirs.dtype == (getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    theirs.save_pretrained(tmp_path / "theirs")
    assert PvtV2Config.from_pretrained(tmp_path / "theirs").dtype == str(theirs.dtype).removeprefix("torch.")


def test_a_dtype_that_names_no_torch_dtype_is_refused(tmp_path):
    """``dtype="garbage"`` was kept and written; transformers then failed to read the file (AttributeError from
    ``getattr(torch, 'garbage')``) and our loader's ``dtype="auto"`` passed over it without a word."""
    with pytest.raises(AttributeError):
        _theirs(dtype="garbage")
    for bad in ("garbage", "auto", 5, ["float16"], "Tensor"):
        with pytest.raises(ValueError, match=r"dtype=.* is not a torch dtype"):
            PvtV2Config(**TINY_SHALLOW, dtype=bad)
    with pytest.raises(ValueError, match="torch_dtype='float17' is not a torch dtype"):
        PvtV2Config.from_dict({"torch_dtype": "float17"})
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "garbage"}))
    with pytest.raises(ValueError, match="config.json: dtype='garbage' is not a torch dtype"):
        PvtV2Config.from_pretrained(tmp_path)


def test_a_4x_files_torch_dtype_reads_as_dtype_as_in_transformers_5():
    data = {"torch_dtype": "float16", "model_type": "pvt_v2"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.PvtV2Config.from_dict(data)
    ours = PvtV2Config.from_dict(data)
    assert ours.dtype == str(theirs.dtype).removeprefix("torch.") == "float16"
    assert ours.to_dict()["torch_dtype"] == "float16" and "dtype" not in ours.to_dict()  # the file's key, as read
    assert PvtV2Config().dtype is None is _theirs().dtype


@pytest.mark.parametrize("architectures", [None, [], ["PvtV2Model", "X"], "PvtV2Model"])
def test_odd_architectures_travel_as_in_transformers(architectures, tmp_path):
    ours, theirs = PvtV2Config(**TINY_SHALLOW, architectures=architectures), _theirs(architectures=architectures)
    assert ours.architectures == theirs.architectures
    assert ours.to_diff_dict().get("architectures") == theirs.to_diff_dict().get("architectures")
    ours.save_pretrained(tmp_path)
    assert transformers.PvtV2Config.from_pretrained(tmp_path).architectures == theirs.architectures


# ------------------------------------------------------------------------------------------- return_unused_kwargs
def test_unknown_keys_mixed_with_overrides_come_back_as_transformers_returns_them(tmp_path):
    stored = PvtV2Config(**TINY_SHALLOW)
    stored.zzz = 7  # a key the file holds: the override sets it and is not returned
    stored.save_pretrained(tmp_path)
    for overrides in (dict(zzz=8, foo=1), dict(num_labels=3, bar=None), dict(dtype="float16", q=[1]),
                      dict(architectures=["A"], k=1, output_hidden_states=True)):
        theirs, their_unused = transformers.PvtV2Config.from_pretrained(tmp_path, return_unused_kwargs=True,
                                                                        **overrides)
        ours, our_unused = PvtV2Config.from_pretrained(tmp_path, return_unused_kwargs=np.bool_(True), **overrides)
        assert our_unused == their_unused, overrides
        assert (ours.zzz, ours.num_labels, ours.architectures) == (theirs.zzz, theirs.num_labels, theirs.architectures)
        assert ours.dtype == (None if theirs.dtype is None else str(theirs.dtype).removeprefix("torch."))
    for flag in ("True", 1, None):
        with pytest.raises(TypeError, match="return_unused_kwargs must be True or False"):
            PvtV2Config.from_pretrained(tmp_path, return_unused_kwargs=flag)
    with pytest.raises(TypeError, match="use_diff must be True or False, got 'False'"):
        stored.to_json_string(use_diff="False")


# ------------------------------------------------------------------------------------------- num_parameters
def test_num_parameters_flags_are_checked_and_counts_match_a_closed_form():
    """``only_trainable="False"`` (a string, true to Python) counted the trainable parameters alone; both names at
    once, disagreeing, took the former without a word."""
    torch.manual_seed(0)
    model = PvtV2ForImageClassification(PvtV2Config(**TINY_SHALLOW))
    for p in model.pvt_v2.encoder.layers[0].parameters():
        p.requires_grad_(False)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < total
    assert model.num_parameters() == total and model.num_parameters(only_trainable=True) == trainable
    assert model.num_parameters(trainable_only=True) == model.num_parameters(np.bool_(True), np.bool_(False))
    with pytest.raises(ValueError, match="only_trainable=True and trainable_only=False disagree"):
        model.num_parameters(only_trainable=True, trainable_only=False)
    for kwargs in (dict(only_trainable="False"), dict(exclude_embeddings=None), dict(trainable_only=1)):
        with pytest.raises(TypeError, match=f"{next(iter(kwargs))} must be True or False"):
            model.num_parameters(**kwargs)
    # tied (one Parameter in two modules): counted once, as by transformers
    model.extra = nn.Linear(model.classifier.in_features, model.classifier.out_features)
    model.extra.weight = model.classifier.weight
    assert model.num_parameters() == total + model.extra.bias.numel()
    # an embedding's weight left out with exclude_embeddings, as transformers counts it
    model.emb = nn.Embedding(10, 4)
    theirs = transformers.PvtV2ForImageClassification(_theirs())
    theirs.emb = nn.Embedding(10, 4)
    assert model.num_parameters() - model.num_parameters(exclude_embeddings=True) == 40
    assert theirs.num_parameters() - theirs.num_parameters(exclude_embeddings=True) == 40
    del model.extra, model.emb
    # wrapped and compiled: the wrapper's attribute reaches the model's own count
    compiled = torch.compile(model)
    assert compiled.num_parameters(only_trainable=True) == trainable
    wrapper = nn.Module()
    wrapper.module = model  # DistributedDataParallel's layout
    assert wrapper.module.num_parameters() == sum(p.numel() for p in wrapper.parameters()) == total


# ------------------------------------------------------------------------------------------- processor
def test_processor_layouts_match_transformers_and_odd_values_are_refused_by_name():
    rng = np.random.default_rng(34)
    hwc = rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)
    images = {"channels_last": [hwc, hwc.astype(np.float32)],
              "channels_first": [hwc.transpose(2, 0, 1).copy(), torch.from_numpy(hwc.transpose(2, 0, 1).copy())]}
    ours, theirs = PvtV2ImageProcessor(), transformers.PvtImageProcessorPil(resample=2)
    cases = 0
    for layout, spelling, data_format, return_tensors in itertools.product(
        images, ("str", "enum", None), ("channels_first", ChannelDimension.FIRST, None), ("pt", "np", None)
    ):
        input_data_format = None if spelling is None else layout if spelling == "str" else ChannelDimension(layout)
        for image in images[layout]:
            kwargs = dict(return_tensors=return_tensors, input_data_format=input_data_format, data_format=data_format)
            got = np.asarray(ours(image, **kwargs)["pixel_values"])
            expected = np.asarray(theirs(image, **kwargs)["pixel_values"])
            assert got.shape == expected.shape and np.allclose(got, expected, atol=1e-4), kwargs
            cases += 1
    assert cases == 108
    image = images["channels_last"][0]
    # an array compared with a string is an array: numpy's "truth value is ambiguous" came out raw
    with pytest.raises(ValueError, match="data_format=array.* is not supported"):
        ours(image, data_format=np.array(["channels_first", "channels_last"]))
    with pytest.raises(ValueError, match="input_data_format must be 'channels_first', 'channels_last' or None"):
        ours(image, input_data_format=np.array(["channels_last", "channels_first"]))
    # transformers ignores a channels-last request (channels first comes back): refused here, with any settings
    assert theirs(image, data_format="channels_last", return_tensors="np")["pixel_values"].shape[1] == 3
    with pytest.raises(ValueError, match="data_format='channels_last' is not supported"):
        ours(image, data_format="channels_last", do_resize=False)

