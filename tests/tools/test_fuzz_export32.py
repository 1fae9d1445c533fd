"""ONNX export of random tiny models (1 to 4 stages of 0 to 2 blocks, odd patch sizes and strides, spatial reduction
or linear attention, any activation, 1 to 4 input channels, every exported model kind, opsets 14 to 23), run in
onnxruntime at random batches and sizes unlike the export's and compared with the PyTorch model on the same inputs;
the graph's declared input and outputs must be those docs/commands.md names, with the fixed sizes declared. Check
sizes the PyTorch model cannot run are refused before anything is written."""

from __future__ import annotations

import errno
import random
import warnings

import pytest
import torch
from conftest import MODEL_KINDS, onnx_export_writing_opset, random_weights_

from pvtv2 import PvtV2Backbone, PvtV2Config, PvtV2ForDepthEstimation, PvtV2Model
from pvtv2.export import export_onnx
from pvtv2.fileio import WriteError
from pvtv2.models.activations import ACTIVATIONS

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def random_model(rng: random.Random, seed: int) -> tuple[str, torch.nn.Module]:
    """A model kind and a model of random tiny configuration that runs at its own image_size."""
    kind = rng.choice(sorted(MODEL_KINDS))
    while True:
        n = rng.randint(1, 4)
        heads = [rng.randint(1, 3) for _ in range(n)]
        cfg = dict(num_encoder_blocks=n, depths=[rng.randint(0, 2) for _ in range(n)], num_attention_heads=heads,
                   hidden_sizes=[h * rng.choice([4, 8]) for h in heads], mlp_ratios=[rng.choice([1, 1.5, 2])] * n,
                   patch_sizes=[rng.randint(1, 7) for _ in range(n)], strides=[rng.randint(1, 4) for _ in range(n)],
                   sr_ratios=[rng.randint(1, 4) for _ in range(n)], linear_attention=rng.random() < 0.4,
                   hidden_act=rng.choice(sorted(ACTIVATIONS)), num_channels=rng.randint(1, 4),
                   num_labels=rng.randint(1, 5), image_size=rng.choice([24, 32, 40, (32, 48)]))
        if kind == "backbone":
            cfg["out_features"] = sorted(rng.sample([f"stage{i + 1}" for i in range(n)], rng.randint(1, n)))
        if kind == "depth":  # GLPN's decoder needs each stage half the size of the one before
            cfg.update(strides=[4, 2, 2, 2][:n], patch_sizes=[rng.choice([3, 5, 7]), 3, 3, 3][:n], image_size=32)
        model = random_weights_(MODEL_KINDS[kind](PvtV2Config(**cfg)), seed).eval()
        try:
            outputs(model, torch.zeros(2, cfg["num_channels"], *model.config.image_size))
        except ValueError:  # too small for its own image_size (export_onnx refuses it, tested elsewhere)
            continue
        return kind, model


def outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(x)
    if isinstance(model, PvtV2Backbone):
        return list(out.feature_maps)
    if isinstance(model, PvtV2ForDepthEstimation):
        return [out.predicted_depth]
    if isinstance(model, PvtV2Model):
        return [out.last_hidden_state]
    return [out.logits]


def dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


# What docs/commands.md ("What is exported") names each model kind's outputs.
OUTPUT_NAMES = {"classifier": ["logits"], "segmentation": ["logits"], "depth": ["predicted_depth"],
                "encoder": ["last_hidden_state"]}


