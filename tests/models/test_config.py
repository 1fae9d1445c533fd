"""PvtV2Config: fields and defaults against transformers', validation, presets, config.json in and out."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import pvtv2
from pvtv2 import PvtV2Config

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


def test_new_class_names_replace_the_old_label2id(tmp_path):
    """``from_pretrained(folder, id2label=...)`` (a new head) and ``replace(id2label=...)``: the file's label2id belonged
    to the old names and must not be checked against the new ones."""
    config = PvtV2Config(num_labels=5)
    config.save_pretrained(tmp_path)
    names = {0: "background", 1: "cat"}
    for new in (PvtV2Config.from_pretrained(tmp_path / "config.json", id2label=names), config.replace(id2label=names)):
        assert new.id2label == names and new.label2id == {"background": 0, "cat": 1}
