"""ONNX export audited: every exportable model at sizes unlike the example, every output of the graph, the declared
dynamic axes and opset, refusals before anything is written, and checkpoint conversion round trips.

References: the PyTorch model itself (not the export's modified copy) run on the same inputs, onnxruntime, timm and
transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import MODEL_KINDS, TINY_SHALLOW, onnx_export_writing_opset, perturb_, relative_error

from pvtv2 import (
    PvtV2Backbone,
    PvtV2Config,
    PvtV2ForDepthEstimation,
    PvtV2ForImageClassification,
    PvtV2Model,
)
from pvtv2.export import ExportError, export_onnx

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

ALL_STAGES = ["stage1", "stage2", "stage3", "stage4"]


def build(kind: str, attention: str) -> torch.nn.Module:
    extra = {"sr": {}, "linear": {"linear_attention": True}, "sr1": {"sr_ratios": [1, 1, 1, 1]}}[attention]
    config = PvtV2Config(**TINY_SHALLOW, image_size=64, num_labels=3, out_features=ALL_STAGES, **extra)
    torch.manual_seed(0)
    return perturb_(MODEL_KINDS[kind](config), scale=0.1).eval()  # away from init, so a wrong op shows


def pytorch_outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(x)
    if isinstance(model, PvtV2Backbone):
        return dict(zip(model.out_features, out.feature_maps))
    if isinstance(model, PvtV2ForDepthEstimation):
        return {"predicted_depth": out.predicted_depth}
    if isinstance(model, PvtV2Model):
        return {"last_hidden_state": out.last_hidden_state}
    return {"logits": out.logits}


def dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


# (kind, attention, sizes (batch, height, width) unlike the 2x64x64 example: batch 3, non-square, sides divisible by
# neither 7 nor 32, and the smallest the model runs at: 29 pixels for spatial reduction 8 after stride 4; any size
# for linear attention or reduction 1; multiples of 32 for the depth decoder)
CASES = [
    ("classifier", "sr", [(3, 97, 45), (1, 29, 29), (2, 224, 160)]),
    ("classifier", "linear", [(3, 97, 45), (1, 1, 1), (1, 6, 250)]),
    ("classifier", "sr1", [(3, 97, 45), (1, 1, 1)]),
    ("encoder", "sr1", [(3, 33, 47), (1, 2, 3)]),
    ("backbone", "sr", [(3, 97, 45), (1, 29, 30)]),
    ("backbone", "linear", [(3, 97, 45), (2, 5, 9)]),
    ("segmentation", "linear", [(3, 97, 45), (1, 3, 4)]),
    ("segmentation", "sr", [(3, 61, 130), (1, 29, 29)]),
    ("depth", "sr", [(3, 96, 160), (1, 32, 32)]),
    ("depth", "linear", [(2, 224, 64), (1, 32, 32)]),
]


@pytest.mark.parametrize("kind,attention,sizes", CASES, ids=[f"{k}-{a}" for k, a, _ in CASES])
def test_every_output_matches_pytorch_at_sizes_unlike_the_example(tmp_path, kind, attention, sizes):
    model = build(kind, attention)
    path = tmp_path / "m.onnx"
    # the export's own check is skipped: this test is the check, against the unmodified model
    result = export_onnx(model, path, exporter="torchscript", check_sizes=None)
    expected_names = ALL_STAGES if kind == "backbone" else [
        {"classifier": "logits", "segmentation": "logits", "encoder": "last_hidden_state",
         "depth": "predicted_depth"}[kind]]
    assert list(result.output_names) == expected_names and result.path == path
    assert result.pools_replaced == (4 if attention == "linear" else 0)

    proto = onnx.load(path)
    assert [(o.domain, o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [("", 18)]
    (inp,) = proto.graph.input
    assert inp.name == "pixel_values" and dims(inp) == ["batch", 3, "height", "width"]
    assert [o.name for o in proto.graph.output] == expected_names
    for out in proto.graph.output:
        shape = dims(out)
        assert shape[0] == "batch"
        if len(shape) >= 3:  # every spatial side is symbolic: a number there would be the example's size baked in
            assert all(isinstance(d, str) and d for d in shape[-2:]), (out.name, shape)

    with torch.no_grad():  # the sizes that do not depend on the input are declared as numbers
        fixed = {name: tuple(t.shape) for name, t in pytorch_outputs(model, torch.randn(1, 3, 64, 64)).items()}
    for out in proto.graph.output:
        shape = dims(out)
        assert shape[1:-2] == list(fixed[out.name][1:-2]) or len(shape) == 3, (out.name, shape)
        if len(shape) == 2:
            assert shape == ["batch", fixed[out.name][1]]

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    for batch, height, width in sizes:
        x = torch.randn(batch, 3, height, width, generator=gen)
        expected = pytorch_outputs(model, x)
        got = dict(zip(expected_names, session.run(None, {"pixel_values": x.numpy()})))
        assert got.keys() == expected.keys()
        for name, want in expected.items():
            assert got[name].shape == tuple(want.shape), (name, batch, height, width)
            assert relative_error(want, torch.from_numpy(got[name])) < 1e-4, (name, batch, height, width)


def test_a_depth_model_is_checked_at_multiples_of_32_by_default(tmp_path):
    from pvtv2.export import DEPTH_CHECK_SIZES

    result = export_onnx(build("depth", "linear"), tmp_path / "d.onnx", exporter="torchscript")
    assert [c.shape[0:1] + c.shape[2:] for c in result.checks] == list(DEPTH_CHECK_SIZES)
    assert result.ok and all(c.max_abs_diff < 1e-4 for c in result.checks)
    assert DEPTH_CHECK_SIZES[2][1] % 32 == 0 and DEPTH_CHECK_SIZES[2][2] % 32 == 0


def test_the_check_compares_outputs_after_the_first(tmp_path):
    """A backbone graph whose last feature map is wrong (exported from a model whose last norm differs) fails the
    check by that output's name; the first three maps agree."""
    model = build("backbone", "sr")
    wrong = build("backbone", "sr")
    with torch.no_grad():
        wrong.encoder.layers[3].layer_norm.weight.mul_(1.5)  # changes stage4's map only
    path = tmp_path / "wrong.onnx"
    export_onnx(wrong, path, exporter="torchscript", check_sizes=None)
    from pvtv2.export import check_onnx

    (check,) = check_onnx(path, model, sizes=[(2, 64, 96)])
    assert not check.ok
    assert [n for n, (d, t) in check.outputs.items() if d > t] == ["stage4"]
    assert all(check.outputs[n][0] < 1e-5 for n in ALL_STAGES[:3])


