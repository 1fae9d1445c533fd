"""PvtV2Config: fields and defaults against transformers', validation, presets, config.json in and out."""

from __future__ import annotations

import inspect
import json
import re
from typing import Any

import numpy as np
import pytest
import torch
import transformers

import pvtv2
from pvtv2 import PvtV2Config, imagenet_id2label
from pvtv2.models.config import FIELDS, PRESETS, merge_changes
from pvtv2.weights.loading import dense_config_from_dict, infer_config

from conftest import TINY

DOCUMENTED_FIELDS = [
    "image_size", "num_channels", "num_encoder_blocks", "depths", "sr_ratios", "hidden_sizes", "patch_sizes",
    "strides", "num_attention_heads", "mlp_ratios", "hidden_act", "hidden_dropout_prob",
    "attention_probs_dropout_prob", "initializer_range", "drop_path_rate", "layer_norm_eps", "qkv_bias",
    "linear_attention", "out_features", "out_indices",
]


def test_defaults_equal_transformers():
    ours = PvtV2Config()
    theirs = transformers.PvtV2Config()
    for field in DOCUMENTED_FIELDS:
        assert list(getattr(ours, field)) == list(getattr(theirs, field)) if isinstance(getattr(ours, field), (list, tuple)) \
            else getattr(ours, field) == getattr(theirs, field), field
    assert ours.num_labels == theirs.num_labels == 2
    assert ours.stage_names == theirs.stage_names


@pytest.mark.parametrize(
    "kwargs",
    [dict(out_indices=[0, 2]), dict(out_features=["stage2", "stage4"]), dict(out_indices=[1], out_features=["stage2"])],
)
def test_out_features_resolution_matches_transformers(kwargs):
    ours = PvtV2Config(**kwargs)
    theirs = transformers.PvtV2Config(**kwargs)
    assert ours.out_features == list(theirs.out_features)
    assert ours.out_indices == list(theirs.out_indices)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(depths=[2, 2, 2]), "depths"),
        (dict(hidden_sizes=[32, 64, 160, 256, 512]), "hidden_sizes"),
        (dict(num_attention_heads=[1, 3, 5, 8]), "num_attention_heads"),
        (dict(hidden_dropout_prob=-0.1), "hidden_dropout_prob"),
        (dict(drop_path_rate=1.5), "drop_path_rate"),
        (dict(attention_probs_dropout_prob=-1), "attention_probs_dropout_prob"),
        (dict(hidden_act="gelu_unknown"), "hidden_act"),
        (dict(out_features=["stem"]), "out_features"),
        (dict(out_features=["stage7"]), "out_features"),
        (dict(out_indices=[4]), "out_indices"),
        (dict(out_features=["stage1"], out_indices=[2]), "out_features"),
        (dict(layer_norm_eps=0.0), "layer_norm_eps"),
        (dict(num_labels=-3), "num_labels"),
        (dict(problem_type="ranking"), "problem_type"),
        (dict(strides=[4, 2, 0, 2]), "strides"),
        (dict(num_encoder_blocks=3), "num_encoder_blocks"),
        (dict(depths=2), "depths"),
        (dict(hidden_sizes="32,64"), "hidden_sizes"),
        (dict(linear_attention="yes"), "linear_attention"),
        (dict(image_size="large"), "image_size"),
    ],
)
def test_contradictions_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PvtV2Config(**kwargs)


def test_json_round_trip_keeps_unknown_keys_and_extras(tmp_path):
    config = PvtV2Config(
        depths=[1, 1, 1, 1], num_labels=3, patch_embed_layer_norm_eps=1e-5, reduction_layer_norm_eps=1e-5,
        my_custom_field={"a": 1}, problem_type="multi_label_classification",
    )
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "pvt_v2"
    assert data["my_custom_field"] == {"a": 1}
    back = PvtV2Config.from_pretrained(tmp_path)
    assert back == config
    assert back.patch_norm_eps == 1e-5 and back.reduction_norm_eps == 1e-5 and back.layer_norm_eps == 1e-6
    assert back.my_custom_field == {"a": 1}
    assert back.problem_type == "multi_label_classification"


def test_config_written_here_reads_in_transformers_and_back(tmp_path):
    ours = PvtV2Config(hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4], out_indices=[1, 3],
                       id2label={0: "cat", 1: "dog", 2: "bird"})
    ours.save_pretrained(tmp_path)
    theirs = transformers.PvtV2Config.from_pretrained(tmp_path)
    for field in DOCUMENTED_FIELDS:
        value = getattr(theirs, field)
        assert (list(value) if isinstance(value, (list, tuple)) else value) == (
            list(getattr(ours, field)) if isinstance(getattr(ours, field), (list, tuple)) else getattr(ours, field)
        ), field
    assert theirs.id2label == {0: "cat", 1: "dog", 2: "bird"}
    theirs.save_pretrained(tmp_path / "hf")
    back = PvtV2Config.from_pretrained(tmp_path / "hf")
    assert back.id2label == ours.id2label and back.out_indices == [1, 3] and back.hidden_sizes == [16, 32, 48, 64]


def test_corrupt_config_json_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        PvtV2Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    with pytest.raises(ValueError, match="model_type"):
        PvtV2Config.from_pretrained(tmp_path)


