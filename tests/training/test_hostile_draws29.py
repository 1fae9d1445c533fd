"""Stochastic depth and attention dropout drawn as transformers' PVTv2 (round 29), tried as a hostile user would:
rates at and past the ends of [0, 1], float64 and bf16 autocast, a batch of one, channels-last images, attention
maps in eval and training, gradient checkpointing, and a killed `pvtv2 train --drop-path` run resumed. Each check
compares with something that does not depend on the code under test: transformers' or timm's drop path, the same
model without checkpointing, an uninterrupted run."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, hf_config, random_weights_, relative_error
from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast
from pvtv2.models.layers import DropPath
from pvtv2.training.engine import KILL_ENV

# The helper lives in tests/models: on the path only once pytest has collected a module there (a whole-suite run),
# not when this file runs by itself.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from test_dropout_draws29 import _dense_pair
from training_fixtures import ENV, common_args, run_records, run_train

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
from transformers.models.pvt_v2.modeling_pvt_v2 import PvtV2DropPath  # noqa: E402

pytest_plugins = ["training_fixtures"]

DROPS = dict(drop_path_rate=0.4, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.25)


def _pair(config: PvtV2Config, dtype=torch.float32):
    """transformers' classifier with random weights and ours with the same weights, both training."""
    with torch.device("meta"):
        theirs = transformers.PvtV2ForImageClassification(hf_config(config))
        ours = PvtV2ForImageClassification(config)
    random_weights_(theirs, seed=0)
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    return ours.to(dtype).train(), theirs.to(dtype).train()


def _step(model, x, labels, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x, labels=labels)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------- rates at the ends
def test_drop_path_of_one_drops_every_sample_as_timm_where_transformers_gives_nan():
    """keep = 0: x / 0 * 0 is NaN (transformers' formula; the former bernoulli_ form divided 0 by 0 too). A branch
    dropped always contributes zeros (timm's answer), and the generator moves as transformers' draw moves it."""
    x = torch.randn(6, 5, 4)
    torch.manual_seed(3)
    theirs = PvtV2DropPath(1.0).train()(x)
    after_theirs = torch.rand(2)
    assert torch.isnan(theirs).all()  # what transformers gives: the reason not to copy it here
    torch.manual_seed(3)
    got = DropPath(1.0).train()(x)
    assert torch.equal(torch.rand(2), after_theirs)
    assert torch.equal(got, timm.layers.drop_path(x, 1.0, training=True))
    assert torch.equal(got, torch.zeros_like(x))


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan"), float("inf")])
def test_a_drop_path_rate_outside_zero_one_is_refused_by_name(rate):
    """A negative keep or one over 1 made masks of -1 or scaled every sample silently (bernoulli_ refused them before
    this round's change); the config refuses these rates, and the layer does too, built or changed after."""
    with pytest.raises(ValueError, match="drop_prob"):
        DropPath(rate)
    layer = DropPath(0.2).train()
    layer.drop_prob = rate
    with pytest.raises(ValueError, match="drop_prob"):
        layer(torch.ones(3, 4))
    with pytest.raises(ValueError, match="drop_path_rate"):
        PvtV2Config(**TINY, drop_path_rate=rate)
    with pytest.raises(ValueError, match="drop_path_rate"):
        PvtV2Config(**TINY, drop_path_rate=1.0)


def test_a_numpy_or_integer_rate_is_a_rate():
    """np.float32(0.3) (a rate read from an array) and 0 are rates: the same draws as the Python float."""
    import numpy as np

    x = torch.randn(50, 4)
    torch.manual_seed(2)
    want = PvtV2DropPath(0.3).train()(x)
    torch.manual_seed(2)
    got = DropPath(np.float32(0.3)).train()(x)
    torch.manual_seed(2)
    assert torch.equal(got, PvtV2DropPath(float(np.float32(0.3))).train()(x))
    assert not torch.equal(want, x)
    assert torch.equal(DropPath(0).train()(x), x)


