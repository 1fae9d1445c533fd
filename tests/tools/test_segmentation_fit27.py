"""``fit``: the authors' ADE20K test protocol (mmcv's keep-ratio ``imrescale`` to (2048, 512), then the PVT
repository's ``AlignResize`` to multiples of 32), checked against the rule worked out by hand, then through
predict_segmentation, ``pvtv2 segment`` and ``pvtv2 eval --task segmentation``."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from pvtv2 import PvtV2Config
from pvtv2.cli import main
from pvtv2.data.shapes import make_segmentation_example
from pvtv2.inference import evaluate_segmenter, fit_size, predict_segmentation
from pvtv2.models.segmentation import PvtV2ForSemanticSegmentation

from conftest import TINY, perturb_


@pytest.mark.parametrize("height, width, expected", [
    (512, 683, (512, 704)),     # ADE20K's usual 683 x 512: factor min(2048/683, 512/512) = 1; 683 -> 704
    (256, 1000, (512, 2016)),   # factor min(2.048, 2) = 2: 512 x 2000, the width aligned up to 2016
    (3000, 400, (2048, 288)),   # factor 2048/3000: the width 273.07 rounds to 273, aligned to 288
    (1024, 1024, (512, 512)),   # factor 0.5
    (100, 101, (512, 544)),     # factor 5.12: 101 x 5.12 = 517.12 -> 517, aligned to 544
])
def test_fit_size_is_the_authors_rule(height, width, expected):
    assert fit_size(height, width, (2048, 512)) == expected
    assert fit_size(height, width, (512, 2048)) == expected  # mmcv takes the longer and the shorter of the pair


def test_predict_segmentation_with_fit_is_predict_at_that_size(tmp_path, capsys):
    torch.manual_seed(0)
    names = {0: "background", 1: "circle", 2: "square", 3: "triangle"}  # the example data's classes
    model = perturb_(PvtV2ForSemanticSegmentation(PvtV2Config(**TINY, id2label=names))).eval()
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 90, 3), dtype=np.uint8))
    # (50, 90) in (160, 64): factor min(160/90, 64/50) = 1.28 -> 64 x 115, aligned to 64 x 128
    assert fit_size(50, 90, (160, 64)) == (64, 128)
    fitted = predict_segmentation(model, image, fit=(160, 64))
    assert np.array_equal(fitted, predict_segmentation(model, image, (64, 128)))
    assert not np.array_equal(fitted, predict_segmentation(model, image, (64, 64)))  # the size mattered
    with pytest.raises(ValueError, match="size or fit"):
        predict_segmentation(model, image, (64, 64), fit=(160, 64))
    data = tmp_path / "data"
    make_segmentation_example(data, 2, 3, 48, seed=0)
    by_fit = evaluate_segmenter(model, data, fit=(96, 96))
    by_size = evaluate_segmenter(model, data, size=(96, 96))  # square 48 px images: fit 96x96 is 96 x 96
    assert by_fit["mean_iou"] == by_size["mean_iou"] and by_fit["per_class_iou"] == by_size["per_class_iou"]
    model.save_pretrained(tmp_path / "model")
    assert main(["eval", "--task", "segmentation", "-m", str(tmp_path / "model"), "--data", str(data),
                 "--fit", "96x96", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["fit"] == [96, 96] and printed["mean_iou"] == pytest.approx(by_fit["mean_iou"], abs=1e-6)


def test_fit_flag_is_checked(tmp_path, capsys):
    for flags, message in ((["--fit", "2048"], "LONGxSHORT"), (["--fit", "2048x16"], "between 32 and 2048"),
                           (["--fit", "2048x512", "--size", "512"], "exclude each other")):
        assert main(["segment", "image.png", "-m", "nowhere", "-o", str(tmp_path / "o.png"), *flags]) == 2
        assert message in capsys.readouterr().err
    assert main(["eval", "-m", "nowhere", "--data", str(tmp_path), "--fit", "2048x512"]) == 2
    assert "--task segmentation only" in capsys.readouterr().err
