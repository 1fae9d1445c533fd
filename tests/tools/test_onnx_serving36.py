"""ONNX export and the ONNX Runtime serving path, pass 36: every exported kind from B0-like and B2-Linear-like tiny
configs (reference path and frozen fast path) against onnxruntime at odd sizes and batches; the export's own
comparison made to disagree on purpose; checkpoints stored in float16 / bfloat16 / float64 in each layout;
``pvtv2 predict --runtime onnxruntime`` against PyTorch's predictions (one label and many), and hostile .onnx files
given to it (truncated, not ONNX, another network, external data missing or outside the model's folder, a fixed-size
export fed another size).

References: the PyTorch model's outputs (fast path on and off), onnxruntime run directly, and hand-made offsets."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_SHALLOW, perturb_

import pvtv2.fast as fast
from pvtv2 import PvtV2Backbone, PvtV2Config, PvtV2ForDepthEstimation, PvtV2ForImageClassification
from pvtv2 import PvtV2ForSemanticSegmentation
from pvtv2.export import export_onnx
from pvtv2.weights.layouts import convert_state_dict

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

B0 = dict(TINY_SHALLOW, sr_ratios=[8, 4, 2, 1])
B2_LINEAR = dict(TINY_SHALLOW, depths=[1, 2, 1, 1], linear_attention=True)


def run_here(capsys, *args: str) -> subprocess.CompletedProcess:
    from pvtv2.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


def session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------------------ export vs PyTorch
@pytest.mark.parametrize("arch, cls, frozen", [
    ("b0", PvtV2ForImageClassification, True),
    ("b2lin", PvtV2ForImageClassification, False),
    ("b0", PvtV2Backbone, False),
    ("b2lin", PvtV2ForSemanticSegmentation, True),
])
def test_an_export_computes_what_both_pytorch_paths_do_at_odd_sizes_and_batches(tmp_path, arch, cls, frozen):
    """Exported at 64x64 (batch 2), run at 33x47, 224x160 and 32x32 with batches 1 and 3: every output within 1e-4
    (relative to its largest value) of the PyTorch model's, on the fast path (frozen or not) and the reference path.
    B2-Linear's last stage is 2x2 at 33x47 and 7x5 at 224x160: its 7x7 pooling averages overlapping windows there."""
    torch.manual_seed(7)
    extra = {"out_features": ["stage1", "stage2", "stage3", "stage4"]} if cls is PvtV2Backbone else {}
    config = PvtV2Config(**(B0 if arch == "b0" else B2_LINEAR), image_size=64, num_labels=4, **extra)
    model = perturb_(cls(config), scale=0.1, seed=7).eval()
    if frozen:
        fast.freeze(model)
    result = export_onnx(model, tmp_path / "m.onnx", exporter="torchscript", check_sizes=None)  # checked here
    graph = session(result.path)
    gen = torch.Generator().manual_seed(36)
    for batch, height, width in [(1, 33, 47), (3, 33, 47), (3, 224, 160), (1, 32, 32)]:
        x = torch.randn(batch, 3, height, width, generator=gen)
        got = graph.run(None, {"pixel_values": x.numpy()})
        for enabled in (True, False):
            with fast.fast_path(enabled), torch.no_grad():
                out = model(x, return_dict=True)
            want = list(out.feature_maps) if cls is PvtV2Backbone else [out.logits]
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert g.shape == tuple(w.shape)
                assert float((torch.from_numpy(g) - w).abs().max()) <= 1e-4 * float(w.abs().max()), (
                    batch, height, width, enabled)


def test_a_depth_export_is_checked_at_multiples_of_32_and_refuses_an_odd_check_size(tmp_path):
    """The depth decoder runs at multiples of 32 only (docs): 224x160 at batch 3 matches PyTorch; a 33x47 check size
    is refused before anything is written, naming the size, instead of being compared (or served) with wrong
    numbers."""
    torch.manual_seed(3)
    model = perturb_(PvtV2ForDepthEstimation(PvtV2Config(**B0, image_size=64)), scale=0.1, seed=3).eval()
    with pytest.raises(ValueError, match="33x47"):
        export_onnx(model, tmp_path / "odd.onnx", check_sizes=[(1, 33, 47)])
    assert list(tmp_path.iterdir()) == []
    result = export_onnx(model, tmp_path / "d.onnx", check_sizes=[(3, 224, 160)])
    assert result.ok and [c.shape for c in result.checks] == [(3, 3, 224, 160)]
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    (got,) = session(result.path).run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        want = model(x).predicted_depth
    assert got.shape == (1, 32, 32)
    assert float((torch.from_numpy(got) - want).abs().max()) <= 1e-4 * float(want.abs().max())


