"""Loading weights into a model and saving them: the configuration of a checkpoint, strict loading, folders.

``load_pretrained`` resolves what the user names (folder, file, hub id), reads the tensors (``files``), renames them
to the canonical layout (``layouts``), finds the configuration (``config.json``, or read off the tensor shapes),
builds the model without memory and loads the tensors strictly: a checkpoint that does not fit raises
:class:`CheckpointError` listing missing, unexpected and mis-shaped keys with both shapes.

What loading needs to know about a model class it reads from class attributes (``PvtV2PreTrainedModel``):
``base_model_prefix`` (where the encoder sits), ``head_prefixes`` (the task head's top-level names),
``classifier_prefix`` (its class-sized last layer), ``in_transformers`` (whether saving checks what transformers
would make of the folder) and the method ``init_new_module`` (for a head the checkpoint lacks). A model whose head
was initialised at random says so in ``model.newly_initialized_keys``.
"""

from __future__ import annotations

import ast
import difflib
import logging
import math
import os
import re
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_write_json, path_kind
from ..models.config import (
    DEPTH_DEFAULTS, PRESETS, SEGMENTATION_DEFAULTS, PvtV2Config, config_from_file, merge_changes, read_json_config,
    short_repr, timm_architecture,
)
from ..models.labels import has_generic_labels, imagenet_id2label
from .files import CheckpointError, is_shard_index, read_checkpoint_and_config, save_state_dicts, shard_names
from .hub import (
    HubFileNotFound, check_loading_arguments, check_subfolder, folder_entry, looks_like_hub_id, resolve_file,
)
from .layouts import DENSE_LAYOUTS, HEAD_PREFIXES, MMDET_LAYOUT, detect_layout, to_canonical

__all__ = [
    "WEIGHT_FILES",
    "weight_file_names",
    "check_variant",
    "load_device",
    "infer_config",
    "read_config",
    "checkpoint_layout",
    "locate_checkpoint",
    "load_canonical",
    "load_pretrained",
    "save_pretrained",
    "non_finite",
    "layout_differences",
    "transformers_differences",
]

logger = logging.getLogger(__name__)

# transformers' names, in the order its from_pretrained prefers them: safetensors, whole or sharded, then PyTorch's.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_VARIANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_variant(variant: Any) -> str | None:
    """``variant`` (``"fp16"``: ``model.fp16.safetensors``) as transformers takes it, refused where it is no plain
    name: a path separator or ``..`` would name a file in another folder, and an empty one ``model..safetensors``."""
    if variant is None:
        return None
    if not isinstance(variant, str):
        raise TypeError(f"variant must be a string such as 'fp16', got {type(variant).__name__} {variant!r}")
    if not _VARIANT.fullmatch(variant) or ".." in variant:
        raise ValueError(f"variant={variant!r} is not a plain variant name (letters, digits, '_', '-', '.', starting "
                         f"with a letter or digit, such as 'fp16'): it becomes part of the weights file's name")
    return variant


def _add_variant(name: str, variant: str | None) -> str:
    """transformers' name of a variant's file: the variant before the last extension (``model.fp16.safetensors``,
    ``model.safetensors.index.fp16.json``)."""
    if variant is None:
        return name
    stem, extension = name.rsplit(".", 1)
    return f"{stem}.{variant}.{extension}"


def weight_file_names(variant: str | None = None, use_safetensors: bool | None = None) -> tuple[str, ...]:
    """The weights files from_pretrained looks for in a folder or hub repository, in transformers' order and with
    its names for a ``variant``: safetensors (whole, then sharded) and PyTorch's; ``use_safetensors`` True the
    safetensors ones only, False PyTorch's only."""
    safe = tuple(_add_variant(name, variant) for name in WEIGHT_FILES[:2])
    pickled = tuple(_add_variant(name, variant) for name in WEIGHT_FILES[2:])
    return safe if use_safetensors else pickled if use_safetensors is False else safe + pickled


def _asked(variant: str | None, use_safetensors: bool | None) -> str:
    """The arguments that chose the file names, in words for an error ("" when none did)."""
    parts = ([f"variant={variant!r}"] if variant is not None else []) + (
        [f"use_safetensors={use_safetensors}"] if use_safetensors is not None else [])
    return f" ({', '.join(parts)})" if parts else ""


# The original code and timm use PyTorch's default LayerNorm epsilon in the patch embeddings and the reduction.
_TORCH_DEFAULT_EPS = 1e-5
# The first layers of the dense heads, each reading one stage's features (canonical names): a detector's FPN laterals,
# a Semantic FPN's, SegFormer's per-stage projections.
_STAGE_READERS = re.compile(r"^(detector\.backbone\.fpn\.inner_blocks\.\d+\.0|decode_head\.neck\.lateral_convs\.\d+\.conv|"
                            r"decode_head\.linear_c\.\d+\.proj)\.weight$")
