"""README.md and docs/*.md read against the code (docs pass 33): whole-table checks of what the pages state (every
flag a command line in them uses, the defaults tables, the compute table), the defects found, and a sample of
recorded values that nothing else tests."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import pvtv2
from pvtv2 import PvtV2Config, PvtV2ForDepthEstimation, PvtV2ForImageClassification, PvtV2ForSemanticSegmentation
from pvtv2.cli import build_parser, main

from conftest import TINY, TINY_SHALLOW, save_tiny_classifier

ROOT = Path(__file__).resolve().parents[2]
PAGES = ["README.md", *(f"docs/{name}.md" for name in ("architecture", "commands", "dense", "detection", "training",
                                                       "benchmarks"))]
# torchrun's own flags, which the pages pass it beside pvtv2's
TORCHRUN_FLAGS = {"--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_endpoint"}


def _page(name: str) -> str:
    return (ROOT / name).read_text()


def _subcommands() -> dict[str, dict[str, argparse.Action]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {o: a for a in p._actions for o in a.option_strings} for name, p in sub.choices.items()}


def _benchmark_script_flags() -> dict[str, set[str]]:
    return {f.name: set(re.findall(r'add_argument\(\s*"(--[\w-]+)"', f.read_text()))
            for f in (ROOT / "benchmarks").glob("*.py")}


def test_every_flag_of_every_documented_command_line_exists():
    """Each `pvtv2 CMD ... --flag` of the pages (continuation lines joined) names a flag of CMD's parser, each
    `bench.py ... --flag` one of that script's, and any other `--flag` a pvtv2, torchrun or benchmark flag."""
    commands, scripts = _subcommands(), _benchmark_script_flags()
    every = set().union(*commands.values(), *scripts.values(), TORCHRUN_FLAGS)
    checked, wrong = 0, []
    for name in PAGES:
        text = re.sub(r"\\\n\s*", " ", _page(name))
        for m in re.finditer(r"pvtv2 ([a-z][a-z-]*)([^\n#`|]*)", text):
            command, rest = m.groups()
            if command not in commands:
                continue
            rest = rest.split(" -- ")[0]  # after `--` every word is an image
            for flag in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", rest):
                checked += 1
                if flag not in commands[command]:
                    wrong.append(f"{name}: pvtv2 {command} {flag}")
        for m in re.finditer(r"(\w+\.py)((?:\s+(?:--?[\w-]+|[\w.\"/:,-]+|\"[^\"]*\"))*)", re.sub(r"\n(?=\s*--)", " ", text)):
            script, rest = m.groups()
            for flag in re.findall(r"(?<![\w-])(--[\w-]+)", rest) if script in scripts else ():
                checked += 1
                if flag not in scripts[script]:
                    wrong.append(f"{name}: {script} {flag}")
        for flag in re.findall(r"(?<![\w/.-])(--[a-z][\w-]*)", text):
            if flag not in every:
                wrong.append(f"{name}: {flag} is no flag")
    assert not wrong
    assert checked > 300  # the pages' command lines were found (a parse that finds none checks nothing)


def test_the_training_defaults_table_is_the_codes():
    """training.md's "Defaults: the paper's recipe" table against TrainConfig, the presets and `train --help`."""
    from pvtv2.training import TrainConfig

    table = _page("docs/training.md").split("### Defaults: the paper's recipe")[1].split("\n\n")[1]
    rows = dict(re.findall(r"^\| `(--[\w-]+)` \| ([^|]+) \|", table, re.M))
    cfg = TrainConfig()
    numeric = {"--epochs": cfg.epochs, "--batch-size": cfg.batch_size, "--grad-accum": cfg.grad_accum,
               "--min-lr": cfg.min_lr, "--warmup-epochs": cfg.warmup_epochs, "--weight-decay": cfg.weight_decay,
               "--label-smoothing": cfg.label_smoothing, "--crop-scale": cfg.crop_scale, "--hflip": cfg.hflip,
               "--image-size": cfg.image_size, "--seed": cfg.seed}
    assert {flag: float(rows[flag]) for flag in numeric} == {flag: float(v) for flag, v in numeric.items()}
    assert rows["--lr"].startswith("5e-4 × global batch / 512")
    assert cfg.lr is None and pvtv2.training.classification.ClassificationTask.default_lr(None, 512) == 5e-4
    assert rows["--clip-grad"].strip() == "off" and cfg.clip_grad is None
    assert rows["--drop-path"].startswith("the preset's (0.1 for B0-B2, 0.3 for B3-B5)")
    assert {p: PvtV2Config.from_preset(p).drop_path_rate for p in pvtv2.list_presets()} == {
        p: 0.3 if p[-2:] in ("b3", "b4", "b5") else 0.1 for p in pvtv2.list_presets()}
    helps = {flag: action.help for flag, action in _subcommands()["train"].items()}
    for flag, value in numeric.items():
        if flag not in ("--seed",):
            assert f"default {value:g})" in helps[flag] or helps[flag] == f"default {value:g}", (flag, helps[flag])


