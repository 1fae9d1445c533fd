"""The fast CPU inference path (pvtv2.fast) held to its contract: the reference model's numbers (and transformers')
for the weights the model holds at call time, however they were written; models that copy, pickle and save after
inference; the explicit packing step; thread safety. Which operators ran is observed with PyTorch's profiler."""

from __future__ import annotations

import copy
import gc
import io
import json
import os
import pickle
import subprocess
import sys
import threading
from unittest import mock

import pytest
import torch
import torch.nn.utils.parametrize
import torch.nn.utils.prune
import transformers
from torch.optim.swa_utils import AveragedModel

import pvtv2.fast.cpu as cpu
from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast
from pvtv2.benchmark import benchmark_model

from conftest import TINY, hf_config, random_weights_, relative_error

TOL = 1e-5
FAST = fast.fast_path_available(torch.float32)
needs_fast = pytest.mark.skipif(not FAST, reason="the oneDNN operators of the fast path are not available here")


def hf_pair(config: PvtV2Config, seed: int = 0):
    with torch.device("meta"):
        theirs = transformers.PvtV2ForImageClassification(hf_config(config))
        ours = PvtV2ForImageClassification(config)
    random_weights_(theirs, seed=seed).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    return ours.eval(), theirs


def ops_run(fn) -> dict[str, int]:
    """How often each operator ran during ``fn()``, as PyTorch's profiler records it."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    counts: dict[str, int] = {}
    for event in prof.events():
        counts[event.name] = counts.get(event.name, 0) + 1
    return counts


def reference(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's own reference path (public ops) on the weights it holds now."""
    with torch.no_grad(), fast.fast_path(False):
        return model(x).logits


@pytest.mark.parametrize("mode", ["reference", "fast", "frozen"])
@pytest.mark.parametrize("linear,act", [(False, "gelu"), (True, "gelu"), (False, "gelu_pytorch_tanh"), (False, "relu")])
def test_every_path_matches_transformers(mode, linear, act):
    if mode != "reference" and not FAST:
        pytest.skip("the oneDNN operators of the fast path are not available here")
    config = PvtV2Config(**TINY, linear_attention=linear, hidden_act=act, num_labels=7)
    ours, theirs = hf_pair(config, seed=3)
    if mode == "frozen":
        fast.freeze(ours)
    x = torch.randn(3, 3, 75, 61)
    with torch.no_grad(), fast.fast_path(mode != "reference"):
        expected = theirs(x, output_hidden_states=True)
        counts = ops_run(lambda: ours(x, output_hidden_states=True))
        got = ours(x, output_hidden_states=True)
        with_probs = ours(x, output_attentions=True).logits  # attention maps: always the reference path
    assert relative_error(expected.logits, got.logits) < TOL
    for ref, mine in zip(expected.hidden_states, got.hidden_states):
        assert relative_error(ref, mine) < TOL
    assert relative_error(expected.logits, with_probs) < TOL
    # The oneDNN operators ran exactly when the fast path was on; weights were packed only when frozen.
    assert (counts.get("mkldnn::_linear_pointwise", 0) > 0) == (mode != "reference")
    assert (counts.get("mkldnn::_reorder_linear_weight", 0) > 0) == (mode == "frozen")


@needs_fast
def test_frozen_weights_are_packed_once_per_shape():
    ours, theirs = hf_pair(PvtV2Config(**TINY, num_labels=4), seed=8)
    fast.freeze(ours)
    assert fast.is_frozen(ours) and not fast.is_frozen(theirs)
    a, b = torch.randn(2, 3, 64, 80), torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        first = ops_run(lambda: ours(a))
        again = ops_run(lambda: ours(a))
        other_shape = ops_run(lambda: ours(b))
        assert relative_error(theirs(b).logits, ours(b).logits) < TOL
    assert first.get("mkldnn::_reorder_linear_weight", 0) > 0 and first.get("mkldnn::_reorder_convolution_weight", 0) > 0
    assert "mkldnn::_reorder_linear_weight" not in again and "mkldnn::_reorder_convolution_weight" not in again
    # Convolution weights are packed for the input size (a weight packed for another size is 10-100x slower).
    assert "mkldnn::_reorder_linear_weight" not in other_shape and other_shape.get("mkldnn::_reorder_convolution_weight", 0) > 0
    fast.unfreeze(ours)
    assert not fast.is_frozen(ours)
    assert all(type(p) is torch.nn.Parameter for p in ours.parameters())
    with torch.no_grad():
        assert "mkldnn::_reorder_linear_weight" not in ops_run(lambda: ours(a))


