"""A seeded adversarial search of pvtv2's numerics against transformers' PvtV2 and timm's pvt_v2: inputs and weights
chosen to expose small differences, on every path (the CPU fast path frozen and not, under no_grad and
inference_mode, the reference path, training forward and backward), in float32 and float64.

The inputs: a large common offset with a tiny variance (100 + 0.01 z, 1e4 + z: the first LayerNorm's variance
cancels), constant and per-channel constant images, all zeros, huge (1e4 z), tiny (1e-20 z) and denormal (1e-40 z)
pixels, one NaN or one infinite pixel; batch 1-5, sizes 1-64 px (non-square, not multiples of 32, grids smaller than
linear attention's 7x7 pool, paddings larger than the input), laid out contiguous, channels-last, as a strided view
and as a stride-0 expanded batch. The weights: random, then made hostile one way or three at once: queries and keys
scaled by 5-8, queries by 30-100 (a softmax of one-hot rows), spatial-reduction convolutions by 100, a third of the
LayerNorm scales zero, biases of 10, patch embeddings and reductions scaled by 1e-3 (variances near the epsilons);
LayerNorm epsilons from 1e-12 to 1e-2, every activation name both libraries take, no query/key/value bias.

Each output is held to the float64 truth (transformers' model in float64, same weights): a float64 model to 1e-10
of its scale; a float32 one no further from the truth than twice transformers' own float32 result, plus 1e-5 of the
scale (the weights make some outputs ill-conditioned, where both libraries lie 1e-5 to 1e-4 from the truth, each by
its own rounding). Non-finite values: NaN and infinities where transformers' float32 result has them, signs
included. Gradients: float64 to 1e-9 of the largest; float32 within 4 times transformers' distance plus 1e-6 of
the largest (see below).

The campaign (a harness kept out of the repository): 560 inference cases (seeds 0-559, 4 paths each against
transformers, the timm-expressible classifiers against timm too), 40 folded one-image attentions (queries scaled by
up to 100, query biases of 100, 1e4-scaled pixels; the Mix-FFN whole and in bands, frozen and not) and 185 training
cases. It found one fault, held in tests/models/test_pixel_values.py: a float64 input to a model of another dtype
(or another input to a float64 model) under autocast got past the input check, which lets mixed dtypes through for
autocast to reconcile; autocast casts no float64 tensor, so the first convolution failed deep inside, as it does in
transformers and timm. No wrong number: float64 results within 1e-10 of the truth, NaN and infinity patterns
transformers', float32 inference within twice transformers' distance to the truth plus 1e-5 in all cases but one
(seed 355: a stage of two channels, whose LayerNorm turns rounding into signs, after embeddings scaled by 1e-3;
2.5e-5 against transformers' 3.8e-6, and over 20 redrawn inputs 1.0-1.1 times transformers' in the median). Where
the weights make the outputs ill-conditioned, pvtv2's distance over transformers' on the same input is a random
spread around one or a little above (1e4-scaled pixels with saturated queries: median 1.4-1.7, the reference path
as the fast path: the channels-last convolutions round otherwise; single cases reach 3-8 times), not a bias of the
method. Float32 training: SDPA's fused backward (it recomputes the softmax from its log-sum-exp) puts some gradients
10-30 times further from the truth than transformers' explicit softmax on saturated, constant or 1e4-scaled inputs
(3e-4 of the largest gradient against 2e-5; at worst 1.8e-3 against 6.7e-5, a patch-embedding LayerNorm's shift);
with the explicit softmax in its place, the two cases examined (harness seeds 54 and 182) came within 1.5 times
transformers' distance, or nearer. The CPU now trains with the explicit softmax (``pvtv2.models.layers``,
``_explicit_attention``): over this file's training draws 1-54, the worst parameter's distance went from up to 101
times transformers' (seed 22; 93 for seed 54, 13 for seed 6) to at most 3.2 times, with transformers' own distance
1e-7 to 2e-4 of the largest gradient.
"""

from __future__ import annotations

import copy
import random

import pytest
import timm
import torch
import transformers
from conftest import output_tensors, relative_error, training_results, transformers_twin

import pvtv2
from pvtv2 import PvtV2Backbone, PvtV2Config, PvtV2ForImageClassification, PvtV2Model
from pvtv2.models.activations import ACTIVATIONS
from pvtv2.models.modeling import check_input_size
from pvtv2.weights.layouts import convert_state_dict

