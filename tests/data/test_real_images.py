"""Image files as they come: real photographs saved as JPEG and PNG, and the odd ones (CMYK JPEG, float TIFF, an
animated GIF, extreme aspect ratios, one pixel, EXIF rotation), each against transformers' PIL image processor
(``PvtImageProcessorPil``, ``resample=2`` as the published configs say, ``do_convert_rgb=True``) reading the file
through transformers' own ``load_image``; and the hostile ones (empty, text, truncated, a decompression bomb)."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest

from pvtv2 import PvtV2ImageProcessor
from pvtv2.data.processing import load_image

transformers = pytest.importorskip("transformers")
from transformers.image_utils import load_image as transformers_load_image  # noqa: E402

SIZES = [None, {"height": 160, "width": 192}, {"height": 97, "width": 333}]


def _both(path, size):
    kwargs = {} if size is None else {"size": size}
    ours = PvtV2ImageProcessor(**kwargs)(str(path), return_tensors="np")["pixel_values"]
    reference = transformers.PvtImageProcessorPil(resample=2, **kwargs)
    theirs = reference(transformers_load_image(str(path)), do_convert_rgb=True, return_tensors="np")["pixel_values"]
    return ours, theirs


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """scikit-learn's two sample photographs (china.jpg, flower.jpg, 427x640) as JPEG and PNG files."""
    datasets = pytest.importorskip("sklearn.datasets")
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for index, array in enumerate(datasets.load_sample_images().images):
        for suffix, options in ((".jpg", {"quality": 90}), (".png", {})):
            path = folder / f"photo{index}{suffix}"
            PIL.Image.fromarray(array).save(path, **options)
            paths.append(path)
    return paths


@pytest.mark.parametrize("size", SIZES, ids=["default", "160x192", "97x333"])
def test_real_photographs_from_files_match_transformers(photos, size):
    for path in photos:
        ours, theirs = _both(path, size)
        assert ours.shape == theirs.shape == (1, 3, *((224, 224) if size is None else (size["height"], size["width"])))
        assert np.abs(ours - theirs).max() < 1e-6, path.name
        assert ours.std() > 0.5  # a photograph, not a blank: the comparison has something to compare


def _odd_files(folder):
    rng = np.random.default_rng(0)
    rgb = PIL.Image.fromarray((rng.random((60, 80, 3)) * 255).astype(np.uint8))
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    PIL.Image.fromarray(rng.random((40, 50)).astype(np.float32)).save(folder / "float.tif")  # mode F, in [0, 1]
    frames = [PIL.Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8)) for _ in range(3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    PIL.Image.fromarray((rng.random((5000, 1, 3)) * 255).astype(np.uint8)).save(folder / "tall.png")
    PIL.Image.fromarray((rng.random((1, 5000, 3)) * 255).astype(np.uint8)).save(folder / "wide.png")
    PIL.Image.new("RGB", (1, 1), (10, 200, 30)).save(folder / "one.png")
    rgb.convert("1").save(folder / "bilevel.png")
    exif = PIL.Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to display
    rgb.save(folder / "rotated.jpg", exif=exif)
    return sorted(folder.iterdir())


@pytest.mark.parametrize("size", SIZES[:2], ids=["default", "160x192"])
def test_odd_image_files_match_transformers(tmp_path, size):
    for path in _odd_files(tmp_path):
        ours, theirs = _both(path, size)
        assert np.abs(ours - theirs).max() < 1e-6, path.name


def test_odd_files_are_read_as_transformers_reads_them(tmp_path):
    """What each one becomes: the first frame of a GIF, an upright (EXIF-rotated) JPEG, the F TIFF's values as
    transformers' ``convert("RGB")`` takes them."""
    _odd_files(tmp_path)
    with PIL.Image.open(tmp_path / "animated.gif") as gif:
        assert gif.n_frames == 3
        first = np.asarray(gif.convert("RGB"))
    assert np.array_equal(np.asarray(load_image(tmp_path / "animated.gif")), first)
    assert load_image(tmp_path / "rotated.jpg").size == (60, 80)  # stored 80x60, shown rotated
    for name in ("rotated.jpg", "cmyk.jpg", "float.tif", "tall.png"):
        assert np.array_equal(np.asarray(load_image(tmp_path / name)), np.asarray(transformers_load_image(str(tmp_path / name))))


HOSTILE = {
    "empty.jpg": (lambda p: p.write_bytes(b""), "the file is empty"),
    "text.jpg": (lambda p: p.write_text("not an image\n"), "cannot identify image file"),
    "truncated.jpg": (lambda p: p.write_bytes(_jpeg_bytes()[:1500]), "truncated"),
    "truncated.png": (lambda p: p.write_bytes(_png_bytes()[:3000]), "truncated"),
    # 20000x20000: over twice Pillow's MAX_IMAGE_PIXELS, refused before any pixel is decoded.
    "bomb.png": (lambda p: PIL.Image.new("1", (20000, 20000)).save(p), "exceeds limit of .* pixels"),
}


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_image_files_are_one_clear_error(tmp_path, name, monkeypatch):
    make, says = HOSTILE[name]
    path = tmp_path / name
    make(path)
    decoded = []  # the files whose pixels Pillow started decoding (counted, not timed: pytest -n shares the cores)
    load = PIL.ImageFile.ImageFile.load
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda image: decoded.append(image.size) or load(image))
    with pytest.raises(ValueError, match=f"cannot read image {str(path)!r}: .*{says}"):
        PvtV2ImageProcessor()(str(path))
    if name == "bomb.png":
        assert decoded == []  # refused, not decoded