def test_a_bad_value_in_a_folders_config_json_names_the_file(tmp_path):
    """A value of config.json that no config takes: the error names the file, through every reader of it; a value
    given as an override that is wrong on its own is the override's error, not the file's."""
    model = pvtv2.PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=3)).eval()
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["num_attention_heads"] = [1, 3, 3, 4]  # 3 does not divide 32
    path.write_text(json.dumps(data))
    readers = [PvtV2Config.from_pretrained, PvtV2Config.from_json_file, pvtv2.PvtV2Model.from_pretrained,
               pvtv2.PvtV2ForImageClassification.from_pretrained, pvtv2.PvtV2Backbone.from_pretrained]
    for read in readers:
        source = path if read == PvtV2Config.from_json_file else tmp_path
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: num_attention_heads\[1\]=3 does not divide"):
            read(source)
    # the same file, fixed by an override: loads; a bad override of a good file: the override's message alone
    assert PvtV2Config.from_pretrained(tmp_path, num_attention_heads=[1, 2, 3, 4]).num_attention_heads == [1, 2, 3, 4]
    data["num_attention_heads"] = [1, 2, 3, 4]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"^num_labels must be"):
        PvtV2Config.from_pretrained(tmp_path, num_labels=-1)
    # transformers' SegFormer config.json takes the same way
    segformer = transformers.SegformerConfig(hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 3, 3, 4])
    (tmp_path / "seg").mkdir()
    segformer.save_pretrained(tmp_path / "seg")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'seg' / 'config.json'))}: num_attention_heads"):
        pvtv2.weights.loading.read_config(tmp_path / "seg" / "config.json")


def test_an_overrides_error_is_not_blamed_on_a_bad_file(tmp_path):
    """A config.json with a bad value, read with an override that is wrong on its own: the error is the override's,
    without the file's name (the file does not hold that value); where the override is good, the file's error is
    named as before."""
    PvtV2Config(**TINY, layer_norm_eps=0.5).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["layer_norm_eps"] = float("nan")
    path.write_text(json.dumps(data))  # a bare NaN token, as json writes it
    assert "NaN" in path.read_text()
    with pytest.raises(ValueError, match=r"^image_size must be .*got -3$"):
        PvtV2Config.from_pretrained(tmp_path, image_size=-3)
    with pytest.raises(ValueError, match=r"^hidden_act='nope' is not supported"):
        pvtv2.weights.loading.read_config(path, hidden_act="nope")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: layer_norm_eps must be a positive number, got nan"):
        PvtV2Config.from_pretrained(tmp_path, image_size=64)


def test_a_stage_deeper_than_any_model_is_refused_by_name(tmp_path):
    """Depth costs time, not memory: a config.json with 10**5 blocks in a stage (far below the 2**31 - 1 bound of
    widths) is refused by name at once instead of building for many minutes; the bound is 25 times the deepest
    published stage."""
    deepest = max(max(PvtV2Config.from_preset(name).depths) for name in PRESETS)
    assert PvtV2Config(**dict(TINY, depths=[1, 25 * deepest, 1, 1])).depths[1] == 25 * deepest
    data = PvtV2Config(**TINY).to_dict()
    data["depths"] = [1, 10**5, 1, 1]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'config.json'))}: depths must hold numbers up "
                                         rf"to {25 * deepest} \(blocks in a stage\), got \[1, 100000, 1, 1\]"):
        PvtV2Config.from_pretrained(tmp_path)


HUGE = 10**400  # a whole, positive number beyond any float
SHOWN = "100000000000000000...0000000000000000000"  # HUGE in a message: its first and last digits, 40 characters


@pytest.mark.parametrize("kwargs, message", [
    # Too large is the reason, with the same bound as for any value above it (depths: 1000 blocks; widths: 2**31 - 1).
    (dict(depths=[HUGE, 1, 1, 1]), f"depths must hold numbers up to 1000 (blocks in a stage), got [{SHOWN}, 1, 1, 1]"),
    (dict(depths=[2000, 1, 1, 1]), "depths must hold numbers up to 1000 (blocks in a stage), got [2000, 1, 1, 1]"),
    (dict(depths=[1e300, 1, 1, 1]), "depths must hold numbers up to 1000 (blocks in a stage), got "
                                    "[100000000000000005...6386865459400540160, 1, 1, 1]"),  # int(1e300)
    # 60 characters of the list, the last three "..."
    (dict(hidden_sizes=[HUGE] * 4), f"hidden_sizes must hold numbers up to 2147483647, got [{SHOWN}, 10000000000000..."),
    (dict(mlp_ratios=[HUGE] * 4), f"mlp_ratios must hold numbers up to 2147483647, got [{SHOWN}, 10000000000000..."),
    # Beyond the 4300 digits Python writes out at all: the message is still written.
    (dict(depths=[10**5000, 1, 1, 1]), "depths must hold numbers up to 1000 (blocks in a stage), got "
                                       "[<an integer of 16610 bits>, 1, 1, 1]"),
    (dict(layer_norm_eps=HUGE), f"layer_norm_eps must be a positive number, got {SHOWN} (too large for any number "
                                f"this field holds)"),
    (dict(image_size=HUGE), f"image_size must be an int or a (height, width) pair of positive integers, got {SHOWN} "
                            f"(too large for any image)"),
    (dict(num_channels=HUGE), f"num_channels must be at most 2147483647, got {SHOWN}"),  # was torch's TypeError
    (dict(hidden_act="x" * 500), "hidden_act='xxxxxxxxxxxxxxxxx...xxxxxxxxxxxxxxxxxx' is not supported"),
])
def test_huge_values_are_shown_short_and_refused_for_their_size(kwargs, message):
    """A 400-digit number was written out in full in the message, and read "must hold positive numbers"."""
    with pytest.raises(ValueError) as err:
        PvtV2Config(**kwargs)
    assert str(err.value).startswith(message), str(err.value)
    assert len(str(err.value)) < 250


def test_short_repr_keeps_short_values_and_cuts_long_ones():
    from pvtv2.models.config import short_repr

    assert short_repr([1, 2, 3]) == "[1, 2, 3]" and short_repr(0.5) == "0.5" and short_repr("abc") == "'abc'"
    assert short_repr(10**30) == "1" + "0" * 30  # 31 digits: in full
    assert short_repr(10**45) == SHOWN  # 46 digits: the first 18 and the last 19 around "..."
    assert short_repr(list(range(10**6))) == "[0, 1, 2, 3, 4, 5, 6, 7, ...]"  # eight items, then the ellipsis
    long = short_repr({str(i): "x" * 30 for i in range(3)})
    assert len(long) == 60 and long.endswith("...")


