"""Model outputs against transformers' PvtV2 implementation with the same weights, and the model's own contracts."""

from __future__ import annotations

import contextlib
import copy
import itertools

import pytest
import torch
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel

from pvtv2 import PvtV2Backbone, PvtV2Config, PvtV2ForImageClassification, PvtV2Model
from pvtv2.models import layers
from pvtv2.models.layers import DropPath

from conftest import TINY, hf_config, hf_twin, perturb_, random_weights_, relative_error, shrink_patch_embeddings_

TOL = 1e-5


def pair(config: PvtV2Config, cls=PvtV2ForImageClassification, hf_cls=transformers.PvtV2ForImageClassification, seed=0):
    """A transformers model with perturbed weights and ours with the same weights loaded strictly."""
    with torch.device("meta"):
        theirs = hf_cls(hf_config(config))
        ours = cls(config)
    random_weights_(theirs, seed=seed).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    return ours.eval(), theirs


def assert_same_outputs(ours_out, theirs_out):
    for name in ("logits", "last_hidden_state"):
        if hasattr(theirs_out, name) and getattr(theirs_out, name) is not None:
            assert relative_error(getattr(theirs_out, name), getattr(ours_out, name)) < TOL, name
    if theirs_out.hidden_states is not None:
        assert len(ours_out.hidden_states) == len(theirs_out.hidden_states)
        for a, b in zip(theirs_out.hidden_states, ours_out.hidden_states):
            assert relative_error(a, b) < TOL
    if theirs_out.attentions is not None:
        assert len(ours_out.attentions) == len(theirs_out.attentions)
        for stage_a, stage_b in zip(theirs_out.attentions, ours_out.attentions):
            assert len(stage_a) == len(stage_b)
            for a, b in zip(stage_a, stage_b):
                assert relative_error(a, b) < TOL


