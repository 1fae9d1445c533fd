"""The fast CPU path's one-head attention at batch 1 (pvtv2.fast.cpu._attention): two GEMMs around the softmax with
the query and output projections folded into the keys and values. Held to transformers' numbers: with and without
frozen weights, without the projections' biases, after the weights change, and where it hands over to SDPA (larger
batches, several heads, too many scores)."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import TINY, hf_config, random_weights_, relative_error

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast
from pvtv2.fast import cpu

TOL = 1e-5
pytestmark = pytest.mark.skipif(
    not fast.fast_path_available(torch.float32), reason="the oneDNN operators of the fast path are not available here"
)
SDPA = "aten::scaled_dot_product_attention"


def pair(config: PvtV2Config, seed: int = 0, bias: bool = True):
    """Ours and transformers' with the same random weights; ``bias=False``: stage 1's query and output projection
    without bias in both."""
    theirs = random_weights_(transformers.PvtV2ForImageClassification(hf_config(config)), seed=seed).eval()
    if not bias:
        for block in theirs.pvt_v2.encoder.layers[0].blocks:
            for name in ("query", "proj"):
                old = getattr(block.attention, name)
                new = torch.nn.Linear(old.in_features, old.out_features, bias=False)
                with torch.no_grad():
                    new.weight.copy_(old.weight)
                setattr(block.attention, name, new)
    ours = PvtV2ForImageClassification(config)
    if not bias:
        for block in ours.pvt_v2.encoder.layers[0].blocks:
            block.attention.query = torch.nn.Linear(block.attention.query.in_features, block.attention.query.out_features, bias=False)
            block.attention.proj = torch.nn.Linear(block.attention.proj.in_features, block.attention.proj.out_features, bias=False)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.eval(), theirs


def sdpa_calls(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x)
    return sum(1 for event in prof.events() if event.name == SDPA)


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_one_image_matches_transformers(frozen, linear, bias):
    config = PvtV2Config(**TINY, linear_attention=linear, num_labels=5)
    ours, theirs = pair(config, seed=4, bias=bias)
    if frozen:
        fast.freeze(ours)
    x = torch.randn(1, 3, 72, 88)
    with torch.no_grad():
        expected = theirs(x, output_hidden_states=True)
        got = ours(x, output_hidden_states=True)
        # Stage 1 (one block, one head) ran without SDPA; the four blocks of the other stages (2 to 4 heads) with it.
        assert sdpa_calls(ours, x) == sum(TINY["depths"][1:])
    assert relative_error(expected.logits, got.logits) < TOL
    for ref, mine in zip(expected.hidden_states, got.hidden_states):
        assert relative_error(ref, mine) < TOL


def test_frozen_model_sees_new_query_key_value_and_projection_weights():
    config = PvtV2Config(**TINY, num_labels=5)
    ours, theirs = pair(config, seed=5)
    fast.freeze(ours)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        first = ours(x).logits  # packs the weights
        for model in (ours, theirs):
            attention = model.pvt_v2.encoder.layers[0].blocks[0].attention
            for layer in (attention.query, attention.key, attention.value, attention.proj):
                layer.weight.mul_(1.5)
                layer.bias.add_(0.1)
        expected, got = theirs(x).logits, ours(x).logits
    assert relative_error(expected, got) < TOL
    assert relative_error(first, got) > 1e-3  # the change shows in the logits
    assert cpu.is_frozen(ours)


@pytest.mark.parametrize("case", ["batch of two", "too many scores"])
def test_sdpa_where_the_gemms_do_not_apply(case, monkeypatch):
    config = PvtV2Config(**TINY, num_labels=5)
    ours, theirs = pair(config, seed=6)
    x = torch.randn(2 if case == "batch of two" else 1, 3, 64, 64)
    if case == "too many scores":
        # stage 1 here: 16 x 16 queries, 2 x 2 keys (sr_ratio 8)
        monkeypatch.setattr(cpu, "GEMM_ATTENTION_SCORES", 16 * 16 * 2 * 2 - 1)
    with torch.no_grad():
        assert sdpa_calls(ours, x) == sum(TINY["depths"])
        assert relative_error(theirs(x).logits, ours(x).logits) < TOL
