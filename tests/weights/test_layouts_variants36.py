"""Every published variant's architecture (B0, B1, B2, B2-Linear, B3, B4, B5: their depths, MLP ratios, reduction
ratios and attention, at tiny widths) through every layout, against the library of that layout: transformers'
classifier writes the first folder, timm's model reads the timm and the authors' files (its own
``checkpoint_filter_fn`` converts the latter), transformers reads the last folder back. Then the files that are easy
to misread: a variant's weights in another variant's model, a timm run's EMA copy alone, half and double precision,
and the writing of a frozen model with a transposed and a tied weight."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import timm
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.models.pvt_v2 import checkpoint_filter_fn

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, PvtV2Model
from pvtv2.export import convert_checkpoint
from pvtv2.weights.files import CheckpointError
from pvtv2.weights.layouts import convert_state_dict, detect_layout, to_canonical
from pvtv2.weights.loading import infer_config

from conftest import random_weights_, relative_error

# The published variants' architectures (timm's pvt_v2_b* definitions) at the published width ratios 1:2:5:8, so
# that the heads 1, 2, 5, 8 are what the shapes say; sr_ratios 8, 4, 2, 1 throughout.
WIDTHS, HEADS = [8, 16, 40, 64], [1, 2, 5, 8]
VARIANTS = {
    "pvt_v2_b0": dict(depths=[2, 2, 2, 2], mlp_ratios=[8, 8, 4, 4], linear=False),
    "pvt_v2_b1": dict(depths=[2, 2, 2, 2], mlp_ratios=[8, 8, 4, 4], linear=False),
    "pvt_v2_b2": dict(depths=[3, 4, 6, 3], mlp_ratios=[8, 8, 4, 4], linear=False),
    "pvt_v2_b2_li": dict(depths=[3, 4, 6, 3], mlp_ratios=[8, 8, 4, 4], linear=True),
    "pvt_v2_b3": dict(depths=[3, 4, 18, 3], mlp_ratios=[8, 8, 4, 4], linear=False),
    "pvt_v2_b4": dict(depths=[3, 8, 27, 3], mlp_ratios=[8, 8, 4, 4], linear=False),
    "pvt_v2_b5": dict(depths=[3, 6, 40, 3], mlp_ratios=[4, 4, 4, 4], linear=False),
}


def timm_tiny(name: str, num_classes: int, seed: int | None = None) -> torch.nn.Module:
    v = VARIANTS[name]
    model = timm.create_model("pvt_v2_b0", depths=v["depths"], embed_dims=WIDTHS, num_heads=HEADS,
                              mlp_ratios=v["mlp_ratios"], sr_ratios=[8, 4, 2, 1], linear=v["linear"],
                              num_classes=num_classes)
    return (random_weights_(model, seed=seed) if seed is not None else model).eval()


def config_tiny(name: str, **kwargs) -> PvtV2Config:
    v = VARIANTS[name]
    return PvtV2Config(depths=v["depths"], hidden_sizes=WIDTHS, num_attention_heads=HEADS, mlp_ratios=v["mlp_ratios"],
                       linear_attention=v["linear"], **kwargs)


def convert(source, output, layout, cli: bool) -> None:
    """``pvtv2 convert`` (a subprocess, as a user runs it) or the API it calls."""
    if not cli:
        convert_checkpoint(source, output, layout)
        return
    run = subprocess.run([sys.executable, "-m", "pvtv2", "convert", str(source), str(output),
                          *(["--layout", layout] if layout else [])], capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-3000:]


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# B2-Linear (linear attention: its own pooling, convolution, norm and activation names per layout) and B5 (MLP ratios
# of 4 where the others have 8) in the quick run; B3 through the command line among the slow tests. The others are
# like one of these in every key and shape rule (B0, B1, B2 like B3 with fewer blocks; B4 like B5 with other ratios).
ROUND_TRIPS = [pytest.param(seed, name, marks=() if name in ("pvt_v2_b2_li", "pvt_v2_b5") else pytest.mark.slow)
               for seed, name in enumerate(VARIANTS) if name in ("pvt_v2_b2_li", "pvt_v2_b5", "pvt_v2_b3")]


@pytest.mark.parametrize("seed, name", ROUND_TRIPS)
def test_each_variant_goes_transformers_timm_original_transformers_with_each_librarys_logits(tmp_path, seed, name):
    v = VARIANTS[name]
    n = 3 + seed  # a class count of its own per variant
    hf_config = transformers.PvtV2Config(depths=v["depths"], hidden_sizes=WIDTHS, num_attention_heads=HEADS,
                                         mlp_ratios=v["mlp_ratios"], sr_ratios=[8, 4, 2, 1],
                                         linear_attention=v["linear"], num_labels=n)
    hf = random_weights_(transformers.PvtV2ForImageClassification(hf_config), seed=seed).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = hf(x).logits
    start = {k: v.clone() for k, v in hf.state_dict().items()}
    hf.save_pretrained(tmp_path / "hf")
    cli = name == "pvt_v2_b3"  # the slow one: the command line, a subprocess, for every hop

    with torch.no_grad():
        ours = PvtV2ForImageClassification.from_pretrained(tmp_path / "hf")
        assert relative_error(expected, ours(x).logits) < 1e-5

        convert(tmp_path / "hf", tmp_path / "timm.safetensors", "timm", cli)
        theirs = timm_tiny(name, n)
        theirs.load_state_dict(load_file(tmp_path / "timm.safetensors"), strict=True)
        timm_logits = theirs(x)
        # timm's patch-embedding and reduction LayerNorms use 1e-5 where transformers' use 1e-6: near, not equal
        assert relative_error(expected, timm_logits) < 1e-3
        ours = PvtV2ForImageClassification.from_pretrained(tmp_path / "timm.safetensors")
        assert ours.config.depths == v["depths"] and ours.config.mlp_ratios == v["mlp_ratios"]
        assert ours.config.linear_attention == v["linear"] and ours.config.num_attention_heads == HEADS
        assert relative_error(timm_logits, ours(x).logits) < 1e-5

        convert(tmp_path / "timm.safetensors", tmp_path / "original.pth", "original", cli)
        original = torch.load(tmp_path / "original.pth", weights_only=True)
        assert "patch_embed1.proj.weight" in original and f"block3.{v['depths'][2] - 1}.attn.kv.weight" in original
        check = timm_tiny(name, n)
        check.load_state_dict(checkpoint_filter_fn(original, check), strict=True)  # timm's own reading of the format
        timm_state = theirs.state_dict()
        assert all(torch.equal(t, timm_state[k]) for k, t in check.state_dict().items())  # timm's exact weights
        ours = PvtV2ForImageClassification.from_pretrained(tmp_path / "original.pth")
        assert relative_error(timm_logits, ours(x).logits) < 1e-5

        convert(tmp_path / "original.pth", tmp_path / "back", None, cli)
        back = transformers.PvtV2ForImageClassification.from_pretrained(tmp_path / "back").eval()
        end = back.state_dict()
        assert end.keys() == start.keys()
        assert all(torch.equal(end[k], start[k]) for k in start), "the weights changed on the way"
        assert relative_error(expected, back(x).logits) == 0


def test_the_variant_is_read_off_bare_state_dicts_of_timms_published_models_in_every_layout():
    """At the published widths (on the meta device: shapes only), from timm's own definitions: B2 and B2-Linear
    differ in their reduction only, B4 and B5 in depths and MLP ratios."""
    for name in VARIANTS:
        with torch.device("meta"):
            reference = timm.create_model(name, num_classes=1000)
        depths = [len(stage.blocks) for stage in reference.stages]
        mlp = [stage.blocks[0].mlp.fc1.out_features // stage.blocks[0].mlp.fc1.in_features for stage in reference.stages]
        linear = reference.stages[0].blocks[0].attn.pool is not None  # timm's linear attention pools first
        state = reference.state_dict()
        backbone = {f"backbone.{k}": t for k, t in convert_state_dict(state, "original").items()
                    if not k.startswith("head.")}
        for layout, tensors in (("timm", state), ("original", convert_state_dict(state, "original")),
                                ("transformers", convert_state_dict(state, "transformers")), ("mmdet", backbone)):
            assert detect_layout(tensors) == layout
            config = infer_config(to_canonical(tensors, layout), layout)
            found = (config.depths, config.mlp_ratios, config.linear_attention, config.num_attention_heads)
            assert found == (depths, mlp, linear, [1, 2, 5, 8]), (name, layout, found)


@pytest.mark.parametrize("source, target, first", [
    # depths differ: the first block that one side lacks is named first (blocks.6 before blocks.10)
    ("pvt_v2_b2", "pvt_v2_b3", ["missing keys:\n    pvt_v2.encoder.layers.2.blocks.6.attention."]),
    ("pvt_v2_b1", "pvt_v2_b2", ["missing keys:\n    pvt_v2.encoder.layers.0.blocks.2.attention."]),
    ("pvt_v2_b4", "pvt_v2_b5", ["missing keys:\n    pvt_v2.encoder.layers.2.blocks.27.",
                                "unexpected keys:\n    pvt_v2.encoder.layers.1.blocks.6.",
                                "pvt_v2.encoder.layers.0.blocks.0.mlp.dense1.weight: checkpoint (64, 8) vs model (32, 8)"]),
    # the same depths and widths: the attention is what differs, and is named
    ("pvt_v2_b2", "pvt_v2_b2_li", ["depths=[3, 4, 6, 3], linear_attention=False\n",
                                   "pvt_v2.encoder.layers.0.blocks.0.attention.spatial_reduction.weight: checkpoint "
                                   "(8, 8, 8, 8) vs model (8, 8, 1, 1)"]),
    ("pvt_v2_b2_li", "pvt_v2_b2", ["depths=[3, 4, 6, 3], linear_attention=True\n",
                                   "unexpected keys:\n    pvt_v2.encoder.layers.3.blocks.0.attention.layer_norm.bias"]),
])
def test_a_variants_weights_in_another_variants_model_are_refused_by_key_and_shape(tmp_path, source, target, first):
    weights = PvtV2ForImageClassification(config_tiny(source, num_labels=4))
    torch.save(convert_state_dict(weights.state_dict(), "original"), tmp_path / "w.pth")
    with pytest.raises(CheckpointError) as err:
        PvtV2ForImageClassification.from_pretrained(tmp_path / "w.pth", config=config_tiny(target, num_labels=4))
    message = str(err.value)
    assert f"the checkpoint has hidden_sizes={WIDTHS}, depths={VARIANTS[source]['depths']}" in message
    for text in first:
        assert text in message, message[:3000]


def test_a_timm_training_checkpoint_holding_only_its_ema_copy_loads_it(tmp_path):
    model, ema = timm_tiny("pvt_v2_b0", 3, seed=1), timm_tiny("pvt_v2_b0", 3, seed=2)
    x = torch.randn(1, 3, 32, 32)
    torch.save({"epoch": 7, "arch": "pvt_v2_b0", "state_dict_ema": ema.state_dict()}, tmp_path / "ema.pth")
    torch.save({"epoch": 7, "state_dict": model.state_dict(), "state_dict_ema": ema.state_dict()},
               tmp_path / "both.pth")
    with torch.no_grad():
        loaded = PvtV2ForImageClassification.from_pretrained(tmp_path / "ema.pth")
        assert relative_error(ema(x), loaded(x).logits) < 1e-5  # it was "holds no tensors"
        loaded = PvtV2ForImageClassification.from_pretrained(tmp_path / "both.pth")  # as for DeiT's "model_ema"
        assert relative_error(model(x), loaded(x).logits) < 1e-5
        assert relative_error(ema(x), loaded(x).logits) > 1e-3


@pytest.mark.parametrize("dtype, bound", [(torch.float16, 5e-3), (torch.bfloat16, 5e-2), (torch.float64, 1e-12)])
def test_checkpoints_of_each_precision_load_as_float32_or_as_stored(tmp_path, dtype, bound):
    """Against timm's model in float64 holding the same stored values: float32 by default, the stored dtype with
    dtype="auto", its outputs within that dtype's rounding."""
    reference = timm_tiny("pvt_v2_b1", 4, seed=5)
    stored = {k: t.to(dtype) for k, t in reference.state_dict().items()}
    save_file(convert_state_dict(stored, "timm"), tmp_path / "timm.safetensors")
    torch.save(convert_state_dict(stored, "original"), tmp_path / "original.pth")
    exact = timm_tiny("pvt_v2_b1", 4).double()
    exact.load_state_dict(stored)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        truth = exact(x)
        for path in (tmp_path / "timm.safetensors", tmp_path / "original.pth"):
            default = PvtV2ForImageClassification.from_pretrained(path)
            assert default.dtype == torch.float32
            assert relative_error(truth, default(x.float()).logits) < 1e-5
            auto = PvtV2ForImageClassification.from_pretrained(path, dtype="auto")
            assert auto.dtype == dtype
            assert relative_error(truth, auto(x.to(dtype)).logits) < bound