def _other_weights(model):
    return {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}


def _optimizer_step(model):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.randn(2, 3, 64, 64)).logits.square().mean().backward()
    opt.step()
    model.eval()


def _load_state_dict(model):
    model.load_state_dict(_other_weights(model))


def _data_copy(model):  # the classic EMA / weight-copy idiom: writes through .data bypass the version counter
    for p, q in zip(model.parameters(), _other_weights(model).values()):
        p.data.copy_(q)


def _data_mul_one(model):
    model.pvt_v2.encoder.layers[1].blocks[0].attention.value.weight.data.mul_(-1)


def _data_assign(model):
    w = model.pvt_v2.encoder.layers[2].blocks[0].mlp.dense1.weight
    w.data = w.detach() * 1.5


def _detach_write(model):
    model.pvt_v2.encoder.layers[0].patch_embedding.proj.weight.detach().mul_(-0.5)


def _new_parameter(model):
    layer = model.pvt_v2.encoder.layers[1].blocks[1].mlp.dense2
    layer.weight = torch.nn.Parameter(torch.randn_like(layer.weight) * 0.2)


def _new_parameter_at_the_old_address(model):
    # The old weight is freed first, so the allocator is free to hand its memory to the new one, which is then written
    # as often as the old one was: address and version counter alike.
    layer = model.pvt_v2.encoder.layers[2].blocks[0].attention.proj
    shape, writes = layer.weight.shape, layer.weight._version
    layer.weight = None
    weight = torch.empty(shape)  # one allocation, no temporary
    with torch.no_grad():
        weight.normal_(0.0, 0.2)
        while weight._version < writes:
            weight.add_(0.0)
    layer.weight = torch.nn.Parameter(weight)


def _vector_to_parameters(model):
    vector = torch.nn.utils.parameters_to_vector(model.parameters())
    torch.nn.utils.vector_to_parameters(vector * 0.9 + 0.01, model.parameters())


def _no_grad_inplace(model):
    with torch.no_grad():
        model.pvt_v2.encoder.layers[1].blocks[0].attention.spatial_reduction.weight.mul_(2.0)


def _averaged(model):
    averaged = AveragedModel(model)  # a deep copy, made after inference
    averaged.update_parameters(PvtV2ForImageClassification(model.config).eval())
    return averaged.module


WRITES = {
    "optimizer step": _optimizer_step,
    "load_state_dict": _load_state_dict,
    "p.data.copy_ of every weight": _data_copy,
    "p.data.mul_ of one weight": _data_mul_one,
    "p.data = ...": _data_assign,
    "p.detach().mul_": _detach_write,
    "a new Parameter": _new_parameter,
    "a new Parameter where the old one was": _new_parameter_at_the_old_address,
    "vector_to_parameters": _vector_to_parameters,
    "no_grad in-place op": _no_grad_inplace,
    "swa_utils averaging of a copy": _averaged,
}


@needs_fast
@pytest.mark.parametrize("frozen", [False, True], ids=["unfrozen", "frozen"])
@pytest.mark.parametrize("write", list(WRITES))
def test_outputs_follow_every_kind_of_weight_write(write, frozen):
    torch.manual_seed(0)
    model, theirs = hf_pair(PvtV2Config(**TINY, num_labels=5), seed=11)
    del theirs  # it shares the weights' storage: the model's parameters must be the only owners
    gc.collect()
    if frozen:
        fast.freeze(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x).logits  # packs the weights when frozen
    changed = WRITES[write](model) or model
    with torch.no_grad():
        after = changed(x).logits
    assert relative_error(before, after) > 1e-4, "the write did not change the model: the test would prove nothing"
    assert relative_error(reference(changed, x), after) < TOL
    # And against a fresh model that never ran: the weights as a state dict, loaded anew.
    fresh = PvtV2ForImageClassification(changed.config).eval()
    fresh.load_state_dict(changed.state_dict())
    with torch.no_grad():
        assert relative_error(fresh(x).logits, after) < TOL


