"""Audit 28: valid but unusual configurations and inputs, against transformers' PvtV2, where the earlier parity files
(test_adversarial_parity.py, test_parity_audit26.py, test_modeling.py) do not reach.

A stage of no blocks (transformers and timm build its patch embedding and LayerNorm alone); every activation name
through save_pretrained into both libraries; activations given as callables and modules (the fast path fuses only
nn.GELU's exact and tanh forms); heads whose width is no power of two under LayerNorm epsilons of 1e-12 and 1e-2;
an input that requires grad in an eval model, under each grad mode; 1x1 and thin inputs to linear attention with the
attention maps. Float64 to 1e-10 on the reference path, float32 to 1e-5 on the fast path (frozen or not), with the
hostile weights of test_adversarial_parity.py.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import TINY, relative_error
from test_adversarial_parity import TOL32, TOL64, hf_pair, hostile_weights_
from test_parity_audit26 import PARAMETER_FREE
from timm.models.pvt_v2 import PyramidVisionTransformerV2

from pvtv2 import PvtV2Backbone, PvtV2Config, PvtV2ForImageClassification, fast
from pvtv2.weights.files import save_state_dict
from pvtv2.weights.layouts import convert_state_dict


def _compare_all(ours, theirs, x, tol):
    """Logits, every stage's output and every attention map of ``ours`` and ``theirs`` on ``x``."""
    with torch.no_grad():
        expected = theirs(x, output_hidden_states=True, output_attentions=True)
        got = ours(x, output_hidden_states=True, output_attentions=True)
    assert relative_error(expected.logits, got.logits) < tol
    for a, b in zip(expected.hidden_states, got.hidden_states, strict=True):
        assert relative_error(a, b) < tol
    assert len(got.attentions) == len(expected.attentions)
    for stage_a, stage_b in zip(expected.attentions, got.attentions, strict=True):
        assert len(stage_a) == len(stage_b)
        for a, b in zip(stage_a, stage_b, strict=True):
            assert relative_error(a, b) < tol


def _fast_matches(ours, theirs, x):
    """Float32: the fast path, frozen or not, and the reference path give transformers' logits."""
    ours, theirs = ours.float(), theirs.float()
    x = x.float()
    with torch.no_grad():
        expected = theirs(x).logits
        with fast.fast_path(False):
            assert relative_error(expected, ours(x).logits) < TOL32
        assert relative_error(expected, ours(x).logits) < TOL32
        fast.freeze(ours)
        assert relative_error(expected, ours(x).logits) < TOL32


# ---------------------------------------------------------------------------------------------- stages of no blocks
# transformers and timm take a depth of 0: the stage is its patch embedding and final LayerNorm. pvtv2 refused it.
ZERO_DEPTHS = {
    "middle stage empty": (dict(TINY, depths=[1, 0, 2, 1], num_labels=3), (45, 38)),
    "first and last empty, linear": (dict(TINY, depths=[0, 2, 1, 0], linear_attention=True, num_labels=2), (33, 29)),
    "every stage empty, drop path": (dict(TINY, depths=[0, 0, 0, 0], drop_path_rate=0.3, num_labels=4), (40, 52)),
}


