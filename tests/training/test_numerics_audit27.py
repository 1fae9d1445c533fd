"""An audit of classification training's numerics against independent references: timm's loss, Mixup, scheduler,
EMA and optimizer groups, closed forms, scikit-learn's metrics, and the same run made another way (one batch of
k * b against k micro-batches of b).

Every run is tiny (a 16 px config.json model, a handful of digits), so each test takes seconds on a CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_SMALL_IMAGES
from safetensors.torch import load_file

from pvtv2.data.digits import load_digits
from pvtv2.training import TrainConfig, train

SIZE = 16


def write_folder(root: Path, per_class: dict[str, int], *, val_per_class: int = 2, offset: int = 0) -> Path:
    """``root/{train,val}/<name>/`` with ``per_class[name]`` training digits of the class ``int(name[-1])``."""
    images, targets = load_digits()
    for name, count in per_class.items():
        members = np.flatnonzero(targets == int(name[-1]))[offset:]
        for split, chosen in (("train", members[:count]), ("val", members[count:count + val_per_class])):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in chosen:
                image = PIL.Image.fromarray(images[index]).resize((SIZE, SIZE), PIL.Image.Resampling.BICUBIC)
                image.convert("RGB").save(folder / f"{index:04d}.png")
    return root


@pytest.fixture(scope="module")
def arch(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("arch27") / "tiny.json"
    path.write_text(json.dumps(TINY_SMALL_IMAGES))
    return str(path)


def short_run(data: Path, model: str, out: Path, **overrides) -> dict:
    """A deterministic run: no stochastic depth, no flip, no augmentation beyond the seeded crop."""
    fields = dict(data=str(data), model=model, output=str(out), image_size=SIZE, epochs=1, batch_size=4, lr=3e-3,
                  warmup_epochs=0.0, drop_path=0.0, hflip=0.0, crop_scale=1.0, progress=False, recipe="none",
                  label_smoothing=0.1)
    fields.update(overrides)
    return train(TrainConfig(**fields))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= atol, worst


# ---------------------------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("per_class", [{"c0": 4, "c1": 4, "c2": 4}, {"c0": 4, "c1": 4, "c2": 3}],
                         ids=["12 images", "11 images: a last micro-batch of 1"])
def test_k_micro_batches_of_b_are_one_batch_of_k_times_b(tmp_path, arch, per_class):
    """12 or 11 images, 2 epochs: batch 4 (3 steps an epoch, the last of 4 or 3 images) against 2 micro-batches of 2
    (the same samples in the same order, the last group 2 + 2 or 2 + 1 images). The model has no BatchNorm and
    no randomness here: the weights agree to rounding. With 11 images the last group's loss is the mean over its 3
    images, as the one batch's is, not the mean of two micro-batch means (2 images and 1 weighed alike)."""
    data = write_folder(tmp_path / "data", per_class)
    one = short_run(data, arch, tmp_path / "one", epochs=2, batch_size=4, grad_accum=1)
    two = short_run(data, arch, tmp_path / "two", epochs=2, batch_size=2, grad_accum=2)
    assert one["final"]["lr"] == two["final"]["lr"]
    assert_same_weights(weights(Path(one["last"])), weights(Path(two["last"])), atol=1e-4)
