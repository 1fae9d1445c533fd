"""What a seeded fuzz of image inputs found, and a compact seeded fuzz against transformers.

The defects: ``predict`` preprocessed and ran a whole batch in one call, so one image the preprocessing refused (a
1 x 50000 strip whose shortest-edge resize passes the pixel limit), one too small for the model, or images of
different sizes under a no-resize preprocessing (``do_resize: false``; the authors' protocol at 32 px or less) ended
the run with every other image's result; ``evaluate`` could not score a dataset of mixed sizes without a resize.
A PNG or WebP whose EXIF block is cut short (fewer than 8 bytes) made ``load_image`` raise PIL's ``struct.error``
(transformers' ``load_image`` raises it too) instead of a ValueError naming the file: ``predict`` stopped with a
traceback, and the training scan let the file through to fail mid-epoch.

The fuzz: random PIL images of many modes, saved in several formats (EXIF orientations, ICC profiles, animated
frames), and random arrays, through random settings, against transformers' PIL processor (``PvtImageProcessorPil``,
``do_convert_rgb=True``) on the same input; a centre crop placed as torchvision places it (the module docstring:
transformers floors the offset), 16-bit greyscale scaled ``round(v / 257)`` first (documented: transformers clips).
"""

from __future__ import annotations

import io
import logging
import math
import struct
import zlib

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch

from conftest import TINY_SHALLOW
from pvtv2 import PvtV2Config, PvtV2ForImageClassification, PvtV2ImageProcessor
from pvtv2.data.folders import scan_split
from pvtv2.data.processing import load_image
from pvtv2.inference import evaluate, predict

transformers = pytest.importorskip("transformers")

LABELS = {0: "cat", 1: "dog", 2: "fish"}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(31)
    net = PvtV2ForImageClassification(PvtV2Config(**TINY_SHALLOW, id2label=LABELS, image_size=64))
    with torch.no_grad():  # off the initial values, so that the classes' scores differ from image to image
        for p in net.parameters():
            p.add_(torch.randn(p.shape) * 0.2)
    return net.eval()


def _save(path, height, width, seed):
    rng = np.random.default_rng(seed)
    PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return str(path)


