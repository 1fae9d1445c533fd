"""Hostile pass on the fast CPU path's batch-1 GEMM attention (pvtv2.fast.cpu._attention, the query and output
projections folded into the keys and values) and the path around it.

A weight or bias of another dtype than the input (a float64 bias, a bf16 query weight put in a float32 model) is
refused by the modules themselves and by transformers' model ("self and mat2 must have the same dtype"); the fast
path cast it to the compute dtype and gave numbers, in the GEMM attention's folded projections as in every other
GEMM and convolution: the model answered or raised depending on the switch, the batch size and autograd. Under
autocast the reference casts every weight but a float64 one (autocast leaves those), so there only float64 is
refused."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, hf_twin, random_weights_, relative_error

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast

pytestmark = pytest.mark.skipif(
    not fast.fast_path_available(torch.float32), reason="the oneDNN operators of the fast path are not available here"
)
X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _model() -> PvtV2ForImageClassification:
    return random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5)), seed=7).eval()


def _blocks(model: torch.nn.Module, stage: int):
    return model.pvt_v2.encoder.layers[stage].blocks


# (stage 1's first block takes the GEMM attention at 64 px, stage 4's runs SDPA)
CASES = {
    "query weight bf16 (GEMM attention)": lambda m: (_blocks(m, 0)[0].attention.query, "weight", torch.bfloat16),
    "output bias float64 (GEMM attention)": lambda m: (_blocks(m, 1)[1].attention.proj, "bias", torch.float64),
    "output bias float64 (SDPA)": lambda m: (_blocks(m, 3)[0].attention.proj, "bias", torch.float64),
    "Mix-FFN weight float64": lambda m: (_blocks(m, 0)[0].mlp.dense1, "weight", torch.float64),
    "spatial reduction bias float64": lambda m: (_blocks(m, 0)[0].attention.spatial_reduction, "bias", torch.float64),
}


def _retype(model: torch.nn.Module, case: str) -> None:
    module, name, dtype = CASES[case](model)
    setattr(module, name, torch.nn.Parameter(getattr(module, name).detach().to(dtype)))


@pytest.mark.parametrize("case", list(CASES))
def test_a_weight_of_another_dtype_is_refused_as_by_the_modules(case):
    ours = _model()
    theirs = hf_twin(ours).eval()
    _retype(ours, case)
    _retype(theirs, case)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="dtype|type"):
            theirs(X)
        with pytest.raises(RuntimeError, match="dtype|type"):
            ours(X)


def test_under_autocast_a_float64_bias_is_refused_and_a_bf16_weight_cast():
    ours = _model()
    theirs = hf_twin(ours).eval()
    for model in (ours, theirs):
        _retype(model, "query weight bf16 (GEMM attention)")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = theirs(X).logits.float()
        got = ours(X).logits.float()
        with fast.fast_path(False):
            reference = ours(X).logits.float()
    # autocast casts the bf16 weight as it casts the others: the fast path runs and gives bf16-rounding close numbers
    assert relative_error(want, got) < 5e-2
    assert relative_error(reference, got) < 5e-2
    for model in (ours, theirs):
        _retype(model, "output bias float64 (SDPA)")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError):
            theirs(X)
        with pytest.raises(RuntimeError):
            ours(X)


# A bias F.linear broadcasts (one element, or a (1, out) row) computes in the modules and in transformers' model;
# oneDNN's operators read a bias as a dense vector of the outputs and failed ("could not create a primitive
# descriptor for the inner product") in the GEMM attention's folded projections as in every other linear layer.
BROADCAST_BIASES = {
    "query bias (1,) (GEMM attention)": ("pvt_v2.encoder.layers.1.blocks.0.attention.query", (1,)),
    "output bias (1,) (GEMM attention)": ("pvt_v2.encoder.layers.0.blocks.0.attention.proj", (1,)),
    "output bias (1, 16) (GEMM attention)": ("pvt_v2.encoder.layers.0.blocks.0.attention.proj", (1, 16)),
    "output bias (1,) (SDPA)": ("pvt_v2.encoder.layers.3.blocks.0.attention.proj", (1,)),
    "Mix-FFN bias (1,)": ("pvt_v2.encoder.layers.0.blocks.0.mlp.dense1", (1,)),
}


@pytest.mark.parametrize("case", list(BROADCAST_BIASES))
def test_a_bias_the_modules_broadcast_gives_transformers_numbers(case):
    path, shape = BROADCAST_BIASES[case]
    ours = _model()
    theirs = hf_twin(ours).eval()
    for model in (ours, theirs):
        model.get_submodule(path).bias = torch.nn.Parameter(torch.full(shape, 0.5))
    with torch.no_grad():
        want = theirs(X).logits
        got = ours(X).logits
        with fast.fast_path(False):
            reference = ours(X).logits
    assert relative_error(want, reference) < 1e-5
    assert relative_error(want, got) < 1e-5
    assert relative_error(hf_twin(_model()).eval()(X).logits, want) > 1e-3  # the bias shows in the logits


def _every_other_column(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in every other element of each row of a buffer twice as wide (a strided view, as
    ``load_state_dict(assign=True)`` of a slice gives)."""
    buffer = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    buffer[..., ::2] = t
    return buffer[..., ::2]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layer", ["attention.query", "attention.proj", "mlp.dense1", "mlp.dense2"])
def test_strided_linear_weights_give_the_bits_of_dense_ones(layer, batch):
    """The fast path's numbers do not depend on where the weights lie (docs/architecture.md, contract 5): a linear
    weight with every other column of a wider buffer went to oneDNN's GEMM as it was and gave other last bits than
    the same weights dense (the GEMM attention copies its projections dense; stages 3 and 4, and the Mix-FFN, did
    not). The reference path gives the same bits either way."""
    model = _model()
    twin = PvtV2ForImageClassification(model.config).eval()
    state = model.state_dict()
    strided = {k: _every_other_column(v) if k.endswith(layer + ".weight") else v for k, v in state.items()}
    assert sum(not v.is_contiguous() for v in strided.values()) == sum(TINY["depths"])
    twin.load_state_dict(strided, strict=True, assign=True)
    x = torch.randn(batch, 3, 72, 88, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.pvt_v2(x, output_hidden_states=True).hidden_states
        got = twin.pvt_v2(x, output_hidden_states=True).hidden_states
        with fast.fast_path(False):
            reference = model.pvt_v2(x, output_hidden_states=True).hidden_states[-1]
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    assert relative_error(reference, got[-1]) < 1e-5  # and both hold the model's weights
