"""The handwritten digits bundled with the package (scikit-learn's, BSD licence), as arrays or as an image folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image

__all__ = ["load_digits", "write_digits_folder"]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits (1797 images of 8x8, BSD licence), bundled with the package.

    Returns ``images`` uint8 (1797, 8, 8) in 0..255 (the original 0..16 scaled and rounded) and ``targets`` (1797,).
    """
    path = Path(__file__).parent.parent / "assets" / "digits.npz"
    with np.load(path) as data:
        return data["images"], data["targets"].astype(np.int64)


def write_digits_folder(
    folder: str | os.PathLike,
    *,
    size: int = 32,
    val_fraction: float = 0.2,
    seed: int = 0,
    limit_per_class: int | None = None,
) -> tuple[int, int]:
    """Write the digits as an image-folder dataset ``folder/{train,val}/<digit>/<n>.png`` (RGB, ``size`` px, bicubic
    upscaling), split per class (stratified) with a fixed seed. Returns the numbers of train and val images.

    ``limit_per_class`` keeps only that many images of each class (before splitting), for quick tests.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    images, targets = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for digit in range(10):
        members = np.flatnonzero(targets == digit)
        members = members[rng.permutation(len(members))]
        if limit_per_class is not None:
            members = members[:limit_per_class]
        n_val = max(1, int(round(len(members) * val_fraction)))
        for split, chosen in (("val", members[:n_val]), ("train", members[n_val:])):
            out = Path(folder) / split / str(digit)
            out.mkdir(parents=True, exist_ok=True)
            for index in chosen:
                image = PIL.Image.fromarray(images[index]).resize((size, size), PIL.Image.Resampling.BICUBIC)
                image.convert("RGB").save(out / f"{index:04d}.png")
                counts[split] += 1
    return counts["train"], counts["val"]
