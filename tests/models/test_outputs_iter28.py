"""Output objects behave as transformers' ModelOutput (an OrderedDict) under every mapping and sequence operation
(round 28): iterating, ``list``, ``tuple``, unpacking and ``reversed`` give the keys (ours gave the values), ``len``
counts the set fields, ``out[0]`` and ``to_tuple()`` hold the values, ``dict(out)`` and ``**out`` map names to values.
Each operation is run on a transformers PvtV2 output and on ours from the same weights and inputs."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import TINY, hf_twin

from pvtv2 import PvtV2Config, PvtV2ForImageClassification
from pvtv2.models.outputs import BackboneOutput, BaseModelOutput, ImageClassifierOutput


def _pair(labels: bool, hidden: bool):
    torch.manual_seed(0)
    ours = PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=3)).eval()
    theirs = hf_twin(ours).eval()
    x = torch.randn(2, 3, 32, 32)
    kwargs = {"output_hidden_states": hidden}
    if labels:
        kwargs["labels"] = torch.tensor([0, 2])
    with torch.no_grad():
        return ours(x, **kwargs), theirs(x, **kwargs)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    return type(a) is type(b) and len(a) == len(b)  # hidden states: tuples of as many maps (their layouts differ)


def _keywords(**kwargs):
    return list(kwargs)


@pytest.mark.parametrize("labels, hidden", [(False, False), (True, False), (True, True), (False, True)])
def test_operations_match_transformers(labels, hidden):
    ours, theirs = _pair(labels, hidden)
    assert isinstance(theirs, transformers.utils.ModelOutput)
    assert list(ours) == list(theirs)
    assert tuple(ours) == tuple(theirs)
    assert [k for k in ours] == [k for k in theirs]
    assert list(reversed(ours)) == list(reversed(theirs))
    assert len(ours) == len(theirs) == 1 + labels + hidden
    assert all(isinstance(k, str) for k in ours)
    assert _same(ours[0], theirs[0]) and _same(ours[-1], theirs[-1])
    assert [_same(a, b) for a, b in zip(ours.to_tuple(), theirs.to_tuple(), strict=True)] == [True] * len(theirs)
    assert list(dict(ours)) == list(dict(theirs))
    assert all(_same(dict(ours)[k], dict(theirs)[k]) for k in theirs)
    assert _keywords(**ours) == _keywords(**theirs)
    assert list(ours.keys()) == list(theirs.keys())
    assert [k for k, _ in ours.items()] == [k for k, _ in theirs.items()]
    assert ("loss" in ours) == ("loss" in theirs) == labels
    assert ("logits" in ours) and ("hidden_states" in ours) == hidden
    assert [_same(a, b) for a, b in zip(ours.values(), theirs.values(), strict=True)] == [True] * len(theirs)
    assert _same(ours["logits"], theirs["logits"])
    assert ours.get("loss", 7) is not None if labels else ours.get("loss", 7) == theirs.get("loss", 7) == 7
    first, *rest = ours
    their_first, *their_rest = theirs
    assert (first, rest) == (their_first, their_rest) and [*ours] == [*theirs]
    if len(theirs) == 2:
        a, b = ours
        c, d = theirs
        assert (a, b) == (c, d) == ("loss" if labels else "logits", "logits" if labels else "hidden_states")
    assert _same(ours[0:1][0], theirs[0:1][0]) and type(ours[0:1]) is type(theirs[0:1]) is tuple
    with pytest.raises(KeyError):
        ours["attentions"]
    with pytest.raises(KeyError):
        theirs["attentions"]
    with pytest.raises(IndexError):
        ours[5]
    with pytest.raises(IndexError):
        theirs[5]


@pytest.mark.parametrize("cls, theirs_cls, fields", [
    (BaseModelOutput, transformers.modeling_outputs.BaseModelOutput, ("last_hidden_state", "attentions")),
    (ImageClassifierOutput, transformers.modeling_outputs.ImageClassifierOutput, ("loss", "hidden_states")),
    (BackboneOutput, transformers.modeling_outputs.BackboneOutput, ("feature_maps",)),
])
def test_each_output_class_iterates_as_its_transformers_twin(cls, theirs_cls, fields):
    values = {name: torch.full((1,), float(i)) for i, name in enumerate(fields)}
    ours, theirs = cls(**values), theirs_cls(**values)
    assert list(ours) == list(theirs) == list(fields)
    assert tuple(ours) == tuple(theirs)
    assert len(ours) == len(theirs)
    assert dict(ours) == dict(theirs)
    assert _keywords(**ours) == _keywords(**theirs)
    assert [v.item() for v in ours.to_tuple()] == [v.item() for v in theirs.to_tuple()] == list(range(len(fields)))
    assert ours[0].item() == theirs[0].item() == 0.0
    assert bool(cls()) == bool(theirs_cls()) is False