def test_headless_and_mmsegmentation_backbones_of_b2_linear_give_timms_features(tmp_path):
    reference = timm_tiny("pvt_v2_b2_li", 0, seed=6)
    x = torch.randn(1, 3, 32, 32)
    original = convert_state_dict(reference.state_dict(), "original")
    gen = torch.Generator().manual_seed(6)
    # an mmsegmentation UPerNet file: backbone + a head of another library's modules + meta
    mmseg = {"meta": {"epoch": 160}, "state_dict": {
        **{f"backbone.{k}": t for k, t in original.items()},
        "decode_head.psp_modules.0.1.conv.weight": torch.randn(8, 64, 1, 1, generator=gen),
        "decode_head.conv_seg.weight": torch.randn(150, 8, 1, 1, generator=gen),
        "auxiliary_head.conv_seg.weight": torch.randn(150, 8, 1, 1, generator=gen)}}
    torch.save(mmseg, tmp_path / "mmseg.pth")
    save_file(convert_state_dict(reference.state_dict(), "timm"), tmp_path / "timm.safetensors")
    with torch.no_grad():
        expected = reference.forward_features(x)
        for path in (tmp_path / "mmseg.pth", tmp_path / "timm.safetensors"):
            encoder = PvtV2Model.from_pretrained(path)
            assert encoder.config.linear_attention and encoder.config.depths == [3, 4, 6, 3]
            assert relative_error(expected, encoder(x).last_hidden_state) < 1e-5


