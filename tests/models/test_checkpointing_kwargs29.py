"""gradient_checkpointing_enable(gradient_checkpointing_kwargs=...) as transformers' method takes it (its Trainer
passes them): a TypeError before. The gradients stay those of the model without checkpointing, and transformers'."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import TINY, hf_config

import pvtv2.models.layers as layers
from pvtv2 import PvtV2Config, PvtV2ForImageClassification


def _grads(model, x, labels):
    model.zero_grad()
    F.cross_entropy(model(x).logits, labels).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": True}, {"use_reentrant": False, "preserve_rng_state": False},
                                    {"determinism_check": "none"}])
def test_checkpointing_kwargs_reach_checkpoint_and_keep_the_gradients(kwargs):
    torch.manual_seed(0)
    config = PvtV2Config(**TINY)
    ours = PvtV2ForImageClassification(config).train()
    theirs = transformers.PvtV2ForImageClassification(hf_config(config)).train()
    theirs.load_state_dict(ours.state_dict())
    x, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    plain = _grads(ours, x, labels)
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    theirs.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    with mock.patch.object(layers, "checkpoint", wraps=layers.checkpoint) as spy:
        got = _grads(ours, x, labels)
    assert spy.call_count == sum(TINY["depths"])  # every block recomputed
    expected = {"use_reentrant": False, **(kwargs or {})}
    for call in spy.call_args_list:
        given = dict(call.kwargs)
        # The non-reentrant variant also recomputes under the forward's fast-path choices (a context_fn of ours).
        assert ("context_fn" in given) == (not expected["use_reentrant"])
        given.pop("context_fn", None)
        assert given == expected
    want = _grads(theirs, x, labels)
    assert set(got) == set(plain)  # every parameter gets its gradient
    for key in plain:
        torch.testing.assert_close(got[key], plain[key], rtol=1e-5, atol=1e-7, msg=key)
    # transformers checkpoints whole stages with the reentrant variant: the patch embeddings, whose inputs do not
    # require grad there, get no gradient; every gradient it gives equals ours.
    assert want and set(want) <= set(got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)


def test_an_argument_checkpoint_does_not_take_is_refused_by_name():
    model = PvtV2ForImageClassification(PvtV2Config(**TINY))
    with pytest.raises(TypeError, match="'use_reentrnt'"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrnt": True})


def test_disable_then_enable_without_kwargs_returns_to_the_default():
    model = PvtV2ForImageClassification(PvtV2Config(**TINY)).train()
    model.gradient_checkpointing_enable({"use_reentrant": True})
    model.gradient_checkpointing_disable()
    model.gradient_checkpointing_enable()
    with mock.patch.object(layers, "checkpoint", wraps=layers.checkpoint) as spy:
        model(torch.randn(1, 3, 32, 32)).logits.sum().backward()
    assert spy.call_args_list[0].kwargs["use_reentrant"] is False
    assert set(spy.call_args_list[0].kwargs) == {"use_reentrant", "context_fn"}


def test_a_users_context_fn_runs_with_the_forward_choices():
    """A context_fn given in gradient_checkpointing_kwargs is called, its contexts entered around the forward and
    the recomputation, and the gradients stay those of the model without checkpointing."""
    import contextlib

    entered = []

    @contextlib.contextmanager
    def note(name):
        entered.append(name)
        yield

    model = PvtV2ForImageClassification(PvtV2Config(**TINY)).train()
    x, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    plain = _grads(model, x, labels)
    model.gradient_checkpointing_enable({"context_fn": lambda: (note("forward"), note("recompute"))})
    got = _grads(model, x, labels)
    blocks = sum(TINY["depths"])
    assert entered.count("forward") == blocks and entered.count("recompute") == blocks
    for key in plain:
        torch.testing.assert_close(got[key], plain[key], rtol=1e-5, atol=1e-7, msg=key)