def test_short_repr_is_one_line_and_never_raises():
    """A 2-D tensor's repr spans lines (its rows, indented), so a config error that showed one broke the one-line
    message; a __repr__ that raises must not replace the message with its own error."""
    from pvtv2.models.config import short_repr

    class Raising(int):  # an int subclass takes reprlib's int path, which only guards against huge numbers
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    class Terminal:
        def __repr__(self) -> str:
            return "red\n\x1b[31mtext"

    assert short_repr(torch.tensor([[1, 2], [3, 4]])) == "tensor([[1, 2], [3, 4]])"
    assert short_repr(Terminal()) == "red \\x1b[31mtext"  # the escape shown as repr shows it in a string
    assert short_repr("  two  spaces ") == "'  two  spaces '"  # spaces inside a value are the value's
    raising = short_repr(Raising(3))
    assert "\n" not in raising and raising.startswith("<Raising ")
    with pytest.raises(ValueError) as err:
        PvtV2Config(hidden_act=torch.zeros(2, 2))
    assert str(err.value) == ("hidden_act must be an activation name or a callable, got "
                              "tensor([[0., 0.], [0., 0.]])")


@pytest.mark.parametrize("field, raw, message", [
    ("num_encoder_blocks", "NaN", "num_encoder_blocks must be a positive integer, got nan"),
    ("num_encoder_blocks", "1e400", "num_encoder_blocks must be a positive integer, got inf"),
    ("num_encoder_blocks", "[4]", "num_encoder_blocks must be a positive integer, got [4]"),
    ("max_depth", "true", "max_depth must be a positive number, got True"),  # was read as 1.0 metre
    ("max_depth", "1" + "0" * 400, "max_depth must be a positive number, got 1000"),  # was an OverflowError
])
def test_bad_values_of_a_segformer_or_glpn_config_json_are_refused_by_name(tmp_path, field, raw, message):
    """transformers' SegFormer / GLPN config.json without mlp_ratios (their ratio is 4 in every stage): the count of
    stages and the depth range are refused by name, with the file, whatever JSON holds there."""
    config = (transformers.GLPNConfig if field == "max_depth" else transformers.SegformerConfig)(
        depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4])
    data = config.to_dict()
    data.pop("mlp_ratios", None)
    data[field] = "@@"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data).replace('"@@"', raw))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {re.escape(message)}"):
        pvtv2.weights.loading.read_config(path)


# Paper Table: parameters (M) of each variant with the 1000-class head.
PAPER_PARAMS = {
    "pvt_v2_b0": 3.7, "pvt_v2_b1": 14.0, "pvt_v2_b2_li": 22.6, "pvt_v2_b2": 25.4,
    "pvt_v2_b3": 45.2, "pvt_v2_b4": 62.6, "pvt_v2_b5": 82.0,
}


def test_list_presets():
    assert sorted(pvtv2.list_presets()) == sorted(PAPER_PARAMS)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_preset_parameter_counts_match_the_paper(name):
    config = PvtV2Config.from_preset(name)
    assert config.num_labels == 1000
    assert config.id2label[0] == "tench, Tinca tinca"
    with torch.device("meta"):
        model = pvtv2.PvtV2ForImageClassification(config)
        reference = transformers.PvtV2ForImageClassification(transformers.PvtV2Config(**{
            k: v for k, v in config.to_dict().items() if k not in ("drop_path_rate",)
        }))
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert round(count / 1e6, 1) == PAPER_PARAMS[name]


def test_preset_overrides_and_unknown_preset():
    config = PvtV2Config.from_preset("pvt_v2_b2_li", num_labels=10, drop_path_rate=0.0)
    assert config.linear_attention and config.num_labels == 10 and config.depths == [3, 4, 6, 3]
    with pytest.raises(ValueError, match="unknown preset"):
        PvtV2Config.from_preset("pvt_v2_b9")


# ---------------------------------------------------------------------------------------------- the table of fields
# Tests derived from PvtV2Fields: a field added to the table without a check, without its way into config.json,
# or unknown to transformers where transformers has it, fails one of them. Each new field needs an entry in
# BAD_VALUES and GOOD_VALUES (the first tests say so).

# For every field, values that must be refused with a ValueError naming the field.
BAD_VALUES: dict[str, list] = {
    "image_size": ["large", 0, [224, -1], [1, 2, 3], 224.5, True],
    "num_channels": [0, "3", True, 2.0],
    "num_encoder_blocks": [0, 3, True, 4.0],
    "depths": [2, "2222", [2, 2, 2], [2, -1, 2, 2], [2, 2.5, 2, 2], [2, True, 2, 2], {1, 2, 3, 4}, [2**31, 2, 2, 2],
               [2, 10**5, 2, 2]],
    "sr_ratios": [[8, 4, 2, 0], [8, 4, 2]],
    "hidden_sizes": [[32, 64, 160], [32, 64, 160, "256"], "32,64", [2**40, 64, 160, 256]],
    "patch_sizes": [[7, 3, 3, -3], {"a": 1}],
    "strides": [[4, 2, 0, 2], [4, 2, 2, float("inf")]],
    "num_attention_heads": [[1, 3, 5, 8], [1, 2, 5]],
    "mlp_ratios": [[8, 8, 4, 0], [0.001, 8, 4, 4], [8, 8, 4, float("nan")], [1e308, 8, 4, 4], [2**27, 8, 4, 4]],
    "hidden_act": ["gelu_unknown", 3],
    "hidden_dropout_prob": [-0.1, 1.0, "0.1", True],
    "attention_probs_dropout_prob": [-1, 1.5],
    "initializer_range": [-0.02, "x"],
    "drop_path_rate": [1.5, -0.1],
    "layer_norm_eps": [0.0, -1e-6, "1e-6", float("inf")],
    "qkv_bias": ["yes", 1],
    "linear_attention": ["yes", 0],
    "out_features": [["stem"], ["stage7"], "stage1", ["stage2", "stage1"], ["stage2", "stage2"]],
    "out_indices": [[4], [1, 0], 1, [True], [0, 0]],
    "patch_embed_layer_norm_eps": [0, -1e-5, "x"],
    "reduction_layer_norm_eps": [0, -1e-5, "x"],
    "decoder_hidden_size": [0, 2.5, True],
    "classifier_dropout_prob": [1.0, -0.1],
    "semantic_loss_ignore_index": [2.5, "255", True],
    "reshape_last_stage": ["no", 1],
    "max_depth": [0, -10.0, "10"],
    "head_in_index": [4, -5, 1.0],
    "num_labels": [-3, "3", 2.0, True],
    "id2label": [{1: "a"}, [1], {0.5: "a"}, {0: "a", "0": "b"}],
    "label2id": [5, {"a": "zero"}, {"x": 0}],
    "problem_type": ["ranking"],
    "output_attentions": ["yes", 1, None],
    "output_hidden_states": ["yes"],
    "return_dict": [None, "true"],
}

