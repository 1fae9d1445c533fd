"""Hostile inputs to `pvtv2 eval --task detection` and `pvtv2 detect` (round 27)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

from pvtv2 import PvtV2Config  # noqa: E402
from pvtv2.cli import main  # noqa: E402
from pvtv2.models.detection import PvtV2ForObjectDetection  # noqa: E402

from conftest import TINY_SHALLOW, perturb_  # noqa: E402


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    """A saved FCOS detector with every weight set (random but not freshly initialised), one class 'square'."""
    torch.manual_seed(0)
    config = PvtV2Config(**TINY_SHALLOW, id2label={0: "square"}, detector="fcos", min_size=64, max_size=107,
                         fpn_channels=64)
    path = tmp_path_factory.mktemp("det") / "model"
    perturb_(PvtV2ForObjectDetection(config), 0.02).save_pretrained(path)
    return path


def _data(root: Path, annotations: list[dict], crowd: bool = False) -> Path:
    (root / "val").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    images = []
    for i in range(2):
        PIL.Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "val" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 64, "height": 48})
    data = {"images": images, "annotations": annotations, "categories": [{"id": 4, "name": "square"}]}
    (root / "annotations" / "instances_val.json").write_text(json.dumps(data))
    return root


@pytest.mark.parametrize("annotations", [
    [],  # no annotation at all
    [{"id": 1, "image_id": 1, "category_id": 4, "bbox": [2, 2, 30, 30], "iscrowd": 1,
      "segmentation": {"size": [48, 64], "counts": [2 * 48 + 2, 30 * 48 - 2 * 48 - 2 + 48 * 64 - 30 * 48]}}],
], ids=["empty", "crowd-only"])
def test_eval_on_a_file_without_objects_is_a_clear_error_not_ap_minus_one(tmp_path, capsys, detector, annotations):
    """COCOeval gives -1 for every number when there is nothing to find (no annotation, or crowd regions only):
    `pvtv2 eval` printed "box AP -1.0000" and exited 0. Training refuses such a validation file; so does eval."""
    data = _data(tmp_path / "d", annotations)
    code = main(["eval", "--task", "detection", "--model", str(detector), "--data", str(data), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2, captured.out
    assert "no objects" in captured.err and "instances_val.json" in captured.err, captured.err
    assert "-1.0000" not in captured.out
