"""Hostile checks of the fused key-value split and of the losses under torch.compile (the changes of 27 November):
what the modules themselves compute, or fail on, is what every path computes, or fails on."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast
from pvtv2.models.layers import SpatialReductionAttention
from pvtv2.models.segmentation import PvtV2ForSemanticSegmentation

from conftest import TINY, relative_error


@pytest.mark.parametrize("widths", [(16, 48), (8, 24), (24, 8)], ids=["value-3x", "both-halved", "key-wider"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_key_or_value_of_another_width_is_an_error_as_calling_them(widths, training):
    """Keys and values run as one GEMM whose output is split into heads. A key or value layer replaced by one of
    another width was split there without complaint (a view with -1 tokens took twice the tokens, or half of the
    keys from the values), where calling the modules fails: an attention over made-up keys, silently."""
    torch.manual_seed(0)
    attention = SpatialReductionAttention(16, 2, sr_ratio=2).train(training)
    attention.key, attention.value = nn.Linear(16, widths[0]), nn.Linear(16, widths[1])
    x = torch.randn(1, 64, 16)
    attention.value.register_forward_hook(lambda module, args, out: out)  # the modules' own path: the reference
    with pytest.raises(RuntimeError, match="invalid for input of size"):
        attention(x, 8, 8)
    attention.value._forward_hooks.clear()
    with pytest.raises(RuntimeError, match="invalid for input of size"):
        attention(x, 8, 8)


@pytest.mark.skipif(not fast.fast_path_available(torch.float32), reason="the fast path's oneDNN operators are absent")
def test_fast_path_refuses_a_value_layer_of_another_width():
    """The fast CPU inference path splits its own key-value product the same way: a wider value layer (in eval mode,
    so every module is of a type the fused code knows) was computed with made-up keys instead of failing as the
    reference path does."""
    torch.manual_seed(0)
    model = PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=4))
    model.pvt_v2.encoder.layers[0].blocks[0].attention.value = nn.Linear(16, 48)
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), fast.fast_path(False), pytest.raises(RuntimeError, match="invalid for input of size"):
        model(x)
    with torch.no_grad(), fast.fast_path(True):
        with pytest.raises(RuntimeError, match="invalid for input of size"):
            model(x)
        assert not fast.applies(x, model.pvt_v2.encoder.layers[0])
        assert fast.applies(x, model.pvt_v2.encoder.layers[1])  # the other stages still take the fast path


def test_torch_compile_of_a_segmentation_training_step_is_one_graph_with_eager_gradients():
    """The segmentation loss checked the label range with data-dependent reads (``int(valid.min())``) inside the
    traced code: ``torch.compile(fullgraph=True)`` of a training step failed (a guard on a data-dependent value), and
    without fullgraph the graph broke there. Under compile the check is cross_entropy's, which still raises on a
    label out of range; loss and gradients as in eager mode, ignored pixels included."""
    torch.manual_seed(0)
    model = PvtV2ForSemanticSegmentation(PvtV2Config(**TINY, num_labels=3)).train()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 3, (2, 64, 64))
    labels[:, :, :7] = 255  # ignored pixels
    torch._dynamo.reset()
    compiled = torch.compile(twin, fullgraph=True, dynamic=False, backend="aot_eager")
    torch.manual_seed(1)  # the decode head's dropout: the same draws in both runs
    loss = compiled(x, labels=labels).loss
    loss.backward()
    torch.manual_seed(1)
    expected = model(x, labels=labels).loss
    expected.backward()
    assert relative_error(expected, loss) < 1e-6
    checked = 0
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.grad.abs().max() < 1e-6:
            # Zero up to rounding: softmax ignores a shift shared by all keys, and the decode head's batch norm a
            # shift shared by all pixels (the fused projections' biases, the last stage's norm bias).
            assert q.grad.abs().max() < 1e-6, name
        else:
            assert relative_error(p.grad, q.grad) < 1e-4, name
            checked += 1
    assert checked > 100
    bad = labels.clone()
    bad[0, 5, 9] = 7
    with pytest.raises(ValueError, match=r"label values \[7\] are out of range for 3 classes"):
        model(x, labels=bad)
    with pytest.raises(IndexError, match="Target 7 is out of bounds"):
        compiled(x, labels=bad)
    torch._dynamo.reset()
