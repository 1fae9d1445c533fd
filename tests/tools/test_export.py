"""ONNX export: dynamic batch and image size for both attention types, checked in onnxruntime against PyTorch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from pvtv2 import PvtV2Config, PvtV2ForImageClassification
from pvtv2.export import ExportableAdaptiveAvgPool2d, ExportError, export_onnx
from conftest import TINY_SHALLOW

ort = pytest.importorskip("onnxruntime")



@pytest.mark.parametrize("size", [(56, 56), (25, 33), (3, 4), (1, 1), (7, 7), (13, 9), (100, 3), (8, 15)])
def test_exportable_pool_equals_adaptive_avg_pool(size):
    x = torch.randn(2, 5, *size, dtype=torch.float64)
    torch.testing.assert_close(ExportableAdaptiveAvgPool2d(7)(x), nn.AdaptiveAvgPool2d(7)(x), rtol=1e-12, atol=1e-12)


def tiny(linear: bool) -> PvtV2ForImageClassification:
    torch.manual_seed(0)
    model = PvtV2ForImageClassification(PvtV2Config(**TINY_SHALLOW, linear_attention=linear, num_labels=3, image_size=64))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    return model.eval()


@pytest.mark.parametrize("linear", [False, True], ids=["sra", "linear"])
def test_export_dynamic_shapes_match_pytorch(tmp_path, linear):
    model = tiny(linear)
    path = tmp_path / "model.onnx"
    result = export_onnx(model, path, exporter="torchscript", check_sizes=[(1, 64, 64)])
    assert result.path == path and path.is_file() and not list(tmp_path.glob(".*tmp*"))
    assert result.pools_replaced == (4 if linear else 0)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # sizes unlike the 64x64 example: other batches, non-square, not divisible by 7 or by the strides, tiny
    # (spatial reduction needs each stage's grid to be at least its sr ratio: 29 pixels for sr 8 after stride 4;
    # linear attention runs at any size)
    smallest = (1, 3, 9, 7) if linear else (1, 3, 29, 30)
    for shape in [(1, 3, 224, 224), (2, 3, 160, 192), (1, 3, 97, 131), (3, 3, 33, 47), smallest]:
        x = torch.randn(shape)
        (got,) = session.run(None, {"pixel_values": x.numpy()})
        with torch.no_grad():
            expected = model(x).logits.numpy()
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max(), shape


def test_failed_check_writes_nothing(tmp_path, monkeypatch):
    import pvtv2.export as export

    def wrong(path, names, references, rtol, atol):
        return [export.ExportCheck((1, 3, 64, 64), 1.0, 1e-5, False)]

    monkeypatch.setattr(export, "_compare", wrong)
    with pytest.raises(ExportError, match="does not match PyTorch"):
        export_onnx(tiny(False), tmp_path / "m.onnx", exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_export_reports_checks(tmp_path):
    tiny(True).save_pretrained(tmp_path / "model")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = tmp_path / "sub" / "m.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "pvtv2", "export", "--model", str(tmp_path / "model"), "--output", str(out),
         "--check-sizes", "64", "2x48x80", "97x131", "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert [c["shape"] for c in info["checks"]] == [[1, 3, 64, 64], [2, 3, 48, 80], [1, 3, 97, 131]]
    assert all(c["ok"] and c["max_abs_diff"] < 1e-4 for c in info["checks"])
    assert out.is_file() and info["adaptive_pools_replaced"] == 4
