"""What transformers' PreTrainedModel answers and tools read (its Trainer, PEFT): base_model_prefix, base_model,
supports_gradient_checkpointing, is_gradient_checkpointing, get_memory_footprint; each compared with transformers'
own model of the same config."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import TINY, hf_config

from pvtv2 import PvtV2Backbone, PvtV2Config, PvtV2ForImageClassification, PvtV2Model

PAIRS = [(PvtV2ForImageClassification, transformers.PvtV2ForImageClassification), (PvtV2Model, transformers.PvtV2Model),
         (PvtV2Backbone, transformers.PvtV2Backbone)]


@pytest.mark.parametrize("ours_cls, theirs_cls", PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_pretrained_attributes_as_transformers(ours_cls, theirs_cls):
    extra = {"out_features": ["stage2", "stage4"]} if ours_cls is PvtV2Backbone else {}
    config = PvtV2Config(**TINY, **extra)
    ours, theirs = ours_cls(config), theirs_cls(hf_config(config))
    assert ours.base_model_prefix == theirs.base_model_prefix
    assert ours.supports_gradient_checkpointing == theirs.supports_gradient_checkpointing
    # base_model: the encoder inside a classifier, the model itself otherwise (transformers' classes as ours).
    assert type(ours.base_model).__name__ == type(theirs.base_model).__name__
    assert (ours.base_model is ours) == (theirs.base_model is theirs)
    for dtype in (torch.float32, torch.bfloat16):
        ours.to(dtype)
        theirs.to(dtype)
        for buffers in (True, False):
            assert ours.get_memory_footprint(buffers) == theirs.get_memory_footprint(return_buffers=buffers)
    n_params = sum(p.numel() for p in ours.parameters())
    assert ours.get_memory_footprint(False) == 2 * n_params  # bf16: two bytes a parameter


def test_is_gradient_checkpointing_follows_enable_and_disable():
    model = PvtV2ForImageClassification(PvtV2Config(**TINY))
    theirs = transformers.PvtV2ForImageClassification(hf_config(PvtV2Config(**TINY)))
    assert model.is_gradient_checkpointing is False is theirs.is_gradient_checkpointing
    model.gradient_checkpointing_enable()
    theirs.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing is True is theirs.is_gradient_checkpointing
    model.gradient_checkpointing_disable()
    assert model.is_gradient_checkpointing is False
