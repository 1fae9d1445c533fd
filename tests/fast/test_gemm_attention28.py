"""The fast CPU path's attention at batch 1 where the queries far outnumber the keys (pvtv2.fast.cpu._attention):
two GEMMs around the softmax, all heads at once, with the query and output projections folded into the keys and
values. Held to transformers' numbers: with and without frozen weights, without the projections' biases, after the
weights change, and where SDPA runs instead (larger batches, few queries per key, too many scores)."""

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
    """Ours and transformers' with the same random weights; ``bias=False``: the queries and output projections of
    stages 1 and 2 (one and two heads) without bias in both."""
    theirs = random_weights_(transformers.PvtV2ForImageClassification(hf_config(config)), seed=seed).eval()
    if not bias:
        for block in [*theirs.pvt_v2.encoder.layers[0].blocks, *theirs.pvt_v2.encoder.layers[1].blocks]:
            for name in ("query", "proj"):
                old = getattr(block.attention, name)
                new = torch.nn.Linear(old.in_features, old.out_features, bias=False)
                with torch.no_grad():
                    new.weight.copy_(old.weight)
                setattr(block.attention, name, new)
    ours = PvtV2ForImageClassification(config)
    if not bias:
        for block in [*ours.pvt_v2.encoder.layers[0].blocks, *ours.pvt_v2.encoder.layers[1].blocks]:
            width = block.attention.query.in_features
            block.attention.query = torch.nn.Linear(width, width, bias=False)
            block.attention.proj = torch.nn.Linear(width, width, bias=False)
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
        # Stages 1 and 2 (396 and 99 queries, 4 keys per head, 1 and 2 heads) ran without SDPA; stages 3 and 4 (30
        # queries against 3 x 6 keys, 9 against 4 x 9) with it. Linear attention pools to 7 x 7 keys: only stage 1.
        sdpa_blocks = sum(TINY["depths"][1:]) if linear else TINY["depths"][2] + TINY["depths"][3]
        assert sdpa_calls(ours, x) == sdpa_blocks
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
            attention = model.pvt_v2.encoder.layers[1].blocks[1].attention  # two heads
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
        # 1,024 scores in stage 1 (16 x 16 queries, 2 x 2 keys), 512 in stage 2 (8 x 8 queries, 2 heads of 2 x 2 keys)
        monkeypatch.setattr(cpu, "GEMM_ATTENTION_SCORES", 511)
    with torch.no_grad():
        assert sdpa_calls(ours, x) == sum(TINY["depths"])
        assert relative_error(theirs(x).logits, ours(x).logits) < TOL
