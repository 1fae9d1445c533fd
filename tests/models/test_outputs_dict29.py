"""Output objects are dicts, as transformers' ModelOutput (an OrderedDict dataclass) is (round 29).

Until now ours were plain dataclasses that read like a mapping, and the places that look for a ``dict`` left them
alone: ``torch.nn.DataParallel``'s gather rebuilt an output from ``zip(*outputs)`` (it iterated the key names and set
the first field to a ``map`` object, without an error), ``torch.jit.trace(model, x, strict=False)`` refused the
output, and ``out["logits"] = x`` was a TypeError. Each behaviour is checked on ours and on transformers' output of
the same name built from the same tensors: the same result, or the same exception type. Where ours differ on
purpose (transformers lets the attribute and the key drift apart), the test shows transformers' answer too.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import pickle
from collections import OrderedDict

import pytest
import torch
import torch.utils._pytree as pytree

transformers = pytest.importorskip("transformers")
from conftest import TINY, hf_twin, relative_error
from transformers import modeling_outputs as hf

from pvtv2 import PvtV2Config, PvtV2ForImageClassification
from pvtv2.models.depth import DepthEstimatorOutput
from pvtv2.models.outputs import BackboneOutput, BaseModelOutput, ImageClassifierOutput
from pvtv2.models.segmentation import SemanticSegmenterOutput

# Ours and transformers' class of the same name and fields.
TWINS = [
    (BaseModelOutput, hf.BaseModelOutput),
    (ImageClassifierOutput, hf.ImageClassifierOutput),
    (BackboneOutput, hf.BackboneOutput),
    (SemanticSegmenterOutput, hf.SemanticSegmenterOutput),
    (DepthEstimatorOutput, hf.DepthEstimatorOutput),
]
IDS = [ours.__name__ for ours, _ in TWINS]


def _values(cls, skip: tuple[str, ...] = ()) -> dict:
    """A value for each field of ``cls`` but those in ``skip``: a tensor numbered by position, or a tuple of two for
    the fields that hold one map per stage."""
    values = {}
    for i, f in enumerate(dataclasses.fields(cls)):
        if f.name in skip:
            continue
        t = torch.arange(6.0).reshape(2, 3) + 10 * i
        values[f.name] = (t, t + 1) if f.name in ("hidden_states", "attentions", "feature_maps") else t
    return values


def _both(ours_cls, theirs_cls, skip: tuple[str, ...] = ()):
    values = _values(ours_cls, skip)
    assert [f.name for f in dataclasses.fields(ours_cls)] == [f.name for f in dataclasses.fields(theirs_cls)]
    return ours_cls(**values), theirs_cls(**values)


def _raised(call) -> type | None:
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return type(error)
    return None


@pytest.mark.parametrize("ours_cls, theirs_cls", TWINS, ids=IDS)
def test_an_output_is_an_ordered_dict_of_its_set_fields(ours_cls, theirs_cls):
    skip = (dataclasses.fields(ours_cls)[1].name,)
    ours, theirs = _both(ours_cls, theirs_cls, skip)
    assert isinstance(theirs, OrderedDict) and isinstance(ours, OrderedDict) and isinstance(ours, dict)
    assert dataclasses.is_dataclass(ours)
    assert list(ours) == list(theirs) == [f.name for f in dataclasses.fields(ours_cls) if f.name not in skip]
    assert type(ours.keys()) is type(theirs.keys()) and list(ours.keys()) == list(theirs.keys())
    assert len(ours) == len(theirs) == len(dataclasses.fields(ours_cls)) - 1
    assert dict(ours) == dict(theirs) and dict(**ours) == dict(**theirs)
    assert list(ours.items()) == list(theirs.items())
    assert ours.to_tuple() == theirs.to_tuple() == tuple(ours.values())
    assert ours[0] is theirs[0] and ours[-1] is theirs[-1]
    assert ours[1:] == theirs[1:] and type(ours[:2]) is tuple
    assert (skip[0] in ours) == (skip[0] in theirs) is False
    assert ours.get(skip[0], "unset") == theirs.get(skip[0], "unset") == "unset"
    assert repr(ours) == repr(theirs) and repr(ours).startswith(f"{ours_cls.__name__}(")
    assert _raised(lambda: ours[skip[0]]) is _raised(lambda: theirs[skip[0]]) is KeyError
    assert _raised(lambda: ours[9]) is _raised(lambda: theirs[9]) is IndexError
    assert ours == ours_cls(**dict(ours)) and theirs == theirs_cls(**dict(theirs))
    assert (ours == dict(ours)) is (theirs == dict(theirs)) is True  # the same tensors: compared as dicts
    assert bool(ours_cls()) is bool(theirs_cls()) is False


@pytest.mark.parametrize("ours_cls, theirs_cls", TWINS, ids=IDS)
def test_item_and_attribute_assignment_set_both_views_as_transformers(ours_cls, theirs_cls):
    ours, theirs = _both(ours_cls, theirs_cls)
    first = dataclasses.fields(ours_cls)[0].name
    new = torch.full((2,), 7.0)
    for out in (ours, theirs):
        out[first] = new  # the key, and the attribute with it
    assert ours[first] is ours.__dict__[first] is getattr(ours, first) is new
    assert theirs[first] is getattr(theirs, first) is new
    newer = torch.full((2,), 8.0)
    for out in (ours, theirs):
        setattr(out, first, newer)  # the attribute, and the key with it
    assert ours[first] is ours[0] is newer and theirs[first] is theirs[0] is newer
    assert list(ours) == list(theirs) and ours.to_tuple() == theirs.to_tuple()
    # A non-field attribute is an attribute only, in both.
    ours.note = theirs.note = "x"
    assert "note" not in ours and "note" not in theirs and ours.note == theirs.note == "x"


def test_assignment_of_a_field_that_was_unset_adds_it_to_the_dict():
    logits, loss = torch.ones(2, 3), torch.tensor(0.5)
    ours, theirs = ImageClassifierOutput(logits=logits), hf.ImageClassifierOutput(logits=logits)
    ours["hidden_states"] = theirs["hidden_states"] = (logits,)
    assert list(ours) == list(theirs) == ["logits", "hidden_states"]
    assert ours.hidden_states == theirs.hidden_states == (logits,)
    # A field set before one that is already set: ours keep declaration order, so that to_tuple() is the tuple that
    # return_dict=False gives and ``loss, logits = out.to_tuple()`` reads the right tensors; transformers appends it.
    ours.loss = theirs.loss = loss
    assert list(ours) == ["loss", "logits", "hidden_states"] and ours.to_tuple() == (loss, logits, (logits,))
    assert list(theirs) == ["logits", "hidden_states", "loss"]
    assert ours == ImageClassifierOutput(loss, logits, (logits,))


def test_a_field_set_to_none_leaves_the_dict_where_transformers_keeps_a_stale_key():
    logits, loss = torch.ones(2, 3), torch.tensor(0.5)
    ours, theirs = ImageClassifierOutput(loss=loss, logits=logits), hf.ImageClassifierOutput(loss=loss, logits=logits)
    ours.loss = theirs.loss = None
    assert ours.loss is None and "loss" not in ours and ours.to_tuple() == (logits,)
    assert theirs.loss is None and theirs["loss"] is loss  # transformers: the key still holds the old loss
    ours["logits"] = theirs["logits"] = None
    assert ours.logits is None and len(ours) == 0 and ours == ImageClassifierOutput()
    assert theirs.logits is None and "logits" in theirs and theirs["logits"] is None


def test_a_key_that_is_no_field_is_refused_where_transformers_adds_it():
    logits = torch.ones(2, 3)
    ours, theirs = ImageClassifierOutput(logits=logits), hf.ImageClassifierOutput(logits=logits)
    with pytest.raises(KeyError, match="no field 'logit'.*logits"):
        ours["logit"] = logits
    assert list(ours) == ["logits"] and not hasattr(ours, "logit")
    theirs["logit"] = logits  # transformers: a fifth entry, which to_tuple() and the pytree carry
    assert list(theirs) == ["logits", "logit"]
    with pytest.raises(TypeError, match="field names"):
        ours[0] = logits
    assert _raised(lambda: theirs.__setitem__(0, logits)) is TypeError


@pytest.mark.parametrize("method, args", [
    ("pop", ("logits",)), ("update", ({"loss": torch.tensor(1.0)},)), ("setdefault", ("loss", torch.tensor(1.0))),
    ("__delitem__", ("logits",)),
])
def test_refused_dict_methods_raise_the_exception_transformers_raises(method, args):
    ours, theirs = _both(ImageClassifierOutput, hf.ImageClassifierOutput)
    ours_error = _raised(lambda: getattr(ours, method)(*args))
    assert ours_error is _raised(lambda: getattr(theirs, method)(*args)) is Exception
    with pytest.raises(Exception, match=f"You cannot use ``{method}`` on a ImageClassifierOutput instance"):
        getattr(ours, method)(*args)
    with pytest.raises(Exception, match="You cannot use ``__delitem__``"):
        del ours["logits"]
    assert list(ours) == ["loss", "logits", "hidden_states", "attentions"]


@pytest.mark.parametrize("method, args", [("popitem", ()), ("clear", ()), ("move_to_end", ("loss",))])
def test_methods_that_empty_or_reorder_the_dict_are_refused_as_pop_is(method, args):
    """transformers lets these through: the dict empties or reorders, the attributes stay, and ``out[0]`` moves."""
    ours, theirs = _both(ImageClassifierOutput, hf.ImageClassifierOutput)
    with pytest.raises(Exception, match=f"``{method}``"):
        getattr(ours, method)(*args)
    assert list(ours) == ["loss", "logits", "hidden_states", "attentions"] and ours[0] is ours.loss
    getattr(theirs, method)(*args)
    assert list(theirs) != ["loss", "logits", "hidden_states", "attentions"] and theirs.loss is not None


def test_merge_operators_go_through_the_fields():
    ours, theirs = _both(ImageClassifierOutput, hf.ImageClassifierOutput, skip=("loss",))
    loss = torch.tensor(3.0)
    merged, their_merged = ours | {"loss": loss}, theirs | {"loss": loss}
    assert type(merged) is ImageClassifierOutput and type(their_merged) is hf.ImageClassifierOutput
    assert merged.loss is their_merged.loss is loss and merged.logits is ours.logits and ours.loss is None
    ours |= {"loss": loss}
    assert ours.loss is ours["loss"] is ours[0] is loss
    with pytest.raises(KeyError, match="no field 'lost'"):
        ours |= {"lost": loss}


@pytest.mark.parametrize("ours_cls, theirs_cls", TWINS, ids=IDS)
def test_copies_and_pickles_are_rebuilt_from_the_fields(ours_cls, theirs_cls):
    ours, theirs = _both(ours_cls, theirs_cls, skip=(dataclasses.fields(ours_cls)[0].name,))
    for out in (ours, theirs):
        shallow = copy.copy(out)
        assert type(shallow) is type(out) and list(shallow) == list(out)
        assert all(a is b for a, b in zip(shallow.values(), out.values(), strict=True))
        dup = out.copy()
        assert type(dup) is type(out) and list(dup) == list(out) and dup[0] is out[0]
        for deep in (copy.deepcopy(out), pickle.loads(pickle.dumps(out))):
            assert type(deep) is type(out) and list(deep) == list(out)
            assert deep.__dict__.keys() >= {f.name for f in dataclasses.fields(out)}
            pairs = zip(pytree.tree_leaves(deep.to_tuple()), pytree.tree_leaves(out.to_tuple()), strict=True)
            assert all(a is not b and torch.equal(a, b) for a, b in pairs)
            assert all(getattr(deep, k) is deep[k] for k in deep)
    assert list(copy.deepcopy(ours)) == list(copy.deepcopy(theirs))


def test_a_saved_output_reloads_with_weights_only_once_its_class_is_allowed():
    """Ours pickle as the class and the field values alone, which torch's safe unpickler takes once the class is
    allowed; transformers' also pickle the dict's items, which it refuses even then."""
    ours, theirs = _both(ImageClassifierOutput, hf.ImageClassifierOutput, skip=("attentions",))
    for out in (ours, theirs):
        buffer = io.BytesIO()
        torch.save(out, buffer)
        buffer.seek(0)
        # Not allowed: refused without running anything, as for any class.
        with pytest.raises(pickle.UnpicklingError, match=type(out).__name__):
            torch.load(buffer, weights_only=True)
        buffer.seek(0)
        with torch.serialization.safe_globals([type(out)]):
            if out is theirs:
                with pytest.raises(pickle.UnpicklingError, match="Can only SETITEMS for dict"):
                    torch.load(buffer, weights_only=True)
                continue
            loaded = torch.load(buffer, weights_only=True)
        assert type(loaded) is type(out) and list(loaded) == ["loss", "logits", "hidden_states"]
        assert torch.equal(loaded.logits, out.logits) and loaded.attentions is None
        assert torch.equal(loaded["hidden_states"][1], out.hidden_states[1]) and loaded.logits is loaded[1]


def test_built_from_name_value_pairs_as_transformers():
    """What DataParallel's gather (a generator of pairs), OrderedDict.copy and ``|`` (the output itself) pass."""
    loss, logits = torch.tensor(1.0), torch.ones(2, 3)
    for make in (lambda: iter([("loss", loss), ("logits", logits)]), lambda: {"loss": loss, "logits": logits},
                 lambda: [("loss", loss), ("logits", logits)], lambda: ImageClassifierOutput(loss, logits)):
        ours, theirs = ImageClassifierOutput(make()), hf.ImageClassifierOutput(make())
        assert list(ours) == list(theirs) == ["loss", "logits"]
        assert ours.loss is theirs.loss is loss and ours.logits is theirs.logits is logits
    empty = (x for x in ())
    assert len(ImageClassifierOutput(empty)) == len(hf.ImageClassifierOutput(x for x in ())) == 0
    # A pair after the first that is no pair: a ValueError in both.
    mixed = [("loss", loss), logits]
    assert _raised(lambda: ImageClassifierOutput(iter(mixed))) is ValueError
    assert _raised(lambda: hf.ImageClassifierOutput(iter(mixed))) is ValueError
    # A tuple of maps (not pairs) is the first field's value, in both.
    maps = (logits, logits + 1)
    assert BackboneOutput(maps).feature_maps is hf.BackboneOutput(maps).feature_maps is maps


