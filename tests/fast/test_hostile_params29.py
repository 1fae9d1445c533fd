"""Hostile checks of the fast path's reading of weights from the module's parameter dict (``pvtv2.fast.cpu``'s
``_params_fit`` and ``_params``, which skip nn.Module.__getattr__): whatever was done to a linear layer's weight or
bias, the fast path (plain or frozen) gives the reference path's numbers to 1e-5, or steps aside and the reference
path runs; it never crashes where the reference runs, and where the reference raises, it raises the reference's error.

Found and held here:

- an instance attribute put over a parameter (``object.__setattr__(layer, "weight", t)``, ``layer.__dict__["bias"]
  = t``: what ``layer.weight`` and so the module read) was not seen by a frozen stage, which read the parameter dict
  only: it kept computing with the packed parameter (4.6e-2 off the reference), where reading ``m.weight`` before had
  found the attribute;
- a weight set to None (``layer.weight = None``) raised an AttributeError about ``NoneType.shape`` in the fast path's
  checks instead of the module's own error.

- ``torch.nn.utils.parametrizations.weight_norm`` on a layer of a frozen model raised a RuntimeError
  (``nn.Parameter(p)`` of a frozen parameter, which parametrizations and weight tying call, refused the
  ``_WatchedParameter`` type that :func:`pvtv2.fast.freeze` gives the parameters); on an unfrozen model it worked.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

import pvtv2.fast.cpu as cpu
from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast

from conftest import TINY, perturb_, relative_error

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))


def _model(seed: int = 7) -> PvtV2ForImageClassification:
    torch.manual_seed(seed)
    return perturb_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5)), seed=seed).eval()


def _stage(model):
    return model.pvt_v2.encoder.layers[1]


def _value(model) -> nn.Linear:
    return _stage(model).blocks[0].attention.value


class _Half(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * 0.5


class _Subclass(nn.Parameter):
    """A Parameter subclass, as libraries define them."""


def _moved(bias: torch.Tensor) -> torch.Tensor:
    """``bias`` moved by different amounts per output (a LayerNorm after a convolution cancels a uniform shift)."""
    return bias.detach() + torch.linspace(-1, 1, bias.shape[0])


def _weight_attribute(layer):
    object.__setattr__(layer, "weight", layer.weight.detach() * 2)  # over the parameter, which stays registered


def _bias_in_dict(layer):
    layer.__dict__["bias"] = _moved(layer.bias)


def _bias_none_in_dict(layer):
    layer.__dict__["bias"] = None


def _bias_plain_tensor(layer):
    bias = _moved(layer.bias)
    del layer.bias
    layer.bias = bias


def _bias_buffer(layer):
    bias = _moved(layer.bias)
    del layer.bias
    layer.register_buffer("bias", bias)


def _bias_registered_none(layer):
    layer.register_parameter("bias", None)


def _bias_buffer_none(layer):
    del layer.bias
    layer.register_buffer("bias", None)


def _weight_buffer(layer):
    weight = layer.weight.detach() * 2
    del layer.weight
    layer.register_buffer("weight", weight)


def _parametrized(layer):
    parametrize.register_parametrization(layer, "weight", _Half())


def _parametrized_bias(layer):
    parametrize.register_parametrization(layer, "bias", _Half())


def _parametrization_removed(layer):
    parametrize.register_parametrization(layer, "weight", _Half())
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)


def _old_weight_norm(layer):
    torch.nn.utils.weight_norm(layer)
    with torch.no_grad():
        layer.weight_g.mul_(1.5)


def _old_spectral_norm(layer):
    torch.nn.utils.spectral_norm(layer)


def _new_spectral_norm(layer):
    torch.nn.utils.parametrizations.spectral_norm(layer)


def _subclass(layer):
    layer.weight = _Subclass(layer.weight.detach() * 2)


def _swapped(layer):
    torch.utils.swap_tensors(layer.weight, nn.Parameter(layer.weight.detach() * 2))


def _swapped_subclass(layer):
    torch.utils.swap_tensors(layer.weight, _Subclass(layer.weight.detach() * 2))


ATTACKS = {
    "weight attribute over the parameter": _weight_attribute,
    "bias in the instance dict": _bias_in_dict,
    "None bias in the instance dict": _bias_none_in_dict,
    "bias as a plain tensor": _bias_plain_tensor,
    "bias as a buffer": _bias_buffer,
    "bias registered as None": _bias_registered_none,
    "bias as a None buffer": _bias_buffer_none,
    "weight as a buffer": _weight_buffer,
    "parametrized weight": _parametrized,
    "parametrized bias": _parametrized_bias,
    "parametrization removed": _parametrization_removed,
    "weight_norm (old API)": _old_weight_norm,
    "spectral_norm (old API)": _old_spectral_norm,
    "spectral_norm (parametrization)": _new_spectral_norm,
    "Parameter subclass": _subclass,
    "swap_tensors": _swapped,
    "swap_tensors with a subclass": _swapped_subclass,
}


def _reference(model) -> torch.Tensor:
    with fast.fast_path(False):
        return model(X).logits


@pytest.mark.parametrize("frozen", [False, True], ids=["plain", "frozen"])
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_fast_path_gives_the_reference_numbers_after_a_weight_or_bias_is_replaced(attack, frozen):
    model = _model()
    if frozen:
        fast.freeze(model)
    with torch.no_grad():
        before = model(X).logits  # packs a frozen stage's weights
        ATTACKS[attack](_value(model))
        want = _reference(model)
        got, again = model(X).logits, model(X).logits
    assert relative_error(want, before) > 1e-4  # the attack changed the model's numbers (the test can tell)
    assert relative_error(want, got) < 1e-5
    assert relative_error(want, again) < 1e-5


@pytest.mark.parametrize("frozen", [False, True], ids=["plain", "frozen"])
def test_load_state_dict_assign_is_read(frozen):
    model = _model()
    if frozen:
        fast.freeze(model)
    other = _model(seed=3).state_dict()
    with torch.no_grad():
        before = model(X).logits
        model.load_state_dict(other, assign=True)
        want = _reference(model)
        got = model(X).logits
    assert relative_error(want, before) > 1e-4
    assert relative_error(want, got) < 1e-5


@pytest.mark.parametrize("frozen", [False, True], ids=["plain", "frozen"])
@pytest.mark.parametrize("bias_too", [False, True], ids=["weight", "weight and bias"])
def test_a_none_weight_raises_the_reference_error(frozen, bias_too):
    model = _model()
    if frozen:
        fast.freeze(model)
    with torch.no_grad():
        model(X)
        layer = _value(model)
        layer.weight = None
        if bias_too:
            layer.bias = None
        assert not cpu.fusable(_stage(model), X.dtype)  # steps aside: the module raises its own error
        with pytest.raises(TypeError) as want:
            _reference(model)
        with pytest.raises(TypeError) as got:
            model(X)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("frozen", [False, True], ids=["plain", "frozen"])
def test_weight_norm_parametrization(frozen):
    model = _model()
    if frozen:
        fast.freeze(model)
    with torch.no_grad():
        before = model(X).logits
    layer = _value(model)
    torch.nn.utils.parametrizations.weight_norm(layer)
    with torch.no_grad():
        layer.parametrizations.weight.original0.mul_(1.5)  # the norm g
        want = _reference(model)
        got = model(X).logits
    assert relative_error(want, before) > 1e-4
    assert relative_error(want, got) < 1e-5


CONV_ATTACKS = {"weight attribute over the parameter": _weight_attribute, "bias in the instance dict": _bias_in_dict,
                "bias as a buffer": _bias_buffer, "Parameter subclass": _subclass}


@pytest.mark.parametrize("frozen", [False, True], ids=["plain", "frozen"])
@pytest.mark.parametrize("attack", list(CONV_ATTACKS))
def test_a_convolution_replaced_likewise(attack, frozen):
    """The same for a convolution's weight and bias (the spatial reduction's, packed per input shape)."""
    model = _model()
    if frozen:
        fast.freeze(model)
    with torch.no_grad():
        before = model(X).logits
        CONV_ATTACKS[attack](_stage(model).blocks[0].attention.spatial_reduction)
        want = _reference(model)
        got = model(X).logits
    assert relative_error(want, before) > 1e-4
    assert relative_error(want, got) < 1e-5


def test_a_frozen_weight_tied_into_another_module_shares_its_memory_and_both_follow_writes():
    model, other = _model(), _model(seed=9)
    fast.freeze(model)
    fast.freeze(other)
    tied = nn.Parameter(_value(model).weight)  # raised before: the frozen parameter's type was refused
    assert tied.data_ptr() == _value(model).weight.data_ptr() and tied.requires_grad
    _value(other).weight = tied
    with torch.no_grad():
        tied.mul_(0.5)  # one write, seen through both models
        for m in (model, other):
            assert relative_error(_reference(m), m(X).logits) < 1e-5
    assert torch.equal(_value(model).weight, _value(other).weight)


@pytest.mark.parametrize("norm", ["spectral_norm", "orthogonal"])
def test_other_parametrizations_on_a_frozen_model_give_the_reference_numbers(norm):
    model = _model()
    fast.freeze(model)
    with torch.no_grad():
        before = model(X).logits
    layer = _value(model)
    getattr(torch.nn.utils.parametrizations, norm)(layer)
    with torch.no_grad():
        want = _reference(model)
        got = model(X).logits
    assert relative_error(want, before) > 1e-4
    assert relative_error(want, got) < 1e-5
    state = model.state_dict()  # still saveable, with the parametrization's own keys
    assert any(k.endswith("value.parametrizations.weight.original") for k in state)
