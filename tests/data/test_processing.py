"""PvtV2ImageProcessor against transformers' slow (PIL) PvtImageProcessor, input by input, to 1e-6."""

from __future__ import annotations

import io
import json
import logging
import re

import numpy as np
import PIL.Image
import pytest
import torch

from pvtv2.data import processing
from pvtv2.data.processing import IMAGENET_MEAN, IMAGENET_STD, PvtV2ImageProcessor, load_image

transformers = pytest.importorskip("transformers")
from transformers import PvtImageProcessorPil  # noqa: E402

TOLERANCE = 1e-6

# What the published OpenGVLab/pvt_v2_* preprocessor configs hold (bilinear, 224x224, ImageNet statistics).
PUBLISHED_CONFIG = {
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "PvtImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 224, "width": 224},
}


def _reference(**kwargs) -> PvtImageProcessorPil:
    """transformers' PIL processor; its class default resample is bicubic, the published configs say bilinear."""
    kwargs.setdefault("resample", 2)
    return PvtImageProcessorPil(do_convert_rgb=True, **kwargs)


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth, photo-like (H, W, 3) uint8 image: a few oriented waves plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width, 1)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 4.0), rng.uniform(0.5, 4.0), rng.uniform(0, 2 * np.pi)
        channels.append(128 + 90 * np.sin(2 * np.pi * (fx * x + fy * y) + phase) + 30 * np.cos(9 * x * y))
    image = np.stack(channels, axis=-1) + rng.normal(0.0, 10.0, (height, width, 3))
    return np.clip(image, 0, 255).round().astype(np.uint8)


def _alpha(height: int, width: int) -> np.ndarray:
    """An (H, W) uint8 alpha ramp that covers fully transparent, partial and opaque pixels."""
    ramp = np.linspace(0, 255, width)[None, :] * np.linspace(0.2, 1.4, height)[:, None]
    return np.clip(ramp, 0, 255).astype(np.uint8)


def _pil(height: int, width: int, mode: str = "RGB", seed: int = 0) -> PIL.Image.Image:
    rgb = PIL.Image.fromarray(_photo(height, width, seed))
    if mode == "RGBA":
        rgb.putalpha(PIL.Image.fromarray(_alpha(height, width)))
        return rgb
    if mode == "LA":
        image = rgb.convert("L")
        image.putalpha(PIL.Image.fromarray(_alpha(height, width)))
        return image.convert("LA")
    if mode == "P":
        return rgb.quantize(colors=64)
    if mode == "P-transparent":
        image = rgb.quantize(colors=64)
        image.info["transparency"] = 5
        return image
    if mode == "I;16":
        return PIL.Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    return rgb.convert(mode)


