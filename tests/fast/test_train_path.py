"""The fast CPU training path (pvtv2.fast.train) held to its contract: transformers' outputs and gradients (for the
input and every parameter), whole batches and groups of images; the reference Mix-FFN where the path does not apply;
one hidden activation kept per Mix-FFN instead of three (counted against the closed form); first-order only."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import transformers

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast
from pvtv2.fast import cpu, train

from conftest import TINY, random_weights_, relative_error
from test_fastpath import WRITES  # the weight writes the inference path is held to

PIECEWISE = "_PiecewiseMixFFN"  # the autograd node of the path, as the profiler names it


def hf_pair(config: PvtV2Config, seed: int = 0):
    data = config.to_dict()
    data.pop("stage_names")
    with torch.device("meta"):
        theirs = transformers.PvtV2ForImageClassification(transformers.PvtV2Config(**data))
    random_weights_(theirs, seed=seed)
    ours = PvtV2ForImageClassification(config)
    ours.load_state_dict(theirs.state_dict(), strict=True)  # a copy: the two models' parameters are their own
    return ours.train(), theirs.train()


def loss_and_grads(model, x, labels, **flags):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = model(x, labels=labels, **flags)
        out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out, grads, x.grad, {e.name for e in prof.events()}


def assert_same_gradients(expected: dict, got: dict, tol: float = 1e-4) -> None:
    assert expected.keys() == got.keys()
    for name, grad in expected.items():
        if name.endswith("attention.key.bias"):  # softmax ignores a shift shared by all keys: gradient zero
            assert got[name].abs().max() < 1e-6
            continue
        assert relative_error(grad, got[name]) < tol, name


@pytest.mark.parametrize("linear,act", [(False, "gelu"), (True, "gelu"), (False, "gelu_pytorch_tanh"), (False, "relu")])
@pytest.mark.parametrize("pieces", ["whole batch", "image groups"])
def test_training_path_matches_transformers(monkeypatch, linear, act, pieces):
    config = PvtV2Config(**TINY, linear_attention=linear, hidden_act=act, num_labels=6)
    ours, theirs = hf_pair(config, seed=21)
    x = torch.randn(3, 3, 64, 45)  # stage 1 is 16 x 12 tokens
    labels = torch.tensor([0, 5, 2])
    if pieces == "image groups":  # two images of stage 1's hidden activation per piece: pieces of 2 and 1
        first = ours.pvt_v2.encoder.layers[0].blocks[0].mlp
        monkeypatch.setattr(cpu, "FFN_PIECE_BYTES", 2 * 16 * 12 * first.dense1.out_features * 4)
    expected, want, want_x, _ = loss_and_grads(theirs, x, labels, output_hidden_states=True)
    with mock.patch.object(train, "_conv_gelu", wraps=train._conv_gelu) as conv_gelu:
        got, grads, got_x, ops = loss_and_grads(ours, x, labels, output_hidden_states=True)
    pieces_run = {c.args[0].shape[0] for c in conv_gelu.call_args_list}  # images per piece, every Mix-FFN
    assert relative_error(expected.logits, got.logits) < 1e-5
    for ref, mine in zip(expected.hidden_states, got.hidden_states):
        assert relative_error(ref, mine) < 1e-5
    assert relative_error(want_x, got_x) < 1e-4
    assert_same_gradients(want, grads)
    # The path ran for the GELU Mix-FFNs; a ReLU one runs the reference Mix-FFN inside the same stage forward.
    assert (PIECEWISE in ops) == (act != "relu")
    if act != "relu":
        assert pieces_run == ({3} if pieces == "whole batch" else {1, 2, 3})  # stages 2-4 fit in one piece


def test_training_path_with_frozen_parameters_gives_the_reference_gradients():
    ours, _ = hf_pair(PvtV2Config(**TINY, num_labels=4), seed=22)
    block = ours.pvt_v2.encoder.layers[1].blocks[1].mlp
    for p in (block.dense1.weight, block.dwconv.dwconv.bias, block.dense2.weight):
        p.requires_grad_(False)
    for p in ours.pvt_v2.encoder.layers[0].parameters():  # the first stage frozen: its FFN input needs no gradient
        p.requires_grad_(False)
    x, labels = torch.randn(3, 3, 64, 64), torch.tensor([1, 2, 3])
    with fast.fast_path(False):
        _, want, _, ref_ops = loss_and_grads(ours, x, labels)
    _, got, _, ops = loss_and_grads(ours, x, labels)
    assert PIECEWISE in ops and PIECEWISE not in ref_ops
    assert "pvt_v2.encoder.layers.1.blocks.1.mlp.dense1.weight" not in got
    assert_same_gradients(want, got)


@pytest.mark.parametrize(
    "setting", ["dropout", "gradient checkpointing", "bf16 autocast", "attention maps", "switched off", "eval"]
)
def test_training_path_steps_aside_where_it_does_not_apply(setting):
    overrides = {"hidden_dropout_prob": 0.1} if setting == "dropout" else {}
    ours, _ = hf_pair(PvtV2Config(**TINY, num_labels=3, **overrides), seed=23)
    if setting == "gradient checkpointing":
        ours.gradient_checkpointing_enable()
    if setting == "eval":
        ours.eval()
    x, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    flags = {"output_attentions": True} if setting == "attention maps" else {}
    context = {
        "bf16 autocast": torch.autocast("cpu", dtype=torch.bfloat16),
        "switched off": fast.fast_path(False),
    }.get(setting)
    with context if context is not None else torch.enable_grad():
        _, grads, _, ops = loss_and_grads(ours, x, labels, **flags)
    assert PIECEWISE not in ops
    assert grads  # and the reference path did give gradients


def _saved_bytes(model, x) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of one forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).logits.sum().backward()
    return sum(storages.values())


def test_training_path_keeps_one_hidden_activation_per_mix_ffn_instead_of_three():
    ours, _ = hf_pair(PvtV2Config(**TINY, num_labels=3), seed=24)
    x = torch.randn(2, 3, 64, 64)
    with fast.fast_path(False):
        reference = _saved_bytes(ours, x)
    ours.zero_grad()
    fast_bytes = _saved_bytes(ours, x)
    # The closed form: each Mix-FFN's hidden activation is batch x tokens x hidden x 4 bytes, and the reference keeps
    # two more of them (the GELU's input and output) than the path does.
    hidden_bytes, size = 0, 64
    for i, stage in enumerate(ours.pvt_v2.encoder.layers):
        stride, patch = ours.config.strides[i], ours.config.patch_sizes[i]
        size = (size + 2 * (patch // 2) - patch) // stride + 1
        for block in stage.blocks:
            hidden_bytes += x.shape[0] * size * size * block.mlp.dense1.out_features * 4
    assert reference - fast_bytes == pytest.approx(2 * hidden_bytes, rel=0.02)


def test_training_path_refuses_double_backward_with_a_clear_error():
    ours, _ = hf_pair(PvtV2Config(**TINY, num_labels=3), seed=25)
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    loss = ours(x).logits.square().sum()
    with pytest.raises(RuntimeError, match=r"first-order gradients only.*fast_path\(False\)"):
        torch.autograd.grad(loss, [x], create_graph=True)
    (grad,) = torch.autograd.grad(ours(x).logits.square().sum(), [x])  # first order: fine
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("frozen", [False, True], ids=["unfrozen", "frozen"])
@pytest.mark.parametrize("write", list(WRITES))
def test_training_path_follows_every_kind_of_weight_write(write, frozen):
    """The weights written every way the inference tests write them, between training steps: the next step's loss and
    gradients are the reference path's on the weights as written, and a fresh model's loaded from them."""
    torch.manual_seed(0)
    model, theirs = hf_pair(PvtV2Config(**TINY, num_labels=5), seed=26)
    del theirs
    if frozen:
        if not cpu.fast_path_available(torch.float32):
            pytest.skip("the oneDNN operators of the fast path are not available here")
        fast.freeze(model)
    x, labels = torch.randn(2, 3, 64, 64), torch.tensor([3, 1])
    before, _, _, ops = loss_and_grads(model, x, labels)  # a step on the path before the write
    assert PIECEWISE in ops
    changed = WRITES[write](model.eval()) or model
    changed.train()
    after, grads, grad_x, ops = loss_and_grads(changed, x, labels)
    assert PIECEWISE in ops
    assert relative_error(before.loss, after.loss) > 1e-4, "the write did not change the model: the test would prove nothing"
    with fast.fast_path(False):
        expected, want, want_x, _ = loss_and_grads(changed, x, labels)
    assert relative_error(expected.logits, after.logits) < 1e-5
    assert relative_error(want_x, grad_x) < 1e-4
    assert_same_gradients(want, grads)
    fresh = PvtV2ForImageClassification(changed.config).train()
    fresh.load_state_dict(changed.state_dict())
    with fast.fast_path(False):
        fresh_out, fresh_grads, _, _ = loss_and_grads(fresh, x, labels)
    assert relative_error(fresh_out.logits, after.logits) < 1e-5
    assert_same_gradients(fresh_grads, grads)