def _direct(model, processor, path, k):
    """Top-k of the processor and the model called directly on one image file."""
    pixel_values = processor(path, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probs = model(pixel_values).logits.softmax(-1)[0]
    scores, indices = probs.topk(k)
    return indices.tolist(), scores.tolist()


def _check_predictions(model, processor, results, readable, k=2):
    by_name = {r.image: r for r in results}
    for path in readable:
        r = by_name[path]
        assert r.error is None, r.error
        indices, scores = _direct(model, processor, path, k)
        assert r.indices == indices and r.labels == [LABELS[i] for i in indices]
        np.testing.assert_allclose(r.scores, scores, rtol=0, atol=1e-6)


def test_predict_without_a_resize_takes_images_of_different_sizes(model, tmp_path):
    """``do_resize: false`` keeps each image's size; the batch was stacked in one call and the run failed with
    "images of different sizes cannot be batched", losing every result. Now each size is its own forward pass and
    the top-k are those of the processor and model called on each image alone."""
    processor = PvtV2ImageProcessor(do_resize=False)
    paths = [_save(tmp_path / "a.png", 64, 64, 1), _save(tmp_path / "b.png", 40, 72, 2),
             _save(tmp_path / "c.png", 64, 64, 3), _save(tmp_path / "d.png", 48, 33, 4)]
    results = predict(model, processor, paths, top_k=2, batch_size=4)
    assert [r.image for r in results] == paths
    _check_predictions(model, processor, results, paths)


def test_predict_reports_an_image_the_preprocessing_refuses_and_keeps_the_others(model, tmp_path):
    """A 1 x 50000 strip under a shortest-edge resize to 64 would be 3,200,000 x 64 pixels, past the processor's
    limit (twice PIL's MAX_IMAGE_PIXELS): refused by name. It was refused inside the batch's call, ending the run;
    the docs promise an unreadable image costs its own result only, and so does one the preprocessing refuses."""
    processor = PvtV2ImageProcessor(size={"shortest_edge": 64}, do_center_crop=True, crop_size=64)
    good = [_save(tmp_path / "a.png", 50, 70, 1), _save(tmp_path / "c.png", 90, 64, 3)]
    strip = _save(tmp_path / "b_strip.png", 1, 50000, 2)
    broken = tmp_path / "d.png"
    broken.write_bytes(b"not an image at all")
    paths = [good[0], strip, good[1], str(broken)]
    results = predict(model, processor, paths, top_k=2, batch_size=4)
    assert [r.image for r in results] == paths
    errors = {r.image: r.error for r in results if r.error is not None}
    assert sorted(errors) == sorted([strip, str(broken)])
    assert strip in errors[strip] and "cannot resize to 64 x 3200000" in errors[strip]
    assert str(broken) in errors[str(broken)] and "cannot identify" in errors[str(broken)]
    _check_predictions(model, processor, results, good)


def test_predict_reports_an_image_too_small_for_the_model(model, tmp_path):
    """Without a resize a 4000 x 1 strip reaches the model at its size: stage 1's 1000x1 token grid is smaller than
    its spatial reduction. The model's error ended the run; now that image is named with the model's reason."""
    processor = PvtV2ImageProcessor(do_resize=False)
    good = _save(tmp_path / "a.png", 64, 64, 1)
    strip = _save(tmp_path / "strip.png", 4000, 1, 2)
    results = predict(model, processor, [good, strip], top_k=3, batch_size=2)
    assert results[1].error is not None and strip in results[1].error and "too small for this model" in results[1].error
    _check_predictions(model, processor, results[:1], [good], k=3)


def test_evaluate_without_a_resize_scores_images_of_different_sizes(model, tmp_path):
    """The authors' protocol at 32 px or less does not resize; a dataset of mixed sizes failed to batch. Now its
    accuracy and loss are those of the model on each image alone."""
    processor = PvtV2ImageProcessor(do_resize=False)
    samples = []
    for label, name in LABELS.items():
        (tmp_path / name).mkdir()
        for j, (h, w) in enumerate([(64, 64), (48, 80), (72, 40)]):
            samples.append((_save(tmp_path / name / f"{j}.png", h, w, 10 * label + j), label))
    metrics = evaluate(model, processor, tmp_path, batch_size=4)
    logits = []
    with torch.no_grad():
        for path, _ in samples:
            logits.append(model(processor(path, return_tensors="pt")["pixel_values"]).logits[0])
    logits = torch.stack(logits)
    labels = torch.tensor([label for _, label in samples])
    assert metrics["images"] == len(samples)
    assert metrics["top1"] == int((logits.argmax(-1) == labels).sum()) / len(samples)
    expected_loss = float(torch.nn.functional.cross_entropy(logits, labels))
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-5)


@pytest.mark.parametrize("processor, size, says", [
    (PvtV2ImageProcessor(size={"shortest_edge": 64}, do_center_crop=True, crop_size=64), (1, 50000), "cannot resize to"),
    (PvtV2ImageProcessor(do_resize=False), (4000, 1), "too small for this model"),
], ids=["resize-limit", "too-small"])
def test_evaluate_names_the_image_it_cannot_take(model, tmp_path, processor, size, says):
    """Evaluation stops at such an image (an accuracy over fewer images would mislead), but its error said neither
    which image nor where: the processor's limit or the model's size check, for a whole batch."""
    for label, name in LABELS.items():
        (tmp_path / name).mkdir()
        _save(tmp_path / name / "0.png", 64, 64, label)
    strip = _save(tmp_path / "dog" / "1.png", *size, 9)
    with pytest.raises(ValueError, match=says) as caught:
        evaluate(model, processor, tmp_path, batch_size=4)
    assert f"cannot evaluate image {strip!r}" in str(caught.value)