@pytest.mark.parametrize("name", list(ZERO_DEPTHS))
def test_a_stage_of_no_blocks_is_transformers_stage(name, tmp_path):
    kwargs, size = ZERO_DEPTHS[name]
    config = PvtV2Config(**kwargs)
    ours, theirs = hf_pair(config, seed=len(name))
    x = torch.randn(2, 3, *size, dtype=torch.float64) * 3 + 1
    _compare_all(ours, theirs, x, TOL64)
    # config.json and weights go both ways
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["depths"] == kwargs["depths"]
    again = PvtV2ForImageClassification.from_pretrained(tmp_path).double()
    loaded = transformers.PvtV2ForImageClassification.from_pretrained(tmp_path).double().eval()
    with torch.no_grad():
        expected = theirs(x).logits
        assert relative_error(expected, again(x).logits) < TOL64
        assert relative_error(expected, loaded(x).logits) < TOL64
    _fast_matches(ours, theirs, x)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_through_stages_of_no_blocks(checkpointing):
    # reductions leaving several keys in every stage: over a single key softmax is constant, and the query's gradient
    # is zero in transformers' eager attention and rounding noise (1e-18) in SDPA's
    config = PvtV2Config(**dict(TINY, depths=[1, 0, 2, 0], sr_ratios=[4, 2, 1, 1]), num_labels=3)
    ours, theirs = hf_pair(config, seed=8)
    ours.train(), theirs.train()
    if checkpointing:
        ours.gradient_checkpointing_enable()
    x = torch.randn(2, 3, 48, 40, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    labels = torch.tensor([2, 0])
    ours(x, labels=labels).loss.backward()
    theirs(x_ref, labels=labels).loss.backward()
    assert relative_error(x_ref.grad, x.grad) < 1e-9
    reference = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if name.endswith("attention.key.bias"):
            continue  # softmax ignores a shift shared by all keys: both gradients are rounding noise
        assert relative_error(reference[name].grad, p.grad) < 1e-9, name


def test_backbone_output_of_a_stage_of_no_blocks():
    config = PvtV2Config(**dict(TINY, depths=[1, 0, 1, 0]), out_indices=[1, 3])
    ours, theirs = hf_pair(config, PvtV2Backbone, transformers.PvtV2Backbone, seed=2)
    x = torch.randn(2, 3, 50, 47, dtype=torch.float64)
    with torch.no_grad():
        expected, got = theirs(x).feature_maps, ours(x).feature_maps
    assert len(expected) == len(got) == 2
    for a, b in zip(expected, got):
        assert relative_error(a, b) < TOL64


def test_negative_depths_are_still_refused():
    with pytest.raises(ValueError, match=r"depths must hold non-negative numbers, got \[1, -1, 1, 1\]"):
        PvtV2Config(**dict(TINY, depths=[1, -1, 1, 1]))


# ---------------------------------------------------------------------------------------------- activations
@pytest.mark.parametrize("act", PARAMETER_FREE)
def test_every_activation_name_survives_save_pretrained_into_both_libraries(act, tmp_path):
    config = PvtV2Config(**dict(TINY, depths=[1, 1, 1, 1]), hidden_act=act, num_labels=3)
    ours, theirs = hf_pair(config, seed=7)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["hidden_act"] == act
    again = PvtV2ForImageClassification.from_pretrained(tmp_path).double()
    assert again.config.hidden_act == act
    loaded = transformers.PvtV2ForImageClassification.from_pretrained(tmp_path).double().eval()
    x = torch.randn(1, 3, 29, 31, dtype=torch.float64) * 3
    with torch.no_grad():
        expected = theirs(x).logits
        assert relative_error(expected, again(x).logits) < TOL64
        assert relative_error(expected, loaded(x).logits) < TOL64


# A callable or module for hidden_act (the model documentation's ``Union[str, Callable]``; transformers' strict config
# of this version refuses it), against transformers built with the name of the same function.
CALLABLES = {
    "function F.silu": (F.silu, "silu"),
    "nn.GELU(approximate='tanh')": (torch.nn.GELU(approximate="tanh"), "gelu_pytorch_tanh"),
    "nn.GELU()": (torch.nn.GELU(), "gelu"),
    "nn.Tanh()": (torch.nn.Tanh(), "tanh"),
    "lambda: exact GELU by erf": (lambda t: t * 0.5 * (1.0 + torch.erf(t / 2.0**0.5)), "gelu_python"),
    "nn.Hardswish()": (torch.nn.Hardswish(), "hardswish"),
}


@pytest.mark.parametrize("name", list(CALLABLES))
def test_a_callable_activation_computes_what_its_name_does_on_every_path(name):
    act, named = CALLABLES[name]
    config = PvtV2Config(**TINY, hidden_act=act, num_labels=3)
    theirs_config = PvtV2Config(**TINY, hidden_act=named, num_labels=3)
    _, theirs = hf_pair(theirs_config, seed=5)
    ours = PvtV2ForImageClassification(config).double().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 35, 43, dtype=torch.float64) * 3
    _compare_all(ours, theirs, x, TOL64)
    _fast_matches(ours, theirs, x)


def test_a_callable_activation_cannot_be_saved_and_says_so(tmp_path):
    model = PvtV2ForImageClassification(PvtV2Config(**TINY, hidden_act=F.silu, num_labels=3))
    with pytest.raises(ValueError, match="hidden_act=<function silu .* is a callable and cannot be written to JSON"):
        model.save_pretrained(tmp_path)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


