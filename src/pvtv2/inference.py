"""Prediction and evaluation with a trained classifier: loading it with its preprocessing, top-k labels for image
files, accuracy on an image-folder dataset.

Unreadable images: ``predict`` reports each one (an entry with an ``error``) and goes on with the others, so one bad
file in a folder of thousands costs one result, not the run; the command then exits with status 2. ``evaluate``
stops at the first unreadable image instead, because an accuracy over a silently shrunken dataset would mislead.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .config import PRESETS
from .modeling import PvtV2ForImageClassification
from .processing import PREPROCESSOR_CONFIG_NAME, PvtV2ImageProcessor, load_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "Prediction",
    "is_preset_name",
    "load_classifier",
    "load_processor",
    "find_images",
    "predict",
    "evaluate",
    "class_mapping",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def is_preset_name(source: str | os.PathLike) -> bool:
    """True when ``source`` is a preset name and no file or folder of that name exists."""
    text = os.fspath(source)
    return not os.path.exists(text) and text.replace("-", "_").lower() in PRESETS


def load_classifier(source: str | os.PathLike, device: str | torch.device = "cpu") -> PvtV2ForImageClassification:
    """A trained classifier from anything ``from_pretrained`` takes; a bare preset name is refused, because an
    untrained model's predictions are noise."""
    if is_preset_name(source):
        name = os.fspath(source).replace("-", "_").lower()
        raise ValueError(
            f"{os.fspath(source)!r} is a preset (an architecture without trained weights): its predictions would be "
            f"random. Pass trained weights: a save_pretrained folder, a checkpoint file (.safetensors/.pth) or a hub "
            f"id such as 'OpenGVLab/{name}'"
        )
    model = PvtV2ForImageClassification.from_pretrained(source)
    return model.to(device).eval()


def load_processor(source: str | os.PathLike, image_size: Sequence[int]) -> PvtV2ImageProcessor:
    """The model's own preprocessing when its folder (or hub repository) has a ``preprocessor_config.json``; else the
    defaults (bilinear resize, ImageNet statistics) at the model's ``image_size``."""
    from .hub import looks_like_hub_id, resolve_file

    text = os.fspath(source)
    path = None
    if os.path.isdir(text):
        path = resolve_file(text, PREPROCESSOR_CONFIG_NAME, required=False)
    elif os.path.isfile(text):
        sibling = Path(text).parent / PREPROCESSOR_CONFIG_NAME
        path = sibling if sibling.is_file() and (Path(text).parent / "config.json").is_file() else None
    elif looks_like_hub_id(text):
        path = resolve_file(text, PREPROCESSOR_CONFIG_NAME, required=False)
    if path is not None:
        logger.info("preprocessing from %s", path)
        return PvtV2ImageProcessor.from_pretrained(path)
    height, width = image_size
    return PvtV2ImageProcessor(size={"height": int(height), "width": int(width)})