PRESETS = ["pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2", "pvt_v2_b2_li", "pvt_v2_b3", "pvt_v2_b4", "pvt_v2_b5"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_match_transformers(name):
    config = PvtV2Config.from_preset(name, num_labels=11)
    ours, theirs = pair(config)
    x = torch.randn(1, 3, 56, 72)
    with torch.no_grad():
        expected = theirs(x, output_hidden_states=True, output_attentions=True)
        assert_same_outputs(ours(x, output_hidden_states=True, output_attentions=True), expected)
        # The fast path (no attentions requested) gives the same numbers.
        assert relative_error(expected.logits, ours(x).logits) < TOL


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("size", [(64, 64), (97, 131), (33, 41), (250, 190)])
def test_both_attention_types_any_input_size(linear, size):
    config = PvtV2Config(**TINY, linear_attention=linear, num_labels=5)
    ours, theirs = pair(config, seed=1)
    shrink_patch_embeddings_(theirs, 0.01)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = theirs(x, output_hidden_states=True, output_attentions=True)
        assert_same_outputs(ours(x, output_hidden_states=True, output_attentions=True), expected)
        assert relative_error(expected.logits, ours(x).logits) < TOL
    # Strides of the pyramid: 4, 8, 16, 32 with the convolutions' rounding.
    h, w = size
    for i, hidden in enumerate(expected.hidden_states):
        kernel, stride = (7, 4) if i == 0 else (3, 2)
        h, w = ((n + 2 * (kernel // 2) - kernel) // stride + 1 for n in (h, w))
        assert hidden.shape[-2:] == (h, w)


@pytest.mark.parametrize("act", ["gelu_new", "relu", "selu", "quick_gelu", "gelu_fast", "gelu_pytorch_tanh", "silu"])
def test_activations_match_transformers(act):
    config = PvtV2Config(**TINY, hidden_act=act, num_labels=3)
    if act == "selu":
        # The documentation lists "selu" but transformers' table lacks it: give its model torch's SELU by hand.
        ours, theirs = pair(config.replace(hidden_act="relu"), seed=2)
        ours = PvtV2ForImageClassification(config).eval()
        ours.load_state_dict(theirs.state_dict())
        for module in theirs.modules():
            if hasattr(module, "intermediate_act_fn"):
                module.intermediate_act_fn = torch.nn.SELU()
    else:
        ours, theirs = pair(config, seed=2)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        assert relative_error(theirs(x).logits, ours(x).logits) < TOL


def test_model_and_tuple_outputs_match_transformers():
    config = PvtV2Config(**TINY)
    ours, theirs = pair(config, PvtV2Model, transformers.PvtV2Model, seed=3)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        a = theirs(x, output_hidden_states=True, return_dict=False)
        b = ours(x, output_hidden_states=True, return_dict=False)
        assert isinstance(b, tuple) and len(a) == len(b) == 2
        assert relative_error(a[0], b[0]) < TOL
        out = ours(x)
        assert out[0] is out.last_hidden_state and out["last_hidden_state"] is out.last_hidden_state
        assert out.last_hidden_state.shape == (2, 64, 2, 2)


@pytest.mark.parametrize("kwargs", [dict(out_indices=[0, 1, 2, 3]), dict(out_features=["stage2", "stage4"]), dict(out_indices=[0, 1]), dict()])
def test_backbone_matches_transformers(kwargs):
    config = PvtV2Config(**TINY, **kwargs)
    ours, theirs = pair(config, PvtV2Backbone, transformers.PvtV2Backbone, seed=4)
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        expected = theirs(x).feature_maps
        got = ours(x).feature_maps
    assert len(got) == len(expected) == len(ours.out_features)
    for a, b in zip(expected, got):
        assert relative_error(a, b) < TOL
    assert ours.channels == list(theirs.channels)
    for fmap, channels, stride in zip(got, ours.channels, ours.strides):
        assert fmap.shape[1] == channels
        assert fmap.shape[-1] == -(-80 // stride)  # ceil(W / stride) with these paddings


def test_losses_match_transformers():
    torch.manual_seed(5)
    x = torch.randn(4, 3, 40, 40)
    cases = [
        (dict(num_labels=5), torch.tensor([0, 4, 2, 1])),
        (dict(num_labels=5, problem_type="multi_label_classification"), (torch.rand(4, 5) > 0.5).float()),
        (dict(num_labels=1), torch.randn(4)),
        (dict(num_labels=3, problem_type="regression"), torch.randn(4, 3)),
        (dict(num_labels=5), torch.tensor([0, -100, 2, 1])),
    ]
    for kwargs, labels in cases:
        config = PvtV2Config(**TINY, **kwargs)
        ours, theirs = pair(config, seed=6)
        with torch.no_grad():
            expected = theirs(x, labels=labels).loss
            got = ours(x, labels=labels).loss
        assert torch.isfinite(got)
        assert relative_error(expected, got) < TOL, kwargs


def test_float_labels_infer_multi_label_like_transformers():
    config = PvtV2Config(**TINY, num_labels=4)
    ours, theirs = pair(config, seed=7)
    x = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    with torch.no_grad():
        assert relative_error(theirs(x, labels=labels).loss, ours(x, labels=labels).loss) < TOL


@pytest.mark.parametrize(
    "pixel_values, error, message",
    [
        (torch.randn(1, 4, 32, 32), ValueError, "channels"),
        (torch.randn(3, 32, 32), ValueError, "4 dimensions"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, "floating-point"),
        ([[1.0]], TypeError, "torch.Tensor"),
        (torch.randn(0, 3, 32, 32), ValueError, "empty"),
    ],
)
def test_bad_pixel_values_are_clear_errors(pixel_values, error, message):
    model = PvtV2ForImageClassification(PvtV2Config(**TINY)).eval()
    with pytest.raises(error, match=message):
        model(pixel_values)


def test_too_small_input_is_a_clear_error():
    model = PvtV2ForImageClassification(PvtV2Config(**TINY)).eval()
    with pytest.raises(ValueError, match="too small"):
        model(torch.randn(1, 3, 33, 20))
    # Linear attention pools to a fixed size and accepts tiny inputs.
    linear = PvtV2ForImageClassification(PvtV2Config(**TINY, linear_attention=True)).eval()
    assert linear(torch.randn(1, 3, 20, 12)).logits.shape == (1, 2)


def test_bad_labels_are_clear_errors():
    model = PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=3)).eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"out of range.*3 classes"):
        model(x, labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="out of range"):
        model(x, labels=torch.tensor([-2, 1]))
    with pytest.raises(ValueError, match="2 images"):
        model(x, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="shape"):
        model(x, labels=torch.rand(2, 5))


def test_drop_path_closed_form():
    torch.manual_seed(8)
    layer = DropPath(0.25).train()
    x = torch.ones(20000, 3)
    y = layer(x)
    kept = y[:, 0] != 0
    # Kept samples are scaled by 1 / keep_prob, dropped ones are zero, whole samples at a time.
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / 0.75))
    assert torch.equal(y[~kept], torch.zeros_like(y[~kept]))
    assert abs(kept.float().mean().item() - 0.75) < 0.02
    assert torch.equal(layer.eval()(x), x)