# ------------------------------------------------------------------------------------------- the export's own check
def export_shifted(delta: float):
    """A stand-in for ``pvtv2.export._export_once`` that exports the model with class 0's bias raised by ``delta``:
    the graph's logit 0 is then exactly ``delta`` above PyTorch's, and every other output equal."""
    import pvtv2.export as export

    real = export._export_once

    def export_once(wrapper, example, path, exporter, opset, names, shapes):
        with torch.no_grad():
            wrapper.model.classifier.bias[0] += delta
        try:
            real(wrapper, example, path, exporter, opset, names, shapes)
        finally:
            with torch.no_grad():
                wrapper.model.classifier.bias[0] -= delta

    return export_once


def tiny_classifier(seed: int = 0, **changes) -> PvtV2ForImageClassification:
    torch.manual_seed(seed)
    config = PvtV2Config(**{**B0, "image_size": 64, "num_labels": 3, **changes})
    return perturb_(PvtV2ForImageClassification(config), scale=0.1, seed=seed).eval()


def test_the_reported_difference_is_the_one_put_into_the_graph(tmp_path, monkeypatch):
    """A logit offset of 0.003 is reported as the max abs difference at every check size (within float32 rounding),
    and decides pass or fail against the tolerance as stated: it fails at rtol 1e-4, passes at rtol 0.5."""
    import pvtv2.export as export

    monkeypatch.setattr(export, "_export_once", export_shifted(0.003))
    model = tiny_classifier()
    sizes = [(1, 64, 64), (3, 33, 47)]
    with pytest.raises(export.ExportError, match="does not match PyTorch") as caught:
        export_onnx(model, tmp_path / "strict.onnx", exporter="torchscript", check_sizes=sizes)
    assert "max abs diff 0.003" in str(caught.value) and list(tmp_path.iterdir()) == []
    result = export_onnx(model, tmp_path / "loose.onnx", exporter="torchscript", check_sizes=sizes, rtol=0.5)
    assert result.ok and len(result.checks) == 2
    for check in result.checks:
        assert abs(check.max_abs_diff - 0.003) < 1e-5, check
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    (got,) = session(result.path).run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        want = model(x).logits
    np.testing.assert_allclose(got - want.numpy(), [[0.003, 0, 0]] * 2, atol=2e-6)


def test_cli_export_that_disagrees_with_pytorch_exits_non_zero_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import pvtv2.export as export

    tiny_classifier().save_pretrained(tmp_path / "model")
    monkeypatch.setattr(export, "_export_once", export_shifted(0.05))
    out = tmp_path / "out" / "m.onnx"
    result = run_here(capsys, "export", "--model", str(tmp_path / "model"), "--output", str(out), "--exporter",
                      "torchscript", "--check-sizes", "64", "--json")
    assert result.returncode != 0 and result.stdout == "" and "Traceback" not in result.stderr
    assert "does not match PyTorch" in result.stderr and "0.05" in result.stderr
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------------- stored precisions
@pytest.mark.parametrize("dtype, layout", [(torch.float16, "timm"), (torch.bfloat16, "original"),
                                           (torch.float64, None)])
