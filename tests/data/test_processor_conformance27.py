"""PvtV2ImageProcessor's call against transformers' PIL processor (the one the model documentation names): the
settings transformers' processors take per call, for that call only."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
import transformers

from pvtv2 import PvtV2ImageProcessor

IMAGE = np.random.default_rng(27).integers(0, 256, (40, 60, 3), dtype=np.uint8)

PER_CALL = [
    dict(do_resize=False),
    dict(size={"height": 30, "width": 44}),
    dict(size=36),
    dict(size=(30, 40)),
    dict(resample=3),
    dict(resample=0, size=50),
    dict(do_rescale=False),
    dict(rescale_factor=1 / 127.5),
    dict(do_normalize=False),
    dict(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4]),
    dict(image_mean=0.5, image_std=0.25),
    dict(do_center_crop=True, crop_size={"height": 20, "width": 30}, size={"height": 40, "width": 60}),
    dict(size={"shortest_edge": 48}, do_center_crop=True, crop_size=32),
    dict(do_resize=False, do_rescale=False, do_normalize=False),
]


@pytest.mark.parametrize("settings", PER_CALL, ids=lambda s: ",".join(s))
@pytest.mark.parametrize("return_tensors", ["pt", "np"])
def test_settings_given_to_the_call_apply_to_that_call(settings, return_tensors):
    """transformers' processors take their settings per call (``processor(image, do_resize=False)``); ours refused
    every such keyword with a TypeError. Now the same pixels as transformers, and the processor itself unchanged."""
    theirs = transformers.PvtImageProcessorPil(resample=2, do_convert_rgb=True)
    ours = PvtV2ImageProcessor()
    before = ours.to_dict()
    expected = theirs(IMAGE, return_tensors=return_tensors, **settings)["pixel_values"]
    got = ours(IMAGE, return_tensors=return_tensors, **settings)["pixel_values"]
    assert type(got) is type(expected)
    got, expected = np.asarray(got), np.asarray(expected)
    # Ours is float32 always (documented); transformers keeps a uint8 image's dtype when every step is off.
    assert got.shape == expected.shape and got.dtype == np.float32
    assert expected.dtype == (np.uint8 if settings.get("do_rescale") is settings.get("do_normalize") is False else np.float32)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert ours.to_dict() == before
    # and the call without them is the default one again
    np.testing.assert_array_equal(np.asarray(ours(IMAGE, return_tensors="np")["pixel_values"]),
                                  np.asarray(theirs(IMAGE, return_tensors="np")["pixel_values"]))


def test_per_call_settings_on_a_crop_processor_replace_its_crop_pct():
    """A timm-protocol processor (crop_pct 0.9: shorter side 248, crop 224) given another size for one call resizes to
    it and crops as transformers does with the same size and crop, instead of refusing the crop_pct it was built
    with as a contradiction."""
    ours = PvtV2ImageProcessor.from_protocol("timm", 32)  # shorter side 35, crop 32
    theirs = transformers.PvtImageProcessorPil(
        resample=3, do_convert_rgb=True, do_center_crop=True, crop_size={"height": 32, "width": 32}
    )
    got = ours(IMAGE, return_tensors="np", size={"height": 40, "width": 50})["pixel_values"]
    expected = theirs(IMAGE, return_tensors="np", size={"height": 40, "width": 50})["pixel_values"]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert ours.protocol == "timm"


@pytest.mark.parametrize("settings, says", [
    (dict(foo=1), "foo"),
    (dict(size=0), "size"),
    (dict(do_resize="yes"), "do_resize"),
    (dict(image_std=[1, 0, 1]), "image_std"),
    (dict(do_convert_rgb=False), "do_convert_rgb"),
])
def test_bad_per_call_settings_are_named(settings, says):
    with pytest.raises((TypeError, ValueError), match=says):
        PvtV2ImageProcessor()(IMAGE, **settings)


def test_do_convert_rgb_true_is_what_it_always_does():
    """transformers' ``do_convert_rgb=True`` (an RGBA or grey image made RGB) is what ours does for every image."""
    rgba = np.concatenate([IMAGE, IMAGE[..., :1]], axis=-1)
    theirs = transformers.PvtImageProcessorPil(resample=2)
    got = PvtV2ImageProcessor()(rgba, return_tensors="pt", do_convert_rgb=True)["pixel_values"]
    expected = theirs(rgba, return_tensors="pt", do_convert_rgb=True)["pixel_values"]
    assert torch.equal(got, expected) or (got - expected).abs().max() < 1e-6


AMBIGUOUS = np.random.default_rng(28).integers(0, 256, (3, 20, 3), dtype=np.uint8)  # (C, H, W) or (H, W, C)?


