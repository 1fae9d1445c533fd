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


def test_a_bare_glpn_file_says_its_max_depth_is_assumed(tmp_path, caplog):
    # GLPN's depth is sigmoid * max_depth (10 for NYU, 80 for KITTI), a config value no weight records. A weights
    # file without its config.json was read with 10 under an info line, and convert, which now keeps the depth head,
    # wrote that guess into the folder's config.json, where it reads as the model's own.
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    from pvtv2 import PvtV2ForDepthEstimation

    torch.manual_seed(0)
    config = transformers.GLPNConfig(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4],
                                     decoder_hidden_size=16, max_depth=80)
    reference = transformers.GLPNForDepthEstimation(config).eval()
    path = tmp_path / "glpn_kitti.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    with caplog.at_level("WARNING"):
        convert_checkpoint(path, tmp_path / "folder")
    assert "max_depth" in caplog.text and "10" in caplog.text
    caplog.clear()
    x = torch.rand(1, 3, 64, 64)
    with caplog.at_level("WARNING"):
        model = PvtV2ForDepthEstimation.from_pretrained(path, max_depth=80.0).eval()
    assert "max_depth" not in caplog.text  # given: nothing assumed
    with torch.no_grad():
        assert relative_error(reference(x).predicted_depth, model(x).predicted_depth) < 1e-5


def test_the_head_warning_of_an_original_file_reads_right(tmp_path, caplog):
    # "a original file holds weights only: the segmentation head (a original file holds ...)".
    path = _mmseg_file(tmp_path, _reference_backbone(), _mmseg_head(width=16, channels=8, labels=3))
    with caplog.at_level("WARNING"):
        info = convert_checkpoint(path, tmp_path / "encoder.pth", layout="original")
    assert info["model"] == "PvtV2Model"
    assert "an original file holds weights only" in caplog.text and "(an original file holds the encoder" in caplog.text
    assert "a original" not in caplog.text