def test_a_checkpoint_stored_in_another_precision_exports_its_float32_values(tmp_path, capsys, dtype, layout):
    """A B2-Linear classifier stored in float16 / bfloat16 / float64 (timm .pth, authors' .pth, save_pretrained
    folder) exports a float32 graph whose logits are those of a float32 model holding the stored values."""
    model = tiny_classifier(seed=5, **B2_LINEAR, num_labels=6)
    stored = {k: v.to(dtype) for k, v in model.state_dict().items()}
    reference = PvtV2ForImageClassification(model.config).eval()
    reference.load_state_dict({k: v.float() for k, v in stored.items()})
    if layout is None:
        source = tmp_path / "folder"
        model.to(dtype).save_pretrained(source)
    else:
        source = tmp_path / f"{layout}.pth"
        torch.save(convert_state_dict(stored, layout), source)
    out = tmp_path / "m.onnx"
    result = run_here(capsys, "export", "--model", str(source), "--output", str(out), "--check-sizes", "1x33x47",
                      "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["adaptive_pools_replaced"] == sum(B2_LINEAR["depths"])
    graph = session(out)
    assert graph.get_inputs()[0].type == "tensor(float)"
    x = torch.randn(3, 3, 45, 29, generator=torch.Generator().manual_seed(1))
    (got,) = graph.run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        want = reference(x).logits
    assert got.shape == (3, 6)
    assert float((torch.from_numpy(got) - want).abs().max()) <= 1e-4 * float(want.abs().max())


# ----------------------------------------------------------------------------------------------------- serving
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served36")
    model = tiny_classifier(seed=4, num_labels=5)
    model.save_pretrained(root / "model")
    rng = np.random.default_rng(36)
    (root / "images").mkdir()
    for i in range(3):
        PIL.Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 52, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    export_onnx(model, root / "good.onnx", exporter="torchscript", check_sizes=[(1, 64, 64)])
    return root, model


def predict(capsys, root: Path, model: Path | None = None, *extra: str) -> subprocess.CompletedProcess:
    return run_here(capsys, "predict", "--no-progress", "--model", str(model or root / "model"), str(root / "images"),
                    "--json", "--top-k", "3", "--batch-size", "2", *extra)


def same_predictions(expected: str, got: str) -> None:
    for e, g in zip(json.loads(expected), json.loads(got), strict=True):
        assert [p["label"] for p in g["predictions"]] == [p["label"] for p in e["predictions"]]
        np.testing.assert_allclose([p["score"] for p in g["predictions"]], [p["score"] for p in e["predictions"]],
                                   rtol=0, atol=1e-5)


def test_onnxruntime_predictions_are_pytorchs(served, capsys):
    root, _ = served
    expected = predict(capsys, root)
    got = predict(capsys, root, None, "--runtime", "onnxruntime", "--onnx", str(root / "good.onnx"))
    assert expected.returncode == 0 and got.returncode == 0, got.stderr
    same_predictions(expected.stdout, got.stdout)


def test_a_one_label_model_is_served_with_its_one_label_at_probability_one(served, tmp_path, capsys):
    root, _ = served
    tiny_classifier(seed=9, num_labels=1).save_pretrained(tmp_path / "one")
    export_onnx(PvtV2ForImageClassification.from_pretrained(tmp_path / "one"), tmp_path / "one.onnx",
                check_sizes=[(1, 64, 64)])
    expected = predict(capsys, root, tmp_path / "one")
    got = predict(capsys, root, tmp_path / "one", "--runtime", "onnxruntime", "--onnx", str(tmp_path / "one.onnx"))
    assert got.returncode == 0, got.stderr
    same_predictions(expected.stdout, got.stdout)
    assert all(len(r["predictions"]) == 1 and r["predictions"][0]["score"] == pytest.approx(1.0)
               for r in json.loads(got.stdout))


def test_an_export_with_its_weights_in_a_data_file_of_its_folder_is_served(served, tmp_path, capsys):
    """The external-data check refuses only what is missing or outside: data files in the model's folder and in a
    subfolder of it are served with PyTorch's predictions."""
    root, _ = served
    expected = predict(capsys, root)
    for location in ("m.data", "weights/m.data"):
        folder = tmp_path / location.replace("/", "_")
        (folder / "weights").mkdir(parents=True)
        onnx.save(onnx.load(root / "good.onnx"), folder / "m.onnx", save_as_external_data=True, location=location,
                  size_threshold=0)
        assert (folder / location).is_file()
        got = predict(capsys, root, None, "--runtime", "onnxruntime", "--onnx", str(folder / "m.onnx"))
        assert got.returncode == 0, got.stderr
        same_predictions(expected.stdout, got.stdout)


def test_an_export_whose_files_are_links_into_a_blob_store_is_served(served, tmp_path, capsys):
    """As huggingface_hub lays a download out: snapshots/<rev>/m.onnx and its data file are links to blobs/ outside
    the snapshot's folder. The data file is where the graph says (beside it); where the link leads is the cache's."""
    root, _ = served
    expected = predict(capsys, root)
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "0123abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    onnx.save(onnx.load(root / "good.onnx"), blobs / "m.onnx", save_as_external_data=True, location="m.data",
              size_threshold=0)
    (blobs / "m.onnx").rename(blobs / "f00d")
    (blobs / "m.data").rename(blobs / "beef")
    (snapshot / "m.onnx").symlink_to("../../blobs/f00d")
    (snapshot / "m.data").symlink_to("../../blobs/beef")
    got = predict(capsys, root, None, "--runtime", "onnxruntime", "--onnx", str(snapshot / "m.onnx"))
    assert got.returncode == 0, got.stderr
    same_predictions(expected.stdout, got.stdout)