# For every field, a valid value other than its default, and how the config holds it.
GOOD_VALUES: dict[str, tuple[Any, Any]] = {
    "image_size": ([256, 320], (256, 320)),
    "num_channels": (1, 1),
    "num_encoder_blocks": (2, 2),  # with two-stage lists, below
    "depths": ((3, 4, 6, 3), [3, 4, 6, 3]),
    "sr_ratios": ([4, 2, 1, 1], [4, 2, 1, 1]),
    "hidden_sizes": ([64, 128, 320, 512], [64, 128, 320, 512]),
    "patch_sizes": ([5, 3, 3, 3], [5, 3, 3, 3]),
    "strides": ([2, 2, 2, 2], [2, 2, 2, 2]),
    "num_attention_heads": ([2, 4, 5, 8], [2, 4, 5, 8]),
    "mlp_ratios": ([4, 4, 2.5, 4], [4, 4, 2.5, 4]),
    "hidden_act": ("relu", "relu"),
    "hidden_dropout_prob": (0.1, 0.1),
    "attention_probs_dropout_prob": (0.2, 0.2),
    "initializer_range": (0.01, 0.01),
    "drop_path_rate": (0.3, 0.3),
    "layer_norm_eps": (1e-5, 1e-5),
    "qkv_bias": (False, False),
    "linear_attention": (True, True),
    "out_features": (["stage2", "stage3"], ["stage2", "stage3"]),
    "out_indices": ([0, 2], [0, 2]),
    "patch_embed_layer_norm_eps": (1e-5, 1e-5),
    "reduction_layer_norm_eps": (1e-4, 1e-4),
    "decoder_hidden_size": (128, 128),
    "classifier_dropout_prob": (0.2, 0.2),
    "semantic_loss_ignore_index": (-1, -1),
    "reshape_last_stage": (False, False),
    "max_depth": (80.0, 80.0),
    "head_in_index": (-2, -2),
    "num_labels": (5, 5),
    "id2label": ({"0": "cat", "1": "dog", "2": "bird"}, {0: "cat", 1: "dog", 2: "bird"}),
    "label2id": ({"cat": 0, "dog": 1}, {"cat": 0, "dog": 1}),  # with id2label, below
    "problem_type": ("multi_label_classification", "multi_label_classification"),
    "output_attentions": (True, True),
    "output_hidden_states": (True, True),
    "return_dict": (False, False),
}
# What a field's good value needs besides itself.
COMPANIONS: dict[str, dict[str, Any]] = {
    "num_encoder_blocks": dict(depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[3, 3], strides=[2, 2],
                               num_attention_heads=[1, 2], mlp_ratios=[2, 2]),
    "label2id": dict(id2label={0: "cat", 1: "dog"}),
}

# Every field away from its default at once (three stages, so that num_encoder_blocks differs too). Whole numbers
# for mlp_ratios and max_depth: transformers 5 types them int and refuses floats.
EVERYTHING: dict[str, Any] = dict(
    image_size=[256, 320], num_channels=1, num_encoder_blocks=3, depths=[1, 2, 1], sr_ratios=[4, 2, 2],
    hidden_sizes=[16, 32, 48], patch_sizes=[5, 3, 3], strides=[2, 2, 2], num_attention_heads=[2, 4, 3],
    mlp_ratios=[2, 3, 4], hidden_act="relu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.2,
    initializer_range=0.01, drop_path_rate=0.3, layer_norm_eps=1e-5, qkv_bias=False, linear_attention=True,
    out_features=["stage1", "stage3"], out_indices=[0, 2], patch_embed_layer_norm_eps=1e-5,
    reduction_layer_norm_eps=1e-4, decoder_hidden_size=128, classifier_dropout_prob=0.2, semantic_loss_ignore_index=-1,
    reshape_last_stage=False, max_depth=80, head_in_index=-2, num_labels=3, id2label={0: "cat", 1: "dog", 2: "bird"},
    label2id={"cat": 0, "dog": 1, "bird": 2}, problem_type="multi_label_classification", output_attentions=True,
    output_hidden_states=True, return_dict=False,
)

TABLE = [f.name for f in FIELDS]


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def test_the_tables_of_these_tests_cover_every_field():
    assert list(BAD_VALUES) == TABLE, "a field was added to or removed from PvtV2Fields: update BAD_VALUES"
    assert list(GOOD_VALUES) == TABLE, "a field was added to or removed from PvtV2Fields: update GOOD_VALUES"
    assert sorted(EVERYTHING) == sorted(TABLE)


def test_signature_is_the_table_and_agrees_with_transformers():
    ours = inspect.signature(PvtV2Config).parameters
    assert list(ours) == [*TABLE, "kwargs"] and ours["kwargs"].kind is inspect.Parameter.VAR_KEYWORD
    assert [p.default for p in list(ours.values())[:-1]] == [f.default for f in FIELDS]
    # transformers' own defaults, read from its signature (its private spellings of out_features / out_indices)
    theirs = {name.lstrip("_"): p.default for name, p in inspect.signature(transformers.PvtV2Config).parameters.items()}
    shared = [name for name in TABLE if name in theirs]
    assert set(DOCUMENTED_FIELDS) <= set(shared)
    for name in shared:
        assert _plain(ours[name].default) == _plain(theirs[name]), name


