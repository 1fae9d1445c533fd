"""Hostile pass over load_image's transparency painting (palette and colour-key transparency made white at once, as
PvtV2ImageProcessor and transformers' convert_to_rgb make it): files of every PIL mode and transparency kind read as
transformers reads them, and a 16-bit colour key is painted too (scaled to 8 bits, it had been dropped)."""

from __future__ import annotations

import warnings

import numpy as np
import PIL.Image
import pytest

from pvtv2.data.processing import PvtV2ImageProcessor, load_image

transformers = pytest.importorskip("transformers")
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import load_image as transformers_load_image

H, W = 24, 32


def _files(folder):
    rng = np.random.default_rng(0)
    rgb = (rng.random((H, W, 3)) * 255).astype(np.uint8)
    rgba = np.dstack([rgb, (rng.random((H, W)) * 255).astype(np.uint8)])
    grey = (rng.random((H, W)) * 4).astype(np.uint8) * 60
    index = (rng.random((H, W)) * 8).astype(np.uint8)
    palette = [int(v) for v in (rng.random(24) * 255).astype(np.uint8)]

    def paletted():
        image = PIL.Image.fromarray(index, "P")
        image.putpalette(palette)
        return image

    def exif():
        tags = PIL.Image.Exif()
        tags[0x0112] = 6
        return tags

    frames = [paletted() for _ in range(3)]
    writers = {
        "p_one_index.png": lambda p: paletted().save(p, transparency=3),
        "p_bytes.png": lambda p: paletted().save(p, transparency=bytes([0, 255, 128, 0, 255, 255, 255, 255])),
        "p_short_bytes.png": lambda p: paletted().save(p, transparency=bytes([0, 128])),
        "p_one_index.gif": lambda p: paletted().save(p, transparency=3),
        "rgb_key.png": lambda p: PIL.Image.fromarray(rgb).save(p, transparency=tuple(int(v) for v in rgb[0, 0])),
        "l_key.png": lambda p: PIL.Image.fromarray(grey).save(p, transparency=60),
        "l_key.gif": lambda p: PIL.Image.fromarray(grey).save(p, transparency=60),
        "la.png": lambda p: PIL.Image.fromarray(np.dstack([grey, rgb[..., 0]]), "LA").save(p),
        "pa.webp": lambda p: paletted().convert("PA").save(p, lossless=True),
        "p_key.webp": lambda p: paletted().save(p, transparency=3, lossless=True),
        "rgba.png": lambda p: PIL.Image.fromarray(rgba, "RGBA").save(p),
        "rgba.webp": lambda p: PIL.Image.fromarray(rgba, "RGBA").save(p, lossless=True),
        "rgba.tif": lambda p: PIL.Image.fromarray(rgba, "RGBA").save(p, compression="tiff_lzw"),
        "la.tif": lambda p: PIL.Image.fromarray(np.dstack([grey, grey]), "LA").save(p),
        "p_key.tif": lambda p: paletted().save(p, transparency=3),
        "bilevel_key.png": lambda p: PIL.Image.fromarray(rgb).convert("1").save(p, transparency=0),
        "cmyk.tif": lambda p: PIL.Image.fromarray(rgb).convert("CMYK").save(p),
        "animated_key.gif": lambda p: frames[0].save(p, save_all=True, append_images=frames[1:], transparency=3,
                                                     disposal=2, duration=50),
        "animated.png": lambda p: PIL.Image.fromarray(rgba, "RGBA").save(
            p, save_all=True, append_images=[PIL.Image.fromarray(rgba[::-1].copy(), "RGBA")]),
        "rotated_p_key.png": lambda p: paletted().save(p, transparency=3, exif=exif()),
        "rotated_rgb_key.png": lambda p: PIL.Image.fromarray(rgb).save(
            p, transparency=tuple(int(v) for v in rgb[0, 0]), exif=exif()),
        "rotated_rgba.png": lambda p: PIL.Image.fromarray(rgba, "RGBA").save(p, exif=exif()),
        "rgba.bmp": lambda p: PIL.Image.fromarray(rgba, "RGBA").save(p),
    }
    paths = []
    for name, write in writers.items():
        write(folder / name)
        paths.append(folder / name)
    return paths