def _assert_matches(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == torch.float32
    assert ours.shape == theirs.shape
    assert (ours - theirs.float()).abs().max().item() <= TOLERANCE


def _compare(our_input, their_input=None, **kwargs) -> torch.Tensor:
    ours = PvtV2ImageProcessor(**kwargs)(our_input, return_tensors="pt").pixel_values
    theirs = _reference(**kwargs)(our_input if their_input is None else their_input, return_tensors="pt").pixel_values
    _assert_matches(ours, theirs)
    return ours


# ---------------------------------------------------------------------------------------------------- settings


def test_default_config_is_the_published_one():
    assert PvtV2ImageProcessor().to_dict() == PUBLISHED_CONFIG
    assert json.loads(PvtImageProcessorPil(resample=2).to_json_string()) == PUBLISHED_CONFIG
    assert PvtV2ImageProcessor().image_mean == IMAGENET_MEAN
    assert PvtV2ImageProcessor().image_std == IMAGENET_STD


def test_saved_file_is_byte_identical_to_transformers(tmp_path):
    kwargs = {"size": {"height": 256, "width": 192}, "resample": 3, "image_mean": [0.5, 0.4, 0.3]}
    ours = PvtV2ImageProcessor(**kwargs).save_pretrained(tmp_path / "ours").read_text()
    PvtImageProcessorPil(**kwargs).save_pretrained(tmp_path / "theirs")
    assert ours == (tmp_path / "theirs" / "preprocessor_config.json").read_text()


def test_saved_config_loads_in_transformers(tmp_path):
    ours = PvtV2ImageProcessor(size={"height": 160, "width": 96}, resample=3, image_mean=0.5, image_std=[0.2, 0.3, 0.4])
    ours.save_pretrained(tmp_path)
    theirs = PvtImageProcessorPil.from_pretrained(tmp_path)
    auto = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    for loaded in (theirs, auto):
        assert (loaded.size.height, loaded.size.width) == (160, 96)
        assert int(loaded.resample) == 3
        assert loaded.image_mean == 0.5
        assert list(loaded.image_std) == [0.2, 0.3, 0.4]
        assert loaded.rescale_factor == 1 / 255
    image = _pil(123, 77, "RGBA")
    expected = theirs(image, do_convert_rgb=True, return_tensors="pt").pixel_values
    _assert_matches(ours(image).pixel_values, expected)


def test_transformers_config_loads_here(tmp_path):
    theirs = _reference(size={"height": 64, "width": 300}, resample=1, do_normalize=False, rescale_factor=0.5)
    theirs.save_pretrained(tmp_path)
    expected_config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    for source in (tmp_path, str(tmp_path), tmp_path / "preprocessor_config.json"):
        ours = PvtV2ImageProcessor.from_pretrained(source)
        assert {key: value for key, value in ours.to_dict().items() if key in expected_config} == expected_config
    image = _pil(50, 70)
    _assert_matches(ours(image).pixel_values, theirs(image, return_tensors="pt").pixel_values)


def test_unknown_keys_survive_a_round_trip(tmp_path):
    config = dict(PUBLISHED_CONFIG, size={"height": 96, "width": 96}, processor_class="Foo", custom={"a": [1, 2]})
    (tmp_path / "in.json").write_text(json.dumps(config))
    processor = PvtV2ImageProcessor.from_pretrained(tmp_path / "in.json")
    assert processor.size == {"height": 96, "width": 96}
    path = processor.save_pretrained(tmp_path / "out")
    assert json.loads(path.read_text()) == config
    assert PvtV2ImageProcessor.from_pretrained(tmp_path / "out") == processor


def test_folder_without_config_gives_defaults(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pvtv2.data.processing"):
        processor = PvtV2ImageProcessor.from_pretrained(tmp_path)
    assert processor.to_dict() == PUBLISHED_CONFIG
    assert "preprocessor_config.json" in caplog.text


def test_hub_id_is_resolved_through_the_hub_module(tmp_path, monkeypatch):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(dict(PUBLISHED_CONFIG, resample=3)))
    calls = []

    def fake_resolve(source, filename, *, revision=None, cache_dir=None, subfolder=None, local_files_only=False,
                     token=None, required=True):
        calls.append((source, filename, revision, required))
        assert subfolder is None and local_files_only is False and token is None
        return tmp_path / filename

    monkeypatch.setattr(processing, "resolve_file", fake_resolve)
    processor = PvtV2ImageProcessor.from_pretrained("OpenGVLab/pvt_v2_b0", revision="main")
    assert calls == [("OpenGVLab/pvt_v2_b0", "preprocessor_config.json", "main", False)]
    assert processor.resample == 3


def test_missing_config_sources_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        PvtV2ImageProcessor.from_pretrained(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        PvtV2ImageProcessor.from_pretrained(str(tmp_path / "no_such_folder"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        PvtV2ImageProcessor.from_pretrained(tmp_path / "bad.json")
    (tmp_path / "size.json").write_text(json.dumps({"size": {"shortest_edge": 224}}))
    with pytest.raises(ValueError, match="shortest_edge"):
        PvtV2ImageProcessor.from_pretrained(tmp_path / "size.json")


# ---------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("height, width", [(333, 517), (17, 9), (1200, 900), (224, 224), (1, 300)])
def test_pil_rgb_matches_transformers(height, width):
    assert _compare(_pil(height, width)).shape == (1, 3, 224, 224)


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "P-transparent", "CMYK", "1"])
def test_in_memory_pil_modes_match_transformers(mode):
    image = _pil(61, 45, mode)
    assert image.mode == (mode if mode != "P-transparent" else "P")
    _compare(image)


@pytest.mark.parametrize(
    "mode, suffix",
    [("RGB", ".png"), ("RGB", ".jpg"), ("L", ".png"), ("L", ".jpg"), ("RGBA", ".png"), ("LA", ".png"), ("P", ".png"),
     ("P-transparent", ".png")],
)
def test_image_files_match_transformers(tmp_path, mode, suffix):
    path = tmp_path / f"image{suffix}"
    image = _pil(97, 130, mode)
    image.save(path, transparency=image.info["transparency"]) if "transparency" in image.info else image.save(path)
    ours = _compare(path, str(path))
    assert torch.equal(ours, PvtV2ImageProcessor()(str(path)).pixel_values)
    assert load_image(path).mode == "RGB"


def _grey16(values: np.ndarray, mode: str) -> PIL.Image.Image:
    """A 16-bit greyscale PIL image in ``mode`` (I;16 little-endian, I;16B big-endian, or 32-bit I)."""
    if mode == "I":
        return PIL.Image.fromarray(values.astype(np.int32))
    order = ">u2" if mode == "I;16B" else "<u2"
    return PIL.Image.frombytes(mode, (values.shape[1], values.shape[0]), values.astype(order).tobytes())


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
@pytest.mark.parametrize("as_file", [True, False])
def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path, mode, as_file):
    # transformers' convert("RGB") clips 16-bit values at 255: mid grey 32768 would become white. We scale by 257.
    grey16 = _grey16(np.full((40, 40), 32768), mode)
    grey8 = PIL.Image.fromarray(np.full((40, 40), 128, np.uint8))
    if as_file:
        path = tmp_path / ("g16.png" if mode in ("I;16", "I;16B") else "g16.tif")  # PNG cannot hold I;16L or I
        grey16.save(path)
        assert PIL.Image.open(path).mode.startswith("I")
        grey16 = path
    processor = PvtV2ImageProcessor(size={"height": 32, "width": 32})
    ours = processor(grey16, return_tensors="pt").pixel_values
    reference = processor(grey8, return_tensors="pt").pixel_values
    one_level = 1 / 255 / min(IMAGENET_STD)
    assert (ours - reference).abs().max().item() <= one_level
    white = processor(PIL.Image.fromarray(np.full((40, 40), 255, np.uint8)), return_tensors="pt").pixel_values
    assert (ours - white).abs().min().item() > 100 * one_level


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_gradient_keeps_its_order(tmp_path, mode):
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.int64), (8, 1))  # (8, 256), left dark, right light
    path = tmp_path / ("ramp.png" if mode != "I" else "ramp.tif")
    _grey16(ramp, mode).save(path)
    loaded = np.asarray(load_image(path))[0, :, 0].astype(np.int64)
    assert np.array_equal(loaded, (2 * ramp[0] + 257) // 514)  # round(v / 257), halves up, in integers
    assert loaded[0] == 0 and loaded[-1] == 255 and np.all(np.diff(loaded) >= 0)
    assert len(np.unique(loaded)) == 256  # 256 evenly spaced 16-bit levels keep 256 distinct 8-bit levels


def test_thirty_two_bit_grey_outside_sixteen_bits_is_refused(tmp_path):
    PIL.Image.fromarray(np.array([[0, 100, 255]], np.int32)).save(tmp_path / "small.tif")
    assert np.array_equal(np.asarray(load_image(tmp_path / "small.tif"))[0, :, 0], [0, 100, 255])  # 8-bit in 32: kept
    with pytest.raises(ValueError, match=r"values in \[0, 70000\]"):
        PvtV2ImageProcessor()(PIL.Image.fromarray(np.array([[0, 70000]], np.int32)))
    PIL.Image.fromarray(np.array([[-5, 10]], np.int32)).save(tmp_path / "neg.tif")
    with pytest.raises(ValueError, match=r"cannot read image .*neg.tif.*\[-5, 10\]"):
        load_image(tmp_path / "neg.tif")


def test_exif_orientation_matches_transformers(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    PIL.Image.fromarray(_photo(40, 100)).save(path, exif=exif)
    assert load_image(path).size == (40, 100)  # (width, height) after rotation
    _compare(path, str(path), size={"height": 100, "width": 40}, resample=0)


@pytest.mark.parametrize("layout", ["HWC", "CHW", "HW", "HW1", "1HW", "HWC4", "4HW", "ambiguous"])
def test_uint8_arrays_match_transformers(layout):
    rgb = _photo(57, 83)
    rgba = np.concatenate([rgb, _alpha(57, 83)[..., None]], axis=-1)
    grey = rgb[..., 0]
    arrays = {
        "HWC": (rgb, rgb),
        "CHW": (rgb.transpose(2, 0, 1), None),
        "HW": (grey, grey[..., None]),  # transformers takes no (H, W) arrays; (H, W, 1) is the same image
        "HW1": (grey[..., None], None),
        "1HW": (grey[None], None),
        "HWC4": (rgba, None),
        "4HW": (rgba.transpose(2, 0, 1), None),
        "ambiguous": (_photo(3, 50)[:, :3].copy(), None),  # (3, 3, 3): both readings possible, channels first wins
    }
    ours, theirs = arrays[layout]
    _compare(ours, theirs)


@pytest.mark.parametrize("do_rescale", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_float_arrays_in_unit_range_match_transformers(dtype, do_rescale):
    image = (_photo(45, 31) / 255.0).astype(dtype)
    ours = _compare(image, do_rescale=do_rescale)
    if not do_rescale:  # in [0, 1] the processed image is close to the uint8 one (PIL works in uint8 either way)
        uint8 = PvtV2ImageProcessor()(_photo(45, 31)).pixel_values
        assert (ours - uint8).abs().max().item() <= 1 / 255 / min(IMAGENET_STD) + 1e-5


def test_float_to_uint8_conversion_follows_transformers():
    # Floats in [0, 1] reach PIL as uint8(float32(float64(x) * 255)): the float32 step rounds k - 2.55e-10 up to k,
    # the uint8 cast truncates k + 0.7 down to k. Resizing to the same size leaves PIL's pixels untouched.
    k = np.arange(1, 256, dtype=np.float64).reshape(15, 17)
    image = np.stack([k / 255 - 1e-12, (k - 1 + 0.7) / 255, (k - 1 + 0.2) / 255], axis=-1)
    kwargs = {"size": {"height": 15, "width": 17}, "do_rescale": False, "do_normalize": False}
    ours = _compare(image, **kwargs)
    expected = np.stack([k, k - 1, k - 1])[None].astype(np.float32) * np.float32(1 / 255)
    assert np.abs(ours.numpy() - expected).max() <= TOLERANCE


def test_float_arrays_of_whole_numbers_match_transformers():
    image = _photo(45, 31).astype(np.float64)
    ours = _compare(image)
    _assert_matches(ours, PvtV2ImageProcessor()(_photo(45, 31)).pixel_values)
    _compare(np.concatenate([image, np.full((45, 31, 1), 0.5)], axis=-1) / 255.0, do_rescale=False)


def test_float_input_already_scaled_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="pvtv2.data.processing"):
        PvtV2ImageProcessor()(np.full((8, 8, 3), 0.5, dtype=np.float32))
    assert "do_rescale=False" in caplog.text


def test_torch_tensors_match_transformers():
    chw = torch.from_numpy(_photo(70, 40)).permute(2, 0, 1).contiguous()
    _compare(chw)
    _compare(chw.float() / 255, do_rescale=False)
    _compare(chw.float().requires_grad_(), chw.float())
    batch = torch.stack([chw, chw.flip(-1)])
    ours = _compare(batch)
    assert ours.shape == (2, 3, 224, 224)


def test_batch_list_matches_transformers(tmp_path):
    path = tmp_path / "a.png"
    PIL.Image.fromarray(_photo(90, 60, seed=3)).save(path)
    tensor = torch.from_numpy(_photo(64, 64, seed=2)).permute(2, 0, 1)
    ours_inputs = [_pil(333, 517), _photo(20, 30, seed=1), tensor, path]
    their_inputs = ours_inputs[:3] + [str(path)]
    ours = _compare(ours_inputs, their_inputs)
    assert ours.shape == (4, 3, 224, 224)
    single = PvtV2ImageProcessor()(ours_inputs[1]).pixel_values
    assert torch.equal(ours[1:2], single)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": {"height": 160, "width": 96}},
        {"size": 320},
        {"resample": 0},
        {"resample": 1},
        {"resample": 3},
        {"resample": 4},
        {"resample": 5},
        {"do_normalize": False},
        {"do_rescale": False},
        {"rescale_factor": 1 / 127.5, "image_mean": 1.0, "image_std": 1.0},
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    ],
)
def test_non_default_settings_match_transformers(kwargs):
    ours = _compare([_pil(333, 517), _pil(17, 9, "L")], **kwargs)
    size = kwargs.get("size", {"height": 224, "width": 224})
    size = size if isinstance(size, dict) else {"height": size, "width": size}
    assert ours.shape == (2, 3, size["height"], size["width"])


