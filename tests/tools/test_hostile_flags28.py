"""Hostile uses of round 28's flags (--ignore-index, --clip-grad, --detector left out), each against a value computed
here independently of the code under test."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_SHALLOW

from pvtv2 import PvtV2Config, PvtV2ForSemanticSegmentation
from pvtv2.inference import evaluate_segmenter, predict_segmentation


def test_eval_reduce_labels_with_a_negative_model_ignore_value_and_renamed_classes(tmp_path):
    """A model whose semantic_loss_ignore_index is -100 (transformers' cross-entropy default), evaluated with
    --reduce-labels on data whose labels.json lists the model's classes in another order: the reduced 0s become -100
    and must stay out of the metrics. The name mapping's lookup table indexed them as table[-100], counting every
    "no label" pixel as class len(table) - 100 (here 10 of 110) without a word."""
    k = 110
    rng = np.random.default_rng(0)
    (tmp_path / "val" / "images").mkdir(parents=True)
    (tmp_path / "val" / "masks").mkdir(parents=True)
    image = PIL.Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    image.save(tmp_path / "val" / "images" / "0.png")
    raw = rng.integers(1, k + 1, (32, 32)).astype(np.uint8)
    raw[:8] = 0  # ADE20K's "no label"
    PIL.Image.fromarray(raw).save(tmp_path / "val" / "masks" / "0.png")
    names = {i: f"c{i}" for i in range(k)}
    (tmp_path / "labels.json").write_text(json.dumps({"0": "c1", "1": "c0", **{str(i): f"c{i}" for i in range(2, k)}}))
    torch.manual_seed(0)
    config = PvtV2Config(**TINY_SHALLOW, id2label=names, semantic_loss_ignore_index=-100)
    model = PvtV2ForSemanticSegmentation(config).eval()
    predicted = predict_segmentation(model, image)
    # By hand: reduce (k -> k - 1), swap mask values 0 and 1 to the model's classes, keep the labelled pixels.
    labels = raw.astype(np.int64) - 1
    labels = np.where(labels == 0, 1, np.where(labels == 1, 0, labels))
    keep = raw != 0
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels[keep], predicted[keep]), 1)
    accuracy = np.trace(confusion) / confusion.sum()
    assert confusion.sum() == 24 * 32
    got = evaluate_segmenter(model, tmp_path, reduce_labels=True)
    assert got["pixel_accuracy"] == pytest.approx(accuracy, abs=1e-12)


def test_resume_takes_clip_grad_zero_for_a_run_without_clipping():
    """--clip-grad 0 is documented as "off, as leaving it out": --resume --clip-grad 0 of a run started without the
    flag was refused ("started with --clip-grad (not set), not 0.0"), and of one started with 0 given -0 too. A run
    that clipped is still refused an unclipped resume, naming its norm."""
    from pvtv2.training import TrainConfig
    from pvtv2.training.rundir import _merge_resumed

    for stored_clip, given in ((None, 0.0), (None, -0.0), (0.0, -0.0), (0.0, None), (-0.0, 0.0)):
        stored = TrainConfig(data="/d", output="/o", clip_grad=stored_clip).run_fields()
        asked = TrainConfig(data="/d", output="/o", resume=True, clip_grad=given)
        merged = _merge_resumed(asked, stored, {"resume", "clip_grad"} if given is not None else {"resume"})
        assert not merged.clip_grad, (stored_clip, given)
    stored = TrainConfig(data="/d", output="/o", clip_grad=1.0).run_fields()
    with pytest.raises(ValueError, match=r"--clip-grad 1(\.0)?, not 0"):
        _merge_resumed(TrainConfig(data="/d", output="/o", resume=True, clip_grad=0.0), stored, {"resume", "clip_grad"})
    stored = TrainConfig(data="/d", output="/o").run_fields()
    with pytest.raises(ValueError, match=r"--clip-grad \(not set\), not 0\.5"):
        _merge_resumed(TrainConfig(data="/d", output="/o", resume=True, clip_grad=0.5), stored, {"resume", "clip_grad"})


@pytest.mark.parametrize("text", ["1e-400", "2e-324", "-1e-400"])
def test_clip_grad_that_underflows_to_zero_is_refused(text, capsys, monkeypatch):
    """A norm written non-zero that a float cannot hold (1e-400 parses as 0.0) meant the tightest clipping and was
    taken as 0: no clipping at all, the opposite, without a word."""
    import pvtv2.training
    from pvtv2.cli import main

    calls: list = []
    monkeypatch.setattr(pvtv2.training, "train", lambda cfg, *, explicit=None: calls.append(cfg) or {"rank": 1})
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", "D", "-o", "O", f"--clip-grad={text}"])
    assert exit_info.value.code == 2 and not calls
    err = capsys.readouterr().err
    assert "--clip-grad" in err and text in err, err
    for fine in ("0", "-0", "0.0", "0e5", "1e-300"):
        assert main(["train", "--data", "D", "-o", "O", "--clip-grad", fine]) == 0
    assert [c.clip_grad for c in calls] == [0.0, -0.0, 0.0, 0.0, 1e-300]
