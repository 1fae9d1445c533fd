"""A hostile pass over `pvtv2 convert` keeping dense heads (bec55a6): a single-file layout cannot hold a segmentation
head, and its warning sends the user back to the source for predictions; written over that very source, the trained
head was gone with the advice."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pvtv2 import PvtV2Config, PvtV2ForSemanticSegmentation
from pvtv2.cli import main
from pvtv2.export import convert_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "weights"))
from test_mmseg_semantic_fpn import _mmseg_file, _mmseg_forward, _mmseg_head, _reference_backbone

from conftest import TINY_SHALLOW, perturb_, relative_error


@pytest.mark.parametrize("layout", ["timm", "original", "transformers"])
def test_a_single_file_over_its_own_mmseg_source_is_refused(tmp_path, layout, capsys):
    backbone = _reference_backbone(seed=4)
    head = _mmseg_head(width=16, channels=8, labels=3, seed=5)
    path = _mmseg_file(tmp_path, backbone, head)
    before = path.read_bytes()
    # The command line, as the user types it: it wrote the encoder over the file and then advised predicting with
    # "the source", whose Semantic FPN was gone.
    assert main(["convert", str(path), str(path), "--layout", layout]) != 0
    err = capsys.readouterr().err
    assert "segmentation head" in err and "refusing" in err
    assert path.read_bytes() == before
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = PvtV2ForSemanticSegmentation.from_pretrained(path).eval()(x).logits
        assert relative_error(_mmseg_forward(backbone(x), head), got) < 1e-5


def test_a_single_file_over_a_folders_own_weights_is_refused(tmp_path):
    torch.manual_seed(0)
    model = perturb_(PvtV2ForSemanticSegmentation(PvtV2Config(**TINY_SHALLOW, num_labels=3), head="fpn")).eval()
    model.save_pretrained(tmp_path / "seg")
    weights = tmp_path / "seg" / "model.safetensors"
    before = weights.read_bytes()
    with pytest.raises(FileExistsError, match="segmentation head"):
        convert_checkpoint(tmp_path / "seg", weights, layout="timm")
    assert weights.read_bytes() == before
    # Another path is written, with the warning, as before.
    info = convert_checkpoint(tmp_path / "seg", tmp_path / "encoder.safetensors", layout="timm")
    assert info["model"] == "PvtV2Model"
