"""The public-op path that GPUs run, checked on this CPU: no host synchronisation in a forward pass (with or without
labels, training or not), and attention inputs laid out for PyTorch's fused attention kernels (no copies around
``scaled_dot_product_attention``)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

from pvtv2 import PvtV2Backbone, PvtV2Config, PvtV2ForImageClassification, fast
from pvtv2.models import layers


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("linear", [False, True], ids=["sra", "linear sra"])
def test_forward_and_loss_make_no_host_sync(training, linear):
    """On the meta device every operation that would wait for an accelerator (``.item()``, ``int(t)``, ``nonzero``,
    boolean indexing, ``.tolist()``) raises: a forward pass and its loss that run there make no host sync."""
    with torch.device("meta"):
        model = PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5, linear_attention=linear,
                                                        drop_path_rate=0.1, hidden_dropout_prob=0.1))
        backbone = PvtV2Backbone(PvtV2Config(**TINY, out_features=["stage2", "stage4"]))
    model.train(training)
    x = torch.empty(2, 3, 64, 64, device="meta")
    labels = torch.empty(2, dtype=torch.long, device="meta")
    out = model(x, labels=labels, output_hidden_states=True)
    assert out.loss.device.type == "meta" and out.logits.shape == (2, 5)
    if training:
        out.loss.backward()
        assert model.classifier.weight.grad is not None
    assert [m.shape[1] for m in backbone(x).feature_maps] == [32, 64]
    # The check that does need the values runs where they are, on the host: labels out of range still raise there.
    with pytest.raises(ValueError, match="out of range"):
        PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5))(torch.randn(1, 3, 64, 64), labels=torch.tensor([7]))


def test_attention_inputs_suit_the_fused_kernels(monkeypatch):
    """Queries, keys and values reach SDPA as views with a contiguous last dimension and 16-byte aligned strides and
    offsets, which the flash and memory-efficient kernels take as they are; the output's token view is free. (CPU
    training computes the attention explicitly: SDPA is chosen here as on a GPU.)"""
    monkeypatch.setattr(layers, "_explicit_attention", lambda q, k: False)
    model = PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=3)).train()
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        out = sdpa(q, k, v, *args, **kwargs)
        calls.append((q, k, v))
        return out

    with mock.patch.object(F, "scaled_dot_product_attention", spy), fast.fast_path(False):
        model(torch.randn(2, 3, 64, 80)).logits.sum().backward()
    assert len(calls) == sum(model.config.depths)
    for q, k, v in calls:
        for t in (q, k, v):
            assert t.stride(-1) == 1
            assert all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
            assert t.data_ptr() % 16 == 0
        # No copies: queries are a view of the query projection, keys and values of the one key/value GEMM.
        assert k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
        assert not q.is_contiguous() or q.shape[1] == 1  # (B, heads, N, d) as a view of (B, N, heads, d)