def find_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named directly (any extension), and image files inside named folders (recursively, sorted).

    A path that does not exist, or a folder without image files, raises ``FileNotFoundError``.
    """
    missing = [os.fspath(p) for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"image path(s) not found: {', '.join(repr(m) for m in missing)}")
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise FileNotFoundError(f"folder {os.fspath(p)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            found.extend(files)
        else:
            found.append(p)
    return found


@dataclass
class Prediction:
    """Top-k classes of one image, or the reason it could not be read."""

    image: str
    labels: list[str]
    indices: list[int]
    scores: list[float]
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"image": self.image, "error": self.error}
        return {
            "image": self.image,
            "predictions": [
                {"label": label, "index": index, "score": score}
                for label, index, score in zip(self.labels, self.indices, self.scores)
            ],
        }


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def predict(
    model: PvtV2ForImageClassification,
    processor: PvtV2ImageProcessor,
    images: Sequence[str | os.PathLike],
    top_k: int = 5,
    batch_size: int = 16,
    progress: bool = False,
) -> list[Prediction]:
    """Softmax probabilities of the ``top_k`` most likely classes of each image file, in batches."""
    from tqdm.auto import tqdm

    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    k = min(top_k, model.config.num_labels)
    id2label = model.config.id2label
    device = model.device
    results: list[Prediction] = []
    bar = tqdm(total=len(images), unit="img", disable=not progress, desc="predict")
    for chunk in _batches(list(images), batch_size):
        loaded, names = [], []
        for path in chunk:
            try:
                loaded.append(load_image(path))
                names.append(os.fspath(path))
            except (OSError, ValueError) as err:
                logger.debug("skipping: %s", err)
                results.append(Prediction(os.fspath(path), [], [], [], error=str(err)))
        if loaded:
            pixel_values = processor(loaded, return_tensors="pt")["pixel_values"].to(device, model.dtype)
            probs = model(pixel_values).logits.float().softmax(dim=-1)  # (B, num_labels)
            scores, indices = probs.topk(k, dim=-1)
            for name, s, i in zip(names, scores.tolist(), indices.tolist()):
                results.append(Prediction(name, [id2label[j] for j in i], i, s))
        bar.update(len(chunk))
    bar.close()
    order = {os.fspath(p): n for n, p in enumerate(images)}
    return sorted(results, key=lambda r: order[r.image])


def _dataset_root(data: str | os.PathLike) -> tuple[Path, str]:
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {os.fspath(root)!r}")
    if (root / "val").is_dir():
        return root, "val"
    return root, "."


def class_mapping(folder_names: Sequence[str], id2label: dict[int, str]) -> dict[str, int]:
    """Class folder name -> model class index.

    Folder names must be names of the model's labels. A model whose labels are the generic ``LABEL_0`` ... (as
    written when none were given) takes the folders in sorted order as classes 0, 1, ...
    """
    generic = all(name == f"LABEL_{i}" for i, name in id2label.items())
    if generic:
        names = sorted(folder_names)
        if len(names) > len(id2label):
            raise ValueError(
                f"the dataset has {len(names)} class folders but the model classifies only {len(id2label)} classes"
            )
        return {name: i for i, name in enumerate(names)}
    label2id: dict[str, int] = {}
    for index, name in sorted(id2label.items()):
        label2id.setdefault(name, index)
    unknown = sorted(n for n in folder_names if n not in label2id)
    if unknown:
        known = sorted(label2id)
        shown = ", ".join(repr(k) for k in known[:10]) + (f" ... ({len(known)} labels)" if len(known) > 10 else "")
        raise ValueError(
            f"class folder(s) {unknown} are not labels of the model; each folder name must be one of the model's "
            f"id2label names: {shown}"
        )
    return {name: label2id[name] for name in folder_names}


@torch.no_grad()
def evaluate(
    model: PvtV2ForImageClassification,
    processor: PvtV2ImageProcessor,
    data: str | os.PathLike,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, Any]:
    """Top-1 and top-5 accuracy, mean cross-entropy and throughput on ``DIR/<class>/*`` (or ``DIR/val/<class>/*``).

    ``images_per_second`` is end to end (reading, preprocessing and the model); ``model_images_per_second`` counts
    the forward passes only.
    """
    from tqdm.auto import tqdm

    from .data import scan_split

    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    root, split = _dataset_root(data)
    folders, samples = scan_split(root, split, verify=False)
    mapping = class_mapping(folders, model.config.id2label)
    targets = {i: mapping[name] for i, name in enumerate(folders)}
    k = min(5, model.config.num_labels)
    device = model.device
    correct1 = correct5 = 0
    loss_sum = 0.0
    model_seconds = 0.0
    start = time.perf_counter()
    bar = tqdm(total=len(samples), unit="img", disable=not progress, desc="eval")
    for chunk in _batches(samples, batch_size):
        images = [load_image(path) for path, _ in chunk]  # an unreadable file stops the evaluation, naming it
        labels = torch.tensor([targets[label] for _, label in chunk], device=device)
        pixel_values = processor(images, return_tensors="pt")["pixel_values"].to(device, model.dtype)
        t0 = time.perf_counter()
        logits = model(pixel_values).logits.float()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        model_seconds += time.perf_counter() - t0
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        top = logits.topk(k, dim=-1).indices  # (B, k)
        correct1 += int((top[:, 0] == labels).sum())
        correct5 += int((top == labels[:, None]).any(dim=1).sum())
        bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - start
    n = len(samples)
    return {
        "dataset": os.fspath(root / split) if split != "." else os.fspath(root),
        "images": n,
        "classes": len(folders),
        "top1": correct1 / n,
        "top5": correct5 / n,
        "top5_k": k,
        "loss": loss_sum / n,
        "images_per_second": n / seconds if seconds > 0 else float("inf"),
        "model_images_per_second": n / model_seconds if model_seconds > 0 else float("inf"),
        "seconds": seconds,
    }