# ---------------------------------------------------------------------------------------------- dtypes, shapes
@pytest.mark.parametrize("case", ["float64", "batch_of_one", "channels_last"])
def test_training_step_equals_transformers_under_the_same_seed(case):
    config = PvtV2Config(**TINY, **DROPS, num_labels=5)
    dtype = torch.float64 if case == "float64" else torch.float32
    ours, theirs = _pair(config, dtype)
    batch = 1 if case == "batch_of_one" else 4
    x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=dtype)
    labels = torch.tensor([0, 4, 2, 1][:batch])
    theirs_x = x.clone()
    if case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    with fast.train_gemm("aten"):
        got, got_grads = _step(ours, x, labels, seed=11)
    want, want_grads = _step(theirs, theirs_x, labels, seed=11)
    assert got.logits.dtype == dtype
    assert relative_error(want.logits, got.logits) < tol
    scale = max(g.abs().max().item() for g in want_grads.values())
    for name, g in want_grads.items():
        assert (got_grads[name] - g).abs().max().item() <= tol * scale, name
    # The seed matters: another one draws other masks (the comparison above is of draws, not of no draws).
    torch.manual_seed(12)
    assert relative_error(ours(x).logits.detach(), got.logits.detach()) > 1e-2


def test_bf16_autocast_draws_its_masks_in_the_dtype_transformers_draws_them():
    """DropPath draws torch.rand in its input's dtype: under autocast the branch is bf16 in both, so the masks are
    the same draws; a float32 branch here would consume other random numbers than transformers'."""
    config = PvtV2Config(**TINY, drop_path_rate=0.4, num_labels=5)
    ours, theirs = _pair(config)
    seen = {"ours": [], "theirs": []}
    for key, model, cls in (("ours", ours, DropPath), ("theirs", theirs, PvtV2DropPath)):
        for module in model.modules():
            if isinstance(module, cls):
                module.register_forward_hook(lambda m, args, out, key=key: seen[key].append((args[0].dtype, out)))
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for model in (ours, theirs):
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x, labels=torch.tensor([0, 1, 2, 3])).loss.backward()
    assert [d for d, _ in seen["ours"]] == [d for d, _ in seen["theirs"]]
    assert len(seen["ours"]) == 2 * sum(TINY["depths"]) - 2  # the first block's rate is 0: no DropPath there
    # The samples kept (non-zero rows) by each block are the same in both.
    for (_, a), (_, b) in zip(seen["ours"], seen["theirs"]):
        assert torch.equal(a.flatten(1).abs().sum(1) > 0, b.flatten(1).abs().sum(1) > 0)


# ---------------------------------------------------------------------------------------------- attention maps
def test_attention_maps_in_eval_are_undropped_and_equal_transformers():
    config = PvtV2Config(**TINY, **DROPS, num_labels=5)
    ours, theirs = _pair(config)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    got = ours(x, output_attentions=True).attentions
    want = theirs(x, output_attentions=True).attentions
    assert len(got) == len(want) == len(TINY["depths"])  # grouped by stage, as transformers groups them
    flat_got, flat_want = [a for stage in got for a in stage], [a for stage in want for a in stage]
    assert len(flat_got) == len(flat_want) == sum(TINY["depths"])
    for a, b in zip(flat_got, flat_want):
        assert relative_error(b, a) < 1e-5
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))  # rows of a softmax: nothing dropped


# ---------------------------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("batch", [4, 1])
@pytest.mark.parametrize("autocast", [False, True])
def test_gradient_checkpointing_gives_the_gradients_of_the_same_model_without_it(batch, autocast):
    """The recomputed blocks draw the first pass's masks (bf16 ones under autocast, the batch-1 layout of the Mix-FFN
    dropout): bit-equal gradients to the model run without checkpointing under the same seed, and the generator
    left in the same place."""
    config = PvtV2Config(**TINY, **DROPS, num_labels=5)
    plain, _ = _pair(config)
    checkpointed, _ = _pair(config)
    checkpointed.gradient_checkpointing_enable()
    x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 4, 2, 1][:batch])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        want, want_grads = _step(plain, x, labels, seed=21)
        after_plain = torch.rand(3)
        got, got_grads = _step(checkpointed, x, labels, seed=21)
    assert torch.equal(torch.rand(3), after_plain)
    assert torch.equal(want.logits, got.logits)
    for name, g in want_grads.items():
        assert torch.equal(g, got_grads[name]), name