def test_training_mode_applies_dropout_and_drop_path():
    config = PvtV2Config(**TINY, drop_path_rate=0.5, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = PvtV2ForImageClassification(config)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    torch.manual_seed(0)
    a = model(x).logits
    torch.manual_seed(1)
    b = model(x).logits
    assert (a - b).abs().max() > 1e-4
    model.eval()
    assert torch.equal(model(x).logits, model(x).logits)
    # Stochastic depth grows linearly over all blocks, as in the reference implementations.
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    expected = torch.linspace(0, 0.5, sum(TINY["depths"])).tolist()[1:]
    assert rates == pytest.approx(expected)


def test_gradient_checkpointing_gives_the_same_gradients():
    config = PvtV2Config(**TINY, num_labels=3)
    model = PvtV2ForImageClassification(config).train()
    x, labels = torch.randn(2, 3, 40, 40), torch.tensor([0, 2])
    # Checkpointed blocks run again during backward: count the calls of every block (pre-hooks: the recomputation
    # stops once it has what backward needs, before forward hooks would fire), or a switch that did nothing would pass
    # the comparison below.
    calls = []
    for block in (b for stage in model.pvt_v2.encoder.layers for b in stage.blocks):
        block.register_forward_pre_hook(lambda module, args: calls.append(module))
    blocks = sum(TINY["depths"])
    model(x, labels=labels).loss.backward()
    assert len(calls) == blocks
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    calls.clear()
    model.gradient_checkpointing_enable()
    model(x, labels=labels).loss.backward()
    assert len(calls) == 2 * blocks  # forward, and recomputed in backward
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[name], rtol=1e-5, atol=1e-7), name
    model.gradient_checkpointing_disable()
    calls.clear()
    model(x, labels=labels).loss.backward()
    assert len(calls) == blocks


def test_init_follows_the_reference_scheme():
    torch.manual_seed(9)
    model = PvtV2ForImageClassification(PvtV2Config.from_preset("pvt_v2_b0"))
    dense = model.pvt_v2.encoder.layers[0].blocks[0].mlp.dense1.weight
    # Truncated at +-2 (absolute, as timm's trunc_normal_ does) with std 0.02: the truncation removes nothing, so the
    # values are those of a normal distribution with std 0.02 (a plain normal(0, 1) or a uniform init would fail).
    assert abs(dense.std().item() - 0.02) < 0.002 and abs(dense.mean().item()) < 0.002
    assert 3 * 0.02 < dense.abs().max().item() < 6 * 0.02
    conv = model.pvt_v2.encoder.layers[1].patch_embedding.proj
    fan_out = 3 * 3 * conv.out_channels
    assert abs(conv.weight.std().item() - (2.0 / fan_out) ** 0.5) < 0.05 * (2.0 / fan_out) ** 0.5
    # The Mix-FFN's depthwise conv: fan_out divided by the groups (one per channel), std sqrt(2 / 9), as timm's
    # _init_weights computes it; the patch embedding above has one group and cannot tell.
    dwconv = model.pvt_v2.encoder.layers[0].blocks[0].mlp.dwconv.dwconv
    assert dwconv.groups == dwconv.out_channels == 256
    assert abs(dwconv.weight.std().item() - (2.0 / 9) ** 0.5) < 0.05 * (2.0 / 9) ** 0.5
    assert torch.equal(dwconv.bias, torch.zeros_like(dwconv.bias))
    norm = model.pvt_v2.encoder.layers[2].layer_norm
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and torch.equal(norm.bias, torch.zeros_like(norm.bias))
    assert torch.equal(model.classifier.bias, torch.zeros_like(model.classifier.bias))


@pytest.mark.slow
def test_torch_compile_full_graph_matches_eager():
    config = PvtV2Config(**TINY, num_labels=4)
    model = PvtV2ForImageClassification(config).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x).logits
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        got = compiled(x).logits
    assert relative_error(expected, got) < 1e-5


