"""A hostile pass over from_pretrained's transformers arguments (dtype=, subfolder=, config=): what a folder written
by pvtv2 says to transformers, and what a subfolder that leaves the repository is told."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
import transformers

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, PvtV2ImageProcessor

from conftest import TINY, random_weights_


def _tiny(seed: int = 0) -> PvtV2ForImageClassification:
    return random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5)), seed).eval()


@pytest.mark.parametrize("field", ["dtype", "torch_dtype"])
def test_a_float32_model_read_from_a_half_precision_folder_is_saved_as_float32(tmp_path, field):
    # transformers writes the weights' dtype into config.json ("dtype", "torch_dtype" before 4.56), and its
    # from_pretrained loads in that dtype. pvtv2 loads float32 and kept the field: the float32 weights it saved
    # came back from transformers in bfloat16.
    _tiny().save_pretrained(tmp_path / "half")
    data = json.loads((tmp_path / "half" / "config.json").read_text())
    data[field] = "bfloat16"
    (tmp_path / "half" / "config.json").write_text(json.dumps(data))
    model = PvtV2ForImageClassification.from_pretrained(tmp_path / "half")
    assert model.dtype == torch.float32
    model.save_pretrained(tmp_path / "resaved")
    reference = transformers.PvtV2ForImageClassification.from_pretrained(tmp_path / "resaved")
    assert reference.dtype == torch.float32
    saved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert saved["dtype"] == "float32" and "torch_dtype" not in saved


def test_a_float16_model_writes_the_dtype_field_transformers_writes(tmp_path):
    _tiny().save_pretrained(tmp_path / "full")
    PvtV2ForImageClassification.from_pretrained(tmp_path / "full", dtype=torch.float16).save_pretrained(tmp_path / "ours")
    transformers.PvtV2ForImageClassification.from_pretrained(
        tmp_path / "full", dtype=torch.float16).save_pretrained(tmp_path / "theirs")
    ours = json.loads((tmp_path / "ours" / "config.json").read_text())
    theirs = json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert ours["dtype"] == theirs["dtype"] == "float16"
    assert transformers.PvtV2ForImageClassification.from_pretrained(tmp_path / "ours").dtype == torch.float16


# transformers' from_pretrained arguments (4.x and 5.x) beyond the thirteen refused before: each was taken as an
# unknown config field (quantization_config without a word: it is a key transformers' configs carry), the model loaded
# in float32 all the same, and save_pretrained wrote it into config.json, where transformers obeys it (a
# quantization_config there makes transformers quantize the model, or fail without bitsandbytes and accelerate).
# (low_cpu_mem_usage, trust_remote_code and weights_only are taken now: tests/weights/test_loading_args30.py.)
@pytest.mark.parametrize("name, value", [
    ("quantization_config", {"quant_method": "bitsandbytes", "load_in_8bit": True}), ("load_in_8bit", True),
    ("load_in_4bit", True), ("max_memory", {0: "1GB"}),
    ("offload_folder", "offload"), ("offload_state_dict", True), ("offload_buffers", True),
    ("gguf_file", "model.gguf"), ("key_mapping", {"^head": "classifier"}), ("tp_plan", "auto"), ("tp_size", 2),
    ("device_mesh", None), ("distributed_config", None), ("adapter_kwargs", {}), ("adapter_name", "default"),
    ("use_kernels", True), ("kernel_config", None), ("disable_mmap", True), ("mirror", "tuna"),
])
def test_transformers_loading_arguments_are_refused_by_name(tmp_path, name, value):
    _tiny().save_pretrained(tmp_path / "m")
    expected = f"{name} is one of transformers' loading arguments, which pvtv2's from_pretrained does not take"
    with pytest.raises(TypeError, match=re.escape(expected)):
        PvtV2ForImageClassification.from_pretrained(tmp_path / "m", **{name: value})
    with pytest.raises(TypeError, match=re.escape(expected)):
        PvtV2Config.from_pretrained(tmp_path / "m", **{name: value})


@pytest.mark.parametrize("subfolder", ["../other", "sub/../../other", "/etc"])
def test_a_subfolder_leaving_a_hub_repository_is_named_as_the_argument(tmp_path, subfolder):
    # huggingface_hub refuses such paths with "Invalid filename '../other/config.json' ... Please ask the repository
    # owner to rename this file": the caller's subfolder= was taken for a file of the repository
    expected = f"subfolder={subfolder!r} is not a folder inside the hub repository 'owner/tiny'"
    for load in (PvtV2ForImageClassification.from_pretrained, PvtV2Config.from_pretrained,
                 PvtV2ImageProcessor.from_pretrained):
        with pytest.raises(ValueError, match=re.escape(expected)):
            load("owner/tiny", subfolder=subfolder, cache_dir=tmp_path, local_files_only=True)


def test_a_subfolder_with_dots_inside_a_local_folder_is_still_followed_as_transformers_follows_it(tmp_path):
    _tiny(3).save_pretrained(tmp_path / "a" / "model")
    (tmp_path / "b").mkdir()
    ours = PvtV2ForImageClassification.from_pretrained(tmp_path / "b", subfolder="../a/model")
    theirs = transformers.PvtV2ForImageClassification.from_pretrained(tmp_path / "b", subfolder="../a/model")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(x).logits, theirs(x).logits, atol=1e-5)


def _three_classes_as_seven(tmp_path):
    """A 5-class checkpoint and a config of 7 classes (another head) in its own folder, as pvtv2 and transformers
    read it."""
    _tiny(4).save_pretrained(tmp_path / "m")
    PvtV2Config(**TINY, num_labels=7).save_pretrained(tmp_path / "c")
    return tmp_path / "m", tmp_path / "c"


@pytest.mark.parametrize("form", ["transformers", "folder", "file"])
def test_config_may_be_transformers_config_or_a_path_as_transformers_takes_it(tmp_path, form):
    # "config must be a PvtV2Config, got PvtV2Config" (transformers' class of the same name), and a path, which
    # transformers reads, was refused
    weights, folder = _three_classes_as_seven(tmp_path)
    given = {"transformers": transformers.PvtV2Config.from_pretrained(folder), "folder": folder,
             "file": folder / "config.json"}[form]
    model = PvtV2ForImageClassification.from_pretrained(weights, config=given)
    reference = transformers.PvtV2Config.from_pretrained(folder)
    assert model.config.num_labels == reference.num_labels == 7
    assert list(model.config.hidden_sizes) == list(reference.hidden_sizes)
    # the encoder is the checkpoint's: same features as transformers' model of the checkpoint
    theirs = transformers.PvtV2ForImageClassification.from_pretrained(weights)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_features = model.pvt_v2(x).last_hidden_state
        their_features = theirs.pvt_v2(x).last_hidden_state
    assert torch.allclose(ours_features, their_features, atol=1e-5)


def test_config_of_another_kind_is_named_with_its_module():
    with pytest.raises(TypeError, match=re.escape(
            "config must be a PvtV2Config (pvtv2's or transformers'), or a path or hub id of a config.json, "
            "got builtins.dict")):
        PvtV2ForImageClassification.from_pretrained("nowhere", config={"num_labels": 3})
    with pytest.raises(TypeError, match=re.escape("got transformers.models.vit.configuration_vit.ViTConfig")):
        PvtV2ForImageClassification.from_pretrained("nowhere", config=transformers.ViTConfig())


def test_a_missing_subfolder_of_a_local_folder_is_named_not_taken_for_default_preprocessing(tmp_path):
    # A misspelt subfolder gave the default preprocessing (224 x 224 bilinear) without a word where the subfolder's
    # preprocessor_config.json says 96 x 80 nearest; the model's loading already names a missing subfolder.
    PvtV2ImageProcessor(size={"height": 96, "width": 80}, resample=0).save_pretrained(tmp_path / "sub")
    assert PvtV2ImageProcessor.from_pretrained(tmp_path, subfolder="sub").size == {"height": 96, "width": 80}
    expected = f"{os.fspath(tmp_path)!r} has no subfolder 'sbu'"
    with pytest.raises(FileNotFoundError, match=re.escape(expected)):
        PvtV2ImageProcessor.from_pretrained(tmp_path, subfolder="sbu")
    with pytest.raises(FileNotFoundError, match=re.escape(expected)):
        PvtV2Config.from_pretrained(tmp_path, subfolder="sbu")
    # transformers refuses it too
    with pytest.raises(OSError):
        transformers.PvtImageProcessor.from_pretrained(tmp_path, subfolder="sbu")


@pytest.mark.parametrize("name, dtype", [("dtype", torch.float16), ("torch_dtype", torch.bfloat16)])
def test_a_config_given_a_torch_dtype_is_saved_with_its_name_as_transformers_saves_it(tmp_path, name, dtype):
    # transformers' configs take dtype=torch.float16 and write "float16"; it was kept as the torch object, and
    # save_pretrained (of the config, or of a model built from it) failed: "'dtype' cannot be written to JSON"
    _tiny().save_pretrained(tmp_path / "m")
    config = PvtV2Config.from_pretrained(tmp_path / "m", **{name: dtype})
    config.save_pretrained(tmp_path / "c")
    transformers.PvtV2Config.from_pretrained(tmp_path / "m", **{name: dtype}).save_pretrained(tmp_path / "t")
    ours = json.loads((tmp_path / "c" / "config.json").read_text())
    theirs = json.loads((tmp_path / "t" / "config.json").read_text())
    assert ours[name] == theirs["dtype"] == str(dtype).removeprefix("torch.")
    model = PvtV2ForImageClassification.from_pretrained(tmp_path / "m", config=config)
    model.save_pretrained(tmp_path / "saved")  # the weights are float32: so says its config.json
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["dtype"] == "float32"