def test_exif_rotation_applies_to_files_not_to_open_images_as_in_transformers(tmp_path):
    """transformers rotates by EXIF where it opens the file (``load_image``, which its processors call for a path)
    and leaves an image the caller opened as it is; so do we. Both against transformers' processor, not only ours."""
    _odd_files(tmp_path)
    path = tmp_path / "rotated.jpg"
    reference = transformers.PvtImageProcessorPil(resample=2, size={"height": 64, "width": 48})
    ours = PvtV2ImageProcessor(size={"height": 64, "width": 48})
    with PIL.Image.open(path) as opened:
        assert opened.size == (80, 60)
        theirs_open = reference(opened, do_convert_rgb=True, return_tensors="np")["pixel_values"]
        ours_open = ours(opened, return_tensors="np")["pixel_values"]
    theirs_path = reference(str(path), do_convert_rgb=True, return_tensors="np")["pixel_values"]
    ours_path = ours(str(path), return_tensors="np")["pixel_values"]
    assert np.abs(ours_open - theirs_open).max() < 1e-6 and np.abs(ours_path - theirs_path).max() < 1e-6
    assert np.abs(ours_path - ours_open).max() > 0.5  # the rotation is there, and only for the path


def _transparent_files(folder):
    rng = np.random.default_rng(3)
    palette = PIL.Image.fromarray(rng.integers(0, 4, (40, 56)).astype(np.uint8), mode="P")
    palette.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0, 90, 90, 90] + [0] * 756)
    palette.save(folder / "palette_trns.png", transparency=1)  # palette index 1 transparent
    palette.save(folder / "palette_trns.gif", transparency=2)
    keyed = PIL.Image.fromarray(np.array(palette.convert("RGB")))
    keyed.save(folder / "colour_key.png", transparency=(0, 255, 0))  # an RGB PNG's tRNS colour key
    return sorted(folder.iterdir())


def test_transparent_pixels_are_white_wherever_an_image_file_is_read(tmp_path):
    """A palette or colour-key transparency is painted white by transformers' processor (convert_to_rgb): the
    processor still equals transformers', and load_image, which the training loaders (classification, segmentation,
    depth, COCO) read their images with, gives those same white pixels (training read the hidden colour)."""
    from transformers.image_transforms import convert_to_rgb

    for path in _transparent_files(tmp_path):
        ours, theirs = _both(path, None)
        assert np.abs(ours - theirs).max() < 1e-6, path.name
        want = np.asarray(convert_to_rgb(transformers_load_image(str(path))))
        got = np.asarray(load_image(path))
        assert (want == 255).all(-1).sum() >= 100, path.name  # the transparent pixels, white
        assert np.array_equal(got, want), path.name
