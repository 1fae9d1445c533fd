"""What the classification training tests share: a tiny architecture as a config.json, small folders of digits, the
flags of a short run and the command run as a subprocess.

A plain module, imported by name as the tests import ``conftest`` (a second ``conftest.py`` here would take the name
``conftest`` from tests/conftest.py for the modules of this folder): the helpers with ``from training_fixtures import
...``, the fixtures with ``pytest_plugins = ["training_fixtures"]`` in the test module. A module-scoped fixture is
still made once per test module. PYTEST_DONT_REWRITE: it holds no assertions, and the test modules import it before
pytest registers it as a plugin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_SMALL_IMAGES, write_square_coco

from pvtv2.data.digits import write_digits_folder

__all__ = [
    "ENV", "SIZE", "common_args", "digits", "few_digits", "run_records", "run_train", "run_train_torchrun",
    "tiny_config", "training_state",
]

# A tiny PVTv2 that can see 16x16 images (spatial reduction no larger than each stage's grid).
SIZE = 16
# One thread: the runs are tiny, and a busy 2-core machine makes multi-threaded kernels crawl.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    """TINY_SMALL_IMAGES as a config.json: an architecture trained from scratch (not a preset: no recipe by default)."""
    path = tmp_path_factory.mktemp("arch") / "tiny.json"
    path.write_text(json.dumps(TINY_SMALL_IMAGES))
    return str(path)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """640 training and 160 held-out digits at 16 px."""
    root = tmp_path_factory.mktemp("digits")
    write_digits_folder(root, size=SIZE, limit_per_class=80, seed=1)
    return root


@pytest.fixture(scope="module")
def few_digits(tmp_path_factory) -> Path:
    """120 training and 40 held-out digits at 16 px (8 batches of 16 per epoch): for runs that check mechanics
    rather than learning."""
    root = tmp_path_factory.mktemp("few")
    write_digits_folder(root, size=SIZE, limit_per_class=16, val_fraction=0.25, seed=2)
    return root


def common_args(data: Path, model: str, out: Path, epochs: int = 2, *, hflip: float | None = 0.0) -> list[str]:
    """The flags of a short `pvtv2 train` run at 16 px; ``hflip`` None leaves --hflip out (the default, 0.5)."""
    args = ["--data", str(data), "--model", model, "--output", str(out), "--epochs", str(epochs),
            "--image-size", str(SIZE), "--batch-size", "16", "--lr", "3e-3", "--warmup-epochs", "1",
            "--crop-scale", "0.7", "--drop-path", "0.1", "--no-progress"]
    return args if hflip is None else [*args, "--hflip", f"{hflip:g}"]


def run_train(args: list[str], env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m pvtv2 train ARGS` in a subprocess, its output captured."""
    return subprocess.run([sys.executable, "-m", "pvtv2", "train", *args], env=env or ENV, capture_output=True,
                          text=True, timeout=timeout, check=False)


def run_train_torchrun(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`pvtv2 train ARGS` under torchrun with two CPU processes, its output captured."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pvtv2", "train", *args]
    return subprocess.run(command, env=env or ENV, capture_output=True, text=True, timeout=300, check=False)


def run_records(out: Path) -> list[dict]:
    """The epochs' records of the run in ``out`` (its metrics.jsonl)."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def training_state(out: Path) -> dict:
    """What the run in ``out`` saved to resume from (last/training_state.pt)."""
    import torch

    return torch.load(out / "last" / "training_state.pt", weights_only=True)


def same_weights(a: Path, b: Path) -> bool:
    """Whether two checkpoint folders hold exactly the same tensors in their model.safetensors."""
    from safetensors.torch import load_file
    import torch

    one, two = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def dense_task_data(root: Path, task: str) -> Path:
    """Tiny data for a dense task ("segmentation", "depth" or "detection": a COCO folder of squares) under ``root``."""
    if task == "segmentation":
        from pvtv2.data.shapes import make_segmentation_example

        return make_segmentation_example(root, n_train=7, n_val=3, size=32, seed=1)
    if task == "depth":
        from pvtv2.data.scenes import make_depth_example

        return make_depth_example(root, n_train=7, n_val=3, size=32, seed=1)
    write_square_coco(root, "train", [[4 + i, 6, 20 + i, 18] for i in range(7)])
    write_square_coco(root, "val", [[10, 12, 22, 20], [30, 5, 20, 24], [2, 30, 25, 25]])
    return root


def launch(script: Path, args: list[str], env: dict[str, str] | None = None, processes: int = 1):
    """``script ARGS`` in a Python of its own, or under torchrun with ``processes`` CPU processes, output captured."""
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return subprocess.run([*launcher, str(script), *args], env={**ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=600, check=False)


def run_fingerprint(out: Path) -> dict:
    """Everything a run leaves that must not depend on its interruptions: the checkpoints' tensors, the optimizer's
    moments and step count, the records without their timings; and what must not be left (temporary and old copies,
    the lock)."""
    import hashlib

    import torch
    from safetensors.torch import load_file

    found: dict = {}
    for folder in ("last", "best", "ema"):
        if (out / folder / "model.safetensors").is_file():
            tensors = load_file(str(out / folder / "model.safetensors"))
            found[folder] = hashlib.sha256(b"".join(tensors[k].numpy().tobytes() for k in sorted(tensors))).hexdigest()
    state = training_state(out)
    moments = [v for s in state["optimizer"]["state"].values() for _, v in sorted(s.items()) if torch.is_tensor(v)]
    found["optimizer"] = hashlib.sha256(b"".join(v.numpy().tobytes() for v in moments)).hexdigest()
    found["steps"], found["best_epoch"] = state["scheduler"]["last_epoch"], state["best_epoch"]
    found["records"] = [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")}
                        for r in run_records(out)]
    found["left"] = sorted(p.name for p in out.iterdir() if p.name.endswith((".tmp", ".old")) or p.name == "run.lock")
    return found