def test_without_resize_sizes_are_kept():
    images = [_photo(33, 44, seed=0), _photo(33, 44, seed=1)]
    assert _compare(images, do_resize=False).shape == (2, 3, 33, 44)
    _compare(images[0].astype(np.float32), do_resize=False)


def test_resample_accepts_names_and_enums():
    assert PvtV2ImageProcessor(resample="bicubic").resample == 3
    assert PvtV2ImageProcessor(resample=PIL.Image.Resampling.NEAREST).resample == 0


# ---------------------------------------------------------------------------------------------------- output


def test_output_is_a_dict_with_attribute_access():
    out = PvtV2ImageProcessor()(_pil(40, 40), return_tensors="pt")
    assert isinstance(out, dict)
    assert list(out) == ["pixel_values"]
    assert out.pixel_values is out["pixel_values"]
    assert out.to(torch.float64).pixel_values.dtype == torch.float64
    with pytest.raises(AttributeError, match="logits"):
        out.logits


def test_numpy_output_equals_tensor_output():
    image = _pil(77, 55)
    as_numpy = PvtV2ImageProcessor()(image, return_tensors="np").pixel_values
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float32
    expected = _reference()(image, return_tensors="np").pixel_values
    assert np.abs(as_numpy - expected).max() <= TOLERANCE
    assert np.array_equal(as_numpy, PvtV2ImageProcessor()(image).pixel_values.numpy())


