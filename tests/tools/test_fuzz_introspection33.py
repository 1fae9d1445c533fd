"""A seeded slice of a differential search of the introspection tools: ``pvtv2.flops`` (``pvtv2 info`` / ``inspect``),
``pvtv2.visualize``'s attention maps and ``pvtv2.benchmark``.

Each case is drawn from a seeded generator and compared with an independent answer: torch's ``FlopCounterMode`` and a
closed form of the architecture written here (MACs, one per multiply-add: FlopCounterMode's FLOPs are twice them),
transformers' and timm's twins built from the same checkpoint, transformers' ``output_attentions`` reshaped by hand,
matplotlib's colour map, and the calls a benchmark really makes (shape, channels, autocast, grad mode).
"""

from __future__ import annotations

import io
import json
import math
import random
import re
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import TINY_SMALL_IMAGES, hf_twin
from pvtv2 import (
    PvtV2Backbone,
    PvtV2Config,
    PvtV2ForDepthEstimation,
    PvtV2ForImageClassification,
    PvtV2ForSemanticSegmentation,
    PvtV2Model,
)
from pvtv2 import fast
from pvtv2.benchmark import benchmark_model
from pvtv2.cli import main
from pvtv2.data.processing import PvtV2ImageProcessor
from pvtv2.fast import fast_path
from pvtv2.flops import count_macs
from pvtv2.visualize import attention_figure, attention_maps, heatmap_colors

SEED = 33