@pytest.mark.parametrize("frozen", [False, True], ids=["unfrozen", "frozen"])
def test_model_copies_pickles_and_saves_after_inference(frozen, tmp_path):
    model, theirs = hf_pair(PvtV2Config(**TINY, num_labels=4), seed=12)
    if frozen and FAST:
        fast.freeze(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x).logits
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert keys == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}  # nothing packed in state_dict()
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies.append(torch.load(buffer, weights_only=False))
    averaged = AveragedModel(model)
    copies.append(averaged.module)
    model.save_pretrained(tmp_path / "saved")
    copies.append(PvtV2ForImageClassification.from_pretrained(tmp_path / "saved"))
    for other in copies:
        assert not fast.is_frozen(other)  # a copy of a frozen model is an unfrozen one
        with torch.no_grad():
            assert relative_error(expected, other(x).logits) < TOL
    # The copies are independent: changing one leaves the original's outputs alone.
    with torch.no_grad():
        copies[0].classifier.weight.mul_(3)
        assert relative_error(expected, model(x).logits) < TOL


def test_training_gradients_match_transformers():
    config = PvtV2Config(**TINY, num_labels=5)
    ours, theirs = hf_pair(config, seed=2)
    ours.train(), theirs.train()
    x = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([1, 4])
    ours(x, labels=labels).loss.backward()
    theirs(x, labels=labels).loss.backward()
    grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        if name.endswith("attention.key.bias"):  # softmax ignores a shift shared by all keys: gradient zero
            assert p.grad.abs().max() < 1e-6
            continue
        assert relative_error(grads[name].grad, p.grad) < 1e-4, name


def test_eval_with_autograd_uses_public_ops_and_gives_gradients():
    ours, theirs = hf_pair(PvtV2Config(**TINY, num_labels=3), seed=4)
    fast.freeze(ours)
    x_ref = torch.randn(1, 3, 64, 64, requires_grad=True)
    theirs(x_ref).logits.sum().backward()
    for choice in ("aten", "onednn"):  # the training GEMMs (pvtv2.fast.train): F.linear, or oneDNN unpacked
        x = x_ref.detach().clone().requires_grad_(True)
        with fast.train_gemm(choice):
            counts = ops_run(lambda: ours(x).logits.sum().backward())
        assert relative_error(x_ref.grad, x.grad) < 1e-4
        assert "mkldnn::_reorder_linear_weight" not in counts and "mkldnn::_convolution_pointwise" not in counts
        assert ("mkldnn::_linear_pointwise" in counts) == (choice == "onednn")


@needs_fast
@pytest.mark.parametrize("frozen", [False, True], ids=["unfrozen", "frozen"])
def test_bf16_autocast_close_to_fp32_reference(frozen):
    ours, theirs = hf_pair(PvtV2Config(**TINY, num_labels=10), seed=5)
    if frozen:
        fast.freeze(ours)
    # Logits with a clear winner per image, so top-1 is a fair test at bf16 precision.
    with torch.no_grad():
        ours.classifier.weight.mul_(8.0)
        theirs.classifier.weight.mul_(8.0)
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = ours(x).logits
    assert low.dtype == torch.bfloat16  # the linear layers did run in bf16
    assert relative_error(expected, low.float()) < 0.05
    margin = expected.topk(2).values
    clear = (margin[:, 0] - margin[:, 1]) > 0.1 * expected.abs().max()
    assert torch.equal(low.float().argmax(-1)[clear], expected.argmax(-1)[clear])


