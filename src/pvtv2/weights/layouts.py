"""The key layouts of PVTv2 weights in circulation, and the rename rules between them.

Three layouts of the same weights are read and written:

- ``transformers``: the hub's (``OpenGVLab/pvt_v2_b0``), and this library's own ``state_dict()``:
  ``pvt_v2.encoder.layers.{i}.blocks.{j}.attention.query.weight`` ... ``classifier.weight``;
- ``timm``: ``patch_embed.proj.weight``, ``stages.{i}.downsample``, ``stages.{i}.blocks.{j}.attn.kv.weight`` ...
  ``head.weight`` (read too as ``stages_{i}...``, the keys of a timm ``features_only=True`` model, which has no head);
- ``original``: the authors' release files (``pvt_v2_b0.pth``): ``patch_embed{n}``, ``block{n}.{j}``, ``norm{n}``.

The original repository's detection and segmentation checkpoints (mmdetection / mmsegmentation files, ``mmdet``) are
read for their backbone: ``backbone.`` + the original layout; their necks and heads (``neck.``, ``bbox_head.``,
``rpn_head.``, ``roi_head.``, ``decode_head.``, ``auxiliary_head.``) are mmdetection's and mmsegmentation's modules,
are left out of the conversion, with one exception: mmsegmentation's Semantic FPN (the authors' ADE20K configs:
``neck.lateral_convs`` / ``neck.fpn_convs`` + ``decode_head.scale_heads`` + ``decode_head.conv_seg``) is the module
that ``decode_head_type="fpn"`` builds, layer for layer (mmcv's ``ConvModule`` names ``conv``, ``bn``), and is read
into it: ``neck.`` becomes ``decode_head.neck.``, ``conv_seg`` ``classifier``; and a second: mmdetection's
RetinaNet (the authors' ``retinanet_pvt_v2_*`` configs: ``neck.lateral_convs`` / ``neck.fpn_convs`` + ``bbox_head.
cls_convs`` / ``reg_convs`` / ``retina_cls`` / ``retina_reg``) is read into the torchvision RetinaNet that
``PvtV2ForObjectDetection`` builds (``detector.``), whose arithmetic then follows mmdetection's
(``detection_convention="mmdetection"``); and a third: mmdetection's Faster / Mask R-CNN (the authors'
``mask_rcnn_pvt_v2_*`` configs: ``neck.`` + ``rpn_head.rpn_conv`` / ``rpn_cls`` / ``rpn_reg`` + ``roi_head.bbox_head.
shared_fcs`` / ``fc_cls`` / ``fc_reg`` [+ ``roi_head.mask_head.convs`` / ``upsample`` / ``conv_logits``]) is read into
torchvision's FasterRCNN / MaskRCNN, the class layers reordered (background last there, first here). Cascades
(``roi_head.bbox_head.{stage}.``) and other detectors are read for their backbone only.

Two more are read (not written): the Mix Transformer encoders of transformers' SegFormer and GLPN, with their heads
(``segformer``: ``segformer.encoder.block.{i}.{j}.attention.self.query`` ... ``decode_head.linear_c.{i}`` ...;
``glpn``: ``glpn.encoder...``, ``decoder.stages...``, ``head.head...``), also in transformers 5's in-memory
spelling (``segformer.stages.{i}.blocks.{j}.attention.q_proj`` ...). Their heads keep their names in
``pvtv2.models.segmentation`` / ``pvtv2.models.depth``, so only the encoder keys are renamed.

Every conversion goes through one canonical form, transformers' keys without the task prefix. These are pure
functions of state dicts: nothing here builds a model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .files import CheckpointError

__all__ = [
    "LAYOUTS",
    "DENSE_LAYOUTS",
    "MMDET_LAYOUT",
    "HEAD_PREFIXES",
    "detect_layout",
    "to_canonical",
    "from_canonical",
    "convert_state_dict",
    "mmdet_backbone",
]

LAYOUTS = ("transformers", "timm", "original")
# Layouts that are read only: transformers' SegFormer and GLPN (see the module docstring).
DENSE_LAYOUTS = ("segformer", "glpn")
# The original repository's mmdetection / mmsegmentation checkpoints: read only (backbone; Semantic FPN, RetinaNet,
# Faster / Mask R-CNN whole).
MMDET_LAYOUT = "mmdet"
# Where mmdetection / mmsegmentation keep the backbone, and the top-level names of their other modules.
_MMDET_BACKBONE = "backbone."
_MMDET_OTHERS = ("neck.", "bbox_head.", "rpn_head.", "roi_head.", "mask_head.", "decode_head.", "auxiliary_head.")
# mmsegmentation's FPNHead (Semantic FPN) is recognised by its scale heads; its FPN neck and classifier are renamed
# into pvtv2.models.segmentation.SemanticFPNHead, which keeps the rest of the names.
_MMSEG_FPN_MARK = "decode_head.scale_heads."
_MMSEG_FPN_RULES = ((re.compile(r"^neck\.(lateral_convs|fpn_convs)\."), r"decode_head.neck.\1."),
                    (re.compile(r"^decode_head\.conv_seg\."), "decode_head.classifier."))
# mmdetection's RetinaNet (FPN neck + RetinaHead) is recognised by its head's last layers; it is read into the
# torchvision RetinaNet of pvtv2.models.detection (with detection_convention="mmdetection"). mmcv's ConvModule keeps
# its convolution under "conv", torchvision's Conv2dNormActivation under "0". The FPN's output convolutions are
# numbered on past the stage levels in mmdetection (P6, P7: fpn_convs.{n}, .{n + 1} for n laterals), so they are
# renamed by _mmdet_retinanet, not by a pattern.
_MMDET_RETINA_MARKS = ("bbox_head.retina_cls.", "bbox_head.retina_reg.")
_MMDET_RETINA_STACKED = 4  # mmdetection's stacked_convs default, and the only depth torchvision's RetinaNetHead has
_MMDET_RETINA_RULES = (
    (re.compile(r"^neck\.lateral_convs\.(\d+)\.conv\."), r"detector.backbone.fpn.inner_blocks.\1.0."),
    (re.compile(r"^bbox_head\.cls_convs\.(\d+)\.conv\."), r"detector.head.classification_head.conv.\1.0."),
    (re.compile(r"^bbox_head\.reg_convs\.(\d+)\.conv\."), r"detector.head.regression_head.conv.\1.0."),
    (re.compile(r"^bbox_head\.retina_cls\."), "detector.head.classification_head.cls_logits."),
    (re.compile(r"^bbox_head\.retina_reg\."), "detector.head.regression_head.bbox_reg."),
)
_MMDET_FPN_CONV = re.compile(r"^neck\.fpn_convs\.(\d+)\.conv\.(weight|bias)$")
# mmdetection's Faster / Mask R-CNN (FPN neck with P6 by max-pooling, RPNHead, StandardRoIHead with Shared2FCBBoxHead
# and FCNMaskHead) is recognised by its box head's classifier (a cascade's is numbered, bbox_head.{i}.fc_cls, and
# is left out as before); it is read into the torchvision FasterRCNN / MaskRCNN of pvtv2.models.detection. The class
# layers are reordered by _mmdet_rcnn: mmdetection's softmax has the background last and regresses the K object
# classes only, torchvision's has it first (index 0) and regresses K + 1 classes.
_MMDET_RCNN_MARK = "roi_head.bbox_head.fc_cls."
_MMDET_RCNN_FCS = 2  # Shared2FCBBoxHead, torchvision's TwoMLPHead (fc6, fc7)
_MMDET_RCNN_MASK_CONVS = 4  # FCNMaskHead's num_convs, torchvision's MaskRCNNHeads
_MMDET_RPN_ANCHORS = 3  # scales=[8] x ratios 0.5, 1, 2: one sigmoid (rpn_cls) and 4 deltas (rpn_reg) each
_MMDET_RCNN_RULES = (
    (re.compile(r"^neck\.lateral_convs\.(\d+)\.conv\."), r"detector.backbone.fpn.inner_blocks.\1.0."),
    (re.compile(r"^neck\.fpn_convs\.(\d+)\.conv\."), r"detector.backbone.fpn.layer_blocks.\1.0."),
    (re.compile(r"^rpn_head\.rpn_conv\."), "detector.rpn.head.conv.0.0."),
    (re.compile(r"^rpn_head\.rpn_cls\."), "detector.rpn.head.cls_logits."),
    (re.compile(r"^rpn_head\.rpn_reg\."), "detector.rpn.head.bbox_pred."),
    (re.compile(r"^roi_head\.bbox_head\.shared_fcs\.0\."), "detector.roi_heads.box_head.fc6."),
    (re.compile(r"^roi_head\.bbox_head\.shared_fcs\.1\."), "detector.roi_heads.box_head.fc7."),
    (re.compile(r"^roi_head\.bbox_head\.fc_cls\."), "detector.roi_heads.box_predictor.cls_score."),
    (re.compile(r"^roi_head\.bbox_head\.fc_reg\."), "detector.roi_heads.box_predictor.bbox_pred."),
    (re.compile(r"^roi_head\.mask_head\.convs\.(\d+)\.conv\."), r"detector.roi_heads.mask_head.\1.0."),
    (re.compile(r"^roi_head\.mask_head\.upsample\."), "detector.roi_heads.mask_predictor.conv5_mask."),
    (re.compile(r"^roi_head\.mask_head\.conv_logits\."), "detector.roi_heads.mask_predictor.mask_fcn_logits."),
)
# ---------------------------------------------------------------------------------------------- layouts
# Names inside a block: timm / original spelling -> transformers spelling. "attn.kv" is one fused matrix,
# split into key and value (its first half is the keys, as the reference code's reshape to (2, heads, dim) reads it).
_BLOCK_NAMES = {
    "norm1": "layer_norm_1",
    "norm2": "layer_norm_2",
    "attn.q": "attention.query",
    "attn.proj": "attention.proj",
    "attn.sr": "attention.spatial_reduction",
    "attn.norm": "attention.layer_norm",
    "mlp.fc1": "mlp.dense1",
    "mlp.fc2": "mlp.dense2",
}
_DWCONV = {"timm": "mlp.dwconv", "original": "mlp.dwconv.dwconv"}
_PATCH_NAMES = {"proj": "proj", "norm": "layer_norm"}

# Each layout: regexes giving (scope, stage, block, local name, parameter) for its keys.
_PARSERS: dict[str, list[tuple[re.Pattern[str], str]]] = {
    "transformers": [
        (re.compile(r"^encoder\.layers\.(?P<i>\d+)\.patch_embedding\.(?P<local>proj|layer_norm)\.(?P<p>\w+)$"), "patch"),
        (re.compile(r"^encoder\.layers\.(?P<i>\d+)\.blocks\.(?P<j>\d+)\.(?P<local>.+)\.(?P<p>\w+)$"), "block"),
        (re.compile(r"^encoder\.layers\.(?P<i>\d+)\.layer_norm\.(?P<p>\w+)$"), "norm"),
        (re.compile(r"^classifier\.(?P<p>\w+)$"), "head"),
    ],
    "timm": [
        (re.compile(r"^patch_embed\.(?P<local>proj|norm)\.(?P<p>\w+)$"), "patch0"),
        (re.compile(r"^stages[._](?P<i>\d+)\.downsample\.(?P<local>proj|norm)\.(?P<p>\w+)$"), "patch"),
        (re.compile(r"^stages[._](?P<i>\d+)\.blocks\.(?P<j>\d+)\.(?P<local>.+)\.(?P<p>\w+)$"), "block"),
        (re.compile(r"^stages[._](?P<i>\d+)\.norm\.(?P<p>\w+)$"), "norm"),
        (re.compile(r"^head\.(?P<p>\w+)$"), "head"),
    ],
    "original": [
        (re.compile(r"^patch_embed(?P<n>\d+)\.(?P<local>proj|norm)\.(?P<p>\w+)$"), "patch"),
        (re.compile(r"^block(?P<n>\d+)\.(?P<j>\d+)\.(?P<local>.+)\.(?P<p>\w+)$"), "block"),
        (re.compile(r"^norm(?P<n>\d+)\.(?P<p>\w+)$"), "norm"),
        (re.compile(r"^head\.(?P<p>\w+)$"), "head"),
    ],
}

# Prefixes transformers puts before the encoder keys, by model class.
_TASK_PREFIXES = ("pvt_v2.",)
# Top-level names of the heads a checkpoint may carry: classification, SegFormer's decode head, GLPN's decoder + head,
# and the torchvision detector (FPN and heads) of pvtv2.models.detection.
HEAD_PREFIXES = ("classifier.", "decode_head.", "decoder.", "head.", "detector.")

# SegFormer / GLPN -> canonical, applied in order to each key (first transformers 5's in-memory names back to the
# published ones, then the published ones to ours). The encoders have the same structure as PVTv2's; their
# LayerNorm epsilons and MLP ratios differ and travel in the config (see ``dense_config_from_dict``).
_MIT_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r) for p, r in [
        (r"^(segformer|glpn)\.", ""),
        (r"^stages\.(\d+)\.patch_embeddings\.", r"encoder.patch_embeddings.\1."),
        (r"^stages\.(\d+)\.blocks\.", r"encoder.block.\1."),
        (r"^stages\.(\d+)\.layer_norm\.", r"encoder.layer_norm.\1."),
        (r"\.layernorm_before\.", ".layer_norm_1."),
        (r"\.layernorm_after\.", ".layer_norm_2."),
        (r"\.attention\.q_proj\.", ".attention.self.query."),
        (r"\.attention\.k_proj\.", ".attention.self.key."),
        (r"\.attention\.v_proj\.", ".attention.self.value."),
        (r"\.attention\.o_proj\.", ".attention.output.dense."),
        (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attention.self.sr."),
        (r"\.attention\.sequence_reduction\.layer_norm\.", ".attention.self.layer_norm."),
        (r"\.mlp\.fc1\.", ".mlp.dense1."),
        (r"\.mlp\.fc2\.", ".mlp.dense2."),
        (r"^decode_head\.linear_projections\.", "decode_head.linear_c."),
        # published names -> canonical
        (r"^encoder\.patch_embeddings\.(\d+)\.", r"encoder.layers.\1.patch_embedding."),
        (r"^encoder\.block\.(\d+)\.(\d+)\.", r"encoder.layers.\1.blocks.\2."),
        (r"^encoder\.layer_norm\.(\d+)\.", r"encoder.layers.\1.layer_norm."),
        (r"\.attention\.self\.sr\.", ".attention.spatial_reduction."),
        (r"\.attention\.self\.", ".attention."),
        (r"\.attention\.output\.dense\.", ".attention.proj."),
    ]
]


def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    """``transformers``, ``timm``, ``original``, ``mmdet`` (an mmdetection / mmsegmentation file: ``backbone.`` + the
    original layout), ``glpn`` or ``segformer``, from the key names; :class:`CheckpointError` otherwise."""
    keys = list(state)
    if any(k.startswith(("encoder.layers.", "pvt_v2.encoder.layers.")) for k in keys):
        return "transformers"
    # "stages_{i}": the same keys in a timm features_only model (its FeatureListNet flattens the stages' Sequential)
    if any(k.startswith(("stages.", "stages_")) for k in keys) and "patch_embed.proj.weight" in state:
        return "timm"
    # blocks of any stage, or the first stage's closing norm: a first stage of no blocks has no "block1." keys
    if "patch_embed1.proj.weight" in state and any(re.match(r"(block\d+\.|norm1\.)", k) for k in keys):
        return "original"
    if "backbone.patch_embed1.proj.weight" in state and any(re.match(r"backbone\.(block\d+\.|norm1\.)", k) for k in keys):
        return MMDET_LAYOUT
    if any(k.startswith("glpn.") for k in keys) or (
        any(k.startswith("decoder.stages.") for k in keys) and any(k.startswith("head.head.") for k in keys)
    ):
        return "glpn"
    if any(re.match(r"^(segformer\.)?(encoder\.(block|patch_embeddings)\.|stages\.\d+\.blocks\.)", k) for k in keys):
        return "segformer"
    sample = ", ".join(keys[:8])
    raise CheckpointError(
        f"not a PVTv2 checkpoint in a known layout ({', '.join(LAYOUTS + DENSE_LAYOUTS + (MMDET_LAYOUT,))}); its first "
        f"keys are: {sample}."
    )


def _parse(key: str, layout: str) -> tuple[str, int, int, str, str] | None:
    for pattern, scope in _PARSERS[layout]:
        m = pattern.match(key)
        if m:
            g = m.groupdict()
            stage = int(g["n"]) - 1 if g.get("n") else int(g.get("i") or 0)
            return scope.rstrip("0"), stage, int(g.get("j") or 0), g.get("local") or "", g["p"]
    return None


def to_canonical(state: Mapping[str, torch.Tensor], layout: str | None = None) -> dict[str, torch.Tensor]:
    """Keys of any layout renamed to transformers' (without the ``pvt_v2.`` prefix); fused ``kv`` split.

    Keys that no rule knows are kept unchanged, so that the strict load names them.
    """
    layout = layout or detect_layout(state)
    if layout in DENSE_LAYOUTS:
        return _mit_to_canonical(state)
    if layout == MMDET_LAYOUT:
        return to_canonical(mmdet_backbone(state), "original")
    out = _OneSourceEach()
    if layout == "transformers":
        for key, value in state.items():
            name = key
            for prefix in _TASK_PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix) :]
            out.put(name, value, key)
        return dict(out)
    block_names = dict(_BLOCK_NAMES, **{_DWCONV[layout]: "mlp.dwconv.dwconv"})
    for key, value in state.items():
        parsed = _parse(key, layout)
        if parsed is None:
            out.put(key, value, key)
            continue
        scope, i, j, local, param = parsed
        if scope == "patch":
            out.put(f"encoder.layers.{i}.patch_embedding.{_PATCH_NAMES[local]}.{param}", value, key)
        elif scope == "norm":
            out.put(f"encoder.layers.{i}.layer_norm.{param}", value, key)
        elif scope == "head":
            out.put(f"classifier.{param}", value, key)
        elif local == "attn.kv":
            # the key's and the value's rows one above the other: a scalar (it stopped with an IndexError) or an odd
            # count is no such pair
            if value.ndim == 0 or value.shape[0] % 2:
                raise CheckpointError(f"{key} has the shape {tuple(value.shape)}, which is not the key's and the "
                                      f"value's {param} stacked (an even number of rows)")
            half = value.shape[0] // 2
            out.put(f"encoder.layers.{i}.blocks.{j}.attention.key.{param}", value[:half].clone(), key)
            out.put(f"encoder.layers.{i}.blocks.{j}.attention.value.{param}", value[half:].clone(), key)
        elif local in block_names:
            out.put(f"encoder.layers.{i}.blocks.{j}.{block_names[local]}.{param}", value, key)
        else:
            out.put(key, value, key)
    return dict(out)


class _OneSourceEach(dict):
    """The canonical tensors, each from one key of the file: two keys that name the same weight (``stages.0.`` and
    ``stages_0.`` of timm, ``pvt_v2.encoder.`` and ``encoder.`` of transformers) with different numbers are refused
    rather than one silently kept, since the file does not say which of them the model is."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: dict[str, str] = {}

    def put(self, name: str, value: torch.Tensor, key: str) -> None:
        if name in self.sources:
            kept = self[name]
            if kept.dtype == value.dtype and kept.shape == value.shape and torch.equal(kept, value):
                return  # the same numbers twice: nothing to choose
            raise CheckpointError(
                f"the keys {self.sources[name]!r} and {key!r} are both the weight {name!r}: the checkpoint holds it "
                f"twice (two layouts or two models in one file); keep one of them"
            )
        self.sources[name] = key
        self[name] = value