def test_positional_arguments_follow_the_table():
    config = PvtV2Config(224, 3, 4, [1, 1, 1, 1])
    assert config.depths == [1, 1, 1, 1]
    with pytest.raises(TypeError, match="too many positional arguments"):
        PvtV2Config(*range(len(TABLE) + 1))
    with pytest.raises(TypeError, match="image_size"):
        PvtV2Config(224, image_size=256)


# The keys of config.json, in to_dict's order (recorded): the layout of transformers' file, then what is set.
ALWAYS_WRITTEN = [
    "model_type", "image_size", "num_channels", "num_encoder_blocks", "depths", "sr_ratios", "hidden_sizes",
    "patch_sizes", "strides", "num_attention_heads", "mlp_ratios", "hidden_act", "hidden_dropout_prob",
    "attention_probs_dropout_prob", "initializer_range", "drop_path_rate", "layer_norm_eps", "qkv_bias",
    "linear_attention", "out_features", "out_indices", "stage_names", "id2label", "label2id",
]
WRITTEN_WHEN_SET = [
    "patch_embed_layer_norm_eps", "reduction_layer_norm_eps", "decoder_hidden_size", "classifier_dropout_prob",
    "semantic_loss_ignore_index", "reshape_last_stage", "max_depth", "head_in_index", "problem_type",
    "output_attentions", "output_hidden_states", "return_dict",
]


def test_to_dict_writes_the_recorded_keys_in_order():
    assert list(PvtV2Config().to_dict()) == ALWAYS_WRITTEN
    assert list(PvtV2Config(**EVERYTHING, my_field=1).to_dict()) == ALWAYS_WRITTEN + WRITTEN_WHEN_SET + ["my_field"]
    # a field set back to its default is not written (output flags), or written when set (explicit heads)
    assert list(PvtV2Config(return_dict=True, max_depth=10.0).to_dict()) == ALWAYS_WRITTEN + ["max_depth"]


@pytest.mark.parametrize("name", TABLE)
def test_every_field_refuses_bad_values_naming_the_field(name):
    assert BAD_VALUES.get(name), f"no bad values listed for the field {name!r}"
    for value in BAD_VALUES[name]:
        with pytest.raises(ValueError, match=rf"\b{re.escape(name)}\b"):
            PvtV2Config(**{name: value})


@pytest.mark.parametrize("name", TABLE)
def test_every_field_survives_to_dict_and_from_dict(name):
    value, held = GOOD_VALUES[name]
    config = PvtV2Config(**COMPANIONS.get(name, {}), **{name: value})
    default = PvtV2Config()
    assert getattr(config, name) == held != getattr(default, name)
    through_dict = PvtV2Config.from_dict(config.to_dict())
    through_json = PvtV2Config.from_dict(json.loads(config.to_json_string()))
    for back in (through_dict, through_json):
        assert getattr(back, name) == held
        assert back == config
    assert through_dict != default


def test_everything_config_moves_every_field():
    ours, default = PvtV2Config(**EVERYTHING), PvtV2Config()
    assert [name for name in TABLE if getattr(ours, name) == getattr(default, name)] == []


@pytest.mark.parametrize("reference", ["PvtV2Config", "SegformerConfig", "GLPNConfig"])
def test_transformers_reads_every_field_it_defines_with_our_value(reference):
    cls = getattr(transformers, reference)
    ours = PvtV2Config(**EVERYTHING)
    theirs = cls(**ours.to_dict())
    shared = [name for name in TABLE if hasattr(cls(), name)]
    expected = {
        "PvtV2Config": set(DOCUMENTED_FIELDS) | {"num_labels", "id2label", "label2id", "problem_type"},
        "SegformerConfig": {"hidden_sizes", "decoder_hidden_size", "classifier_dropout_prob", "semantic_loss_ignore_index",
                            "reshape_last_stage", "num_labels", "id2label"},
        "GLPNConfig": {"hidden_sizes", "decoder_hidden_size", "max_depth", "head_in_index"},
    }[reference]
    assert expected <= set(shared)
    for name in shared:
        assert _plain(getattr(theirs, name)) == _plain(getattr(ours, name)), name


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_transformers_config_of_a_preset_reads_back_equal(name):
    theirs = transformers.PvtV2Config(**PRESETS[name], id2label=imagenet_id2label())
    assert PvtV2Config(**theirs.to_dict()) == PvtV2Config.from_preset(name)
    assert PvtV2Config.from_dict(json.loads(theirs.to_json_string(use_diff=False))) == PvtV2Config.from_preset(name)


def test_unknown_keys_may_not_hide_the_configs_own_names(caplog):
    assert PvtV2Config(my_field=1).to_dict()["my_field"] == 1
    caplog.clear()
    for name in ("to_dict", "patch_norm_eps", "stage_strides"):
        with pytest.raises(ValueError, match=name):
            PvtV2Config(**{name: 1})
    assert "kept as an attribute" not in caplog.text  # refused, not kept


# ---------------------------------------------------------------------------------------------- labels, once
NAMES = {0: "a", 1: "b", 2: "c"}
# changes -> the id2label every path must give, starting from three named classes
LABEL_CHANGES = [
    (dict(num_labels=3), NAMES),  # the count does not change: the names stay
    (dict(num_labels=4), {i: f"LABEL_{i}" for i in range(4)}),  # it changes: generic names
    (dict(id2label={0: "x", 1: "y"}), {0: "x", 1: "y"}),  # new names replace the old ones and their label2id
    (dict(id2label={0: "x"}, label2id={"x": 0}, num_labels=1), {0: "x"}),
]


def _canonical_classifier(num_labels: int) -> dict[str, torch.Tensor]:
    """A classifier checkpoint of TINY in the canonical layout (on meta: infer_config reads shapes only)."""
    with torch.device("meta"):
        model = pvtv2.PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=num_labels))
    return {k.removeprefix(model.encoder_prefix): v for k, v in model.state_dict().items()}