# ---------------------------------------------------------------------------------------------- config from shapes
def infer_config(canonical: Mapping[str, torch.Tensor], layout: str, **overrides: Any) -> PvtV2Config:
    """A config that fits a checkpoint that came without one, read off its tensor shapes.

    What shapes cannot tell is taken from the published models: strides 4, 2, 2, 2; heads of
    ``hidden_sizes[i] / hidden_sizes[0]``, or 1 where that is no whole number (1, 2, 5, 8 for every published
    variant; for other widths a guess, with a warning, unless ``num_attention_heads`` is given); the
    spatial-reduction ratios 8, 4, 2, 1 for linear attention, where they are unused.
    """
    stages = sorted({int(m.group(1)) for k in canonical if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    if not stages or stages != list(range(len(stages))):
        raise CheckpointError(f"cannot find the stages of a PVTv2 encoder in this checkpoint (stages found: {stages})")
    hidden, patches, depths, srs, mlps = [], [], [], [], []
    linear = False
    try:
        for i in stages:
            key = f"encoder.layers.{i}.patch_embedding.proj.weight"
            proj = canonical[key]
            if proj.ndim != 4 or 0 in proj.shape:  # its width divides the MLP's: 0 stopped with a ZeroDivisionError
                raise CheckpointError(f"{key} has the shape {tuple(proj.shape)}, which no PVTv2 patch embedding has "
                                      f"(out channels, in channels, kernel height, kernel width)")
            hidden.append(int(proj.shape[0]))
            patches.append(int(proj.shape[-1]))
            blocks = {int(m.group(1)) for k in canonical if (m := re.match(rf"encoder\.layers\.{i}\.blocks\.(\d+)\.", k))}
            depths.append(len(blocks))
            if not blocks:  # a stage of no blocks: its reduction and MLP build nothing, so any ratio loads it
                srs.append(1)
                mlps.append(None)
                continue
            sr_key = f"encoder.layers.{i}.blocks.0.attention.spatial_reduction.weight"
            dense1_key = f"encoder.layers.{i}.blocks.0.mlp.dense1.weight"
            sr, dense1 = canonical.get(sr_key), canonical[dense1_key]
            # a convolution's and a linear layer's weights: a scalar stopped with an IndexError on reading its sizes,
            # a side of 0 with "mlp_ratios must hold positive numbers", a setting the user never gave
            for key, tensor, ndim in ((sr_key, sr, 4), (dense1_key, dense1, 2)):
                if tensor is not None and (tensor.ndim != ndim or 0 in tensor.shape):
                    raise CheckpointError(f"{key} has the shape {tuple(tensor.shape)}, where PVTv2 has a {ndim}-D weight "
                                          f"with no side of 0")
            srs.append(int(sr.shape[-1]) if sr is not None else 1)
            if sr is not None and sr.shape[-1] == 1:
                linear = True
            mlps.append(_mlp_ratio(int(dense1.shape[0]), hidden[-1]))
        channels = int(canonical["encoder.layers.0.patch_embedding.proj.weight"].shape[1])
        first = next((i for i, depth in zip(stages, depths) if depth), None)  # the first stage with blocks
        qkv_bias = first is None or f"encoder.layers.{first}.blocks.0.attention.query.bias" in canonical
    except KeyError as err:
        raise CheckpointError(f"the checkpoint lacks {err.args[0]!r}, needed to infer its configuration") from None
    known = [m for m in mlps if m is not None]
    mlps = [known[0] if m is None and known else 4 if m is None else m for m in mlps]  # empty stages: a neighbour's
    args: dict[str, Any] = dict(
        num_channels=channels,
        num_encoder_blocks=len(stages),
        depths=depths,
        hidden_sizes=hidden,
        patch_sizes=patches,
        strides=[4] + [2] * (len(stages) - 1),
        sr_ratios=([8, 4, 2, 1] if len(stages) == 4 else [1] * len(stages)) if linear else srs,
        num_attention_heads=[h // hidden[0] if h % hidden[0] == 0 else 1 for h in hidden],
        mlp_ratios=mlps,
        qkv_bias=qkv_bias,
        linear_attention=linear,
    )
    if "classifier.weight" in canonical:
        head = canonical["classifier.weight"]
        if head.ndim == 2 and head.shape[1] != hidden[-1]:
            # The classifier reads the last stage's features: a file whose last stages were lost (a truncated or
            # filtered state dict) loaded as a shallower encoder without a word (PvtV2Model drops the head).
            raise CheckpointError(
                f"the checkpoint's classifier reads {int(head.shape[1])} features (classifier.weight has the shape "
                f"{tuple(head.shape)}), but its last stage, encoder.layers.{len(stages) - 1}, is {hidden[-1]} wide "
                f"(hidden_sizes {hidden}): the checkpoint lacks the stage(s) the classifier was trained on"
            )
        args["num_labels"] = int(head.shape[0])
    for key, tensor in canonical.items():
        # A dense head's first layers read stage widths too (an FPN's laterals, SegFormer's projections): one reading
        # a width no stage has is the same loss (PvtV2Model and PvtV2Backbone drop the head).
        if _STAGE_READERS.match(key) and tensor.ndim >= 2 and int(tensor.shape[1]) not in hidden:
            raise CheckpointError(
                f"the checkpoint's {key} reads {int(tensor.shape[1])} channels (its shape is {tuple(tensor.shape)}), "
                f"which no stage of its encoder has (hidden_sizes {hidden}): the checkpoint lacks the stage(s) its "
                f"head was trained on"
            )
    if layout in ("timm", "original", MMDET_LAYOUT):  # mmdetection's files hold the original code's backbone
        args["patch_embed_layer_norm_eps"] = _TORCH_DEFAULT_EPS
        args["reduction_layer_norm_eps"] = _TORCH_DEFAULT_EPS
    if layout in DENSE_LAYOUTS:
        args["layer_norm_eps"] = _TORCH_DEFAULT_EPS  # every LayerNorm of SegFormer / GLPN has PyTorch's default
    if "decode_head.classifier.weight" in canonical:
        args["num_labels"] = int(canonical["decode_head.classifier.weight"].shape[0])
        args["decoder_hidden_size"] = int(canonical["decode_head.classifier.weight"].shape[1])
    fpn = canonical.get("decode_head.scale_heads.0.0.conv.weight")
    if fpn is not None and fpn.ndim == 4:
        # Semantic FPN (an mmsegmentation file): the neck's width is its first scale head's input; the head is half
        # as wide (SemanticFPNHead), which the load checks against the checkpoint's head.
        args["decode_head_type"] = "fpn"
        args["decoder_hidden_size"] = int(fpn.shape[1])
    kind = detector_kind(canonical)
    if kind == "retinanet":
        asked = overrides.get("detector", "retinanet")
        if asked != "retinanet":
            # Built as asked, the file's settings (its convention, its FPN width) met the other detector's checks
            # first, with a message about a setting the user never gave.
            what = "an mmdetection RetinaNet (neck, bbox_head)" if layout == MMDET_LAYOUT else "a RetinaNet"
            raise CheckpointError(
                f"the checkpoint holds {what}, whose head detector={asked!r} has no place for: load it as "
                f"detector='retinanet' (or leave detector out), or its encoder alone with PvtV2Model / "
                f"PvtV2ForImageClassification (`pvtv2 convert CHECKPOINT encoder.safetensors --layout timm` writes "
                f"the encoder as a file of its own, for a new detector)"
            )
        args.update(_retinanet_settings(canonical, hidden, layout))
    elif kind in ("faster_rcnn", "mask_rcnn"):
        args.update(_rcnn_settings(canonical, hidden, layout))
    elif kind == "fcos":
        args.update(_fcos_settings(canonical, hidden))
    if "head.head.0.weight" in canonical:
        args["decoder_hidden_size"] = int(canonical["head.head.0.weight"].shape[0])
        if "max_depth" not in overrides:
            # GLPN's NYU and KITTI models have the same tensors and predict up to 10 and 80 m: the depths of a
            # KITTI state dict came out 8x too small without a word.
            logger.warning(
                "the %s depth checkpoint came without a config.json and no weights record its depth range: assuming "
                "max_depth=%g m (GLPN's NYU Depth v2 models; its KITTI ones predict up to 80). If the model was "
                "trained with another, every depth is scaled wrong: pass max_depth=... to from_pretrained (--max-depth to "
                "pvtv2 train), or set it in the config.json of a folder holding the weights",
                layout, DEPTH_DEFAULTS["max_depth"],
            )
    published_heads = _PUBLISHED_SETTINGS["num_attention_heads"]
    if "num_attention_heads" not in overrides and [h / hidden[0] for h in hidden] != published_heads:
        # Every published variant's widths go 1:2:5:8 with heads 1, 2, 5, 8; other widths say nothing of the heads.
        logger.warning(
            "the %s checkpoint's widths %s are not those of a published variant, and no weights record the "
            "attention heads: assuming num_attention_heads=%s (hidden_sizes[i] / hidden_sizes[0], 1 where that is no "
            "whole number). If the model was built with others its outputs will be wrong: pass "
            "num_attention_heads=[...] to from_pretrained, or set it in the config.json of a folder holding the "
            "weights (`pvtv2 convert` writes one)",
            layout, hidden, args["num_attention_heads"],
        )
    preset = _matching_preset(args)
    if preset:
        args["drop_path_rate"] = PRESETS[preset]["drop_path_rate"]
    logger.info("configuration inferred from the %s checkpoint's shapes%s", layout, f" (matches {preset})" if preset else "")
    return PvtV2Config(**merge_changes(args, overrides))


# A RetinaNet's anchors per position: 3 ratios times 3 scales (mmdetection's and torchvision's).
_RETINANET_ANCHORS = 9


def detector_kind(canonical: Mapping[str, torch.Tensor]) -> str | None:
    """The torchvision detector whose heads ``canonical`` (a checkpoint's tensors, canonical names) holds, or None.
    FCOS's class scores bear a RetinaNet's name, so its centerness branch is looked for first: a lone FCOS file was
    read as a RetinaNet and refused for its class scores ("not 9 anchors x classes")."""
    if "detector.roi_heads.mask_predictor.mask_fcn_logits.weight" in canonical:
        return "mask_rcnn"
    if "detector.roi_heads.box_predictor.cls_score.weight" in canonical:
        return "faster_rcnn"
    if "detector.head.regression_head.bbox_ctrness.weight" in canonical:
        return "fcos"
    if "detector.head.classification_head.cls_logits.weight" in canonical:
        return "retinanet"
    return None


def _fcos_settings(canonical: Mapping[str, torch.Tensor], hidden: list[int]) -> dict[str, Any]:
    """The settings an FCOS's tensors say (one score per class, the FPN's width and stages, where P6 comes from).
    Without them a lone weights file was built with a 256-wide FPN and refused."""
    scores = canonical["detector.head.classification_head.cls_logits.weight"]
    classes = int(scores.shape[0]) if scores.ndim == 4 else 0
    if classes < 1:
        raise CheckpointError(f"the fcos class scores have the shape {tuple(scores.shape)}, which holds no class")
    settings: dict[str, Any] = {"detector": "fcos", "num_labels": classes, **_fpn_settings(canonical, hidden, "FCOS")}
    p6 = canonical.get("detector.backbone.fpn.extra_blocks.p6.weight")
    if p6 is not None and p6.ndim == 4 and hidden[-1] != settings["fpn_channels"]:
        # P6 from the last stage (C5) or from P5: told apart by its input width where the two differ.
        settings["extra_levels"] = "p6p7_on_input" if p6.shape[1] == hidden[-1] else "p6p7_on_output"
    return settings


def _retinanet_settings(canonical: Mapping[str, torch.Tensor], hidden: list[int], layout: str) -> dict[str, Any]:
    """The detector settings a RetinaNet's tensors say: the classes (class scores over 9 anchors), the FPN's width
    and the stages feeding it (the lateral convolutions' inputs against the encoder's widths); an mmdetection file's
    is computed as mmdetection computes it."""
    cls = canonical["detector.head.classification_head.cls_logits.weight"]
    reg = canonical.get("detector.head.regression_head.bbox_reg.weight")
    if cls.ndim != 4 or cls.shape[0] % _RETINANET_ANCHORS or not cls.shape[0]:
        raise CheckpointError(f"the RetinaNet class scores (bbox_head.retina_cls / cls_logits) have the shape "
                              f"{tuple(cls.shape)}: not {_RETINANET_ANCHORS} anchors x classes output channels")
    if reg is not None and (reg.ndim != 4 or reg.shape[0] != 4 * _RETINANET_ANCHORS):
        raise CheckpointError(f"the RetinaNet box regression (bbox_head.retina_reg / bbox_reg) has the shape "
                              f"{tuple(reg.shape)}: not {4 * _RETINANET_ANCHORS} (4 deltas x {_RETINANET_ANCHORS} "
                              f"anchors) output channels")
    settings: dict[str, Any] = {
        "detector": "retinanet",
        "num_labels": int(cls.shape[0]) // _RETINANET_ANCHORS,
        **_fpn_settings(canonical, hidden, "RetinaNet"),
    }
    first = settings["fpn_stages"][0] - 1
    inputs = hidden[first:]
    if layout == MMDET_LAYOUT:
        p6 = canonical.get("detector.backbone.fpn.extra_blocks.p6.weight")
        if p6 is not None and p6.ndim == 4 and p6.shape[1] != hidden[-1]:
            # The authors' configs compute P6 from C5 (add_extra_convs="on_input"); from P5 is another network.
            raise CheckpointError(f"the RetinaNet's P6 convolution (neck.fpn_convs.{len(inputs)}) takes {p6.shape[1]} "
                                  f"channels, not the last stage's {hidden[-1]}: pvtv2 reads mmdetection's "
                                  f"add_extra_convs='on_input' only")
        settings["detection_convention"] = "mmdetection"
    return settings


def _fpn_settings(canonical: Mapping[str, torch.Tensor], hidden: list[int], what: str) -> dict[str, Any]:
    """The FPN's width and the stages feeding it: the lateral convolutions' inputs against the encoder's widths."""
    inputs = []
    for i in range(len(hidden)):
        lateral = canonical.get(f"detector.backbone.fpn.inner_blocks.{i}.0.weight")
        if lateral is None or lateral.ndim != 4:
            break
        inputs.append(int(lateral.shape[1]))
    # The FPN reads consecutive stages up to the last (mmdetection's start_level, end_level=-1).
    first = len(hidden) - len(inputs)
    if not inputs or hidden[first:] != inputs:
        raise CheckpointError(f"the {what}'s FPN takes inputs {inputs} wide (neck.lateral_convs), which are not the "
                              f"last stages of the encoder (widths {hidden})")
    return {"fpn_channels": int(canonical["detector.backbone.fpn.inner_blocks.0.0.weight"].shape[0]),
            "fpn_stages": list(range(first + 1, len(hidden) + 1))}


def _rcnn_settings(canonical: Mapping[str, torch.Tensor], hidden: list[int], layout: str) -> dict[str, Any]:
    """The detector settings a Faster / Mask R-CNN's tensors say: Mask R-CNN where there is a mask head, the classes
    (the box classifier's rows but the background's), the FPN's width and stages; an mmdetection file's is computed
    as mmdetection computes it."""
    cls = canonical["detector.roi_heads.box_predictor.cls_score.weight"]
    if cls.ndim != 2 or cls.shape[0] < 2:
        raise CheckpointError(f"the R-CNN box classifier (roi_head.bbox_head.fc_cls / cls_score) has the shape "
                              f"{tuple(cls.shape)}: not (classes + background, features)")
    mask = "detector.roi_heads.mask_predictor.mask_fcn_logits.weight" in canonical
    settings: dict[str, Any] = {
        "detector": "mask_rcnn" if mask else "faster_rcnn",
        "num_labels": int(cls.shape[0]) - 1,
        **_fpn_settings(canonical, hidden, "Mask R-CNN" if mask else "Faster R-CNN"),
    }
    if layout == MMDET_LAYOUT:
        settings["detection_convention"] = "mmdetection"
    return settings


def _recorded_value(text: str, key: str) -> Any:
    """The value of ``key`` in an mmdetection config's text (``key=value`` or ``'key': value``): a Python literal,
    a list or tuple of them; None where the key is absent or its value is not a literal."""
    m = re.search(rf"\b{key}['\"]?\s*[=:]\s*('[^']*'|\"[^\"]*\"|[\[(][^\])]*[\])]|[\w.]+)", text)
    if m is None:
        return None
    try:
        value = ast.literal_eval(m.group(1))
    except (ValueError, SyntaxError):
        return None
    return list(value) if isinstance(value, tuple) else value


def _recorded_part(text: str, name: str) -> str:
    """The text of the ``name=dict(...)`` (or ``'name': {...}``) part of a config, up to its first closing bracket;
    empty where there is none."""
    m = re.search(rf"\b{name}['\"]?\s*[=:]\s*(?:dict\(|\{{)([^)}}]*)", text)
    return m.group(1) if m else ""


def _check_recorded_retinanet(text: str, config: PvtV2Config, path: str | os.PathLike) -> dict[str, Any]:
    """:class:`CheckpointError` where the training config an mmdetection RetinaNet file records sets what its
    tensors' shapes cannot tell and pvtv2 computes otherwise: where P6 comes from (C5 here, ``add_extra_convs=
    "on_input"``), no ReLU before the extra convolutions, and the anchors (``octave_base_scale=4``,
    ``scales_per_octave=3``, ratios 0.5, 1, 2 in that order, the levels' strides). Read anyway, the file would give
    other detections than mmdetection's without a word; a file without a recorded config is taken as the authors'.
    Returns the recorded test settings (``test_cfg``: ``score_thr``, the NMS IoU, ``max_per_img``) as pvtv2's config
    fields, for the caller to apply; another ``nms_pre`` or ``min_bbox_size`` is refused."""
    neck, anchors = _recorded_part(text, "neck"), _recorded_part(text, "anchor_generator")
    count = config.num_encoder_blocks
    stages = config.fpn_stages or [count - 2, count - 1, count]  # RetinaNet's default: the last three stages
    strides = [config.stage_strides[s - 1] for s in stages]
    strides += [strides[-1] * 2, strides[-1] * 4]
    problems = []
    extra = _recorded_value(neck, "add_extra_convs")
    if extra is not None and extra not in ("on_input", True):
        problems.append(f"add_extra_convs={extra!r} (pvtv2 computes P6 from the last stage: 'on_input')")
    if extra is True and _recorded_value(neck, "extra_convs_on_inputs") is False:
        problems.append("extra_convs_on_inputs=False (P6 from P5; pvtv2 computes it from the last stage)")
    if _recorded_value(neck, "relu_before_extra_convs") is True:
        problems.append("relu_before_extra_convs=True (pvtv2, as mmdetection's default, has no ReLU before P6)")
    for key, expected in (("octave_base_scale", 4), ("scales_per_octave", 3), ("ratios", [0.5, 1.0, 2.0]),
                          ("strides", strides)):
        value = _recorded_value(anchors, key)
        if value is not None and value != expected:
            problems.append(f"anchor_generator {key}={value!r} (pvtv2: {expected!r})")
    test = _recorded_block(text, "test_cfg")
    # torchvision's RetinaNet keeps the 1000 best candidates per level (topk_candidates) and no box is too small
    for key, expected in (("nms_pre", 1000), ("min_bbox_size", 0)):
        value = _recorded_value(test, key)
        if value is not None and value != expected:
            problems.append(f"test_cfg {key}={value!r} (pvtv2: {expected!r})")
    nms_type = _recorded_value(_recorded_block(test, "nms"), "type")
    if nms_type not in (None, "nms"):
        problems.append(f"test_cfg nms type={nms_type!r} (pvtv2: 'nms')")
    if problems:
        raise CheckpointError(
            f"{os.fspath(path)!r} is an mmdetection RetinaNet whose recorded config (meta) sets what pvtv2's RetinaNet "
            f"does not compute, with tensors of the same shapes: " + "; ".join(problems)
        )
    return _recorded_test_settings(test)


def _recorded_block(text: str, name: str) -> str:
    """The text inside the first ``name=dict(...)`` (or ``'name': {...}``) of a config, nested parts included (the
    brackets balanced); empty where there is none."""
    m = re.search(rf"\b{name}['\"]?\s*[=:]\s*(?:dict\(|\{{)", text)
    if m is None:
        return ""
    depth, i = 1, m.end()
    while i < len(text) and depth:
        depth += (text[i] in "([{") - (text[i] in ")]}")
        i += 1
    return text[m.end() : i - 1]


# What pvtv2's Faster / Mask R-CNN computes under the mmdetection convention, as the authors' configs set it.
_RCNN_BOX_STDS = [0.1, 0.1, 0.2, 0.2]
_RCNN_RPN = {"nms_pre": 1000, "max_per_img": 1000, "max_num": 1000, "iou_threshold": 0.7, "nms_thr": 0.7,
             "min_bbox_size": 0}


def _check_recorded_rcnn(text: str, config: PvtV2Config, path: str | os.PathLike) -> dict[str, Any]:
    """:class:`CheckpointError` where the training config an mmdetection Faster / Mask R-CNN file records sets what
    its tensors' shapes cannot tell and pvtv2 computes otherwise (the RPN's anchors and box coder, the RoI
    extractors' RoIAlign, output sizes, strides and ``finest_scale``, the box coder, extra FPN convolutions, the
    RPN's test settings); read anyway, the file gave other detections than mmdetection's without a word. Returns
    the box head's test settings (``test_cfg.rcnn``: ``score_thr``, the NMS IoU, ``max_per_img``) as pvtv2's
    config fields, for the caller to apply; warns of another ``mask_thr_binary`` (pvtv2 returns probabilities and
    its COCO evaluation thresholds them at 0.5)."""
    count = config.num_encoder_blocks
    stages = config.fpn_stages or list(range(1, count + 1))
    strides = [config.stage_strides[s - 1] for s in stages]
    problems = []

    def check(where: str, part: str, key: str, expected: Any, absent: Any = None) -> None:
        value = _recorded_value(part, key)
        value = absent if value is None else value
        if value is not None and value != expected:
            problems.append(f"{where} {key}={value!r} (pvtv2: {expected!r})")

    neck, rpn, roi = _recorded_block(text, "neck"), _recorded_block(text, "rpn_head"), _recorded_block(text, "roi_head")
    extra = _recorded_value(neck, "add_extra_convs")
    if extra not in (None, False):
        problems.append(f"neck add_extra_convs={extra!r} (pvtv2's R-CNNs max-pool P5 for P6: False)")
    check("neck", neck, "num_outs", len(strides) + 1)
    anchors = _recorded_block(rpn, "anchor_generator")
    check("rpn_head anchor_generator", anchors, "type", "AnchorGenerator")
    check("rpn_head anchor_generator", anchors, "scales", [8])
    check("rpn_head anchor_generator", anchors, "ratios", [0.5, 1.0, 2.0])
    check("rpn_head anchor_generator", anchors, "strides", strides + [strides[-1] * 2])
    check("rpn_head anchor_generator", anchors, "center_offset", 0.0)
    for where, part, stds in (("rpn_head", rpn, [1.0] * 4), ("bbox_head", _recorded_block(roi, "bbox_head"), _RCNN_BOX_STDS)):
        coder = _recorded_block(part, "bbox_coder")
        check(f"{where} bbox_coder", coder, "type", "DeltaXYWHBBoxCoder")
        check(f"{where} bbox_coder", coder, "target_means", [0.0] * 4)
        check(f"{where} bbox_coder", coder, "target_stds", stds)
    for name, size in (("bbox_roi_extractor", 7), ("mask_roi_extractor", 14)):
        extractor = _recorded_block(roi, name)
        if not extractor:
            continue
        layer = _recorded_block(extractor, "roi_layer")
        check(f"{name} roi_layer", layer, "type", "RoIAlign")
        check(f"{name} roi_layer", layer, "output_size", size)
        check(f"{name} roi_layer", layer, "sampling_ratio", 0)
        check(f"{name} roi_layer", layer, "aligned", True)
        check(name, re.sub(r"roi_layer\s*=\s*dict\([^)]*\)", "", extractor), "type", "SingleRoIExtractor")
        check(name, extractor, "featmap_strides", strides)
        check(name, extractor, "finest_scale", 56)
    test = _recorded_block(text, "test_cfg")
    test_rpn, test_rcnn = _recorded_block(test, "rpn"), _recorded_block(test, "rcnn")
    for key, expected in _RCNN_RPN.items():
        check("test_cfg rpn", test_rpn, key, expected)
    for key in ("iou_threshold", "iou_thr"):  # mmdetection 2.x, and its first releases
        check("test_cfg rpn nms", _recorded_block(test_rpn, "nms"), key, 0.7)
    nms = _recorded_block(test_rcnn, "nms")
    check("test_cfg rcnn nms", nms, "type", "nms")
    if problems:
        raise CheckpointError(
            f"{os.fspath(path)!r} is an mmdetection R-CNN whose recorded config (meta) sets what pvtv2's R-CNN does "
            f"not compute, with tensors of the same shapes: " + "; ".join(problems)
        )
    mask_threshold = _recorded_value(test_rcnn, "mask_thr_binary")
    if mask_threshold is not None and mask_threshold != 0.5:
        logger.warning(
            "%s records mask_thr_binary=%r: pvtv2 returns mask probabilities and its COCO evaluation thresholds them "
            "at 0.5, so pixels between the two are in one mask and not the other", os.fspath(path), mask_threshold,
        )
    return _recorded_test_settings(test_rcnn)


def _recorded_test_settings(part: str) -> dict[str, Any]:
    """pvtv2's ``score_threshold``, ``nms_threshold`` and ``detections_per_image`` from the ``score_thr``, NMS IoU
    and ``max_per_img`` of a recorded test config (a RetinaNet's ``test_cfg``, an R-CNN's ``test_cfg.rcnn``)."""
    settings = {}
    for field, where, keys in (("score_threshold", part, ("score_thr",)),
                               ("nms_threshold", _recorded_block(part, "nms"), ("iou_threshold", "iou_thr")),
                               ("detections_per_image", part, ("max_per_img",))):
        for key in keys:
            value = _recorded_value(where, key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                settings[field] = value
                break
    return settings


def _own_memory(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` each in memory of its own, whole and contiguous: they become the parameters (``assign=True``).
    torch.save keeps tensors that share storage shared (a tensor stored under two names, views of one buffer), so
    two parameters would otherwise be one in two places: a step on one moves the other, and safetensors refuses to
    save them. A tensor off PyTorch's 64-byte alignment (safetensors' offsets in the file) is copied too: GEMMs round
    by their operands' alignment, so a model read from a file gave other last bits than the same weights in fresh
    memory. Copied only where needed."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        storage = value.untyped_storage()
        if (storage.data_ptr() in seen or storage.nbytes() != value.numel() * value.element_size()
                or not value.is_contiguous() or value.data_ptr() % 64):
            value = value.clone(memory_format=torch.contiguous_format)
        else:
            seen.add(storage.data_ptr())
        out[key] = value
    return out


def _mlp_ratio(hidden_features: int, dim: int) -> float:
    """The MLP ratio from which the model rebuilds ``hidden_features``: ``int(dim * ratio) == hidden_features``, as
    every implementation computes the width. ``hidden_features / dim`` can fall a rounding short of that
    (230 / 112 * 112 is 229.99999999999997), which would build the layer one feature narrower than its weights."""
    ratio = hidden_features / dim
    while int(dim * ratio) < hidden_features:
        ratio = math.nextafter(ratio, math.inf)
    return int(ratio) if ratio.is_integer() else ratio


def _matching_preset(args: Mapping[str, Any]) -> str | None:
    for name, preset in PRESETS.items():
        full = PvtV2Config(**preset)
        if (
            full.depths == args["depths"]
            and full.hidden_sizes == args["hidden_sizes"]
            and full.mlp_ratios == args["mlp_ratios"]
            and full.linear_attention == args["linear_attention"]
        ):
            return name
    return None


# ---------------------------------------------------------------------------------------------- loading a model
def locate_checkpoint(
    source: str | os.PathLike, revision: str | None, cache_dir: str | os.PathLike | None, subfolder: str | None = None,
    local_files_only: bool = False, token: str | bool | None = None, variant: str | None = None,
    use_safetensors: bool | None = None,
) -> tuple[Path | None, Path]:
    """(config.json or None, weights file) for a folder, a checkpoint file or a hub id (cache first); with
    ``subfolder``, those of that folder inside the folder or hub repository; ``variant`` and ``use_safetensors``
    choose the file names as transformers does (see :func:`weight_file_names`). A single file is read as what it
    is: a ``variant`` is refused there (it names files inside a folder), ``use_safetensors=True`` unless it is a
    safetensors file.

    A local path that exists but is neither a regular file nor a folder (a FIFO, a device, a socket), a symlink loop
    and a dangling symlink are refused by name: reading a FIFO would block forever, and calling the others a missing
    hub repository would send the user looking in the wrong place.
    """
    text = os.fspath(source)
    _check_local_path(text)
    subfolder = check_subfolder(text, subfolder)
    variant = check_variant(variant)
    if use_safetensors is not None and not isinstance(use_safetensors, bool):
        raise TypeError(f"use_safetensors must be True, False or None, got {use_safetensors!r}")
    names = weight_file_names(variant, use_safetensors)
    if os.path.isfile(text):
        if variant is not None:
            raise ValueError(f"variant={variant!r} names a variant's weights file inside a folder or hub repository, "
                             f"but {text!r} is a file: pass the folder, or leave variant out")
        if use_safetensors and not (text.endswith(".safetensors") or (is_shard_index(text) and ".safetensors." in
                                                                      Path(text).name)):
            raise ValueError(f"use_safetensors=True reads safetensors files only, and {text!r} is not a .safetensors "
                             f"file (nor the index of safetensors shards)")
        return None, _checked_shards(Path(text), use_safetensors)
    if os.path.isdir(text):
        folder = Path(text) / subfolder if subfolder else Path(text)
        if not folder.is_dir():
            raise FileNotFoundError(f"no weights in folder {os.fspath(folder)!r}: {text!r} has no subfolder {subfolder!r}")
        weights = next((folder / name for name in names if folder_entry(folder / name) == "file"), None)
        if weights is None:
            found = sorted(p.name for p in folder.iterdir())[:10]
            # A `pvtv2 train` run folder (or a demo's) holds its checkpoints one level down: name the one to pass.
            runs = [folder / sub for sub in ("best", "last", "run/best") if (folder / sub / "config.json").is_file()]
            hint = f"; it holds a training run: pass {os.fspath(runs[0])!r}" if runs else ""
            raise FileNotFoundError(
                f"no weights in folder {os.fspath(folder)!r}{_asked(variant, use_safetensors)}: expected one of "
                f"{list(names)}, found {found}{hint}")
        config = folder / "config.json"
        return (config if folder_entry(config) == "file" else None), _checked_shards(weights, use_safetensors)
    if text.replace("-", "_").lower() in PRESETS:
        raise FileNotFoundError(
            f"{text!r} is a preset (an architecture), not weights: build it untrained with "
            f"PvtV2ForImageClassification(PvtV2Config.from_preset({text!r})), or pass a folder, a checkpoint file "
            f"or a hub id such as 'OpenGVLab/{text.replace('-', '_').lower()}'"
        )
    if not looks_like_hub_id(text):
        # A near miss of a preset (pvt_v2_b9, pvtv2_b2) is most likely one: name the presets there are.
        # One preset is named only when it is nearer than any other: "pvt_v2" or "pvt_v2_b6" is as near to each
        # size, and naming the last (B5, 82M parameters) would be a guess.
        key = text.replace("-", "_").lower()
        scores = sorted((difflib.SequenceMatcher(None, key, name).ratio(), name) for name in PRESETS)
        (second, _), (best, nearest) = scores[-2], scores[-1]
        hint = ""
        if best >= 0.75:
            named = f"did you mean {nearest!r}? " if best > second else ""
            hint = f" ({named}the presets are {', '.join(PRESETS)})"
        raise FileNotFoundError(
            f"{text!r} is not an existing file or folder, a preset name, nor a hub id 'owner/name'{hint}")
    where = {"revision": revision, "cache_dir": cache_dir, "subfolder": subfolder, "local_files_only": local_files_only,
             "token": token}
    config = resolve_file(text, "config.json", **where, required=False)
    for name in names:
        weights = resolve_file(text, name, **where, required=False)
        if weights is not None:
            if is_shard_index(weights):
                # The shards are files of the repository too: from the cache, or downloaded beside the index.
                for shard in shard_names(_checked_shards(weights, use_safetensors)):
                    resolve_file(text, shard, **where)
            return config, weights
    if names == WEIGHT_FILES:
        return config, resolve_file(text, WEIGHT_FILES[0], **where)  # raises, explaining
    try:
        return config, resolve_file(text, names[0], **where)  # raises, explaining
    except HubFileNotFound as err:
        raise HubFileNotFound(f"no weights of {text!r}{_asked(variant, use_safetensors)}: looked for "
                              f"{', '.join(names)}. {err}") from None


def _checked_shards(weights: Path, use_safetensors: bool | None) -> Path:
    """``weights``, refused under ``use_safetensors=True`` where it is an index naming shards that are not
    safetensors files (they would be unpickled)."""
    if use_safetensors and is_shard_index(weights):
        pickled = [shard for shard in shard_names(weights) if not shard.endswith(".safetensors")]
        if pickled:
            raise ValueError(f"use_safetensors=True reads safetensors files only, and the index "
                             f"{os.fspath(weights)!r} names the shard {pickled[0]!r}")
    return weights


def _check_local_path(text: str) -> None:
    """Raise for a path that names something on disk that cannot hold weights (see :func:`locate_checkpoint`)."""
    kind = path_kind(text)
    if kind == "symlink loop":
        raise FileNotFoundError(f"{text!r} is a symlink loop (it points, through links, back at itself)")
    if kind == "dangling symlink":
        raise FileNotFoundError(f"{text!r} is a symlink to {os.readlink(text)!r}, which does not exist")
    if kind not in ("file", "folder", "nothing"):
        raise ValueError(
            f"{text!r} is a {kind}, not a checkpoint file or folder: pass a .safetensors/.pth file, a "
            f"save_pretrained folder or a hub id"
        )


def _given_config(config: Any, **where: Any) -> PvtV2Config | None:
    """``config=`` as transformers' ``from_pretrained`` takes it: a config object (pvtv2's, or transformers'
    ``PvtV2Config``, read through its ``to_dict``), or a config.json file, folder or hub id, read with the hub
    arguments (``subfolder`` aside for a file)."""
    if config is None or isinstance(config, PvtV2Config):
        return config
    if isinstance(config, (str, os.PathLike)):
        if os.path.isfile(os.fspath(config)):
            where["subfolder"] = None
        return PvtV2Config.from_pretrained(config, **where)
    if getattr(config, "model_type", None) == "pvt_v2" and callable(getattr(config, "to_dict", None)):
        return PvtV2Config.from_dict(config.to_dict())
    kind = type(config)
    raise TypeError(f"config must be a PvtV2Config (pvtv2's or transformers'), or a path or hub id of a config.json, "
                    f"got {kind.__module__}.{kind.__qualname__}")


def _check_flag(name: str, value: Any, none: bool = False) -> None:
    if not (isinstance(value, bool) or (none and value is None)):
        raise TypeError(f"{name} must be True or False{' (or None)' if none else ''}, got {value!r}")


def load_device(device: str | torch.device | int | None, device_map: Any = None) -> torch.device | None:
    """The one device ``from_pretrained`` puts the model on, from ``device=`` or transformers' ``device_map=`` (a
    device name, ``torch.device`` or accelerator index; a dict placing every module on one device; "auto",
    "balanced", "balanced_low_0", "sequential" where there is at most one GPU). A map over several devices is
    refused: pvtv2 places the whole model on one."""
    if device_map is None:
        return None if device is None else torch.device(device)
    strategies = ("auto", "balanced", "balanced_low_0", "sequential")
    if isinstance(device_map, Mapping):
        devices = {("disk" if v == "disk" else torch.device(v)) if isinstance(v, (str, int, torch.device))
                   and not isinstance(v, bool) else repr(v) for v in device_map.values()}
        if len(devices) != 1 or "disk" in devices or not isinstance(next(iter(devices)), torch.device):
            shown = sorted(str(d) for d in devices) or "nothing"
            raise ValueError(f"device_map={short_repr(device_map)} places the model on {shown}: pvtv2 loads the "
                             f"whole model onto one device (device_map='cuda:0', {{'': 'cuda:0'}} or device=...)")
        found = next(iter(devices))
    elif isinstance(device_map, str) and device_map in strategies:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count > 1:
            raise ValueError(f"device_map={device_map!r} spreads the model over this machine's {count} GPUs: pvtv2 "
                             f"loads the whole model onto one device; pass device_map='cuda:0' (or device=...)")
        found = torch.device("cuda:0" if count else "cpu")
    elif isinstance(device_map, int) and not isinstance(device_map, bool):
        if device_map < 0:
            raise ValueError(f"device_map={device_map} is no accelerator index: pass device_map='cpu' for the CPU")
        found = torch.device(device_map)
    elif isinstance(device_map, (str, torch.device)):
        if device_map == "cuda":  # as transformers: the process's own GPU under torchrun
            device_map = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        try:
            found = torch.device(device_map)
        except RuntimeError:
            raise ValueError(f"device_map={device_map!r} is not a device name (cpu, cuda:0) nor one of "
                             f"{', '.join(strategies)}") from None
    else:
        raise TypeError(f"device_map must be a device (name, torch.device or index) or a dict of them, got "
                        f"{type(device_map).__name__}")
    if device is not None and torch.device(device) != found:
        raise ValueError(f"device={device!r} and device_map={short_repr(device_map)} name different devices; pass one")
    return found


def checkpoint_layout(state: Mapping[str, torch.Tensor], weights_path: str | os.PathLike,
                      config_path: str | os.PathLike | None = None) -> str:
    """:func:`detect_layout` of the tensors of ``weights_path``, whose refusal names the file and, where the
    ``config.json`` beside it is timm's for another architecture (timm/resnet50.a1_in1k), that architecture."""
    try:
        return detect_layout(state)
    except CheckpointError as err:
        try:
            architecture = None if config_path is None else timm_architecture(read_json_config(config_path))
        except (OSError, ValueError):  # a config.json of no JSON is not what is wrong here
            architecture = None
        named = (f" ({os.fspath(config_path)} names the timm architecture {short_repr(architecture)}, not PVTv2)"
                 if architecture is not None and not architecture.startswith("pvt_v2") else "")
        raise CheckpointError(f"{os.fspath(weights_path)}{named}: {err}") from None


# The arguments that ask for a classifier of other classes than the checkpoint's (the fine-tuning idiom). Not
# label2id alone: it must invert the config.json's id2label, so it names that file's classes, not new ones.
_HEAD_ARGUMENTS = frozenset({"num_labels", "id2label"})


def load_pretrained(model_cls: type, source: str | os.PathLike, *, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None, subfolder: str | None = None,
                    local_files_only: bool = False, token: str | bool | None = None,
                    dtype: torch.dtype | str | None = None, config: PvtV2Config | None = None,
                    ignore_mismatched_sizes: bool | None = None, output_loading_info: bool = False,
                    variant: str | None = None, use_safetensors: bool | None = None, weights_only: bool = True,
                    **overrides: Any):
    """Build ``model_cls`` and load the weights named by ``source`` (its ``subfolder``) into it, strictly; with
    ``config``, the model is built from it (and ``overrides``) instead of the checkpoint's config.json, as in
    transformers. ``ignore_mismatched_sizes``, ``variant``, ``use_safetensors`` and ``weights_only`` as
    transformers takes them (see :func:`load_canonical`, :func:`locate_checkpoint`); ``output_loading_info``:
    returns ``(model, info)`` with transformers' dict (:func:`load_canonical`)."""
    check_loading_arguments(overrides)
    _check_flag("output_loading_info", output_loading_info)
    _check_flag("ignore_mismatched_sizes", ignore_mismatched_sizes, none=True)
    _check_flag("weights_only", weights_only)
    if not weights_only:
        raise ValueError("weights_only=False is not supported: it would unpickle any Python object in the file, which "
                         "can run code. pvtv2 reads .bin/.pth files with torch.load(weights_only=True) only (tensors "
                         "and plain containers); convert a file you trust to safetensors instead")
    where = {"revision": revision, "cache_dir": cache_dir, "subfolder": subfolder, "local_files_only": local_files_only,
             "token": token}
    config = _given_config(config, **where)
    given = config
    config_path, weights_path = locate_checkpoint(source, **where, variant=variant, use_safetensors=use_safetensors)
    timm_file = None  # (path, contents) of a timm config.json
    if given is not None:
        config_path = None  # not read, so never named as the cause of a misfit
    elif config_path is not None and timm_architecture(data := read_json_config(config_path)) is not None:
        # A timm hub repository's config.json (architecture, num_classes, pretrained_cfg) sets no PVTv2 field: the
        # configuration comes from the weights' shapes, as for a timm file alone (its class names are kept)
        timm_file, config_path = (config_path, data), None
    state, class_names, recorded = read_checkpoint_and_config(weights_path)
    layout = checkpoint_layout(state, weights_path, None if timm_file is None else timm_file[0])
    canonical = to_canonical(state, layout)
    if layout == MMDET_LAYOUT:
        fpn = any(k.startswith("decode_head.") for k in canonical)  # a Semantic FPN, read into decode_head
        retinanet = any(k.startswith("detector.head.") for k in canonical)  # a RetinaNet, read into detector
        rcnn = any(k.startswith("detector.roi_heads.") for k in canonical)  # a Faster / Mask R-CNN, read into detector
        used = ({"backbone", "neck", "decode_head"} if fpn else {"backbone", "neck", "bbox_head"} if retinanet else
                {"backbone", "neck", "rpn_head", "roi_head"} if rcnn else {"backbone"})
        others = sorted({k.split(".", 1)[0] for k in state} - used)
        rcnn_name = "Mask R-CNN" if any(k.startswith("detector.roi_heads.mask_") for k in canonical) else "Faster R-CNN"
        what = ("backbone and Semantic FPN (neck, decode_head) are" if fpn else
                "backbone and RetinaNet (neck, bbox_head; mmdetection's arithmetic) are" if retinanet else
                f"backbone and {rcnn_name} (neck, rpn_head, roi_head; mmdetection's arithmetic) are" if rcnn else
                "backbone is")
        logger.info("an mmdetection / mmsegmentation checkpoint: its %s used%s", what,
                    f"; its {', '.join(others)} are not (another library's modules)" if others else "")
        seg = canonical.get("decode_head.classifier.weight")
        if fpn and seg is not None and seg.shape[0] == 1:
            # The threshold is in mmsegmentation's config, not in the file: a probability between the two was one
            # class there and the other here.
            logger.warning(
                "%s has a one-channel (binary) head: mmsegmentation predicts sigmoid > its config's threshold (0.3 "
                "unless set), pvtv2 sigmoid > 0.5, so pixels between the two are labelled otherwise",
                os.fspath(weights_path),
            )
    if given is not None:
        config = given.replace(**overrides) if overrides else given
    elif config_path is not None:
        config = read_config(config_path, **overrides)
    else:
        config = infer_config(canonical, layout, **overrides)
    if timm_file is not None and "classifier.weight" in canonical and not {"id2label", "label2id", "num_labels"} & overrides.keys():
        config = _attach_timm_labels(config, *timm_file)
    config = _attach_imagenet_labels(config, canonical)
    config = _attach_recorded_labels(config, canonical, class_names)
    recorded_settings = {}
    # the recorded settings are the detector's arithmetic: a model without one (the encoder alone) is not refused
    detector = layout == MMDET_LAYOUT and bool(recorded) and "detector." in getattr(model_cls, "head_prefixes", ())
    if detector and "detector.head.classification_head.cls_logits.weight" in canonical:
        recorded_settings = _check_recorded_retinanet(recorded, config, weights_path)
    if detector and "detector.roi_heads.box_predictor.cls_score.weight" in canonical:
        recorded_settings = _check_recorded_rcnn(recorded, config, weights_path)
    if recorded_settings:
        # the file's test settings are mmdetection's detections; a config or setting the caller gave stays theirs
        applied = {k: v for k, v in recorded_settings.items() if k not in overrides and getattr(config, k, None) != v}
        if applied and given is None:
            config = config.replace(**applied)
            logger.info("%s records the test settings %s: applied", os.fspath(weights_path),
                        ", ".join(f"{k}={v!r}" for k, v in applied.items()))
    # Built without memory or random initialisation: the checkpoint's tensors become the parameters.
    try:
        with torch.device("meta"):
            model = model_cls(config)
    except (ValueError, TypeError) as err:
        # A head's own settings in the config.json (a detector's min_size...) are checked by the model: named with
        # the file, as the config's fields are. With overrides the cause may be either, so neither is named.
        if config_path is not None and not overrides:
            raise type(err)(f"{os.fspath(config_path)}: {err}") from None
        raise
    if dtype == "auto":
        dtype = _stored_dtype(config, state)
    if dtype is not None:
        # Cast while still on meta (free): the tensors are copied into the model's dtype, so a float64 file built
        # at the default float32 and cast afterwards came out rounded to float32.
        model = model.to(dtype)
    if ignore_mismatched_sizes is None and config_path is not None and not _HEAD_ARGUMENTS & overrides.keys():
        # No other head asked for: a class count of the folder's config.json that its own classifier does not have is
        # a damaged or hand-edited folder, refused as transformers refuses it. It loaded a random head labelled with
        # the config's class names, a warning its only sign.
        ignore_mismatched_sizes = False
    try:
        info = load_canonical(model, canonical, origin=os.fspath(weights_path),
                              ignore_mismatched_sizes=ignore_mismatched_sizes)
    except CheckpointError as err:
        if config_path is None:
            raise
        # The model was built from the config.json: say so, and which of its fields the tensors contradict (one it
        # lacks took its default: a hand-edited file without "depths" builds the default [2, 2, 2, 2]).
        first, _, rest = str(err).partition("\n")
        note = _config_file_note(config_path, config, canonical, overrides, _classifier_misfit(model, canonical))
        raise CheckpointError(f"{first}\n  {note}" + (f"\n{rest}" if rest else "")) from None
    # Which ecosystem wrote the file: its evaluation preprocessing follows it (inference.load_processor).
    model.checkpoint_layout = layout
    logger.info("loaded %s weights (%s layout) from %s", model_cls.__name__, layout, os.fspath(weights_path))
    return (model, info) if output_loading_info else model


def _stored_dtype(config: PvtV2Config, state: Mapping[str, torch.Tensor]) -> torch.dtype:
    """``dtype="auto"`` as transformers resolves it: the dtype the config.json names ("dtype", or "torch_dtype"
    before transformers 4.56), else that of the first floating-point tensor as stored, else float32."""
    for key in ("dtype", "torch_dtype"):
        found = getattr(torch, str(getattr(config, key, "")), None)
        if isinstance(found, torch.dtype) and found.is_floating_point:
            return found
    return next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)


def read_config(path: str | os.PathLike, **overrides: Any) -> PvtV2Config:
    """A ``config.json`` of PVTv2 (``model_type`` ``pvt_v2``) or of transformers' SegFormer / GLPN, as a PvtV2Config."""
    data = read_json_config(path)
    if isinstance(data, dict) and data.get("model_type") in DENSE_LAYOUTS:
        return config_from_file(path, data, dense_config_from_dict, **overrides)
    return config_from_file(path, data, PvtV2Config.from_dict, **overrides)


# Fields of SegformerConfig / GLPNConfig that PvtV2Config carries under the same name.
_DENSE_CONFIG_FIELDS = (
    "num_channels", "num_encoder_blocks", "depths", "sr_ratios", "hidden_sizes", "patch_sizes", "strides",
    "num_attention_heads", "mlp_ratios", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
    "initializer_range", "drop_path_rate", "decoder_hidden_size", "id2label", "label2id", "problem_type",
    "classifier_dropout_prob", "semantic_loss_ignore_index", "reshape_last_stage", "max_depth", "head_in_index",
)


def dense_config_from_dict(data: Mapping[str, Any], **overrides: Any) -> PvtV2Config:
    """The PvtV2Config of a transformers ``SegformerConfig`` / ``GLPNConfig`` dict.

    Their encoders differ from PVTv2's defaults only in values the config carries: MLP ratio 4 in every stage, and
    LayerNorms built with PyTorch's default epsilon (1e-5) everywhere -- their own ``layer_norm_eps`` (1e-6) is
    read by no layer, so it is not carried over.
    """
    args = {k: data[k] for k in _DENSE_CONFIG_FIELDS if k in data}
    # transformers writes its four-entry defaults of these lists into every config.json and reads only the first
    # num_encoder_blocks entries of each (depths and hidden_sizes are read whole: the drop-path schedule, GLPN's
    # decoder), so a model of two or three stages carries four: cut to what it reads, as it does.
    blocks = args.get("num_encoder_blocks")
    if type(blocks) is int and blocks >= 1:
        for key in ("sr_ratios", "patch_sizes", "strides", "num_attention_heads", "mlp_ratios"):
            if isinstance(args.get(key), list) and len(args[key]) > blocks:
                args[key] = args[key][:blocks]
    # One ratio per stage that depths lists, not per num_encoder_blocks: a count that is no count (NaN, 1e400, a
    # list) or a huge one ([4] * 10**9) is then refused by name by PvtV2Config, not by int() or by memory.
    depths = args.get("depths")
    args.setdefault("mlp_ratios", [4] * (len(depths) if isinstance(depths, list) else 4))
    args["layer_norm_eps"] = _TORCH_DEFAULT_EPS
    for key, value in (SEGMENTATION_DEFAULTS if data.get("model_type") == "segformer" else DEPTH_DEFAULTS).items():
        args.setdefault(key, value)
    # A whole number of metres as transformers' float; not true (a bool is no depth), nor an int beyond any float
    # (both are left for PvtV2Config to refuse by name)
    if type(args.get("max_depth")) is int and abs(args["max_depth"]) < 2**1000:
        args["max_depth"] = float(args["max_depth"])
    return PvtV2Config(**merge_changes(args, overrides))


def _attach_timm_labels(config: PvtV2Config, path: str | os.PathLike, data: Mapping[str, Any]) -> PvtV2Config:
    """``config`` with the class names of a timm ``config.json`` (``label_names``: a list, or a dict of class index to
    name where indices have gaps; ``pretrained_cfg``'s, or ``labels`` in timm's older files), as transformers'
    TimmWrapperConfig takes them; names that do not fit the checkpoint's classes are left out with a warning."""
    cfg = data.get("pretrained_cfg")
    names = next((n for n in (data.get("label_names"), cfg.get("label_names") if isinstance(cfg, Mapping) else None,
                              data.get("labels")) if n is not None), None)
    if names is None:
        return config
    count = config.num_labels
    id2label = None
    if isinstance(names, list) and len(names) == count:
        id2label = dict(enumerate(names))
    elif isinstance(names, Mapping) and all(isinstance(k, str) and k.isdigit() and int(k) < count for k in names):
        id2label = {i: names.get(str(i), f"LABEL_{i}") for i in range(count)}
    if id2label is None or not all(isinstance(n, str) for n in id2label.values()):
        logger.warning("%s: its label_names %s do not name the checkpoint's %d classes (a list of %d names, or a dict "
                       "of class index to name): not used", os.fspath(path), short_repr(names), count, count)
        return config
    return config.replace(id2label=id2label)


def _attach_imagenet_labels(config: PvtV2Config, canonical: Mapping[str, torch.Tensor]) -> PvtV2Config:
    """``config`` with ImageNet's class names when the checkpoint classifies 1000 classes that have no names."""
    head = canonical.get("classifier.weight")
    if head is not None and head.shape[0] == 1000 and config.num_labels == 1000 and has_generic_labels(config.id2label):
        return config.replace(id2label=imagenet_id2label())
    return config


def _attach_recorded_labels(config: PvtV2Config, canonical: Mapping[str, torch.Tensor],
                            names: Sequence[str] | None) -> PvtV2Config:
    """``config`` with the class names the file recorded beside its weights (an mmsegmentation file's dataset
    classes), where its labels are generic and the names match the checkpoint's segmentation classifier, RetinaNet
    class scores or R-CNN box classifier (its rows but the background's)."""
    head = canonical.get("decode_head.classifier.weight")
    scores = canonical.get("detector.head.classification_head.cls_logits.weight")
    softmax = canonical.get("detector.roi_heads.box_predictor.cls_score.weight")
    classes = None
    if head is not None and head.ndim >= 1:
        classes = head.shape[0]
    elif scores is not None and scores.ndim >= 1 and scores.shape[0] % _RETINANET_ANCHORS == 0:
        classes = scores.shape[0] // _RETINANET_ANCHORS  # a RetinaNet's: each class once per anchor
    elif softmax is not None and softmax.ndim >= 1:
        classes = softmax.shape[0] - 1  # an R-CNN's: the classes and the background
    if names and classes is not None and classes == len(names) == config.num_labels and has_generic_labels(config.id2label):
        return config.replace(id2label=dict(enumerate(names)))
    if names and classes not in (None, 1) and classes == config.num_labels and has_generic_labels(config.id2label):
        # (a binary head, one channel, is recorded with its two names: nothing wrong there)
        logger.warning("the checkpoint records %d class names (its meta CLASSES: %s), its head has %d classes: the "
                       "names are not used", len(names), short_repr(list(names)), classes)
    return config


def load_canonical(model: torch.nn.Module, canonical: Mapping[str, torch.Tensor], origin: str = "checkpoint",
                   ignore_mismatched_sizes: bool | None = None) -> dict[str, Any]:
    """Load canonical-layout weights into ``model``: every key and shape must fit, except a head that is absent from
    the checkpoint or a classifier sized for another number of classes (then newly initialised, and logged).

    ``ignore_mismatched_sizes`` as transformers takes it: True, every tensor whose shape differs from the model's is
    left newly initialised (a warning names each, with both shapes); False, any shape that differs is an error, the
    classifier's too. Left out (None), pvtv2's rule: only the class-sized layers are replaced.

    Returns transformers' loading info: ``missing_keys`` (set: the model's tensors the checkpoint lacks, newly
    initialised), ``unexpected_keys`` (set: the checkpoint's tensors the model has no place for, a head it lacks),
    ``mismatched_keys`` (set of ``(key, checkpoint shape, model shape)``, shapes as ``torch.Size``; newly
    initialised) and ``error_msgs`` (an empty list: any error is raised).

    The model class says where its encoder sits (``encoder_prefix``), names its head(s) in ``head_prefixes`` and its
    last, class-sized layer in ``classifier_prefix`` (classification: ``classifier.``; segmentation:
    ``decode_head.classifier.``). Heads in the checkpoint that the model does not have (a classifier's, when building
    a segmentation model) are dropped.

    What was initialised at random is recorded on the model as ``model.newly_initialized_keys``: a sorted tuple of
    ``state_dict()`` keys, empty when every tensor came from the checkpoint. It is a plain attribute, not part of
    ``state_dict()``. Fine-tuning wants such heads; inference must refuse them (``pvtv2.inference`` checks it), since
    a random head predicts noise with confident-looking labels.
    """
    prefix = model.encoder_prefix
    expected = model.state_dict()
    model_heads = tuple(model.head_prefixes)
    classifier = model.classifier_prefix
    target: dict[str, torch.Tensor] = {}
    dropped: set[str] = set()
    unused: set[str] = set()
    for key, value in canonical.items():
        head = next((h for h in HEAD_PREFIXES if key.startswith(h)), None)
        if head is not None:
            if not any(k.startswith(head) for k in expected):
                dropped.add(head.rstrip("."))  # e.g. an encoder-only model takes the encoder of a classifier
                unused.add(key)
                continue
            target[key] = value
        else:
            target[prefix + key if key.startswith("encoder.") else key] = value
    if dropped:
        logger.info("%s has no %s: the checkpoint's are not used", type(model).__name__, ", ".join(sorted(dropped)))

    head_keys = {k for k in expected if k.startswith(model_heads)}
    # One class-sized layer (classification, segmentation) or several (a detector's class scores, box deltas, masks).
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    resized = [
        p for p in classifiers
        if f"{p}weight" in expected and f"{p}weight" in target and target[f"{p}weight"].shape[0] != expected[f"{p}weight"].shape[0]
    ] if ignore_mismatched_sizes is None else []
    replaced = bool(resized)
    kept = {k: v for k, v in target.items() if not k.startswith(tuple(resized))} if replaced else target
    if ignore_mismatched_sizes:
        kept = {k: v for k, v in target.items() if k not in expected or v.shape == expected[k].shape}
    # transformers' mismatched keys: the checkpoint's tensors of another shape, left newly initialised
    mismatched = {(k, v.shape, expected[k].shape) for k, v in target.items() if k in expected and k not in kept}
    missing, unexpected, misshaped, bad_dtype = _mismatches(kept, expected)
    absent = sorted(set(missing) - {k for k, _, _ in mismatched})  # not in the checkpoint at all
    head_missing = not absent or set(absent) <= head_keys
    if not head_missing or unexpected or misshaped or bad_dtype:
        # Listed with the classifier kept: when nothing else fits either, its shapes are part of the story.
        parts = [f"the weights in {origin} do not fit {type(model).__name__} ({_describe(model)})"
                 f"{_shape_of(canonical, getattr(model.config, 'linear_attention', None))}"]
        for title, items in zip(("missing", "unexpected", "mis-shaped", "non-float tensors for float parameters"),
                                _mismatches(target, expected)):
            if items:
                shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
                parts.append(f"{len(items)} {title} keys:\n    {shown}")
        if misshaped and not ignore_mismatched_sizes:
            parts.append("(ignore_mismatched_sizes=True leaves the tensors of other shapes newly initialised, as "
                         "transformers does)")
        raise CheckpointError("\n  ".join(parts))
    if replaced:  # announced once the rest is known to fit
        weight = f"{resized[0]}weight"
        logger.warning(
            "replacing the classifier head: the checkpoint's %s has %d outputs, the model's %d; the new layer(s) are "
            "randomly initialised and need fine-tuning",
            resized[0].rstrip("."), target[weight].shape[0], expected[weight].shape[0],
        )
    elif mismatched:
        shown = sorted(mismatched)
        logger.warning(
            "%s: %d tensor(s) of the checkpoint have other shapes than the model's and are newly initialised "
            "(ignore_mismatched_sizes=True); they need training: %s%s", type(model).__name__, len(shown),
            "; ".join(f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in shown[:10]),
            f" and {len(shown) - 10} more" if len(shown) > 10 else "",
        )
    if absent:
        logger.warning("the checkpoint has no weights for %s: newly initialised", _summarise_keys(absent))
    target = {k: v.to(expected[k].dtype) if expected[k].is_floating_point() else v for k, v in kept.items()}
    target = _own_memory(target)
    _warn_non_finite(target, origin)
    model.load_state_dict(target, strict=not missing, assign=True)
    _materialize_and_init(model)
    model.newly_initialized_keys = tuple(missing)
    return {"missing_keys": set(absent), "unexpected_keys": unused, "mismatched_keys": mismatched, "error_msgs": []}


def _mismatches(
    target: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str], list[str]]:
    """(missing, unexpected, mis-shaped with both shapes, non-float for float) keys of ``target`` against the model."""
    common = set(target) & set(expected)
    return (
        sorted(set(expected) - set(target), key=_in_model_order),
        sorted(set(target) - set(expected), key=_in_model_order),
        sorted((f"{k}: checkpoint {tuple(target[k].shape)} vs model {tuple(expected[k].shape)}"
                for k in common if target[k].shape != expected[k].shape), key=_in_model_order),
        sorted((f"{k}: {target[k].dtype}" for k in common
                if expected[k].is_floating_point() and not target[k].is_floating_point()), key=_in_model_order),
    )


def _in_model_order(key: str) -> list:
    """A sort key that orders numbered layers by number: the first keys listed are the first blocks that misfit
    (``blocks.6`` before ``blocks.10``; sorted as text, a B2 checkpoint in a B3 model was said to lack block 10 first)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", key)]


def _encoder_shape(canonical: Mapping[str, torch.Tensor]) -> tuple[list[int], list[int]]:
    """(hidden_sizes, depths) of the checkpoint's encoder, as far as its tensors show them (empty lists: not at all)."""
    hidden, depths = [], []
    for i in range(len(canonical)):
        proj = canonical.get(f"encoder.layers.{i}.patch_embedding.proj.weight")
        if proj is None or proj.ndim != 4:
            break
        hidden.append(int(proj.shape[0]))
        depths.append(len({m.group(1) for k in canonical if (m := re.match(rf"encoder\.layers\.{i}\.blocks\.(\d+)\.", k))}))
    return hidden, depths


def _linear_attention(canonical: Mapping[str, torch.Tensor]) -> bool:
    """Whether the checkpoint's attention is PVTv2-Li's: its reduction is a 1x1 convolution after pooling (the
    standard attention's is a convolution of the stage's sr_ratio, and absent where that ratio is 1)."""
    return any(k.endswith("attention.spatial_reduction.weight") and v.ndim == 4 and v.shape[-1] == 1
               for k, v in canonical.items())


def _shape_of(canonical: Mapping[str, torch.Tensor], model_linear: bool | None = None) -> str:
    """``"; the checkpoint has hidden_sizes=[...], depths=[...] (pvt_v2_b2)"`` when its encoder's shapes can be read,
    so that weights of another variant (B2 weights into a B0 config) are named as such; else ``""``. Its attention
    is named where it is not the model's (``model_linear``): B2 weights in a B2-Li model read as the same shapes."""
    hidden, depths = _encoder_shape(canonical)
    if not hidden:
        return ""
    linear = _linear_attention(canonical)
    preset = next((name for name, args in PRESETS.items()
                   if (c := PvtV2Config(**args)).hidden_sizes == hidden and c.depths == depths
                   and c.linear_attention == linear), None)
    attention = f", linear_attention={linear}" if model_linear is not None and linear != model_linear else ""
    return f"; the checkpoint has hidden_sizes={hidden}, depths={depths}{attention}" + (f" ({preset})" if preset else "")


def _classifier_misfit(model: torch.nn.Module, canonical: Mapping[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """The first class-sized layer of ``model`` whose rows the checkpoint's differ from: (its name, the checkpoint's
    rows, the model's); None when every one fits or is absent, or when another layer of the head misfits too (a
    head of another kind, whose class-sized layers differ for that reason: a RetinaNet's read as an FCOS)."""
    classifier = getattr(model, "classifier_prefix", None)
    prefixes = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    expected = model.state_dict()  # shapes only (a model on the meta device)
    heads = tuple(getattr(model, "head_prefixes", ()))
    for key, tensor in canonical.items():
        if (heads and key.startswith(heads) and not key.startswith(prefixes) and key in expected
                and tensor.shape != expected[key].shape):
            return None
    for prefix in prefixes:
        held, built = canonical.get(f"{prefix}weight"), expected.get(f"{prefix}weight")
        if held is not None and built is not None and held.ndim and built.ndim and held.shape[0] != built.shape[0]:
            return prefix.rstrip("."), int(held.shape[0]), int(built.shape[0])
    return None


def _config_file_note(
    path: str | os.PathLike, config: PvtV2Config, canonical: Mapping[str, torch.Tensor], overrides: Mapping[str, Any],
    classifier: tuple[str, int, int] | None = None,
) -> str:
    """The line of a load failure that names the config.json the model was built from, and each of its fields that
    the checkpoint's shapes contradict: absent from the file (so its default was used) or written with another
    value. Fields given as overrides are the caller's, not the file's. ``classifier``: a class-sized layer whose rows
    the file's classes do not give (:func:`_classifier_misfit`)."""
    where = os.fspath(path)
    if overrides:  # the caller's arguments changed what the file says
        where += f" with the arguments {', '.join(sorted(overrides))}"
    try:
        data = read_json_config(path)  # read once already: this only looks at which keys it holds
    except (OSError, ValueError):
        data = None
    hidden, depths = _encoder_shape(canonical)
    if not isinstance(data, dict) or not hidden:
        return f"the model was built from {where}"
    found: dict[str, list] = {"hidden_sizes": hidden, "depths": depths}
    stage = "encoder.layers.{}.".format
    projections = [canonical[stage(i) + "patch_embedding.proj.weight"] for i in range(len(hidden))]
    found["patch_sizes"] = [int(p.shape[-1]) for p in projections]
    dense1 = [canonical.get(stage(i) + "blocks.0.mlp.dense1.weight") for i in range(len(hidden))]
    # a stage of width 0 (a damaged file) has no ratio: it stopped with a ZeroDivisionError instead of the misfit
    if all(t is not None and t.ndim >= 1 for t in dense1) and all(hidden):
        widths = [int(t.shape[0]) for t in dense1]
        # Any ratios that rebuild the widths are right (timm's 2.06 for 230 of 112); else the ones read off the shapes
        if [int(h * r) for h, r in zip(hidden, config.mlp_ratios)] != widths:
            found["mlp_ratios"] = [_mlp_ratio(w, h) for w, h in zip(widths, hidden)]
    reductions = [canonical.get(stage(i) + "blocks.0.attention.spatial_reduction.weight") for i in range(len(hidden))]
    linear = _linear_attention(canonical)
    if not linear:  # linear attention pools to 7x7: its 1x1 reduction says nothing of sr_ratios
        # a stage of no blocks has no reduction to read: whatever the config says there is right
        found["sr_ratios"] = [int(t.shape[-1]) if t is not None and t.ndim == 4 else 1 if depth else used
                              for t, depth, used in zip(reductions, depths, config.sr_ratios)]
    problems = []
    if config.linear_attention != linear and "linear_attention" not in overrides:
        # Before sr_ratios: linear weights read as standard ones look like sr_ratios of 1, which is not the fix.
        if "linear_attention" not in data:
            problems.append(f"it has no 'linear_attention', so the default {config.linear_attention} was used where "
                            f"the checkpoint has {linear}")
        else:
            problems.append(f"its linear_attention {short_repr(data['linear_attention'])} is not the checkpoint's "
                            f"{linear}")
    # The input channels: the first patch embedding's weight is (C_out, C_in, k, k). The query, key and value biases:
    # their tensors are there or not (a checkpoint without attention blocks says nothing of them).
    scalars: dict[str, Any] = {"num_channels": int(projections[0].shape[1])}
    if any(k.endswith(".attention.query.weight") for k in canonical):
        scalars["qkv_bias"] = any(k.endswith((".attention.query.bias", ".attention.key.bias", ".attention.value.bias"))
                                  for k in canonical)
    for name, value in scalars.items():
        used = getattr(config, name)
        if name in overrides or used == value:
            continue
        if name not in data:
            problems.append(f"it has no {name!r}, so the default {used} was used where the checkpoint has {value}")
        else:
            problems.append(f"its {name} {short_repr(data[name])} is not the checkpoint's {value}")
    for name, values in found.items():
        used = list(getattr(config, name))
        if name in overrides or used == values or not values:
            continue
        if name not in data:
            problems.append(f"it has no {name!r}, so the default {used} was used where the checkpoint has {values}")
        else:
            problems.append(f"its {name} {short_repr(data[name])} is not the checkpoint's {values}")
    if classifier is not None and not _HEAD_ARGUMENTS & overrides.keys():
        # The classes: refused since a folder's own classifier must fit them, which said only "mis-shaped keys" and
        # ignore_mismatched_sizes=True (a random head), where the fix is the file's classes.
        layer, held, built = classifier
        field = ("id2label" if "id2label" in data else "num_labels" if "num_labels" in data else None)
        told = (f"its {field} gives {config.num_labels} classes" if field else
                f"it has no 'id2label', so the default {config.num_labels} classes were used")
        problems.append(f"{told}, for which {layer} has {built} outputs where the checkpoint's has {held} (set "
                        f"id2label to the checkpoint's classes; to train a new head for other classes, pass "
                        f"num_labels= or id2label=, as `pvtv2 train --model` does)")
    if not problems:
        return f"the model was built from {where}"
    return f"the model was built from {where}: {'; '.join(problems)}; correct {os.fspath(path)} to fit the weights"


def non_finite(state: Mapping[str, torch.Tensor]) -> str | None:
    """The names of the floating-point tensors holding NaN or infinity, as one short phrase (``"3 tensor(s):
    a, b, c"``); None when every value is finite."""
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if not bad:
        return None
    return f"{len(bad)} tensor(s): " + ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")


def _warn_non_finite(state: Mapping[str, torch.Tensor], origin: str) -> None:
    """Log the tensors holding NaN or infinity: such weights load, but every output that touches them is NaN (a
    diverged or damaged training run); inference and export refuse them."""
    bad = non_finite(state)
    if bad:
        logger.warning("the weights in %s hold NaN or infinite values in %s; outputs that depend on them will be NaN",
                       origin, bad)


def _materialize_and_init(model: torch.nn.Module) -> None:
    """Give the modules left on the meta device (a new head) real memory and the library's initialisation."""
    device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    for module in model.modules():
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        if any(t.is_meta for _, t in own):
            # Tensors of the module that did load (a convolution's bias beside a weight of another shape, under
            # ignore_mismatched_sizes) are put back after the initialisation, as transformers keeps them.
            # (detached: to_empty swaps the data of the parameter objects themselves)
            loaded = {name: t.detach() for name, t in own if not t.is_meta}
            module.to_empty(device=device, recurse=False)
            # A model may initialise its own heads differently (segmentation, depth: as transformers' SegFormer / GLPN).
            model.init_new_module(module)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
            with torch.no_grad():
                for name, tensor in loaded.items():
                    getattr(module, name).copy_(tensor)


def _summarise_keys(keys: list[str]) -> str:
    modules = sorted({k.rsplit(".", 1)[0] for k in keys})
    return ", ".join(modules[:6]) + (f" and {len(modules) - 6} more modules" if len(modules) > 6 else "")


def _describe(model: torch.nn.Module) -> str:
    c = model.config
    return f"hidden_sizes={c.hidden_sizes}, depths={c.depths}, linear_attention={c.linear_attention}, num_labels={c.num_labels}"


# ---------------------------------------------------------------------------------------------- writing
def transformers_differences(config: PvtV2Config) -> list[str]:
    """What transformers' PvtV2 would make of this config differently from pvtv2 (empty: the same numbers)."""
    notes = []
    own = {
        "patch_embed_layer_norm_eps": config.patch_embed_layer_norm_eps,
        "reduction_layer_norm_eps": config.reduction_layer_norm_eps,
    }
    differing = ", ".join(f"{k}={v:g}" for k, v in own.items() if v is not None and v != config.layer_norm_eps)
    if differing:
        notes.append(
            f"transformers' PvtV2 uses layer_norm_eps={config.layer_norm_eps:g} in every LayerNorm and ignores "
            f"{differing} (the original code's and timm's epsilon), so loaded there these weights give slightly "
            f"different outputs; pvtv2 reads the epsilons back"
        )
    if config.hidden_act == "selu":  # the one name of ours transformers' activation table lacks
        notes.append(
            "transformers' PvtV2 has no activation named 'selu' (hidden_act) and builds no model from this "
            "config.json; it loads in pvtv2"
        )
    if any(not float(r).is_integer() for r in config.mlp_ratios):
        notes.append(
            f"transformers' PvtV2Config takes whole-number mlp_ratios only and refuses {list(config.mlp_ratios)}, "
            f"so this config.json loads in pvtv2 (and its weights in timm) but not in transformers"
        )
    return notes


# What timm's, the original code's and transformers' PVTv2 models build that a state dict cannot carry (shapes carry
# the widths, depths, MLP ratios, reduction ratios, linear attention and biases): every published variant uses these.
# A single transformers-layout file has no config.json either: transformers builds it from a default PvtV2Config,
# and pvtv2 reads it with these values.
_PUBLISHED_SETTINGS = {"num_attention_heads": [1, 2, 5, 8], "layer_norm_eps": 1e-6, "hidden_act": "gelu"}
# The name of the heads argument in each layout's code.
_HEADS_ARGUMENT = {"timm": "num_heads", "original": "num_heads", "transformers": "num_attention_heads"}


def layout_differences(config: PvtV2Config, layout: str) -> list[str]:
    """Where a model converted to a single file of timm's, the original code's or transformers' layout computes
    something else there unless that model is built with this config's values (an empty list: the published
    models' settings)."""
    if layout not in _HEADS_ARGUMENT:
        return []
    notes = []
    if layout == "transformers":
        # transformers' PvtV2 uses layer_norm_eps in every LayerNorm (the block epsilon's note covers its value)
        if config.patch_norm_eps != config.layer_norm_eps or config.reduction_norm_eps != config.layer_norm_eps:
            notes.append(
                f"the transformers code uses layer_norm_eps ({config.layer_norm_eps:g} here) in the patch embeddings "
                f"and the spatial reduction too; this model uses {config.patch_norm_eps:g} / "
                f"{config.reduction_norm_eps:g} there, so outputs there will differ slightly"
            )
    elif config.patch_norm_eps != 1e-5 or config.reduction_norm_eps != 1e-5:
        notes.append(
            f"the {layout} code uses LayerNorm epsilon 1e-5 in the patch embeddings and the spatial reduction; this "
            f"model uses {config.patch_norm_eps:g} / {config.reduction_norm_eps:g} there, so outputs there will "
            f"differ slightly"
        )
    heads = list(config.num_attention_heads)
    published = _PUBLISHED_SETTINGS["num_attention_heads"]
    if heads != published:
        notes.append(
            f"this model has num_attention_heads={heads}, which its weights do not record (the {layout} code's "
            f"variants use {published}): build the model there with {_HEADS_ARGUMENT[layout]}={tuple(heads)}, or "
            f"its attention splits the channels otherwise"
        )
    if config.layer_norm_eps != _PUBLISHED_SETTINGS["layer_norm_eps"]:
        notes.append(
            f"this model uses layer_norm_eps={config.layer_norm_eps:g} in its blocks and stage norms; the {layout} "
            f"code's variants use 1e-6, so outputs there will differ unless built with that epsilon"
        )
    if config.hidden_act != _PUBLISHED_SETTINGS["hidden_act"]:
        notes.append(
            f"this model's Mix-FFN activation is {config.hidden_act!r}; the {layout} code uses exact GELU, so "
            f"outputs there will differ"
        )
    return notes


# Models already warned about: a training run saves the same model at every epoch, and once is enough.
_WARNED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


# The weight files save_pretrained writes, as transformers names them: one file, or shards beside their index.
def _shard_name(variant: str | None) -> re.Pattern[str]:
    """The names of the shards save_pretrained writes (a variant's: ``model.fp16-00001-of-00002.safetensors``)."""
    v = re.escape(f".{variant}") if variant else ""
    return re.compile(rf"(model{v}-\d{{5}}-of-\d{{5}}\.safetensors|pytorch_model{v}-\d{{5}}-of-\d{{5}}\.bin)")


_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def shard_size_bytes(size: int | str) -> int:
    """``max_shard_size`` in bytes: an int, or digits and a unit as huggingface_hub parses them for transformers
    ("5GB" = 5 * 10**9, "500MB", "10KB", "1.5GB"; case does not matter), or a binary unit ("1GiB" = 2**30)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    if isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]I?B)\s*", size, flags=re.IGNORECASE)
        if match:
            value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
            if value > 0:
                return value
    raise ValueError(
        f"max_shard_size must be a positive number of bytes or a size such as '5GB', '500MB', '10KB', got {size!r}"
    )


def _checked_state_dict(state_dict: Any, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict=`` as given, refused where it is not names to tensors with data; where its names or shapes
    differ from the model's a warning says which (it is written as given, as transformers does: a filtered or
    merged state dict is a reason to pass one)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping from names to tensors, got {type(state_dict).__name__}")
    if not state_dict:
        raise ValueError("state_dict is empty: there are no tensors to save")
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict has the key {key!r} ({type(key).__name__}); its keys must be strings")
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"state_dict[{key!r}] is a {type(value).__name__}, not a tensor: only tensors are saved")
        if value.is_meta:
            raise ValueError(f"state_dict[{key!r}] is a meta tensor: it holds no data to save")
        if value.layout != torch.strided:
            raise ValueError(f"state_dict[{key!r}] is a sparse tensor ({value.layout}); pass it .to_dense()")
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(own.keys() - state_dict.keys())
    extra = sorted(state_dict.keys() - own.keys())
    shapes = sorted(k for k in own.keys() & state_dict.keys() if tuple(state_dict[k].shape) != own[k])
    problems = []
    if missing:
        problems.append(f"{len(missing)} of the model's tensors are not in it ({_summarise_keys(missing)})")
    if extra:
        problems.append(f"{len(extra)} are not the model's ({_summarise_keys(extra)})")
    if shapes:
        problems.append("shapes differ for " + ", ".join(
            f"{k} {tuple(state_dict[k].shape)} (model {own[k]})" for k in shapes[:5]))
    if problems:
        logger.warning("save_pretrained: the state_dict given does not fit %s: %s; it is written as given, and "
                       "from_pretrained of this folder will refuse it", type(model).__name__, "; ".join(problems))
    return dict(state_dict)


def _split_into_shards(state: Mapping[str, torch.Tensor], limit: int, stem: str, suffix: str) -> dict[str, dict]:
    """File name -> tensors, filled in key order up to ``limit`` bytes each as transformers (huggingface_hub) does:
    a tensor larger than the limit gets a shard of its own. One shard is the plain ``stem + suffix``."""
    shards: list[dict[str, torch.Tensor]] = []
    current: dict[str, torch.Tensor] = {}
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > limit:
            shards.append({key: tensor})
            continue
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    if current:
        shards.append(current)
    if len(shards) == 1:
        return {f"{stem}{suffix}": shards[0]}
    return {f"{stem}-{i + 1:05d}-of-{len(shards):05d}{suffix}": shard for i, shard in enumerate(shards)}


def save_pretrained(
    model: torch.nn.Module,
    save_directory: str | os.PathLike,
    is_main_process: bool = True,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    save_function: Any = None,
    push_to_hub: bool = False,
    max_shard_size: int | str = "50GB",
    safe_serialization: bool = True,
    variant: str | None = None,
    token: str | bool | None = None,
) -> None:
    """``config.json`` (with the class in ``architectures``) and the weights in transformers' layout: see
    :meth:`pvtv2.models.modeling.PvtV2PreTrainedModel.save_pretrained` for the arguments.

    Where transformers would compute otherwise from the folder (see :func:`transformers_differences`) and has the
    model's class (``in_transformers``: ``PvtV2Model``, ``PvtV2ForImageClassification``, ``PvtV2Backbone``), a
    warning says so, once per model.
    """
    for name, value in (("is_main_process", is_main_process), ("safe_serialization", safe_serialization),
                        ("push_to_hub", push_to_hub)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if push_to_hub:
        raise ValueError("push_to_hub=True is not supported: pvtv2 does not upload to the hub. Save the folder, then "
                         "upload it with huggingface_hub (HfApi().upload_folder)")
    variant = check_variant(variant)
    limit = shard_size_bytes(max_shard_size)
    folder = Path(save_directory)
    if folder.is_symlink() and not folder.exists():
        raise FileExistsError(f"save_pretrained cannot make the folder {os.fspath(folder)!r}: it is a symlink to "
                              f"{os.readlink(folder)!r}, which does not exist")
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"save_pretrained needs a folder, and {os.fspath(folder)!r} is a {path_kind(folder)}")
    config: PvtV2Config = model.config
    # Before anything is written: raises, naming the value, where config.json cannot hold one (a callable
    # hidden_act, a setting kept without a check that JSON cannot write)
    config.to_json_string()
    # Checked on every process, so that a bad state_dict or a model without data is refused everywhere alike
    if state_dict is None:
        state = model.state_dict()
        for key, value in state.items():
            if value.is_meta:
                raise ValueError(f"the model's tensor {key!r} is a meta tensor: it holds no data to save (load or "
                                 f"initialise the model's weights first, e.g. with to_empty() and a load)")
    else:
        state = _checked_state_dict(state_dict, model)
    if not is_main_process:
        return  # as transformers under distributed training: the main process alone writes
    if getattr(model, "in_transformers", False) and model not in _WARNED:
        for note in transformers_differences(config):
            logger.warning("save_pretrained: %s", note)
        _WARNED.add(model)
    data = config.to_dict()
    data["architectures"] = [type(model).__name__]
    # The weights' dtype, as transformers writes it ("dtype"; "torch_dtype" before 4.56), which its from_pretrained
    # loads in. A value read from another file was kept: float32 weights saved under "bfloat16" came back in bfloat16.
    data.pop("torch_dtype", None)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    data["dtype"] = str(dtype).removeprefix("torch.")
    folder.mkdir(parents=True, exist_ok=True)
    stem, suffix = ("model", ".safetensors") if safe_serialization else ("pytorch_model", ".bin")
    # transformers' names for a variant: model.fp16.safetensors, shards model.fp16-00001-of-00002.safetensors
    files = _split_into_shards(state, limit, f"{stem}.{variant}" if variant else stem, suffix)
    written = {path.name for path in save_state_dicts(files, folder)}
    if len(files) > 1:
        index_name = _add_variant(f"{stem}{suffix}.index.json", variant)
        total = sum(t.numel() * t.element_size() for t in state.values())
        weight_map = {key: name for name, shard in files.items() for key in shard}
        atomic_write_json(folder / index_name, {"metadata": {"total_size": total}, "weight_map": weight_map},
                          sort_keys=True)
        written.add(index_name)
    # Weight files of an earlier save in another form (model.safetensors beside a new pytorch_model.bin, shards of
    # another count) would be read first or mixed in: removed once the new ones are complete. Only the files of the
    # same variant: a folder holds the float32 weights beside their fp16 variant. No other file is touched.
    own_names = weight_file_names(variant)
    shard_name = _shard_name(variant)
    for entry in folder.iterdir():
        stale = entry.name in own_names or shard_name.fullmatch(entry.name)
        if stale and entry.name not in written and (entry.is_symlink() or entry.is_file()):
            entry.unlink()
    atomic_write_json(folder / "config.json", data, sort_keys=True)