def test_opsets_in_range_are_written_as_asked_and_others_refused_before_writing(tmp_path):
    model = build("classifier", "linear")
    for opset in (14, 23):
        path = tmp_path / f"m{opset}.onnx"
        result = export_onnx(model, path, exporter="torchscript", opset=opset, check_sizes=[(2, 45, 70)])
        assert result.opset == opset and result.ok
        assert [o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx")] == [opset]
    before = sorted(p.name for p in tmp_path.iterdir())
    for bad, error in ((13, ValueError), (24, ValueError), (0, ValueError), (-5, ValueError), (True, TypeError),
                       ("18", TypeError)):
        with pytest.raises(error, match="opset"):
            export_onnx(model, tmp_path / "new" / "bad.onnx", opset=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_exporter_that_writes_another_opset_is_not_reported_as_the_one_asked(tmp_path, monkeypatch):
    """The dynamo exporter writes opset 18 where version conversion fails; the result must not claim the opset
    asked for."""
    from pvtv2 import export


    monkeypatch.setattr(export, "_export_once", onnx_export_writing_opset(18))
    with pytest.raises(ExportError, match="wrote opset 18, not the 16 asked for"):
        export_onnx(build("classifier", "sr"), tmp_path / "m.onnx", exporter="torchscript", opset=16)
    assert list(tmp_path.iterdir()) == []


def test_models_that_are_not_exported_are_refused_before_writing(tmp_path):
    from pvtv2 import PvtV2ForObjectDetection

    detector = PvtV2ForObjectDetection(PvtV2Config(**TINY_SHALLOW, num_labels=3)).eval()
    with pytest.raises(TypeError, match="detection model is not exported"):
        export_onnx(detector, tmp_path / "sub" / "d.onnx")
    with pytest.raises(TypeError, match="cannot export a Linear"):
        export_onnx(torch.nn.Linear(3, 3), tmp_path / "sub" / "l.onnx")
    assert list(tmp_path.iterdir()) == []


def test_check_sizes_the_model_cannot_run_are_refused_before_exporting(tmp_path, monkeypatch):
    from pvtv2 import export

    def never(*args):
        raise AssertionError("exported although a check size is illegal")

    monkeypatch.setattr(export, "_export_once", never)
    with pytest.raises(ValueError, match=r"check size 1x28x64: .*spatial-reduction ratio 8"):
        export_onnx(build("classifier", "sr"), tmp_path / "a" / "m.onnx", check_sizes=[(1, 64, 64), (1, 28, 64)])
    with pytest.raises(ValueError, match=r"check size 2x96x100: .*multiples of 32"):
        export_onnx(build("depth", "sr"), tmp_path / "a" / "d.onnx", check_sizes=[(2, 96, 100)])
    for bad in [[(0, 64, 64)], [(1, 64)], [(1, 64.0, 64)], []]:
        with pytest.raises(ValueError, match="check sizes"):
            export_onnx(build("classifier", "linear"), tmp_path / "a" / "m.onnx", check_sizes=bad)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure", ["mismatch", "onnxruntime", "interrupt"])
def test_a_failed_or_interrupted_export_leaves_the_previous_file_and_no_new_folder(tmp_path, monkeypatch, failure):
    """A stale file from an earlier export stays byte for byte and is never reported as this export; folders made
    for the output are removed; no temporary file remains."""
    from pvtv2 import export

    old = tmp_path / "old.onnx"
    old.write_bytes(b"previous export")
    real = export._export_once

    def export_then(wrapper, example, path, exporter, opset, names, shapes):
        real(wrapper, example, path, exporter, opset, names, shapes)
        if failure == "interrupt":
            raise KeyboardInterrupt  # Ctrl-C after the temporary file was written
        if failure == "onnxruntime":
            path.write_bytes(b"not an onnx graph")  # a graph onnxruntime refuses to load

    monkeypatch.setattr(export, "_export_once", export_then)
    monkeypatch.setattr(export, "_file_opset", lambda path: None)
    model = build("classifier", "sr")
    if failure == "mismatch":
        def corrupt(exportable):  # the graph is exported from these weights, the check compares with the originals
            with torch.no_grad():
                exportable.classifier.bias.add_(1.0)
            return 0

        monkeypatch.setattr(export, "_replace_adaptive_pools", corrupt)
    for target in (old, tmp_path / "new" / "deeper" / "m.onnx"):
        expected = KeyboardInterrupt if failure == "interrupt" else ExportError
        with pytest.raises(expected) as info:
            export_onnx(model, target, exporter="torchscript", check_sizes=[(1, 64, 64)])
        if failure == "mismatch":
            assert "max abs diff" in str(info.value)
        if failure == "onnxruntime":
            assert "onnxruntime cannot load the graph" in str(info.value)
        if expected is ExportError and target == old:
            assert "was left as it was" in str(info.value) and "\n" not in str(info.value)
    assert old.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.onnx"]


def test_a_half_precision_model_exports_float32_checked_against_itself(tmp_path):
    model = build("classifier", "linear").to(torch.bfloat16)
    result = export_onnx(model, tmp_path / "m.onnx", exporter="torchscript", check_sizes=[(2, 50, 70)])
    assert result.ok
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float)"
    x = torch.randn(2, 3, 50, 70)
    with torch.no_grad():
        expected = model.float()(x).logits
    (got,) = session.run(None, {"pixel_values": x.numpy()})
    assert relative_error(expected, torch.from_numpy(got)) < 1e-4


# --- the command line, in process (its errors are one line and status 2, before anything is loaded or written) ---


def cli(capsys, *args: str) -> tuple[int, str, str]:
    from pvtv2.cli import main

    status = main(["export", *args])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "model"
    build("classifier", "linear").save_pretrained(path)
    return path


@pytest.mark.parametrize("opset", ["13", "24", "0", "-5", "99"])
def test_cli_refuses_an_opset_out_of_range(tmp_path, capsys, saved, opset):
    status, out, err = cli(capsys, "-m", str(saved), "-o", str(tmp_path / "x" / "m.onnx"), "--opset", opset)
    assert status == 2 and out == ""
    assert err.strip().splitlines() == [f"pvtv2 export: error: --opset must be between 14 and 23, got {int(opset)}"]
    assert not (tmp_path / "x").exists()


def test_cli_hostile_paths_are_one_line_errors_leaving_nothing(tmp_path, capsys, saved):
    (tmp_path / "file.txt").write_text("a file")
    cases = [
        (["-m", str(saved), "-o", str(tmp_path / "file.txt" / "m.onnx")], "is not a folder"),
        (["-m", str(saved), "-o", str(tmp_path / "dir.onnx")], "is a folder"),
        (["-m", str(tmp_path / "missing"), "-o", str(tmp_path / "m.onnx")], "is not an existing file or folder"),
        (["-m", str(tmp_path / "file.txt"), "-o", str(tmp_path / "m.onnx")], "file.txt"),
    ]
    (tmp_path / "dir.onnx").mkdir()
    for args, message in cases:
        status, _, err = cli(capsys, *args)
        lines = [line for line in err.strip().splitlines() if not line.startswith(("INFO", "WARNING"))]
        assert status == 2 and len(lines) == 1 and lines[0].startswith("pvtv2 export: error: ") and message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.onnx", "file.txt", "model"]


def test_cli_export_of_a_segmentation_checkpoint_is_the_segmentation_model(tmp_path, capsys):
    model = build("segmentation", "linear")
    model.save_pretrained(tmp_path / "seg")
    status, out, err = cli(capsys, "-m", str(tmp_path / "seg"), "-o", str(tmp_path / "s.onnx"), "--json",
                           "--exporter", "torchscript", "--check-sizes", "1x40x56")
    assert status == 0, err
    info = json.loads(out)
    assert info["outputs"] == ["logits"] and info["random_weights"] is False
    session = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 50, 70)
    (got,) = session.run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        expected = model(x).logits  # (2, 3, 13, 18): the segmentation logits, not the encoder's map
    assert got.shape == tuple(expected.shape)
    assert relative_error(expected, torch.from_numpy(got)) < 1e-4


