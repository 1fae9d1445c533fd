"""Checkpoints: every layout against the code it came from, round trips with transformers, and hostile files."""

from __future__ import annotations

import logging
import os
import pickle
import warnings

import pytest
import timm
import torch
import transformers
from timm.models.pvt_v2 import checkpoint_filter_fn

from pvtv2 import CheckpointError, PvtV2Backbone, PvtV2Config, PvtV2ForImageClassification, PvtV2Model
from pvtv2.weights.files import save_state_dict
from pvtv2.weights.layouts import convert_state_dict, detect_layout, to_canonical
from pvtv2.weights.loading import infer_config

from conftest import TINY, random_weights_, relative_error, shrink_patch_embeddings_

TOL = 1e-5


def timm_model(name: str, num_classes: int = 7, seed: int = 0, shrink: bool = True) -> torch.nn.Module:
    """A timm PVTv2 with random weights whose patch embeddings make LayerNorm epsilons matter (B0 at full depth,
    larger variants with fewer blocks to stay fast)."""
    depths = {} if name == "pvt_v2_b0" else dict(depths=(1, 2, 1, 1))
    model = timm.create_model(name, num_classes=num_classes, pretrained=False, **depths)
    random_weights_(model, seed=seed)
    if shrink:
        shrink_patch_embeddings_(model, 1e-3)
    return model.eval()


@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_v2_b2_li", "pvt_v2_b1"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_checkpoint_gives_timm_outputs(tmp_path, name, suffix):
    reference = timm_model(name)
    path = save_state_dict(reference.state_dict(), tmp_path / f"{name}{suffix}")
    model = PvtV2ForImageClassification.from_pretrained(path)
    assert model.config.patch_norm_eps == 1e-5 and model.config.reduction_norm_eps == 1e-5
    x = torch.randn(2, 3, 72, 88)
    with torch.no_grad():
        expected = reference(x)
        assert relative_error(expected, model(x).logits) < TOL
        # The epsilons are not a detail: with transformers' 1e-6 everywhere the numbers move.
        wrong = PvtV2ForImageClassification.from_pretrained(path, patch_embed_layer_norm_eps=1e-6)
        assert relative_error(expected, wrong(x).logits) > 1e-3


def test_a_checkpoint_without_config_warns_where_its_heads_are_a_guess(tmp_path, caplog):
    """Heads are in no tensor's shape. Widths of the published 1:2:5:8 pattern load silently (every published
    variant has heads 1, 2, 5, 8); other widths load with heads guessed, a warning naming the guess and the way to
    give them, and give timm's numbers once they are given."""
    torch.manual_seed(0)
    custom = timm.models.pvt_v2.PyramidVisionTransformerV2(
        depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(2, 4, 3, 2), mlp_ratios=(2, 2, 2, 2),
        num_classes=3)
    random_weights_(custom, seed=1)
    custom.eval()
    path = save_state_dict(custom.state_dict(), tmp_path / "custom.safetensors")
    x = torch.randn(1, 3, 64, 64)
    with caplog.at_level(logging.WARNING, logger="pvtv2"), torch.no_grad():
        guessed = PvtV2ForImageClassification.from_pretrained(path)
        assert "assuming num_attention_heads=[1, 2, 3, 4]" in caplog.text and "[16, 32, 48, 64]" in caplog.text
        assert relative_error(custom(x), guessed(x).logits) > 1e-3  # the guess is wrong here, as warned
        caplog.clear()
        told = PvtV2ForImageClassification.from_pretrained(path, num_attention_heads=[2, 4, 3, 2])
        assert relative_error(custom(x), told(x).logits) < TOL
        published = timm.models.pvt_v2.PyramidVisionTransformerV2(
            depths=(1, 1, 1, 1), embed_dims=(8, 16, 40, 64), num_heads=(1, 2, 5, 8), mlp_ratios=(2, 2, 2, 2),
            num_classes=3).eval()
        plain = PvtV2ForImageClassification.from_pretrained(
            save_state_dict(published.state_dict(), tmp_path / "published.safetensors"))
        assert plain.config.num_attention_heads == [1, 2, 5, 8]
        assert relative_error(published(x), plain(x).logits) < TOL
    assert caplog.text == ""