def _png_with_exif(path, exif: bytes, seed: int = 0):
    """A valid 4x5 RGB PNG with an eXIf chunk holding ``exif`` (its CRC right, so PIL reads it)."""
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    PIL.Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = buffer.getvalue()
    chunk = struct.pack(">I", len(exif)) + b"eXIf" + exif + struct.pack(">I", zlib.crc32(b"eXIf" + exif))
    path.write_bytes(data[:33] + chunk + data[33:])  # after the signature (8) and IHDR (25)
    return str(path)


def _webp_with_exif(path, exif: bytes):
    PIL.Image.fromarray(np.full((4, 5, 3), 90, np.uint8)).save(path, "WEBP", exif=exif)
    return str(path)


@pytest.mark.parametrize("make", [_png_with_exif, _webp_with_exif], ids=["png", "webp"])
def test_a_cut_short_exif_block_is_a_value_error_naming_the_file(tmp_path, make):
    """Six bytes of a TIFF header: PIL's TIFF reader unpacks past their end (struct.error), in transformers'
    load_image as in ours. Now a ValueError naming the file and its EXIF."""
    from transformers.image_utils import load_image as transformers_load_image

    path = make(tmp_path / f"cut.{make.__name__[1:5]}", b"MM\x00*\x00\x00")
    with pytest.raises(struct.error):
        transformers_load_image(path)
    with pytest.raises(ValueError, match="EXIF data is corrupt") as caught:
        load_image(path)
    assert repr(path) in str(caught.value)


def test_an_exif_block_that_is_no_tiff_is_named_as_the_exif(tmp_path):
    """PIL's own words for it, "not a TIFF file", in a PNG's error read as if the PNG were not one; the message now
    says that it is the EXIF block."""
    path = _png_with_exif(tmp_path / "bad_exif.png", b"XX\x00*\x00\x00\x00\x08")
    with pytest.raises(ValueError, match=r"its EXIF data is corrupt \(not a TIFF file") as caught:
        load_image(path)
    assert repr(path) in str(caught.value)
    with PIL.Image.open(path) as image:  # the pixels themselves decode: only the EXIF is broken
        image.load()
        assert image.size == (5, 4)


def test_predict_reports_a_cut_short_exif_block_and_keeps_the_others(model, tmp_path):
    processor = PvtV2ImageProcessor(size=64)
    good = _save(tmp_path / "a.png", 50, 70, 1)
    cut = _png_with_exif(tmp_path / "b.png", b"II*\x00")
    results = predict(model, processor, [good, cut], top_k=2, batch_size=2)
    assert results[1].image == cut and "EXIF data is corrupt" in results[1].error and repr(cut) in results[1].error
    _check_predictions(model, processor, results[:1], [good])


def test_the_training_scan_skips_an_image_whose_exif_cannot_be_read(tmp_path, caplog):
    """The scan (verify and a full decode) passed such a file, and training then stopped at it in load_image."""
    for name in ("a", "b"):
        (tmp_path / "train" / name).mkdir(parents=True)
        _save(tmp_path / "train" / name / "0.png", 8, 8, ord(name))
    cut = _png_with_exif(tmp_path / "train" / "b" / "1.png", b"MM\x00*\x00\x00")
    with caplog.at_level(logging.WARNING):
        classes, samples = scan_split(tmp_path, "train", verify=True)
    assert classes == ["a", "b"]
    assert sorted(samples) == [(str(tmp_path / "train" / "a" / "0.png"), 0), (str(tmp_path / "train" / "b" / "0.png"), 1)]
    assert cut in caplog.text


# ----------------------------------------------------------------------------------------- compact seeded fuzz

# What each format can hold: PIL's writers, the modes the fuzz draws for them ("PT": a palette with a transparent
# index).
_SAVABLE = {
    "PNG": ["1", "L", "LA", "P", "PT", "RGB", "RGBA", "I;16"],
    "JPEG": ["L", "RGB", "CMYK"],
    "WEBP": ["RGB", "RGBA"],
    "GIF": ["P", "PT", "L"],
    "BMP": ["1", "L", "P", "RGB"],
    "TIFF": ["L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "F"],
}
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L")
_REFERENCE = transformers.PvtImageProcessorPil(resample=2, do_convert_rgb=True)


def _picture(rng, height, width):
    """Photograph-like content: smooth colour fields (bicubic upsampled noise) with a little grain."""
    coarse = PIL.Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), PIL.Image.Resampling.BICUBIC)).astype(np.int16)
    return np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)


