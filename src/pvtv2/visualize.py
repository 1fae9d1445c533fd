"""Attention maps: where each stage's queries look, drawn over the image with Pillow.

For each stage, the last block's attention probabilities ``(B, heads, N, N')`` are averaged over heads and over all
queries: the result says how much attention each *key* position receives. Keys live on the reduced grid, ``H/sr x
W/sr`` for spatial-reduction attention (the full ``H x W`` when ``sr = 1``) and 7 x 7 for linear attention, so the
map is upsampled to the image and laid over it as a heat map. Works with any weights, random ones included (the
maps are then just less meaningful).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch
from torch import nn

from .processing import PvtV2ImageProcessor, load_image

__all__ = ["attention_maps", "attention_figure", "heatmap_colors"]

# A perceptually ordered dark-to-bright ramp (close to matplotlib's "inferno").
_RAMP = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39], [252, 255, 164]],
    dtype=np.float64,
)


def heatmap_colors(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB along the ramp, shape ``values.shape + (3,)``."""
    x = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.floor(x).astype(int).clip(0, len(_RAMP) - 2)
    frac = (x - low)[..., None]
    return (_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).round().astype(np.uint8)


def _key_grid(attention: nn.Module, height: int, width: int, keys: int) -> tuple[int, int]:
    """The (rows, cols) of the key grid of a stage whose tokens form a ``height x width`` grid."""
    pool = getattr(attention, "pool", None)
    if pool is not None and isinstance(pool, nn.AdaptiveAvgPool2d):
        size = pool.output_size
        return (size, size) if isinstance(size, int) else tuple(size)
    if keys == height * width:
        return height, width
    conv = attention.spatial_reduction
    return (height - conv.kernel_size[0]) // conv.stride[0] + 1, (width - conv.kernel_size[1]) // conv.stride[1] + 1


@torch.no_grad()
def attention_maps(model: nn.Module, pixel_values: torch.Tensor) -> list[dict[str, Any]]:
    """Per stage: the attention each key position receives in the last block, averaged over heads and queries
    (a ``(rows, cols)`` array summing to 1), with the stage's token grid and key grid."""
    from .layers import PvtV2Stage

    was_training = model.training
    model.eval()
    try:
        out = model(pixel_values[:1], output_attentions=True, output_hidden_states=True, return_dict=True)
    finally:
        model.train(was_training)
    stages = [m for m in model.modules() if isinstance(m, PvtV2Stage)]
    maps = []
    for i, (stage_attn, hidden) in enumerate(zip(out.attentions, out.hidden_states)):
        if not stage_attn:
            continue
        probs = stage_attn[-1][0]  # (heads, N, N')
        height, width = hidden.shape[-2:]
        received = probs.float().mean(dim=(0, 1))  # (N',)
        rows, cols = _key_grid(stages[i].blocks[-1].attention, height, width, received.numel())
        maps.append(
            {
                "stage": i + 1,
                "tokens": (int(height), int(width)),
                "keys": (int(rows), int(cols)),
                "map": received.reshape(rows, cols).cpu().numpy(),
            }
        )
    return maps


def _font(size: int) -> PIL.ImageFont.ImageFont:
    try:
        return PIL.ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return PIL.ImageFont.load_default()


def attention_figure(
    model: nn.Module,
    image: PIL.Image.Image | str | os.PathLike,
    processor: PvtV2ImageProcessor | None = None,
    panel_size: int = 224,
    alpha: float = 0.6,
) -> PIL.Image.Image:
    """The image beside one heat-map panel per stage (see the module docstring), each labelled with its stage, token
    grid and key grid. Returns an RGB image of ``(1 + stages) * panel_size`` x ``panel_size + caption`` pixels, the
    caption being two lines of ``max(18, panel_size // 10)`` pixels."""
    if not isinstance(image, PIL.Image.Image):
        image = load_image(image)
    image = image.convert("RGB")
    config = getattr(model, "config", None)
    if processor is None:
        height, width = getattr(config, "image_size", (224, 224))
        processor = PvtV2ImageProcessor(size={"height": height, "width": width})
    param = next(model.parameters())
    pixel_values = processor(image, return_tensors="pt")["pixel_values"].to(param.device, param.dtype)
    maps = attention_maps(model, pixel_values)

    base = image.resize((panel_size, panel_size), PIL.Image.Resampling.BILINEAR)
    base_arr = np.asarray(base, dtype=np.float64)
    line = max(18, panel_size // 10)
    caption = 2 * line  # two lines: the stage, then its grids (one line overflows narrow panels)
    font = _font(max(10, line - 6))
    figure = PIL.Image.new("RGB", ((1 + len(maps)) * panel_size, panel_size + caption), "white")
    draw = PIL.ImageDraw.Draw(figure)
    figure.paste(base, (0, caption))
    draw.text((4, 2), f"input {image.width}x{image.height}", fill="black", font=font)
    for n, entry in enumerate(maps, start=1):
        heat = entry["map"]
        lo, hi = float(heat.min()), float(heat.max())
        norm = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
        # Upsample the key grid to the panel (bilinear, on a float image), then colour it.
        up = PIL.Image.fromarray(norm.astype(np.float32)).resize((panel_size, panel_size), PIL.Image.Resampling.BILINEAR)
        colors = heatmap_colors(np.asarray(up, dtype=np.float64)).astype(np.float64)
        blended = ((1 - alpha) * base_arr + alpha * colors).round().clip(0, 255).astype(np.uint8)
        figure.paste(PIL.Image.fromarray(blended), (n * panel_size, caption))
        (rows, cols), (th, tw) = entry["keys"], entry["tokens"]
        draw.text((n * panel_size + 4, 2), f"stage {entry['stage']}", fill="black", font=font)
        draw.text((n * panel_size + 4, line + 2), f"tokens {th}x{tw}, keys {rows}x{cols}", fill="black", font=font)
    return figure