def test_pairs_that_do_not_fit_are_errors_where_transformers_guesses():
    logits = torch.ones(2, 3)
    # A name that is no field: transformers adds an entry; ours name the field.
    with pytest.raises(TypeError, match="no field 'logit'"):
        ImageClassifierOutput(iter([("logit", logits)]))
    assert list(hf.ImageClassifierOutput(iter([("logit", logits)]))) == ["logit"]
    # A generator whose first item is no pair: transformers keeps the half-read generator as the loss.
    with pytest.raises(ValueError, match="not a pair"):
        ImageClassifierOutput(t for t in (logits,))
    assert not isinstance(hf.ImageClassifierOutput(t for t in (logits,)).loss, torch.Tensor)
    # An empty tuple of maps stays one (a pickled output comes back as it was); transformers makes it None.
    assert BackboneOutput(()).feature_maps == () and "feature_maps" in BackboneOutput(())
    assert hf.BackboneOutput(()).feature_maps is None


def _gather_on_cpu(monkeypatch):
    """DataParallel's gather with its one CUDA-only step, the tensor gather (Gather.apply), done by torch.cat."""
    from torch.nn.parallel import scatter_gather

    class CatGather:
        @staticmethod
        def apply(target_device, dim, *tensors):
            return torch.cat(tensors, dim)

    monkeypatch.setattr(scatter_gather, "Gather", CatGather)
    return scatter_gather.gather


