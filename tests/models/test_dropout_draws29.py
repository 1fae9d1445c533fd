"""Training-mode randomness drawn as transformers draws it: under the same ``torch.manual_seed``, a training forward
of ours (stochastic depth and both dropouts on) gives transformers' logits, loss and every parameter's gradient to
float rounding, fp32, batch 4: the classifier on several configurations (spatial reduction, linear attention,
sr_ratio 1 everywhere), through the oneDNN training GEMMs, with gradient checkpointing, the encoder and backbone, the
encoder inside a detector, and SegFormer / GLPN (segmentation, depth) against transformers' own.

What makes the draws equal: ``DropPath`` draws ``torch.rand((B, 1, 1))`` in the input's dtype, ``floor(rand +
keep)``, ``x.div(keep) * mask`` (transformers' ``PvtV2DropPath``; timm's ``bernoulli_`` draws other masks), and the
attention dropout is ``F.dropout`` on the (B, heads, N, N') probabilities (transformers' ``nn.Dropout``), in
transformers' order: attention probabilities, projection, drop path, the Mix-FFN's two dropouts, drop path."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from pvtv2 import PvtV2Backbone, PvtV2Config, PvtV2ForImageClassification, PvtV2Model, fast
from pvtv2.fast.train import OneDnnLinear
from pvtv2.models import layers
from pvtv2.models.layers import DropPath
from pvtv2.weights.layouts import to_canonical

from conftest import TINY, hf_config, random_weights_, relative_error

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # fp32, a few blocks deep: the rounding measured is 1e-6 .. 6e-6
DROPS = dict(drop_path_rate=0.4, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.25)
CONFIGS = {
    "b0_like": dict(TINY, **DROPS),
    "linear_attention": dict(TINY, linear_attention=True, **DROPS),
    "sr_ratio_1": dict(TINY, sr_ratios=[1, 1, 1, 1], **DROPS),
    "drop_path_only": dict(TINY, drop_path_rate=0.5),
    "dropouts_only": dict(TINY, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.1),
    "b0_widths": dict(depths=[2, 2, 2, 2], hidden_sizes=[32, 64, 160, 256], num_attention_heads=[1, 2, 5, 8],
                      drop_path_rate=0.3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
}


def _pair(config: PvtV2Config, cls=PvtV2ForImageClassification, hf_cls=None):
    """transformers' model with random weights and ours with the same weights (loaded strictly), both training."""
    hf_cls = hf_cls or transformers.PvtV2ForImageClassification
    with torch.device("meta"):
        theirs = hf_cls(hf_config(config))
        ours = cls(config)
    random_weights_(theirs, seed=0)
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    return ours.train(), theirs.train()