def test_every_8bit_transparency_kind_reads_as_transformers_convert_to_rgb(tmp_path):
    painted = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's "palette images with transparency expressed in bytes" warning
        for path in _files(tmp_path):
            theirs = convert_to_rgb(transformers_load_image(str(path)), return_numpy=True)
            ours = np.asarray(load_image(path))
            assert ours.shape == theirs.shape and np.array_equal(ours, theirs), path.name
            plain = np.asarray(transformers_load_image(str(path)))
            painted += int(((ours == 255).all(-1) & ~(plain == 255).all(-1)).sum())
            a = PvtV2ImageProcessor()(str(path), return_tensors="np")["pixel_values"]
            b = transformers.PvtImageProcessorPil(resample=2)(
                transformers_load_image(str(path)), do_convert_rgb=True, return_tensors="np")["pixel_values"]
            assert np.abs(a - b).max() < 1e-6, path.name
    assert painted > 500  # the colour keys and palette indices were there to paint


def test_a_16bit_grey_png_with_a_colour_key_has_its_key_painted_white(tmp_path):
    """A 16-bit greyscale PNG with a tRNS key: scaled to 8 bits (not clipped, as transformers does), the key was
    dropped on the way, so its transparent pixels kept their hidden grey where an 8-bit file's were white."""
    values = np.array([[0, 20000, 40000], [20000, 65535, 20100]], dtype=np.uint16)
    PIL.Image.fromarray(values).save(tmp_path / "key.png", transparency=20000)
    with PIL.Image.open(tmp_path / "key.png") as image:
        assert image.mode == "I;16" and image.info["transparency"] == 20000
    expected = np.where(values == 20000, 255, (2 * values.astype(np.int64) + 257) // 514).astype(np.uint8)
    assert expected[1, 2] == 78  # 20100 is not the key: scaled, as 20000 would have been
    ours = np.asarray(load_image(tmp_path / "key.png"))
    assert np.array_equal(ours, np.repeat(expected[..., None], 3, axis=-1))
    # The processor reads the file and an in-memory copy the same way.
    with PIL.Image.open(tmp_path / "key.png") as image:
        image.load()
        in_memory = PvtV2ImageProcessor()(image, return_tensors="np")["pixel_values"]
    from_file = PvtV2ImageProcessor()(str(tmp_path / "key.png"), return_tensors="np")["pixel_values"]
    white = PvtV2ImageProcessor()(PIL.Image.fromarray(np.repeat(expected[..., None], 3, -1)), return_tensors="np")
    assert np.array_equal(from_file, white["pixel_values"]) and np.array_equal(in_memory, from_file)


def _rgba_picture():
    rng = np.random.default_rng(1)
    rgba = (rng.random((40, 48, 4)) * 255).astype(np.uint8)
    rgba[:20, :, 3] = 0  # the top half fully transparent over a random hidden colour
    return PIL.Image.fromarray(rgba, "RGBA")


def test_the_pictures_of_an_in_memory_transparent_image_show_what_the_model_was_given():
    """An in-memory RGBA (or palette-transparent) image: the processor composites it onto white, but visualize's
    pictures took ``convert("RGB")``, showing (and, for the attention figure, feeding the model) the hidden colours."""
    from conftest import TINY_SMALL_IMAGES

    from pvtv2 import PvtV2Config, PvtV2ForImageClassification
    from pvtv2.visualize import (
        attention_figure,
        depth_picture,
        detection_picture,
        segmentation_picture,
    )

    image = _rgba_picture()
    white = convert_to_rgb(image, return_numpy=True)  # transformers' compositing onto white
    assert (white[:20] == 255).all() and not (np.asarray(image.convert("RGB"))[:20] == 255).all()
    no_boxes = detection_picture(image, np.zeros((0, 4)), [], [], {0: "a"})
    assert np.array_equal(np.asarray(no_boxes), white)
    seg = np.asarray(segmentation_picture(image, np.zeros((40, 48), dtype=np.int64), {0: "bg"}, alpha=0.0,
                                          min_side=1))
    assert np.array_equal(seg[:40, :48], white)
    depth = np.asarray(depth_picture(image, np.ones((40, 48), dtype=np.float32), min_side=1))
    assert np.array_equal(depth[:, :48], white)
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = PvtV2ForImageClassification(PvtV2Config(**TINY_SMALL_IMAGES)).eval()
    ours = np.asarray(attention_figure(model, image, panel_size=64))
    assert np.array_equal(ours, np.asarray(attention_figure(model, PIL.Image.fromarray(white), panel_size=64)))