def bf16_stages_as_close_as_transformers(ours, theirs, x: torch.Tensor) -> dict[str, int]:
    """Assert that every stage output of ``ours`` under bf16 autocast is as close to transformers' fp32 one as
    transformers' own under the same autocast; returns the operators ours ran (:func:`ops_run`)."""
    with torch.no_grad():
        reference = theirs(x, output_hidden_states=True).hidden_states
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hf_low = theirs(x, output_hidden_states=True).hidden_states
            counts = ops_run(lambda: ours(x, output_hidden_states=True))
            low = ours(x, output_hidden_states=True).hidden_states
    for ref, theirs_low, mine in zip(reference, hf_low, low):
        assert relative_error(ref, mine.float()) < 2 * relative_error(ref, theirs_low.float()) + 2e-3
    return counts


@pytest.mark.skipif(not fast.fast_path_available(torch.bfloat16), reason="no bf16 fast path on this CPU")
@pytest.mark.parametrize("linear", [False, True])
def test_bf16_attention_as_accurate_as_transformers_under_autocast(linear):
    """Under bf16 autocast the fast path's attention is bf16 GEMMs around an fp32 softmax (not SDPA): every stage's
    output is as close to the fp32 reference as transformers' own under the same autocast."""
    config = PvtV2Config(**TINY, linear_attention=linear, num_labels=4)
    ours, theirs = hf_pair(config, seed=12)
    x = torch.randn(3, 3, 64, 80)
    counts = bf16_stages_as_close_as_transformers(ours, theirs, x)
    assert counts.get("aten::matmul", 0) > 0 and "aten::scaled_dot_product_attention" not in counts


def test_channels_last_hidden_states_have_transformers_values_and_usual_ops():
    ours, theirs = hf_pair(PvtV2Config(**TINY), seed=6)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a = ours(x, output_hidden_states=True).hidden_states
        b = theirs(x, output_hidden_states=True).hidden_states
    for mine, ref in zip(a, b):
        assert mine.shape == ref.shape
        assert relative_error(ref.flatten(2), mine.flatten(2)) < TOL
        assert relative_error(ref.contiguous().view(-1), mine.reshape(-1)) < TOL


def test_benchmark_model_figures_are_consistent():
    model = PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=3))
    result = benchmark_model(model, batch_size=2, image_size=64, repeats=3, warmup=1)
    assert result.images_per_s == pytest.approx(2 / (result.latency_ms / 1e3))
    assert result.best_latency_ms <= result.latency_ms
    rss_kib = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
    assert result.peak_rss_mb == pytest.approx(rss_kib / 1024, rel=0.05)  # what the kernel reports as the peak
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = benchmark_model(model, batch_size=2, image_size=64, repeats=1, warmup=0, train=True, num_labels=3)
    assert train.mode == "train" and not model.training
    assert train.images_per_s == pytest.approx(2 / (train.latency_ms / 1e3))
    assert train.latency_ms == train.best_latency_ms  # one timed step: median and best are that step
    # A training step was timed, not a forward pass: the one optimizer step moved every weight that has a gradient.
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "classifier.weight" in changed and "pvt_v2.encoder.layers.0.patch_embedding.proj.weight" in changed
    assert json.loads(json.dumps(train.to_dict())) == train.to_dict()
    with pytest.raises(ValueError, match="dtype"):
        benchmark_model(model, dtype="fp8")