def test_torch_compile_of_a_training_step_is_one_graph_with_eager_gradients():
    """A training forward and backward under ``torch.compile(fullgraph=True)`` (which raises at any graph break):
    the CPU's training-GEMM choice (pvtv2.fast.train) looked up the CPU's capabilities inside the traced code, a
    graph break at every linear layer of every block. Loss and gradients as in eager mode."""
    config = PvtV2Config(**TINY, num_labels=4)
    model = PvtV2ForImageClassification(config).train()
    twin = copy.deepcopy(model)
    x, labels = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    torch._dynamo.reset()
    compiled = torch.compile(twin, fullgraph=True, dynamic=False, backend="aot_eager")
    loss = compiled(x, labels=labels).loss
    loss.backward()
    expected = model(x, labels=labels).loss
    expected.backward()
    assert relative_error(expected, loss) < 1e-6
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if not name.endswith("key.bias"):  # zero up to rounding: softmax ignores a shift shared by all keys
            assert relative_error(p.grad, q.grad) < 1e-4, name
    torch._dynamo.reset()


@pytest.mark.parametrize("cap", [None, 0], ids=["explicit attention (CPU)", "SDPA under the math kernel"])
def test_second_derivatives_through_the_math_attention_kernel_equal_transformers(cap, monkeypatch):
    """A gradient penalty (create_graph=True), as docs/training.md says to run it: on the CPU as it is (the attention
    is explicit products there when autograd records it), and, where SDPA runs (probabilities over
    EXPLICIT_ATTENTION_BYTES, GPUs), under the math SDPA kernel (the fused kernels have no double backward); the
    weights' gradients equal transformers', whose attention is explicit products."""
    if cap is not None:
        monkeypatch.setattr(layers, "EXPLICIT_ATTENTION_BYTES", cap)
    ours = perturb_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=4))).eval()
    theirs = hf_twin(ours)
    x = torch.randn(2, 3, 64, 48)
    grads = []
    context = contextlib.nullcontext() if cap is None else sdpa_kernel(SDPBackend.MATH)
    for model, context in ((ours, context), (theirs, contextlib.nullcontext())):
        pixels = x.clone().requires_grad_(True)
        with context:
            out = model(pixels).logits
            (g,) = torch.autograd.grad(out.square().sum(), pixels, create_graph=True)
            g.square().sum().backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    largest = max(g.abs().max().item() for g in grads[1].values())
    for name, want in grads[1].items():
        got = grads[0][name]
        assert (got - want).abs().max().item() <= 1e-4 * max(want.abs().max().item(), 1e-2 * largest), name


@pytest.mark.parametrize("config_flags", [{}, dict(output_hidden_states=True, output_attentions=True)])
def test_backbone_tuple_is_transformers_for_every_flag(config_flags):
    """return_dict=False gave (feature_maps, hidden_states, attentions), attentions included when asked; transformers'
    PvtV2Backbone gives (feature_maps,) and hidden_states after it when asked, never attentions: the same tuple now,
    entry by entry, for each flag given, left to the config, or set in the config."""
    config = PvtV2Config(**TINY, out_features=["stage2", "stage4"], **config_flags)
    ours, theirs = pair(config, PvtV2Backbone, transformers.PvtV2Backbone, seed=5)
    x = torch.randn(1, 3, 64, 48)
    for output_hidden_states, output_attentions in itertools.product((None, False, True), repeat=2):
        flags = {k: v for k, v in (("output_hidden_states", output_hidden_states),
                                   ("output_attentions", output_attentions)) if v is not None}
        with torch.no_grad():
            expected = theirs(x, return_dict=False, **flags)
            got = ours(x, return_dict=False, **flags)
        assert isinstance(got, tuple) and len(got) == len(expected), flags
        for a, b in zip(expected, got, strict=True):  # feature maps, then (maybe) every stage's output
            assert isinstance(b, tuple) and len(a) == len(b)
            for x_a, x_b in zip(a, b, strict=True):
                assert x_a.shape == x_b.shape and relative_error(x_a, x_b) < TOL
        # the dict form keeps what it gave: attention maps of every stage when asked (transformers' gives none)
        with torch.no_grad():
            out = ours(x, **flags)
        assert len(out.feature_maps) == 2
        wants_attentions = output_attentions if output_attentions is not None else config.output_attentions
        assert (out.attentions is not None) == wants_attentions
