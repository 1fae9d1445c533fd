"""A seeded differential search of the CPU fast path under unusual but legal configurations and inputs: the fused
stage (fresh and frozen) against the reference path of the same model (``pvtv2.fast.fast_path(False)``), the
reference against transformers' PvtV2, and both against the float64 truth (transformers' model in float64, or
pvtv2's where transformers takes no such config: fractional ``mlp_ratios``).

The draws: every activation name both libraries take, ``layer_norm_eps`` 1e-12 to 1.0 (the patch-embedding and
reduction epsilons apart too), no query/key/value bias, spatial reductions of 1, 2, 3 and 8 mixed across stages,
linear attention on odd grids, fractional Mix-FFN ratios, patch sizes and strides other than the published ones
(1-7 px, strides 1-5, odd and even), 1-4 stages with zero-block stages, drop path and dropout above 0 (identities in
eval), backbones with any subset of stages; batch 1-9, sizes from a 1-pixel stage up to 16 x 512, pixels contiguous,
channels-last, strided, expanded (stride 0), flipped, transposed, 1e4-scaled, with a NaN or infinite pixel; the
Mix-FFN whole, in groups of images and in bands of rows (``FFN_PIECE_BYTES`` shrunk).

The campaign (a harness kept out of the repository: 3,000 float32 draws, seeds 0-2,999, stages of 1 channel and up,
300 of them configurations the config refuses, a Mix-FFN ratio leaving no hidden channel; 600 more at batch 1,
where the float32 attention runs as folded GEMMs; 1,500 under autocast, seeds 0-1,499; 400 bf16 models) found no
wrong number. One fault, found beside it: the oneDNN capability probe drew its tensors in the default dtype, so a
first call under ``torch.set_default_dtype(torch.float16)`` (or bfloat16) failed its float32 check, and the failure,
cached, turned the float32 fast path off for the rest of the process (tested last). Otherwise:

- float32: fast, frozen and reference within 1e-5 (relative) of each other, NaN and infinity positions equal, and the
  reference within 1e-5 of transformers, in all cases but eight, all with a stage of 1-4 channels (whose LayerNorm
  turns rounding into signs), where one path lies 3-12 times another's distance from the float64 truth, at most
  1e-4 of the output's scale; with the pixels redrawn 20 times, the fast path's distance over the reference's has a
  median of 0.9-1.3 for each of four of them (no bias of the method);
- under bf16 autocast and for bf16 models (and float16 autocast, which runs the reference path; and autocast
  disabled inside an enabled block, which runs the fp32 fast path): within 2.5 times the reference's distance to the
  truth plus 4e-3 except for stages of 1-4 channels and single ill-conditioned logits; top-1 the same wherever the
  truth's margin is not within bf16 rounding;
- PyTorch's oneDNN bf16 convolution on channels-last inputs against fp32 over 32,256 patch-embedding shapes (kernels
  1-8, strides 1-8, 1-24 input channels, 1-16 px) and 3,120 spatial reductions (ratios 2-8, 1-64 channels): wrong
  numbers only for a reduction whose input is exactly one kernel wide, which ``one_kernel_wide_bf16`` copies;
- a float64, float16 or bfloat16 input to a float32 model, and an integer one, are refused with a TypeError naming
  both dtypes (transformers raises a RuntimeError from inside its first convolution); a float16 input under bf16
  autocast runs the bf16 fast path, as autocast casts it.

Noticed and left: under bf16 autocast, oneDNN's bf16 convolution with the weight as given (the reference's, and
transformers') spreads a NaN pixel one column further than its kernel reaches (12 positions of a 3x3 window instead
of 9); with the weight packed for the input's shape (a frozen stage's patch embedding) it spreads over the 9 or 10
positions, so a frozen model's NaN positions can differ from the reference's there. In float32 all three agree with
the kernel's window (tested below).
"""

from __future__ import annotations

import contextlib
import copy
import random
from unittest import mock

import pytest
import torch
import transformers
from conftest import output_tensors, perturb_, random_weights_, relative_error, transformers_twin

