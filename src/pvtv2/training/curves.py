"""Per-epoch metrics (``metrics.jsonl``) and the training curves picture (``curves.png``), drawn with Pillow."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..fileio import atomic_write, atomic_write_text

__all__ = ["read_metrics", "write_metrics", "draw_curves"]

METRICS_FILE = "metrics.jsonl"


def read_metrics(output: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``output/metrics.jsonl`` (none when it is absent); a damaged file is an error naming it."""
    path = Path(output) / METRICS_FILE
    if not path.is_file():
        return []
    try:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not all(isinstance(r, dict) and isinstance(r.get("epoch"), int) for r in records):
            raise ValueError("a line is not a JSON record with its epoch")
    except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(
            f"{str(path)!r} is damaged ({err}); remove it to resume without the earlier epochs' records, or pass "
            f"--overwrite to start again"
        ) from None
    return records


def write_metrics(output: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(output / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records))


_ACCURACY_PANEL = ("val accuracy (%)", [("val_top1", (44, 160, 44)), ("val_top5", (214, 39, 40))], (0.0, 100.0))


def draw_curves(
    records: Sequence[dict[str, Any]], path: str | os.PathLike, score_panel: tuple | None = None
) -> None:
    """Loss (train, val) and a score panel (default: val top-1 and top-5 accuracy; ``score_panel`` is
    ``(title, [(key, rgb), ...], (low, high) or None)``) against the epoch, drawn with Pillow."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, margin = 460, 320, 48
    image = Image.new("RGB", (2 * width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    epochs = [r["epoch"] for r in records]
    panels = [
        ("loss", [("train_loss", (31, 119, 180)), ("val_loss", (255, 127, 14))], None),
        score_panel or _ACCURACY_PANEL,
    ]
    for p, (title, series, fixed) in enumerate(panels):
        x0 = p * width
        left, right, top, bottom = x0 + margin, x0 + width - 16, 28, height - margin
        values = [r[k] for r in records for k, _ in series if r.get(k) is not None and math.isfinite(r[k])]
        lo, hi = fixed if fixed else (min(values, default=0.0), max(values, default=1.0))
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        e_lo, e_hi = (min(epochs), max(epochs)) if epochs else (0, 1)
        e_span = max(1, e_hi - e_lo)

        def at(epoch: float, value: float) -> tuple[float, float]:
            return (left + (epoch - e_lo) / e_span * (right - left), bottom - (value - lo) / (hi - lo) * (bottom - top))

        draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
        draw.text((left, 8), title, fill=(0, 0, 0), font=font)
        for frac in (0.0, 0.5, 1.0):
            value = lo + frac * (hi - lo)
            y = at(e_lo, value)[1]
            draw.line([left - 4, y, left, y], fill=(0, 0, 0))
            draw.text((x0 + 4, y - 6), f"{value:.3g}", fill=(0, 0, 0), font=font)
        draw.text((left, bottom + 6), f"epoch {e_lo}", fill=(0, 0, 0), font=font)
        draw.text((right - 50, bottom + 6), f"{e_hi}", fill=(0, 0, 0), font=font)
        for s, (key, color) in enumerate(series):
            points = [at(r["epoch"], r[key]) for r in records if r.get(key) is not None and math.isfinite(r[key])]
            if len(points) > 1:
                draw.line(points, fill=color, width=2)
            for x, y in points:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
            draw.text((left + 8, bottom - 16 - 12 * s), key, fill=color, font=font)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
