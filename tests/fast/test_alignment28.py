"""The fast path's numbers do not depend on where the weights lie in memory: a model read from a safetensors file
(tensors at the file's offsets, not 64-byte aligned) gave other last bits than the same weights in fresh memory
through the batch-1 GEMM attention, whose products round by their operands' alignment."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, random_weights_

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast

pytestmark = pytest.mark.skipif(
    not fast.fast_path_available(torch.float32), reason="the oneDNN operators of the fast path are not available here"
)


def misaligned_copy(model: torch.nn.Module, offset: int) -> torch.nn.Module:
    """A model with the same weights, each at ``offset`` elements into a buffer of its own (4 * offset bytes off
    PyTorch's 64-byte alignment)."""
    twin = PvtV2ForImageClassification(model.config).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        buffer = torch.empty(tensor.numel() + offset, dtype=tensor.dtype)
        view = buffer[offset:].view(tensor.shape)
        view.copy_(tensor)
        state[name] = view
    twin.load_state_dict(state, strict=True, assign=True)
    return twin


def encoder_maps(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return model.pvt_v2(x, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("offset", [1, 3, 5])
def test_outputs_are_bit_equal_whatever_the_weights_alignment(frozen, batch, offset):
    config = PvtV2Config(**TINY, num_labels=5)
    model = random_weights_(PvtV2ForImageClassification(config), seed=11).eval()
    twin = misaligned_copy(model, offset)
    query = twin.pvt_v2.encoder.layers[0].blocks[0].attention.query.weight
    assert query.data_ptr() % 64 == 4 * offset
    if frozen:
        fast.freeze(model), fast.freeze(twin)
    x = torch.randn(batch, 3, 72, 88)
    # The encoder's maps (the fast path's work; the classifier is PyTorch's F.linear, whose GEMV rounds by alignment)
    with torch.no_grad():
        expected, got = encoder_maps(model, x), encoder_maps(twin, x)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    # and the reference path's numbers, to fp32 rounding, as a check that both copies hold the same weights
    with torch.no_grad(), fast.fast_path(False):
        reference = encoder_maps(model, x)[-1]
    got = got[-1]
    assert (got - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()
