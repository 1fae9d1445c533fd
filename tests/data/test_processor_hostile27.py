"""Hostile pass on PvtV2ImageProcessor's per-call settings (today's features), against transformers' processors.

Holds:
- a setting given to a call as None keeps the instance's (transformers 4.x's rule, ``x if x is not None else
  self.x``): image_mean/image_std/size=None silently went back to the class defaults (ImageNet, 224x224), the
  others were a TypeError; the same through from_pretrained(source, image_mean=None).
- crop_pct given to a call on a centre-crop processor is timm's form, as the constructor reads it (the current
  crop is the size): processor(image, crop_pct=0.95) on the timm protocol was refused with a size of 248 nobody gave,
  and on a processor without a crop as "do_center_crop is False" (the instance's, not given).
- return_tensors=None never hands back the caller's memory: with nothing to do, the list held the input array (or
  the tensor's memory), and editing the output edited the input.
- from_protocol(name, image_size, **overrides): an override of None keeps the protocol's (from_protocol("timm", 384,
  size=None) was a 224 crop, crop_pct=None a plain resize, resample=None a TypeError).
- do_convert_rgb takes numpy.True_ as every other switch does (it was refused as "must be True ... got np.True_").
- a crop turned on (from_pretrained(source, do_center_crop=True, crop_size=...)) over a file whose crop was off kept
  the file's stale crop_pct in to_dict, so save_pretrained wrote a file it then refused to read.
- (kept as checks, they passed) two threads calling one processor with different settings each get their own.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
from sklearn.datasets import load_sample_images
from transformers.models.pvt.image_processing_pil_pvt import PvtImageProcessorPil

from pvtv2 import PvtV2ImageProcessor

PHOTO = PIL.Image.fromarray(load_sample_images().images[0])  # 427 x 640 (china.jpg)

CUSTOM = {"size": {"height": 96, "width": 80}, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.3, 0.2, 0.1],
          "resample": 3, "rescale_factor": 1 / 127.5}


def _transformers(settings, **call):
    """transformers 4.x's reading of a None per-call setting: the instance's; transformers 5 does the same when the
    setting is left out, which is what we compare against."""
    reference = PvtImageProcessorPil(**settings)
    call = {key: value for key, value in call.items() if value is not None}
    return np.asarray(reference(PHOTO, return_tensors="np", do_convert_rgb=True, **call)["pixel_values"])


@pytest.mark.parametrize(
    "name",
    ["image_mean", "image_std", "size", "do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize",
     "do_center_crop", "crop_size", "crop_pct"],
)
def test_a_setting_given_as_none_keeps_the_instances(name):
    ours = PvtV2ImageProcessor(**CUSTOM)
    got = ours(PHOTO, return_tensors="np", **{name: None})["pixel_values"]
    expected = _transformers(CUSTOM, **{name: None})
    assert got.shape == expected.shape == (1, 3, 96, 80)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert ours.to_dict() == PvtV2ImageProcessor(**CUSTOM).to_dict()


def test_from_pretrained_with_none_keeps_the_files_setting(tmp_path):
    PvtV2ImageProcessor(**CUSTOM).save_pretrained(tmp_path)
    loaded = PvtV2ImageProcessor.from_pretrained(tmp_path, image_mean=None, size=None)
    assert loaded.image_mean == (0.1, 0.2, 0.3)
    assert loaded.size == {"height": 96, "width": 80}


def _timm_eval(resized: int, crop: int) -> np.ndarray:
    """PHOTO through timm's eval transform, written out: the shorter side to ``resized`` (PIL bicubic), the centre
    ``crop`` (torchvision's CenterCrop offsets, round((H - h) / 2)), /255, ImageNet statistics; (1, 3, crop, crop)."""
    width = int(resized * 640 / 427)
    image = np.asarray(PHOTO.resize((width, resized), resample=PIL.Image.Resampling.BICUBIC))
    top, left = round((resized - crop) / 2), round((width - crop) / 2)
    window = (image[top : top + crop, left : left + crop].astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)
    return np.moveaxis((window - mean) / std, -1, 0)[None]


@pytest.mark.parametrize("crop_pct, resized", [(0.95, 235), (0.875, 256), (1.0, 224)])
def test_crop_pct_per_call_on_a_crop_processor_is_timms_form(crop_pct, resized):
    timm_processor = PvtV2ImageProcessor.from_protocol("timm", 224)
    got = timm_processor(PHOTO, return_tensors="np", crop_pct=crop_pct)["pixel_values"]
    # Independent: resize the shorter side to floor(224 / crop_pct) with PIL bicubic and take the centre 224, as
    # timm's eval transform (torchvision's CenterCrop offsets: round((H - h) / 2)).
    np.testing.assert_allclose(got, _timm_eval(resized, 224), rtol=0, atol=1e-6)
    assert timm_processor == PvtV2ImageProcessor.from_protocol("timm", 224)  # nothing leaked into the instance


@pytest.mark.parametrize("settings", [{}, {"crop_size": 200}, {"size": {"height": 224, "width": 300}}])
def test_crop_pct_per_call_on_a_plain_processor_is_timms_form(settings):
    plain = PvtV2ImageProcessor(resample=3, **settings)  # a 224 resize (its crop_size, without a crop, is unused)
    got = plain(PHOTO, return_tensors="np", crop_pct=0.9, size=224 if "size" in settings else None)["pixel_values"]
    np.testing.assert_allclose(got, _timm_eval(248, 224), rtol=0, atol=1e-6)


def test_crop_pct_with_a_size_per_call_is_timms_form():
    timm_processor = PvtV2ImageProcessor.from_protocol("timm", 224)
    got = timm_processor(PHOTO, return_tensors="np", size=384, crop_pct=0.9)["pixel_values"]
    expected = PvtV2ImageProcessor.from_protocol("timm", 384)(PHOTO, return_tensors="np")["pixel_values"]
    assert got.shape == (1, 3, 384, 384)
    np.testing.assert_array_equal(got, expected)


OFF = {"do_resize": False, "do_rescale": False, "do_normalize": False}


@pytest.mark.parametrize("kind", ["array", "tensor", "batch"])
def test_return_tensors_none_does_not_hand_back_the_callers_memory(kind):
    import torch

    original = np.random.default_rng(5).random((3, 8, 9)).astype(np.float32)
    source = original.copy()
    images = {"array": source, "tensor": torch.from_numpy(source), "batch": source[None]}[kind]
    out = PvtV2ImageProcessor()(images, return_tensors=None, **OFF)["pixel_values"][0]
    np.testing.assert_array_equal(out, original)  # nothing to do: the input's values come back
    out += 1.0  # a caller's in-place edit of the output must leave its own image alone
    np.testing.assert_array_equal(source, original)


def test_two_threads_with_different_settings_on_one_processor_each_get_their_own():
    import threading

    processor = PvtV2ImageProcessor(**CUSTOM)
    calls = [{"size": 32, "do_normalize": False}, {"image_mean": 0.5, "image_std": 0.25, "resample": 2}, {}]
    expected = [_transformers(CUSTOM, **call) for call in calls]
    failures: list[str] = []

    def work(index: int) -> None:
        for _ in range(15):
            got = processor(PHOTO, return_tensors="np", **calls[index])["pixel_values"]
            if got.shape != expected[index].shape or np.abs(got - expected[index]).max() > 1e-6:
                failures.append(f"call {calls[index]} gave {got.shape}")

    threads = [threading.Thread(target=work, args=(index,)) for index in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert processor.to_dict() == PvtV2ImageProcessor(**CUSTOM).to_dict()


@pytest.mark.parametrize("name", ["size", "crop_pct", "resample", "do_resize", "image_mean"])
def test_from_protocol_with_an_override_of_none_keeps_the_protocols(name):
    processor = PvtV2ImageProcessor.from_protocol("timm", 384, **{name: None})
    got = processor(PHOTO, return_tensors="np")["pixel_values"]
    assert got.shape == (1, 3, 384, 384)  # size=None made it the class default's 224 crop
    np.testing.assert_allclose(got, _timm_eval(426, 384), rtol=0, atol=1e-6)  # floor(384 / 0.9) = 426


def test_do_convert_rgb_takes_a_numpy_true_as_every_other_switch():
    import numpy

    expected = _transformers(CUSTOM)
    got = PvtV2ImageProcessor(**CUSTOM, do_convert_rgb=numpy.True_)(PHOTO, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    got = PvtV2ImageProcessor(**CUSTOM)(PHOTO, return_tensors="np", do_convert_rgb=numpy.True_)["pixel_values"]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="do_convert_rgb must be True"):
        PvtV2ImageProcessor(do_convert_rgb=numpy.False_)


def test_a_crop_turned_on_over_a_files_inactive_crop_pct_is_saved_as_it_runs(tmp_path):
    import json

    import transformers

    # A file whose crop is off but whose crop keys are there (kept as unknown keys for the round trip).
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "do_center_crop": False, "crop_pct": 0.9, "crop_size": {"height": 200, "width": 200}, "do_normalize": True,
        "do_rescale": True, "do_resize": True, "image_processor_type": "PvtImageProcessor", "resample": 2,
        "size": {"height": 224, "width": 224},
    }))
    ours = PvtV2ImageProcessor.from_pretrained(tmp_path, do_center_crop=True, crop_size=200)
    assert "crop_pct" not in ours.to_dict()  # the stale 0.9 is not this crop's (224 resize, 200 crop)
    ours.save_pretrained(tmp_path / "saved")
    again = PvtV2ImageProcessor.from_pretrained(tmp_path / "saved")  # a crop_pct that does not match was refused
    assert again == ours
    theirs = transformers.PvtImageProcessorPil.from_pretrained(tmp_path / "saved", do_convert_rgb=True)
    # 427 x 640 resized to 224 x 224 and cropped to 200: (224 - 200) / 2 = 12 either way, so floor and round agree.
    expected = np.asarray(theirs(PHOTO, return_tensors="np")["pixel_values"])
    got = again(PHOTO, return_tensors="np")["pixel_values"]
    assert got.shape == expected.shape == (1, 3, 200, 200)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