def test_the_small_data_defaults_the_pages_list_are_the_codes():
    """training.md's train-seg list and dense.md's, the demo's settings, and detection.md's demo-det recipe."""
    from pvtv2.demo import DEMO_DEFAULTS
    from pvtv2.training import detection, segmentation

    listed = re.search(r"\(`(--model tiny[^`]+)`\) instead of", _page("docs/training.md").replace("\n", " ")).group(1)
    pairs = dict(re.findall(r"--([\w-]+) (\S+)", listed))
    recipe = {k.replace("-", "_"): v for k, v in pairs.items()}
    assert set(recipe) == set(segmentation.EXAMPLE_RECIPE)
    for key, value in recipe.items():
        expected = segmentation.EXAMPLE_RECIPE[key]
        assert (value == expected) if isinstance(expected, str) else float(value) == expected, key
    # the same in train-seg's help, which the command shows
    helps = {flag: action.help for flag, action in _subcommands()["train-seg"].items()}
    assert "(default 0.002)" in helps["--lr"] and "(default 2e-05)" in helps["--min-lr"]
    # the demo: "32 px, 8 epochs, batch 32, peak learning rate 2e-3 with one warmup epoch, no stochastic depth, no
    # horizontal flips, random crops of at least 60% of the image, label smoothing 0.1, weight decay 0.05, ... none"
    assert {k: DEMO_DEFAULTS[k] for k in ("image_size", "epochs", "batch_size", "lr", "warmup_epochs", "drop_path",
                                          "hflip", "crop_scale", "label_smoothing", "weight_decay", "recipe")} == dict(
        image_size=32, epochs=8, batch_size=32, lr=2e-3, warmup_epochs=1.0, drop_path=0.0, hflip=0.0, crop_scale=0.6,
        label_smoothing=0.1, weight_decay=0.05, recipe="none")
    # detection.md: demo-det trains "batch 8, AdamW 1e-3, 50 warmup steps, x0.1 after epochs 8 and 11 of 12, ... no
    # flips" on 1500 + 150 images of 96 px; the 1x recipe: 12 epochs, batch 2, shorter side 800, 500 warmup steps
    assert {k: detection.EXAMPLE_RECIPE[k] for k in ("model", "detector", "image_size", "epochs", "batch_size", "lr",
                                                    "warmup_steps", "hflip")} == dict(
        model="tiny", detector="fcos", image_size=96, epochs=12, batch_size=8, lr=1e-3, warmup_steps=50, hflip=0.0)
    assert detection.EXAMPLE_DATA == dict(train=1500, val=150)
    assert {k: detection.DETECTION_RECIPE[k] for k in ("image_size", "epochs", "batch_size", "warmup_steps",
                                                      "weight_decay", "hflip")} == dict(
        image_size=800, epochs=12, batch_size=2, warmup_steps=500, weight_decay=1e-4, hflip=0.5)


def test_the_detector_fields_table_is_what_a_new_detector_holds():
    from pvtv2 import PvtV2ForObjectDetection

    pytest.importorskip("torchvision")
    table = _page("docs/detection.md").split("Every setting is a `config.json` field")[1].split("\n\n")[1]
    rows = dict(re.findall(r"^\| `(\w+)`(?:, `\w+`)? \| ([^|]+) \|", table, re.M))
    assert set(rows) >= {"detector", "min_size", "max_size", "fpn_channels", "frozen_stages", "freeze_layer_norms",
                         "score_threshold", "nms_threshold", "detections_per_image", "image_mean",
                         "detection_convention"}
    documented_stages = {"retinanet": [2, 3, 4], "faster_rcnn": [1, 2, 3, 4], "mask_rcnn": [1, 2, 3, 4],
                         "fcos": [2, 3, 4]}  # the "FPN inputs" column of the configurations table
    for kind in (None, "fcos", "mask_rcnn"):
        fields = {} if kind is None else {"detector": kind}
        config = PvtV2ForObjectDetection(PvtV2Config(**TINY_SHALLOW, num_labels=2, **fields)).config
        got = {name: getattr(config, name) for name in [*rows, "image_std"]}
        assert got["detector"] == (kind or rows["detector"].strip(" `"))
        assert got["fpn_stages"] == documented_stages[got["detector"]]
        for name in ("min_size", "max_size", "fpn_channels", "frozen_stages", "score_threshold",
                     "detections_per_image"):
            assert float(rows[name]) == got[name], name
        assert got["nms_threshold"] == (0.6 if kind == "fcos" else 0.5) and rows["nms_threshold"].strip() == \
            "0.5 (FCOS 0.6)"
        assert got["freeze_layer_norms"] is False and rows["freeze_layer_norms"].strip() == "false"
        assert got["image_mean"] is None and got["image_std"] is None and rows["image_mean"].startswith("null")
        assert got["detection_convention"] == rows["detection_convention"].strip(" `") == "torchvision"