def side(n: int, kernel: int, stride: int) -> int:
    """An overlapping patch embedding's output side: padding kernel // 2."""
    return (n + 2 * (kernel // 2) - kernel) // stride + 1


def random_config(rng: random.Random, *, free_geometry: bool = True, float_mlp: bool = False) -> dict:
    """A random architecture of 1-4 stages; ``free_geometry``: random patch sizes, strides and input channels (what
    timm's model cannot take); ``float_mlp``: MLP ratios such as 1.5 (what transformers' config cannot take)."""
    n = rng.randint(1, 4)
    heads = [rng.choice([1, 2, 4]) for _ in range(n)]
    config = dict(
        num_encoder_blocks=n, num_attention_heads=heads, hidden_sizes=[h * rng.choice([4, 8]) for h in heads],
        depths=[rng.randint(1, 2) for _ in range(n)], linear_attention=rng.random() < 0.3,
        sr_ratios=[rng.choice([1, 2, 4]) for _ in range(n)], mlp_ratios=[rng.choice([1, 1.5, 2, 4] if float_mlp else [1, 2, 4]) for _ in range(n)],
        num_labels=rng.randint(1, 6),
    )
    if free_geometry:
        config.update(patch_sizes=[rng.choice([2, 3, 5, 7]) for _ in range(n)],
                      strides=[rng.choice([2, 4])] + [rng.choice([1, 2]) for _ in range(n - 1)],
                      num_channels=rng.randint(1, 4))
    return config


def closed_form_macs(config: PvtV2Config, height: int, width: int, batch: int) -> list[int]:
    """Per stage: the patch embedding, then per block the spatial reduction (strided conv, or 1x1 conv on the 7x7
    pooled grid), query / key / value / projection, Q K^T and A V, and the Mix-FFN (two linears, 3x3 depthwise)."""
    per_stage, in_channels = [], config.num_channels
    for i in range(config.num_encoder_blocks):
        c, k = config.hidden_sizes[i], config.patch_sizes[i]
        height, width = side(height, k, config.strides[i]), side(width, k, config.strides[i])
        n = height * width
        macs = n * c * in_channels * k * k
        hidden = int(c * config.mlp_ratios[i])
        for _ in range(config.depths[i]):
            r = config.sr_ratios[i]
            if config.linear_attention:
                keys, macs = 49, macs + 49 * c * c
            elif r > 1:
                keys = (height // r) * (width // r)
                macs += keys * c * c * r * r
            else:
                keys = n
            macs += 2 * n * c * c + 2 * keys * c * c + 2 * n * keys * c
            macs += 2 * n * c * hidden + 9 * n * hidden
        per_stage.append(batch * macs)
        in_channels = c
    return per_stage


KINDS = {
    "classifier": PvtV2ForImageClassification, "encoder": PvtV2Model, "backbone": PvtV2Backbone,
    "segformer": lambda c: PvtV2ForSemanticSegmentation(c, head="segformer"),
    "fpn": lambda c: PvtV2ForSemanticSegmentation(c, head="fpn"), "depth": PvtV2ForDepthEstimation,
}


def test_macs_are_half_the_flop_counter_and_the_closed_form_over_random_architectures():
    rng = random.Random(SEED)
    compared = refused = 0
    for case in range(9):
        kind = sorted(KINDS)[case % len(KINDS)]
        config = random_config(rng, float_mlp=True)
        height, width, batch = rng.randint(17, 64), rng.randint(17, 64), rng.randint(1, 2)
        torch.manual_seed(case)
        model = KINDS[kind](PvtV2Config(**config)).eval()
        x = torch.zeros(batch, config["num_channels"], height, width)
        try:
            with torch.no_grad(), fast_path(False):
                model(x)
        except ValueError as error:  # the model refuses the size: the count refuses it the same way
            with pytest.raises(ValueError, match=re.escape(str(error))):
                count_macs(model, (height, width), batch)
            refused += 1
            continue
        got = count_macs(model, (height, width), batch)
        with FlopCounterMode(display=False) as counter, torch.no_grad(), fast_path(False):
            model(x, output_attentions=True)  # the attention as counted matmuls
        where = (case, kind, config, height, width, batch)
        assert 2 * got["macs"] == counter.get_total_flops(), where
        assert got["per_stage_macs"] == closed_form_macs(model.config, height, width, batch), where
        head = batch * config["hidden_sizes"][-1] * config["num_labels"] if kind == "classifier" else 0
        if kind in ("classifier", "encoder", "backbone"):
            assert got["head_macs"] == head, where
        assert got["macs"] == sum(got["per_stage_macs"]) + got["head_macs"]
        assert got["input_shape"] == [batch, config["num_channels"], height, width]
        compared += 1
    assert compared >= 5 and refused >= 1


@pytest.mark.parametrize("size", [(64, 64, 3), 64.5, -64, (0, 64), True, "64", None])
def test_count_macs_names_a_bad_image_size(size):
    model = PvtV2ForImageClassification(PvtV2Config(**TINY_SMALL_IMAGES))
    # torch's "Dimension size must be non-negative", a bare unpacking error, "'float' object is not iterable"
    with pytest.raises(ValueError, match="image_size must be N or"):
        count_macs(model, size)


@pytest.mark.parametrize("batch", [0, -1, 1.5, True])
def test_count_macs_names_a_bad_batch_size(batch):
    model = PvtV2ForImageClassification(PvtV2Config(**TINY_SMALL_IMAGES))
    with pytest.raises(ValueError, match="batch_size must be a positive whole number"):
        count_macs(model, 32, batch)


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_inspect_against_transformers_timm_and_the_file_itself(tmp_path):
    import timm
    import transformers
    from safetensors.torch import load_file

    from pvtv2.export import convert_checkpoint

    rng = random.Random(SEED + 1)
    for case, form in enumerate(["folder", "timm", "original", "segmentation"]):
        config = random_config(rng, free_geometry=form in ("folder", "segmentation"))
        torch.manual_seed(case)
        cfg = PvtV2Config(**config)
        model = PvtV2ForSemanticSegmentation(cfg, head="fpn") if form == "segmentation" else PvtV2ForImageClassification(cfg)
        folder = tmp_path / f"m{case}"
        model.save_pretrained(folder)
        own = sum(p.numel() for p in model.parameters())
        path = str(folder)
        if form == "folder":
            twin = transformers.PvtV2ForImageClassification.from_pretrained(folder)
            assert sum(p.numel() for p in twin.parameters()) == own
        elif form in ("timm", "original"):
            path = str(tmp_path / (f"m{case}.safetensors" if form == "timm" else f"m{case}.pth"))
            convert_checkpoint(folder, path, form)
            state = load_file(path) if form == "timm" else torch.load(path, weights_only=True)
            if form == "timm":
                twin = timm.create_model(
                    "pvt_v2_b0", pretrained=False, depths=config["depths"], embed_dims=config["hidden_sizes"],
                    num_heads=config["num_attention_heads"], mlp_ratios=config["mlp_ratios"],
                    sr_ratios=config["sr_ratios"], num_classes=config["num_labels"], linear=config["linear_attention"])
                twin.load_state_dict(state, strict=True)
                assert sum(p.numel() for p in twin.parameters()) == own
            assert sum(v.numel() for v in state.values()) == own
        height, width = rng.randint(60, 140), rng.randint(60, 140)
        code, out, err = cli("inspect", path, "--json", "--image-size", f"{height}x{width}")
        assert code == 0, err
        info = json.loads(out)
        assert info["parameters"] == own and info["class"] == type(model).__name__
        assert info["num_labels"] == config["num_labels"] and info["linear_attention"] == config["linear_attention"]
        assert info["gflops"] == pytest.approx(2 * info["gmacs"])
        c = model.config
        for i, stage in enumerate(info["stages"]):
            height, width = side(height, c.patch_sizes[i], c.strides[i]), side(width, c.patch_sizes[i], c.strides[i])
            assert stage["output"] == [height, width]
            assert stage["stride"] == math.prod(c.strides[: i + 1])  # the stage's stride with respect to the input
            assert (stage["channels"], stage["depth"], stage["mlp_ratio"]) == (
                c.hidden_sizes[i], c.depths[i], c.mlp_ratios[i])
            if form not in ("timm", "original"):  # a single file does not record heads (guessed, with a warning)
                assert stage["heads"] == c.num_attention_heads[i]
            assert stage["parameters"] == sum(
                p.numel() for name, p in model.named_parameters() if f"encoder.layers.{i}." in name)
            assert stage["attention"] == ("linear (pool 7x7)" if c.linear_attention else
                                          f"sr {c.sr_ratios[i]}" if c.sr_ratios[i] > 1 else "full")
        code, text, _ = cli("inspect", path)
        assert text.splitlines()[0].startswith(f"{path}: {type(model).__name__}, ")
        assert f"parameters: {own:,}" in text


def test_heat_map_ramp_is_matplotlibs_inferno():
    cm = pytest.importorskip("matplotlib").colormaps["inferno"]
    anchors = np.linspace(0, 1, 8)
    expected = np.round(cm(anchors)[:, :3] * 255)
    assert np.abs(heatmap_colors(anchors).astype(float) - expected).max() <= 1
    # brighter (a larger sum of channels) as the value grows: the brightest pixel of a panel is the hottest
    sums = heatmap_colors(np.linspace(0, 1, 256)).astype(int).sum(-1)
    assert (np.diff(sums) >= 0).all()


def test_attention_maps_are_transformers_maps_and_the_figure_is_hottest_at_their_argmax():
    rng = random.Random(SEED + 2)
    checked_panels = 0
    for case in range(5):
        config = random_config(rng, free_geometry=False)
        height, width = rng.randint(40, 110), rng.randint(40, 110)
        torch.manual_seed(case)
        model = PvtV2ForImageClassification(PvtV2Config(**config)).eval()
        x = torch.randn(1, 3, height, width)
        try:
            maps = attention_maps(model, x)
        except ValueError:
            continue
        with torch.no_grad():
            theirs = hf_twin(model).eval()(x, output_attentions=True)
        assert len(maps) == config["num_encoder_blocks"]
        for i, entry in enumerate(maps):  # transformers nests the maps per stage, one per block
            height, width = side(height, 7 if i == 0 else 3, 4 if i == 0 else 2), side(width, 7 if i == 0 else 3,
                                                                                     4 if i == 0 else 2)
            r = config["sr_ratios"][i]
            keys = (7, 7) if config["linear_attention"] else (height // r, width // r) if r > 1 else (height, width)
            probs = theirs.attentions[i][-1][0]  # the stage's last block, the image's (heads, N, N')
            assert entry["tokens"] == (height, width) and entry["keys"] == keys
            np.testing.assert_allclose(entry["map"], probs.mean(dim=(0, 1)).reshape(keys).numpy(), atol=1e-5)
        # A uniform grey image: each panel is (1 - alpha) grey + alpha ramp(value), brightest where the map is.
        panel = rng.choice([32, 48, 64])
        image = PIL.Image.new("RGB", (rng.randint(20, 150), rng.randint(20, 150)), (128, 128, 128))
        processor = PvtV2ImageProcessor(size={"height": 64, "width": 64})
        figure = attention_figure(model, image, processor, panel_size=panel, alpha=0.6)
        line = max(18, panel // 10)
        assert figure.mode == "RGB" and figure.size == ((1 + len(maps)) * panel, panel + 2 * line)
        pixels = np.asarray(figure).astype(int)
        for n, entry in enumerate(attention_maps(model, processor(image, return_tensors="pt")["pixel_values"]), 1):
            heat = entry["map"]
            if heat.max() - heat.min() < 1e-6:
                continue
            brightness = pixels[2 * line:, n * panel:(n + 1) * panel].sum(-1)
            rows, cols = heat.shape
            hot = {(int((y + 0.5) * rows / panel), int((x + 0.5) * cols / panel))
                   for y, x in zip(*np.nonzero(brightness == brightness.max()))}
            # Near the top, not at it: a one-cell peak that no pixel centre hits exactly comes out of the bilinear
            # upsampling lower than a broad plateau just below it.
            top = np.argwhere(heat >= heat.max() - 0.05 * (heat.max() - heat.min()))
            near = {(a + da, b + db) for a, b in top for da in (-1, 0, 1) for db in (-1, 0, 1)}
            assert hot & near, (case, entry["stage"], sorted(hot)[:3], top[:3].tolist())
            checked_panels += 1
    assert checked_panels >= 6


def test_attention_figure_puts_a_known_hot_key_where_it_lies(monkeypatch):
    """A map of one hot key on a non-square grid (a transposed or flipped panel would put it elsewhere): the panel's
    brightest pixels lie in that key's cell, and nowhere else."""
    import pvtv2.visualize as visualize

    rng = random.Random(SEED + 4)
    model = PvtV2ForImageClassification(PvtV2Config(**TINY_SMALL_IMAGES)).eval()
    for _ in range(6):
        grids = [(rng.randint(2, 9), rng.randint(2, 9)) for _ in range(rng.randint(1, 4))]
        hot = [(rng.randrange(r), rng.randrange(c)) for r, c in grids]
        maps = []
        for n, ((rows, cols), (r, c)) in enumerate(zip(grids, hot), start=1):
            heat = np.zeros((rows, cols), dtype=np.float32)
            heat[r, c] = 1.0
            maps.append({"stage": n, "tokens": (rows * 2, cols * 2), "keys": (rows, cols), "map": heat})
        monkeypatch.setattr(visualize, "attention_maps", lambda model, pixels, maps=maps: maps)
        panel = rng.choice([32, 64, 100])
        grey = PIL.Image.new("RGB", (rng.randint(10, 300), rng.randint(10, 300)), (90, 90, 90))
        figure = np.asarray(attention_figure(model, grey, panel_size=panel, alpha=rng.choice([0.4, 1.0]))).astype(int)
        line = max(18, panel // 10)
        for n, ((rows, cols), cell) in enumerate(zip(grids, hot), start=1):
            brightness = figure[2 * line:, n * panel:(n + 1) * panel].sum(-1)
            ys, xs = np.nonzero(brightness == brightness.max())
            cells = {(int((y + 0.5) * rows / panel), int((x + 0.5) * cols / panel)) for y, x in zip(ys, xs)}
            assert cells == {cell}, (grids, hot, n, panel)


def test_attention_figure_and_processor_refuse_an_empty_image():
    model = PvtV2ForImageClassification(PvtV2Config(**TINY_SMALL_IMAGES)).eval()
    # A 0x40 PIL image became a uniform 224x224 input: a figure (or a prediction) of nothing.
    with pytest.raises(ValueError, match=r"image 0 is empty: a 0x40"):
        attention_figure(model, PIL.Image.new("RGB", (0, 40)), panel_size=32)
    with pytest.raises(ValueError, match=r"image 0 is empty: a 40x0"):
        PvtV2ImageProcessor()(PIL.Image.new("L", (40, 0)), return_tensors="pt")


BENCH_KINDS = {"classifier": PvtV2ForImageClassification, "backbone": PvtV2Backbone,
               "segformer": PvtV2ForSemanticSegmentation, "depth": PvtV2ForDepthEstimation}


def test_benchmark_times_the_model_it_reports_with_its_own_channels():
    rng = random.Random(SEED + 3)
    for case in range(6):
        kind = sorted(BENCH_KINDS)[case % 4]
        channels = (1, 3, 4, 2)[case % 4]  # a 1-channel model was refused ("pixel_values has 3 channels")
        batch, size = rng.randint(1, 2), 32
        dtype, train = rng.choice(["fp32", "bf16"]), case % 3 == 1
        frozen = not train and rng.random() < 0.5
        warmup, repeats = rng.randint(0, 1), rng.randint(1, 2)
        model = BENCH_KINDS[kind](PvtV2Config(**TINY_SMALL_IMAGES, num_channels=channels, num_labels=3))
        if frozen:
            fast.freeze(model)
        calls = []

        def record(module, args, kwargs):
            x = args[0] if args else kwargs["pixel_values"]
            calls.append((tuple(x.shape), torch.is_autocast_enabled("cpu"), torch.is_grad_enabled(),
                          torch.is_inference_mode_enabled(), module.training))

        handle = model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            result = benchmark_model(model, batch_size=batch, image_size=size, dtype=dtype, train=train,
                                     warmup=warmup, repeats=repeats, num_labels=3)
        finally:
            handle.remove()
        where = (case, kind, channels, dtype, train, frozen)
        assert calls == [((batch, channels, size, size), dtype == "bf16", train, not train, train)] * (
            warmup + repeats), where
        assert result.images_per_s == pytest.approx(batch / (result.latency_ms / 1e3), rel=1e-12)
        assert result.best_latency_ms <= result.latency_ms
        assert (result.mode, result.batch_size, result.image_size, result.dtype, result.repeats) == (
            "train" if train else "inference", batch, size, dtype, repeats)
        assert not model.training
        if repeats == 1:
            assert result.latency_ms == result.best_latency_ms


@pytest.mark.parametrize("key,value", [("batch_size", True), ("batch_size", 1.5), ("image_size", 32.0),
                                       ("repeats", 2.5), ("warmup", None)])
def test_benchmark_model_names_a_count_that_is_not_whole(key, value):
    model = PvtV2ForImageClassification(PvtV2Config(**TINY_SMALL_IMAGES))
    kwargs = dict(batch_size=1, image_size=32, repeats=1, warmup=0)
    with pytest.raises(ValueError, match=f"{key} must be a whole number"):
        benchmark_model(model, **{**kwargs, key: value})


def test_benchmark_command_times_a_one_channel_checkpoint(tmp_path):
    PvtV2ForImageClassification(PvtV2Config(**TINY_SMALL_IMAGES, num_channels=1)).save_pretrained(tmp_path / "grey")
    code, out, err = cli("benchmark", "--model", str(tmp_path / "grey"), "--image-size", "32", "--repeats", "2",
                         "--warmup", "0", "--batch-size", "3", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["images_per_s"] == pytest.approx(3 / (result["latency_ms"] / 1e3), rel=1e-9)
    assert (result["batch_size"], result["image_size"], result["mode"]) == (3, 32, "inference")


def test_the_papers_figure_is_shown_only_beside_the_papers_model(tmp_path, monkeypatch):
    """A folder named after a preset (``pvtv2 inspect pvt_v2_b1`` in the folder holding it) is read as that folder:
    its count was set beside the paper's figure for that variant, whatever it held."""
    monkeypatch.chdir(tmp_path)
    tiny = PvtV2ForImageClassification(PvtV2Config(**TINY_SMALL_IMAGES))
    tiny.save_pretrained(tmp_path / "pvt_v2_b0")
    with torch.device("meta"):
        segmenter = PvtV2ForSemanticSegmentation(PvtV2Config.from_preset("pvt_v2_b0", num_labels=150))
    segmenter.to_empty(device="cpu").save_pretrained(tmp_path / "pvt_v2_b1")  # B0's encoder under B1's name
    for name, model in (("pvt_v2_b0", tiny), ("pvt_v2_b1", segmenter)):
        code, out, err = cli("inspect", name, "--json")
        assert code == 0, err
        info = json.loads(out)
        assert info["parameters"] == sum(p.numel() for p in model.parameters())
        assert "paper_gmacs" not in info  # was 0.6 beside 0.068 (+785%), 2.1 beside B0's segmenter (+35%)
        assert "paper (Table 1)" not in cli("inspect", name)[1]
    with torch.device("meta"):  # the preset itself, and its classifier however named, keep the paper's figure
        b0 = PvtV2ForImageClassification(PvtV2Config.from_preset("pvt_v2_b0"))
    code, out, _ = cli("inspect", "PVT-v2-B0", "--json")
    assert code == 0 and json.loads(out)["paper_gmacs"] == 0.6
    from pvtv2.flops import model_summary

    assert model_summary(b0, 224, name="pvt_v2_b0")["paper_gmacs"] == 0.6
    assert "paper_gmacs" not in model_summary(b0, 224, name="pvt_v2_b1")