def test_a_frozen_model_with_a_transposed_and_a_tied_weight_is_written_stably_for_every_reader(tmp_path):
    model = random_weights_(PvtV2ForImageClassification(config_tiny("pvt_v2_b2_li", num_labels=3)), seed=7).eval()
    blocks = model.pvt_v2.encoder.layers[3].blocks
    query = model.pvt_v2.encoder.layers[0].blocks[0].attention.query
    with torch.no_grad():
        query.weight = torch.nn.Parameter(query.weight.t().contiguous().t())  # the same values, strided
        blocks[1].attention.proj.weight = blocks[0].attention.proj.weight  # one tensor under two names
    assert not query.weight.is_contiguous()
    model.requires_grad_(False)
    values = {k: t.clone() for k, t in model.state_dict().items()}
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["config.json", "model.safetensors"]
    for name in ("config.json", "model.safetensors"):
        assert digest(tmp_path / "a" / name) == digest(tmp_path / "b" / name), name
    with safe_open(tmp_path / "a" / "model.safetensors", "pt") as f:  # a plain reader: every value as it was
        assert set(f.keys()) == set(values)
        assert all(torch.equal(f.get_tensor(k), values[k]) for k in values)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["linear_attention"] is True
    with torch.no_grad():
        theirs = transformers.PvtV2ForImageClassification.from_pretrained(tmp_path / "a").eval()
        assert relative_error(expected, theirs(x).logits) < 1e-5
        convert_checkpoint(tmp_path / "a", tmp_path / "timm.safetensors", "timm")
        convert_checkpoint(tmp_path / "a", tmp_path / "timm2.safetensors", "timm")
        assert digest(tmp_path / "timm.safetensors") == digest(tmp_path / "timm2.safetensors")
        timm_model = timm_tiny("pvt_v2_b2_li", 3)
        timm_model.load_state_dict(load_file(tmp_path / "timm.safetensors"), strict=True)
        assert relative_error(expected, timm_model(x)) < 1e-3  # timm's 1e-5 patch-embedding epsilon
        back = PvtV2ForImageClassification.from_pretrained(tmp_path / "a")
        tied = back.pvt_v2.encoder.layers[3].blocks
        assert tied[0].attention.proj.weight.data_ptr() != tied[1].attention.proj.weight.data_ptr()
        assert relative_error(expected, back(x).logits) < 1e-6