@pytest.mark.parametrize("ours_cls, theirs_cls", TWINS, ids=IDS)
def test_data_parallel_gather_rebuilds_the_output(monkeypatch, ours_cls, theirs_cls):
    gather = _gather_on_cpu(monkeypatch)
    skip = (dataclasses.fields(ours_cls)[-1].name,)
    replicas = [_both(ours_cls, theirs_cls, skip) for _ in range(2)]
    for replica, (ours, theirs) in enumerate(replicas):
        for out in (ours, theirs):
            for name in out:
                out[name] = tuple(t + 100 * replica for t in out[name]) if isinstance(out[name], tuple) \
                    else out[name] + 100 * replica
    ours = gather([pair[0] for pair in replicas], "cpu")
    theirs = gather([pair[1] for pair in replicas], "cpu")
    assert type(ours) is ours_cls and type(theirs) is theirs_cls
    assert list(ours) == list(theirs) == [f.name for f in dataclasses.fields(ours_cls)][:-1]
    flat_ours, flat_theirs = pytree.tree_leaves(ours.to_tuple()), pytree.tree_leaves(theirs.to_tuple())
    assert len(flat_ours) == len(flat_theirs) >= 3
    for a, b in zip(flat_ours, flat_theirs, strict=True):
        assert a.shape[0] == 4 and torch.equal(a, b)  # both replicas' batches, the second shifted by 100
        assert torch.equal(a[2:] - a[:2], torch.full_like(a[:2], 100.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA gather needs a GPU")
def test_data_parallel_gather_on_a_gpu():
    from torch.nn.parallel.scatter_gather import gather

    logits = torch.arange(6.0).reshape(2, 3)
    replicas = [ImageClassifierOutput(logits=(logits + i).cuda(), hidden_states=((logits * i).cuda(),)) for i in (0, 1)]
    theirs = [hf.ImageClassifierOutput(**dict(out)) for out in replicas]
    got, want = gather(replicas, 0), gather(theirs, 0)
    assert type(got) is ImageClassifierOutput and list(got) == list(want) == ["logits", "hidden_states"]
    assert torch.equal(got.logits, want.logits) and torch.equal(got.logits.cpu(), torch.cat([logits, logits + 1]))
    assert torch.equal(got["hidden_states"][0], want.hidden_states[0])


def _classifier_pair():
    torch.manual_seed(0)
    ours = PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=3)).eval()
    return ours, hf_twin(ours).eval()


