"""torch.jit.trace of the models with autograd on, as transformers' PvtV2 traces.

The trace's own check reruns the model under no_grad; with autograd on, the linear layers' training path read the
weights in the attention's scope where the rerun called the layers, and the trace was refused ("Graphs differed
across invocations"). Under tracing the layers are now called as modules either way.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from conftest import TINY, hf_config

from pvtv2 import PvtV2Config, PvtV2ForImageClassification


@pytest.mark.parametrize("extra", [{}, {"linear_attention": True}, {"sr_ratios": [1, 1, 1, 1]}])
def test_trace_with_autograd_on_checks_and_matches_transformers(extra):
    torch.manual_seed(0)
    config = PvtV2Config(**{**TINY, **extra})
    ours = PvtV2ForImageClassification(config).eval()
    theirs = transformers.PvtV2ForImageClassification(hf_config(config)).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about Python values
        traced = torch.jit.trace(ours, x, strict=False)  # check_trace=True: raised TracingCheckError before
        traced_theirs = torch.jit.trace(theirs, x, strict=False)
    y = torch.randn(2, 3, 32, 32, requires_grad=True)
    got = traced(y)["logits"]
    want = traced_theirs(y)["logits"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, ours(y).logits, rtol=1e-5, atol=1e-5)
    # Gradients through the trace equal the eager model's (the training path outside the trace).
    (grad_traced,) = torch.autograd.grad(got.square().sum(), y)
    (grad_eager,) = torch.autograd.grad(ours(y).logits.square().sum(), y)
    torch.testing.assert_close(grad_traced, grad_eager, rtol=1e-4, atol=1e-6)
