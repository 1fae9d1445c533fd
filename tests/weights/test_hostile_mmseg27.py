"""A hostile pass over mmsegmentation Semantic FPN files read whole (bec55a6): the refusals that meet a user who gives
such a file (or another dense-prediction weights file without its config.json) to the wrong command, or one whose
Semantic FPN head is incomplete, say what the file is and what it lacks."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import save_file

from pvtv2.inference import load_classifier, load_segmenter

from test_mmseg_semantic_fpn import _mmseg_file, _mmseg_head, _reference_backbone

TINY_MIT = dict(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4])


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
