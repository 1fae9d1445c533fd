"""EMA against its recurrence, parameter groups and layer-wise decay against the model's structure, frozen stages,
the capped warmup and the poly schedule against closed forms, the validation split."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from pvtv2 import PvtV2Config, PvtV2ForImageClassification
from pvtv2.data.folders import split_samples
from pvtv2.models.segmentation import PvtV2ForSemanticSegmentation
from pvtv2.training.recipes import (
    WeightEma,
    capped_warmup_steps,
    encoder_layer_ids,
    freeze_stages,
    parameter_groups,
    poly_factor,
)

from conftest import TINY


@pytest.fixture
def model() -> PvtV2ForImageClassification:
    torch.manual_seed(0)
    return PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=3, drop_path_rate=0.1))


def test_ema_follows_its_recurrence_weights_and_buffers():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = WeightEma(net, 0.9)
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    for step in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()(torch.randn(8, 4))  # moves the BatchNorm statistics
        ema.update(net)
        for key, value in net.state_dict().items():
            if value.is_floating_point():  # the first update copies; then ema = 0.9 ema + 0.1 value
                expected[key] = value.clone() if step == 0 else 0.9 * expected[key] + 0.1 * value
    averaged = ema.module.state_dict()
    for key, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(averaged[key], value, rtol=1e-5, atol=1e-6)
    restored = WeightEma(net, 0.9)
    restored.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), ema.state_dict().values()))
    for decay in (0.0, 1.0, 1.5, "0.9"):
        with pytest.raises(ValueError, match="EMA decay"):
            WeightEma(net, decay)


def test_layer_ids_follow_the_blocks(model):
    ids, top = encoder_layer_ids(model)
    assert top == sum(TINY["depths"]) + 1 == 6
    assert ids["pvt_v2.encoder.layers.0.patch_embedding.proj.weight"] == 0
    assert ids["pvt_v2.encoder.layers.0.blocks.0.mlp.dense1.weight"] == 1
    assert ids["pvt_v2.encoder.layers.0.layer_norm.weight"] == 1
    assert ids["pvt_v2.encoder.layers.1.patch_embedding.proj.weight"] == 2
    assert ids["pvt_v2.encoder.layers.1.blocks.1.attention.query.weight"] == 3
    assert ids["pvt_v2.encoder.layers.3.layer_norm.bias"] == 5
    assert ids["classifier.weight"] == 6


def test_parameter_groups_scale_learning_rates(model):
    groups = parameter_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    ids, top = encoder_layer_ids(model)
    seen = 0
    for group in groups:
        for p in group["params"]:
            name = names[id(p)]
            assert group["lr"] == pytest.approx(1e-3 * 0.5 ** (top - ids[name]))
            assert group["weight_decay"] == (0.05 if p.ndim > 1 else 0.0)
            seen += 1
    assert seen == len(list(model.parameters()))
    plain = parameter_groups(model, lr=1e-3, weight_decay=0.05)
    assert len(plain) == 2 and all(g["lr"] == 1e-3 for g in plain)
    with pytest.raises(ValueError, match="layer_decay"):
        parameter_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=1.5)


def test_head_learning_rate_multiplier():
    torch.manual_seed(0)
    seg = PvtV2ForSemanticSegmentation(PvtV2Config(**TINY, num_labels=3))
    groups = parameter_groups(seg, lr=6e-5, weight_decay=0.01, head_lr_mult=10.0)
    head = {id(p) for p in seg.decode_head.parameters()}
    for group in groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1
        assert group["lr"] == pytest.approx(6e-4 if in_head.pop() else 6e-5)


def test_frozen_stages_get_no_gradient_and_no_noise():
    torch.manual_seed(0)
    model = PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=3, drop_path_rate=0.8))
    unfrozen = [model.pvt_v2.encoder.layers[1](torch.randn(8, 16, 16, 16))[0] for _ in range(2)]
    assert not torch.equal(*unfrozen)  # stochastic depth at work before freezing
    frozen = freeze_stages(model, 2)
    stage_params = [p for s in range(2) for p in model.pvt_v2.encoder.layers[s].parameters()]
    assert frozen == sum(p.numel() for p in stage_params)
    assert all(not p.requires_grad for p in stage_params)
    assert all(p.requires_grad for p in model.pvt_v2.encoder.layers[2].parameters())
    groups = parameter_groups(model, lr=1e-3, weight_decay=0.05)
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])
    model.train()
    pixels = torch.randn(8, 3, 64, 64)
    stages = model.pvt_v2.encoder.layers
    features = stages[0](pixels)[0]
    assert any(getattr(m, "drop_prob", 0) for m in stages[2].modules())  # stage 2 keeps its stochastic depth
    outputs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        outputs.append(stages[1](features)[0])  # blocks with drop-path rates 0.2 and 0.4 before freezing
    assert torch.equal(*outputs)  # stochastic depth is off in a frozen stage, even in train mode
    model(pixels).logits.sum().backward()
    assert all(p.grad is None for p in stage_params)
    for bad in (-1, 5, 1.5):
        with pytest.raises(ValueError, match=r"^stages must be an integer in \[0, 4\]"):  # the function's argument
            freeze_stages(model, bad)


def test_warmup_is_capped_for_short_runs(caplog):
    assert capped_warmup_steps(5, 100, 30000) == 500  # a long run keeps its warmup
    with caplog.at_level(logging.INFO, logger="pvtv2.training.recipes"):
        assert capped_warmup_steps(5, 10, 40) == 10  # 4 epochs of 10 steps: a quarter of 40
    assert "capped at 10 steps" in caplog.text
    assert capped_warmup_steps(0, 10, 40) == 0


def test_poly_schedule_is_mmsegmentations():
    total = 100
    assert poly_factor(0, total_steps=total) == 1.0
    assert poly_factor(50, total_steps=total) == pytest.approx(0.5**0.9)
    assert poly_factor(100, total_steps=total) == 0.0
    assert poly_factor(4, total_steps=total, warmup_steps=10) == pytest.approx(0.5)
    assert poly_factor(55, total_steps=total, warmup_steps=10) == pytest.approx((1 - 45 / 90) ** 0.9)
    assert poly_factor(100, total_steps=total, min_ratio=0.1) == pytest.approx(0.1)


def test_validation_split_is_stratified_and_seeded():
    samples = [(f"a{i}", 0) for i in range(20)] + [(f"b{i}", 1) for i in range(7)] + [("c0", 2)]
    train, val = split_samples(samples, 0.1, seed=3)
    assert sorted(train + val) == sorted(samples)
    assert [label for _, label in val].count(0) == 2 and [label for _, label in val].count(1) == 1
    assert ("c0", 2) in train  # a class of one stays in training
    assert split_samples(samples, 0.1, seed=3) == (train, val)
    assert split_samples(samples, 0.1, seed=4)[1] != val
    assert train == [s for s in samples if s not in val]  # the original order
    unlabelled = [(i, None) for i in range(10)]
    assert len(split_samples(unlabelled, 0.25, seed=0)[1]) == 2  # round(2.5) is 2 (halves to even)
    for bad in (0, 1, 1.5, "0.1"):
        with pytest.raises(ValueError, match="fraction in"):
            split_samples(samples, bad, seed=0)
    assert math.isclose(len(split_samples(samples, 0.5, seed=0)[1]), 10 + 4)  # round(3.5) = 4
    # Every class a single sample: nothing to validate on is refused, not an empty split evaluated as 0%.
    with pytest.raises(ValueError, match="would be empty: none of the 3 class"):
        split_samples([("a", 0), ("b", 1), ("c", 2)], 0.5, seed=0)
    with pytest.raises(ValueError, match="would be empty"):
        split_samples([], 0.5, seed=0)