def mmdet_backbone(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone of an mmdetection / mmsegmentation state dict, ``backbone.`` removed; its neck and heads left
    out, except a Semantic FPN (neck and ``FPNHead``), renamed into ``decode_head.``, and a RetinaNet or Faster /
    Mask R-CNN, renamed into ``detector.`` (see the module docstring).

    Keys outside the backbone that are not one of mmdetection's / mmsegmentation's modules are kept, so that the
    strict load names them.
    """
    semantic_fpn = any(key.startswith(_MMSEG_FPN_MARK) for key in state)
    retinanet = any(key.startswith(_MMDET_RETINA_MARKS) for key in state)
    rcnn = any(key.startswith(_MMDET_RCNN_MARK) for key in state)
    out: dict[str, torch.Tensor] = _mmdet_retinanet(state) if retinanet else _mmdet_rcnn(state) if rcnn else {}
    for key, value in state.items():
        if key.startswith(_MMDET_BACKBONE):
            out[key[len(_MMDET_BACKBONE) :]] = value
            continue
        if semantic_fpn:
            renamed = key
            for pattern, replacement in _MMSEG_FPN_RULES:
                renamed = pattern.sub(replacement, renamed)
            if renamed.startswith("decode_head."):  # the scale heads keep their names
                out[renamed] = value
                continue
        if not key.startswith(_MMDET_OTHERS):
            out[key] = value
    return out


def _mmdet_retinanet(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmdetection's RetinaNet neck and head renamed into pvtv2's detector (``detector.``); :class:`CheckpointError`
    naming the keys where they are not the whole of one (a part missing, a layer more than torchvision's RetinaNet
    has, a normalisation layer): read in part, the rest would be initialised at random without a word."""
    laterals = sorted({int(m.group(1)) for k in state if (m := re.match(r"neck\.lateral_convs\.(\d+)\.", k))})
    n = len(laterals)
    expected = [f"neck.lateral_convs.{i}.conv" for i in range(n)]
    expected += [f"neck.fpn_convs.{i}.conv" for i in range(n + 2)]  # the stage levels, then P6 and P7
    for branch in ("cls_convs", "reg_convs"):
        expected += [f"bbox_head.{branch}.{i}.conv" for i in range(_MMDET_RETINA_STACKED)]
    expected += ["bbox_head.retina_cls", "bbox_head.retina_reg"]
    wanted = {f"{name}.{p}" for name in expected for p in ("weight", "bias")}
    present = {k for k in state if k.startswith(("neck.", "bbox_head."))}
    missing, unexpected = sorted(wanted - present), sorted(present - wanted)
    if not n or missing or unexpected:
        parts = [("this mmdetection RetinaNet checkpoint is not one that pvtv2's RetinaNet can read whole (mmdetection's "
                  f"FPN with P6 and P7, RetinaHead with {_MMDET_RETINA_STACKED} convolutions per branch, no normalisation)")]
        if not n:
            parts.append("it has no neck.lateral_convs (the FPN)")
        for title, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                shown = "\n    ".join(keys[:20]) + (f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else "")
                parts.append(f"{len(keys)} {title} keys:\n    {shown}")
        raise CheckpointError("\n  ".join(parts))
    extra = {n: "extra_blocks.p6.", n + 1: "extra_blocks.p7."}
    out: dict[str, torch.Tensor] = {}
    for key in sorted(present):
        m = _MMDET_FPN_CONV.match(key)
        if m:
            level = int(m.group(1))
            out[f"detector.backbone.fpn.{extra.get(level, f'layer_blocks.{level}.0.')}{m.group(2)}"] = state[key]
            continue
        renamed = key
        for pattern, replacement in _MMDET_RETINA_RULES:
            renamed = pattern.sub(replacement, renamed)
        out[renamed] = state[key]
    return out


def _refuse(what: str, missing: list[str], unexpected: list[str], problems: list[str]) -> None:
    parts = [f"this mmdetection {what} checkpoint is not one that pvtv2's {what} can read whole", *problems]
    for title, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            shown = "\n    ".join(keys[:20]) + (f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else "")
            parts.append(f"{len(keys)} {title} keys:\n    {shown}")
    raise CheckpointError("\n  ".join(parts))


def _rows(state: Mapping[str, torch.Tensor], key: str) -> int:
    value = state[key]
    return int(value.shape[0]) if value.ndim else -1


def _mmdet_rcnn(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmdetection's Faster / Mask R-CNN neck and heads renamed into pvtv2's detector (``detector.``), the class
    layers reordered (background first; zero box deltas and mask logits for it, which torchvision never reads at
    inference); :class:`CheckpointError` naming the keys where they are not the whole of one (a part missing, a layer
    more than torchvision's heads have, a normalisation layer, extra FPN convolutions, class-agnostic regression, a
    softmax RPN): read in part, the rest would be initialised at random without a word."""
    laterals = sorted({int(m.group(1)) for k in state if (m := re.match(r"neck\.lateral_convs\.(\d+)\.", k))})
    n = len(laterals)
    expected = [f"neck.lateral_convs.{i}.conv" for i in range(n)]
    expected += [f"neck.fpn_convs.{i}.conv" for i in range(n)]  # P6 is max-pooled: no convolution
    expected += ["rpn_head.rpn_conv", "rpn_head.rpn_cls", "rpn_head.rpn_reg"]
    expected += [f"roi_head.bbox_head.shared_fcs.{i}" for i in range(_MMDET_RCNN_FCS)]
    expected += ["roi_head.bbox_head.fc_cls", "roi_head.bbox_head.fc_reg"]
    mask = any(k.startswith("roi_head.mask_head.") for k in state)
    if mask:
        expected += [f"roi_head.mask_head.convs.{i}.conv" for i in range(_MMDET_RCNN_MASK_CONVS)]
        expected += ["roi_head.mask_head.upsample", "roi_head.mask_head.conv_logits"]
    wanted = {f"{name}.{p}" for name in expected for p in ("weight", "bias")}
    present = {k for k in state if k.startswith(("neck.", "rpn_head.", "roi_head."))}
    missing, unexpected = sorted(wanted - present), sorted(present - wanted)
    what = "Mask R-CNN" if mask else "Faster R-CNN"
    if not n or missing or unexpected:
        mask_head = ", FCNMaskHead with 4 convolutions" if mask else ""
        problems = [(f"(mmdetection's FPN with P6 max-pooled, RPNHead, Shared2FCBBoxHead{mask_head}; no "
                     f"normalisation, no extra convolutions)")]
        if not n:
            problems.append("it has no neck.lateral_convs (the FPN)")
        _refuse(what, missing, unexpected, problems)
    classes = _rows(state, "roi_head.bbox_head.fc_cls.weight") - 1  # K object classes and the background
    shapes = [("roi_head.bbox_head.fc_cls", classes + 1, "K + 1 (classes and background)"),
              ("roi_head.bbox_head.fc_reg", 4 * classes,
               (f"4 x {classes} (class-specific deltas; class-agnostic regression, reg_class_agnostic=True, is "
                f"not torchvision's)")),
              ("rpn_head.rpn_cls", _MMDET_RPN_ANCHORS,
               f"{_MMDET_RPN_ANCHORS} (one sigmoid per anchor: a softmax RPN, use_sigmoid=False, is not torchvision's)"),
              ("rpn_head.rpn_reg", 4 * _MMDET_RPN_ANCHORS, f"4 x {_MMDET_RPN_ANCHORS} anchors")]
    if mask:
        shapes.append(("roi_head.mask_head.conv_logits", classes,
                       f"{classes} (one mask per class; a class-agnostic mask head is not torchvision's)"))
    if classes < 1:
        raise CheckpointError(f"roi_head.bbox_head.fc_cls.weight has the shape "
                              f"{tuple(state['roi_head.bbox_head.fc_cls.weight'].shape)}: fewer than 2 rows (at least "
                              f"one class and the background)")
    for name, rows, meaning in shapes:
        for p in ("weight", "bias"):
            if _rows(state, f"{name}.{p}") != rows:
                raise CheckpointError(f"{name}.{p} has the shape {tuple(state[f'{name}.{p}'].shape)}, not {meaning} "
                                      f"rows")
    out: dict[str, torch.Tensor] = {}
    for key in sorted(present):
        value = state[key]
        if key.startswith("roi_head.bbox_head.fc_cls."):  # background: mmdetection's last row, torchvision's first
            value = torch.cat([value[classes:], value[:classes]])
        elif key.startswith("roi_head.bbox_head.fc_reg."):  # no deltas for the background: zeros in front
            value = torch.cat([value.new_zeros((4, *value.shape[1:])), value])
        elif key.startswith("roi_head.mask_head.conv_logits."):  # no mask for the background: zeros at index 0
            value = torch.cat([value.new_zeros((1, *value.shape[1:])), value])
        renamed = key
        for pattern, replacement in _MMDET_RCNN_RULES:
            renamed = pattern.sub(replacement, renamed)
        out[renamed] = value
    return out


def _mit_to_canonical(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SegFormer / GLPN keys renamed by ``_MIT_RULES``; a fused ``key_value`` (as some conversions write it) split."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for pattern, replacement in _MIT_RULES:
            key = pattern.sub(replacement, key)
        if ".attention.key_value." in key:
            half = value.shape[0] // 2
            out[key.replace(".key_value.", ".key.")] = value[:half].clone()
            out[key.replace(".key_value.", ".value.")] = value[half:].clone()
        else:
            out[key] = value
    return out


def from_canonical(state: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """The canonical keys written in ``layout`` (``transformers`` adds the classification prefix when a head is present)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    if layout == "transformers":
        has_head = any(k.startswith("classifier.") for k in state)
        return {(f"pvt_v2.{k}" if has_head and k.startswith("encoder.") else k): v for k, v in state.items()}
    inverse = {v: k for k, v in _BLOCK_NAMES.items()}
    inverse["mlp.dwconv.dwconv"] = _DWCONV[layout]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parsed = _parse(key, "transformers")
        if parsed is None:
            raise ValueError(f"key {key!r} has no equivalent in the {layout} layout")
        scope, i, j, local, param = parsed
        if scope == "patch":
            name = "norm" if local == "layer_norm" else "proj"
            prefix = f"patch_embed{i + 1}" if layout == "original" else ("patch_embed" if i == 0 else f"stages.{i}.downsample")
            out[f"{prefix}.{name}.{param}"] = value
        elif scope == "norm":
            out[f"norm{i + 1}.{param}" if layout == "original" else f"stages.{i}.norm.{param}"] = value
        elif scope == "head":
            out[f"head.{param}"] = value
        else:
            prefix = f"block{i + 1}.{j}" if layout == "original" else f"stages.{i}.blocks.{j}"
            if local == "attention.key":
                value = torch.cat([value, state[key.replace("attention.key.", "attention.value.")]], dim=0)
                out[f"{prefix}.attn.kv.{param}"] = value
            elif local == "attention.value":
                continue
            elif local in inverse:
                out[f"{prefix}.{inverse[local]}.{param}"] = value
            else:
                raise ValueError(f"key {key!r} has no equivalent in the {layout} layout")
    return out


def convert_state_dict(state: Mapping[str, torch.Tensor], to: str, source: str | None = None) -> dict[str, torch.Tensor]:
    """Convert a PVTv2 state dict from its layout (detected unless ``source`` is given) to layout ``to``."""
    return from_canonical(to_canonical(state, source), to)