@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
@pytest.mark.parametrize("images", [
    AMBIGUOUS,
    np.random.default_rng(29).integers(0, 256, (4, 25, 3), dtype=np.uint8),
    torch.from_numpy(np.random.default_rng(30).integers(0, 256, (2, 3, 20, 3), dtype=np.uint8)),
    [AMBIGUOUS, AMBIGUOUS[::-1].copy()],
], ids=["3x20x3", "4x25x3", "batch-2x3x20x3", "list"])
@pytest.mark.parametrize("settings", [{}, dict(do_resize=False)])
def test_input_data_format_settles_the_channel_axis_as_transformers(layout, images, settings):
    """An image whose first and last axes could both hold the channels is read channels first, with a warning, by
    both; transformers' ``input_data_format`` says which it is. Ours had no way to say it short of transposing the
    array, and refused the keyword."""
    theirs = transformers.PvtImageProcessorPil(resample=2, do_convert_rgb=True)
    expected = theirs(images, return_tensors="np", input_data_format=layout, **settings)["pixel_values"]
    got = PvtV2ImageProcessor()(images, return_tensors="np", input_data_format=layout, **settings)["pixel_values"]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout, image, says", [
    ("channels_last", np.zeros((3, 20, 5), np.uint8), "channels_last"),
    ("channels_first", np.zeros((5, 20, 3), np.uint8), "channels_first"),
    ("last", AMBIGUOUS, "input_data_format"),
])
def test_an_input_data_format_that_does_not_fit_is_named(layout, image, says):
    with pytest.raises(ValueError, match=says):
        PvtV2ImageProcessor()(image, input_data_format=layout)


@pytest.mark.parametrize("images, settings", [
    (IMAGE, {}),
    ([IMAGE, IMAGE[:20, :33]], {}),
    ([IMAGE, IMAGE[:20, :33]], dict(do_resize=False)),  # different sizes: a list, not a batch
])
def test_return_tensors_none_gives_a_list_of_arrays_as_transformers(images, settings):
    """transformers' default, ``return_tensors=None``: one (3, H, W) float32 array per image in a list, so images of
    different sizes come back without resizing. Ours refused None."""
    theirs = transformers.PvtImageProcessorPil(resample=2, do_convert_rgb=True)
    expected = theirs(images, return_tensors=None, **settings)["pixel_values"]
    got = PvtV2ImageProcessor()(images, return_tensors=None, **settings)["pixel_values"]
    assert type(got) is type(expected) is list and len(got) == len(expected)
    for a, b in zip(expected, got):
        assert type(b) is np.ndarray and b.dtype == a.dtype == np.float32 and b.shape == a.shape
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("settings", [dict(do_resize=False), dict(size={"height": 40, "width": 52}, resample=3),
                                      dict(do_normalize=False, rescale_factor=0.5), dict(image_mean=0.5, image_std=0.5)])
def test_from_pretrained_takes_settings_as_transformers(settings, tmp_path):
    """``PvtImageProcessor.from_pretrained(folder, do_resize=False)`` overrides the file's settings; ours refused
    every such keyword with a TypeError."""
    PvtV2ImageProcessor(size={"height": 64, "width": 48}, image_mean=[0.4, 0.5, 0.6]).save_pretrained(tmp_path)
    theirs = transformers.PvtImageProcessorPil.from_pretrained(tmp_path, do_convert_rgb=True, **settings)
    ours = PvtV2ImageProcessor.from_pretrained(tmp_path, **settings)
    expected = theirs(IMAGE, return_tensors="np")["pixel_values"]
    got = ours(IMAGE, return_tensors="np")["pixel_values"]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # what it saves is what transformers' would hold
    ours.save_pretrained(tmp_path / "again")
    reread = transformers.PvtImageProcessorPil.from_pretrained(tmp_path / "again", do_convert_rgb=True)
    np.testing.assert_allclose(reread(IMAGE, return_tensors="np")["pixel_values"], expected, rtol=0, atol=1e-6)


def test_from_pretrained_names_an_unknown_setting(tmp_path):
    PvtV2ImageProcessor().save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="do_resise"):
        PvtV2ImageProcessor.from_pretrained(tmp_path, do_resise=False)


def test_the_constructor_takes_do_convert_rgb_as_transformers():
    """``PvtImageProcessor(do_convert_rgb=True)`` is how transformers is told to make grey and RGBA images RGB, which
    ours always does; the keyword was a TypeError. False, which ours cannot do, is refused by name."""
    grey = PIL.Image.fromarray(IMAGE[..., 0])  # mode L
    theirs = transformers.PvtImageProcessorPil(resample=2, do_convert_rgb=True)
    ours = PvtV2ImageProcessor(do_convert_rgb=True)
    np.testing.assert_allclose(ours(grey, return_tensors="np")["pixel_values"],
                               theirs(grey, return_tensors="np")["pixel_values"], rtol=0, atol=1e-6)
    assert ours == PvtV2ImageProcessor()
    with pytest.raises(ValueError, match="do_convert_rgb"):
        PvtV2ImageProcessor(do_convert_rgb=False)


def test_preprocess_is_the_call_as_in_transformers():
    """transformers' processors are also called as ``processor.preprocess(images, ...)``; ours had no such method."""
    theirs = transformers.PvtImageProcessorPil(resample=2, do_convert_rgb=True)
    expected = theirs.preprocess(IMAGE, return_tensors="pt", size=48)["pixel_values"]
    got = PvtV2ImageProcessor().preprocess(IMAGE, return_tensors="pt", size=48)["pixel_values"]
    assert got.shape == expected.shape == (1, 3, 48, 48)
    assert (got - expected).abs().max() < 1e-6