@needs_fast
@pytest.mark.parametrize("linear,act", [(False, "gelu"), (True, "gelu"), (False, "relu")])
@pytest.mark.parametrize("piece_rows", [None, 3, 5])
def test_ffn_pieces_match_transformers(monkeypatch, linear, act, piece_rows):
    """The Mix-FFN in groups of images (piece_rows None: a piece holds one or two images) or in bands of rows
    (piece_rows: a piece is that many rows of one image), against transformers and against one piece."""
    config = PvtV2Config(**TINY, linear_attention=linear, hidden_act=act, num_labels=6)
    ours, theirs = hf_pair(config, seed=7)
    x = torch.randn(5, 3, 75, 61)  # stage 1 is 19 x 16 tokens: bands end with a short one
    with torch.no_grad():
        expected = theirs(x, output_hidden_states=True)
        whole = ours(x).logits
        first = ours.pvt_v2.encoder.layers[0].blocks[0].mlp
        row_bytes = 16 * first.dense1.out_features * 4
        image_bytes = 19 * row_bytes
        monkeypatch.setattr(cpu, "FFN_PIECE_BYTES", row_bytes * (piece_rows + 2) if piece_rows else 2 * image_bytes)
        with mock.patch.object(cpu, "_ffn_hidden", wraps=cpu._ffn_hidden) as hidden:
            got = ours(x, output_hidden_states=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_bf16 = ours(x).logits
    calls = [(c.args[2].shape[0], c.args[3]) for c in hidden.call_args_list]
    for ref, mine in zip(expected.hidden_states, got.hidden_states):
        assert relative_error(ref, mine) < TOL
    assert relative_error(expected.logits, got.logits) < TOL
    assert relative_error(whole, got.logits) < 1e-6
    assert relative_error(expected.logits, got_bf16.float()) < 5e-2
    if piece_rows:  # bands: one image, piece_rows rows plus the rows above and below
        assert (1, piece_rows + 1) in calls and (1, piece_rows + 2) in calls
    else:  # groups of two images, then the fifth alone
        assert (2, 19) in calls and (1, 19) in calls


@needs_fast
def test_frozen_model_at_several_sizes_and_from_several_threads():
    ours, theirs = hf_pair(PvtV2Config(**TINY, num_labels=4), seed=9)
    fast.freeze(ours)
    shapes = [(1, 3, 64, 64), (2, 3, 32, 48), (1, 3, 96, 64), (3, 3, 64, 64), (1, 3, 40, 40), (1, 3, 64, 64)]
    inputs = [torch.randn(shape) for shape in shapes]
    with torch.no_grad():
        expected = [theirs(x).logits for x in inputs]
    failures = []

    def run(offset: int) -> None:
        with torch.no_grad():
            for k in range(len(inputs)):
                i = (k + offset) % len(inputs)
                if relative_error(expected[i], ours(inputs[i]).logits) >= TOL:
                    failures.append(shapes[i])

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


@pytest.mark.slow
def test_environment_variable_turns_the_fast_path_off_for_a_program():
    script = (
        "import torch\n"
        "from pvtv2 import PvtV2Config, PvtV2ForImageClassification\n"
        f"model = PvtV2ForImageClassification(PvtV2Config(**{TINY!r})).eval()\n"
        "with torch.profiler.profile() as prof, torch.no_grad():\n"
        "    model(torch.randn(1, 3, 64, 64))\n"
        "print(any(e.name == 'mkldnn::_linear_pointwise' for e in prof.events()))\n"
    )
    for value, expected in (("0", "False"), ("1", str(FAST))):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             env={**os.environ, "PVTV2_FAST_PATH": value})
        assert out.stdout.strip() == expected, (value, out.stdout, out.stderr)


# ---------------------------------------------------------------------------------------------- what the modules do
# The fused stage reads weights directly. Wherever calling a module would compute something else (hooks, pruning,
# subclasses, parametrizations, a module in training mode), the stage must run the reference path, which calls them.
class LoraLinear(torch.nn.Linear):
    """A Linear with a low-rank extra term, as adapters (peft's LoRA) add one; it shares the base layer's weights."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.weight, self.bias = base.weight, base.bias
        gen = torch.Generator().manual_seed(1)
        self.down = torch.nn.Parameter(torch.randn(base.in_features, rank, generator=gen) * 0.5)
        self.up = torch.nn.Parameter(torch.randn(rank, base.out_features, generator=gen) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x @ self.down @ self.up

    def merged(self) -> torch.nn.Linear:
        """The same map as one plain Linear: an independent way to compute what this layer computes."""
        plain = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            plain.weight.copy_(self.weight + (self.down @ self.up).T)
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain


class Doubled(torch.nn.Module):
    """A parametrization: the layer's weight is twice what it stores."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


def _last_block(model):  # stage 4: several keys per query, so no change to the attention cancels out
    return model.pvt_v2.encoder.layers[3].blocks[0]


def _hook_on_query(model):
    return [_last_block(model).attention.query.register_forward_hook(lambda mod, args, out: out * 3)]


def _pre_hook_on_dense1(model):
    return [_last_block(model).mlp.dense1.register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))]