def test_the_heads_guess_says_how_it_was_made_where_widths_do_not_divide(caplog):
    """Widths 64, 96, 160, 256: 96 / 64 and 160 / 64 are no whole numbers, so those stages' heads are guessed as 1;
    the warning says so rather than name a ratio the guess does not follow."""
    with torch.device("meta"):
        custom = timm.models.pvt_v2.PyramidVisionTransformerV2(
            depths=(1, 1, 1, 1), embed_dims=(64, 96, 160, 256), num_heads=(1, 2, 5, 8), mlp_ratios=(2, 2, 2, 2))
    canonical = to_canonical(custom.state_dict(), "timm")
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        config = infer_config(canonical, "timm")
    assert config.num_attention_heads == [1, 1, 1, 4]
    assert ("assuming num_attention_heads=[1, 1, 1, 4] (hidden_sizes[i] / hidden_sizes[0], 1 where that is no whole "
            "number)") in caplog.text


@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_v2_b2_li"])
@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict_module"])
def test_original_checkpoint_gives_reference_outputs(tmp_path, name, wrap):
    """An original-layout file (the authors' release format); timm's own converter is the independent reference."""
    reference = timm_model(name, num_classes=1000, seed=1)
    original = convert_state_dict(reference.state_dict(), "original")
    assert "patch_embed1.proj.weight" in original and "block1.0.attn.kv.weight" in original and "norm4.weight" in original
    check = timm.create_model(name, num_classes=1000, **({} if name == "pvt_v2_b0" else dict(depths=(1, 2, 1, 1)))).eval()
    check.load_state_dict(checkpoint_filter_fn(dict(original), check), strict=True)
    payload = {
        "plain": original,
        "model": {"model": original, "epoch": 299},
        "state_dict_module": {"state_dict": {f"module.{k}": v for k, v in original.items()}},
    }[wrap]
    torch.save(payload, tmp_path / f"{name}.pth")
    model = PvtV2ForImageClassification.from_pretrained(tmp_path / f"{name}.pth")
    assert model.config.num_labels == 1000
    assert model.config.id2label[281] == "tabby, tabby cat"  # ImageNet names attached to a 1000-class head
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(check(x), model(x).logits) < TOL


def test_layout_conversions_round_trip_exactly():
    reference = timm_model("pvt_v2_b0")
    state = reference.state_dict()
    for layout in ("original", "transformers"):
        converted = convert_state_dict(state, layout)
        back = convert_state_dict(converted, "timm")
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state)
    assert detect_layout(state) == "timm"
    assert detect_layout(convert_state_dict(state, "original")) == "original"
    assert detect_layout(convert_state_dict(state, "transformers")) == "transformers"


def test_save_pretrained_loads_in_transformers_strictly(tmp_path):
    config = PvtV2Config(**TINY, id2label={0: "a", 1: "b", 2: "c"})
    model = random_weights_(PvtV2ForImageClassification(config), seed=2).eval()
    model.save_pretrained(tmp_path)
    theirs, info = transformers.PvtV2ForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert theirs.config.id2label == {0: "a", 1: "b", 2: "c"}
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        assert relative_error(theirs.eval()(x).logits, model(x).logits) < TOL
    back = PvtV2ForImageClassification.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))
    assert back.config == model.config


@pytest.mark.parametrize("safe", [True, False])
def test_transformers_folder_loads_here(tmp_path, safe):
    config = transformers.PvtV2Config(**TINY, num_labels=4, linear_attention=True)
    theirs = random_weights_(transformers.PvtV2ForImageClassification(config), seed=3).eval()
    theirs.save_pretrained(tmp_path, safe_serialization=safe) if safe else torch.save(
        theirs.state_dict(), tmp_path / "pytorch_model.bin"
    )
    if not safe:
        theirs.config.save_pretrained(tmp_path)
    ours = PvtV2ForImageClassification.from_pretrained(tmp_path)
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        assert relative_error(theirs(x).logits, ours(x).logits) < TOL
    # The same folder feeds the bare encoder and the backbone (the head is left out).
    encoder = PvtV2Model.from_pretrained(tmp_path)
    backbone = PvtV2Backbone.from_pretrained(tmp_path, out_indices=[0, 3])
    with torch.no_grad():
        expected = theirs.pvt_v2(x).last_hidden_state
        assert relative_error(expected, encoder(x).last_hidden_state) < TOL
        maps = backbone(x).feature_maps
    assert len(maps) == 2 and relative_error(expected, maps[1]) < TOL


