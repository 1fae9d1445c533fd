"""A hostile pass over mmsegmentation Semantic FPN files read whole (bec55a6): the refusals that meet a user who gives
such a file (or another dense-prediction weights file without its config.json) to the wrong command, or one whose
Semantic FPN head is incomplete, say what the file is and what it lacks."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
import transformers
from safetensors.torch import save_file

from pvtv2 import CheckpointError, PvtV2ForSemanticSegmentation
from pvtv2.inference import load_classifier, load_segmenter

from conftest import relative_error
from test_mmseg_semantic_fpn import _mmseg_file, _mmseg_forward, _mmseg_head, _reference_backbone

TINY_MIT = {"depths": [1, 1, 1, 1], "hidden_sizes": [16, 32, 48, 64], "num_attention_heads": [1, 2, 3, 4]}


def test_a_semantic_fpn_file_given_to_predict_is_named_a_segmentation_model(tmp_path):
    # It was "has no trained classifier ... Fine-tune one on your classes first: pvtv2 train --model F --data DIR"
    # (classification fine-tuning) for a file that is a trained segmentation model, read whole by pvtv2 segment.
    path = _mmseg_file(tmp_path, _reference_backbone(), _mmseg_head(width=16, channels=8, labels=5))
    with pytest.raises(ValueError, match="no trained classifier") as err:
        load_classifier(path)
    assert "It is a segmentation model" in str(err.value) and "pvtv2 segment" in str(err.value)
    assert "Fine-tune one on your classes" not in str(err.value)


@pytest.mark.parametrize("kind", ["segformer", "glpn"])
def test_a_dense_weights_file_without_its_config_given_to_predict_says_what_it_is(tmp_path, kind):
    # transformers' SegFormer / GLPN weights alone (a model.safetensors downloaded without its config.json): the
    # same file in its folder was named by its config.json's architectures, alone it was sent to fine-tuning.
    torch.manual_seed(0)
    if kind == "segformer":
        model = transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(**TINY_MIT, num_labels=3))
        expected = "It is a segmentation model"
    else:
        model = transformers.GLPNForDepthEstimation(transformers.GLPNConfig(**TINY_MIT, decoder_hidden_size=16))
        expected = "It is a depth model"
    path = tmp_path / f"{kind}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    with pytest.raises(ValueError, match="no trained classifier") as err:
        load_classifier(path)
    assert expected in str(err.value)


def test_an_incomplete_semantic_fpn_head_is_named_as_such(tmp_path):
    # A scale-head block missing: the refusal named "segmentation head (SegFormer decode head)" over a list of
    # Semantic FPN modules, a head the file never had.
    head = _mmseg_head(width=16, channels=8, labels=5)
    for key in [k for k in head if k.startswith("decode_head.scale_heads.3.4.")]:
        del head[key]
    path = _mmseg_file(tmp_path, _reference_backbone(), head)
    with pytest.raises(ValueError, match=r"decode_head\.scale_heads\.3\.4") as err:
        load_segmenter(path)
    assert "SegFormer" not in str(err.value) and "Semantic FPN" in str(err.value)


class _HistoryBuffer:
    """Stands for mmengine's ``HistoryBuffer``: an object of mmengine's own class, as every ``message_hub`` holds."""

    def __init__(self) -> None:
        self.max_length = 1000000


def test_an_mmengine_checkpoint_is_refused_saying_how_to_keep_its_weights(tmp_path, monkeypatch):
    # mmsegmentation 1.x trains with mmengine, whose Runner.save_checkpoint writes {"meta", "state_dict",
    # "message_hub", "optimizer", "param_schedulers"}; message_hub's log_scalars are HistoryBuffer objects. The
    # file is refused (no pickled object is built), and the refusal now says which part holds the weights.
    module = types.ModuleType("mmengine.logging.history_buffer")
    _HistoryBuffer.__module__ = module.__name__
    _HistoryBuffer.__qualname__ = _HistoryBuffer.__name__ = "HistoryBuffer"
    module.HistoryBuffer = _HistoryBuffer
    for name in ("mmengine", "mmengine.logging"):  # pickle imports the parents to find the class
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    path = _mmseg_file(tmp_path, _reference_backbone(), _mmseg_head(width=16, channels=8, labels=5))
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["message_hub"] = {"log_scalars": {"train/loss": _HistoryBuffer()}, "runtime_info": {"iter": 40000},
                                 "resumed_keys": {"train/loss": True}}
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="refusing to load") as err:
        PvtV2ForSemanticSegmentation.from_pretrained(path)
    assert "mmengine" in str(err.value) and "['state_dict']" in str(err.value)


def test_a_one_channel_mmseg_head_warns_of_mmsegmentations_threshold(tmp_path, caplog):
    # mmsegmentation's binary heads (out_channels=1) predict sigmoid > threshold, 0.3 unless the config (not in the
    # file) sets one (BaseDecodeHead); pvtv2's one-label models use 0.5. Read silently, a pixel with a probability of
    # 0.4 was foreground in mmsegmentation and background here.
    backbone = _reference_backbone()
    head = _mmseg_head(width=16, channels=8, labels=1)
    path = _mmseg_file(tmp_path, backbone, head)
    with caplog.at_level(logging.WARNING):
        model = PvtV2ForSemanticSegmentation.from_pretrained(path).eval()
    assert model.config.num_labels == 1
    assert "threshold" in caplog.text and "0.3" in caplog.text and "0.5" in caplog.text
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # the logits themselves are mmsegmentation's
        assert relative_error(_mmseg_forward(backbone(x), head), model(x).logits) < 1e-5