def test_an_export_that_declares_no_shapes_is_served(served, tmp_path, capsys):
    """An export whose input and output declare no shape, not even a rank (onnxruntime reports both as []): the sizes
    are free, so the file runs, and gives PyTorch's predictions. It was refused as taking pixel values of 0
    dimensions."""
    root, _ = served
    proto = onnx.load(root / "good.onnx")
    for value in [*proto.graph.input, *proto.graph.output]:
        value.type.tensor_type.ClearField("shape")
    del proto.graph.value_info[:]
    onnx.save(proto, tmp_path / "bare.onnx")
    bare = session(tmp_path / "bare.onnx")
    assert bare.get_inputs()[0].shape == []
    expected = predict(capsys, root)
    got = predict(capsys, root, None, "--runtime", "onnxruntime", "--onnx", str(tmp_path / "bare.onnx"))
    assert got.returncode == 0, got.stderr
    same_predictions(expected.stdout, got.stdout)


def graph_file(path: Path, inputs, outputs, nodes, initializers=()) -> Path:
    from onnx import helper

    graph = helper.make_graph(nodes, "other", inputs, outputs, initializer=list(initializers))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 8
    onnx.save(proto, path)
    return path


def hostile_file(kind: str, root: Path, tmp_path: Path) -> tuple[Path, str]:
    """An .onnx file of ``kind`` and a phrase its error must hold."""
    from onnx import TensorProto, helper

    good = root / "good.onnx"
    info = helper.make_tensor_value_info
    if kind == "truncated":
        path = tmp_path / "cut.onnx"
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        return path, "cannot load"
    if kind == "not onnx":
        path = tmp_path / "picture.onnx"
        shutil.copy(root / "images" / "0.png", path)
        return path, "cannot load"
    if kind == "other input name":
        return graph_file(tmp_path / "other.onnx", [info("input", TensorProto.FLOAT, ["b", 3, "h", "w"])],
                          [info("logits", TensorProto.FLOAT, ["b", 5])],
                          [helper.make_node("ReduceMean", ["input"], ["logits"], keepdims=0)]), "'input'"
    if kind == "other channels":
        return graph_file(tmp_path / "gray.onnx", [info("pixel_values", TensorProto.FLOAT, ["b", 1, "h", "w"])],
                          [info("logits", TensorProto.FLOAT, ["b", 1])],
                          [helper.make_node("GlobalAveragePool", ["pixel_values"], ["p"]),
                           helper.make_node("Flatten", ["p"], ["logits"])]), "1 channel"
    if kind == "other classes":
        return graph_file(tmp_path / "pool.onnx", [info("pixel_values", TensorProto.FLOAT, ["b", 3, "h", "w"])],
                          [info("logits", TensorProto.FLOAT, ["b", "k"])],
                          [helper.make_node("GlobalAveragePool", ["pixel_values"], ["p"]),
                           helper.make_node("Flatten", ["p"], ["logits"])]), "3 classes"
    if kind == "dense output":
        return graph_file(tmp_path / "dense.onnx", [info("pixel_values", TensorProto.FLOAT, ["b", 3, "h", "w"])],
                          [info("logits", TensorProto.FLOAT, ["b", 3, "h", "w"])],
                          [helper.make_node("Identity", ["pixel_values"], ["logits"])]), "4 dimensions"
    if kind == "undeclared dense output":  # no shapes declared: the rank is only known when it runs
        return graph_file(tmp_path / "bare.onnx", [info("pixel_values", TensorProto.FLOAT, None)],
                          [info("logits", TensorProto.FLOAT, None)],
                          [helper.make_node("Identity", ["pixel_values"], ["logits"])]), "4 dimensions"
    proto = onnx.load(good)
    if kind == "external data missing":
        folder = tmp_path / "missing"
        folder.mkdir()
        onnx.save(proto, folder / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
        (folder / "m.data").unlink()
        return folder / "m.onnx", "'m.data', which does not exist"
    if kind == "external data outside":
        inner = tmp_path / "outer" / "inner"
        inner.mkdir(parents=True)
        onnx.save(proto, inner / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
        (inner / "m.data").rename(inner.parent / "m.data")
        pointer = onnx.load(inner / "m.onnx", load_external_data=False)
        for tensor in pointer.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = "'../m.data', which lies outside"
        onnx.save(pointer, inner / "m.onnx")
        return inner / "m.onnx", "'../m.data', which lies outside"
    if kind == "damaged weights":  # an embedded tensor shorter than its shape: onnxruntime logged it to fd 2 too
        proto = onnx.load(good)
        bias = next(t for t in proto.graph.initializer if t.name.endswith("classifier.bias"))
        bias.raw_data = bias.raw_data[:8]
        onnx.save(proto, tmp_path / "short.onnx")
        return tmp_path / "short.onnx", "classifier.bias"
    if kind == "external data truncated":
        onnx.save(proto, tmp_path / "cut.onnx", save_as_external_data=True, location="cut.data", size_threshold=0)
        data = tmp_path / "cut.data"
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
        return tmp_path / "cut.onnx", "'cut.data', which holds"
    if kind == "external data absolute":
        onnx.save(proto, tmp_path / "abs.onnx", save_as_external_data=True, location="abs.data", size_threshold=0)
        pointer = onnx.load(tmp_path / "abs.onnx", load_external_data=False)
        for tensor in pointer.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = str(tmp_path / "abs.data")
        onnx.save(pointer, tmp_path / "abs.onnx")
        return tmp_path / "abs.onnx", "abs.data', which is not a path relative"
    assert kind == "fixed size"
    path = tmp_path / "fixed.onnx"
    model = PvtV2ForImageClassification.from_pretrained(root / "model").eval()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values).logits

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(), (torch.randn(1, 3, 96, 96),), str(path), dynamo=False, opset_version=18,
                          input_names=["pixel_values"], output_names=["logits"])
    return path, "1x3x96x96"


