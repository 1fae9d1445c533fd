"""ONNX export and the ONNX Runtime serving path, hostile pass 26: graphs compared with transformers' model of the same
weights at sizes unlike the export's (odd sides, linear attention's last stage below 7x7, batches 1 and 5), ONNX
files that do not fit the model they are served under (another input size, channel count or dtype), and a third
party's export of transformers' classifier served by ``pvtv2 predict --onnx``.

References: transformers' ``PvtV2ForImageClassification`` with our weights, and our PyTorch model."""

from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_SHALLOW, hf_twin, perturb_, relative_error

from pvtv2 import PvtV2Config, PvtV2ForImageClassification
from pvtv2.export import export_onnx

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

LABELS = {0: "ant", 1: "bee", 2: "cow"}


def classifier(linear: bool = False, seed: int = 0, **changes) -> PvtV2ForImageClassification:
    torch.manual_seed(seed)
    config = PvtV2Config(**{**TINY_SHALLOW, "image_size": 64, "id2label": LABELS, "linear_attention": linear, **changes})
    return perturb_(PvtV2ForImageClassification(config), scale=0.1, seed=seed).eval()


class Logits(torch.nn.Module):
    """A model as a function from pixel values to its logits: what a third party exports."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values).logits


def export_plain(model: torch.nn.Module, path: Path, example: torch.Tensor, dynamic: bool) -> Path:
    """torch.onnx.export of ``model``'s logits, as anyone would write it (no pvtv2 code)."""
    axes = {"pixel_values": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(model), (example,), str(path), dynamo=False, opset_version=18,
                          input_names=["pixel_values"], output_names=["logits"], dynamic_axes=axes)
    return path


# (batch, height, width): odd sides; sides whose last stage is below 7x7 (linear attention's pooling then averages
# overlapping windows: 6 px -> 1x1, 100 px -> 4x4) and barely above it (250 px -> 8); batches 1 and 5
SIZES = [(1, 33, 61), (5, 33, 61), (5, 100, 100), (1, 6, 250), (1, 1, 1)]


@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_linear_attention_graph_equals_transformers_at_sizes_unlike_the_export(tmp_path, exporter):
    ours = classifier(linear=True)
    theirs = hf_twin(ours).eval()
    result = export_onnx(ours, tmp_path / "m.onnx", exporter=exporter, check_sizes=None)  # this test is the check
    assert result.exporter == exporter and result.pools_replaced == 4
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(3)
    for batch, height, width in SIZES:
        x = torch.randn(batch, 3, height, width, generator=gen)
        with torch.no_grad():
            want = theirs(x).logits
        (got,) = session.run(None, {"pixel_values": x.numpy()})
        assert got.shape == (batch, 3)
        assert relative_error(want, torch.from_numpy(got)) < 1e-5, (batch, height, width)


# ---------------------------------------------------------------------------------------------- serving
def run_here(capsys, *args: str) -> subprocess.CompletedProcess:
    from pvtv2.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    model = classifier(seed=4)
    model.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(3):  # three images at batch size 2: a full batch and a batch of one
        PIL.Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 52, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    return root, model