# ---------------------------------------------------------------------------------------------- widths and epsilons
# Head widths of 3, 7, 4 and 5 (no power of two), reductions that do not divide the grids, under tiny and large
# epsilons: the hostile weights put the patch-embedding LayerNorms' variances near them.
ODD = dict(depths=[1, 2, 1, 1], hidden_sizes=[15, 21, 20, 25], num_attention_heads=[5, 3, 5, 5], mlp_ratios=[3, 2, 3, 2],
           sr_ratios=[3, 2, 2, 1], num_labels=3)


@pytest.mark.parametrize("eps", [1e-12, 1e-2])
@pytest.mark.parametrize("linear", [False, True])
def test_odd_head_widths_and_extreme_epsilons(eps, linear):
    config = PvtV2Config(**ODD, layer_norm_eps=eps, linear_attention=linear)
    ours, theirs = hf_pair(config, seed=int(linear) + 3)
    x = torch.randn(2, 3, 51, 37, dtype=torch.float64) * 2 + 0.5
    _compare_all(ours, theirs, x, TOL64)
    _fast_matches(ours, theirs, x)


# Patch embeddings far from the published 7/4, 3/2: a 3x3 at stride 1, a 5x5 at stride 3, an even 4x4 at stride 4
# (padding 2, so the grid is not the input over 4) and a 2x2 at stride 1 (padding 1: the grid grows by one).
PATCHES = {
    "3/1, 5/3, 4/4, 2/1": (dict(TINY, patch_sizes=[3, 5, 4, 2], strides=[1, 3, 4, 1], sr_ratios=[4, 2, 1, 1],
                                num_channels=4), (19, 26)),
    "one stage, 4/4, one channel": (dict(num_encoder_blocks=1, depths=[2], hidden_sizes=[12], num_attention_heads=[3],
                                         mlp_ratios=[2], patch_sizes=[4], strides=[4], sr_ratios=[2], num_channels=1),
                                    (23, 30)),
}


@pytest.mark.parametrize("name", list(PATCHES))
def test_unusual_patch_embeddings(name):
    kwargs, size = PATCHES[name]
    config = PvtV2Config(**kwargs, num_labels=3)
    ours, theirs = hf_pair(config, seed=len(name))
    x = torch.randn(2, config.num_channels, *size, dtype=torch.float64) * 2 - 1
    _compare_all(ours, theirs, x, TOL64)
    _fast_matches(ours, theirs, x)


# ---------------------------------------------------------------------------------------------- inputs
def test_an_input_requiring_grad_in_an_eval_model_under_every_grad_mode():
    """Eval mode with an input that requires grad: the fast path must step aside under enable_grad (the gradient
    reaches the input as transformers' does) and may run under no_grad and inference_mode, with the same values."""
    config = PvtV2Config(**TINY, num_labels=3)
    ours, theirs = hf_pair(config, seed=9, dtype=torch.float32)
    x = torch.randn(2, 3, 41, 45) + 0.5
    x_ours, x_theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    expected = theirs(x_theirs).logits
    (expected * torch.arange(1.0, 4.0)).sum().backward()
    got = ours(x_ours).logits
    assert got.requires_grad
    (got * torch.arange(1.0, 4.0)).sum().backward()
    assert relative_error(expected, got) < TOL32
    assert relative_error(x_theirs.grad, x_ours.grad) < 1e-4
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            out = ours(x.clone().requires_grad_(True)).logits
        assert not out.requires_grad and relative_error(expected, out) < TOL32


@pytest.mark.parametrize("size", [(1, 1), (1, 9), (2, 2), (13, 3)])
def test_linear_attention_on_inputs_smaller_than_its_pooled_grid(size):
    config = PvtV2Config(**TINY, linear_attention=True, num_labels=3)
    ours, theirs = hf_pair(config, seed=sum(size))
    x = torch.randn(3, 3, *size, dtype=torch.float64) * 3 - 1
    _compare_all(ours, theirs, x, TOL64)
    _fast_matches(ours, theirs, x)


