"""The offline demo: PVTv2-B0 learns scikit-learn's handwritten digits from scratch in a couple of CPU minutes.

The 1797 digits (8x8, bundled in ``pvtv2/assets/digits.npz``) are written as an image folder of upscaled RGB PNGs,
split 80/20 per class with a fixed seed; ``pvtv2 train``'s code trains on it with settings suited to tiny images
(no horizontal flips: a mirrored 2 is no digit; mild crops; no stochastic depth); then the best checkpoint predicts
a few held-out digits, and the training curves and one digit's attention maps (``pvtv2.visualize``) are drawn.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .data.digits import write_digits_folder
from .data.folders import scan_split
from .data.processing import PvtV2ImageProcessor, load_image
from .fileio import WriteError
from .models.modeling import PvtV2ForImageClassification
from .training import TrainConfig, check_config, train
from .training.curves import read_metrics
from .training.rundir import check_output_path

__all__ = ["DEMO_DEFAULTS", "run_demo"]

logger = logging.getLogger(__name__)

# Chosen so that B0 reaches well above 95% held-out top-1 in about two minutes on two CPU cores (see docs/training.md).
DEMO_DEFAULTS: dict[str, Any] = dict(
    epochs=8,
    image_size=32,
    batch_size=32,
    lr=2e-3,
    min_lr=1e-5,
    warmup_epochs=1.0,
    weight_decay=0.05,
    label_smoothing=0.1,
    drop_path=0.0,
    crop_scale=0.6,
    hflip=0.0,
    # The ImageNet recipe's augmentation (on by default for a preset trained from scratch) is for hundreds of epochs
    # of natural images; eight epochs of 32 px digits learn faster without it.
    recipe="none",
)


def run_demo(
    output: str | os.PathLike = "pvtv2-demo",
    *,
    epochs: int = DEMO_DEFAULTS["epochs"],
    image_size: int = DEMO_DEFAULTS["image_size"],
    overwrite: bool = False,
    progress: bool = True,
    num_predictions: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the digits, train, evaluate and predict; returns where everything went and the held-out accuracy."""
    began = time.perf_counter()
    out = Path(output)
    data, run = out / "digits", out / "run"
    settings = {k: v for k, v in DEMO_DEFAULTS.items() if k not in ("epochs", "image_size")}
    cfg = TrainConfig(
        data=str(data), model="pvt_v2_b0", output=str(run), epochs=epochs, image_size=image_size, seed=seed,
        workers=0, device="cpu", overwrite=overwrite, progress=progress, **settings,
    )
    check_config(cfg)  # a bad --epochs or --image-size is refused before the digits are written
    for folder in (out, run):  # OUTPUT or OUTPUT/run a file: named as such, before the digits are written
        check_output_path(folder)
    if run.exists() and not overwrite:
        raise FileExistsError(f"{str(out)!r} already holds a demo run; pass --overwrite to replace it")
    foreign = _not_demo_digits(data)
    if foreign is not None:  # it is removed and rewritten below: someone's own digits folder would be lost
        raise FileExistsError(
            f"{str(data)!r} holds {foreign!r}, which is not the demo's copy of the digits: refusing to replace it; "
            f"choose another --output"
        )
    try:  # the usual one-line "cannot write 'OUT': ... [ENOENT]" for an --output that cannot be made
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WriteError(out, err) from err
    if data.exists():
        shutil.rmtree(data)  # the demo's own copy of the digits, rewritten identically
    n_train, n_val = write_digits_folder(data, size=image_size, seed=seed)
    logger.info("wrote %d training and %d held-out digits (%d px) to %s", n_train, n_val, image_size, data)
    result = train(cfg)

    best = Path(result["best"])
    model = PvtV2ForImageClassification.from_pretrained(best)
    processor = PvtV2ImageProcessor.from_pretrained(best)
    _, val_samples = scan_split(data, "val", verify=False)
    step = max(1, len(val_samples) // num_predictions)
    predictions = []
    with torch.no_grad():
        for path, label in val_samples[::step][:num_predictions]:
            pixels = processor(load_image(path), return_tensors="pt")["pixel_values"]
            probs = model(pixels).logits.softmax(-1)[0]
            top = int(probs.argmax())
            predictions.append(
                {"image": path, "true": model.config.id2label[label], "label": model.config.id2label[top],
                 "probability": float(probs[top])}
            )

    attention = _attention_picture(model, processor, val_samples[0][0], out / "attention.png")
    final = result["final"] or {}
    best_record = max(read_metrics(run), key=lambda r: r["val_top1"], default=final)
    return {
        "data": str(data),
        "run": str(run),
        "best": str(best),
        "metrics": result["metrics"],
        "curves": result["curves"],
        "attention": attention,
        "val_top1": best_record.get("val_top1", float("nan")),
        "val_top5": best_record.get("val_top5", float("nan")),
        "num_train": n_train,
        "num_val": n_val,
        "epochs": final.get("epoch", 0),
        "predictions": predictions,
        "seconds": time.perf_counter() - began,
    }


def _not_demo_digits(data: Path) -> str | None:
    """The first thing in ``data`` that :func:`write_digits_folder` does not write (``train/`` and ``val/``, class
    folders ``0`` to ``9``, ``NNNN.png`` images), ``data`` itself when it is no folder; None when it holds nothing else
    or does not exist."""
    if not data.exists() and not data.is_symlink():
        return None
    if data.is_symlink() or not data.is_dir():
        return str(data)
    for split in data.iterdir():
        if split.name not in ("train", "val") or split.is_symlink() or not split.is_dir():
            return str(split)
        for digit in split.iterdir():
            if digit.name not in tuple("0123456789") or digit.is_symlink() or not digit.is_dir():
                return str(digit)
            for image in digit.iterdir():
                if not re.fullmatch(r"[0-9]{4}\.png", image.name) or image.is_symlink() or not image.is_file():
                    return str(image)
    return None


def _attention_picture(model: PvtV2ForImageClassification, processor: PvtV2ImageProcessor, image: str,
                       target: Path) -> str | None:
    """Each stage's attention over one held-out digit, drawn by ``pvtv2.visualize`` (skipped if it is absent)."""
    try:
        from .visualize import attention_figure
    except ImportError:
        logger.info("pvtv2.visualize is not available: no attention picture")
        return None
    try:
        # At the training size (32 px) every stage's spatial reduction leaves a single key; at 128 px the keys form
        # 4x4 grids, enough to see where the model looks (the convolutional position encoding adapts to the size).
        size = max(128, processor.size["height"])
        figure = attention_figure(model, image, processor=PvtV2ImageProcessor(size=size), panel_size=224)
        figure.save(target)
    except Exception as err:  # a picture is a nicety; the demo's result stands without it
        logger.warning("could not draw the attention picture: %s", err)
        return None
    return str(target)