def test_head_replacement_for_fine_tuning(tmp_path, caplog):
    reference = timm_model("pvt_v2_b0", num_classes=1000)
    path = save_state_dict(reference.state_dict(), tmp_path / "b0.safetensors")
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        model = PvtV2ForImageClassification.from_pretrained(path, num_labels=10)
    assert "replacing the classifier head" in caplog.text
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # one message for one replaced head
    caplog.clear()
    assert model.classifier.weight.shape == (10, 256) and model.config.num_labels == 10
    assert not model.classifier.weight.is_meta and abs(model.classifier.weight.std().item() - 0.02) < 0.003
    assert torch.equal(model.classifier.bias, torch.zeros(10))
    encoder = convert_state_dict(reference.state_dict(), "transformers")
    for key, value in model.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(value, encoder[key]), key
    # An encoder-only checkpoint gives a classifier a fresh head too.
    PvtV2Model.from_pretrained(path).save_pretrained(tmp_path / "encoder")
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        fresh = PvtV2ForImageClassification.from_pretrained(tmp_path / "encoder", num_labels=3)
    assert "newly initialised" in caplog.text and fresh.classifier.weight.shape == (3, 256)


def test_mismatched_checkpoint_lists_keys_and_shapes(tmp_path):
    reference = timm_model("pvt_v2_b0")
    path = save_state_dict(reference.state_dict(), tmp_path / "b0.safetensors")
    with pytest.raises(CheckpointError) as err:
        PvtV2ForImageClassification.from_pretrained(path, hidden_sizes=[64, 128, 320, 512])
    text = str(err.value)
    assert "mis-shaped keys" in text and "replacing" not in text
    assert "classifier.weight: checkpoint (7, 256) vs model (7, 512)" in text and "... and" in text
    with pytest.raises(CheckpointError, match="missing"):
        PvtV2ForImageClassification.from_pretrained(path, depths=[2, 2, 3, 2])
    with pytest.raises(CheckpointError, match="unexpected"):
        PvtV2ForImageClassification.from_pretrained(path, depths=[2, 2, 1, 2])


# The fields of TINY that a hand-edited config.json may lack, with TINY's values where the defaults differ.
SAVED = dict(TINY, sr_ratios=[4, 2, 1, 1], patch_sizes=[5, 3, 3, 3])


@pytest.mark.parametrize(("field", "default"), [
    ("depths", [2, 2, 2, 2]), ("mlp_ratios", [8, 8, 4, 4]), ("sr_ratios", [8, 4, 2, 1]), ("patch_sizes", [7, 3, 3, 3]),
])
def test_a_config_json_lacking_a_field_the_weights_contradict_is_named(tmp_path, field, default):
    """A config.json without "depths" built the default model, and the error listed the checkpoint's keys without a
    word about the file: now it names the file, the field it lacks and the default used instead."""
    import json

    PvtV2ForImageClassification(PvtV2Config(**SAVED)).save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    data = json.loads(config.read_text())
    assert PvtV2Config().to_dict()[field] == default != data.pop(field) == SAVED[field]
    config.write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as err:
        PvtV2ForImageClassification.from_pretrained(tmp_path)
    line = str(err.value).splitlines()[1].strip()
    assert line == (f"the model was built from {config}: it has no {field!r}, so the default {default} was used where "
                    f"the checkpoint has {SAVED[field]}; correct {config} to fit the weights")


def test_a_config_json_whose_value_the_weights_contradict_is_named(tmp_path):
    import json

    PvtV2ForImageClassification(PvtV2Config(**SAVED)).save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "depths": [1, 1, 1, 1]}))
    with pytest.raises(CheckpointError) as err:
        PvtV2ForImageClassification.from_pretrained(tmp_path)
    assert str(err.value).splitlines()[1].strip() == (
        f"the model was built from {config}: its depths [1, 1, 1, 1] is not the checkpoint's {TINY['depths']}; "
        f"correct {config} to fit the weights")
    # An override is the caller's: the file is named with it, and not blamed for the value.
    config.write_text(json.dumps({**json.loads(config.read_text()), "depths": TINY["depths"]}))
    with pytest.raises(CheckpointError) as err:
        PvtV2ForImageClassification.from_pretrained(tmp_path, depths=[2, 2, 2, 2])
    assert str(err.value).splitlines()[1].strip() == f"the model was built from {config} with the arguments depths"


