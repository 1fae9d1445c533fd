"""A hostile pass over the day's features: ``--fit`` with ``--scales``, the ``--fit`` bound, ``fit_size`` of no image,
``--decode-head`` on a segmentation checkpoint of the other head, ``benchmark --model config.json`` of an absurd
architecture, ``main`` given a generator, and ``info`` naming a segmentation model's decode head."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from pvtv2 import PvtV2Config
from pvtv2.benchmark import build_model
from pvtv2.cli import main
from pvtv2.data.processing import PvtV2ImageProcessor
from pvtv2.inference import fit_size, predict_segmentation, segmentation_probabilities
from pvtv2.models.segmentation import PvtV2ForSemanticSegmentation
from pvtv2.training import TrainConfig
from pvtv2.training.segmentation import build_segmentation_model

from conftest import TINY, TINY_SHALLOW, perturb_

CLASSES = {0: "background", 1: "circle", 2: "square", 3: "triangle"}


def _probabilities_at(model, image, sizes, flip=False):
    """The mean over ``sizes`` of the class probabilities of the image resized once to each, at the image's size."""
    total = 0
    for height, width in sizes:
        pixels = PvtV2ImageProcessor(size={"height": height, "width": width})(image)["pixel_values"]
        total = total + segmentation_probabilities(model, pixels, flip=flip, output_size=(image.height, image.width))
    return total / len(sizes)


def test_fit_with_scales_is_the_authors_multi_scale_protocol():
    # mmsegmentation's MultiScaleFlipAug with img_ratios scales the fit itself, (int(L r), int(S r)), and the PVT
    # repository's AlignResize rescales the original image into each and aligns each to 32. pvtv2 scaled the fitted
    # size by r instead, unaligned: a 40 x 53 image at 0.75 of fit (256, 64) was 48 x 72, the authors' 64 x 64.
    torch.manual_seed(0)
    model = perturb_(PvtV2ForSemanticSegmentation(PvtV2Config(**TINY, id2label=CLASSES))).eval()
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 53, 3), dtype=np.uint8))
    # r = 1: fit (256, 64), factor min(256/53, 64/40) = 1.6: 64 x 84.8 -> 85, aligned 64 x 96
    # r = 0.75: fit (192, 48), factor min(192/53, 48/40) = 1.2: 48 x 63.6 -> 64, aligned 64 x 64
    expected = _probabilities_at(model, image, [(64, 64), (64, 96)], flip=True)
    got = predict_segmentation(model, image, fit=(256, 64), scales=(0.75, 1.0), flip=True)
    assert np.array_equal(got, expected.argmax(1)[0].numpy())
    unaligned = _probabilities_at(model, image, [(48, 72), (64, 96)], flip=True).argmax(1)[0].numpy()
    assert not np.array_equal(unaligned, expected.argmax(1)[0].numpy())  # the sizes matter here


def test_fit_with_scales_takes_a_thin_image():
    # A 1 x 400 strip in fit (256, 64): 32 x 256; at r = 0.5 the fit (128, 32) gives 32 x 128. Scaling the fitted
    # 32 x 256 by 0.5 gave 16 x 128, too small for the first stage: "the input is too small for this model".
    torch.manual_seed(0)
    model = perturb_(PvtV2ForSemanticSegmentation(PvtV2Config(**TINY, id2label=CLASSES))).eval()
    image = PIL.Image.fromarray(np.random.default_rng(2).integers(0, 256, (1, 400, 3), dtype=np.uint8))
    got = predict_segmentation(model, image, fit=(256, 64), scales=(0.5, 1.0))
    assert np.array_equal(got, _probabilities_at(model, image, [(32, 128), (32, 256)]).argmax(1)[0].numpy())


def test_fit_is_bounded_as_size_is(tmp_path, capsys):
    # --size stops at 2048 a side; --fit 4096x4096 fed a 4096 x 4096 input (16384 x 16384 with --scales 4).
    assert main(["segment", "image.png", "-m", "nowhere", "-o", str(tmp_path / "o.png"), "--fit", "4096x4096"]) == 2
    assert "between 32 and 2048" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("held, asked", [("segformer", "fpn"), ("fpn", "segformer")])
def test_decode_head_other_than_the_checkpoints_is_named(tmp_path, held, asked):
    # It failed in the loader with 58 "missing keys" and 14 "unexpected keys", the head types never named.
    PvtV2ForSemanticSegmentation(PvtV2Config(**TINY_SHALLOW, id2label=CLASSES), head=held).save_pretrained(tmp_path / "m")
    cfg = TrainConfig(model=str(tmp_path / "m"), task="segmentation", image_size=64, decode_head=asked)
    with pytest.raises(ValueError, match=f"holds a decode head of type {held}, not {asked} as --decode-head asks"):
        build_segmentation_model(cfg, CLASSES)


def test_benchmark_refuses_an_absurd_config_json_before_building_it(tmp_path):
    # `pvtv2 train` refuses more than MAX_PARAMETERS on the meta device; benchmark allocated it (here one 160 GB
    # matrix; with many smaller ones, the machine's memory).
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(dict(TINY_SHALLOW, hidden_sizes=[16, 32, 48, 200_000], num_attention_heads=[1, 2, 3, 1])))
    with pytest.raises(ValueError, match="parameters"):
        build_model(str(path))


def test_main_takes_argv_as_any_iterable(capsys):
    # argparse reads any iterable of strings; the alias lookup read a generator first, leaving argparse nothing
    # ("the following arguments are required: COMMAND").
    with pytest.raises(SystemExit) as exit_:
        main(word for word in ["finetune", "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: pvtv2 finetune ")


def test_info_names_the_decode_head(tmp_path, capsys):
    # Both heads printed the same line: "PvtV2ForSemanticSegmentation, spatial-reduction attention, 4 classes"; a
    # one-class model read "1 classes".
    for head, labels in (("fpn", CLASSES), ("segformer", {0: "road"})):
        model = PvtV2ForSemanticSegmentation(PvtV2Config(**TINY_SHALLOW, id2label=labels), head=head)
        model.save_pretrained(tmp_path / head)
        assert main(["info", str(tmp_path / head), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["decode_head"] == head
        assert main(["info", str(tmp_path / head)]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert first.endswith(f"{head} decode head, 4 classes" if head == "fpn" else
                              f"{head} decode head, 1 class (binary)")


@pytest.mark.parametrize("height, width", [(0, 5), (-10, 5), (5, 2.5), (True, 5)])
def test_fit_size_refuses_a_size_that_is_no_image(height, width):
    # (0, 5) stopped on a ZeroDivisionError; (-10, 5) came back as (512, 32).
    with pytest.raises(ValueError, match="height and width"):
        fit_size(height, width, (2048, 512))