# The tracer warns that shape checks become constants (in both), and that it is deprecated.
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_jit_trace_with_strict_false_returns_the_output_as_a_dict_as_transformers():
    ours, theirs = _classifier_pair()
    x, other = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        traced, their_traced = torch.jit.trace(ours, x, strict=False), torch.jit.trace(theirs, x, strict=False)
        got, want = traced(other), their_traced(other)
        eager = ours(other)
    assert type(got) is type(want) is dict and list(got) == list(want) == ["logits"]
    assert relative_error(eager.logits, got["logits"]) < 1e-5 and relative_error(want["logits"], got["logits"]) < 1e-4
    # strict (the default) refuses a dict output, as it refuses transformers'.
    with torch.no_grad(), pytest.raises(RuntimeError, match="dict"):
        torch.jit.trace(ours, x)


@pytest.mark.parametrize("ours_cls, theirs_cls", TWINS, ids=IDS)
def test_pytree_flattens_the_set_fields_and_rebuilds_the_output(ours_cls, theirs_cls):
    skip = (dataclasses.fields(ours_cls)[0].name, dataclasses.fields(ours_cls)[2].name)
    ours, theirs = _both(ours_cls, theirs_cls, skip)
    leaves, spec = pytree.tree_flatten(ours)
    their_leaves, _ = pytree.tree_flatten(theirs)
    assert len(leaves) == len(their_leaves) >= 2 and all(a is b for a, b in zip(leaves, their_leaves, strict=True))
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert type(rebuilt) is ours_cls and list(rebuilt) == list(ours) and rebuilt == ours
    assert all(getattr(rebuilt, name) is None for name in skip)
    doubled = pytree.tree_map(lambda t: t * 2, ours)
    assert type(doubled) is ours_cls and list(doubled) == list(ours)
    doubled_leaves = pytree.tree_leaves(doubled)
    assert all(torch.equal(a, b * 2) for a, b in zip(doubled_leaves, leaves, strict=True))
    assert all(getattr(doubled, name) is doubled[name] for name in doubled)
    # The spec serializes (torch.export saves it) and comes back the same.
    assert pytree.treespec_loads(pytree.treespec_dumps(spec)) == spec