LABEL_PATHS = {
    "replace": lambda **c: PvtV2Config(**TINY, id2label=NAMES).replace(**c),
    "from_dict": lambda **c: PvtV2Config.from_dict(PvtV2Config(**TINY, id2label=NAMES).to_dict(), **c),
    "from_pretrained": lambda **c: PvtV2Config.from_pretrained(
        PvtV2Config(**TINY, id2label=NAMES).save_pretrained(c.pop("tmp_path")), **c
    ),
    "segformer config.json": lambda **c: dense_config_from_dict(
        {"model_type": "segformer", "id2label": {str(k): v for k, v in NAMES.items()},
         "label2id": {v: k for k, v in NAMES.items()}}, **c
    ),
}


@pytest.mark.parametrize("path", sorted(LABEL_PATHS))
@pytest.mark.parametrize("changes, expected", LABEL_CHANGES)
def test_label_changes_follow_one_rule_everywhere(path, changes, expected, tmp_path):
    extra = {"tmp_path": tmp_path} if path == "from_pretrained" else {}
    config = LABEL_PATHS[path](**changes, **extra)
    assert config.id2label == expected
    assert config.label2id == {v: k for k, v in expected.items()}
    assert merge_changes({"id2label": NAMES, "label2id": {}}, changes).get("id2label") == changes.get(
        "id2label", NAMES if changes.get("num_labels") == 3 else None
    )


def test_labels_of_a_checkpoint_without_config():
    canonical = _canonical_classifier(3)
    assert infer_config(canonical, "transformers").id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert infer_config(canonical, "transformers", id2label={0: "x", 1: "y"}).num_labels == 2
    assert infer_config(canonical, "transformers", num_labels=5).num_labels == 5


def test_num_labels_setter_keeps_names_when_the_count_stays():
    config = PvtV2Config(id2label=NAMES)
    config.num_labels = 3
    assert config.id2label == NAMES
    config.num_labels = 2
    assert config.id2label == {0: "LABEL_0", 1: "LABEL_1"} and config.label2id == {"LABEL_0": 0, "LABEL_1": 1}
    with pytest.raises(ValueError, match="num_labels"):
        config.num_labels = -1


def test_imagenet_names_survive_a_same_count_change():
    config = PvtV2Config.from_preset("pvt_v2_b0", num_labels=1000)
    assert config.id2label == imagenet_id2label()
    assert config.replace(num_labels=1000).id2label == imagenet_id2label()
    assert config.replace(num_labels=10).id2label == {i: f"LABEL_{i}" for i in range(10)}


def test_out_features_or_indices_alone_replaces_both():
    config = PvtV2Config(out_features=["stage2", "stage4"])
    assert config.replace(out_indices=[0]).out_features == ["stage1"]
    assert PvtV2Config.from_dict(config.to_dict(), out_features=["stage3"]).out_indices == [2]
    assert PvtV2Config.from_dict({"_out_features": ["stage1", "stage2"]}).out_indices == [0, 1]


# ---------------------------------------------------------------------------------------------- unknown keys
# A misspelt field ({"depth": ...} for depths) used to build the default architecture without a word. Unknown keys are
# still kept (hub configs carry many of transformers' own), but one that nothing knows is named, with the field it
# may mean.
def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("pvtv2")]


def test_a_misspelt_field_is_named_with_the_field_it_may_mean(caplog):
    with caplog.at_level("WARNING"):
        config = PvtV2Config(depth=[1, 1, 1, 1], hiden_sizes=[16, 32, 48, 64], my_custom_field=1)
    assert _warnings(caplog) == [
        "PvtV2Config: unknown fields 'depth' (did you mean 'depths'?), 'hiden_sizes' (did you mean 'hidden_sizes'?), "
        "'my_custom_field'; kept as an attribute, but no part of the model reads it"
    ]
    # Kept, as transformers keeps them; the architecture is the default one, which is why it is said.
    assert config.depth == [1, 1, 1, 1] and config.to_dict()["hiden_sizes"] == [16, 32, 48, 64]
    assert config.depths == [2, 2, 2, 2] and config.hidden_sizes == [32, 64, 160, 256]


def test_copies_do_not_report_the_keys_again(caplog):
    config = PvtV2Config(my_custom_field=1)
    caplog.clear()
    with caplog.at_level("WARNING"):
        copy = config.replace(num_labels=3).with_defaults(decoder_hidden_size=64)
        assert _warnings(caplog) == []
        assert copy.my_custom_field == 1 and copy.num_labels == 3
        config.replace(sr_ratio=[8, 4, 2, 1])  # a new one is
    assert _warnings(caplog) == [
        "PvtV2Config: unknown field 'sr_ratio' (did you mean 'sr_ratios'?); kept as an attribute, but no part of the "
        "model reads it"
    ]


def test_strict_json_file_refuses_an_unknown_field(tmp_path, caplog):
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({"depth": [1, 1, 1, 1], "architectures": ["PvtV2Model"], "torch_dtype": "float32"}))
    with pytest.raises(ValueError) as err:
        PvtV2Config.from_json_file(path, strict=True)
    assert str(err.value) == f"{path}: unknown field 'depth' (did you mean 'depths'?)"
    with caplog.at_level("WARNING"):
        config = PvtV2Config.from_json_file(path)
    assert config.depths == [2, 2, 2, 2] and len(_warnings(caplog)) == 1 and "'depth'" in _warnings(caplog)[0]