@pytest.mark.parametrize("kind", ["truncated", "not onnx", "other input name", "other channels", "other classes",
                                  "dense output", "undeclared dense output", "external data missing", "external data outside",
                                  "external data absolute", "external data truncated", "damaged weights",
                                  "fixed size"])
def test_a_hostile_onnx_file_is_one_line_naming_it_and_the_problem(served, tmp_path, capfd, kind):
    """capfd: onnxruntime's own log lines go to file descriptor 2, past sys.stderr."""
    root, _ = served
    path, phrase = hostile_file(kind, root, tmp_path)
    result = predict(capfd, root, None, "--runtime", "onnxruntime", "--onnx", str(path))
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert path.name in result.stderr and phrase in result.stderr, result.stderr


@pytest.mark.slow  # the first dynamo export in a process: about 35 s on 2 cores
def test_cli_export_json_with_the_dynamo_exporter_is_json_alone(tmp_path, capsys):
    """torch's dynamo exporter prints its progress ("[torch.onnx] Obtain model graph ...") to stdout unless told not
    to: ``pvtv2 export --json`` printed eight such lines before the JSON, which no JSON reader then parsed."""
    tiny_classifier().save_pretrained(tmp_path / "model")
    result = run_here(capsys, "export", "--model", str(tmp_path / "model"), "--output", str(tmp_path / "m.onnx"),
                      "--exporter", "dynamo", "--check-sizes", "2x33x47", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["exporter"] == "dynamo" and info["checks"][0]["ok"] and info["checks"][0]["max_abs_diff"] < 1e-4