def test_compiled_model_returns_the_output_class():
    ours, _ = _classifier_pair()
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(ours, fullgraph=True, dynamic=False, backend="eager")
        with torch.no_grad():
            got = compiled(x, labels=torch.tensor([0, 2]), output_hidden_states=True)
            want = ours(x, labels=torch.tensor([0, 2]), output_hidden_states=True)
    finally:
        torch._dynamo.reset()
    assert type(got) is ImageClassifierOutput and list(got) == list(want) == ["loss", "logits", "hidden_states"]
    assert relative_error(want.logits, got["logits"]) < 1e-5 and relative_error(want.loss, got[0]) < 1e-5
    assert got.hidden_states is got["hidden_states"] and len(got.hidden_states) == len(want.hidden_states)


def test_compiled_backbone_returns_its_maps_as_the_first_field():
    """The backbone's first field is a tuple of maps, the one case where the constructor looks for pairs."""
    from pvtv2 import PvtV2Backbone

    torch.manual_seed(0)
    backbone = PvtV2Backbone(PvtV2Config(**TINY, out_features=["stage2", "stage4"])).eval()
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            got = torch.compile(backbone, fullgraph=True, dynamic=False, backend="eager")(x)
            want = backbone(x)
    finally:
        torch._dynamo.reset()
    assert type(got) is BackboneOutput and list(got) == list(want) == ["feature_maps"]
    assert got.feature_maps is got[0] and len(got.feature_maps) == len(want.feature_maps) == 2
    assert all(relative_error(a, b) < 1e-5 for a, b in zip(want.feature_maps, got["feature_maps"], strict=True))


