"""transformers 5's names for gradient checkpointing (``activation_checkpointing_enable`` / ``_disable``,
``is_activation_checkpointing``) and its ``every_n_layers`` and ``offload`` arguments, against transformers' own
PvtV2 model: the same stages recompute, and the gradients stay those of the model without checkpointing."""

from __future__ import annotations

import warnings
from unittest import mock

import pytest
import torch
import transformers
from conftest import TINY, hf_config

import pvtv2.models.layers as layers
from pvtv2 import PvtV2Backbone, PvtV2Config, PvtV2ForImageClassification

from test_checkpointing_kwargs29 import _grads

CONFIG = PvtV2Config(**TINY)  # four stages of depths 1, 2, 1, 1


def _pair():
    torch.manual_seed(0)
    ours = PvtV2ForImageClassification(CONFIG).train()
    theirs = transformers.PvtV2ForImageClassification(hf_config(CONFIG)).train()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("every", [1, 2, 3, 4, 7])
def test_every_n_layers_picks_the_stages_transformers_picks(every):
    ours, theirs = _pair()
    ours.activation_checkpointing_enable(every_n_layers=every)
    theirs.activation_checkpointing_enable(every_n_layers=every)
    want = [layer.gradient_checkpointing for layer in theirs.pvt_v2.encoder.layers]
    got = [stage.gradient_checkpointing for stage in ours.pvt_v2.encoder.layers]
    assert got == want == [i % every == 0 for i in range(4)]
    assert ours.is_activation_checkpointing is theirs.is_activation_checkpointing is True
    # Blocks recomputed: those of the chosen stages only.
    x, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    with mock.patch.object(layers, "checkpoint", wraps=layers.checkpoint) as spy:
        got_grads = _grads(ours, x, labels)
    assert spy.call_count == sum(d for i, d in enumerate(TINY["depths"]) if i % every == 0)
    ours.activation_checkpointing_disable()
    theirs.activation_checkpointing_disable()
    assert ours.is_activation_checkpointing is theirs.is_activation_checkpointing is False
    plain = _grads(ours, x, labels)
    assert set(got_grads) == set(plain)
    for key in plain:
        torch.testing.assert_close(got_grads[key], plain[key], rtol=1e-5, atol=1e-7, msg=key)
    want_grads = _grads(theirs, x, labels)
    for key in want_grads:
        torch.testing.assert_close(plain[key], want_grads[key], rtol=1e-4, atol=1e-6, msg=key)


def test_offload_on_the_cpu_keeps_the_gradients():
    ours, _ = _pair()
    x, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    plain = _grads(ours, x, labels)
    ours.activation_checkpointing_enable({"use_reentrant": False}, offload=True)
    with mock.patch.object(torch.autograd.graph, "save_on_cpu", wraps=torch.autograd.graph.save_on_cpu) as spy:
        got = _grads(ours, x, labels)
    assert spy.call_count == 0  # nothing to move: the activations are in host memory already
    for key in plain:
        torch.testing.assert_close(got[key], plain[key], rtol=1e-5, atol=1e-7, msg=key)


def test_the_old_and_new_names_are_one_setting_and_the_backbone_has_them():
    model = PvtV2Backbone(CONFIG).train()
    model.gradient_checkpointing_enable(every_n_layers=2)
    assert model.is_activation_checkpointing and model.is_gradient_checkpointing
    assert [s.gradient_checkpointing for s in model.encoder.layers] == [True, False, True, False]
    model.activation_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our old names are not deprecated: the model documentation uses them
        model.gradient_checkpointing_enable()
        assert model.is_gradient_checkpointing


@pytest.mark.parametrize("every", [0, -1, 1.5, True, "2"])
def test_a_bad_every_n_layers_is_refused_by_name(every):
    model = PvtV2ForImageClassification(CONFIG)
    with pytest.raises(ValueError, match="every_n_layers"):
        model.activation_checkpointing_enable(every_n_layers=every)
    assert not model.is_activation_checkpointing