@pytest.mark.parametrize("layout", ["timm", "original"])
def test_a_classifier_checkpoint_that_lost_its_last_stage_is_refused_not_read_as_a_shallower_encoder(tmp_path, layout):
    """B2-Linear's weights without stage 4 (a truncated or filtered file): its classifier still reads stage 4's 64
    features. It loaded as a three-stage encoder without a word, and as a three-stage classifier with a new head
    under ignore_mismatched_sizes=True."""
    reference = timm_tiny("pvt_v2_b2_li", 3, seed=8)
    state = {k: t for k, t in reference.state_dict().items() if not k.startswith(("stages.3.", "stages_3."))}
    assert state["head.weight"].shape == (3, 64)
    save_file(convert_state_dict(state, layout, "timm"), tmp_path / "w.safetensors")
    message = re.escape("the checkpoint's classifier reads 64 features (classifier.weight has the shape (3, 64)), but "
                        "its last stage, encoder.layers.2, is 40 wide")
    for load in (lambda: PvtV2Model.from_pretrained(tmp_path / "w.safetensors"),
                 lambda: PvtV2ForImageClassification.from_pretrained(tmp_path / "w.safetensors",
                                                                     ignore_mismatched_sizes=True)):
        with pytest.raises(CheckpointError, match=message):
            load()
    # without its head the same encoder is a three-stage one, which loads with timm's first three stages' features
    encoder = PvtV2Model.from_pretrained(
        _saved({k: t for k, t in state.items() if not k.startswith("head.")}, tmp_path / "headless.safetensors"))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        features = reference.stages[2](reference.stages[1](reference.stages[0](reference.patch_embed(x))))
        assert relative_error(features, encoder(x).last_hidden_state) < 1e-5