def _fuzz_image(rng, mode, height, width):
    rgb = PIL.Image.fromarray(_picture(rng, height, width))
    if mode in ("P", "PT"):
        image = rgb.quantize(colors=int(rng.integers(2, 257)))
        if mode == "PT":
            image.info["transparency"] = int(rng.integers(0, 4))
        return image
    if mode == "I;16":
        grey = np.asarray(rgb.convert("L")).astype(np.uint32) * 257 + rng.integers(0, 257, (height, width))
        return PIL.Image.frombytes("I;16", (width, height), np.minimum(grey, 65535).astype("<u2").tobytes())
    if mode == "F":
        return PIL.Image.fromarray((np.asarray(rgb.convert("L")) / 255).astype(np.float32))
    if mode in ("LA", "RGBA"):
        image = rgb.convert(mode)
        image.putalpha(PIL.Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
        return image
    return rgb.convert(mode)


def _fuzz_settings(rng):
    settings = {}
    draw = rng.integers(5)
    if draw == 0:
        settings["size"] = {"height": int(rng.integers(1, 130)), "width": int(rng.integers(1, 130))}
    elif draw == 1:
        settings["size"] = int(rng.integers(1, 130))
    elif draw == 2:
        shortest = int(rng.integers(8, 130))
        settings.update(size={"shortest_edge": shortest}, do_center_crop=True,
                        crop_size={"height": int(rng.integers(1, shortest + 1)), "width": int(rng.integers(1, shortest + 1))})
    elif draw == 3:
        settings.update(size=int(rng.integers(8, 120)), crop_pct=float(rng.choice([0.875, 0.9, 0.95, 1.0])))
    if rng.random() < 0.5:
        settings["resample"] = int(rng.integers(0, 6))
    if rng.random() < 0.2:
        settings["rescale_factor"] = float(rng.uniform(0.001, 0.01))
    if rng.random() < 0.2:
        settings["do_normalize"] = False
    elif rng.random() < 0.2:
        settings.update(image_mean=[float(v) for v in rng.uniform(-1, 1, 3)],
                        image_std=[float(v) for v in rng.uniform(0.1, 2, 3)])
    return settings


def _transformers_pixels(image, settings):
    """transformers' pixels for ``settings``: a crop_pct as its shortest_edge and square crop; a centre crop taken
    where torchvision's CenterCrop takes it (the documented difference: transformers floors the offset)."""
    settings = dict(settings)
    crop = None
    if "crop_pct" in settings:
        side = settings.pop("size")
        settings["size"] = {"shortest_edge": math.floor(side / settings.pop("crop_pct"))}
        crop = (side, side)
    elif settings.pop("do_center_crop", False):
        box = settings.pop("crop_size")
        crop = (box["height"], box["width"])
    if isinstance(settings.get("size"), int):
        settings["size"] = {"height": settings["size"], "width": settings["size"]}
    if crop is None:
        return _REFERENCE(image, return_tensors="np", **settings)["pixel_values"][0]
    resize = {key: settings.pop(key) for key in ("size", "resample") if key in settings}
    resized = _REFERENCE(image, return_tensors="np", do_rescale=False, do_normalize=False, **resize)["pixel_values"][0]
    _, height, width = resized.shape
    top, left = round((height - crop[0]) / 2), round((width - crop[1]) / 2)
    window = np.ascontiguousarray(resized[:, top : top + crop[0], left : left + crop[1]])
    return _REFERENCE(window, return_tensors="np", do_resize=False, input_data_format="channels_first",
                      **settings)["pixel_values"][0]


def test_seeded_fuzz_of_image_files_against_transformers(tmp_path):
    """Forty image files (every mode each format is drawn with, then random ones; EXIF orientations; sizes from 1x1
    to 1x900 strips) through forty random settings: our processor given the path equals transformers' given the
    same path (its own load_image), to float32 rounding. 16-bit greyscale goes to transformers scaled to 8 bits as documented, ``round(v / 257)``,
    computed here independently."""
    rng = np.random.default_rng(3131)
    pairs = [(fmt, mode) for fmt in sorted(_SAVABLE) for mode in _SAVABLE[fmt]]  # each one once, then drawn
    pairs += [pairs[int(i)] for i in rng.integers(len(pairs), size=40 - len(pairs))]
    compared = set()
    for case, (fmt, mode) in enumerate(pairs):
        height, width = [(1, 1), (1, 900), (700, 1), (int(rng.integers(2, 90)), int(rng.integers(2, 90)))][case % 4]
        image = _fuzz_image(rng, mode, height, width)
        path = str(tmp_path / f"{case}.{fmt.lower()}")
        options = {}
        if fmt in ("PNG", "JPEG", "WEBP", "TIFF") and rng.random() < 0.5:
            exif = PIL.Image.Exif()
            exif[0x0112] = int(rng.integers(1, 9))
            options["exif"] = exif.tobytes()
        image.save(path, format=fmt, **options)
        settings = _fuzz_settings(rng)
        ours = PvtV2ImageProcessor(**settings)(path, return_tensors="np")["pixel_values"][0]
        with PIL.Image.open(path) as stored:
            stored_mode = stored.mode
            if stored_mode in _SIXTEEN_BIT:
                values = np.asarray(PIL.ImageOps.exif_transpose(stored)).astype(np.int64)
                reference_input = PIL.Image.fromarray(((2 * values + 257) // 514).astype(np.uint8))
            else:
                reference_input = path
            expected = _transformers_pixels(reference_input, settings)
        assert ours.shape == expected.shape, (case, path, stored_mode, settings)
        scale = max(1.0, float(np.abs(expected).max()))
        assert np.abs(ours - expected).max() <= 1e-6 * scale, (case, path, stored_mode, settings)
        compared.add((fmt, stored_mode))
    assert {"I;16", "F", "CMYK", "YCbCr", "LA", "RGBA", "P", "1"} <= {mode for _, mode in compared}


def test_seeded_fuzz_of_arrays_and_mixed_batches_against_transformers():
    """Thirty random in-memory inputs (NumPy HWC/CHW in uint8, float32 in [0, 1], float64 whole numbers; torch
    tensors; PIL images with alpha) alone and as one mixed batch per call, against transformers one by one."""
    rng = np.random.default_rng(3132)
    for case in range(10):
        settings = _fuzz_settings(rng)
        inputs, references = [], []
        for _ in range(3):
            height, width = int(rng.integers(1, 70)), int(rng.integers(1, 70))
            picture = _picture(rng, height, width)
            kind = int(rng.integers(5))
            if kind == 0:
                item = picture
            elif kind == 1:
                item = np.ascontiguousarray(np.moveaxis(picture, -1, 0))
            elif kind == 2:
                item = (picture / 255).astype(np.float32)
            elif kind == 3:
                item = torch.from_numpy(picture.astype(np.float64))
            else:
                item = _fuzz_image(rng, "RGBA", height, width)
            inputs.append(item)
            references.append(_transformers_pixels(item, settings))
        rescale = settings.get("rescale_factor", 1 / 255)
        for item, expected in zip(inputs, references):
            got = PvtV2ImageProcessor(**settings)(item, return_tensors="np")["pixel_values"][0]
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * max(1.0, float(np.abs(expected).max())),
                                       err_msg=f"{case} {settings} {rescale}")
        batch = PvtV2ImageProcessor(**settings)(inputs, return_tensors="pt")["pixel_values"]
        np.testing.assert_allclose(batch.numpy(), np.stack(references), rtol=0, atol=1e-5)
