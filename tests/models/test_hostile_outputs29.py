"""Model outputs as OrderedDict dataclasses (round 29), consumed as a hostile user would: exported programs saved
before the change and loaded after it, torch.export with dynamic shapes saved and loaded, torch.compile fullgraph of
every model kind with labels, DistributedDataParallel's output handling, weights_only reloads of a real model's
output, deep copies, ``==``, outputs with every field None. Each check is against something the change does not
decide: treespecs recorded from the code before it, the eager model, transformers' output of the same name."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.utils._pytree as pytree
from conftest import MODEL_KINDS, TINY_SHALLOW, perturb_, relative_error

from pvtv2 import PvtV2Config
from pvtv2.models.depth import DepthEstimatorOutput
from pvtv2.models.outputs import BackboneOutput, BaseModelOutput, ImageClassifierOutput
from pvtv2.models.segmentation import SemanticSegmenterOutput

transformers = pytest.importorskip("transformers")
from transformers import modeling_outputs as hf  # noqa: E402

CLASSES = {c.__name__: c for c in (BaseModelOutput, ImageClassifierOutput, BackboneOutput, SemanticSegmenterOutput,
                                   DepthEstimatorOutput)}


def _leaf() -> dict:
    return {"type": None, "context": None, "children_spec": []}


def _old_spec(name: str, set_fields: list[str], unset: list[str], children: list[dict]) -> str:
    """A treespec as ``torch.utils._pytree.treespec_dumps`` wrote it for an output under the code before round 29
    (plain dataclasses, registered as ``pvtv2.<class>``): recorded from that code (git 8e0bdaf^)."""
    import json

    node = {"type": f"pvtv2.{name}", "context": json.dumps([set_fields, unset]), "children_spec": children}
    return json.dumps([1, node])


_TUPLE2 = {"type": "builtins.tuple", "context": "null", "children_spec": [_leaf(), _leaf()]}
OLD_SPECS = {
    "ImageClassifierOutput": _old_spec("ImageClassifierOutput", ["loss", "logits", "hidden_states"], ["attentions"],
                                       [_leaf(), _leaf(), _TUPLE2]),
    "BackboneOutput": _old_spec("BackboneOutput", ["feature_maps"], ["hidden_states", "attentions"], [_TUPLE2]),
    "BaseModelOutput": _old_spec("BaseModelOutput", ["last_hidden_state"], ["hidden_states", "attentions"], [_leaf()]),
    "SemanticSegmenterOutput": _old_spec("SemanticSegmenterOutput", ["logits"], ["loss", "hidden_states",
                                                                                  "attentions"], [_leaf()]),
    "DepthEstimatorOutput": _old_spec("DepthEstimatorOutput", ["predicted_depth"], ["loss", "hidden_states",
                                                                                   "attentions"], [_leaf()]),
}
# A line of the recorded text, verbatim, so that the helper above cannot drift from what the old code wrote.
RECORDED_CLASSIFIER = (
    '[1, {"type": "pvtv2.ImageClassifierOutput", "context": "[[\\"logits\\"], [\\"loss\\", \\"hidden_states\\", '
    '\\"attentions\\"]]", "children_spec": [{"type": null, "context": null, "children_spec": []}]}]')


# ---------------------------------------------------------------------------------------------- torch.export
@pytest.mark.parametrize("name", list(OLD_SPECS))
def test_a_treespec_written_before_the_change_loads_and_rebuilds_the_output(name):
    """An ExportedProgram saved before round 29 holds its output treespec as this text: the serialized type name
    and the context (set fields, unset fields) are unchanged, so the program still loads and returns the class."""
    spec = pytree.treespec_loads(OLD_SPECS[name])
    leaves = [torch.full((1,), float(i)) for i in range(spec.num_leaves)]
    out = pytree.tree_unflatten(leaves, spec)
    assert type(out) is CLASSES[name]
    flat = [t for v in out.values() for t in (v if isinstance(v, tuple) else (v,))]
    assert [t.item() for t in flat] == list(range(spec.num_leaves))
    # And today's flatten writes the same text for the same fields.
    assert pytree.treespec_dumps(pytree.tree_flatten(out)[1]) == OLD_SPECS[name]
    assert _old_spec("ImageClassifierOutput", ["logits"], ["loss", "hidden_states", "attentions"],
                     [_leaf()]) == RECORDED_CLASSIFIER


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_export_with_a_dynamic_batch_saved_and_loaded_returns_the_eager_output(kind, tmp_path):
    config = PvtV2Config(**TINY_SHALLOW, num_labels=3, out_features=["stage2", "stage4"])
    torch.manual_seed(0)
    model = perturb_(MODEL_KINDS[kind](config), scale=0.1).eval()
    batch = torch.export.Dim("batch", min=1, max=8)
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: batch},))
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    x = torch.randn(3, 3, 64, 64)  # another batch than the example's
    with torch.no_grad():
        want = model(x)
        got = loaded.module()(x)
    assert type(got) is type(want) and list(got.keys()) == list(want.keys())
    for key in want.keys():
        w, g = want[key], got[key]
        for a, b in zip(w if isinstance(w, tuple) else (w,), g if isinstance(g, tuple) else (g,)):
            assert relative_error(a, b) < 1e-5, key


# ---------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("kind", ["classifier", "segmentation", "depth", "backbone", "encoder"])
def test_compile_fullgraph_of_every_kind_with_labels_returns_the_eager_output(kind):
    config = PvtV2Config(**TINY_SHALLOW, num_labels=3, out_features=["stage2", "stage4"])
    torch.manual_seed(0)
    model = perturb_(MODEL_KINDS[kind](config), scale=0.1).eval()
    x = torch.randn(2, 3, 64, 64)
    labels = {"classifier": torch.tensor([0, 2]), "segmentation": torch.randint(0, 3, (2, 64, 64)),
              "depth": torch.rand(2, 64, 64) + 0.5}.get(kind)
    kwargs = {} if labels is None else {"labels": labels}
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        want = model(x, **kwargs)
        got = compiled(x, **kwargs)
    assert type(got) is type(want) and list(got.keys()) == list(want.keys())
    if labels is not None:
        assert "loss" in got and got.loss.ndim == 0 and torch.allclose(got.loss, want.loss, rtol=1e-5)
        assert list(got.keys())[0] == "loss"  # to_tuple() is (loss, ...), as return_dict=False
    for key in want.keys():
        w, g = want[key], got[key]
        for a, b in zip(w if isinstance(w, tuple) else (w,), g if isinstance(g, tuple) else (g,)):
            assert relative_error(a, b) < 1e-5, key


# ---------------------------------------------------------------------------------------------- DDP
@pytest.mark.parametrize("options", [{"find_unused_parameters": True}, {"static_graph": True}], ids=["unused", "static"])
def test_ddp_that_rebuilds_the_output_returns_it_with_its_loss(tmp_path, options):
    """find_unused_parameters and static_graph make DDP flatten the output with pytree and rebuild it: the class,
    its keys and a loss whose backward reaches the weights, two steps (one CPU process, gloo)."""
    import torch.distributed as dist

    from pvtv2 import PvtV2ForImageClassification

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = PvtV2ForImageClassification(PvtV2Config(**TINY_SHALLOW, num_labels=3))
        plain = copy.deepcopy(model)
        net = torch.nn.parallel.DistributedDataParallel(model, **options)
        for step in range(2):
            x, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
            model.zero_grad(set_to_none=True)
            plain.zero_grad(set_to_none=True)
            out = net(x, labels=labels)
            want = plain(x, labels=labels)
            assert type(out) is ImageClassifierOutput and list(out.keys()) == ["loss", "logits"], step
            out.loss.backward()
            want.loss.backward()
            assert torch.allclose(out.loss, want.loss, rtol=1e-6)
            for (name, p), q in zip(model.named_parameters(), plain.parameters()):
                assert relative_error(q.grad, p.grad) < 1e-5, name
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- pickles, copies
def test_a_model_output_with_maps_reloads_with_weights_only():
    from pvtv2 import PvtV2ForImageClassification

    torch.manual_seed(0)
    model = PvtV2ForImageClassification(PvtV2Config(**TINY_SHALLOW, num_labels=3)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), labels=torch.tensor([1]), output_hidden_states=True,
                    output_attentions=True)
    buffer = io.BytesIO()
    torch.save(out, buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError, match="ImageClassifierOutput"):
        torch.load(buffer, weights_only=True)  # not allowed: refused, naming the class
    buffer.seek(0)
    with torch.serialization.safe_globals([ImageClassifierOutput]):
        back = torch.load(buffer, weights_only=True)
    assert type(back) is ImageClassifierOutput and list(back.keys()) == list(out.keys())
    assert torch.equal(back.loss, out.loss) and torch.equal(back.logits, out.logits)
    assert all(torch.equal(a, b) for a, b in zip(back.hidden_states, out.hidden_states))
    assert all(torch.equal(a, b) for s, t in zip(back.attentions, out.attentions) for a, b in zip(s, t))


def test_deepcopy_of_an_output_in_a_graph_fails_as_transformers_and_copies_once_detached():
    w = torch.ones(2, 3, requires_grad=True)
    logits = w * 2
    ours, theirs = ImageClassifierOutput(logits=logits), hf.ImageClassifierOutput(logits=logits)
    errors = []
    for out in (ours, theirs):
        with pytest.raises(RuntimeError) as caught:
            copy.deepcopy(out)
        errors.append(str(caught.value).split(".")[0])
    assert errors[0] == errors[1]
    copied = copy.deepcopy(ImageClassifierOutput(logits=logits.detach()))
    assert torch.equal(copied.logits, logits.detach()) and copied.logits is not logits


def test_equality_between_outputs_is_transformers_answer():
    """Two outputs of equal tensors: the dataclass ``==`` compares tensors element-wise and cannot make one bool of
    them, in transformers too (RuntimeError); the same objects, or one-element tensors, compare."""
    a, b = torch.arange(6.0).reshape(2, 3), torch.arange(6.0).reshape(2, 3)
    for cls in (ImageClassifierOutput, hf.ImageClassifierOutput):
        with pytest.raises(RuntimeError, match="ambiguous"):
            cls(logits=a) == cls(logits=b)  # noqa: B015
        assert cls(logits=a) == cls(logits=a)
        assert cls(logits=torch.tensor(1.0)) == cls(logits=torch.tensor(1.0))
        assert cls(logits=torch.tensor(1.0)) != cls(logits=torch.tensor(2.0))
    # Equal to transformers' of the same values as dicts (the dataclass __eq__ wants the same class).
    assert dict(ImageClassifierOutput(logits=a)) == dict(hf.ImageClassifierOutput(logits=a))


@pytest.mark.parametrize("name", list(CLASSES))
def test_an_output_with_every_field_none_is_an_empty_dict_as_transformers(name):
    ours, theirs = CLASSES[name](), getattr(hf, name)()
    assert len(ours) == len(theirs) == 0 and list(ours) == list(theirs) == []
    assert ours.to_tuple() == theirs.to_tuple() == ()
    first = next(iter(ours.__dataclass_fields__))
    assert getattr(ours, first) is None and getattr(theirs, first) is None
    with pytest.raises(KeyError):
        ours[first]
    with pytest.raises(KeyError):
        theirs[first]
    with pytest.raises(IndexError):
        ours[0]
    with pytest.raises(IndexError):
        theirs[0]
    for clone in (copy.copy(ours), copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert type(clone) is type(ours) and len(clone) == 0


def test_loss_without_labels_is_none_and_absent_from_the_tuple():
    from pvtv2 import PvtV2ForImageClassification

    torch.manual_seed(0)
    model = PvtV2ForImageClassification(PvtV2Config(**TINY_SHALLOW, num_labels=3)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        tup = model(x, return_dict=False)
    assert out.loss is None and "loss" not in out and list(out) == ["logits"]
    assert len(tup) == 1 and torch.equal(tup[0], out.logits) and torch.equal(out[0], out.logits)


def test_compiled_depth_loss_without_a_measured_pixel_is_zero_with_zero_gradients():
    """The depth loss under torch.compile(fullgraph=True): no data-dependent branch, and a label with no pixel of
    depth gives eager's 0 and zero gradients (not the NaN of a mean over no pixel, nor of sqrt's gradient at 0)."""
    config = PvtV2Config(**TINY_SHALLOW)
    torch.manual_seed(0)
    model = perturb_(MODEL_KINDS["depth"](config), scale=0.1).train()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 64, 64)
    for labels in (torch.zeros(2, 64, 64), torch.rand(2, 64, 64) * (torch.rand(2, 64, 64) > 0.5)):
        grads = []
        for net in (model, compiled):
            model.zero_grad(set_to_none=True)
            loss = net(x, labels=labels).loss
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        (want, want_g), (got, got_g) = grads
        assert torch.isfinite(got) and abs(got.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))
        if not labels.any():
            assert want.item() == got.item() == 0.0
        # Against the model's largest gradient: some are rounding noise of 1e-10 (a bias before a normalisation).
        scale = max(g.abs().max().item() for g in want_g)
        for a, b in zip(want_g, got_g):
            assert torch.isfinite(b).all() and (a - b).abs().max().item() <= 1e-4 * max(scale, 1e-12)
        if not labels.any():
            assert scale == 0.0 and all(not g.any() for g in got_g)
