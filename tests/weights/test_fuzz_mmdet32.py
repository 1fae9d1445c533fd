"""Seeded random mutations of mmdetection RetinaNet, Faster R-CNN and Mask R-CNN files (pass 32): a tensor dropped,
added, cut short, turned into integers, or the file's meta, dtypes and key prefix changed. Each file either loads
into exactly the weights the unmutated file gives (the mutations that change nothing a detector reads) or is a
``CheckpointError`` naming the key (or the file); never another exception, never a detector read in part."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mmdet_files import timm_backbone
from test_mmdet_rcnn28 import _rcnn_state
from test_mmdet_retinanet28 import _retina_state

from pvtv2 import CheckpointError
from pvtv2.weights.layouts import convert_state_dict

pytest.importorskip("torchvision")

from pvtv2.models.detection import PvtV2ForObjectDetection  # noqa: E402

CLASSES = ("person", "bicycle", "car")
KINDS = {"RetinaNet": "retinanet", "FasterRCNN": "faster_rcnn", "MaskRCNN": "mask_rcnn"}
HEADS = ("neck.", "bbox_head.", "rpn_head.", "roi_head.")


@pytest.fixture(scope="module")
def files():
    timm_state = {k.replace("stages_", "stages.", 1): v for k, v in timm_backbone().state_dict().items()}
    backbone = {f"backbone.{k}": v for k, v in convert_state_dict(timm_state, "original").items()}
    return {"RetinaNet": backbone | _retina_state(), "FasterRCNN": backbone | _rcnn_state(mask=False),
            "MaskRCNN": backbone | _rcnn_state(mask=True)}


def _save(path, state, meta):
    torch.save({"meta": meta, "state_dict": state} if meta is not None else {"state_dict": state}, path)
    return str(path)


def _mutate(rng: np.random.Generator, state: dict, detector: str, kind: int):
    """(state, meta, expected) for mutation ``kind`` (0-4: refused, 5: one that changes nothing read) on a random
    key: expected None where the file must load as the unmutated one, else the words one of which the
    CheckpointError must hold ("FILE": the file's path)."""
    meta = {"mmdet_version": "2.13.0", "CLASSES": CLASSES, "config": f"model = dict(type='{detector}')"}
    keys = sorted(state)
    head = [k for k in keys if k.startswith(HEADS)]
    cuttable = [k for k in keys if state[k].shape[0] > 1]
    key = cuttable[int(rng.integers(0, len(cuttable)))]
    if kind == 0:  # a head tensor missing
        key = head[int(rng.integers(0, len(head)))]
        return {k: v for k, v in state.items() if k != key}, meta, (key,)
    if kind == 1:  # an encoder tensor missing
        key = [k for k in keys if k.startswith("backbone.")][int(rng.integers(0, len(keys) - len(head)))]
        # "do not fit" naming the file and the key, or one of the tensors the configuration is read from, named
        return {k: v for k, v in state.items() if k != key}, meta, ("FILE", "the checkpoint lacks 'encoder.")
    if kind == 2:  # a tensor that no detector has
        extra = head[int(rng.integers(0, len(head)))].rsplit(".", 1)[0] + ".extra_scale"
        return dict(state, **{extra: torch.ones(3)}), meta, ("extra_scale",)
    if kind == 3:  # one output channel short
        return dict(state, **{key: state[key][:-1].clone()}), meta, (key.rsplit(".", 1)[0], "FILE")  # its layer
    if kind == 4:  # integers for a float parameter
        return dict(state, **{key: state[key].to(torch.int64)}), meta, ("non-float",)
    # what a detector does not read: class names of another kind or count (said, not used), no config, no meta,
    # float64 tensors (float32 values widened), a DataParallel prefix on every key
    change = int(rng.integers(0, 6))
    if change == 0:
        meta["CLASSES"] = [None, "str", 3, ("a",), ("a", "b", "c", "d"), ["a", 1, "c"]][int(rng.integers(0, 6))]
    elif change == 1:
        del meta["config"]
    elif change == 2:
        meta = None
    elif change == 3:
        state = {k: v.double() for k, v in state.items()}
    elif change == 4:
        state = {f"module.{k}": v for k, v in state.items()}
    return state, meta, None


@pytest.mark.parametrize("detector", sorted(KINDS))
def test_mutated_mmdetection_files_load_as_the_original_or_are_clear_errors(tmp_path, files, detector):
    original = PvtV2ForObjectDetection.from_pretrained(_save(tmp_path / "original.pth", files[detector], {
        "CLASSES": CLASSES, "config": f"model = dict(type='{detector}')"})).state_dict()
    outcomes = {"loaded": 0, "refused": 0}
    for seed in range(9):
        rng = np.random.default_rng([32, seed, len(detector)])
        state, meta, expected = _mutate(rng, files[detector], detector, kind=min(seed, 5))
        path = _save(tmp_path / f"{detector.lower()}_{seed}.pth", state, meta)
        if expected is None:
            model = PvtV2ForObjectDetection.from_pretrained(path)
            assert model.config.detector == KINDS[detector]
            loaded = model.state_dict()
            assert loaded.keys() == original.keys()
            for name, tensor in original.items():
                assert torch.equal(loaded[name], tensor), (seed, name)
            outcomes["loaded"] += 1
        else:
            with pytest.raises(CheckpointError) as caught:
                PvtV2ForObjectDetection.from_pretrained(path)
            assert any((path if word == "FILE" else word) in str(caught.value) for word in expected), (seed, caught.value)
            outcomes["refused"] += 1
    assert outcomes == {"loaded": 4, "refused": 5}, outcomes