# ---------------------------------------------------------------------------------------------------- errors


def test_corrupt_file_raises_value_error_naming_it(tmp_path):
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="corrupt.jpg.*cannot identify"):
        PvtV2ImageProcessor()(path)


def test_truncated_file_raises_value_error_naming_it(tmp_path):
    buffer = io.BytesIO()
    PIL.Image.fromarray(_photo(200, 200)).save(buffer, format="PNG")
    path = tmp_path / "truncated.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ValueError, match="truncated.png"):
        PvtV2ImageProcessor()(str(path))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        PvtV2ImageProcessor()(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="folder"):
        load_image(tmp_path)


@pytest.mark.parametrize(
    "shape, reported",
    [
        ((5,), (5,)),
        ((2, 3, 4, 5, 6), (2, 3, 4, 5, 6)),
        ((10, 10, 2), (10, 10, 2)),
        ((10, 10, 5), (10, 10, 5)),
        ((5, 10, 10), (5, 10, 10)),
        ((2, 7, 7, 6), (7, 7, 6)),  # a batch of two (7, 7, 6) images
        ((3, 0, 4), (3, 0, 4)),
    ],
)
def test_bad_array_shapes_raise_naming_the_shape(shape, reported):
    with pytest.raises(ValueError, match=re.escape(str(reported))):
        PvtV2ImageProcessor()(np.zeros(shape, dtype=np.uint8))