def test_a_small_input_to_a_stage_of_no_blocks_is_not_refused_for_its_unbuilt_reduction():
    """A stage of no blocks builds no reduction convolution, so its sr_ratio limits no input: transformers runs a
    16x16 image through depths [0, 1, 1, 1] with sr_ratios [8, 4, 2, 1] (stage 1 sees 4x4), pvtv2 refused it."""
    config = PvtV2Config(**dict(TINY, depths=[0, 1, 1, 1], sr_ratios=[8, 2, 1, 1]), num_labels=3)
    ours, theirs = hf_pair(config, seed=1)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    _compare_all(ours, theirs, x, TOL64)
    with pytest.raises(ValueError, match="stage 2 would see a 1x1 token grid, smaller than its spatial-reduction ratio"):
        ours(torch.randn(1, 3, 8, 8, dtype=torch.float64))  # stage 2 has blocks: its reduction still limits


@pytest.mark.parametrize("layout", ["timm", "original"])
def test_a_timm_checkpoint_with_a_stage_of_no_blocks_loads_without_a_config(layout, tmp_path):
    """Inferring the config from shapes read the MLP ratio and reduction of every stage's first block, and failed with
    "the checkpoint lacks 'encoder.layers.1.blocks.0.mlp.dense1.weight'" on a timm model of depths (1, 0, 1, 0)."""
    reference = PyramidVisionTransformerV2(num_classes=3, depths=(0, 1, 0, 1), embed_dims=(16, 32, 48, 64),
                                           num_heads=(1, 2, 3, 4), mlp_ratios=(2, 3, 2, 2), qkv_bias=False)
    reference = hostile_weights_(reference, seed=4).double().eval()
    path = save_state_dict(convert_state_dict(reference.state_dict(), layout), tmp_path / "m.safetensors")
    ours = PvtV2ForImageClassification.from_pretrained(path).double()
    assert ours.config.depths == [0, 1, 0, 1] and ours.config.qkv_bias is False
    assert ours.config.mlp_ratios[1] == 3 and ours.config.mlp_ratios[3] == 2
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(reference(x), ours(x).logits) < TOL64
    # and back into timm, strictly
    state = convert_state_dict(ours.state_dict(), "timm")
    exported = PyramidVisionTransformerV2(num_classes=3, depths=(0, 1, 0, 1), embed_dims=(16, 32, 48, 64),
                                          num_heads=(1, 2, 3, 4), mlp_ratios=(2, 3, 2, 2), qkv_bias=False)
    exported.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert relative_error(reference(x), exported.double().eval()(x)) < TOL64


@pytest.mark.parametrize("task", ["segformer", "glpn"])
def test_segformer_and_glpn_checkpoints_with_a_stage_of_no_blocks(task, tmp_path):
    """transformers' SegFormer and GLPN take a depth of 0 too: their checkpoints load and compute their numbers."""
    from pvtv2 import PvtV2ForDepthEstimation, PvtV2ForSemanticSegmentation

    kw = dict(depths=[1, 0, 1, 0], hidden_sizes=[16, 32, 40, 48], num_attention_heads=[1, 2, 5, 8],
              mlp_ratios=[4, 3, 2, 4], decoder_hidden_size=16)
    if task == "segformer":
        reference_cls, ours_cls = transformers.SegformerForSemanticSegmentation, PvtV2ForSemanticSegmentation
        reference = reference_cls(transformers.SegformerConfig(**kw, num_labels=3))
    else:
        reference_cls, ours_cls = transformers.GLPNForDepthEstimation, PvtV2ForDepthEstimation
        reference = reference_cls(transformers.GLPNConfig(**kw))
    reference = hostile_weights_(reference, seed=6).double().eval()
    reference.save_pretrained(tmp_path)
    ours = ours_cls.from_pretrained(tmp_path, dtype="auto").eval()
    assert ours.config.depths == [1, 0, 1, 0]
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(reference(x)[0], ours(x)[0]) < TOL64