@pytest.mark.parametrize("seed", range(10))
def test_a_random_model_exports_a_graph_that_computes_what_pytorch_does(tmp_path, seed):
    rng = random.Random(seed)
    kind, model = random_model(rng, seed)
    config = model.config
    opset = rng.randint(14, 23)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export_onnx(model, path, opset=opset, exporter="torchscript", check_sizes=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    graph = onnx.load(path)
    names = config.out_features if kind == "backbone" else OUTPUT_NAMES[kind]
    assert [o.name for o in graph.graph.output] == list(result.output_names) == names
    assert [i.name for i in graph.graph.input] == ["pixel_values"]
    assert dims(graph.graph.input[0]) == ["batch", config.num_channels, "height", "width"]
    assert next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == opset
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    compared = 0
    for _ in range(4):
        batch, height, width = rng.randint(1, 3), rng.randint(1, 90), rng.randint(1, 90)
        if kind == "depth":
            height, width = 32 * rng.randint(1, 3), 32 * rng.randint(1, 3)
        x = torch.randn(batch, config.num_channels, height, width, generator=torch.Generator().manual_seed(height))
        try:
            want = outputs(model, x)
        except ValueError:  # a size the model itself does not run at (too small for a spatial reduction)
            continue
        got = session.run(None, {"pixel_values": x.numpy()})
        compared += 1
        for name, declared, expected, actual in zip(names, graph.graph.output, want, got):
            actual = torch.from_numpy(actual)
            assert actual.shape == expected.shape, (name, (batch, height, width))
            # every declared size is the batch, a named spatial size, or the one the output has (its channels)
            assert dims(declared)[0] == "batch"
            assert all(isinstance(d, str) or d == s for d, s in zip(dims(declared), expected.shape)), name
            assert (actual - expected).abs().max() <= 1e-5 + 1e-4 * expected.abs().max(), (name, (batch, height, width))
    assert compared or kind != "classifier" or not config.linear_attention  # linear attention runs at any size


@pytest.mark.parametrize("seed", range(100, 104))
def test_check_sizes_the_model_cannot_run_are_refused_before_anything_is_written(tmp_path, seed):
    rng = random.Random(seed)
    _, model = random_model(rng, seed)
    channels = model.config.num_channels
    sizes = [(rng.randint(1, 3), rng.randint(1, 40), rng.randint(1, 40)) for _ in range(3)]
    runs = []
    for b, h, w in sizes:
        try:
            outputs(model, torch.zeros(b, channels, h, w))
            runs.append(True)
        except ValueError:
            runs.append(False)
    path = tmp_path / "out" / "m.onnx"
    if all(runs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert export_onnx(model, path, exporter="torchscript", check_sizes=sizes).ok
        assert path.is_file()
        return
    first = sizes[runs.index(False)]
    with pytest.raises(ValueError, match=f"check size {'x'.join(map(str, first))}: the PyTorch model itself"):
        export_onnx(model, path, exporter="torchscript", check_sizes=sizes)
    assert list(tmp_path.iterdir()) == []  # not even the folder made for it


@pytest.mark.parametrize("under", ["file/m.onnx", "file/sub/m.onnx"])
def test_an_output_under_a_file_is_a_write_error_naming_the_output(tmp_path, under):
    """The folder for the output was made outside the check that turns failures into a WriteError naming the
    output: a path under a file raised FileExistsError, replaced, while cleaning up, by a NotADirectoryError naming
    the temporary file."""
    _, model = random_model(random.Random(0), 0)
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(WriteError) as raised:
        export_onnx(model, tmp_path / under, exporter="torchscript", check_sizes=None)
    assert raised.value.errno == errno.ENOTDIR and raised.value.filename == str(tmp_path / under)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text().startswith("a ")


def test_no_check_with_check_sizes_is_refused_not_the_sizes_dropped(tmp_path, capsys):
    """`--no-check --check-sizes 16` wrote an unchecked graph without a word about the sizes asked for (16 pixels,
    which B0 does not even run at)."""
    from pvtv2.cli import main

    status = main(["export", "-m", "pvt_v2_b0", "-o", str(tmp_path / "m.onnx"), "--no-check", "--check-sizes", "16"])
    err = capsys.readouterr().err
    assert status == 2 and list(tmp_path.iterdir()) == []
    assert "pvtv2 export: error: --no-check and --check-sizes exclude each other" in err


def test_an_output_folder_is_suggested_an_onnx_file_name(tmp_path, capsys):
    """For a folder named as --output, export suggested '<folder>/out.png', a name its own check refuses."""
    from pvtv2.cli import main

    (tmp_path / "dir.onnx").mkdir()
    assert main(["export", "-m", "pvt_v2_b0", "-o", str(tmp_path / "dir.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pvtv2 export: error: --output {str(tmp_path / 'dir.onnx')!r} is a folder; give a file name such "
                   f"as {str(tmp_path / 'dir.onnx' / 'model.onnx')!r}"]
    assert list((tmp_path / "dir.onnx").iterdir()) == []


def test_a_dynamo_export_below_its_opset_says_what_to_do(tmp_path, monkeypatch):
    """torch's dynamo exporter writes opset 18 wherever it cannot convert the graph down (every PVTv2 graph here,
    for 14 to 17): the refusal names the two ways out, not the mismatch alone."""
    from pvtv2 import export


    monkeypatch.setattr(export, "_export_once", onnx_export_writing_opset(18))
    _, model = random_model(random.Random(1), 1)
    with pytest.raises(export.ExportError, match=r"dynamo exporter wrote opset 18, not the 15 asked for \(it writes "
                                                 r"opset 18 .* use the torchscript exporter or opset 18 or later\)"):
        export_onnx(model, tmp_path / "m.onnx", exporter="dynamo", opset=15, check_sizes=None)
    assert list(tmp_path.iterdir()) == []
