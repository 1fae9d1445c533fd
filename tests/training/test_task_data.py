"""What each task's run reads and writes besides the weights: the ``--val-split`` carved from train/ for the dense
tasks (refused for detection), and the ``preprocessor_config.json`` saved with every checkpoint, which must prepare
an image exactly as the run's validation did (a depth checkpoint's is not normalised; a detector's only rescales)."""

from __future__ import annotations

import shutil
from pathlib import Path

import PIL.Image
import pytest
import torch

from pvtv2.cli import main
from pvtv2.data.digit_scenes import make_detection_example
from pvtv2.data.digits import write_digits_folder
from pvtv2.data.processing import PvtV2ImageProcessor
from pvtv2.data.scenes import make_depth_example
from pvtv2.data.shapes import make_segmentation_example
from pvtv2.training import TrainConfig
from pvtv2.training.rundir import save_checkpoint
from pvtv2.training.runner import TASK_CLASSES

SIZE = 32


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    write_digits_folder(root / "classification", size=SIZE, limit_per_class=4, val_fraction=0.25, seed=0)
    return {
        "classification": root / "classification",
        "segmentation": make_segmentation_example(root / "segmentation", n_train=12, n_val=3, size=SIZE, seed=1),
        "depth": make_depth_example(root / "depth", n_train=12, n_val=3, size=SIZE, seed=2),
        "detection": make_detection_example(root / "detection", n_train=4, n_val=2, size=64, seed=3,
                                            backgrounds="synthetic"),
    }


def _task(kind: str, data: Path, **changes):
    model = {"classification": "pvt_v2_b0"}.get(kind, "tiny")
    cfg = TrainConfig(task=kind, data=str(data), model=model, image_size=SIZE, output="unused", **changes)
    task = TASK_CLASSES[kind](cfg)
    task.load_data()
    return task


def _first_val_image(task, kind: str) -> Path:
    if kind == "classification":
        return Path(task.val_set.samples[0][0])
    if kind == "detection":
        return task.val_set.image_dir / task.val_set.images[0]["file_name"]
    return Path(task.val_set.pairs[0][0])


# ------------------------------------------------------------------------------------------ the saved processor
@pytest.mark.parametrize("kind", ["classification", "segmentation", "depth", "detection"])
def test_the_saved_processor_prepares_images_as_the_run_evaluated_them(datasets, tmp_path, kind):
    task = _task(kind, datasets[kind])
    save_checkpoint(tmp_path / "best", task.new_model(), SIZE, processor=task.processor())  # as the engine does
    loaded = PvtV2ImageProcessor.from_pretrained(tmp_path / "best")
    with PIL.Image.open(_first_val_image(task, kind)) as image:
        got = loaded(image)["pixel_values"][0]
    expected = task.val_set[0][0]  # what evaluation fed the model
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    if kind == "depth":
        # GLPN's input: [0, 1], not normalised with ImageNet's statistics (what was saved before).
        assert not loaded.do_normalize and 0.0 <= float(got.min()) and float(got.max()) <= 1.0


# ------------------------------------------------------------------------------------------ --val-split
@pytest.mark.parametrize("kind", ["segmentation", "depth"])
def test_val_split_carves_a_seeded_split_from_train(datasets, tmp_path, kind):
    data = tmp_path / "data"
    shutil.copytree(datasets[kind] / "train", data / "train")
    if (datasets[kind] / "labels.json").is_file():
        shutil.copy(datasets[kind] / "labels.json", data / "labels.json")
    everything = sorted(p.name for p in (data / "train" / "images").iterdir())
    splits = {}
    for seed in (0, 0, 1):
        task = _task(kind, data, val_split=0.25, seed=seed)
        train = [Path(image).name for image, _ in task.train_set.pairs]
        val = [Path(image).name for image, _ in task.val_set.pairs]
        assert len(val) == 3 and sorted(train + val) == everything and not set(train) & set(val)  # 25% of 12
        assert train == sorted(train) and val == sorted(val)
        splits.setdefault(seed, []).append(val)
    assert splits[0][0] == splits[0][1] and splits[0][0] != splits[1][0]  # the seed decides, and only it
    # The held-out images are evaluated as a val/ folder would be: resized, never flipped or augmented.
    flipped = _task(kind, data, val_split=0.25, hflip=1.0)
    plain = _task(kind, datasets[kind])  # val/ of the original: same pipeline
    assert flipped.val_set.hflip == plain.val_set.hflip == 0.0
    assert getattr(flipped.val_set, "transform", None) is None


@pytest.mark.parametrize("kind", ["segmentation", "depth"])
def test_val_split_is_refused_next_to_a_val_folder(datasets, tmp_path, capsys, kind):
    out = tmp_path / "run"
    code = main(["train", "--task", kind, "--data", str(datasets[kind]), "--model", "tiny", "--output", str(out),
                 "--image-size", str(SIZE), "--val-split", "0.25", "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "has its own val/ folder" in lines[0], lines
    assert not out.exists()


def test_val_split_is_refused_for_detection(datasets, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(datasets["detection"], data)
    shutil.rmtree(data / "val")
    (data / "annotations" / "instances_val.json").unlink()
    out = tmp_path / "run"
    code = main(["train", "--task", "detection", "--data", str(data), "--model", "tiny", "--output", str(out),
                 "--val-split", "0.25", "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("pvtv2 train: error: --val-split does not apply to --task detection")
    assert not out.exists()
