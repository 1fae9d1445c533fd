"""Image-folder scanning, deterministic augmentation and sharding, and the bundled digits."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from pvtv2.data.digits import load_digits, write_digits_folder
from pvtv2.data.folders import EvalTransform, ImageFolder, TrainTransform, epoch_indices, sample_rng, scan_split
from pvtv2.data.processing import IMAGENET_MEAN, IMAGENET_STD


def _normalise(image: PIL.Image.Image) -> np.ndarray:
    """An independent ToTensor + Normalize: (3, H, W) float."""
    array = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return ((array - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(2, 0, 1)


def _photo(width: int = 40, height: int = 30, seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _dataset(root: Path, classes: dict[str, int], split: str = "train") -> None:
    for c, (name, count) in enumerate(classes.items()):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(count):
            _photo(12, 12, seed=10 * c + i).save(folder / f"{i}.png")


# ------------------------------------------------------------------------------------------------ digits
def test_bundled_digits_are_sklearns_scaled_to_uint8():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    reference = sklearn_datasets.load_digits()
    images, targets = load_digits()
    assert images.dtype == np.uint8 and images.shape == (1797, 8, 8)
    np.testing.assert_array_equal(images, np.round(reference.images * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(targets, reference.target)


def test_digits_folder_is_a_stratified_split(tmp_path):
    n_train, n_val = write_digits_folder(tmp_path, size=16, val_fraction=0.2, seed=3)
    assert n_train + n_val == 1797
    _, targets = load_digits()
    per_class = np.bincount(targets)
    classes, val = scan_split(tmp_path, "val", verify=False)
    _, train = scan_split(tmp_path, "train", verify=False)
    assert classes == [str(d) for d in range(10)]
    val_counts = np.bincount([label for _, label in val], minlength=10)
    np.testing.assert_array_equal(val_counts, np.round(per_class * 0.2).astype(int))
    assert len(train) == n_train
    names = {Path(p).name for p, _ in train}
    assert not names & {Path(p).name for p, _ in val}  # file names are the digits' indices: no image in both
    image = PIL.Image.open(val[0][0])
    assert image.size == (16, 16) and image.mode == "RGB"
    # The picture is the upscaled digit, not something else.
    index = int(Path(val[0][0]).stem)
    expected = PIL.Image.fromarray(load_digits()[0][index]).resize((16, 16), PIL.Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(np.asarray(image)[..., 0], np.asarray(expected))


# ------------------------------------------------------------------------------------------------ scanning
def test_scan_skips_unreadable_images_and_names_them(tmp_path, caplog):
    _dataset(tmp_path, {"cat": 3, "dog": 2})
    truncated = tmp_path / "train" / "cat" / "truncated.png"
    truncated.write_bytes((tmp_path / "train" / "cat" / "0.png").read_bytes()[:60])
    garbage = tmp_path / "train" / "dog" / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg at all" * 10)
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image, not counted")
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        classes, samples = scan_split(tmp_path, "train")
    assert classes == ["cat", "dog"]
    assert sorted((Path(p).name, label) for p, label in samples) == [
        ("0.png", 0), ("0.png", 1), ("1.png", 0), ("1.png", 1), ("2.png", 0)
    ]
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(truncated) in warning and str(garbage) in warning and "2 unreadable" in warning


def test_scan_rejects_an_empty_class(tmp_path):
    _dataset(tmp_path, {"cat": 2, "dog": 0})
    with pytest.raises(ValueError, match=r"\['dog'\].*no readable images"):
        scan_split(tmp_path, "train")


def test_scan_follows_linked_class_folders_and_refuses_broken_links(tmp_path):
    """A class folder may be a link to a folder elsewhere (its images count, in sorted place); a link whose target is
    gone is refused by name, not left out (the classes after it would be renumbered)."""
    _dataset(tmp_path, {"ant": 1, "cat": 2})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _photo(12, 12, seed=99).save(elsewhere / "x.png")
    (tmp_path / "train" / "bee").symlink_to(elsewhere, target_is_directory=True)
    classes, samples = scan_split(tmp_path, "train")
    assert classes == ["ant", "bee", "cat"]
    assert sorted(label for _, label in samples) == [0, 1, 2, 2]
    (tmp_path / "train" / "bat").symlink_to(tmp_path / "gone", target_is_directory=True)
    with pytest.raises(ValueError, match=r"symbolic link\(s\) whose target is missing: \['bat'\]"):
        scan_split(tmp_path, "train")


def test_scan_rejects_a_missing_split(tmp_path):
    _dataset(tmp_path, {"cat": 1, "dog": 1})
    with pytest.raises(FileNotFoundError, match="split 'val' not found"):
        scan_split(tmp_path, "val")


# ------------------------------------------------------------------------------------------------ transforms
def test_train_transform_is_a_function_of_seed_epoch_and_index(tmp_path):
    image = _photo(48, 36)
    transform = TrainTransform(24)
    first = [transform(image, sample_rng(7, 2, i)) for i in range(6)]
    again = [transform(image, sample_rng(7, 2, i)) for i in reversed(range(6))][::-1]  # another call order
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], first[1])  # another index, another crop
    assert not torch.equal(first[0], transform(image, sample_rng(7, 3, 0)))  # another epoch
    assert not torch.equal(first[0], transform(image, sample_rng(8, 2, 0)))  # another seed
    # The dataset hands the same generator to the transform, whatever global state says.
    path = tmp_path / "image.png"
    image.save(path)
    dataset = ImageFolder([(str(path), 0)] * 3, transform, seed=7)
    dataset.set_epoch(2)
    torch.manual_seed(123)
    np.random.seed(123)
    assert torch.equal(dataset[1][0], first[1])


def test_train_transform_without_randomness_is_resize_and_normalise():
    image = _photo(20, 20, seed=4)
    plain = TrainTransform(12, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    expected = _normalise(image.resize((12, 12), PIL.Image.Resampling.BILINEAR))
    np.testing.assert_allclose(plain(image, sample_rng(0, 0, 0)).numpy(), expected, atol=1e-5)
    flipped = TrainTransform(12, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)
    np.testing.assert_allclose(flipped(image, sample_rng(0, 0, 0)).numpy(), expected[:, :, ::-1], atol=1e-5)


def test_random_resized_crop_boxes_respect_scale_and_ratio():
    transform = TrainTransform(8, scale=(0.25, 0.5), ratio=(0.5, 2.0))
    width, height = 200, 100
    areas = []
    for i in range(300):
        left, top, w, h = transform.crop_box(width, height, sample_rng(0, 0, i))
        assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
        areas.append(w * h / (width * height))
        assert 0.5 * 0.9 <= w / h <= 2.0 * 1.1  # rounding to whole pixels
    # Area fractions uniform on [0.25, 0.5]: mean 0.375 (within rounding and sampling noise).
    assert abs(np.mean(areas) - 0.375) < 0.02 and min(areas) > 0.23 and max(areas) < 0.52
    # Impossible requests fall back to the centre crop clamped to the ratio range, as torchvision does.
    impossible = TrainTransform(8, scale=(2.0, 3.0), ratio=(1.0, 1.0))
    assert impossible.crop_box(200, 100, sample_rng(0, 0, 0)) == (50, 0, 100, 100)


def test_eval_transform_is_resize_and_normalise():
    image = _photo(30, 20, seed=5)
    expected = _normalise(image.resize((16, 16), PIL.Image.Resampling.BILINEAR))
    np.testing.assert_allclose(EvalTransform(16)(image).numpy(), expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------ sharding
@pytest.mark.parametrize("num_samples,world_size", [(10, 1), (10, 2), (11, 2), (7, 3), (2, 4)])
@pytest.mark.parametrize("epoch", [0, 5])
def test_epoch_indices_match_distributed_sampler(num_samples, world_size, epoch):
    dataset = list(range(num_samples))
    for rank in range(world_size):
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(epoch)
        ours = epoch_indices(num_samples, seed=3, epoch=epoch, shuffle=True, rank=rank, world_size=world_size)
        assert ours == list(sampler)


def test_unpadded_shards_cover_each_sample_once():
    shards = [epoch_indices(11, seed=0, epoch=0, shuffle=False, rank=r, world_size=3, pad=False) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(11))
    assert [len(s) for s in shards] == [4, 4, 3]


@pytest.mark.parametrize("transform", [EvalTransform(16), TrainTransform(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)])
def test_sixteen_bit_images_in_a_folder_are_scaled_not_clipped(tmp_path, transform):
    # ImageFolder reads through load_image, so 16-bit PNGs are scaled by 257 (convert("RGB") alone clips to white).
    PIL.Image.fromarray(np.full((20, 20), 32768, np.uint16)).save(tmp_path / "g16.png")
    PIL.Image.fromarray(np.full((20, 20), 128, np.uint8)).save(tmp_path / "g8.png")
    assert PIL.Image.open(tmp_path / "g16.png").mode == "I;16"
    grey16 = ImageFolder([(str(tmp_path / "g16.png"), 0)], transform)[0][0]
    grey8 = ImageFolder([(str(tmp_path / "g8.png"), 0)], transform)[0][0]
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(grey8[:, 0, 0], expected)
    assert (grey16 - grey8).abs().max().item() <= 1 / 255 / min(IMAGENET_STD)