def test_timms_argument_names_suggest_the_fields_that_rebuild_timms_model(caplog):
    """A config.json written with timm's constructor arguments: each name that is no field of ours is named with the
    field it means, and those fields, given timm's values, build timm's architecture (its weights load strictly and
    give its logits)."""
    import timm
    from pvtv2 import PvtV2ForImageClassification
    from pvtv2.weights.layouts import to_canonical
    from pvtv2.weights.loading import load_canonical

    timm_args = dict(in_chans=2, num_classes=5, depths=(1, 1, 2, 1), embed_dims=(16, 24, 40, 48),
                     num_heads=(1, 2, 5, 6), sr_ratios=(8, 4, 2, 1), mlp_ratios=(2, 3, 4, 2), linear=True)
    torch.manual_seed(0)
    reference = timm.create_model("pvt_v2_b0", pretrained=False, **timm_args).eval()
    with caplog.at_level("WARNING"):
        PvtV2Config(**timm_args)
    message = _warnings(caplog)[0]
    suggested = dict(re.findall(r"'(\w+)' \(did you mean '(\w+)'\?\)", message))
    renamed = {k for k in timm_args if k not in {f.name for f in FIELDS}}
    assert set(suggested) == renamed == {"in_chans", "num_classes", "embed_dims", "num_heads", "linear"}
    config = PvtV2Config(**{suggested.get(k, k): v for k, v in timm_args.items()})
    ours = PvtV2ForImageClassification(config).eval()
    load_canonical(ours, to_canonical(reference.state_dict()))
    x = torch.randn(2, 2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, reference(x), rtol=1e-4, atol=1e-5)


# What transformers 4.46.3's PretrainedConfig().to_dict() holds (its configuration_utils.py sets these in __init__,
# the generation settings of _get_global_generation_defaults included): the generic keys of a hub config.json written
# by transformers 4.x, recorded here because transformers 5 no longer writes them.
TRANSFORMERS_4_KEYS: dict[str, Any] = dict(
    return_dict=True, output_hidden_states=False, output_attentions=False, torchscript=False, torch_dtype="float32",
    use_bfloat16=False, tf_legacy_loss=False, pruned_heads={}, tie_word_embeddings=True, chunk_size_feed_forward=0,
    is_encoder_decoder=False, is_decoder=False, cross_attention_hidden_size=None, add_cross_attention=False,
    tie_encoder_decoder=False, max_length=20, min_length=0, do_sample=False, early_stopping=False, num_beams=1,
    num_beam_groups=1, diversity_penalty=0.0, temperature=1.0, top_k=50, top_p=1.0, typical_p=1.0,
    repetition_penalty=1.0, length_penalty=1.0, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0,
    bad_words_ids=None, num_return_sequences=1, output_scores=False, return_dict_in_generate=False,
    forced_bos_token_id=None, forced_eos_token_id=None, remove_invalid_values=False,
    exponential_decay_length_penalty=None, suppress_tokens=None, begin_suppress_tokens=None,
    architectures=["PvtV2ForImageClassification"], finetuning_task=None, id2label={"0": "LABEL_0", "1": "LABEL_1"},
    label2id={"LABEL_0": 0, "LABEL_1": 1}, tokenizer_class=None, prefix=None, bos_token_id=None, pad_token_id=None,
    eos_token_id=None, sep_token_id=None, decoder_start_token_id=None, task_specific_params=None, problem_type=None,
    _name_or_path="OpenGVLab/pvt_v2_b0", _attn_implementation_autoset=True, transformers_version="4.46.3",
    model_type="pvt_v2",
)


def _written_configs(tmp_path) -> dict[str, Any]:
    """config.json files as transformers and pvtv2 write them: (folder, the config they hold)."""
    from pvtv2 import PvtV2ForObjectDetection, PvtV2ForSemanticSegmentation

    written = {}
    hf = transformers.PvtV2Config(**TINY, out_indices=[1, 3])
    hf.save_pretrained(tmp_path / "transformers")  # its diff against the defaults
    written["transformers"] = PvtV2Config(**TINY, out_indices=[1, 3])
    full = tmp_path / "transformers_full"
    full.mkdir()
    (full / "config.json").write_text(hf.to_json_string(use_diff=False))  # every key it has
    written["transformers_full"] = written["transformers"]
    old = tmp_path / "transformers_4"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({**TRANSFORMERS_4_KEYS, **json.loads(hf.to_json_string())}))
    written["transformers_4"] = written["transformers"]
    ours = PvtV2Config(**TINY, num_labels=3, patch_embed_layer_norm_eps=1e-5)
    ours.save_pretrained(tmp_path / "pvtv2_config")
    written["pvtv2_config"] = ours
    pvtv2.PvtV2ForImageClassification(ours).save_pretrained(tmp_path / "pvtv2_model")
    written["pvtv2_model"] = ours
    segmenter = PvtV2ForSemanticSegmentation(ours, head="fpn")
    segmenter.save_pretrained(tmp_path / "pvtv2_fpn")
    written["pvtv2_fpn"] = segmenter.config
    for detector in ("retinanet", "mask_rcnn"):
        model = PvtV2ForObjectDetection(PvtV2Config(**TINY, num_labels=3).replace(detector=detector))
        model.save_pretrained(tmp_path / f"pvtv2_{detector}")
        written[f"pvtv2_{detector}"] = model.config
    return written


def _config_warnings(caplog) -> list[str]:
    """The configuration's warnings only (save_pretrained may warn about epsilons transformers ignores)."""
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "pvtv2.models.config"]


