"""Pictures: where each stage's queries look (attention maps), segmentation overlays, colour-mapped depth and
detected objects.

For each stage, the last block's attention probabilities ``(B, heads, N, N')`` are averaged over heads and over all
queries: the result says how much attention each *key* position receives. Keys live on the reduced grid, ``H/sr x
W/sr`` for spatial-reduction attention (the full ``H x W`` when ``sr = 1``) and 7 x 7 for linear attention, so the
map is upsampled to the image and laid over it as a heat map. Works with any weights, random ones included (the
maps are then just less meaningful).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch
from torch import nn

from .data.processing import PvtV2ImageProcessor, load_image, to_rgb
from .models.layers import PvtV2Stage

logger = logging.getLogger(__name__)

__all__ = [
    "attention_maps",
    "attention_figure",
    "heatmap_colors",
    "viridis_lut",
    "colorize_depth",
    "palette",
    "segmentation_picture",
    "depth_picture",
    "detection_picture",
    "LEGEND_WIDTH",
    "MIN_PICTURE_SIDE",
    "PANEL_SIZES",
    "display_scale",
]

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


# A picture of a small input (the segmentation example's 64 px images) is enlarged to at least this shorter side,
# by a whole factor (nearest neighbour: each pixel becomes a block, no value is invented), so it can be read.
MIN_PICTURE_SIDE = 256
# ... but never beyond this longer side (an image of 1 x 5000 pixels must not become 256 x 1,280,000).
_MAX_ENLARGED_SIDE = 4096
# The panel sizes attention_figure accepts: below, captions do not fit; above, the figure's memory grows without use.
PANEL_SIZES = (32, 1024)


def display_scale(height: int, width: int, min_side: int = MIN_PICTURE_SIDE) -> int:
    """The whole factor by which a picture of a ``height x width`` image is enlarged (nearest neighbour) so that its
    shorter side is at least ``min_side``; 1 for images that are large enough. The enlarged longer side stays within
    4096 pixels (the factor is then smaller, at least 1)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale = max(1, math.ceil(min_side / min(height, width)))
    return max(1, min(scale, _MAX_ENLARGED_SIDE // max(height, width)))


def _enlarge(image: PIL.Image.Image, array: np.ndarray, scale: int) -> tuple[PIL.Image.Image, np.ndarray]:
    """``image`` and a per-pixel ``array`` of its size, each pixel repeated ``scale`` times in both directions."""
    if scale == 1:
        return image, array
    image = image.resize((image.width * scale, image.height * scale), PIL.Image.Resampling.NEAREST)
    return image, np.repeat(np.repeat(array, scale, axis=0), scale, axis=1)


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:  # also False for NaN
        raise ValueError(f"alpha (the colours' opacity) must be between 0 and 1, got {alpha}")


def _font(size: int) -> PIL.ImageFont.ImageFont:
    try:
        return PIL.ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return PIL.ImageFont.load_default()


def _input_captions(image: PIL.Image.Image, pixel_values: torch.Tensor) -> tuple[str, str]:
    """The first panel's two caption lines: the image's size, then the size the model ran at (width x height)."""
    height, width = pixel_values.shape[-2:]
    return f"image {image.width}x{image.height}", f"model input {width}x{height}"


def _grid_caption(entry: dict[str, Any]) -> str:
    """A stage panel's second caption line: its token and key grids, width x height as the first panel's sizes
    (a 33x47 input, 47 wide, read "model input 47x33" above "tokens 9x12": the grids looked transposed)."""
    (rows, cols), (token_rows, token_cols) = entry["keys"], entry["tokens"]
    return f"tokens {token_cols}x{token_rows}, keys {cols}x{rows}"


def attention_figure(
    model: nn.Module,
    image: PIL.Image.Image | str | os.PathLike,
    processor: PvtV2ImageProcessor | None = None,
    panel_size: int = 224,
    alpha: float = 0.6,
) -> PIL.Image.Image:
    """The image beside one heat-map panel per stage (see the module docstring), each labelled with its stage, token
    grid and key grid. Returns an RGB image of ``(1 + stages) * panel_size`` x ``panel_size + caption`` pixels, the
    caption being two lines of ``max(18, panel_size // 10)`` pixels. ``panel_size`` is bounded by ``PANEL_SIZES``.

    An input smaller than the panel in both directions is enlarged with nearest-neighbour sampling, so that its
    pixels show as sharp blocks instead of a blur; larger inputs are resized bilinearly."""
    low, high = PANEL_SIZES
    if not low <= panel_size <= high:
        raise ValueError(f"panel_size must be between {low} and {high} pixels, got {panel_size}")
    _check_alpha(alpha)
    if not isinstance(image, PIL.Image.Image):
        image = load_image(image)
    # As the processor makes it RGB (a 16-bit picture scaled, alpha and colour keys onto white): the figure shows,
    # and the model is given, what predict gives the model for this image, not its hidden transparent colours.
    image = to_rgb(image)
    config = getattr(model, "config", None)
    if processor is None:
        height, width = getattr(config, "image_size", (224, 224))
        processor = PvtV2ImageProcessor(size={"height": height, "width": width})
    param = next(model.parameters())
    pixel_values = processor(image, return_tensors="pt")["pixel_values"].to(param.device, param.dtype)
    maps = attention_maps(model, pixel_values)
    single = [entry["stage"] for entry in maps if entry["keys"] == (1, 1)]
    if single:
        # One key takes all the attention: the panel is uniform, which would read as "looks nowhere in particular".
        height, width = pixel_values.shape[-2:]
        logger.warning(
            "at a %dx%d model input (height x width, as --size takes it), stage(s) %s attend over a single key: "
            "their maps are uniform and show nothing; draw at a larger input size (pvtv2 visualize --size, or a "
            "processor with a larger size: the demo draws its 32 px digits at 128 px)", height, width,
            ", ".join(map(str, single)),
        )

    small = image.width < panel_size and image.height < panel_size
    resample = PIL.Image.Resampling.NEAREST if small else PIL.Image.Resampling.BILINEAR
    base = image.resize((panel_size, panel_size), resample)
    base_arr = np.asarray(base, dtype=np.float64)
    line = max(18, panel_size // 10)
    caption = 2 * line  # two lines: the stage, then its grids (one line overflows narrow panels)
    font = _font(max(10, line - 6))
    figure = PIL.Image.new("RGB", ((1 + len(maps)) * panel_size, panel_size + caption), "white")
    draw = PIL.ImageDraw.Draw(figure)
    figure.paste(base, (0, caption))
    # The model sees the processed size, which the token grids follow (the demo draws its 32 px digits at 128 px):
    # "input 32x32" above "tokens 32x32" at stride 4 would read as a contradiction.
    for row, text in enumerate(_input_captions(image, pixel_values)):
        draw.text((4, row * line + 2), text, fill="black", font=font)
    for n, entry in enumerate(maps, start=1):
        heat = entry["map"]
        lo, hi = float(heat.min()), float(heat.max())
        norm = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
        # Upsample the key grid to the panel (bilinear, on a float image), then colour it.
        up = PIL.Image.fromarray(norm.astype(np.float32)).resize((panel_size, panel_size), PIL.Image.Resampling.BILINEAR)
        colors = heatmap_colors(np.asarray(up, dtype=np.float64)).astype(np.float64)
        blended = ((1 - alpha) * base_arr + alpha * colors).round().clip(0, 255).astype(np.uint8)
        figure.paste(PIL.Image.fromarray(blended), (n * panel_size, caption))
        draw.text((n * panel_size + 4, 2), f"stage {entry['stage']}", fill="black", font=font)
        draw.text((n * panel_size + 4, line + 2), _grid_caption(entry), fill="black", font=font)
    return figure


# ---------------------------------------------------------------------------------------------- dense pictures
# Viridis, sampled at 17 evenly spaced points (matplotlib's table); interpolated to 256 entries below.
_VIRIDIS_ANCHORS = (
    (68, 1, 84), (72, 24, 106), (71, 45, 123), (66, 64, 134), (59, 82, 139), (51, 99, 141),
    (44, 114, 142), (38, 130, 142), (33, 145, 140), (31, 159, 136), (39, 173, 129), (61, 188, 116),
    (92, 200, 99), (129, 211, 77), (170, 220, 50), (213, 226, 26), (253, 231, 37),
)
# Distinct colours for the first classes (background first); further ones are spread around the hue circle.
_PALETTE = (
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128),
)


def viridis_lut() -> np.ndarray:
    """A (256, 3) uint8 lookup table of the viridis colour map (no matplotlib needed)."""
    anchors = np.asarray(_VIRIDIS_ANCHORS, dtype=np.float64)
    positions = np.linspace(0, 255, len(anchors))
    table = np.stack([np.interp(np.arange(256), positions, anchors[:, c]) for c in range(3)], axis=1)
    return np.round(table).astype(np.uint8)


def colorize_depth(depth: np.ndarray) -> np.ndarray:
    """(H, W) depth -> (H, W, 3) uint8 viridis picture, stretched between the map's own minimum and maximum."""
    depth = np.asarray(depth, dtype=np.float64)
    low, high = float(np.nanmin(depth)), float(np.nanmax(depth))
    scaled = (depth - low) / (high - low) if high > low else np.zeros_like(depth)
    return viridis_lut()[np.clip(np.round(scaled * 255), 0, 255).astype(np.int64)]


def palette(num_labels: int) -> np.ndarray:
    """(num_labels, 3) uint8 class colours: a fixed table, then hues spaced by the golden angle."""
    import colorsys

    colours = list(_PALETTE[:num_labels])
    for i in range(len(colours), num_labels):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.95)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return np.asarray(colours, dtype=np.uint8).reshape(-1, 3)


LEGEND_WIDTH = 180


def segmentation_picture(image, label_map, id2label: dict[int, str], alpha: float = 0.5,
                         min_side: int = MIN_PICTURE_SIDE):
    """The image with its label map blended over it (``alpha``), and a legend of the classes present to its right.

    An image whose shorter side is below ``min_side`` is first enlarged by the whole factor
    ``display_scale(height, width, min_side)`` (nearest neighbour, image and label map alike: each pixel becomes a
    block, no label is invented). Returns a PIL image ``LEGEND_WIDTH`` wider than the (enlarged) image, as tall as
    the taller of the two.
    """
    import PIL.Image
    import PIL.ImageDraw

    _check_alpha(alpha)
    label_map = np.asarray(label_map)
    if label_map.shape != (image.height, image.width):
        raise ValueError(f"label map of shape {label_map.shape} does not match the image's {(image.height, image.width)}")
    image, label_map = _enlarge(to_rgb(image), label_map, display_scale(image.height, image.width, min_side))
    colours = palette(max(len(id2label), int(label_map.max()) + 1))
    rgb = np.asarray(image, dtype=np.float32)
    blended = (1 - alpha) * rgb + alpha * colours[label_map].astype(np.float32)
    present = [int(c) for c in np.unique(label_map)]
    row = 20
    height = max(image.height, row * len(present) + 10)
    canvas = PIL.Image.new("RGB", (image.width + LEGEND_WIDTH, height), (255, 255, 255))
    canvas.paste(PIL.Image.fromarray(np.round(blended).astype(np.uint8)), (0, 0))
    draw = PIL.ImageDraw.Draw(canvas)
    for i, c in enumerate(present):
        top = 5 + i * row
        draw.rectangle([image.width + 6, top, image.width + 20, top + 14], fill=tuple(int(v) for v in colours[c]),
                       outline=(0, 0, 0))
        draw.text((image.width + 26, top + 1), id2label.get(c, f"class_{c}")[:24], fill=(0, 0, 0))
    return canvas


def depth_picture(image, depth, min_side: int = MIN_PICTURE_SIDE):
    """The image and its viridis-coloured depth map side by side (twice the image's width).

    An image whose shorter side is below ``min_side`` is first enlarged, with its depth map, by the whole factor
    ``display_scale(height, width, min_side)`` (nearest neighbour)."""
    import PIL.Image

    depth = np.asarray(depth)
    if depth.shape != (image.height, image.width):
        raise ValueError(f"depth map of shape {depth.shape} does not match the image's {(image.height, image.width)}")
    image, depth = _enlarge(to_rgb(image), depth, display_scale(image.height, image.width, min_side))
    canvas = PIL.Image.new("RGB", (image.width * 2, image.height))
    canvas.paste(image, (0, 0))
    canvas.paste(PIL.Image.fromarray(colorize_depth(depth)), (image.width, 0))
    return canvas


def detection_picture(
    image, boxes, labels, scores, id2label: dict[int, str], masks=None, alpha: float = 0.45, line_width: int | None = None,
):
    """The image with each detection drawn: its mask blended in (``alpha``, when given), its box, and a caption
    "name score" on a band of the box's colour. Colours follow the class (:func:`palette`, background colour
    skipped). ``boxes``: (N, 4) x1 y1 x2 y2 in the image's pixels; ``masks``: (N, H, W) booleans or None.

    Returns a new RGB PIL image of the image's size.
    """
    import PIL.Image
    import PIL.ImageDraw

    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = [int(v) for v in np.asarray(labels).reshape(-1)]
    scores = [float(v) for v in np.asarray(scores).reshape(-1)]
    if not len(labels) == len(scores) == len(boxes):
        raise ValueError(f"got {len(boxes)} boxes, {len(labels)} labels and {len(scores)} scores: one each per detection")
    colours = palette(max([len(id2label), *[label + 1 for label in labels]]) + 1)[1:]  # entry 0 is the background's black
    rgb = np.asarray(to_rgb(image), dtype=np.float32)
    if masks is not None:
        masks = np.asarray(masks, dtype=bool)
        if masks.shape != (len(boxes), image.height, image.width):
            raise ValueError(f"masks of shape {masks.shape} do not match {len(boxes)} detections on a {image.width}x{image.height} image")
        for mask, label in zip(masks, labels):
            rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colours[label].astype(np.float32)
    canvas = PIL.Image.fromarray(np.round(rgb).astype(np.uint8))
    draw = PIL.ImageDraw.Draw(canvas)
    width = line_width or max(1, round(min(image.width, image.height) / 200))
    font = _font(max(10, min(image.width, image.height) // 40))
    # Lowest scores first, so that the most confident boxes and captions end up on top.
    for n in np.argsort(scores, kind="stable"):
        x1, y1, x2, y2 = boxes[n]
        colour = tuple(int(v) for v in colours[labels[n]])
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        caption = f"{id2label.get(labels[n], f'class_{labels[n]}')} {scores[n]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        tw, th = right - left + 4, bottom - top + 4
        ty = y1 - th if y1 - th >= 0 else y1  # above the box, or inside it at the top edge
        draw.rectangle([x1, ty, x1 + tw, ty + th], fill=colour)
        text = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)
        draw.text((x1 + 2 - left, ty + 2 - top), caption, fill=text, font=font)
    return canvas