def _hook_on_stage(model):
    return [model.pvt_v2.encoder.layers[2].register_forward_pre_hook(lambda mod, args: (args[0] * 2,) + args[1:])]


def _global_hook(model):
    def hook(mod, args, out):
        return out * 1.5 if type(mod) is torch.nn.Linear and mod.out_features == 64 else None

    return [torch.nn.modules.module.register_module_forward_hook(hook)]


def _pruned(model):
    layer = _last_block(model).mlp.dense1
    torch.nn.utils.prune.l1_unstructured(layer, "weight", 0.5)
    with torch.no_grad():
        layer.weight_orig.mul_(3)  # pruning recomputes weight from weight_orig before each call
    return []


def _lora_query(model):
    attention = _last_block(model).attention
    attention.query = LoraLinear(attention.query)
    return []


def _parametrized(model):
    torch.nn.utils.parametrize.register_parametrization(_last_block(model).mlp.dense2, "weight", Doubled())
    return []


def _instance_forward(model):
    layer = _last_block(model).attention.proj
    layer.forward = lambda x: torch.nn.functional.linear(x, layer.weight, layer.bias) * 2
    return []


CHANGES = {
    "forward hook on query": _hook_on_query,
    "forward pre-hook on dense1": _pre_hook_on_dense1,
    "forward pre-hook on a stage": _hook_on_stage,
    "global forward hook": _global_hook,
    "prune": _pruned,
    "LoRA-like Linear subclass": _lora_query,
    "parametrization": _parametrized,
    "forward set on the instance": _instance_forward,
}