def test_cli_refuses_a_detection_checkpoint_in_one_line(tmp_path, capsys):
    from pvtv2 import PvtV2ForObjectDetection

    PvtV2ForObjectDetection(PvtV2Config(**TINY_SHALLOW, num_labels=3)).save_pretrained(tmp_path / "det")
    status, out, err = cli(capsys, "-m", str(tmp_path / "det"), "-o", str(tmp_path / "new" / "d.onnx"))
    lines = [line for line in err.strip().splitlines() if not line.startswith(("INFO", "WARNING"))]
    assert status == 2 and out == "" and len(lines) == 1
    assert lines[0].startswith("pvtv2 export: error: ") and "is a detection checkpoint" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det"]


@pytest.mark.slow
def test_cli_preset_says_random_weights_and_replaces_an_existing_file(tmp_path):
    out = tmp_path / "p.onnx"
    out.write_bytes(b"older export")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "-m", "pvtv2", "export", "--model", "pvt_v2_b0", "--output", str(out),
         "--exporter", "torchscript", "--check-sizes", "1x64x48"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights: pvt_v2_b0 is a preset name" in result.stdout
    assert "pvt_v2_b0 is a preset: using random weights" in result.stderr
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits"] and session.get_outputs()[0].shape[1] == 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.onnx"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["backbone", "depth"])
def test_dynamo_exports_every_output_at_other_sizes(tmp_path, kind):
    """The dynamo exporter on the multi-output backbone and the depth model (about a minute each)."""
    model = build(kind, "linear")
    sizes = [(3, 96, 160), (1, 32, 32)] if kind == "depth" else [(3, 97, 45), (1, 5, 9)]
    result = export_onnx(model, tmp_path / "m.onnx", exporter="dynamo", check_sizes=sizes)
    assert result.exporter == "dynamo" and result.ok and len(result.checks) == 2
    assert all(c.max_abs_diff <= 1e-4 * 10 for c in result.checks)
    names = [o.name for o in onnx.load(tmp_path / "m.onnx").graph.output]
    assert names == (ALL_STAGES if kind == "backbone" else ["predicted_depth"])
    assert len(result.checks[0].outputs) == len(names)