def _summary(model_class, preset, size, **fields):
    from pvtv2.flops import model_summary

    with torch.device("meta"):
        model = model_class(PvtV2Config.from_preset(preset, **fields), **({"head": "fpn"} if fields else {}))
    return model_summary(model, size, name=preset)


def test_the_compute_table_and_the_preset_sizes_are_counted():
    """commands.md's table (params, counted GMACs, the paper's figure that `pvtv2 info` prints) for all seven
    presets and README's parameter counts in millions."""
    table = _page("docs/commands.md").split("| model | params | counted GMACs | paper |")[1].split("\n\n")[0]
    rows = re.findall(r"^\| (pvt_v2_\w+) \| ([\d.]+)M \| ([\d.]+) \| ([\d.]+) \|", table, re.M)
    assert [r[0] for r in rows] == ["pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2_li", "pvt_v2_b2", "pvt_v2_b3", "pvt_v2_b4",
                                    "pvt_v2_b5"]
    from pvtv2.flops import format_summary

    readme = re.search(r"\(([\d., ]+) M parameters with the 1000-class head", _page("README.md").replace("\n", " "))
    readme = readme.group(1)
    readme = dict(zip(pvtv2.list_presets(), (float(v) for v in readme.split(", "))))
    for preset, params, gmacs, paper in rows:
        summary = _summary(PvtV2ForImageClassification, preset, (224, 224))
        assert f"{summary['parameters'] / 1e6:.2f}" == params and f"{summary['gmacs']:.3f}" == gmacs, preset
        assert round(summary["parameters"] / 1e6, 1) == readme[preset]
        assert f"paper (Table 1): {paper} GMACs" in format_summary(summary)


def _fpn_figures() -> dict[str, float]:
    figures = re.search(r"`--image-size 512`: ([\d., and]+) GMACs\)", _page("docs/commands.md").replace("\n", " "))
    figures = [float(v) for v in re.findall(r"[\d.]+\d", figures.group(1))]
    assert len(figures) == 6
    return dict(zip(["pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2", "pvt_v2_b3", "pvt_v2_b4", "pvt_v2_b5"], figures))


@pytest.mark.parametrize("preset", ["pvt_v2_b0", pytest.param("pvt_v2_b1", marks=pytest.mark.slow),
                                    pytest.param("pvt_v2_b2", marks=pytest.mark.slow),
                                    pytest.param("pvt_v2_b3", marks=pytest.mark.slow),
                                    pytest.param("pvt_v2_b4", marks=pytest.mark.slow),
                                    pytest.param("pvt_v2_b5", marks=pytest.mark.slow)])
def test_the_semantic_fpn_compute_figures_are_counted(preset):
    """commands.md: Semantic FPN on B0 to B5 with 150 classes at `--image-size 512`: 25.0 ... 90.9 GMACs."""
    summary = _summary(PvtV2ForSemanticSegmentation, preset, (512, 512), num_labels=150)
    assert round(summary["gmacs"], 1) == _fpn_figures()[preset]


