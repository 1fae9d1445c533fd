"""Hostile inputs to `pvtv2 depth` and to depth training / evaluation: depth PNGs that are no depth maps (a
decompression bomb's header, truncated, 8-bit, another size than their image), images in other modes (grey, RGBA,
16-bit, EXIF-rotated: each against the upright RGB photograph, made here with PIL), and checkpoints of the wrong
task. The images are crops of scikit-learn's two sample photographs."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from pvtv2 import PvtV2Config, PvtV2ForImageClassification
from pvtv2.cli import main
from pvtv2.data.depth import DepthFolder, read_depth_png, write_depth_png
from pvtv2.inference import predict_depth
from pvtv2.models.depth import PvtV2ForDepthEstimation

TINY = dict(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 40, 48], num_attention_heads=[1, 2, 5, 8],
            mlp_ratios=[2, 2, 2, 2], decoder_hidden_size=16)


def _photo(index: int = 0) -> np.ndarray:
    """A 64x96 RGB crop of a real photograph (every 6th pixel of scikit-learn's sample image)."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    return np.ascontiguousarray(sklearn_datasets.load_sample_images().images[index][::6, ::6][:64, :96])


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A 16-bit greyscale PNG that claims width x height pixels and holds almost no data: Pillow refuses such a
    size at open (a decompression bomb) before decoding anything."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


# ---------------------------------------------------------------------------------------------- depth PNGs
def test_a_decompression_bomb_depth_map_is_refused_naming_the_file(tmp_path):
    """Pillow's DecompressionBombError came through as it was: no file named (a data set has thousands) and, in
    training, a traceback in place of the one-line error every other unreadable depth map gets."""
    path = _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(ValueError, match=r"cannot read depth map .*bomb\.png.*400000000 pixels"):
        read_depth_png(path)


def _depth_data(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "depth").mkdir()
        for i in range(2):
            PIL.Image.fromarray(_photo(i)).save(root / split / "images" / f"{i}.png")
            write_depth_png(root / split / "depth" / f"{i}.png", rng.uniform(0.5, 9.0, (64, 96)))
    return root


def test_training_on_a_decompression_bomb_depth_map_is_one_line_naming_it(tmp_path, capsys):
    data = _depth_data(tmp_path / "data")
    _png_header_only(data / "val" / "depth" / "0.png", 20000, 20000)
    out = tmp_path / "run"
    code = main(["train", "--task", "depth", "--data", str(data), "--model", "tiny", "--output", str(out),
                 "--epochs", "1", "--image-size", "64", "--batch-size", "2", "--no-progress", "--workers", "0"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    assert lines[-1].startswith("pvtv2 train: error: cannot read depth map") and "0.png" in lines[-1], lines


def test_truncated_eight_bit_and_misfit_depth_maps_are_refused_by_name(tmp_path):
    good = tmp_path / "good.png"
    values = np.random.default_rng(1).integers(0, 65536, (64, 96)).astype(np.uint16)
    PIL.Image.fromarray(values).save(good)
    np.testing.assert_array_equal(read_depth_png(good, 1000.0), (values / 1000.0).astype(np.float32))
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cannot read depth map .*cut\.png.*truncated"):
        read_depth_png(cut)
    grey = tmp_path / "grey.png"
    PIL.Image.fromarray((values >> 8).astype(np.uint8)).save(grey)
    with pytest.raises(ValueError, match=r"grey\.png.* has mode L; expected a 16-bit"):
        read_depth_png(grey)

    data = _depth_data(tmp_path / "data")
    write_depth_png(data / "train" / "depth" / "1.png", np.ones((64, 90)))
    folder = DepthFolder(data, "train", 64)
    with pytest.raises(ValueError, match=r"1\.png' is 90x64 but its image is 96x64"):
        folder[1]


def test_images_in_other_modes_are_read_as_their_upright_rgb(tmp_path):
    """Grey, RGBA, 16-bit grey and an EXIF-rotated JPEG (stored on its side, orientation 6): DepthFolder's pixels
    are PIL's RGB conversion of the upright picture, resized bilinear, over 255; the depth map, resized nearest."""
    photo = _photo()
    root = tmp_path / "data"
    (root / "train" / "images").mkdir(parents=True)
    (root / "train" / "depth").mkdir()
    upright = PIL.Image.fromarray(photo)
    grey16 = (photo[..., 1].astype(np.uint16) * 257)
    made = {
        "a_grey.png": (upright.convert("L"), upright.convert("L").convert("RGB")),
        "b_rgba.png": (upright.convert("RGBA"), upright),
        "c_grey16.png": (PIL.Image.fromarray(grey16), PIL.Image.fromarray(photo[..., 1]).convert("RGB")),
    }
    for name, (stored, _) in made.items():
        stored.save(root / "train" / "images" / name)
    sideways = upright.transpose(PIL.Image.Transpose.ROTATE_90)  # orientation 6 turns it back clockwise
    exif = sideways.getexif()
    exif[0x0112] = 6
    sideways.save(root / "train" / "images" / "d_exif.jpg", exif=exif, quality=100)
    with PIL.Image.open(root / "train" / "images" / "d_exif.jpg") as decoded:  # the JPEG's own pixels, turned
        made["d_exif.jpg"] = (None, decoded.convert("RGB").transpose(PIL.Image.Transpose.ROTATE_270))
    depth = np.random.default_rng(2).uniform(0.5, 9.0, (64, 96))
    for name in made:
        write_depth_png(root / "train" / "depth" / f"{Path(name).stem}.png", depth)
    folder = DepthFolder(root, "train", (32, 64))
    assert [p.name for p, _ in folder.pairs] == sorted(made)
    expected_depth = np.asarray(
        PIL.Image.fromarray((np.round(depth * 1000) / 1000).astype(np.float32)).resize((64, 32), PIL.Image.NEAREST)
    )
    for index, name in enumerate(sorted(made)):
        pixels, target = folder[index]
        reference = made[name][1]
        assert reference.size == (96, 64)
        expected = np.asarray(reference.resize((64, 32), PIL.Image.BILINEAR), dtype=np.float32) / 255
        np.testing.assert_allclose(pixels.permute(1, 2, 0).numpy(), expected, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(target.numpy(), expected_depth, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------- pvtv2 depth
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    PvtV2ForDepthEstimation(PvtV2Config(**TINY, max_depth=5.0)).save_pretrained(folder / "depth")
    PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=3)).save_pretrained(folder / "classifier")
    return {"depth": folder / "depth", "classifier": folder / "classifier"}


def _printed_range(text: str) -> tuple[float, float]:
    words = text.split("depth from ", 1)[1].split()
    return float(words[0]), float(words[2])


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "exif"])
def test_pvtv2_depth_reads_any_image_as_its_upright_rgb(tmp_path, checkpoints, capsys, mode):
    photo = _photo(1)
    upright = PIL.Image.fromarray(photo)
    path = tmp_path / ("image.jpg" if mode == "exif" else "image.png")
    if mode == "L":
        upright.convert("L").save(path)
        reference = upright.convert("L").convert("RGB")
    elif mode == "RGBA":
        upright.convert("RGBA").save(path)
        reference = upright
    elif mode == "I;16":
        PIL.Image.fromarray(photo[..., 0].astype(np.uint16) * 257).save(path)
        reference = PIL.Image.fromarray(photo[..., 0]).convert("RGB")
    else:
        sideways = upright.transpose(PIL.Image.Transpose.ROTATE_90)
        exif = sideways.getexif()
        exif[0x0112] = 6
        sideways.save(path, exif=exif, quality=100)
        with PIL.Image.open(path) as decoded:
            reference = decoded.convert("RGB").transpose(PIL.Image.Transpose.ROTATE_270)
    model = PvtV2ForDepthEstimation.from_pretrained(checkpoints["depth"])
    expected = predict_depth(model, reference)
    assert expected.shape == (64, 96)
    out = tmp_path / "out.png"
    assert main(["depth", str(path), "--model", str(checkpoints["depth"]), "--output", str(out)]) == 0
    low, high = _printed_range(capsys.readouterr().out)
    assert low == pytest.approx(float(expected.min()), abs=6e-4) and high == pytest.approx(float(expected.max()), abs=6e-4)
    with PIL.Image.open(out) as picture:  # the image beside its depth, enlarged 4x to a 256 px shorter side
        assert picture.size[1] == 64 * 4


def test_models_of_the_wrong_task_are_refused_in_one_line(tmp_path, checkpoints, capsys):
    image = tmp_path / "image.png"
    PIL.Image.fromarray(_photo()).save(image)
    assert main(["depth", str(image), "--model", str(checkpoints["classifier"]), "--output", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert "has no trained depth head" in err and "pvtv2 train --task depth" in err
    assert not (tmp_path / "a.png").exists()
    assert main(["predict", str(image), "--model", str(checkpoints["depth"])]) == 2
    err = capsys.readouterr().err
    assert "has no trained classifier" in err and "It is a depth model: pvtv2 depth draws it" in err
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 40)
    assert main(["depth", str(corrupt), "--model", str(checkpoints["depth"]), "--output", str(tmp_path / "b.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err and not (tmp_path / "b.png").exists()


def test_an_image_beyond_the_size_bound_is_predicted_within_it_and_says_so(tmp_path, checkpoints, capsys):
    """--size is refused above 2048 px per side (the first stage's attention alone needs gigabytes), but without
    --size the image's own size was taken whatever it was: a 12-megapixel photograph ran at 4032x3008. A 40x2200
    strip stands in for it (cheap at any size): it is predicted at most 2048 wide, its aspect kept, and the depth
    drawn at the image's own size."""
    strip = np.tile(_photo(), (1, 23, 1))[:40, :2200]
    path = tmp_path / "strip.png"
    PIL.Image.fromarray(strip).save(path)
    seen = []
    forward = PvtV2ForDepthEstimation.forward

    def recording(self, pixel_values, *args, **kwargs):
        seen.append(tuple(pixel_values.shape[-2:]))
        return forward(self, pixel_values, *args, **kwargs)

    out = tmp_path / "out.png"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PvtV2ForDepthEstimation, "forward", recording)
        assert main(["depth", str(path), "--model", str(checkpoints["depth"]), "--output", str(out)]) == 0
    assert seen == [(32, 2048)]
    printed = capsys.readouterr().out
    assert "predicted at 32x2048" in printed and "2048" in printed
    model = PvtV2ForDepthEstimation.from_pretrained(checkpoints["depth"])
    expected = predict_depth(model, PIL.Image.fromarray(strip), (32, 2048))
    assert expected.shape == (40, 2200)
    low, high = _printed_range(printed)
    assert low == pytest.approx(float(expected.min()), abs=6e-4) and high == pytest.approx(float(expected.max()), abs=6e-4)


def test_a_depth_map_aligned_with_an_exif_rotated_images_stored_pixels_is_refused(tmp_path):
    """The image is read upright (as pvtv2 depth reads it); a depth map drawn over its pixels as stored (on their
    side) does not fit it, and the error says the orientation is why."""
    root = _depth_data(tmp_path / "data")
    sideways = PIL.Image.fromarray(_photo()).transpose(PIL.Image.Transpose.ROTATE_90)  # stored 64 wide, 96 tall
    exif = sideways.getexif()
    exif[0x0112] = 6
    (root / "train" / "images" / "0.png").unlink()
    sideways.save(root / "train" / "images" / "0.jpg", exif=exif)
    write_depth_png(root / "train" / "depth" / "0.png", np.ones((96, 64)))  # the stored pixels' shape
    with pytest.raises(ValueError, match=r"0\.png' is 64x96 but its image is 96x64 \(after its EXIF orientation\)"):
        DepthFolder(root, "train", 64)[0]


def test_two_images_with_one_stem_are_refused_not_both_paired_with_its_depth_map(tmp_path):
    """images/0.png and images/0.jpg both took depth/0.png: a picture left beside its photograph (a copy in
    another format, a depth visualisation) was trained on as a second image with the same depth, without a word."""
    from pvtv2.data.depth import scan_depth_split

    root = _depth_data(tmp_path / "data")
    PIL.Image.fromarray(_photo(1)).save(root / "train" / "images" / "0.jpg")
    with pytest.raises(ValueError, match=r"'0\.jpg' and '0\.png' .*depth.*0\.png"):
        scan_depth_split(root, "train")
