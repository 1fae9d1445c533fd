"""Hostile checks of the models under torch.func's transforms (what tests/models/test_functorch29.py opened), against
transformers' PvtV2 and against plain loops and autograd.

Found and held here:

- a loss under vmap: ``vmap(lambda x, y: model(x, labels=y).loss)`` and per-sample gradients of the model's own loss
  (``vmap(grad(...))`` with the labels batched) failed in the label range check of the classification and
  segmentation losses (a boolean mask over the labels, which vmap cannot batch); transformers' classifier runs them.
  Labels batched by vmap now skip the host check, and cross_entropy's own check still stops a class out of range.
- the oneDNN probe ran inside vmap where a training call under vmap came first in a process (the training GEMMs ask
  for it): it failed there (vmap's randomness error mode) and the failure was kept, turning the fast path off for
  the rest of the process;
- forward-mode AD through ``torch.autograd.forward_ad`` (dual tensors, no torch.func transform): under no_grad the
  fused stages ran and dropped the tangent (None, silently); with autograd on, SDPA raised (no tangent rule). The
  fast paths step aside and the attention takes its explicit form there, as under torch.func's transforms.

Held (no change): every output under vmap (attention maps, hidden states), float64, channels-last inputs, nested
vmap, ``in_dims=1``, ``chunk_size``, bf16 autocast, jacrev / jacfwd / hessian, dropout and drop path under each of
vmap's randomness modes (as transformers: "same" draws one mask for every sample, "different" one each, "error"
raises; per-sample gradients too), gradient checkpointing under vmap, ``torch.compile`` of a vmapped model, and a frozen model: the same packed
weights after the transforms (bit-identical logits), the given weights under ``functional_call``.

What happens elsewhere, as in transformers: gradient checkpointing under ``torch.func.grad`` raises PyTorch's "don't
yet support saved tensor hooks" (transformers' checkpointing raises the same); the detector under vmap fails in
torchvision's post-processing (``.item()``); the depth model's loss under vmap fails in its valid-pixel mask (as
transformers' GLPN loss does), its predictions run.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from test_functorch29 import images, pair
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, stack_module_state, vmap

from pvtv2 import PvtV2Config, PvtV2ForSemanticSegmentation, fast
import pvtv2.fast.cpu as cpu


def leaves(tree) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


# ------------------------------------------------------------------------------------------------ losses (the defect)
def test_classification_loss_under_vmap_matches_transformers_and_a_loop():
    ours, theirs = pair()
    x = images()
    y = torch.tensor([[0, 1], [1, 0], [1, -100]])
    with torch.no_grad():
        got = vmap(lambda xi, yi: ours(xi, labels=yi).loss)(x, y)
        want = vmap(lambda xi, yi: theirs(xi, labels=yi).loss)(x, y)
        loop = torch.stack([ours(xi, labels=yi).loss for xi, yi in zip(x, y)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, loop, rtol=1e-5, atol=1e-6)


def test_a_label_out_of_range_under_vmap_still_raises():
    ours, _ = pair()
    with torch.no_grad(), pytest.raises((RuntimeError, IndexError, ValueError)):
        vmap(lambda xi, yi: ours(xi, labels=yi).loss)(images(), torch.tensor([[0, 1], [1, 7], [0, 0]]))


def test_per_sample_gradients_of_the_models_own_loss_match_autograd():
    ours, _ = pair()
    ours.train()
    x = images(n=1, batch=3)[0]
    labels = torch.tensor([0, 1, 1])
    params = {k: v.detach() for k, v in ours.named_parameters()}

    def loss(p, xi, yi):
        return functional_call(ours, p, (xi[None],), {"labels": yi[None]}).loss

    got = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, labels)
    for i in range(3):  # one autograd backward per sample
        ours.zero_grad()
        F.cross_entropy(ours(x[i : i + 1]).logits, labels[i : i + 1]).backward()
        for key, p in ours.named_parameters():
            torch.testing.assert_close(got[key][i], p.grad, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("num_labels", [3, 1])
def test_segmentation_loss_under_vmap_matches_a_loop(num_labels):
    torch.manual_seed(0)
    model = PvtV2ForSemanticSegmentation(PvtV2Config(**TINY, num_labels=num_labels)).eval()
    x = images(n=2, batch=1, size=64)
    labels = torch.randint(0, max(num_labels, 2), (2, 1, 64, 64), generator=torch.Generator().manual_seed(2))
    labels[0, 0, :8] = 255  # ignored pixels
    with torch.no_grad():
        got = vmap(lambda xi, yi: model(xi, labels=yi).loss)(x, labels)
        loop = torch.stack([model(xi, labels=yi).loss for xi, yi in zip(x, labels)])
    assert not torch.allclose(loop[0], loop[1])
    torch.testing.assert_close(got, loop, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ what held
def test_attention_maps_and_hidden_states_under_vmap_match_transformers():
    ours, theirs = pair()
    x = images()
    with torch.no_grad():
        got = leaves(vmap(lambda xi: ours(xi, output_attentions=True, output_hidden_states=True, return_dict=False))(x))
        want = leaves(vmap(lambda xi: theirs(xi, output_attentions=True, output_hidden_states=True,
                                             return_dict=False))(x))
    assert len(got) == len(want) == 1 + 4 + 5  # logits, 4 hidden states, 5 blocks' maps
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["float64", "channels-last", "nested", "in_dims=1", "chunk_size"])
def test_vmap_variants_match_transformers(how):
    ours, theirs = pair()
    x = images()
    with torch.no_grad():
        want = vmap(lambda xi: theirs(xi).logits)(x)
        if how == "float64":
            ours64, theirs64 = copy.deepcopy(ours).double(), copy.deepcopy(theirs).double()
            got = vmap(lambda xi: ours64(xi).logits)(x.double())
            want = vmap(lambda xi: theirs64(xi).logits)(x.double())
            assert got.dtype == torch.float64
        elif how == "channels-last":
            strided = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)  # each image channels-last
            got = vmap(lambda xi: ours(xi).logits)(strided)
        elif how == "nested":
            got = vmap(vmap(lambda xi: ours(xi[None]).logits[0]))(x)
        elif how == "in_dims=1":
            got = vmap(lambda xi: ours(xi).logits, in_dims=1, out_dims=1)(x.transpose(0, 1)).transpose(0, 1)
        else:
            got = vmap(lambda xi: ours(xi).logits, chunk_size=2)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_inside_vmap_matches_transformers():
    ours, theirs = pair()
    x = images()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = vmap(lambda xi: ours(xi).logits)(x)
        want = vmap(lambda xi: theirs(xi).logits)(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_jacobians_and_hessian_match_transformers():
    ours, theirs = pair({"sr_ratios": [2, 1, 1, 1]})
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    for transform in (jacrev, jacfwd):
        torch.testing.assert_close(transform(lambda z: ours(z).logits)(x), jacrev(lambda z: theirs(z).logits)(x),
                                   rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(hessian(lambda z: ours(z).logits.sum())(x), hessian(lambda z: theirs(z).logits.sum())(x),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("drop", ["drop_path_rate", "hidden_dropout_prob", "attention_probs_dropout_prob"])
@pytest.mark.parametrize("randomness", ["same", "different", "error"])
def test_dropout_under_vmap_randomness_as_transformers(drop, randomness):
    ours, theirs = pair({drop: 0.4})
    ours.train()
    theirs.train()
    x = images(n=1, batch=1)[0].expand(4, 1, 3, 32, 32)  # four copies of one image

    def outcome(model):
        try:
            with torch.no_grad():
                out = vmap(lambda xi: model(xi).logits, randomness=randomness)(x)
        except RuntimeError as err:
            return "randomness error mode" in str(err)
        return all(torch.equal(out[0], out[i]) for i in range(4))  # one mask for all, or one each

    got, want = outcome(ours), outcome(theirs)
    assert got == want
    assert want == (randomness != "different")


def test_gradient_checkpointing_under_vmap_and_under_grad_as_transformers():
    ours, theirs = pair()
    plain = copy.deepcopy(ours).train()
    for model in (ours, theirs):
        model.train()
        model.gradient_checkpointing_enable()
    x = images(n=2, batch=1)
    got = vmap(lambda xi: ours(xi).logits)(x)  # autograd on, checkpointed blocks
    torch.testing.assert_close(got, vmap(lambda xi: plain(xi).logits)(x), rtol=1e-5, atol=1e-6)
    params = {k: v.detach() for k, v in ours.named_parameters()}
    theirs_params = {k: v.detach() for k, v in theirs.named_parameters()}
    for model, p in ((ours, params), (theirs, theirs_params)):
        with pytest.raises(RuntimeError, match="saved tensor hooks"):
            grad(lambda q: functional_call(model, q, (x[0],)).logits.sum())(p)


def test_compiled_vmap_matches_transformers():
    ours, theirs = pair()
    x = images()
    with torch.no_grad():
        got = torch.compile(vmap(lambda xi: ours(xi).logits))(x)
        want = vmap(lambda xi: theirs(xi).logits)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _packed(model) -> dict:
    return {k: id(v[1]) for s in model.pvt_v2.encoder.layers for k, v in cpu._FROZEN[s].entries.items()}


def test_a_frozen_model_keeps_its_packed_weights_through_the_transforms():
    ours, _ = pair()
    fast.freeze(ours)
    x = images(n=1)[0]
    with torch.no_grad():
        before = ours(x).logits
    packed = _packed(ours)
    assert packed
    with torch.no_grad():
        vmap(lambda xi: ours(xi[None]).logits)(x)
        jvp(lambda xi: ours(xi).logits, (x,), (x,))
    params = {k: v.detach() for k, v in ours.named_parameters()}
    vmap(grad(lambda p, xi: functional_call(ours, p, (xi[None],)).logits.sum()), in_dims=(None, 0))(params, x)
    with torch.no_grad():
        assert all(cpu.applies(x, stage) for stage in ours.pvt_v2.encoder.layers)
        after = ours(x).logits
    assert _packed(ours) == packed  # the same packed weights, not repacked
    assert torch.equal(before, after)


def test_a_frozen_model_under_functional_call_uses_the_given_weights():
    ours, _ = pair()
    other, _ = pair(seed=5)
    fast.freeze(ours)
    x = images(n=1)[0]
    with torch.no_grad():
        own = ours(x).logits  # packs
        want = other(x).logits
        for make in (lambda t: t.detach().clone(), lambda t: torch.nn.Parameter(t.detach().clone())):
            weights = {k: make(v) for k, v in other.named_parameters()}
            torch.testing.assert_close(functional_call(ours, weights, (x,)).logits, want, rtol=1e-5, atol=1e-6)
        params, buffers = stack_module_state([ours, other])
        got = vmap(lambda p, b: functional_call(ours, (p, b), (x,)).logits)(params, buffers)
        torch.testing.assert_close(got[1], want, rtol=1e-5, atol=1e-6)
        assert torch.equal(ours(x).logits, own)
    assert not torch.allclose(own, want)


def test_a_first_call_under_vmap_leaves_the_fast_path_on(monkeypatch):
    """The oneDNN probe ran inside vmap where a training call under vmap came first in a process (the training GEMMs
    ask for it): its random test tensors failed in vmap's randomness error mode, and the failure was kept, so the fast
    path stayed off for the whole process (inference included), without a word."""
    monkeypatch.setattr(cpu, "_CAPABILITY", {})  # as in a fresh process
    ours, _ = pair()
    ours.train()
    x = images(n=2, batch=1)
    with fast.train_gemm("onednn"):  # the choice on AMD CPUs with AVX-512, where "auto" takes it
        vmap(lambda xi: ours(xi).logits)(x)
    ours.eval()
    with torch.no_grad():
        assert cpu.fast_path_available(torch.float32)
        assert cpu.applies(x[0], ours.pvt_v2.encoder.layers[0])


@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "grad"])
def test_forward_mode_ad_of_torch_autograd_matches_transformers(grad_mode):
    """``torch.autograd.forward_ad`` (dual tensors, no torch.func transform): under no_grad the fast path ran and
    dropped the tangent (None, without a word); with autograd on, SDPA raised (no forward-AD formula)."""
    import torch.autograd.forward_ad as fwAD

    ours, theirs = pair()
    x = images(n=1)[0]
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))

    def tangent(model):
        with torch.set_grad_enabled(grad_mode), fwAD.dual_level():
            return fwAD.unpack_dual(model(fwAD.make_dual(x, v)).logits).tangent

    got, want = tangent(ours), tangent(theirs)
    assert want is not None and got is not None
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        _, func = jvp(lambda z: theirs(z).logits, (x,), (v,))
    torch.testing.assert_close(got, func, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("randomness", ["same", "different"])
def test_per_sample_gradients_with_dropout_and_drop_path_as_transformers(randomness):
    """vmap(grad(...)) in train mode with every kind of dropout: one mask for all samples ("same": three copies of one
    image get one gradient) or one each ("different"), as transformers' model under the same call."""
    ours, theirs = pair({"drop_path_rate": 0.3, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1})
    x = images(n=1, batch=1)[0].expand(3, 3, 32, 32)
    labels = torch.tensor([1, 1, 1])

    def equal_across_samples(model):
        model.train()
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, xi, yi):
            return F.cross_entropy(functional_call(model, p, (xi[None],)).logits, yi[None])

        got = vmap(grad(loss), in_dims=(None, 0, 0), randomness=randomness)(params, x, labels)
        return all(torch.equal(g[0], g[i]) for g in got.values() for i in (1, 2))

    assert equal_across_samples(ours) == equal_across_samples(theirs) == (randomness == "same")