@pytest.mark.parametrize("saved_linear", [True, False])
def test_a_config_json_whose_attention_the_weights_contradict_names_linear_attention(tmp_path, saved_linear):
    """PVTv2-Li weights under a config.json that says linear_attention false were blamed on sr_ratios ("its sr_ratios
    [4, 2, 1, 1] is not the checkpoint's [1, 1, 1, 1]": the 1x1 reduction after pooling, read as a ratio of 1), a
    correction that builds another wrong model; the other way round the file was not blamed at all."""
    import json

    PvtV2ForImageClassification(PvtV2Config(**SAVED, linear_attention=saved_linear)).save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "linear_attention": not saved_linear}))
    with pytest.raises(CheckpointError) as err:
        PvtV2ForImageClassification.from_pretrained(tmp_path)
    assert str(err.value).splitlines()[1].strip() == (
        f"the model was built from {config}: its linear_attention {not saved_linear} is not the checkpoint's "
        f"{saved_linear}; correct {config} to fit the weights")


class _Exploit:
    """A pickle that would run ``touch MARKER`` when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _truncated_safetensors(tmp_path):
    data = save_state_dict(timm_model("pvt_v2_b0").state_dict(), tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "bad.safetensors").write_bytes(data[: len(data) // 2])
    return tmp_path / "bad.safetensors"


def _cut_pickle(tmp_path):
    torch.save(timm_model("pvt_v2_b0").state_dict(), tmp_path / "whole.pth")
    whole = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "bad.pth").write_bytes(whole[: len(whole) // 3])
    return tmp_path / "bad.pth"


def _write(name, data):
    def make(tmp_path):
        (tmp_path / name).write_bytes(data() if callable(data) else data)
        return tmp_path / name

    return make


def _saved(name, obj):
    def make(tmp_path):
        torch.save(obj(tmp_path), tmp_path / name)
        return tmp_path / name

    return make


def _code_pickle(protocol):
    def make(tmp_path):
        with open(tmp_path / "evil_plain.pth", "wb") as f:
            pickle.dump(_Exploit(tmp_path / "pwned"), f, protocol=protocol)
        return tmp_path / "evil_plain.pth"

    return make


def _foreign(tmp_path):
    state = {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}
    return save_state_dict(state, tmp_path / "resnet.safetensors")


def _integer_weights(tmp_path):
    state = timm_model("pvt_v2_b0").state_dict()
    state = {k: v.to(torch.int32) if k.endswith("proj.weight") else v for k, v in state.items()}
    return save_state_dict(state, tmp_path / "ints.safetensors")


HOSTILE_FILES = {
    "truncated safetensors": (_truncated_safetensors, "not a readable safetensors"),
    "random bytes": (_write("garbage.pth", lambda: os.urandom(4096)), "not a readable PyTorch checkpoint"),
    "empty file": (_write("empty.bin", b""), "empty"),
    "truncated pickle": (_cut_pickle, "corrupt|truncated"),
    "code in a torch.save file": (_saved("evil.pth", lambda d: {"weight": torch.zeros(1), "payload": _Exploit(d / "pwned")}), "refusing to load"),
    # used to say "corrupt, truncated or another format" after torch's "Detected pickle protocol" warning
    # (protocol 2 reads as torch's legacy format, whose unpickler names the blocked global)
    **{f"code in a plain pickle, protocol {n}": (_code_pickle(n), "refusing to load .* holds pickled Python objects")
       for n in (2, 4, 5)},
    "a foreign model": (_foreign, "not a PVTv2 checkpoint"),
    "integer weights": (_integer_weights, "non-float"),
    "a list, not a state dict": (_saved("list.pth", lambda d: [torch.zeros(3)]), "does not hold a state dict"),
}


@pytest.mark.parametrize("case", list(HOSTILE_FILES))
def test_hostile_and_broken_files(tmp_path, case):
    make, message = HOSTILE_FILES[case]
    path = make(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the error says it all: no torch warning before it
        with pytest.raises(CheckpointError, match=message):
            PvtV2ForImageClassification.from_pretrained(path)
    assert not (tmp_path / "pwned").exists()  # no code in the file ran


def test_missing_sources_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is a preset"):
        PvtV2ForImageClassification.from_pretrained("pvt_v2_b0")
    with pytest.raises(FileNotFoundError, match="no weights in folder"):
        PvtV2ForImageClassification.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nothing\.safetensors' is not an existing file or folder"):
        PvtV2ForImageClassification.from_pretrained(tmp_path / "nothing.safetensors")


def test_half_precision_checkpoint_loads_as_float32(tmp_path):
    reference = timm_model("pvt_v2_b0", shrink=False)
    state = {k: v.half() for k, v in reference.state_dict().items()}
    path = save_state_dict(state, tmp_path / "b0_fp16.safetensors")
    model = PvtV2ForImageClassification.from_pretrained(path)
    assert model.dtype == torch.float32
    reference.load_state_dict({k: v.float() for k, v in state.items()})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(reference(x), model(x).logits) < TOL


# Logits recorded by transformers' conversion script for COCO val2017 image 39769 (two cats), first three classes.
RECORDED = {
    "pvt_v2_b0": [-1.1939, -1.4547, -0.1076],
    "pvt_v2_b1": [-0.4716, -0.7335, -0.4600],
    "pvt_v2_b2": [0.0795, -0.3170, 0.2247],
    "pvt_v2_b2_li": [0.0968, 0.3937, -0.4252],
    "pvt_v2_b3": [-0.4595, -0.2870, 0.0940],
    "pvt_v2_b4": [-0.1769, -0.1747, -0.0143],
    "pvt_v2_b5": [-0.2943, -0.1008, 0.6812],
}


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_published_weights_reproduce_recorded_logits(name):
    """Needs the authors' release files: PVTV2_WEIGHTS_DIR holding pvt_v2_b0.pth ..., and PVTV2_COCO_IMAGE pointing
    at 000000039769.jpg. Transformers' conversion used layer_norm_eps 1e-6 everywhere, so that is what reproduces its
    recorded logits (to its 1e-4); the faithful default (the original's 1e-5 in two places) stays close."""
    from pvtv2 import PvtV2ImageProcessor

    folder, image = os.environ.get("PVTV2_WEIGHTS_DIR"), os.environ.get("PVTV2_COCO_IMAGE")
    path = os.path.join(folder or "", f"{name}.pth")
    if not folder or not image or not os.path.isfile(path) or not os.path.isfile(image):
        pytest.skip(f"published weights absent: set PVTV2_WEIGHTS_DIR (with {name}.pth) and PVTV2_COCO_IMAGE")
    pixels = PvtV2ImageProcessor()(image, return_tensors="pt")["pixel_values"]
    as_converted = PvtV2ForImageClassification.from_pretrained(
        path, patch_embed_layer_norm_eps=1e-6, reduction_layer_norm_eps=1e-6
    )
    faithful = PvtV2ForImageClassification.from_pretrained(path)
    with torch.no_grad():
        logits = as_converted(pixels).logits
        original = faithful(pixels).logits
    assert torch.allclose(logits[0, :3], torch.tensor(RECORDED[name]), atol=1e-4)
    assert torch.allclose(original[0, :3], torch.tensor(RECORDED[name]), atol=5e-2)
    assert logits.argmax() == original.argmax()
    assert "cat" in faithful.config.id2label[int(original.argmax())]


@pytest.mark.parametrize("field, saved, written", [
    ("num_channels", 1, 3), ("num_channels", 4, None),  # None: the key left out, so the default 3 was used
    ("qkv_bias", False, True), ("qkv_bias", True, False), ("qkv_bias", False, None),
])
def test_a_config_json_whose_channels_or_qkv_bias_the_weights_contradict_is_named(tmp_path, field, saved, written):
    """num_channels and qkv_bias contradicted by the weights got only the generic "built from" line. The checkpoint
    says them itself: its first patch embedding's weight is (C_out, C_in, k, k), and the query/key/value biases are
    there or not (read here from the saved tensors, independently of the loader)."""
    import json

    from safetensors.torch import load_file

    PvtV2ForImageClassification(PvtV2Config(**SAVED, **{field: saved})).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    in_channels = tensors["pvt_v2.encoder.layers.0.patch_embedding.proj.weight"].shape[1]
    has_biases = any(k.endswith("attention.query.bias") for k in tensors)
    assert (in_channels if field == "num_channels" else has_biases) == saved
    config = tmp_path / "config.json"
    data = json.loads(config.read_text())
    if written is None:
        del data[field]
    else:
        data[field] = written
    config.write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as err:
        PvtV2ForImageClassification.from_pretrained(tmp_path)
    used = getattr(PvtV2Config(), field)  # the default, where the file has none
    problem = (f"it has no {field!r}, so the default {used} was used where the checkpoint has {saved}" if written is None
               else f"its {field} {written} is not the checkpoint's {saved}")
    assert str(err.value).splitlines()[1].strip() == (
        f"the model was built from {config}: {problem}; correct {config} to fit the weights")
