"""mmdetection 2.x checkpoints as the original PVT repository's detection code saves them, made from timm's B0
encoder (its feature maps are the reference backbone) and a head's tensors: shared by the mmdetection tests."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from conftest import random_weights_, shrink_patch_embeddings_

from pvtv2.weights.layouts import convert_state_dict


def timm_backbone(seed: int = 0) -> torch.nn.Module:
    """timm's B0 (depths 1, 2, 1, 1) with random weights, as ``features_only``: the four stage maps."""
    model = timm.create_model("pvt_v2_b0", pretrained=False, depths=(1, 2, 1, 1), features_only=True)
    random_weights_(model, seed=seed)
    return shrink_patch_embeddings_(model, 1e-3).eval()


def write_mmdet_file(tmp_path: Path, backbone: torch.nn.Module, head: dict[str, torch.Tensor], name: str,
                     detector: str, classes: tuple[str, ...] | None, config: str | None = None,
                     config_key: str = "config") -> Path:
    """An mmcv checkpoint: ``backbone.`` in the authors' layout + ``head``, mmcv's meta (class names, the config's
    text under ``config_key``: ``config``, or one naming ``detector`` alone) and an optimizer entry; readable with
    ``torch.load(weights_only=True)``."""
    timm_state = {k.replace("stages_", "stages.", 1): v for k, v in backbone.state_dict().items()}
    state = {f"backbone.{k}": v for k, v in convert_state_dict(timm_state, "original").items()} | head
    text = f"model = dict(type='{detector}')" if config is None else config
    meta = {"mmdet_version": "2.13.0", "epoch": 12, config_key: text}
    if classes is not None:
        meta["CLASSES"] = classes
    path = tmp_path / name
    torch.save({"meta": meta, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    torch.load(path, weights_only=True)  # a plain file: nothing pickled is run to read it
    return path
