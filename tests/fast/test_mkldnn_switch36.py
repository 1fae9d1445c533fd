"""``torch.backends.mkldnn.flags(enabled=False)`` switches oneDNN off for ATen; the fast paths (inference, frozen or
not, and training's GEMMs), which are oneDNN calls, follow it: the model then computes exactly what its reference
path computes under the same switch, bit for bit."""

import pytest
import torch

import pvtv2.fast as fast
from pvtv2 import PvtV2Config, PvtV2ForImageClassification
from pvtv2.fast import train as fast_train


def _model(seed: int) -> PvtV2ForImageClassification:
    torch.manual_seed(seed)
    config = PvtV2Config(hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4], depths=[1, 1, 2, 1],
                         num_labels=7)
    model = PvtV2ForImageClassification(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("frozen", [False, True])
def test_inference_under_the_switch_is_the_reference_paths_computation(frozen):
    if not fast.fast_path_available():
        pytest.skip("no oneDNN fast path on this build")
    model = _model(36)
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        on = model(x).logits
        if frozen:
            fast.freeze(model)
            model(x)
        with torch.backends.mkldnn.flags(enabled=False):
            got = model(x).logits
            with fast.fast_path(False):
                expected = model(x).logits
        # the fast path with oneDNN on is a different summation: the comparison can tell the two apart
        assert not torch.equal(on, expected)
        assert torch.equal(got, expected)
        assert torch.equal(model(x).logits, on)  # and back on once the switch is left


def test_training_gemms_under_the_switch_are_the_reference_paths_gradients():
    if not fast.fast_path_available():
        pytest.skip("no oneDNN fast path on this build")
    model = _model(37).train()
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([1, 5])

    def grads():
        model.zero_grad(set_to_none=True)
        model(x, labels=labels).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    with fast_train.train_gemm("onednn"), torch.backends.mkldnn.flags(enabled=False):
        got = grads()
        with fast.fast_path(False):
            expected = grads()
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