import pvtv2
import pvtv2.fast.cpu as cpu
from pvtv2 import PvtV2Backbone, PvtV2Config, PvtV2ForImageClassification, PvtV2Model
from pvtv2.models.activations import ACTIVATIONS
from pvtv2.models.modeling import check_input_size

needs_fast = pytest.mark.skipif(not pvtv2.fast.fast_path_available(), reason="no oneDNN fast path on this CPU")
needs_bf16 = pytest.mark.skipif(not pvtv2.fast.fast_path_available(torch.bfloat16),
                                reason="no bf16 fast path on this CPU (oneDNN bf16 kernels)")

ACTS = sorted(set(ACTIVATIONS) & set(transformers.activations.ACT2FN))
MODELS = {"classifier": (PvtV2ForImageClassification, transformers.PvtV2ForImageClassification),
          "encoder": (PvtV2Model, transformers.PvtV2Model), "backbone": (PvtV2Backbone, transformers.PvtV2Backbone)}
# (patch size, stride): the published 7/4 and 3/2, and others
PATCHES = [(7, 4), (3, 2), (1, 1), (2, 2), (5, 3), (3, 1), (4, 4), (7, 2), (5, 5), (6, 3)]
LAYOUTS = ["contiguous", "channels_last", "strided", "expanded", "flip", "flip_width", "transposed"]