# The GPU path's fused and frozen stages (pvtv2.fast.cuda), run on this CPU through Triton's interpreter as
# tests/fast/test_cuda_path.py does: a stage of no blocks (the stage's norm straight after the patch embedding) and
# Mix-FFN activations other than the exact GELU its kernel fuses (the tanh GELU, a module, a plain function).
_CUDA_SCRIPT = """
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from conftest import TINY, perturb_, relative_error
from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast
from pvtv2.fast import cuda

torch.manual_seed(0)
out = {}
cases = {"no blocks": dict(depths=[1, 0, 1, 0]), "gelu tanh": dict(hidden_act="gelu_pytorch_tanh"),
         "module": dict(hidden_act=torch.nn.Tanh()), "function": dict(hidden_act=torch.sigmoid),
         "linear, no blocks": dict(depths=[0, 1, 0, 1], linear_attention=True)}
for name, kw in cases.items():
    model = perturb_(PvtV2ForImageClassification(PvtV2Config(**{**TINY, **kw}, num_labels=3)), scale=0.2).eval()
    x = torch.randn(2, 3, 64, 48) + 0.3
    with torch.no_grad():
        with fast.fast_path(False):
            want = model.pvt_v2(x).last_hidden_state
        errors = []
        for forward in (cuda.fused_stage_forward, cuda.frozen_stage_forward):
            got = x
            for stage in model.pvt_v2.encoder.layers:
                got = forward(stage, got)
            errors.append(relative_error(want, got))
    out[name] = errors
print(json.dumps(out))
"""


@pytest.mark.slow
def test_gpu_path_stages_of_no_blocks_and_other_activations_through_the_triton_interpreter(tmp_path):
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "run.py"
    script.write_text(_CUDA_SCRIPT)
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    tests = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(script), str(tests)], env=env, capture_output=True, text=True, check=False,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == {"no blocks", "gelu tanh", "module", "function", "linear, no blocks"}
    for name, errors in results.items():
        assert all(e < TOL32 for e in errors), (name, errors)


@pytest.mark.parametrize("initializer_range", [0.05, 1.0])
def test_initialisation_draws_from_transformers_distributions(initializer_range):
    """transformers draws in another order, so the values differ; the scheme must not: the same tensors all zero and
    all one, and per kind of tensor the same spread. At 1.0 the truncation at +-2 (absolute, as transformers' and
    timm's trunc_normal_) narrows the linear weights to std 0.88."""
    from conftest import hf_config

    config = PvtV2Config(**dict(TINY, depths=[2, 0, 3, 1]), num_labels=7, initializer_range=initializer_range)
    torch.manual_seed(0)
    ours = PvtV2ForImageClassification(config).state_dict()
    theirs = transformers.PvtV2ForImageClassification(hf_config(config)).state_dict()
    assert list(ours) == list(theirs)
    for name in ours:
        for value in (0.0, 1.0):
            assert bool((ours[name] == value).all()) == bool((theirs[name] == value).all()), name

    def pooled(state, kind):
        # the weights of one kind (same shapes in both models), as one sample
        return torch.cat([state[k].flatten() for k in state if kind(k, state[k])])

    def linear(k, t):
        return t.ndim == 2

    def conv(k, t):
        return t.ndim == 4

    for kind in (linear, conv):
        a, b = pooled(ours, kind), pooled(theirs, kind)
        assert a.numel() == b.numel() > 5000
        assert abs(a.std() / b.std() - 1) < 0.05 and abs(a.abs().max() - b.abs().max()) < 0.5 * b.abs().max()
    if initializer_range == 1.0:
        a = pooled(ours, linear)
        assert a.abs().max() <= 2.0 and abs(a.std().item() - 0.8796) < 0.03  # N(0, 1) truncated to [-2, 2]
    for name in ours:
        if name.endswith("dwconv.dwconv.weight"):
            assert abs(ours[name].std().item() - (2 / 9) ** 0.5) < 0.15, name  # fan_out 9 per group, as transformers


# ---------------------------------------------------------------------------------------------- losses
# Label shapes and dtypes away from the usual ones, each against transformers' loss on the same labels (or, where
# transformers' loss refuses the dtype, on the labels cast as it needs them: pvtv2 computes the same loss).
LABELS = {
    "regression, (B,) float64": (1, None, lambda: torch.randn(3, dtype=torch.float64), None),
    "regression, (B, 1)": (1, None, lambda: torch.randn(3, 1, dtype=torch.float64), None),
    "regression from integer labels": (1, None, lambda: torch.tensor([1, 0, 2]), None),
    "regression, float32 labels to a float64 model": (1, "regression", lambda: torch.randn(3), None),
    "regression of 3": (3, "regression", lambda: torch.randn(3, 3, dtype=torch.float64), None),
    "single label, -100 ignored": (3, None, lambda: torch.tensor([1, -100, 2]), None),
    "single label, (B, 1)": (3, None, lambda: torch.tensor([[1], [0], [2]]), None),
    "single label, uint8": (3, "single_label_classification", lambda: torch.tensor([1, 0, 2], dtype=torch.uint8), None),
    "single label, int32": (3, None, lambda: torch.tensor([1, 0, 2], dtype=torch.int32), torch.long),
    "multi label, inferred from floats": (
        3, None, lambda: torch.tensor([[1.0, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.float64), None),
    # transformers' BCE of float64 logits and float32 targets comes out float32; pvtv2 keeps the logits' float64
    "multi label, float32 targets": (3, None, lambda: torch.tensor([[1.0, 0, 1], [0, 0, 0], [1, 1, 1]]), torch.float64),
    "multi label, integer targets": (
        3, "multi_label_classification", lambda: torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1]]), torch.float64),
}