@needs_fast
@pytest.mark.parametrize("frozen", [False, True], ids=["unfrozen", "frozen"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_module_behaviour_falls_back_to_the_reference_path(change, frozen):
    model, _ = hf_pair(PvtV2Config(**TINY, num_labels=5), seed=13)
    if frozen:
        fast.freeze(model)
    x = torch.randn(2, 3, 64, 64)
    fused = "mkldnn::_linear_pointwise"
    with torch.no_grad():
        before = model(x).logits
        all_fast = ops_run(lambda: model(x)).get(fused, 0)
    handles = CHANGES[change](model)
    try:
        with torch.no_grad():
            counts = ops_run(lambda: model(x))
            got = model(x).logits
        expected = reference(model, x)
    finally:
        for handle in handles:
            handle.remove()
    assert relative_error(before, expected) > 1e-3, "the change did nothing: the test would prove nothing"
    assert torch.equal(expected, got)  # the same computation: the modules called
    assert counts.get(fused, 0) < all_fast  # the changed stage (only) ran the reference path
    if handles:  # hooks removed: the fast path takes over again
        with torch.no_grad():
            assert ops_run(lambda: model(x)).get(fused, 0) == all_fast
            assert relative_error(before, model(x).logits) < TOL


@needs_fast
def test_block_in_training_mode_inside_an_eval_model_runs_its_dropout():
    model, _ = hf_pair(PvtV2Config(**TINY, num_labels=5, hidden_dropout_prob=0.5), seed=14)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        all_eval = model(x).logits
        _last_block(model).train()
        torch.manual_seed(5)
        got = model(x).logits
        torch.manual_seed(5)
        with fast.fast_path(False):
            expected = model(x).logits  # the same random draws: the same dropout masks
    assert relative_error(all_eval, expected) > 1e-3, "dropout changed nothing: the test would prove nothing"
    assert torch.equal(expected, got)


def _scaled_value(model, factor: float):
    """A copy of ``model`` whose value layers compute ``factor`` times their output: what a hook that scales the
    output computes, without the hook."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for stage in other.pvt_v2.encoder.layers:
            for block in stage.blocks:
                block.attention.value.weight.mul_(factor)
                block.attention.value.bias.mul_(factor)
    return other


@pytest.mark.parametrize("mode", ["train", "eval", "eval, reference path"])
def test_hooks_on_key_and_value_run(mode):
    model, _ = hf_pair(PvtV2Config(**TINY, num_labels=5), seed=15)
    expected_model = _scaled_value(model, 3.0)
    calls = []

    def hook(mod, args, out):
        calls.append(mod)
        return out * 3.0

    for stage in model.pvt_v2.encoder.layers:
        for block in stage.blocks:
            block.attention.value.register_forward_hook(hook)
    model.train(mode == "train"), expected_model.train(mode == "train")
    x = torch.randn(2, 3, 64, 64)
    with torch.set_grad_enabled(mode == "train"), fast.fast_path(mode == "eval"):
        got = model(x).logits
        expected = expected_model(x).logits
        unhooked = _scaled_value(model, 1.0)  # a copy drops no hooks: remove them by hand
        for m in unhooked.modules():
            m._forward_hooks.clear()
        plain = unhooked(x).logits
    assert len(calls) == sum(len(stage.blocks) for stage in model.pvt_v2.encoder.layers)
    assert relative_error(plain, got) > 1e-3
    assert relative_error(expected, got) < TOL


def test_adapter_on_value_trains():
    model, _ = hf_pair(PvtV2Config(**TINY, num_labels=5), seed=16)
    attention = _last_block(model).attention
    attention.value = LoraLinear(attention.value)
    merged = copy.deepcopy(model)
    _last_block(merged).attention.value = attention.value.merged()
    model.train(), merged.train()
    x, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 3])
    loss = model(x, labels=labels).loss
    assert relative_error(merged(x, labels=labels).loss, loss) < TOL  # the adapter's term is in the output
    loss.backward()
    for p in (attention.value.down, attention.value.up):
        assert p.grad is not None and p.grad.abs().max() > 0


def _inference_model(tmp_path):
    saved, _ = hf_pair(PvtV2Config(**TINY, num_labels=5), seed=17)
    saved.save_pretrained(tmp_path / "saved")
    with torch.inference_mode():
        model = PvtV2ForImageClassification.from_pretrained(tmp_path / "saved").eval()
    assert all(p.is_inference() for p in model.parameters()), "not inference tensors: the test would prove nothing"
    return model


def test_freeze_leaves_inference_tensors_unfrozen(tmp_path, caplog):
    model = _inference_model(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        with caplog.at_level("WARNING", logger="pvtv2.fast.cpu"):
            fast.freeze(model)
        assert not fast.is_frozen(model)
        assert len(caplog.records) == 1 and "inference tensors" in caplog.records[0].getMessage()
        before = model(x).logits
        with fast.fast_path(False):
            assert relative_error(model(x).logits, before) < TOL
        _last_block(model).attention.value.weight.mul_(-2)  # an in-place write inside inference_mode
        model.pvt_v2.encoder.layers[0].patch_embedding.proj.weight.add_(0.1)
        after = model(x).logits
        with fast.fast_path(False):
            expected = model(x).logits
    assert relative_error(before, after) > 1e-3
    assert relative_error(expected, after) < TOL


@needs_fast
def test_frozen_model_given_inference_tensors_reads_them(tmp_path):
    model, _ = hf_pair(PvtV2Config(**TINY, num_labels=5), seed=18)
    fast.freeze(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x).logits  # packs the weights
    with torch.inference_mode():
        layer = _last_block(model).mlp.dense1
        layer.weight = torch.nn.Parameter(layer.weight * -1.5)  # an inference tensor
        conv = model.pvt_v2.encoder.layers[1].patch_embedding.proj
        conv.weight = torch.nn.Parameter(conv.weight * 0.5)
        assert layer.weight.is_inference() and conv.weight.is_inference()
        got = model(x).logits
        with fast.fast_path(False):
            expected = model(x).logits
    assert relative_error(before, got) > 1e-3
    assert relative_error(expected, got) < TOL


@pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated", "ignore:torch.quantize_per_tensor")
def test_dynamically_quantized_model():
    model, _ = hf_pair(PvtV2Config(**TINY, num_labels=5), seed=19)
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    assert type(_last_block(quantized).attention.value) is not torch.nn.Linear
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x).logits
        got = quantized(x).logits
        with fast.fast_path(False):
            reference_path = quantized(x).logits
    assert relative_error(expected, got) < 0.1  # int8 weights and activations
    assert relative_error(expected, got) > 0  # the quantized layers did run
    assert torch.equal(reference_path, got)