def grids(config: PvtV2Config, height: int, width: int) -> list[tuple[int, int]]:
    out = []
    for patch, stride in zip(config.patch_sizes, config.strides):
        height = (height + 2 * (patch // 2) - patch) // stride + 1
        width = (width + 2 * (patch // 2) - patch) // stride + 1
        out.append((height, width))
    return out


def work(config: PvtV2Config, batch: int, height: int, width: int) -> int:
    """About how many attention scores and hidden Mix-FFN values a forward pass computes: bounds a case's time."""
    total = 0
    for (h, w), sr, depth, heads, size, ratio in zip(grids(config, height, width), config.sr_ratios, config.depths,
                                                     config.num_attention_heads, config.hidden_sizes,
                                                     config.mlp_ratios):
        keys = 49 if config.linear_attention else (h // sr) * (w // sr) if sr > 1 else h * w
        total += batch * h * w * (heads * keys + size * ratio) * max(depth, 1)
    return total


def draw_case(seed: int):
    """A model with random weights, its transformers twin (None for fractional Mix-FFN ratios, which transformers
    refuses), pixels, a Mix-FFN piece size and output flags, drawn from ``seed`` (the activation cycles through
    every name with it). Stages of 8 channels or more: a LayerNorm over fewer turns rounding into signs (see the
    module docstring)."""
    rng = random.Random(seed)
    while True:
        n = rng.randint(1, 4)
        heads = [rng.choice([1, 2, 4]) for _ in range(n)]
        patches = [rng.choice(PATCHES) for _ in range(n)]
        fields = dict(
            num_encoder_blocks=n, depths=[rng.choice([0, 1, 1, 2]) for _ in range(n)],
            hidden_sizes=[max(8, h * rng.choice([2, 4, 8])) for h in heads], num_attention_heads=heads,
            sr_ratios=[rng.choice([1, 1, 2, 3, 8]) for _ in range(n)], patch_sizes=[p for p, _ in patches],
            strides=[s for _, s in patches], mlp_ratios=[rng.choice([1, 2, 4, 1.5, 2.5, 0.5]) for _ in range(n)],
            linear_attention=rng.random() < 0.25, hidden_act=ACTS[seed % len(ACTS)],
            layer_norm_eps=rng.choice([1e-12, 1e-6, 1.0]), qkv_bias=rng.random() < 0.6,
            num_channels=rng.choice([3, 3, 1, 2]), num_labels=rng.choice([1, 3]),
            drop_path_rate=rng.choice([0.0, 0.3, 0.9]), hidden_dropout_prob=rng.choice([0.0, 0.5]),
            attention_probs_dropout_prob=rng.choice([0.0, 0.5]),
        )
        for field in ("patch_embed_layer_norm_eps", "reduction_layer_norm_eps"):
            if rng.random() < 0.3:
                fields[field] = rng.choice([1e-12, 1.0])
        kind = rng.choice(["classifier", "classifier", "encoder", "backbone"])
        if kind == "backbone":
            fields["out_indices"] = sorted(rng.sample(range(n), rng.randint(1, n)))
        config = PvtV2Config(**fields)
        batch = rng.randint(1, 9)
        for _ in range(60):
            height, width = rng.randint(1, 64), rng.randint(1, 64)
            if rng.random() < 0.1:
                height, width = rng.choice([(16, 512), (512, 16), (8, 300), (1, 64), (64, 1)])
            try:
                check_input_size(height, width, config)
            except ValueError:
                continue
            if work(config, batch, height, width) < 150_000:
                break
            if work(config, 1, height, width) < 150_000:
                batch = 1
                break
        else:
            continue
        break
    ours_class, theirs_class = MODELS[kind]
    model = random_weights_(ours_class(config), seed)
    if rng.random() < 0.4:
        perturb_(model, 0.2, seed)
    model.eval()
    theirs = transformers_twin(model, theirs_class) if all(float(r).is_integer() for r in config.mlp_ratios) else None
    gen = torch.Generator().manual_seed(seed)
    scale = rng.choice([1.0, 1.0, 1.0, 1e4])
    shape = (batch, config.num_channels, height, width)
    layout = rng.choice(LAYOUTS)
    if layout == "strided":
        x = torch.randn(*shape[:-1], 2 * width + 1, generator=gen)[..., 1::2] * scale
    else:
        x = torch.randn(shape, generator=gen) * scale
        x = {"channels_last": lambda: x.contiguous(memory_format=torch.channels_last),
             "expanded": lambda: x[:1].expand(shape), "flip": lambda: x.flip(-2), "flip_width": lambda: x.flip(-1),
             "transposed": lambda: x.transpose(-1, -2).contiguous().transpose(-1, -2)}.get(layout, lambda: x)()
    special = rng.choice([None] * 6 + ["nan", "inf"])
    if special:
        x = x.clone()
        x[tuple(rng.randrange(s) for s in shape)] = float("nan") if special == "nan" else -float("inf")
    h0, w0 = grids(config, height, width)[0]
    row_bytes = w0 * int(config.hidden_sizes[0] * config.mlp_ratios[0]) * 4
    piece = rng.choice([None, 0, 1, row_bytes * rng.randint(3, 7), row_bytes * h0 * rng.randint(1, 3)])
    flags = dict(output_hidden_states=rng.random() < 0.7)
    return model, theirs, x, piece, flags


def truth_of(model: torch.nn.Module, theirs: torch.nn.Module | None, x: torch.Tensor, flags: dict) -> dict:
    reference = copy.deepcopy(theirs if theirs is not None else model).double()
    with torch.no_grad():
        return output_tensors(reference(x.double(), **flags))


def assert_same(got: dict, want: dict, truth: dict, what: str, rel: float = 1e-5) -> None:
    """``got``'s outputs as ``want``'s: shape, dtype, NaN and infinity positions; the finite values within ``rel``
    of ``want``'s scale or, where the weights make them ill-conditioned, no further from the float64 truth than
    twice ``want``'s distance plus 1e-5."""
    assert sorted(got) == sorted(want) or what.startswith("transformers"), (what, sorted(got), sorted(want))
    for key, expected in want.items():
        if key not in got:  # transformers' backbone names its outputs otherwise
            continue
        actual, where = got[key], (what, key)
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, where
        assert torch.equal(actual.isnan(), expected.isnan()), (where, int(actual.isnan().sum()),
                                                               int(expected.isnan().sum()))
        assert torch.equal(actual.isinf(), expected.isinf()), where
        assert torch.equal(actual[actual.isinf()], expected[expected.isinf()]), where
        finite = actual.isfinite() & expected.isfinite() & truth[key].isfinite()
        if not finite.any() or relative_error(expected[finite], actual[finite]) <= rel:
            continue
        t = truth[key][finite]
        ours, theirs = relative_error(t, actual[finite]), relative_error(t, expected[finite])
        assert ours <= 2 * theirs + 1e-5, (where, ours, theirs)


@needs_fast
@pytest.mark.parametrize("seed", range(len(ACTS) + 2))
def test_corner_configs_and_inputs_fast_frozen_reference_and_transformers(seed, monkeypatch):
    model, theirs, x, piece, flags = draw_case(seed)
    if piece is not None:
        monkeypatch.setattr(cpu, "FFN_PIECE_BYTES", piece)
    with torch.no_grad():
        with mock.patch.object(cpu, "stage_forward", wraps=cpu.stage_forward) as fused:
            fast = output_tensors(model(x, **flags))
        with pvtv2.fast.fast_path(False):
            ref = output_tensors(model(x, **flags))
        pvtv2.fast.freeze(model)
        frozen = [output_tensors(model(x, **flags)) for _ in range(2)]  # packing, then packed
        pvtv2.fast.unfreeze(model)
        hf = output_tensors(theirs(x, **flags)) if theirs is not None else {}
    truth = truth_of(model, theirs, x, flags)
    assert fused.call_count == model.config.num_encoder_blocks  # every stage took the fast path
    assert_same(fast, ref, truth, "fast")
    for out in frozen:
        assert_same(out, ref, truth, "frozen")
    assert_same(ref, hf, truth, "transformers")


@contextlib.contextmanager
def autocast(mode: str):
    if mode == "nested_off":  # an fp32 block inside a bf16 one
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autocast("cpu", enabled=False):
            yield
        return
    with torch.autocast("cpu", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[mode]):
        yield


@needs_bf16
@pytest.mark.parametrize("seed,mode", [(s, m) for s in range(8) for m in ["bf16"]]
                         + [(s, "fp16") for s in range(8, 11)] + [(s, "nested_off") for s in range(11, 14)])
def test_corner_cases_under_autocast(seed, mode, monkeypatch):
    """bf16 autocast: the fast path within 2.5 times the reference's distance to the float64 truth plus 4e-3
    (tests/fast/test_fuzz_bf16_33.py), the same top-1 class wherever the truth's margin exceeds bf16 rounding;
    float16 autocast: the reference path itself (no fp16 fast path), the numbers and dtype transformers gives; bf16
    autocast disabled inside: the fp32 fast path, bit for bit as outside any autocast."""
    model, theirs, x, piece, flags = draw_case(seed)
    x = x.nan_to_num(0.0, 0.0, 0.0)  # finite pixels: a NaN's reach is compared in float32 (below)
    if piece is not None:
        monkeypatch.setattr(cpu, "FFN_PIECE_BYTES", piece)
    with torch.no_grad():
        plain = output_tensors(model(x, **flags))
        with autocast(mode), mock.patch.object(cpu, "stage_forward", wraps=cpu.stage_forward) as fused:
            fast = output_tensors(model(x, **flags))
            with pvtv2.fast.fast_path(False):
                ref = output_tensors(model(x, **flags))
            hf = output_tensors(theirs(x, **flags)) if theirs is not None else {}
    truth = truth_of(model, theirs, x, flags)
    stages = model.config.num_encoder_blocks
    if mode == "nested_off":
        assert fused.call_count == stages
        assert sorted(fast) == sorted(plain)
        for key, value in plain.items():
            assert fast[key].dtype == torch.float32 and torch.equal(fast[key], value), key
        assert_same(fast, ref, truth, "fast, autocast off")
        return
    if mode == "fp16":
        assert fused.call_count == 0
        assert_same(fast, ref, truth, "fp16 autocast", rel=0.0)
        for key, value in hf.items():
            if key in ref:  # float16 overflows (1e4-scaled pixels) where transformers' does
                assert ref[key].dtype == value.dtype and ref[key].shape == value.shape, key
                assert torch.equal(ref[key].isfinite(), value.isfinite()), key
                finite = value.isfinite()
                if finite.any():
                    t = truth[key][finite]
                    assert relative_error(t, ref[key][finite]) <= 2.5 * relative_error(t, value[finite]) + 4e-3, key
        return
    assert fused.call_count == stages
    assert sorted(fast) == sorted(ref)
    for key, expected in ref.items():
        got, t = fast[key], truth[key]
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        assert got.isfinite().all() == expected.isfinite().all(), key
        ours_error, ref_error = relative_error(t, got), relative_error(t, expected)
        if key != ".logits":  # a class logit can be a small difference of large terms: bounded by its margin below
            assert ours_error <= 2.5 * ref_error + 4e-3, (key, ours_error, ref_error)
        if key in hf:
            assert ref_error <= 2.5 * relative_error(t, hf[key]) + 4e-3, key
    if ".logits" in truth and truth[".logits"].shape[-1] > 1:
        top2 = truth[".logits"].topk(2, -1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.05 * truth[".logits"].abs().amax(-1)
        want = truth[".logits"].argmax(-1)[clear]
        assert torch.equal(fast[".logits"].float().argmax(-1)[clear], want)
        assert torch.equal(ref[".logits"].float().argmax(-1)[clear], want)


@needs_fast
@pytest.mark.parametrize("special", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("frozen", [False, True], ids=["unfrozen", "frozen"])
def test_a_non_finite_pixel_reaches_the_patch_kernels_window(special, frozen):
    """A zero-block first stage (3x3 patches, stride 1) on a pixel that is NaN or infinite: NaN in exactly the 3x3
    output positions whose window holds it (a LayerNorm over inf is NaN), all channels, fast path frozen and not,
    reference and transformers alike; every other position finite. Also a 2-stage model whose second stage
    attends over everything: all of it NaN in all four."""
    config = PvtV2Config(num_encoder_blocks=2, depths=[0, 1], hidden_sizes=[16, 8], num_attention_heads=[1, 2],
                         sr_ratios=[1, 2], patch_sizes=[3, 3], strides=[1, 2], mlp_ratios=[2, 2], num_labels=3)
    model = random_weights_(PvtV2ForImageClassification(config), seed=5).eval()
    theirs = transformers_twin(model, transformers.PvtV2ForImageClassification)
    x = torch.randn(3, 3, 11, 14, generator=torch.Generator().manual_seed(1))
    x[1, 2, 6, 0] = float(special)  # on the left edge: its window is 3 rows by 2 columns
    if frozen:
        pvtv2.fast.freeze(model)
    with torch.no_grad():
        with mock.patch.object(cpu, "stage_forward", wraps=cpu.stage_forward) as fused:
            fast = model(x, output_hidden_states=True)
        with pvtv2.fast.fast_path(False):
            ref = model(x, output_hidden_states=True)
        hf = theirs(x, output_hidden_states=True)
    assert fused.call_count == 2
    expected = torch.zeros(3, 16, 11, 14, dtype=torch.bool)
    expected[1, :, 5:8, 0:2] = True
    for out in (fast, ref, hf):
        assert torch.equal(out.hidden_states[0].isnan(), expected)
        assert out.hidden_states[1][1].isnan().all() and out.hidden_states[1][[0, 2]].isfinite().all()
        assert out.logits[1].isnan().all() and out.logits[[0, 2]].isfinite().all()
    assert relative_error(ref.logits[[0, 2]], fast.logits[[0, 2]]) < 1e-5


@needs_fast
@pytest.mark.parametrize("height", [9, 13, 3])
@pytest.mark.parametrize("batch", [1, 4, 9])
def test_ffn_bands_and_groups_are_the_documented_pieces(height, batch, monkeypatch):
    """The Mix-FFN's pieces by its documented rule, computed here by hand: with room for 6 rows of hidden activation,
    a grid taller than 8 rows runs in bands of 4 rows (6 less the two halo rows) with the rows above and below (a
    last band of one row for 13 rows: rows 12-13 with its halo row); 8 rows or fewer in groups of
    ``6 // height`` images (one image, 3-row grids two at a time). Every output as the reference path's and
    transformers'."""
    config = PvtV2Config(num_encoder_blocks=1, depths=[2], hidden_sizes=[8], num_attention_heads=[2], sr_ratios=[1],
                         patch_sizes=[3], strides=[1], mlp_ratios=[3], hidden_act="gelu", num_labels=4)
    model = random_weights_(PvtV2ForImageClassification(config), seed=11).eval()
    theirs = transformers_twin(model, transformers.PvtV2ForImageClassification)
    width = 7
    x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height))
    row_bytes = width * 24 * 4
    monkeypatch.setattr(cpu, "FFN_PIECE_BYTES", 6 * row_bytes)
    with torch.no_grad():
        with mock.patch.object(cpu, "_ffn_hidden", wraps=cpu._ffn_hidden) as hidden:
            fast = model(x).logits
        with pvtv2.fast.fast_path(False):
            ref = model(x).logits
        hf = theirs(x).logits
    calls = [(c.args[2].shape[0], c.args[3]) for c in hidden.call_args_list]
    if height > 8:
        bands = [(max(0, top - 1), min(height, top + 5)) for top in range(0, height, 4)]
        expected = [(1, hi - lo) for lo, hi in bands] * batch
    elif batch * height * row_bytes <= 6 * row_bytes:
        expected = [(batch, height)]  # the whole batch in one piece
    else:
        step = 6 // height
        expected = [(min(step, batch - i), height) for i in range(0, batch, step)]
    assert calls == expected * 2  # two blocks
    assert relative_error(ref, fast) < 1e-5 and relative_error(hf, ref) < 1e-5


@needs_fast
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.uint8])
def test_a_float32_model_refuses_another_input_dtype_by_name(dtype):
    """A float32 model given float64, float16, bfloat16 or integer pixels: a TypeError naming the input's dtype, on
    the fast path and the reference path alike (transformers fails inside its first convolution); under bf16
    autocast a float16 input is cast as autocast casts it, the bf16 fast path's numbers the reference's to bf16
    rounding."""
    config = PvtV2Config(num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2],
                         sr_ratios=[2, 1], mlp_ratios=[2, 2], num_labels=3)
    model = random_weights_(PvtV2ForImageClassification(config), seed=2).eval()
    x = torch.randn(2, 3, 40, 33, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for enabled in (True, False):
            with pvtv2.fast.fast_path(enabled), pytest.raises(TypeError, match=str(dtype).split(".")[-1]):
                model(x.to(dtype))
        if dtype == torch.float16 and pvtv2.fast.fast_path_available(torch.bfloat16):
            truth = copy.deepcopy(model).double()(x.half().double()).logits
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fast = model(x.half()).logits
                with pvtv2.fast.fast_path(False):
                    ref = model(x.half()).logits
            assert fast.dtype == ref.dtype == torch.bfloat16
            assert relative_error(truth, fast) <= 2.5 * relative_error(truth, ref) + 4e-3


@pytest.mark.parametrize("default", [torch.float16, torch.bfloat16, torch.float64])
def test_the_capability_probe_ignores_the_default_dtype(default, monkeypatch):
    """The probe's own tensors are float32 whatever ``torch.set_default_dtype`` says: under a float16 or bfloat16
    default, its float32 references came out in that dtype, 1e-3 off the oneDNN results, and the failure, cached for
    the process, turned the float32 fast path off for good (a float32 model ran the reference path ever after)."""
    with torch.autocast("cpu", enabled=False):
        expected = {dtype: cpu._probe(dtype) for dtype in (torch.float32, torch.bfloat16)}  # under float32's default
    model = random_weights_(PvtV2Model(PvtV2Config(num_encoder_blocks=1, depths=[1], hidden_sizes=[8],
                                                   num_attention_heads=[1], sr_ratios=[1], mlp_ratios=[2]))).eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(cpu, "_CAPABILITY", {})  # not probed yet in this process
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        found = {dtype: pvtv2.fast.fast_path_available(dtype) for dtype in expected}
        with torch.no_grad(), mock.patch.object(cpu, "stage_forward", wraps=cpu.stage_forward) as fused:
            model(x)
    finally:
        torch.set_default_dtype(previous)
    assert found == expected
    assert fused.call_count == int(expected[torch.float32])