def test_an_mmsegmentation_file_whose_backbone_lost_its_last_stage_is_refused_by_its_necks_widths(tmp_path):
    """The same loss in a Semantic FPN file of B5: its neck's fourth lateral reads stage 4's 64 channels. Read for
    its encoder alone, it loaded as a three-stage encoder without a word."""
    reference = timm_tiny("pvt_v2_b5", 0, seed=9)
    original = convert_state_dict(reference.state_dict(), "original")
    gen = torch.Generator().manual_seed(9)
    state = {f"backbone.{k}": t for k, t in original.items() if not k.startswith(("patch_embed4", "block4", "norm4"))}
    for i, width in enumerate(WIDTHS):
        state[f"neck.lateral_convs.{i}.conv.weight"] = torch.randn(16, width, 1, 1, generator=gen)
        state[f"neck.lateral_convs.{i}.conv.bias"] = torch.randn(16, generator=gen)
        state[f"neck.fpn_convs.{i}.conv.weight"] = torch.randn(16, 16, 3, 3, generator=gen)
        state[f"neck.fpn_convs.{i}.conv.bias"] = torch.randn(16, generator=gen)
    state["decode_head.scale_heads.0.0.conv.weight"] = torch.randn(8, 16, 3, 3, generator=gen)
    state["decode_head.conv_seg.weight"] = torch.randn(5, 8, 1, 1, generator=gen)
    torch.save({"meta": {"epoch": 1}, "state_dict": state}, tmp_path / "fpn.pth")
    message = re.escape("decode_head.neck.lateral_convs.3.conv.weight reads 64 channels (its shape is (16, 64, 1, 1)), "
                        "which no stage of its encoder has (hidden_sizes [8, 16, 40])")
    with pytest.raises(CheckpointError, match=message):
        PvtV2Model.from_pretrained(tmp_path / "fpn.pth")
    with pytest.raises(CheckpointError, match=message):
        convert_checkpoint(tmp_path / "fpn.pth", tmp_path / "encoder.safetensors", "timm")
    assert not (tmp_path / "encoder.safetensors").exists()


