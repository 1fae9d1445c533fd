"""A hostile pass over two changes: the CPU fast path running the patch embedding module on a stage input no larger
than its padding, and the bounds of ``detect`` / ``eval --task detection``'s ``--batch-size`` and ``detect
--image-size``.

The fast path is held to the reference path of the same model (``pvtv2.fast.fast_path(False)``) and to transformers
on inputs exactly as large as a stage's padding and one pixel larger, in one or both dimensions, frozen models
whose weights change after a call, stride == patch, batch 1-3, contiguous / channels-last / strided pixels, fp32,
bf16 autocast and bf16 weights. The command lines are held to one ``error:`` line naming the flag, exit status 2,
and no model loaded; the legal boundaries reach the detector with the size asked for.
"""

from __future__ import annotations

import copy
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import torch
import transformers

import pvtv2
import pvtv2.fast.cpu as cpu
import pvtv2.inference as inference
from pvtv2 import PvtV2Backbone, PvtV2Config, PvtV2ForImageClassification, PvtV2Model

from conftest import perturb_, random_weights_, relative_error

BF16 = pvtv2.fast.fast_path_available(torch.bfloat16)
THEIRS = {PvtV2ForImageClassification: transformers.PvtV2ForImageClassification,
          PvtV2Model: transformers.PvtV2Model, PvtV2Backbone: transformers.PvtV2Backbone}


def twin(ours: torch.nn.Module) -> torch.nn.Module:
    data = ours.config.to_dict()
    data.pop("stage_names")
    theirs = THEIRS[type(ours)](transformers.PvtV2Config(**data))
    theirs.load_state_dict({k: v.contiguous() for k, v in ours.state_dict().items()}, strict=True)
    return theirs.to(next(ours.parameters()).dtype).eval()


def tensors(out) -> dict[str, torch.Tensor]:
    found = {}
    for key, value in out.items():
        if isinstance(value, torch.Tensor):
            found[key] = value
        elif value is not None:
            found.update({f"{key}[{i}]": v for i, v in enumerate(value)})
    return found


def pixels(batch: int, channels: int, height: int, width: int, layout: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if layout == "strided":
        return torch.randn(batch, channels, height, 2 * width + 1, generator=gen)[..., 1::2]
    x = torch.randn(batch, channels, height, width, generator=gen)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


# (model class, patch sizes, strides, input height, width, batch, layout): stage 1 meets its padding (3 for 7x7, 1 for
# 3x3 / 2x2) or padding + 1 in one or both dimensions, or a later stage does; stride == patch in some.
CASES = [
    (PvtV2ForImageClassification, [7, 3], [4, 2], 3, 3, 1, "contiguous"),
    (PvtV2ForImageClassification, [7, 3], [4, 2], 3, 40, 2, "channels_last"),
    (PvtV2Model, [7, 3], [4, 2], 4, 4, 3, "strided"),  # padding + 1: stage 1 as before, stage 2 on 1 x 1
    (PvtV2Model, [7, 3], [4, 2], 40, 4, 2, "contiguous"),
    (PvtV2Backbone, [3, 3], [3, 3], 1, 7, 2, "contiguous"),  # stride == patch
    (PvtV2Backbone, [2, 2], [2, 2], 2, 2, 1, "channels_last"),  # stride == patch, stage 2 on 1 x 1 = its padding
    (PvtV2Backbone, [5, 3], [2, 1], 2, 3, 3, "strided"),
    (PvtV2ForImageClassification, [3, 7], [1, 4], 6, 3, 2, "contiguous"),  # stage 2 on 6 x 3: 3 = its padding
]


def build(cls, patches, strides, seed):
    fields = dict(num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 2],
                  sr_ratios=[1, 1], patch_sizes=patches, strides=strides, mlp_ratios=[2, 2], num_labels=3)
    if cls is PvtV2Backbone:
        fields["out_indices"] = [0, 1]
    model = random_weights_(cls(PvtV2Config(**fields)), seed)
    return perturb_(model, 0.2, seed).eval()