# --- checkpoint conversion: every layout, read back by timm and transformers ---


@pytest.mark.parametrize("linear", [False, True], ids=["sr", "linear"])
def test_convert_round_trips_every_layout_with_equal_logits(tmp_path, linear):
    """An original-layout .pth -> folder -> timm file -> transformers file -> original file again: each file is read
    by its own ecosystem (timm strictly, transformers from the folder) and by pvtv2, with the logits of the start."""
    import timm
    import transformers
    from safetensors.torch import load_file
    from timm.models.pvt_v2 import checkpoint_filter_fn

    from pvtv2 import convert_state_dict
    from pvtv2.export import convert_checkpoint

    def timm_model():
        return timm.models.pvt_v2.PyramidVisionTransformerV2(
            depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), mlp_ratios=(2, 2, 2, 2),
            num_classes=5, linear=linear).eval()

    torch.manual_seed(0)
    start = perturb_(timm_model(), scale=0.1)
    torch.save(convert_state_dict(start.state_dict(), "original"), tmp_path / "authors.pth")
    x = torch.randn(2, 3, 61, 83)
    with torch.no_grad():
        expected = start(x)

    def pvtv2_logits(source):
        with torch.no_grad():
            return PvtV2ForImageClassification.from_pretrained(source)(x).logits

    def timm_logits(state):
        model = timm_model()
        model.load_state_dict(state, strict=True)
        with torch.no_grad():
            return model(x)

    convert_checkpoint(tmp_path / "authors.pth", tmp_path / "folder")
    convert_checkpoint(tmp_path / "folder", tmp_path / "timm.safetensors", "timm")
    convert_checkpoint(tmp_path / "timm.safetensors", tmp_path / "hf.safetensors", "transformers")
    convert_checkpoint(tmp_path / "hf.safetensors", tmp_path / "again.pth", "original")
    for source in ("authors.pth", "folder", "timm.safetensors", "hf.safetensors", "again.pth"):
        assert relative_error(expected, pvtv2_logits(tmp_path / source)) < 1e-5, source
    torch.testing.assert_close(timm_logits(load_file(tmp_path / "timm.safetensors")), expected, rtol=0, atol=0)
    again = torch.load(tmp_path / "again.pth", weights_only=True)
    torch.testing.assert_close(timm_logits(checkpoint_filter_fn(again, timm_model())), expected, rtol=0, atol=0)
    original = convert_state_dict(start.state_dict(), "original")
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in original)
    hf = transformers.PvtV2ForImageClassification.from_pretrained(tmp_path / "folder").eval()
    with torch.no_grad():
        # transformers applies its layer_norm_eps (1e-6) where timm has 1e-5 in the patch embeddings: a small,
        # bounded difference
        assert relative_error(expected, hf(x).logits) < 1e-3
    config = transformers.PvtV2Config(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64],
                                      num_attention_heads=[1, 2, 3, 4], mlp_ratios=[2, 2, 2, 2], num_labels=5,
                                      linear_attention=linear, layer_norm_eps=1e-6)
    strict = transformers.PvtV2ForImageClassification(config).eval()
    strict.load_state_dict(load_file(tmp_path / "hf.safetensors"), strict=True)
    with torch.no_grad():
        assert relative_error(hf(x).logits, strict(x).logits) < 1e-6
