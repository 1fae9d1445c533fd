"""Conformance with the PVTv2 model documentation, checked against transformers' own behaviour with the same weights:
what the documented API does beyond the numbers (the backbone's out_features / out_indices set after construction,
the outputs read as transformers' ModelOutput is read)."""

from __future__ import annotations

import pytest
import torch
import transformers

from pvtv2 import PvtV2Backbone, PvtV2Config, PvtV2ForImageClassification

from conftest import TINY, hf_config, random_weights_, relative_error

TOL = 1e-5


def backbone_pair(**fields):
    """transformers' backbone with random weights and ours with the same weights and config."""
    config = PvtV2Config(**TINY, **fields)
    theirs = random_weights_(transformers.PvtV2Backbone(hf_config(config)), seed=3).eval()
    ours = PvtV2Backbone(config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize(
    "attribute, value, features, indices",
    [
        ("out_features", ["stage2"], ["stage2"], [1]),
        ("out_features", ["stage1", "stage3"], ["stage1", "stage3"], [0, 2]),
        ("out_indices", [0, 2], ["stage1", "stage3"], [0, 2]),
        ("out_indices", [-2], ["stage3"], [-2]),
    ],
)
@pytest.mark.parametrize("on", ["config", "backbone"])
def test_outputs_set_after_construction_follow_transformers(attribute, value, features, indices, on):
    """transformers keeps out_features and out_indices in step when either is set on the config (or on the backbone,
    which sets its config's). Ours kept the other one as it was: the backbone named the new stages but returned the
    old ones' maps (stage4's 64 channels for out_features=["stage2"])."""
    ours, theirs = backbone_pair()
    for model in (ours, theirs):
        setattr(model.config if on == "config" else model, attribute, value)
    assert theirs.config.out_features == features and theirs.config.out_indices == indices  # the reference
    assert ours.config.out_features == features and ours.config.out_indices == indices
    assert ours.out_features == theirs.out_features == features
    assert ours.channels == theirs.channels
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        expected, got = theirs(x).feature_maps, ours(x).feature_maps
    assert len(got) == len(expected) == len(features)
    for a, b in zip(expected, got):
        assert relative_error(a, b) < TOL


@pytest.mark.parametrize("attribute, value", [("out_features", ["stage9"]), ("out_features", ["stage3", "stage1"]),
                                              ("out_indices", [4]), ("out_indices", [2, 2]), ("out_features", "stage1")])
def test_bad_outputs_set_after_construction_are_refused(attribute, value):
    """transformers refuses these when set on the config; ours took them and failed later, or not at all."""
    theirs = transformers.PvtV2Config(**TINY)
    with pytest.raises(Exception):  # noqa: B017  # a ValueError, or huggingface_hub's strict-dataclass error
        setattr(theirs, attribute, value)
    config = PvtV2Config(**TINY)
    with pytest.raises(ValueError, match=attribute):
        setattr(config, attribute, value)
    assert config.out_features == ["stage4"] and config.out_indices == [3]  # unchanged


def test_out_feature_channels_as_transformers():
    ours, theirs = backbone_pair(out_features=["stage2", "stage4"])
    assert ours.out_feature_channels == theirs.out_feature_channels == {
        "stage1": 16, "stage2": 32, "stage3": 48, "stage4": 64
    }


def classifier_pair(**fields):
    config = PvtV2Config(**TINY, **fields)
    theirs = random_weights_(transformers.PvtV2ForImageClassification(hf_config(config)), seed=4).eval()
    ours = PvtV2ForImageClassification(config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("kwargs", [{}, dict(labels=torch.tensor([1, 0])), dict(output_hidden_states=True)])
def test_outputs_read_as_a_mapping_as_transformers(kwargs):
    """The documented outputs are transformers' ModelOutput, which is also a mapping: ``"loss" in out`` (as training
    loops test it), ``out.items()``, ``out.values()``, ``out.get("loss")``. Ours answered ``"logits" in out`` with
    False (the test compared the name with each tensor) and had no items, values or get."""
    ours, theirs = classifier_pair(num_labels=3)
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        expected, got = theirs(x, **kwargs), ours(x, **kwargs)
    for name in ("loss", "logits", "hidden_states", "attentions", "pixel_values"):
        assert (name in got) == (name in expected), name
    assert list(got.keys()) == list(expected.keys())
    assert [k for k, _ in got.items()] == list(expected.keys())
    for (_, a), b in zip(expected.items(), got.values()):
        if isinstance(a, torch.Tensor):
            assert relative_error(a, b) < TOL
        else:
            assert len(a) == len(b) and all(relative_error(u, v) < TOL for u, v in zip(a, b))
    assert (got.get("loss") is None) == (expected.get("loss") is None)
    assert got.get("attentions", "absent") == expected.get("attentions", "absent") == "absent"
    assert relative_error(expected.get("logits"), got.get("logits")) < TOL


@pytest.mark.parametrize("fields", [dict(out_features=[]), dict(out_indices=[])])
def test_backbone_without_outputs_is_a_clear_error(fields):
    """transformers' config takes an empty out_features, and its backbone then returns feature_maps=None (no maps,
    not even an empty tuple: code that iterates them fails later, far from the cause). Ours failed with "max() arg is
    an empty sequence"; now a ValueError that names out_features, at the call."""
    ours, theirs = backbone_pair(**fields)
    assert ours.out_features == theirs.out_features == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert theirs(x).feature_maps is None
    with pytest.raises(ValueError, match="out_features"):
        ours(x)


def test_single_label_classification_with_one_label_is_refused_as_transformers():
    """Cross-entropy over one class is 0 whatever the logits: a model trained on it learns nothing, without a word.
    transformers' config refuses the pair; ours took it, and the loss was 0.0."""
    with pytest.raises(ValueError, match="num_labels"):
        transformers.PvtV2Config(**TINY, num_labels=1, problem_type="single_label_classification")
    with pytest.raises(ValueError, match="single_label_classification"):
        PvtV2Config(**TINY, num_labels=1, problem_type="single_label_classification")
    with pytest.raises(ValueError, match="single_label_classification"):
        PvtV2Config.from_dict(dict(TINY, id2label={"0": "only"}, problem_type="single_label_classification"))
    # set after construction (transformers does not check then): the loss refuses rather than return 0
    ours, _ = classifier_pair(num_labels=1)
    ours.config.problem_type = "single_label_classification"
    with pytest.raises(ValueError, match="single_label_classification"):
        ours(torch.randn(2, 3, 48, 48), labels=torch.tensor([0, 0]))
    # the other problem types with one label are transformers' and ours alike
    for problem, labels in (("regression", torch.randn(2)), ("multi_label_classification", torch.rand(2, 1))):
        ours, theirs = classifier_pair(num_labels=1, problem_type=problem)
        x = torch.randn(2, 3, 48, 48)
        with torch.no_grad():
            assert relative_error(theirs(x, labels=labels).loss, ours(x, labels=labels).loss) < TOL


@pytest.mark.parametrize("problem", ["regresion", "multi_label", "single_label"])
def test_an_unknown_problem_type_set_later_is_refused_by_the_loss(problem):
    """The config checks problem_type when built; one set afterwards (a typo) went unchecked, and the loss took any
    name it did not know for multi-label BCE: regression targets of the logits' shape were scored with BCE, without
    a word. transformers raises "Invalid problem type"."""
    ours, theirs = classifier_pair(num_labels=3)
    x, labels = torch.randn(2, 3, 48, 48), torch.rand(2, 3)
    theirs.config.problem_type = problem
    with pytest.raises(Exception, match="(?i)problem type"):  # noqa: B017  # transformers' RuntimeError
        theirs(x, labels=labels)
    ours.config.problem_type = problem
    with pytest.raises(ValueError, match=problem):
        ours(x, labels=labels)