@pytest.mark.parametrize("dtype", [np.complex64, np.bool_, object, np.str_])
def test_unsupported_dtypes_raise_type_error_naming_it(dtype):
    array = np.zeros((8, 8, 3), dtype=dtype)
    with pytest.raises(TypeError, match=np.dtype(dtype).name if dtype is not np.str_ else "<U"):
        PvtV2ImageProcessor()(array)
    if dtype in (np.complex64, np.bool_):
        tensor = torch.zeros((3, 8, 8), dtype=torch.complex64 if dtype is np.complex64 else torch.bool)
        with pytest.raises(TypeError, match=str(tensor.dtype)):
            PvtV2ImageProcessor()(tensor)


def test_bad_values_and_inputs_raise():
    processor = PvtV2ImageProcessor()
    with pytest.raises(ValueError, match="empty list"):
        processor([])
    with pytest.raises(ValueError, match="empty batch"):
        processor(torch.zeros((0, 3, 8, 8)))
    with pytest.raises(ValueError, match=r"\[0\.0, 2\.5\]"):
        processor(np.linspace(0, 2.5, 192).reshape(8, 8, 3))
    with pytest.raises(ValueError, match="NaN"):
        processor(np.full((8, 8, 3), np.nan))
    with pytest.raises(TypeError, match="int"):
        processor(3)
    with pytest.raises(ValueError, match="'tf'"):
        processor(_photo(8, 8), return_tensors="tf")
    with pytest.raises(ValueError, match=r"\(3, 8, 8\), \(3, 9, 9\)"):
        PvtV2ImageProcessor(do_resize=False)([_photo(8, 8), _photo(9, 9)])


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"size": {"shortest_edge": 224}}, ValueError, "shortest_edge"),
        ({"size": {"height": 0, "width": 3}}, ValueError, "'height': 0"),
        ({"resample": 9}, ValueError, "9"),
        ({"resample": "cubic-ish"}, ValueError, "cubic-ish"),
        ({"image_mean": [0.5, 0.5]}, ValueError, r"\[0\.5, 0\.5\]"),
        ({"image_std": [0.2, 0.0, 0.2]}, ValueError, "image_std"),
        ({"do_resize": "yes"}, TypeError, "'yes'"),
        ({"rescale_factor": float("inf")}, ValueError, "inf"),
    ],
)
def test_bad_settings_raise(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        PvtV2ImageProcessor(**kwargs)


# ---------------------------------------------------------------------------------------------------- protocols
# The centre-crop protocols against the code that defines them, on real photographs (scikit-learn's two sample
# images, 427x640), whole and cut so that every kind of crop margin occurs: even, odd with the half rounded down,
# odd with the half rounded up (where torchvision's and transformers' crop positions differ).


def _sample_photos() -> list[PIL.Image.Image]:
    datasets = pytest.importorskip("sklearn.datasets")
    photos = []
    for array in datasets.load_sample_images().images:  # china.jpg, flower.jpg: (427, 640, 3) uint8
        photos += [
            PIL.Image.fromarray(array),
            PIL.Image.fromarray(np.ascontiguousarray(array.transpose(1, 0, 2))),  # portrait, 640x427
            PIL.Image.fromarray(array[:, :639]),
            PIL.Image.fromarray(array[:425, 7:]),
            PIL.Image.fromarray(array[31:332, 100:597]),
        ]
    return photos


def _deit_eval_transform(size: int):
    """The original repository's build_transform(is_train=False) (classification/datasets.py), written out with
    torchvision as it is there."""
    transforms = pytest.importorskip("torchvision.transforms")
    return transforms.Compose(
        [
            transforms.Resize(int((256 / 224) * size), interpolation=3),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def test_timm_protocol_matches_timms_eval_transform_for_pvt_v2_b0():
    timm = pytest.importorskip("timm")
    from timm.data import create_transform, resolve_data_config

    data_config = resolve_data_config({}, model=timm.create_model("pvt_v2_b0", pretrained=False))
    assert (data_config["crop_pct"], data_config["interpolation"]) == (0.9, "bicubic")
    reference = create_transform(**data_config)
    processor = PvtV2ImageProcessor.from_protocol("timm")
    for photo in _sample_photos():
        ours = processor(photo).pixel_values
        _assert_matches(ours, reference(photo)[None])


@pytest.mark.parametrize("image_size", [224, 160])
def test_original_protocol_matches_the_authors_build_transform(image_size):
    reference = _deit_eval_transform(image_size)
    processor = PvtV2ImageProcessor.from_protocol("original", image_size)
    for photo in _sample_photos():
        ours = processor(photo).pixel_values
        assert ours.shape == (1, 3, image_size, image_size)
        _assert_matches(ours, reference(photo)[None])


def test_timm_protocol_at_another_size_matches_timm():
    pytest.importorskip("timm")
    from timm.data import create_transform

    reference = create_transform(input_size=192, crop_pct=0.9, interpolation="bicubic")
    processor = PvtV2ImageProcessor.from_protocol("timm", 192)
    assert processor.size == {"shortest_edge": 213}  # floor(192 / 0.9)
    for photo in _sample_photos()[:5]:
        _assert_matches(processor(photo).pixel_values, reference(photo)[None])


def test_transformers_protocol_is_the_published_default():
    assert PvtV2ImageProcessor.from_protocol("transformers") == PvtV2ImageProcessor()
    assert PvtV2ImageProcessor().protocol == "transformers"
    for name in ("timm", "original"):
        assert PvtV2ImageProcessor.from_protocol(name, 288).protocol == name
    assert PvtV2ImageProcessor(resample=3).protocol is None


def test_resize_then_crop_matches_torchvision():
    transforms = pytest.importorskip("torchvision.transforms")
    reference = transforms.Compose(
        [
            transforms.Resize((256, 240), interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop((224, 201)),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    processor = PvtV2ImageProcessor(size={"height": 256, "width": 240}, do_center_crop=True, crop_size=(224, 201))
    for photo in _sample_photos()[:3]:
        _assert_matches(processor(photo).pixel_values, reference(photo)[None])


def test_protocol_config_round_trips_and_transformers_reads_it(tmp_path):
    processor = PvtV2ImageProcessor.from_protocol("timm")
    path = processor.save_pretrained(tmp_path)
    saved = json.loads(path.read_text())
    assert saved["size"] == {"shortest_edge": 248}
    assert (saved["do_center_crop"], saved["crop_size"], saved["crop_pct"]) == (True, {"height": 224, "width": 224}, 0.9)
    assert PvtV2ImageProcessor.from_pretrained(tmp_path) == processor
    assert PvtV2ImageProcessor.from_pretrained(tmp_path).protocol == "timm"

    # transformers writes the same settings byte for byte ...
    PvtImageProcessorPil(
        size={"shortest_edge": 248}, do_center_crop=True, crop_size={"height": 224, "width": 224}, crop_pct=0.9,
        resample=3,
    ).save_pretrained(tmp_path / "theirs")
    assert path.read_text() == (tmp_path / "theirs" / "preprocessor_config.json").read_text()
    # ... and reads ours without error, resizing the shorter side and cropping as we do.
    theirs = PvtImageProcessorPil.from_pretrained(tmp_path)
    auto = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    for loaded in (theirs, auto):
        assert loaded.size.shortest_edge == 248 and loaded.do_center_crop
        assert (loaded.crop_size.height, loaded.crop_size.width) == (224, 224)
    shifted = 0
    for photo in _sample_photos():
        ours = processor(photo).pixel_values
        expected = theirs(photo, return_tensors="pt").pixel_values
        # Margins whose half torchvision rounds up put transformers' crop one pixel to the left or the top.
        resized = (248, int(248 * photo.width / photo.height)) if photo.width > photo.height else (
            int(248 * photo.height / photo.width), 248)
        top, left = ((m - 224) / 2 for m in resized)
        dy, dx = round(top) - int(top), round(left) - int(left)
        shifted += dy + dx
        _assert_matches(ours[..., : 224 - dy, : 224 - dx], expected[..., dy:, dx:])
    assert shifted >= 2  # the comparison covered crops at both positions


def test_shortest_edge_config_written_by_transformers_loads_here(tmp_path):
    PvtImageProcessorPil(
        size={"shortest_edge": 256}, do_center_crop=True, crop_size={"height": 224, "width": 224}, resample=3
    ).save_pretrained(tmp_path)
    processor = PvtV2ImageProcessor.from_pretrained(tmp_path)
    assert processor.protocol is None and processor.crop_pct is None  # no crop_pct in the file
    assert processor.output_size == (224, 224)
    photo = _sample_photos()[3]  # 425x633 -> 256x381: margins 32 and 157, whose half rounds down (the same crop)
    reference = _deit_eval_transform(224)(photo)[None]
    _assert_matches(PvtImageProcessorPil.from_pretrained(tmp_path)(photo, return_tensors="pt").pixel_values, reference)
    _assert_matches(processor(photo).pixel_values, reference)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"crop_pct": 0.0}, ValueError, r"crop_pct must be in \(0, 1\]"),
        ({"crop_pct": 1.5}, ValueError, r"crop_pct must be in \(0, 1\]"),
        ({"crop_pct": "0.9"}, TypeError, "crop_pct must be a number"),
        ({"crop_pct": 0.9, "size": (224, 160)}, ValueError, "square size"),
        ({"crop_pct": 0.9, "do_center_crop": False}, ValueError, "do_center_crop is False"),
        ({"do_center_crop": True}, ValueError, "needs a crop_size"),
        ({"do_center_crop": "yes", "crop_size": 8}, TypeError, "do_center_crop"),
        ({"size": {"shortest_edge": 200}, "do_center_crop": True, "crop_size": 224}, ValueError, "does not fit"),
        ({"size": 200, "do_center_crop": True, "crop_size": 224}, ValueError, "larger than the resized"),
        ({"size": {"shortest_edge": 256}, "crop_size": 224, "crop_pct": 0.9}, ValueError, "does not match"),
        ({"size": {"shortest_edge": 0}, "do_center_crop": True, "crop_size": 8}, ValueError, "shortest_edge"),
        ({"size": {"shortest_edge": 248}}, ValueError, "do_center_crop=True"),
        ({"crop_size": {"h": 3}, "do_center_crop": True}, ValueError, "crop_size must have"),
    ],
)
def test_bad_crop_settings_raise(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        PvtV2ImageProcessor(**kwargs)


def test_bad_protocol_and_crop_inputs_raise(tmp_path):
    with pytest.raises(ValueError, match="unknown preprocessing protocol 'deit'.*original"):
        PvtV2ImageProcessor.from_protocol("deit")
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        PvtV2ImageProcessor.from_protocol("timm", 0)
    with pytest.raises(ValueError, match="cannot centre-crop 32x32 from an image of 20x40"):
        PvtV2ImageProcessor(do_resize=False, do_center_crop=True, crop_size=32)(_photo(20, 40))
    (tmp_path / "c.json").write_text(json.dumps(dict(PUBLISHED_CONFIG, do_center_crop=True)))
    with pytest.raises(ValueError, match="c.json.*crop_size"):
        PvtV2ImageProcessor.from_pretrained(tmp_path / "c.json")
