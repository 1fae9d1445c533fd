"""A hostile pass over from_pretrained's transformers arguments (dtype=, subfolder=, config=): what a folder written
by pvtv2 says to transformers, and what a subfolder that leaves the repository is told."""

from __future__ import annotations

import json
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
@pytest.mark.parametrize("name, value", [
    ("quantization_config", {"quant_method": "bitsandbytes", "load_in_8bit": True}), ("load_in_8bit", True),
    ("load_in_4bit", True), ("low_cpu_mem_usage", True), ("trust_remote_code", True), ("max_memory", {0: "1GB"}),
    ("offload_folder", "offload"), ("offload_state_dict", True), ("offload_buffers", True), ("weights_only", False),
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