@pytest.mark.parametrize("name", list(LABELS))
def test_losses_of_unusual_labels_are_transformers(name):
    num_labels, problem_type, make, cast = LABELS[name]
    extra = {"problem_type": problem_type} if problem_type else {}
    config = PvtV2Config(**dict(TINY, depths=[1, 1, 1, 1]), num_labels=num_labels, **extra)
    ours, theirs = hf_pair(config, seed=3)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    labels = make()
    with torch.no_grad():
        expected = theirs(x, labels=labels if cast is None else labels.to(cast)).loss
        got = ours(x, labels=labels).loss
    assert got.dtype == torch.float64 and abs(got.item() - expected.item()) <= 1e-12 * abs(expected.item())


def test_layer_decay_ids_never_fall_along_a_stage_of_no_blocks():
    """Layer-wise decay gives each parameter an id that grows from input to head. A stage of no blocks put its closing
    LayerNorm at starts + 0, one below its own patch embedding (starts + 1): a later layer decayed more."""
    from pvtv2.training.recipes import encoder_layer_ids

    model = PvtV2ForImageClassification(PvtV2Config(**dict(TINY, depths=[0, 2, 0, 1]), num_labels=3))
    ids, top = encoder_layer_ids(model)
    assert top == 4
    order = [ids[name] for name, _ in model.named_parameters()]  # parameters in forward order
    assert order == sorted(order)
    stage = "pvt_v2.encoder.layers.{}.{}.weight".format
    assert [ids[stage(0, "patch_embedding.proj")], ids[stage(0, "layer_norm")]] == [0, 0]
    assert [ids[stage(2, "patch_embedding.proj")], ids[stage(2, "layer_norm")]] == [3, 3]
    assert ids[stage(3, "blocks.0.mlp.dense1")] == 3 and ids["classifier.weight"] == 4


# ---------------------------------------------------------------------------------------------- reduced precision
REDUCED = {
    "odd heads, a stage of no blocks, tanh GELU": dict(
        depths=[1, 0, 2, 1], hidden_sizes=[15, 21, 20, 25], num_attention_heads=[5, 3, 5, 5], mlp_ratios=[3, 2, 3, 2],
        sr_ratios=[3, 2, 2, 1], hidden_act="gelu_pytorch_tanh"),
    "linear, quick GELU": dict(TINY, linear_attention=True, hidden_act="quick_gelu"),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(REDUCED))
def test_reduced_precision_is_as_accurate_as_transformers(name, dtype):
    """A bf16 / fp16 model (frozen or not) and an fp32 model under CPU autocast, each measured against the float64
    result: within a small factor of transformers' own error in the same precision (rounding differs, the size of
    the error must not)."""
    import copy

    config = PvtV2Config(**REDUCED[name], num_labels=3)
    ours, theirs = hf_pair(config, seed=2)
    x = torch.randn(2, 3, 29, 35, dtype=torch.float64)
    with torch.no_grad():
        reference = theirs(x).logits
        low, theirs_low = copy.deepcopy(ours).to(dtype), copy.deepcopy(theirs).to(dtype)
        bound = 2.5 * relative_error(reference, theirs_low(x.to(dtype)).logits) + 2e-3
        assert relative_error(reference, low(x.to(dtype)).logits) < bound
        fast.freeze(low)
        assert relative_error(reference, low(x.to(dtype)).logits) < bound
        ours, theirs = ours.float(), theirs.float()
        with torch.autocast("cpu", dtype=dtype):
            bound = 2.5 * relative_error(reference, theirs(x.float()).logits) + 2e-3
            assert relative_error(reference, ours(x.float()).logits) < bound
