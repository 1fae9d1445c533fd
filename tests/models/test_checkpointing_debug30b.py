"""``gradient_checkpointing_kwargs={"debug": True}``, one of torch.utils.checkpoint's arguments that
``gradient_checkpointing_enable`` lists as taken (and transformers passes through): the gradients are those without
checkpointing, with dropout and stochastic depth on (the same masks), and transformers' own with the same argument.

Found and held here: pvtv2 adds a context_fn of its own (the forward's fast-path choices for the recomputation), and
torch.utils.checkpoint takes ``debug=True`` with its default context_fn only, so the first training step raised
"debug=True is incompatible with non-default context_fn", where transformers' model trains.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from pvtv2 import PvtV2Config, PvtV2ForImageClassification

from conftest import TINY, hf_config

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
LABELS = torch.tensor([0, 1])


def _grads(model) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the dropout and drop-path masks
    F.cross_entropy(model(X).logits, LABELS).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("drop", [False, True], ids=["no dropout", "dropout and drop path"])
def test_debug_true_trains_with_the_gradients_of_no_checkpointing(drop):
    extra = dict(drop_path_rate=0.3, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2) if drop else {}
    torch.manual_seed(0)
    model = PvtV2ForImageClassification(PvtV2Config(**TINY, **extra)).train()
    plain = _grads(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"debug": True})
    got = _grads(model)
    assert set(got) == set(plain) and len(got) == len(list(model.parameters()))
    for key in plain:
        torch.testing.assert_close(got[key], plain[key], rtol=0, atol=0, msg=key)


def test_debug_true_gives_transformers_gradients():
    torch.manual_seed(0)
    config = PvtV2Config(**TINY)
    ours = PvtV2ForImageClassification(config).train()
    theirs = transformers.PvtV2ForImageClassification(hf_config(config)).train()
    theirs.load_state_dict(ours.state_dict())
    for model in (ours, theirs):
        model.activation_checkpointing_enable({"debug": True, "use_reentrant": False})
    got, want = _grads(ours), _grads(theirs)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)