def _saved(state, path):
    save_file(state, path)
    return path


# Each wrapper a training or detection run saves a layout's weights under (the authors' DeiT code, timm's train
# script, DataParallel, torch.compile, mmdetection), and safetensors, which holds none.
WRAPPERS = {
    "plain": lambda s: s,
    "model": lambda s: {"model": s, "epoch": 1},
    "state_dict": lambda s: {"state_dict": s, "optimizer": {}},
    "module": lambda s: {f"module.{k}": t for k, t in s.items()},
    "orig_mod": lambda s: {"model": {f"_orig_mod.{k}": t for k, t in s.items()}},
    "model_ema": lambda s: {"model_ema": s},
    "state_dict_ema": lambda s: {"state_dict_ema": s, "epoch": 2},
    "mmdet": lambda s: {"meta": {"epoch": 1}, "state_dict": {f"backbone.{k}": t for k, t in s.items()}},
    "safetensors": lambda s: s,
}
# Each precision's bound on the outputs against timm's model in float64 holding the same stored values: the half
# precisions' rounding through up to 52 blocks reached 1.1e-2 (float16) and 6.1e-2 (bfloat16) in the search (timm's
# own float16 model 3.8e-3 on the same case); a model of other weights or another architecture is off by O(1).
PRECISION = {torch.float32: 1e-5, torch.float16: 2.5e-2, torch.bfloat16: 1.25e-1, torch.float64: 1e-10}


# Seeds whose draws cover every variant but B0 and B3, every precision, both EMA keys, safetensors and mmdetection
# (200 seeds searched, 0-199: all within these bounds).
@pytest.mark.parametrize("seed", [0, 3, 4, 6, 9, 11, 13, 24, 63])
def test_seeded_variants_layouts_wrappers_and_precisions_load_as_timm_computes_them(tmp_path, seed):
    """A variant, a layout, a wrapper, a stored precision and a head (none, or 3 or 7 classes) drawn from ``seed``
    (a slice of the seeds searched): loaded with dtype="auto", the file's precision and variant, and timm's
    outputs in float64 within that precision."""
    import random

    rng = random.Random(seed)
    name = rng.choice(list(VARIANTS))
    wrapper = rng.choice(list(WRAPPERS))
    layout = "original" if wrapper == "mmdet" else rng.choice(["timm", "original", "transformers"])
    dtype = rng.choice(list(PRECISION))
    classes = 0 if wrapper == "mmdet" else rng.choice([0, 3, 7])
    stored = {k: t.to(dtype) for k, t in timm_tiny(name, classes, seed=seed).state_dict().items()}
    exact = timm_tiny(name, classes).double()
    exact.load_state_dict(stored)
    payload = WRAPPERS[wrapper](convert_state_dict(stored, layout))
    path = tmp_path / ("w.safetensors" if wrapper == "safetensors" else "w.pth")
    save_file(payload, path) if wrapper == "safetensors" else torch.save(payload, path)
    model = (PvtV2ForImageClassification if classes else PvtV2Model).from_pretrained(path, dtype="auto")
    assert model.dtype == dtype
    c, v = model.config, VARIANTS[name]
    assert (c.depths, c.mlp_ratios, c.linear_attention, c.num_attention_heads) == (v["depths"], v["mlp_ratios"],
                                                                                     v["linear"], HEADS)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        expected = exact(x) if classes else exact.forward_features(x)
        out = model(x.to(dtype))
        found = out.logits if classes else out.last_hidden_state
    # a transformers-layout file is computed as transformers does: 1e-6 where timm's patch embeddings use 1e-5
    bound = max(PRECISION[dtype], 1e-3 if layout == "transformers" else 0)
    assert relative_error(expected, found) < bound, (name, layout, wrapper, dtype, classes)
