"""A model read from a file computes the same numbers, bit for bit, as the model that wrote it: its parameters lie
in 64-byte aligned memory of their own (safetensors stores tensors at offsets that are not; GEMMs round by their
operands' alignment, so the reloaded model's logits differed in the last bits)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, random_weights_

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast


@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_reloaded_model_gives_the_saved_models_numbers_bit_for_bit(tmp_path, fast_path, batch):
    model = random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=7)), seed=5).eval()
    model.save_pretrained(tmp_path)
    again = PvtV2ForImageClassification.from_pretrained(tmp_path).eval()
    assert all(p.data_ptr() % 64 == 0 for p in again.parameters())
    x = torch.randn(batch, 3, 72, 88)
    with torch.no_grad(), fast.fast_path(fast_path):
        expected, got = model(x).logits, again(x).logits
    assert torch.equal(got, expected)
    # a closed check that the weights are the saved ones, not merely equal by construction
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