# ---------------------------------------------------------------------------------------------- a resumed run
def test_a_killed_drop_path_run_resumed_ends_bit_equal_to_an_uninterrupted_one(few_digits, tiny_config, tmp_path):
    """`pvtv2 train --drop-path 0.3` SIGKILLed in the middle of epoch 2, then --resume: the same weights and records
    as the run that was never stopped (the draws of epoch 2 restart from epoch 1's saved generator state)."""
    def args(out):
        flags = common_args(few_digits, tiny_config, out, epochs=2)
        flags[flags.index("--drop-path") + 1] = "0.3"
        return flags

    reference = tmp_path / "reference"
    done = run_train(args(reference))
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "run"
    killed = run_train(args(out), env={**ENV, KILL_ENV: "10"})  # 8 batches an epoch: the 2nd batch of epoch 2
    assert killed.returncode != 0
    resumed = run_train([*args(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for folder in ("last", "best"):
        want, got = load_file(reference / folder / "model.safetensors"), load_file(out / folder / "model.safetensors")
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), folder
    keys = ("epoch", "train_loss", "val_top1", "lr")
    want_records = [tuple(r[k] for k in keys) for r in run_records(reference)]
    assert [tuple(r[k] for k in keys) for r in run_records(out)] == want_records
    assert all(math.isfinite(r[1]) for r in want_records)


@pytest.mark.parametrize("kind", ["segformer", "glpn"])
def test_dense_models_at_batch_one_draw_their_mix_ffn_dropout_as_transformers(kind, tmp_path):
    """SegFormer and GLPN share the Mix-FFN: at batch 1 their hidden dropout masks are transformers' too."""
    from pvtv2.models.depth import PvtV2ForDepthEstimation
    from pvtv2.models.segmentation import PvtV2ForSemanticSegmentation

    small = dict(depths=[1, 2, 1, 1], hidden_sizes=[16, 32, 40, 48], num_attention_heads=[1, 2, 5, 8],
                 mlp_ratios=[4, 3, 2, 4], decoder_hidden_size=16, hidden_dropout_prob=0.3)
    if kind == "segformer":
        config = transformers.SegformerConfig(**small, num_labels=4)
        config._attn_implementation = "eager"
        reference_cls, ours_cls, field = transformers.SegformerForSemanticSegmentation, PvtV2ForSemanticSegmentation, "logits"
    else:
        config = transformers.GLPNConfig(**small, max_depth=7)
        reference_cls, ours_cls, field = transformers.GLPNForDepthEstimation, PvtV2ForDepthEstimation, "predicted_depth"
    reference, ours = _dense_pair(reference_cls, config, ours_cls, tmp_path)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(8)
    want = getattr(reference(x), field)
    with fast.train_gemm("aten"):
        torch.manual_seed(8)
        got = getattr(ours(x), field)
        torch.manual_seed(9)
        other = getattr(ours(x), field)
    assert relative_error(want, got) < 1e-4
    assert relative_error(want, other) > 1e-3  # another seed: other draws


def test_without_dropout_training_keeps_sdpa_and_the_channels_last_mix_ffn():
    """Drop path alone (dropouts 0, the usual fine-tuning settings): every block's attention is the explicit softmax
    (CPU training, as transformers computes it; no SDPA call) and the Mix-FFN keeps its channels-last views; transformers' layout is taken only where a dropout draws over it."""
    from unittest import mock

    import torch.nn.functional as F

    from pvtv2.models import layers

    calls = []
    original = layers.DepthwiseConv.forward

    def spy(self, x, height, width, keep_layout=False):
        calls.append(keep_layout)
        return original(self, x, height, width, keep_layout)

    x = torch.randn(1, 3, 64, 64)
    for hidden, expected in ((0.0, False), (0.1, True)):
        calls.clear()
        model = PvtV2ForImageClassification(PvtV2Config(**TINY, drop_path_rate=0.3, hidden_dropout_prob=hidden)).train()
        with mock.patch.object(layers.F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention) as sdpa, \
                mock.patch.object(layers.DepthwiseConv, "forward", spy):
            model(x).logits.sum().backward()
        assert sdpa.call_count == 0
        assert calls == [expected] * sum(TINY["depths"]), hidden
