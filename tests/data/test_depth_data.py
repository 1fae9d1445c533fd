"""Depth PNGs, the depth folder and the rendered-rooms example."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from pvtv2.data.processing import PvtV2ImageProcessor
from pvtv2.data.depth import DepthFolder, read_depth_png, scan_depth_split, write_depth_png
from pvtv2.data.scenes import EXAMPLE_MAX_DEPTH, camera_rays, make_depth_example, render_scene


def test_depth_png_round_trip_in_millimetres_and_other_scales(tmp_path):
    depth = np.array([[0.0, 1.0, 2.5004], [9.9996, 0.001, 65.535]])
    path = write_depth_png(tmp_path / "d.png", depth)
    stored = np.asarray(PIL.Image.open(path))
    assert PIL.Image.open(path).mode == "I;16"
    assert stored.tolist() == [[0, 1000, 2500], [10000, 1, 65535]]  # millimetres, rounded
    assert np.allclose(read_depth_png(path), stored / 1000, atol=0)
    kitti = write_depth_png(tmp_path / "k.png", np.array([[0.0, 80.0]]), depth_scale=256)
    assert np.asarray(PIL.Image.open(kitti)).tolist() == [[0, 20480]]
    assert read_depth_png(kitti, depth_scale=256).tolist() == [[0.0, 80.0]]


def test_depth_png_refusals(tmp_path):
    PIL.Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "eight.png")
    with pytest.raises(ValueError, match="eight.png.*mode L.*16-bit"):
        read_depth_png(tmp_path / "eight.png")
    PIL.Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="mode RGB"):
        read_depth_png(tmp_path / "rgb.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read depth map"):
        read_depth_png(tmp_path / "bad.png")
    for scale in (0, -1, float("nan"), "1000"):
        with pytest.raises(ValueError, match="depth_scale must be a positive number"):
            read_depth_png(tmp_path / "eight.png", depth_scale=scale)
    with pytest.raises(ValueError, match="does not fit a 16-bit PNG"):
        write_depth_png(tmp_path / "x.png", np.array([[70.0]]))


def _folder(tmp_path, size=(48, 80)):
    height, width = size
    for split in ("train",):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "depth").mkdir(parents=True)
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2] = 200
    depth = np.tile(np.linspace(1.0, 8.0, width), (height, 1))
    depth[: height // 4] = 0.0  # no measurement in the top rows
    PIL.Image.fromarray(image).save(tmp_path / "train" / "images" / "a.jpg")
    write_depth_png(tmp_path / "train" / "depth" / "a.png", depth)
    return depth


def test_depth_folder_reads_metres_and_keeps_invalid_zeros(tmp_path):
    depth = _folder(tmp_path)
    dataset = DepthFolder(tmp_path, "train", (32, 64))
    pixels, target = dataset[0]
    assert pixels.shape == (3, 32, 64) and target.shape == (32, 64) and target.dtype == torch.float32
    # Nearest-neighbour resizing: every value is one of the file's, zeros never blended with depth.
    stored = np.round(depth * 1000) / 1000
    assert set(np.round(target.numpy(), 3).ravel()) <= set(np.round(stored.astype(np.float32), 3).ravel())
    assert (target[:8] == 0).all() and (target[8:] > 0.9).all()
    # PIL's nearest neighbour takes source column floor((63 + 0.5) * 80 / 64) = 79 for the last one
    assert target[20, 0] == 1.0 and target[20, -1] == np.float32(stored[-1, 79]) == np.float32(8.0)
    # The images as GLPN's processor (and predict_depth) prepares them: resized, rescaled to [0, 1], not normalised.
    image = PIL.Image.open(tmp_path / "train" / "images" / "a.jpg")
    expected = PvtV2ImageProcessor(size=(32, 64), do_normalize=False)(image).pixel_values[0]
    assert (pixels - expected).abs().max() <= 1e-6
    flipped = DepthFolder(tmp_path, "train", (32, 64), hflip=1.0)[0]
    assert torch.equal(flipped[1], target.flip(-1)) and torch.equal(flipped[0], pixels.flip(-1))


def test_depth_folder_refusals(tmp_path):
    with pytest.raises(FileNotFoundError, match="images"):
        scan_depth_split(tmp_path, "train")
    _folder(tmp_path)
    with pytest.raises(ValueError, match="multiples of 32"):
        DepthFolder(tmp_path, "train", 50)
    (tmp_path / "train" / "images" / "b.png").write_bytes((tmp_path / "train" / "images" / "a.jpg").read_bytes())
    with pytest.raises(FileNotFoundError, match="b.png.*no depth map"):
        DepthFolder(tmp_path, "train", 32)
    (tmp_path / "train" / "images" / "b.png").unlink()
    write_depth_png(tmp_path / "train" / "depth" / "a.png", np.ones((10, 10)))
    with pytest.raises(ValueError, match="is 10x10 but its image is 80x48"):
        DepthFolder(tmp_path, "train", 32)[0]


def test_rendered_depth_is_exact_geometry():
    # Rebuild each pixel's 3-D point from the depth: the bottom row sees the floor (a plane y = -h) where nothing
    # stands on it, the window's rim is on the back wall (a plane z = back), and no depth exceeds the room.
    rng = np.random.default_rng(3)
    rays = camera_rays(64)
    for _ in range(5):
        image, depth = render_scene(rng, 64)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert depth.max() <= EXAMPLE_MAX_DEPTH + 1e-9 and (depth == 0).any() and (depth[depth > 0] > 1.0).all()
        points = rays * depth[..., None]
        floor_y = points[-1, :, 1]
        values, counts = np.unique(np.round(floor_y, 9), return_counts=True)
        assert counts.max() >= 16 and values[counts.argmax()] < -0.99  # most of the row on one plane below
        on_floor = np.isclose(floor_y, values[counts.argmax()], atol=1e-9)
        assert np.allclose(points[-1, on_floor, 1], values[counts.argmax()], atol=1e-12)
        # The back wall is perpendicular to the optical axis: the row just above the window has a single depth.
        rows, cols = np.nonzero(depth == 0)
        above = depth[rows.min() - 1, cols.min() : cols.max() + 1]
        assert np.ptp(above) < 1e-9


def test_example_files_are_deterministic_and_millimetre_exact(tmp_path):
    make_depth_example(tmp_path / "a", n_train=3, n_val=2, size=32, seed=1)
    make_depth_example(tmp_path / "b", n_train=3, n_val=2, size=32, seed=1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 10
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    rng = np.random.default_rng(1)
    _, first_depth = render_scene(rng, 32)
    stored = read_depth_png(tmp_path / "a" / "train" / "depth" / "00000.png")
    assert np.abs(stored - first_depth).max() <= 0.0005 + 1e-6  # half a millimetre: the PNG's rounding
    dataset = DepthFolder(tmp_path / "a", "val", 32)
    assert len(dataset) == 2 and dataset[1][1].shape == (32, 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        make_depth_example(tmp_path / "c", size=48)