@pytest.mark.parametrize("i", range(len(CASES)))
@pytest.mark.parametrize("mode", ["fp32", "autocast_bf16", "bf16_model"])
def test_the_fast_path_on_inputs_at_the_patch_padding_is_the_reference(i, mode):
    cls, patches, strides, height, width, batch, layout = CASES[i]
    if mode != "fp32" and not BF16:
        pytest.skip("no bf16 fast path on this CPU")
    model = build(cls, patches, strides, seed=i)
    x = pixels(batch, 3, height, width, layout, seed=i)
    if mode == "bf16_model":
        model.to(torch.bfloat16)
        x = x.bfloat16()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast_bf16")
    flags = dict(output_hidden_states=True)
    with torch.no_grad():
        pvtv2.fast.freeze(model)
        with autocast:
            model(pixels(batch, 3, 64, 64, "contiguous", seed=99).to(x.dtype))  # packs the weights for a large input
            model(x, **flags)
        gen = torch.Generator().manual_seed(i + 1)
        for _, p in sorted(model.named_parameters()):  # changed after freezing
            p.add_((torch.randn(p.shape, generator=gen) * 0.05).to(p.dtype))
        theirs = twin(model)
        truth_model = copy.deepcopy(theirs).double()
        with autocast, mock.patch.object(cpu, "stage_forward", wraps=cpu.stage_forward) as fused:
            fast = tensors(model(x, **flags))
            with pvtv2.fast.fast_path(False):
                ref = tensors(model(x, **flags))
            hf = tensors(theirs(x, **flags))
        truth = tensors(truth_model(x.double(), **flags))
    pvtv2.fast.unfreeze(model)
    assert fused.call_count == 2  # both stages, one of them at its padding, took the fast path
    assert sorted(fast) == sorted(ref)
    for key, expected in ref.items():
        got = fast[key]
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        assert torch.isfinite(got).all(), key
        if mode == "fp32":
            assert relative_error(expected, got) < 1e-5, key
            if key in hf:
                assert relative_error(hf[key], got) < 1e-4, key
        else:
            ours_error, ref_error = relative_error(truth[key], got), relative_error(truth[key], expected)
            assert ours_error < 0.1 and ours_error <= 2.5 * ref_error + 4e-3, (key, ours_error, ref_error)


def test_a_float64_model_at_the_padding_takes_the_reference_path():
    model = build(PvtV2Model, [7, 3], [4, 2], seed=0).double()
    x = pixels(2, 3, 3, 5, "contiguous", seed=0).double()
    theirs = twin(model)
    with torch.no_grad(), mock.patch.object(cpu, "stage_forward", wraps=cpu.stage_forward) as fused:
        got = model(x).last_hidden_state
        want = theirs(x).last_hidden_state
    assert fused.call_count == 0
    assert got.dtype == torch.float64 and relative_error(want, got) < 1e-12


# ---------------------------------------------------------------------------------------------- the command lines
@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    from pvtv2.models.detection import PvtV2ForObjectDetection

    from conftest import TINY_SHALLOW

    root = tmp_path_factory.mktemp("hostile33")
    torch.manual_seed(0)
    config = PvtV2Config(**TINY_SHALLOW, id2label={0: "a", 1: "b"}, detector="retinanet", min_size=64, max_size=96,
                         score_threshold=0.0, fpn_channels=32)
    PvtV2ForObjectDetection(config).eval().save_pretrained(root / "det")
    image = root / "a.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(image)
    return root


class Loaded(Exception):
    pass


def run(capsys, args: list[str]):
    """``pvtv2 ARGS`` in this process with the detector loader replaced: (status, stderr lines, loader calls)."""
    from pvtv2.cli import main

    calls = []

    def loader(*a, **k):
        calls.append(k)
        raise Loaded

    with mock.patch.object(inference, "load_detector", loader):
        try:
            code = main(args)
        except SystemExit as exit_:
            code = exit_.code
        except Loaded:
            code = "loaded"
    return code, capsys.readouterr().err.strip().splitlines(), calls


BAD_BATCH = ["0", "-1", "-0", "1025", "99999999999999999999999999", "1e3", "", "abc", "2.5", "nan", "0x10"]


@pytest.mark.parametrize("value", BAD_BATCH)
@pytest.mark.parametrize("command", ["detect", "eval"])
def test_a_bad_detection_batch_size_is_one_error_line_before_any_model(detector, capsys, command, value, tmp_path):
    args = (["detect", "-m", str(detector / "det"), str(detector / "a.png"), "--output-dir", str(tmp_path / "out")]
            if command == "detect" else
            ["eval", "-m", str(detector / "det"), "--data", str(detector), "--task", "detection"])
    code, err, calls = run(capsys, [*args, "--no-progress", "--batch-size", value])
    assert code == 2 and calls == []
    errors = [line for line in err if "error:" in line]
    shown = str(int(value)) if value.lstrip("-").isdigit() else f"'{value}'"  # the number read, or the text refused
    assert len(errors) == 1 and "--batch-size" in errors[0] and errors[0].endswith(shown), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", "31", "-1", "4097", "99999999999999999999999999", "1e3", "", "x"])