def predict(capsys, root: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_here(capsys, "predict", "--no-progress", "--model", str(root / "model"), str(root / "images"), "--json",
                    "--top-k", "3", "--batch-size", "2", *extra)


def test_an_export_of_transformers_classifier_serves_the_same_predictions(served, tmp_path, capsys):
    """A plain torch.onnx export of transformers' model with our weights (no pvtv2 code in it) served with --onnx
    gives the probabilities of our PyTorch model."""
    root, model = served
    path = export_plain(hf_twin(model).eval(), tmp_path / "hf.onnx", torch.randn(2, 3, 64, 64), dynamic=True)
    expected = predict(capsys, root)
    got = predict(capsys, root, "--runtime", "onnxruntime", "--onnx", str(path))
    assert expected.returncode == 0 and got.returncode == 0, (expected.stderr, got.stderr)
    for e, g in zip(json.loads(expected.stdout), json.loads(got.stdout), strict=True):
        assert [p["label"] for p in g["predictions"]] == [p["label"] for p in e["predictions"]]
        np.testing.assert_allclose([p["score"] for p in g["predictions"]], [p["score"] for p in e["predictions"]],
                                   rtol=0, atol=1e-5)


def test_an_onnx_file_for_another_channel_count_is_refused_when_loaded(served, tmp_path, capsys):
    """A one-channel model's export with the same three classes: the images are RGB. Used to end in onnxruntime's
    InvalidArgument traceback at the first batch."""
    root, _ = served
    gray = classifier(seed=5, num_channels=1)
    export_onnx(gray, tmp_path / "gray.onnx", check_sizes=None)
    result = predict(capsys, root, "--runtime", "onnxruntime", "--onnx", str(tmp_path / "gray.onnx"))
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stdout == ""
    assert "gray.onnx" in result.stderr and "1 channel" in result.stderr and "3" in result.stderr


def test_an_onnx_file_taking_float16_is_refused_when_loaded(served, tmp_path, capsys):
    root, model = served
    half = classifier(seed=4).half()
    export_plain(half, tmp_path / "half.onnx", torch.randn(1, 3, 64, 64).half(), dynamic=True)
    result = predict(capsys, root, "--runtime", "onnxruntime", "--onnx", str(tmp_path / "half.onnx"))
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stdout == ""
    assert "half.onnx" in result.stderr and "float16" in result.stderr


def test_an_onnx_file_of_fixed_input_size_runs_where_it_fits_and_says_why_not_elsewhere(served, tmp_path, capsys):
    """An export without dynamic axes (1x3x64x64, the model's size): batch size 1 runs and equals PyTorch; batch 2
    is one line naming the file, the shape fed and the shape the file takes (was onnxruntime's traceback)."""
    root, model = served
    path = export_plain(model, tmp_path / "static.onnx", torch.randn(1, 3, 64, 64), dynamic=False)
    expected = json.loads(predict(capsys, root).stdout)
    ok = predict(capsys, root, "--runtime", "onnxruntime", "--onnx", str(path), "--batch-size", "1")
    assert ok.returncode == 0, ok.stderr
    for e, g in zip(expected, json.loads(ok.stdout), strict=True):
        np.testing.assert_allclose([p["score"] for p in g["predictions"]], [p["score"] for p in e["predictions"]],
                                   rtol=0, atol=1e-5)
    result = predict(capsys, root, "--runtime", "onnxruntime", "--onnx", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "static.onnx" in result.stderr and "2x3x64x64" in result.stderr and "1x3x64x64" in result.stderr


def test_an_onnx_file_of_another_model_with_the_same_classes_is_refused_when_loaded(served, tmp_path, capsys):
    """Another checkpoint of the same architecture and classes (another seed: an older epoch, another run): same
    input, same output, same class count. Served under --model, its logits went out under the model's labels without
    a word. Loading compares it with the model on one input."""
    root, model = served
    other = classifier(seed=9)
    export_onnx(other, tmp_path / "other.onnx", check_sizes=None)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the two models do differ: a check that passes them both would be no check
        assert relative_error(model(x).logits, other(x).logits) > 0.5
    result = predict(capsys, root, "--runtime", "onnxruntime", "--onnx", str(tmp_path / "other.onnx"))
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stdout == ""
    assert "other.onnx" in result.stderr and str(root / "model") in result.stderr
    assert "not an export of" in result.stderr

    # the model's own export, and transformers' export of its weights, pass the same check (see the test above)
    export_onnx(model, tmp_path / "own.onnx", check_sizes=None)
    assert predict(capsys, root, "--runtime", "onnxruntime", "--onnx", str(tmp_path / "own.onnx")).returncode == 0


def test_the_first_torchscript_export_in_a_process_without_a_check_writes_a_graph(tmp_path, monkeypatch):
    """In a fresh process (no forward pass before the export: --no-check), the first linear-attention export traced
    the oneDNN capability probe of the training GEMM's switch into its graph, and the TorchScript exporter failed
    with an internal assert ("outputs_[i]->uses().empty()"; auto then fell back to the slow dynamo exporter). A fresh
    process is what an empty capability cache is; the switch set to oneDNN makes the probe run on any CPU (AMD CPUs
    with AVX-512 take it by default)."""
    import pvtv2.fast.cpu as fast_cpu
    from pvtv2.fast.train import train_gemm

    monkeypatch.setattr(fast_cpu, "_CAPABILITY", {})
    ours = classifier(linear=True, seed=2)
    with train_gemm("onednn"):
        result = export_onnx(ours, tmp_path / "m.onnx", exporter="torchscript", check_sizes=None)
    assert result.exporter == "torchscript" and result.attempts == ["torchscript: ok"]
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 33, 61, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf_twin(ours).eval()(x).logits
    (got,) = session.run(None, {"pixel_values": x.numpy()})
    assert relative_error(want, torch.from_numpy(got)) < 1e-5


def test_an_output_name_of_255_characters_is_written(tmp_path):
    """The longest name a folder takes: the temporary file beside it (".NAME.tmp") was 5 characters longer, and both
    exporters failed with "File name too long" naming the temporary file."""
    model = classifier(seed=6)
    output = tmp_path / ("m" * 250 + ".onnx")
    result = export_onnx(model, output, exporter="torchscript", check_sizes=[(1, 64, 64)])
    assert result.path == output and output.is_file() and sorted(tmp_path.iterdir()) == [output]
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 45, 70, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x).logits
    assert relative_error(want, torch.from_numpy(session.run(None, {"pixel_values": x.numpy()})[0])) < 1e-5


def test_an_output_that_cannot_be_written_is_refused_before_any_exporter_runs(tmp_path, monkeypatch):
    """A name no folder takes: each exporter traced the model (dynamo for tens of seconds) before the write failed,
    and the error named the temporary file. Now a WriteError naming the output, and no exporter runs."""
    import pvtv2.export as export
    from pvtv2.fileio import WriteError

    calls = []
    monkeypatch.setattr(export, "_export_once", lambda *args: calls.append(args[3]))
    output = tmp_path / "new" / ("m" * 300 + ".onnx")
    with pytest.raises(WriteError, match="m" * 300 + r"\.onnx'.*File name too long"):
        export_onnx(classifier(seed=6), output, check_sizes=None)
    assert calls == [] and list(tmp_path.iterdir()) == []  # nor the folder made for it


def check_sizes(*values: str):
    from pvtv2.cli import build_parser

    return build_parser().parse_args(["export", "-m", "pvt_v2_b0", "-o", "m.onnx", "--check-sizes", *values]).check_sizes


def test_check_sizes_parse_as_written():
    assert check_sizes("64", "160x192", "2X48X80", "5x33x61") == [(1, 64, 64), (1, 160, 192), (2, 48, 80), (5, 33, 61)]


@pytest.mark.parametrize("text", ["1_28", "2x6_4x64", "+64", "\u0663\u0662", "64x", "x64", "2x3x4x5", "0x64", "1e2", ""])
def test_check_sizes_that_are_not_sizes_are_refused(text, capsys):
    """Python's int() reads "1_28" as 128 and Arabic-Indic digits as numbers: not what BxHxW means."""
    with pytest.raises(SystemExit) as exit_info:
        check_sizes(text)
    assert exit_info.value.code == 2 and "expected a size like 224, 160x192 or 2x160x192" in capsys.readouterr().err


@pytest.mark.parametrize("damage, message", [
    ("truncated", "Protobuf parsing failed"),
    ("empty", "No graph was found"),
    ("text", "Protobuf parsing failed"),
    ("folder", "is a folder, not a file"),
    ("missing", "ONNX file not found"),
])
def test_a_damaged_onnx_file_is_one_line_naming_it(served, tmp_path, capsys, damage, message):
    root, model = served
    path = tmp_path / "damaged.onnx"
    if damage in ("truncated", "empty"):
        export_onnx(model, tmp_path / "whole.onnx", check_sizes=None)
        data = (tmp_path / "whole.onnx").read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    elif damage == "text":
        path.write_text("not an ONNX graph")
    elif damage == "folder":
        path.mkdir()
    result = predict(capsys, root, "--runtime", "onnxruntime", "--onnx", str(path))
    lines = [line for line in result.stderr.splitlines() if not line.startswith(("INFO", "WARNING"))]
    assert result.returncode == 2 and result.stdout == "" and len(lines) == 1
    assert lines[0].startswith("pvtv2 predict: error: ") and str(path) in lines[0] and message in lines[0]


def test_an_int8_quantized_export_of_the_model_is_served(served, tmp_path, capsys):
    """The check against another model leaves room for a quantized graph (onnxruntime's dynamic int8 quantization:
    a few percent off the float32 logits)."""
    quantization = pytest.importorskip("onnxruntime.quantization")
    root, model = served
    export_onnx(model, tmp_path / "f32.onnx", check_sizes=None)
    quantization.quantize_dynamic(str(tmp_path / "f32.onnx"), str(tmp_path / "int8.onnx"),
                                  weight_type=quantization.QuantType.QInt8)
    expected = json.loads(predict(capsys, root).stdout)
    result = predict(capsys, root, "--runtime", "onnxruntime", "--onnx", str(tmp_path / "int8.onnx"))
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    for e, g in zip(expected, got, strict=True):
        scores = {p["label"]: p["score"] for p in g["predictions"]}
        np.testing.assert_allclose([scores[p["label"]] for p in e["predictions"]],
                                   [p["score"] for p in e["predictions"]], atol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_on_the_gpu_exports_and_is_checked_on_the_cpu(tmp_path):
    """The references and the example were made on the CPU for a model left on the GPU: every export of a CUDA
    model failed, saying the model "does not run" at the check sizes. The graph is float32 on the CPU either way."""
    model = classifier(linear=True, seed=8)
    x = torch.randn(5, 3, 33, 61, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x).logits
    result = export_onnx(model.cuda(), tmp_path / "m.onnx", exporter="torchscript", check_sizes=[(1, 64, 64)])
    assert result.ok and next(model.parameters()).is_cuda  # the caller's model stays where it was
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert relative_error(want, torch.from_numpy(session.run(None, {"pixel_values": x.numpy()})[0])) < 1e-5