def test_configs_that_transformers_and_pvtv2_write_load_without_a_warning(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        written = _written_configs(tmp_path)
        assert _config_warnings(caplog) == []
        for name, expected in written.items():
            # Every field and head setting as written (transformers 4's generic keys come on top, kept)
            for loaded in (PvtV2Config.from_pretrained(tmp_path / name),
                           # and as the architecture of a new run (pvtv2 train --model X.json): unknown keys refused
                           PvtV2Config.from_json_file(tmp_path / name / "config.json", strict=True)):
                have, want = loaded.to_dict(), expected.to_dict()
                assert {k: have.get(k) for k in want} == want, name
    assert _config_warnings(caplog) == []
    # The recorded transformers 4 keys are read as transformers reads them, not silently dropped: kept.
    assert PvtV2Config.from_pretrained(tmp_path / "transformers_4").to_dict()["max_length"] == 20


def test_the_known_keys_cover_transformers_and_the_heads():
    """The lists the warning is decided by, against their sources: what the installed transformers' PretrainedConfig
    writes and takes, and every setting the detector and the segmentation model keep in the config."""
    from pvtv2.models import config as module
    from pvtv2.models.detection import DETECTION_DEFAULTS, DETECTOR_DEFAULTS

    generic = set(transformers.PretrainedConfig().to_dict())
    generic |= set(inspect.signature(transformers.PretrainedConfig.__init__).parameters) - {"self", "kwargs"}
    assert generic - module._TRANSFORMERS_KEYS == set()
    assert set(TRANSFORMERS_4_KEYS) - module._TRANSFORMERS_KEYS == set()
    heads = {"detector", "decode_head_type", *DETECTION_DEFAULTS, *(k for d in DETECTOR_DEFAULTS.values() for k in d)}
    assert heads == set(module._HEAD_KEYS)
    # None of them hides a field: each list is what the table does not hold.
    assert not ({f.name for f in FIELDS} & module._HEAD_KEYS)


def test_numpy_numbers_are_taken_and_stored_as_python_numbers(tmp_path):
    """numpy's ints were refused as "must hold positive numbers". They are taken (timm's and the original code's
    models take them) and stored as Python's int and float: the config equals, and writes the same config.json as,
    the one built from plain numbers. transformers 5 refuses a numpy int in these fields, so it reading the file back
    shows that no numpy type got into it."""
    i64 = np.int64
    plain = PvtV2Config(**TINY, drop_path_rate=0.25, hidden_dropout_prob=0.5, num_labels=3, image_size=64,
                        out_indices=[1, 3], layer_norm_eps=1e-5)
    from_numpy = PvtV2Config(
        **{name: [i64(v) for v in values] if isinstance(values, list) else values for name, values in TINY.items()},
        drop_path_rate=np.float32(0.25),  # exact in float32, so equal to the plain 0.25
        hidden_dropout_prob=np.float64(0.5), num_labels=np.uint8(3), image_size=np.int32(64),
        out_indices=np.array([1, 3]), layer_norm_eps=np.float64(1e-5),
    )
    assert from_numpy == plain
    assert from_numpy.to_json_string() == plain.to_json_string()
    for name, value in from_numpy.to_dict().items():
        for v in value if isinstance(value, list) else [value]:
            assert type(v) in (int, float, str, bool, list, dict, type(None)), (name, type(v))
    from_numpy.save_pretrained(tmp_path)
    theirs = transformers.PvtV2Config.from_pretrained(tmp_path)
    assert list(theirs.depths) == TINY["depths"] and theirs.num_labels == 3
    # id2label keys and label2id values as numpy ints; the mlp ratio as a numpy float
    named = PvtV2Config(id2label={i64(0): "cat", i64(1): "dog"}, label2id={"cat": i64(0), "dog": i64(1)},
                        mlp_ratios=[np.float32(8.0), 8, 4, np.float64(4.5)])
    assert named.id2label == {0: "cat", 1: "dog"} and all(type(k) is int for k in named.id2label)
    assert named.mlp_ratios == [8, 8, 4, 4.5] and [type(r) for r in named.mlp_ratios] == [int, int, int, float]


@pytest.mark.parametrize("kwargs, message", [
    (dict(depths=[True, True, True, True]), "depths must hold non-negative numbers, got [True, True, True, True]"),
    (dict(num_channels=True), "num_channels must be a positive integer, got True"),
    (dict(num_labels=np.bool_(True)), "num_labels must be a non-negative integer, got True"),
    (dict(depths=[torch.tensor(2)] * 4), ("depths must hold non-negative numbers, got [tensor(2), tensor(2), tensor(2), "
                                          "tensor(2)] (a tensor or array: pass plain numbers, e.g. its .tolist()")),
    (dict(depths=torch.tensor([2, 2, 2, 2])), "depths must hold non-negative numbers, got [tensor(2), "),
    (dict(num_channels=torch.tensor(3)), "num_channels must be a positive integer, got tensor(3) (a tensor or array"),
    (dict(image_size=torch.tensor(64)), ("image_size must be an int or a (height, width) pair of positive integers, "
                                         "got tensor(64) (a tensor or array")),  # was "iteration over a 0-d tensor"
])
def test_bools_and_tensors_are_refused_as_numbers(kwargs, message):
    """A bool is a flag, never a count; a tensor is refused with what to do (it may live on a GPU or carry a
    gradient: its value is read once, by the caller, as they mean it)."""
    with pytest.raises(ValueError) as err:
        PvtV2Config(**kwargs)
    assert str(err.value).startswith(message), str(err.value)
    assert ("tensor or array" in str(err.value)) == ("tensor" in message)  # the hint only where it is what helps


def test_numpy_bools_are_flags_and_numpy_numbers_in_head_settings_are_written_as_numbers(tmp_path):
    """qkv_bias=np.False_ was refused as "must be True or False, got np.False_"; numpy's numbers in the settings the
    config keeps without a check (a detector's min_size, score_threshold) stayed numpy's, and writing config.json
    failed with json's "Object of type int64 is not JSON serializable". Both equal the plain config now; a value JSON
    cannot hold is named before any file is written."""
    plain = PvtV2Config(**TINY, qkv_bias=False, linear_attention=True, return_dict=False, min_size=[640, 672],
                        score_threshold=0.5, image_mean=(0.25, 0.5, 0.5))
    from_numpy = PvtV2Config(**TINY, qkv_bias=np.False_, linear_attention=np.bool_(True), return_dict=np.False_,
                             min_size=[np.int64(640), np.int32(672)], score_threshold=np.float32(0.5),
                             image_mean=(np.float64(0.25), 0.5, np.float32(0.5)))
    assert from_numpy == plain and from_numpy.to_json_string() == plain.to_json_string()
    assert from_numpy.qkv_bias is False and type(from_numpy.min_size[0]) is int
    from_numpy.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["min_size"] == [640, 672]
    with pytest.raises(ValueError, match="num_channels must be a positive integer, got True"):
        PvtV2Config(num_channels=np.True_)  # a numpy bool is no number either
    model = pvtv2.PvtV2Model(PvtV2Config(**TINY, anchors=torch.tensor([1.0, 2.0])))
    with pytest.raises(ValueError, match="'anchors' cannot be written to JSON"):
        model.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model" / "model.safetensors").exists()