def test_dataclass_helpers_keep_the_two_views_equal():
    ours, theirs = _both(ImageClassifierOutput, hf.ImageClassifierOutput, skip=("loss",))
    loss = torch.tensor(2.0)
    replaced, their_replaced = dataclasses.replace(ours, loss=loss), dataclasses.replace(theirs, loss=loss)
    assert list(replaced) == list(their_replaced) == ["loss", "logits", "hidden_states", "attentions"]
    assert replaced[0] is replaced.loss is loss and ours.loss is None
    dropped = dataclasses.replace(ours, hidden_states=None)
    assert list(dropped) == list(dataclasses.replace(theirs, hidden_states=None)) == ["logits", "attentions"]
    assert dataclasses.astuple(replaced)[0] is not None and dataclasses.asdict(ours).keys() == theirs.__dict__.keys()


def test_an_output_class_must_be_a_dataclass_as_transformers():
    from pvtv2.models.outputs import ModelOutput, exportable

    class Loose(ModelOutput):
        logits: torch.Tensor | None = None

    class TheirLoose(transformers.utils.ModelOutput):
        logits: torch.Tensor | None = None

    logits = torch.ones(1)
    assert _raised(lambda: Loose(logits=logits)) is _raised(lambda: TheirLoose(logits=logits)) is TypeError
    with pytest.raises(TypeError, match="Loose is not a dataclass"):
        Loose()
    with pytest.raises(TypeError, match="Loose must be a dataclass"):
        exportable(Loose)
