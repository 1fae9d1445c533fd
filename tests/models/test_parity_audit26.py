"""Parity audit 26: transformers' PvtV2 against pvtv2 where the earlier parity tests do not reach.

Every Mix-FFN activation name transformers' PvtV2 builds (its ACT2FN table), in float64 on the reference path and
in float32 on the fast path, frozen or not, with hostile weights (tests/models/test_adversarial_parity.py).
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from conftest import TINY, relative_error
from test_adversarial_parity import TOL32, TOL64, hf_pair
from transformers.activations import ACT2CLS

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast

# transformers' names whose activation holds weights of its own (a PReLU's slope, xIELU's alphas): a state dict of
# such a model has keys no PVTv2 layout has, and pvtv2 refuses the names.
WITH_WEIGHTS = {"prelu", "xielu"}
PARAMETER_FREE = sorted(set(ACT2CLS) - WITH_WEIGHTS)


@pytest.mark.parametrize("act", PARAMETER_FREE)
def test_every_transformers_activation_name_computes_transformers_numbers(act):
    config = PvtV2Config(**TINY, hidden_act=act, num_labels=3)
    ours, theirs = hf_pair(config, seed=11)
    x = torch.randn(2, 3, 37, 45, dtype=torch.float64) * 3
    with torch.no_grad():
        assert relative_error(theirs(x).logits, ours(x).logits) < TOL64
    ours, theirs = ours.float(), theirs.float()
    x = x.float()
    with torch.no_grad():
        expected = theirs(x).logits
        assert relative_error(expected, ours(x).logits) < TOL32
        fast.freeze(ours)
        assert relative_error(expected, ours(x).logits) < TOL32


@pytest.mark.parametrize("act", sorted(WITH_WEIGHTS))
def test_activation_names_with_weights_are_refused_by_name(act):
    assert act in ACT2CLS  # transformers still has them: the refusal is pvtv2's choice
    with pytest.raises(ValueError, match=f"hidden_act='{act}' is not supported"):
        PvtV2Config(**TINY, hidden_act=act)


def test_save_pretrained_says_transformers_builds_no_model_of_the_selu_pvtv2_takes(tmp_path, caplog):
    """pvtv2 takes "selu" (which the model documentation lists); transformers' table lacks it and its model fails
    to build from such a config.json, so save_pretrained says so, as it does for fractional MLP ratios."""
    model = PvtV2ForImageClassification(PvtV2Config(**TINY, hidden_act="selu", num_labels=3))
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        model.save_pretrained(tmp_path)
    assert "hidden_act" in caplog.text and "'selu'" in caplog.text and "transformers" in caplog.text
    with pytest.raises(KeyError, match="selu"):
        transformers.PvtV2ForImageClassification.from_pretrained(tmp_path)
