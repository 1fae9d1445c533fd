"""Architecture summaries and compute cost: parameters, per-stage shapes, multiply-adds.

The cost is counted in multiply-accumulates (MACs), the unit the PVTv2 paper (and most vision papers) call "GFLOPs":
one ``a * b + c`` counts once. ``torch.utils.flop_counter`` counts FLOPs, two per multiply-add, so its figure is
twice ours. Counted, with forward hooks during one forward pass at the chosen size:

- ``Conv2d``: output elements x (input channels / groups) x kernel area (the patch embeddings, the spatial
  reductions, the depthwise convolutions of the Mix-FFN);
- ``Linear``: output elements x input features (query, key, value, projection, Mix-FFN, classifier), counted on the
  public-op path (the packed inference path is switched off while counting);
- attention: ``Q K^T`` and ``A V``, each ``B x N x N' x C`` for ``N`` queries and ``N'`` keys.

Normalisation, activations, softmax, pooling and additions are not counted, as in the paper's figures.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .models.config import PvtV2Config, preset_key
from .fast import fast_path
from .models.layers import PvtV2Stage, SpatialReductionAttention

__all__ = ["PAPER_GMACS", "count_macs", "model_summary", "format_summary"]

# Paper Table 1 / the authors' README, at 224x224: billions of multiply-adds (written "GFLOPs" there).
PAPER_GMACS: dict[str, float] = {
    "pvt_v2_b0": 0.6,
    "pvt_v2_b1": 2.1,
    "pvt_v2_b2_li": 3.9,
    "pvt_v2_b2": 4.0,
    "pvt_v2_b3": 6.9,
    "pvt_v2_b4": 10.1,
    "pvt_v2_b5": 11.8,
}


def _kv_tokens(module: SpatialReductionAttention, tokens: int, height: int, width: int) -> int:
    """How many keys a query sees: the reduced grid of the spatial reduction, the pooled grid, or every token."""
    if not module.reduces:
        return tokens
    if not isinstance(module.pool, nn.Identity):
        size = module.pool.output_size
        oh, ow = (size, size) if isinstance(size, int) else size
        return int(oh) * int(ow)
    conv = module.spatial_reduction
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    return ((height - kh) // sh + 1) * ((width - kw) // sw + 1)


def _input_size(image_size: Any) -> tuple[int, int]:
    """``image_size`` (N or (H, W), positive whole numbers) as (height, width); anything else a ValueError naming it
    (a negative side raised torch's "Dimension size must be non-negative", (H, W, C) a bare unpacking error)."""
    try:
        sides = [image_size] if hasattr(image_size, "__index__") else list(image_size)
        if len(sides) not in (1, 2) or any(isinstance(s, bool) for s in sides):
            raise TypeError
        sides = [operator.index(s) for s in sides]  # NumPy's integers too; not 64.5
    except TypeError:
        sides = [0]
    if min(sides) < 1:
        raise ValueError(f"image_size must be N or (height, width), positive whole numbers, got {image_size!r}")
    return sides[0], sides[-1]


@torch.no_grad()
def count_macs(model: nn.Module, image_size: int | Sequence[int] = 224, batch_size: int = 1) -> dict[str, Any]:
    """Multiply-adds of one forward pass on a ``(batch_size, C, H, W)`` input, in total and per stage, and each stage's
    output shape (from a real forward pass, so the numbers follow the model as built, not the config)."""
    height, width = _input_size(image_size)
    if isinstance(batch_size, bool) or not hasattr(batch_size, "__index__") or batch_size < 1:
        raise ValueError(f"batch_size must be a positive whole number, got {batch_size!r}")
    batch_size = operator.index(batch_size)
    channels = getattr(getattr(model, "config", None), "num_channels", 3)
    stages = [m for m in model.modules() if isinstance(m, PvtV2Stage)]
    stage_of: dict[nn.Module, int] = {}
    for i, stage in enumerate(stages):
        for m in stage.modules():
            stage_of[m] = i
    per_stage = [0] * len(stages)
    by_kind = {"conv": 0, "linear": 0, "attention": 0}
    other = [0]
    shapes: list[tuple[int, ...]] = [()] * len(stages)

    def add(module: nn.Module, kind: str, macs: int) -> None:
        by_kind[kind] += macs
        if module in stage_of:
            per_stage[stage_of[module]] += macs
        else:
            other[0] += macs

    def conv_hook(module: nn.Conv2d, inputs: tuple, output: torch.Tensor) -> None:
        kh, kw = module.kernel_size
        add(module, "conv", output.numel() * (module.in_channels // module.groups) * kh * kw)

    def linear_hook(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
        add(module, "linear", output.numel() * module.in_features)

    def attention_hook(module: SpatialReductionAttention, inputs: tuple, output: Any) -> None:
        x, height, width = inputs[0], inputs[1], inputs[2]
        batch, tokens, dim = x.shape
        keys = _kv_tokens(module, tokens, int(height), int(width))
        add(module, "attention", 2 * batch * tokens * keys * dim)  # Q K^T and A V
        # Keys and values are counted by their Linear hooks: a key or value layer with a hook is called, not fused.

    def stage_hook(module: PvtV2Stage, inputs: tuple, output: Any) -> None:
        shapes[stages.index(module)] = tuple(output[0].shape)

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, SpatialReductionAttention):
            handles.append(m.register_forward_hook(attention_hook))
        elif isinstance(m, PvtV2Stage):
            handles.append(m.register_forward_hook(stage_hook))
    was_training = model.training
    model.eval()
    # The reference path calls the Conv2d and Linear modules that the hooks watch; the fast path does not.
    try:
        param = next(model.parameters())
        x = torch.zeros(batch_size, channels, height, width, device=param.device, dtype=param.dtype)
        with fast_path(False):
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    total = sum(by_kind.values())
    return {
        "macs": total,
        "per_stage_macs": per_stage,
        "head_macs": other[0],
        "by_kind": by_kind,
        "stage_output_shapes": shapes,
        "input_shape": [batch_size, channels, height, width],
    }


def model_summary(model: nn.Module, image_size: int | Sequence[int] = 224, name: str | None = None) -> dict[str, Any]:
    """Everything ``pvtv2 info`` shows: per-stage architecture and output size, parameters, multiply-adds."""
    config: PvtV2Config = model.config
    counted = count_macs(model, image_size)
    height, width = counted["input_shape"][2:]
    stages = []
    for i in range(config.num_encoder_blocks):
        shape = counted["stage_output_shapes"][i]
        stage_params = sum(p.numel() for p in _stage_module(model, i).parameters())
        stages.append(
            {
                "stage": i + 1,
                "channels": config.hidden_sizes[i],
                "depth": config.depths[i],
                "heads": config.num_attention_heads[i],
                "attention": "linear (pool 7x7)" if config.linear_attention else (
                    f"sr {config.sr_ratios[i]}" if config.sr_ratios[i] > 1 else "full"),
                "mlp_ratio": config.mlp_ratios[i],
                "patch_size": config.patch_sizes[i],
                "stride": config.stage_strides[i],
                "output": [int(shape[2]), int(shape[3])] if shape else None,
                "parameters": stage_params,
                "gmacs": counted["per_stage_macs"][i] / 1e9,
            }
        )
    key = preset_key(name or "")
    summary = {
        "model": name,
        "class": type(model).__name__,
        "image_size": [height, width],
        "parameters": sum(p.numel() for p in model.parameters()),
        "num_labels": config.num_labels if hasattr(model, "classifier") or hasattr(model, "decode_head") else None,
        "linear_attention": config.linear_attention,
        "gmacs": counted["macs"] / 1e9,
        "gflops": 2 * counted["macs"] / 1e9,
        "gmacs_by_kind": {k: v / 1e9 for k, v in counted["by_kind"].items()},
        "unit_note": "gmacs counts multiply-adds (what the PVTv2 paper reports as GFLOPs); gflops = 2 x gmacs",
        "stages": stages,
    }
    if key in PAPER_GMACS and (height, width) == (224, 224) and _is_paper_model(model, key):
        summary["paper_gmacs"] = PAPER_GMACS[key]
    return summary


# What decides the paper's compute figure: a model that differs in one of these is not the variant of the paper.
_PAPER_FIELDS = ("num_channels", "num_encoder_blocks", "depths", "sr_ratios", "hidden_sizes", "patch_sizes", "strides",
                 "num_attention_heads", "mlp_ratios", "linear_attention")


def _is_paper_model(model: nn.Module, key: str) -> bool:
    """Whether ``model`` is the classifier of preset ``key`` (the paper's figure is the classifier's): a folder that
    is merely named after a preset (a tiny model, a segmentation model with its decode head) was set beside the
    paper's figure as if it were that variant ("paper 0.6 GMACs, +785% from the count above")."""
    if type(model).__name__ != "PvtV2ForImageClassification":
        return False
    preset = PvtV2Config.from_preset(key)
    return all(getattr(model.config, f) == getattr(preset, f) for f in _PAPER_FIELDS)


def _stage_module(model: nn.Module, index: int) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, PvtV2Stage)][index]


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of :func:`model_summary`."""
    h, w = summary["image_size"]
    classes = summary["num_labels"]
    if classes == 1:  # a one-class segmentation model tells its class from the rest
        classes = "1 class (binary)"
    elif classes is not None:
        classes = f"{classes} classes"
    lines = [
        f"{summary['model'] or summary['class']}: {summary['class']}, "
        f"{'linear' if summary['linear_attention'] else 'spatial-reduction'} attention"
        + (f", {summary['decode_head']} decode head" if summary.get("decode_head") else "")
        + (f", {summary['detector']} detector ({summary['detection_convention']}'s arithmetic)"
           if summary.get("detector") else "")
        + (f", {classes}" if classes is not None else ""),
        "",
        f"{'stage':>5} {'channels':>8} {'depth':>5} {'heads':>5} {'attention':>17} {'mlp':>4} {'patch':>5} "
        f"{'stride':>6} {'output':>9} {'params':>8} {'GMACs':>7}",
    ]
    for s in summary["stages"]:
        out = f"{s['output'][0]}x{s['output'][1]}" if s["output"] else "-"
        mlp = f"{s['mlp_ratio']:g}"
        lines.append(
            f"{s['stage']:>5} {s['channels']:>8} {s['depth']:>5} {s['heads']:>5} {s['attention']:>17} {mlp:>4} "
            f"{s['patch_size']:>5} {s['stride']:>6} {out:>9} {_params(s['parameters']):>8} {s['gmacs']:>7.3f}"
        )
    lines += [
        "",
        f"parameters: {summary['parameters']:,} ({_params(summary['parameters'])})",
        f"compute at {h}x{w}: {summary['gmacs']:.3f} GMACs (multiply-adds, the unit the PVTv2 paper calls GFLOPs) "
        f"= {summary['gflops']:.3f} GFLOPs counting a multiply and an add separately",
    ]
    if "paper_gmacs" in summary:
        # The paper's figure relative to the count, as the line reads: "paper 4.0 (-0.7% from the count above)".
        diff = 100 * (summary["paper_gmacs"] - summary["gmacs"]) / summary["gmacs"]
        lines.append(f"paper (Table 1): {summary['paper_gmacs']} GMACs at 224x224 ({diff:+.1f}% from the count above)")
    return "\n".join(lines)