ACTS = sorted(set(ACTIVATIONS) & set(transformers.activations.ACT2FN))
MODELS = {"classifier": (PvtV2ForImageClassification, transformers.PvtV2ForImageClassification),
          "encoder": (PvtV2Model, transformers.PvtV2Model), "backbone": (PvtV2Backbone, transformers.PvtV2Backbone)}
INPUTS = ["offset100", "offset1e4", "constant", "channel_constant", "zero", "huge", "tiny", "denormal", "normal", "nan",
          "inf"]
LAYOUTS = ["contiguous", "channels_last", "strided", "expanded"]
WEIGHTS = ["saturated", "saturated100", "big_reduction", "zero_norms", "big_biases", "tiny_variance", "mixed",
           "random"]


def draw_config(rng: random.Random, timm_like: bool) -> dict:
    n = rng.choice([2, 3, 4])
    heads = [rng.choice([1, 2, 3, 4]) for _ in range(n)]
    fields = dict(num_encoder_blocks=n, depths=[rng.choice([1, 1, 2]) for _ in range(n)],
                  hidden_sizes=[h * rng.choice([2, 4, 8]) for h in heads], num_attention_heads=heads,
                  sr_ratios=[rng.choice([1, 2, 4, 8]) for _ in range(n)],
                  mlp_ratios=[rng.choice([1, 2, 4]) for _ in range(n)], linear_attention=rng.random() < 0.3,
                  qkv_bias=rng.random() < 0.7, num_labels=rng.choice([2, 5]))
    if timm_like:  # what timm's model computes: its patches, strides, GELU and epsilons
        fields.update(patch_sizes=[7, 3, 3, 3][:n], strides=[4, 2, 2, 2][:n], patch_embed_layer_norm_eps=1e-5,
                      reduction_layer_norm_eps=1e-5)
        return fields
    patches = [rng.choice([1, 2, 3, 5, 7]) for _ in range(n)]
    fields.update(patch_sizes=patches, strides=[rng.choice([1, max(1, p - 1), max(1, p // 2), p]) for p in patches],
                  hidden_act=rng.choice(ACTS + ["gelu"] * 3), layer_norm_eps=rng.choice([1e-12, 1e-6, 1e-5, 1e-2]),
                  num_channels=rng.choice([1, 3, 4]))
    for field in ("patch_embed_layer_norm_eps", "reduction_layer_norm_eps"):
        if rng.random() < 0.4:
            fields[field] = rng.choice([1e-12, 1e-6, 1e-3])
    return fields


@torch.no_grad()
def hostile_weights_(model: torch.nn.Module, rng: random.Random, kind: str) -> None:
    """Random weights (matrices of unit gain, norm scales near one, small biases), then made hostile by ``kind``."""
    gen = torch.Generator().manual_seed(rng.randint(0, 2**31))
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        if p.ndim > 1:
            p.copy_(noise * p[0].numel() ** -0.5)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.3 * noise)
        else:
            p.copy_(0.1 * noise)
    kinds = rng.sample(WEIGHTS[:-2], 3) if kind == "mixed" else [kind]
    for name, m in sorted(model.named_modules()):
        for k in kinds:
            if k == "saturated" and name.endswith(("attention.query", "attention.key")):
                m.weight.mul_(rng.choice([5, 8]))
            elif k == "saturated100" and name.endswith("attention.query"):
                m.weight.mul_(rng.choice([30, 100]))
            elif k == "big_reduction" and name.endswith("spatial_reduction"):
                m.weight.mul_(100)
                m.bias.mul_(100)
            elif k == "zero_norms" and isinstance(m, torch.nn.LayerNorm) and rng.random() < 0.3:
                m.weight.zero_()
            elif k == "big_biases" and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.bias is not None:
                m.bias.add_(torch.randn(m.bias.shape, generator=gen).to(m.bias.dtype) * 10)
            elif k == "tiny_variance" and isinstance(m, torch.nn.Conv2d) and (
                    "patch_embed" in name or name.endswith("spatial_reduction")):
                m.weight.mul_(1e-3)
                m.bias.mul_(1e-3)


def work(config: PvtV2Config, batch: int, height: int, width: int) -> int:
    """About how many attention scores and hidden Mix-FFN values a forward pass computes: bounds a case's time."""
    total = 0
    for patch, stride, sr, depth, heads, size, ratio in zip(
            config.patch_sizes, config.strides, config.sr_ratios, config.depths, config.num_attention_heads,
            config.hidden_sizes, config.mlp_ratios):
        height = (height + 2 * (patch // 2) - patch) // stride + 1
        width = (width + 2 * (patch // 2) - patch) // stride + 1
        keys = 49 if config.linear_attention else (height // sr) * (width // sr) if sr > 1 else height * width
        total += batch * height * width * (heads * keys + size * ratio) * depth
    return total


def draw_pixels(rng: random.Random, config: PvtV2Config, dtype: torch.dtype, kind: str, layout: str,
                limit: int = 300_000) -> torch.Tensor | None:
    """Pixels of ``kind`` in ``layout`` of a size the model takes within ``limit`` (:func:`work`); None if the
    draws find none."""
    for _ in range(50):
        batch, height, width = rng.randint(1, 5), rng.randint(1, 40), rng.randint(1, 40)
        if rng.random() < 0.3:
            height, width = rng.choice([(7, 9), (33, 45), (40, 13), (17, 35), (64, 48), (39, 41), (28, 36)])
        try:
            check_input_size(height, width, config)
        except ValueError:
            continue
        if work(config, batch, height, width) < limit:
            break
    else:
        return None
    gen = torch.Generator().manual_seed(rng.randint(0, 2**31))
    shape = (batch, config.num_channels, height, width)
    z = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = {"offset100": 100 + 1e-2 * z, "offset1e4": 1e4 + z, "constant": torch.full(shape, rng.choice([0.5, -3.0, 7.0])),
         "channel_constant": z[:1, :, :1, :1].expand(shape), "zero": torch.zeros(shape, dtype=torch.float64),
         "huge": 1e4 * z, "tiny": 1e-20 * z, "denormal": 1e-40 * z}.get(kind, z).clone()
    if kind in ("nan", "inf"):
        x[tuple(rng.randrange(s) for s in shape)] = float("nan") if kind == "nan" else rng.choice([1, -1]) * float("inf")
    x = x.to(dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.zeros(*shape[:-1], 2 * width, dtype=dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x[:1].expand(shape) if layout == "expanded" else x


def draw_case(seed: int, kind: str | None = None, training: bool = False):
    """A model of ``kind`` with hostile weights, its transformers twin, the float64 truth and pixels: the input kind,
    layout and weights cycle with ``seed`` (every one of each within a few seeds), the rest is drawn."""
    rng = random.Random(seed)
    pixels = INPUTS[seed % (len(INPUTS) - 2)] if training else INPUTS[seed % len(INPUTS)]  # training: finite only
    kind = kind or rng.choice(["classifier", "classifier", "encoder", "backbone"])
    dtype = torch.float64 if seed % 3 == 2 else torch.float32
    x = None
    while x is None:  # a configuration that takes no size within the limit is drawn again
        config = PvtV2Config(**draw_config(rng, timm_like=False))
        x = draw_pixels(rng, config, dtype, pixels, LAYOUTS[seed % len(LAYOUTS)], 100_000 if training else 300_000)
    ours_class, theirs_class = MODELS[kind]
    ours = ours_class(config)
    hostile_weights_(ours, rng, WEIGHTS[seed % len(WEIGHTS)])
    ours.to(dtype).eval()
    theirs = transformers_twin(ours, theirs_class)
    return ours, theirs, copy.deepcopy(theirs).double(), x


def assert_near_truth(ours_out, theirs_out, truth_out, what: str) -> None:
    """Every output of ``ours_out`` as ``theirs_out``'s (shape, dtype, NaN and infinities) and, where finite, near the
    float64 truth: see the module docstring."""
    ours_t, theirs_t, truth_t = output_tensors(ours_out), output_tensors(theirs_out), output_tensors(truth_out)
    assert sorted(ours_t) == sorted(theirs_t) == sorted(truth_t), what
    for key, theirs in theirs_t.items():
        ours, truth = ours_t[key], truth_t[key]
        where = (what, key)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, where
        assert torch.equal(ours.isnan(), theirs.isnan()), (where, int(ours.isnan().sum()), int(theirs.isnan().sum()))
        assert torch.equal(ours[ours.isinf()], theirs[theirs.isinf()]), where
        finite = ours.isfinite() & truth.isfinite()
        if not finite.any():
            continue
        ours_error = relative_error(truth[finite], ours[finite])
        if ours.dtype == torch.float64:
            assert ours_error < 1e-10, (where, ours_error)
        else:
            theirs_error = relative_error(truth[finite], theirs[finite])
            assert ours_error <= 2 * theirs_error + 1e-5, (where, ours_error, theirs_error)


@pytest.mark.parametrize("seed", range(33))
def test_hostile_inputs_and_weights_on_every_inference_path(seed):
    """Each input kind once (seed % 11), in float32 and float64: the fast path under no_grad and inference_mode,
    frozen and not, and the reference path, against transformers and the float64 truth."""
    ours, theirs, truth, x = draw_case(seed)
    backbone = isinstance(ours, PvtV2Backbone)
    flags = dict(output_hidden_states=seed % 2 == 0, output_attentions=not backbone and seed % 4 == 1)
    plain = dict(flags, output_attentions=False)
    with torch.no_grad():
        expected, want = theirs(x.contiguous(), **flags), truth(x.double(), **flags)
        assert_near_truth(ours(x, **flags), expected, want, "fast path")
        with pvtv2.fast.fast_path(False):
            assert_near_truth(ours(x, **flags), expected, want, "reference path")
        expected, want = theirs(x.contiguous(), **plain), truth(x.double(), **plain)
        pvtv2.fast.freeze(ours)
        try:
            assert_near_truth(ours(x, **plain), expected, want, "frozen")
        finally:
            pvtv2.fast.unfreeze(ours)
    with torch.inference_mode():
        assert_near_truth(ours(x, **plain), expected, want, "inference_mode")


@pytest.mark.parametrize("seed", [1, 2, 4, 5, 6, 22, 25, 54])
def test_hostile_inputs_and_weights_in_training(seed):
    """Training mode, forward and backward: float64 (seeds 2 and 5) to the truth's formulas; float32 gradients within
    4 times transformers' distance to the truth plus 1e-6 of the largest gradient. Seeds 6, 22, 25 and 54 are cases
    where SDPA's backward (before the CPU trained with the explicit softmax) came 10-100 times further."""
    ours, theirs, truth, x = draw_case(seed, training=True)
    (ours_out, ours_grads), (theirs_out, theirs_grads), (truth_out, truth_grads) = (
        training_results(model, x.to(next(model.parameters()).dtype), dict(output_hidden_states=True), seed)
        for model in (ours, theirs, truth))
    float64 = x.dtype == torch.float64
    assert sorted(ours_out) == sorted(truth_out) and sorted(ours_grads) == sorted(truth_grads)
    for key, want in truth_out.items():
        ours_error, theirs_error = relative_error(want, ours_out[key]), relative_error(want, theirs_out[key])
        assert ours_error <= (1e-10 if float64 else 2 * theirs_error + 1e-5), (key, ours_error, theirs_error)
    scale = max(g.abs().max().item() for g in truth_grads.values())
    for name, want in truth_grads.items():
        assert ours_grads[name].isfinite().all(), name
        ours_error = (ours_grads[name].double() - want).abs().max().item() / scale
        theirs_error = (theirs_grads[name].double() - want).abs().max().item() / scale
        assert ours_error <= (1e-9 if float64 else 4 * theirs_error + 1e-6), (name, ours_error, theirs_error)


@pytest.mark.parametrize("seed", range(4))
def test_hostile_inputs_against_timm(seed):
    """timm's classifier with the same hostile weights (converted to its layout by pvtv2's converter): pvtv2's
    logits, fast and reference paths, near the float64 truth as timm's float32 ones are, with timm's NaN pattern."""
    rng = random.Random(100 + seed)
    kinds = ["offset1e4", "nan", "huge", "constant"]
    x = None
    while x is None:
        config = PvtV2Config(**draw_config(rng, timm_like=True))
        x = draw_pixels(rng, config, torch.float32, kinds[seed], LAYOUTS[seed])
    ours = PvtV2ForImageClassification(config)
    hostile_weights_(ours, rng, WEIGHTS[seed % len(WEIGHTS)])
    reference = timm.models.pvt_v2.PyramidVisionTransformerV2(
        num_classes=config.num_labels, depths=tuple(config.depths), embed_dims=tuple(config.hidden_sizes),
        num_heads=tuple(config.num_attention_heads), sr_ratios=tuple(config.sr_ratios),
        mlp_ratios=tuple(config.mlp_ratios), qkv_bias=config.qkv_bias, linear=config.linear_attention)
    reference.load_state_dict(convert_state_dict(ours.state_dict(), "timm"), strict=True)
    truth = copy.deepcopy(reference).double().eval()
    reference.eval(), ours.eval()
    with torch.no_grad():
        expected, want = {"logits": reference(x.contiguous())}, {"logits": truth(x.double())}
        assert_near_truth({"logits": ours(x).logits}, expected, want, "fast path")
        with pvtv2.fast.fast_path(False):
            assert_near_truth({"logits": ours(x).logits}, expected, want, "reference path")