def test_a_bad_detect_image_size_is_one_error_line_before_any_model(detector, capsys, value, tmp_path):
    code, err, calls = run(capsys, ["detect", "-m", str(detector / "det"), str(detector / "a.png"), "-o",
                                    str(tmp_path / "o.png"), "--image-size", value])
    assert code == 2 and calls == []
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1 and "--image-size" in errors[0], err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("value", ["1.5", "nan", "-0.1", "inf", "-inf", "1.0000001"])
def test_a_bad_detect_score_threshold_is_refused_before_the_detector_is_loaded(detector, capsys, value):
    """detect_objects refused these, but only after the detector was loaded (from the hub, a download first)."""
    code, err, calls = run(capsys, ["detect", "-m", str(detector / "det"), str(detector / "a.png"),
                                    f"--score-threshold={value}"])  # "-inf" alone reads as an option
    assert code == 2 and calls == []
    assert err == [f"pvtv2 detect: error: --score-threshold must be between 0 and 1, got {float(value)}"]


def test_a_bad_detect_image_size_is_named_before_the_images_are_looked_for(capsys, tmp_path):
    code, err, calls = run(capsys, ["detect", "-m", "x", str(tmp_path / "missing.png"), "--image-size", "5000"])
    assert code == 2 and calls == []
    assert err == ["pvtv2 detect: error: --image-size must be at most 4096 pixels (the shorter side), got 5000"]


@pytest.mark.parametrize("value", ["0", "1", "0.5"])
def test_the_score_threshold_bounds_reach_the_detector(detector, capsys, value):
    code, err, calls = run(capsys, ["detect", "-m", str(detector / "det"), str(detector / "a.png"),
                                    "--score-threshold", value])
    assert code == "loaded", err
    assert calls[0]["score_threshold"] == float(value)


@pytest.mark.parametrize("args, size", [
    (["--batch-size", "1"], None), (["--batch-size", "1024"], None), (["--image-size", "32"], 32),
    (["--image-size", "4096"], 4096), (["--image-size", "5000", "--image-size", "64"], 64),  # the last one counts
    (["--batch-size", "0", "--batch-size", "32"], None),
])
def test_the_legal_boundaries_reach_the_detector(detector, capsys, args, size):
    code, err, calls = run(capsys, ["detect", "-m", str(detector / "det"), str(detector / "a.png"), *args])
    assert code == "loaded", err
    assert calls[0].get("min_size") == size
    if size is not None:
        assert calls[0]["max_size"] == round(size * 1333 / 800)  # the original's proportion, 800 / 1333


def test_eval_detection_runs_at_its_batch_size_bounds(detector, capsys, tmp_path):
    """The real detector at both bounds on a one-image COCO set: the same scores either way."""
    import json

    from pvtv2.cli import main

    # The set in this test's own folder: the module's detector folder is shared by the tests of this worker.
    data = tmp_path / "coco"
    (data / "val").mkdir(parents=True)
    (data / "annotations").mkdir()
    PIL.Image.open(detector / "a.png").save(data / "val" / "a.png")
    (data / "annotations" / "instances_val.json").write_text(
        '{"images": [{"id": 1, "file_name": "a.png", "width": 50, "height": 40}], "annotations": [{"id": 1, '
        '"image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": 0}], '
        '"categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}')
    results = []
    for value in ("1", "1024"):
        code = main(["eval", "-m", str(detector / "det"), "--data", str(data), "--task", "detection", "--json",
                     "--no-progress", "--batch-size", value])
        out = capsys.readouterr()
        assert code == 0, out.err
        results.append(json.loads(out.out))
    assert results[0]["images"] == results[1]["images"] == 1
    # a detector that found nothing would score AP 0 at either size: it finds the box (AP50 1) and keeps 100 detections
    assert results[0]["detections"] == results[1]["detections"] == 100
    assert results[0]["box"] == results[1]["box"] and results[0]["box"]["AP50"] > 0.5, results


def test_detect_batch_size_help_states_the_bounds_it_enforces(detector, capsys):
    """detect refuses a --batch-size outside 1-1024 (as eval, whose help says so); its help said only the default."""
    import argparse

    from pvtv2.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in sub.choices["detect"]._actions if "--batch-size" in a.option_strings)
    assert action.help == "images per forward pass, 1 to 1024 (default: 2)"
    assert action.default == 2
    for value, status in (("1024", "loaded"), ("1025", 2)):
        code, _, _ = run(capsys, ["detect", "-m", str(detector / "det"), str(detector / "a.png"), "--batch-size", value])
        assert code == status