def _images(batch: int = 4, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _step(model, x, seed, **kwargs):
    """A training forward and backward under ``torch.manual_seed(seed)``: the output and every gradient."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same_gradients(want: dict, got: dict, zero: tuple[str, ...] = ()) -> None:
    """Every gradient within TOL of transformers', relative to its own largest value; those whose exact value is
    zero (names ending in ``zero``, and every key bias: a key bias shifts all scores of a query alike, and softmax
    ignores that) are both rounding noise, compared against the largest gradient of the model."""
    assert want.keys() == got.keys()
    scale = max(g.abs().max().item() for g in want.values())
    for name, g in want.items():
        if name.endswith(("attention.key.bias", *zero)):
            assert g.abs().max().item() < 1e-6 * scale and got[name].abs().max().item() < 1e-6 * scale, name
        else:
            assert relative_error(g, got[name]) < TOL, name


def _assert_draws_matter(model, x, seed, **kwargs):
    """Another seed gives other logits: the randomness is switched on, so equal logits mean equal draws."""
    torch.manual_seed(seed + 1)
    other = model(x, **kwargs).logits.detach()
    torch.manual_seed(seed)
    same = model(x, **kwargs).logits.detach()
    assert relative_error(same, other) > 1e-2


# ---------------------------------------------------------------------------------------------- stochastic depth
@pytest.mark.parametrize("shape", [(4, 50, 16), (4, 16, 7, 5), (1000, 3)])
@pytest.mark.parametrize("drop", [0.3, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_drop_path_is_transformers_drop_path_bit_for_bit(shape, drop, dtype):
    from transformers.models.pvt_v2.modeling_pvt_v2 import PvtV2DropPath

    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    torch.manual_seed(7)
    want = PvtV2DropPath(drop).train()(x)
    torch.manual_seed(7)
    got = DropPath(drop).train()(x)
    assert torch.equal(want, got)
    # Both kinds of sample present in the larger batches: the masks compared are not all ones or all zeros.
    kept = got.flatten(1).abs().sum(1) > 0
    if shape[0] == 1000:
        assert 0 < kept.float().mean().item() < 1
        assert abs(kept.float().mean().item() - (1 - drop)) < 0.05
    # timm's draw (bernoulli_) would keep other samples under this seed: what the two formulas record.
    torch.manual_seed(7)
    timm_mask = x.new_empty((shape[0],) + (1,) * (len(shape) - 1)).bernoulli_(1 - drop)
    if shape[0] == 1000:
        assert not torch.equal(timm_mask.flatten() > 0, kept)


# ---------------------------------------------------------------------------------------------- the classifier
@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_step_equals_transformers_under_the_same_seed(name):
    config = PvtV2Config(**CONFIGS[name], num_labels=5)
    ours, theirs = _pair(config)
    x, labels = _images(), torch.tensor([0, 4, 2, 1])
    with fast.train_gemm("aten"):
        got, got_grads = _step(ours, x, seed=123, labels=labels)
        _assert_draws_matter(ours, x, seed=123)
    want, want_grads = _step(theirs, x, seed=123, labels=labels)
    assert relative_error(want.logits, got.logits) < TOL
    assert abs(want.loss.item() - got.loss.item()) < TOL * want.loss.item()
    _assert_same_gradients(want_grads, got_grads)
    # The generator is left where transformers leaves it: the next draw of a training loop is the same too.
    torch.manual_seed(5)
    ours(x)
    after_ours = torch.rand(3)
    torch.manual_seed(5)
    theirs(x)
    assert torch.equal(after_ours, torch.rand(3))


def test_attention_maps_in_training_are_transformers_dropped_maps():
    """output_attentions in training: the maps after dropout (what the values are weighted with), as transformers'."""
    ours, theirs = _pair(PvtV2Config(**CONFIGS["b0_like"], num_labels=3))
    x = _images()
    torch.manual_seed(3)
    want = theirs(x, output_attentions=True)
    torch.manual_seed(3)
    got = ours(x, output_attentions=True)
    assert relative_error(want.logits, got.logits) < TOL
    maps = [(a, b) for stage_a, stage_b in zip(want.attentions, got.attentions) for a, b in zip(stage_a, stage_b)]
    assert len(maps) == sum(TINY["depths"])
    for a, b in maps:
        assert (a == 0).any() and torch.equal(a == 0, b == 0)  # the same probabilities dropped
        assert relative_error(a, b) < TOL


@pytest.mark.skipif(not fast.fast_path_available(torch.float32), reason="oneDNN's operators unavailable here")
@pytest.mark.parametrize("name", ["b0_like", "linear_attention"])
def test_training_step_through_the_onednn_gemms_equals_transformers(name):
    ours, theirs = _pair(PvtV2Config(**CONFIGS[name], num_labels=5))
    x, labels = _images(), torch.tensor([0, 4, 2, 1])
    calls = []
    forward = OneDnnLinear.forward

    def counted(ctx, *args):
        calls.append(1)
        return forward(ctx, *args)

    with fast.train_gemm("onednn"), mock.patch.object(OneDnnLinear, "forward", staticmethod(counted)):
        got, got_grads = _step(ours, x, seed=11, labels=labels)
    # Five linear layers' GEMMs per block (query, keys and values as one, proj, dense1, dense2) went through oneDNN.
    assert len(calls) == 5 * sum(TINY["depths"])
    want, want_grads = _step(theirs, x, seed=11, labels=labels)
    assert relative_error(want.logits, got.logits) < TOL
    _assert_same_gradients(want_grads, got_grads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_step_on_cuda_equals_transformers_under_the_same_seed():
    """On a GPU the attention dropout is F.dropout on the probabilities (CUDA's fused dropout kernel, as
    transformers' nn.Dropout), not SDPA's dropout_p, whose fused kernels draw other masks. TF32 off: fp32 products."""
    ours, theirs = _pair(PvtV2Config(**CONFIGS["b0_like"], num_labels=5))
    ours, theirs = ours.cuda(), theirs.cuda()
    x, labels = _images().cuda(), torch.tensor([0, 4, 2, 1]).cuda()
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            got, got_grads = _step(ours, x, seed=13, labels=labels)
            want, want_grads = _step(theirs, x, seed=13, labels=labels)
            _assert_draws_matter(ours, x, seed=13)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    assert relative_error(want.logits, got.logits) < TOL
    _assert_same_gradients(want_grads, got_grads)


def test_gradient_checkpointing_recomputes_the_same_draws():
    """Checkpointed blocks are run again in backward with the generator state of their forward: the gradients are
    transformers' (without checkpointing), not those of other masks."""
    ours, theirs = _pair(PvtV2Config(**CONFIGS["b0_like"], num_labels=5))
    ours.gradient_checkpointing_enable()
    x, labels = _images(), torch.tensor([0, 4, 2, 1])
    got, got_grads = _step(ours, x, seed=4, labels=labels)
    want, want_grads = _step(theirs, x, seed=4, labels=labels)
    assert relative_error(want.logits, got.logits) < TOL
    _assert_same_gradients(want_grads, got_grads)


@pytest.mark.parametrize("cap", [None, 0], ids=["default", "probabilities over the cap"])
def test_sdpa_only_without_attention_dropout_and_over_the_cap(cap, monkeypatch):
    """CPU training computes the attention as transformers' eager attention does (the explicit softmax, with
    F.dropout where attention dropout is set), and no SDPA call; where the probabilities would pass
    EXPLICIT_ATTENTION_BYTES, SDPA with attention dropout 0 (it never stores them), the explicit softmax above 0."""
    if cap is not None:
        monkeypatch.setattr(layers, "EXPLICIT_ATTENTION_BYTES", cap)
    x = _images(batch=2)
    for attn_drop, expected in ((0.0, 0 if cap is None else sum(TINY["depths"])), (0.2, 0)):
        config = PvtV2Config(**TINY, drop_path_rate=0.3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=attn_drop)
        model = PvtV2ForImageClassification(config).train()
        with mock.patch.object(layers.F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention) as sdpa:
            model(x).logits.sum().backward()
        assert sdpa.call_count == expected, attn_drop


def test_eval_mode_draws_nothing():
    """Eval mode, with every rate set: no draw from the generator, and the same output twice."""
    model = PvtV2ForImageClassification(PvtV2Config(**CONFIGS["b0_like"], num_labels=3)).eval()
    x = _images(batch=2)
    torch.manual_seed(9)
    a = model(x).logits
    after = torch.rand(4)
    torch.manual_seed(9)
    assert torch.equal(torch.rand(4), after)
    assert torch.equal(model(x).logits, a)


# ---------------------------------------------------------------------------------------------- encoder, backbone
def test_encoder_and_backbone_in_training_equal_transformers():
    config = PvtV2Config(**CONFIGS["b0_like"])
    x = _images()
    for ours_cls, hf_cls, read in (
        (PvtV2Model, transformers.PvtV2Model, lambda out: [out.last_hidden_state]),
        (PvtV2Backbone, transformers.PvtV2Backbone, lambda out: list(out.feature_maps)),
    ):
        ours, theirs = _pair(config, ours_cls, hf_cls)
        torch.manual_seed(21)
        want = read(theirs(x))
        torch.manual_seed(21)
        got = read(ours(x))
        assert len(want) == len(got) >= 1
        for a, b in zip(want, got):
            assert relative_error(a, b) < TOL, ours_cls.__name__
        torch.manual_seed(22)
        assert relative_error(want[-1], read(ours(x))[-1]) > 1e-2  # another seed, other draws


def test_detector_encoder_draws_as_transformers_backbone():
    """The detector's feature pyramid runs the encoder in training mode: its stage maps are transformers' backbone's
    under the same seed (torchvision's own draws, such as the training resize, come before and after it)."""
    pytest.importorskip("torchvision")
    from pvtv2.models.detection import PvtV2ForObjectDetection

    config = PvtV2Config(**CONFIGS["b0_like"], detector="retinanet", num_labels=3)
    model = PvtV2ForObjectDetection(config)
    theirs = transformers.PvtV2Backbone(hf_config(PvtV2Config(**CONFIGS["b0_like"])))
    random_weights_(theirs, seed=0)
    missing, unexpected = model.pvt_v2.load_state_dict(theirs.state_dict(), strict=True)
    assert not missing and not unexpected
    model.train(), theirs.train()
    seen = []
    model.pvt_v2.register_forward_hook(lambda module, args, out: seen.append(out.hidden_states))
    x = _images()
    torch.manual_seed(31)
    model.detector.backbone(x)
    torch.manual_seed(31)
    want = theirs(x, output_hidden_states=True).hidden_states  # every stage's map
    assert len(seen) == 1 and len(seen[0]) == len(want) == 4
    for a, b in zip(want, seen[0]):
        assert relative_error(a, b) < TOL


# ---------------------------------------------------------------------------------------------- SegFormer, GLPN
SMALL = dict(depths=[1, 2, 1, 1], hidden_sizes=[16, 32, 40, 48], num_attention_heads=[1, 2, 5, 8],
             mlp_ratios=[4, 3, 2, 4], decoder_hidden_size=16)


def _dense_pair(reference_cls, config, ours_cls, folder):
    torch.manual_seed(0)
    reference = reference_cls(config)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for _, p in sorted(reference.named_parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    reference.save_pretrained(folder)
    return reference.train(), ours_cls.from_pretrained(folder).train()


def test_segformer_training_step_with_every_dropout_equals_transformers(tmp_path):
    """SegFormer with stochastic depth, both encoder dropouts and the decode head's dropout (transformers' eager
    attention, whose dropout is F.dropout on the probabilities): logits, loss and every gradient."""
    from pvtv2.models.segmentation import PvtV2ForSemanticSegmentation

    config = transformers.SegformerConfig(**SMALL, num_labels=4, classifier_dropout_prob=0.3, **DROPS)
    config._attn_implementation = "eager"
    reference, model = _dense_pair(transformers.SegformerForSemanticSegmentation, config,
                                   PvtV2ForSemanticSegmentation, tmp_path)
    assert model.config.drop_path_rate == 0.4 and model.config.attention_probs_dropout_prob == 0.25
    x = _images(size=64)
    labels = torch.randint(0, 4, (4, 64, 64), generator=torch.Generator().manual_seed(2))
    want, want_grads = _step(reference, x, seed=8, labels=labels)
    got, got_grads = _step(model, x, seed=8, labels=labels)
    assert relative_error(want.logits, got.logits) < TOL
    assert abs(want.loss.item() - got.loss.item()) < TOL * want.loss.item()
    # Gradients paired by name: transformers' SegFormer names renamed as its checkpoints load into ours.
    want_grads = to_canonical(want_grads, "segformer")
    got_grads = {name.removeprefix("pvt_v2."): g for name, g in got_grads.items()}
    # The last stage's LayerNorm shift and the head's four projection biases reach the fusion only as constants per
    # channel, which the head's BatchNorm (training: batch statistics) subtracts: their gradients are exactly zero.
    constants = ("encoder.layers.3.layer_norm.bias", *(f"decode_head.linear_c.{i}.proj.bias" for i in range(4)))
    _assert_same_gradients(want_grads, got_grads, zero=constants)


def test_glpn_training_step_with_every_dropout_equals_transformers(tmp_path):
    """GLPN (depth) with stochastic depth and both encoder dropouts: the depth map, the loss and every gradient."""
    from pvtv2.models.depth import PvtV2ForDepthEstimation

    config = transformers.GLPNConfig(**SMALL, max_depth=7, **DROPS)
    reference, model = _dense_pair(transformers.GLPNForDepthEstimation, config, PvtV2ForDepthEstimation, tmp_path)
    assert model.config.drop_path_rate == 0.4 and model.config.hidden_dropout_prob == 0.2
    x = _images(size=64)
    labels = torch.rand(4, 64, 64, generator=torch.Generator().manual_seed(2)) * 7 + 0.1
    want, want_grads = _step(reference, x, seed=8, labels=labels)
    got, got_grads = _step(model, x, seed=8, labels=labels)
    assert relative_error(want.predicted_depth, got.predicted_depth) < TOL
    assert abs(want.loss.item() - got.loss.item()) < TOL * want.loss.item()
    torch.manual_seed(9)
    assert relative_error(want.predicted_depth, model(x).predicted_depth) > 1e-3  # another seed, other draws
    want_grads = to_canonical(want_grads, "glpn")
    got_grads = {name.removeprefix("pvt_v2."): g for name, g in got_grads.items()}
    # The fusions' convolution biases feed BatchNorms in training (batch statistics): exactly zero gradients.
    _assert_same_gradients(want_grads, got_grads, zero=("convolutional_layer1.0.bias", "convolutional_layer2.0.bias"))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_training_step_draws_as_transformers_with_pytorchs_random_ops(backend):
    """torch.compile(fullgraph=True): dynamo's graph draws with PyTorch's own random ops (aot_eager), and so does
    inductor with ``fallback_random=True``. Inductor's default generates its random numbers in its own kernels
    (other masks under the same seed, in ours and transformers' alike): not compared here."""
    import torch._inductor.config as inductor_config

    ours, theirs = _pair(PvtV2Config(**CONFIGS["b0_like"], num_labels=5))
    x, labels = _images(), torch.tensor([0, 4, 2, 1])
    want, want_grads = _step(theirs, x, seed=5, labels=labels)
    torch._dynamo.reset()
    try:
        with inductor_config.patch(fallback_random=True):
            compiled = torch.compile(ours, fullgraph=True, dynamic=False, backend=backend)
            got, got_grads = _step(compiled, x, seed=5, labels=labels)
    finally:
        torch._dynamo.reset()
    assert relative_error(want.logits, got.logits) < TOL
    _assert_same_gradients(want_grads, {name.removeprefix("_orig_mod."): g for name, g in got_grads.items()})