def test_eval_batch_size_default_is_the_one_its_help_states(tmp_path, monkeypatch):
    """`pvtv2 eval --help` said "(default: 16)", predict's default; eval runs 32 images a pass (detection 2)."""
    import pvtv2.inference

    help_text = _subcommands()["eval"]["--batch-size"].help
    assert help_text == "images per forward pass, 1 to 1024 (default: 32; detection: 2)"
    assert _subcommands()["predict"]["--batch-size"].help.endswith("(default: 16)")
    save_tiny_classifier(tmp_path / "model")
    (tmp_path / "data" / "a").mkdir(parents=True)
    seen = []

    def fake_evaluate(model, processor, data, batch_size, **kwargs):
        seen.append(batch_size)
        return {"dataset": str(data), "images": 0, "classes": 3, "top1": 0.0, "top5": 0.0, "top5_k": 3, "loss": 0.0}

    monkeypatch.setattr(pvtv2.inference, "evaluate", fake_evaluate)
    assert main(["eval", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--json"]) == 0
    assert main(["eval", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--json",
                 "--batch-size", "5"]) == 0
    assert seen == [32, 5]

    def fake_detector_eval(model, data, *, batch_size, **kwargs):
        seen.append(batch_size)
        raise ValueError("stop here")

    monkeypatch.setattr(pvtv2.inference, "load_detector", lambda *a, **k: None)
    monkeypatch.setattr(pvtv2.inference, "evaluate_detector", fake_detector_eval)
    assert main(["eval", "--task", "detection", "--model", "m", "--data", str(tmp_path / "data")]) == 2
    assert seen == [32, 5, 2]


@pytest.mark.parametrize("args, message", [
    (["detect", "IMG", "--batch-size", "0"], "--batch-size must be between 1 and 1024, got 0"),
    (["detect", "IMG", "--batch-size", "5000"], "--batch-size must be between 1 and 1024, got 5000"),
    (["eval", "--task", "detection", "--data", "D", "--batch-size", "5000"],
     "--batch-size must be between 1 and 1024, got 5000"),
    (["detect", "IMG", "--image-size", "100000"], "--image-size must be at most 4096 pixels (the shorter side), got 100000"),
    (["detect", "IMG", "--image-size", "4097"], "--image-size must be at most 4096 pixels (the shorter side), got 4097"),
])
def test_detection_commands_bound_their_flags_as_the_others(tmp_path, capsys, args, message):
    """commands.md: "`--batch-size` 1 to 1024". The detection commands took any batch size, and `detect --image-size
    100000` loaded the model and then tried to allocate 154 GB. Both are refused first, naming the flag (the model
    here does not even exist)."""
    image = tmp_path / "photo.png"
    PIL.Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    args = [str(image) if a == "IMG" else str(tmp_path) if a == "D" else a for a in args]
    assert main([*args, "--model", str(tmp_path / "no-model")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"pvtv2 {args[0]}: error: {message}"


def test_detect_layout_names_every_layout_it_returns():
    """Its docstring said "transformers, timm or original"; it also answers mmdet, glpn and segformer."""
    from pvtv2.weights.layouts import MMDET_LAYOUT, detect_layout

    state = PvtV2ForImageClassification(PvtV2Config(**TINY_SHALLOW)).state_dict()
    original = pvtv2.convert_state_dict(state, "original")
    states = {
        "transformers": state,
        "timm": pvtv2.convert_state_dict(state, "timm"),
        "original": original,
        MMDET_LAYOUT: {f"backbone.{k}": v for k, v in original.items()},
        "glpn": {"glpn.encoder.block.0.0.attention.self.query.weight": torch.zeros(1)},
        "segformer": {"segformer.encoder.block.0.0.attention.self.query.weight": torch.zeros(1)},
    }
    doc = detect_layout.__doc__
    for name, layout_state in states.items():
        assert detect_layout(layout_state) == name
        assert f"``{name}``" in doc, name


def test_depth_and_segment_size_defaults_are_the_checkpoints(tmp_path, monkeypatch, capsys):
    """`depth --help` said the default size is the image's; a pvtv2 depth run's preprocessor_config.json size comes
    first (dense.md). Both helps now say so, and the depth command predicts at that size."""
    import pvtv2.inference
    from pvtv2 import PvtV2ImageProcessor

    for command in ("depth", "segment"):
        assert "preprocessor_config.json" in _subcommands()[command]["--size"].help
    torch.manual_seed(0)
    PvtV2ForDepthEstimation(PvtV2Config(**TINY_SHALLOW)).save_pretrained(tmp_path / "depth")
    PvtV2ImageProcessor(size=64, do_normalize=False).save_pretrained(tmp_path / "depth")
    image = tmp_path / "room.png"
    PIL.Image.fromarray(np.zeros((96, 160, 3), np.uint8)).save(image)
    sizes = []
    real = pvtv2.inference.predict_depth

    def spy(model, img, size=None):
        sizes.append(size)
        return real(model, img, size)

    monkeypatch.setattr(pvtv2.inference, "predict_depth", spy)
    assert main(["depth", "--model", str(tmp_path / "depth"), str(image), "-o", str(tmp_path / "d.png")]) == 0
    assert main(["depth", "--model", str(tmp_path / "depth"), str(image), "-o", str(tmp_path / "e.png"),
                 "--size", "32x64"]) == 0
    assert [tuple(s) for s in sizes] == [(64, 64), (32, 64)]


def test_the_depth_examples_image_blind_baselines_are_the_recorded_table(tmp_path):
    """dense.md's table: the training set's median depth everywhere and its mean depth at each pixel, scored on the
    example's validation split at its defaults (50 images at 64x64, 2% of pixels without depth, 1.5 to 8.8 m)."""
    from pvtv2.data.scenes import make_depth_example
    from pvtv2.training.depth import depth_metrics

    text = _page("docs/dense.md").replace("\n", " ")
    recorded = {}
    for label, name in (("median depth everywhere", "median"), ("mean depth at each pixel", "mean")):
        row = re.search(rf"\| the training set's {label} \| ([^a-z`]+) \|", text).group(1)
        recorded[name] = [float(v) for v in row.split("|") if v.strip()]
        assert len(recorded[name]) == 7
    root = make_depth_example(tmp_path / "rooms")

    def depths(split):
        return [np.asarray(PIL.Image.open(p), dtype=np.float64) / 1000 for p in sorted((root / split / "depth").glob("*.png"))]

    train, val = depths("train"), depths("val")
    assert len(train) == 200 and len(val) == 50 and val[0].shape == (64, 64)
    every = np.concatenate([d.ravel() for d in val])
    assert round((every == 0).mean(), 2) == 0.02 and every[every > 0].min() == 1.5 and round(every.max(), 1) == 8.8
    pixels = np.concatenate([d.ravel() for d in train])
    median = np.median(pixels[pixels > 0])
    stack = np.stack(train)
    mean = stack.sum(0) / np.maximum((stack > 0).sum(0), 1)
    keys = ["abs_rel", "sq_rel", "rmse", "rmse_log", "delta1", "delta2", "delta3"]
    for name, predict in (("median", lambda d: np.full_like(d, median)), ("mean", lambda d: mean)):
        scores = [depth_metrics(torch.tensor(predict(d), dtype=torch.float32), torch.tensor(d, dtype=torch.float32))
                  for d in val]
        got = [round(float(np.mean([s[k] for s in scores])), 3) for k in keys]
        assert got == recorded[name], name
        assert all(math.isfinite(v) for v in got)


def test_the_train_help_states_every_tasks_default_learning_rate():
    """`train --help` gave the default --lr of classification and segmentation only; depth's and detection's
    (1e-4 x global batch / 16, dense.md and detection.md) are the tasks' own."""
    from pvtv2.training.depth_task import DepthTask
    from pvtv2.training.detection import DetectionTask
    from pvtv2.training.segmentation import SegmentationTask

    text = _subcommands()["train"]["--lr"].help
    assert "6e-5 x global batch / 16 for segmentation" in text
    assert "1e-4 x global batch / 16 for depth and detection" in text
    for task, rate in ((SegmentationTask, 6e-5), (DepthTask, 1e-4), (DetectionTask, 1e-4)):
        assert task.default_lr(None, 16) == pytest.approx(rate) and task.default_lr(None, 64) == pytest.approx(4 * rate)


def test_the_demo_folder_layout_and_metrics_fields_as_documented(tmp_path):
    """training.md: the demo's digits are 1438 training and 359 held-out 32x32 RGB images (80/20 per class, seed 0);
    a run's metrics.jsonl lines carry epoch, train_loss, val_loss, val_top1, val_top5, lr, seconds,
    images_per_second. One epoch of a tiny model on a few digits stands in for the demo's run."""
    from pvtv2.data.digits import write_digits_folder

    assert write_digits_folder(tmp_path / "all", size=32, seed=0) == (1438, 359)  # the demo's call
    files = {split: sorted((tmp_path / "all" / split).rglob("*.png")) for split in ("train", "val")}
    assert (len(files["train"]), len(files["val"])) == (1438, 359)
    with PIL.Image.open(files["val"][0]) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    write_digits_folder(tmp_path / "few", size=32, limit_per_class=4, val_fraction=0.25, seed=0)
    (tmp_path / "arch.json").write_text(json.dumps(dict(TINY, depths=[1, 1, 1, 1], sr_ratios=[4, 2, 1, 1])))
    assert main(["train", "--data", str(tmp_path / "few"), "--model", str(tmp_path / "arch.json"), "--output",
                 str(tmp_path / "run"), "--epochs", "1", "--image-size", "32", "--batch-size", "8",
                 "--no-progress"]) == 0
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert list(record) == ["epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "seconds",
                            "images_per_second"]
    assert sorted(p.name for p in (tmp_path / "run" / "last").iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json", "training_state.pt"]
