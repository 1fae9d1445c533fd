"""ImageNet-1k class names shipped with the package.

``assets/imagenet_classes.json`` holds the 1000 names in class-index order, as the WordNet lemmas of the ImageNet-1k
synsets (the list timm's ``ImageNetInfo`` builds and the published ``OpenGVLab/pvt_v2_*`` configs use as
``id2label``): index 0 is ``"tench, Tinca tinca"``, index 281 ``"tabby, tabby cat"``. Two classes share a name:
134 (the bird) and 517 (the machine) are both ``"crane"``, so the list has 999 distinct strings.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

__all__ = ["IMAGENET_NUM_CLASSES", "imagenet_id2label", "generic_id2label", "has_generic_labels"]

IMAGENET_NUM_CLASSES = 1000

_LABELS_FILE = "imagenet_classes.json"


@cache
def _imagenet_labels() -> tuple[str, ...]:
    text = resources.files("pvtv2").joinpath("assets", _LABELS_FILE).read_text(encoding="utf-8")
    labels = json.loads(text)
    if (
        not isinstance(labels, list)
        or len(labels) != IMAGENET_NUM_CLASSES
        or not all(isinstance(label, str) for label in labels)
    ):
        raise ValueError(
            f"package file assets/{_LABELS_FILE} must hold a JSON list of {IMAGENET_NUM_CLASSES} strings, "
            f"got {type(labels).__name__} of length {len(labels) if isinstance(labels, list) else 'n/a'}"
        )
    return tuple(labels)


def imagenet_id2label() -> dict[int, str]:
    """Map each ImageNet-1k class index (0..999) to its name, e.g. ``{0: "tench, Tinca tinca", ...}``.

    The file is read once; each call returns a fresh dict, so callers may change it freely.
    """
    return dict(enumerate(_imagenet_labels()))


def generic_id2label(num_labels: int) -> dict[int, str]:
    """The names transformers gives classes that have none: ``{0: "LABEL_0", 1: "LABEL_1", ...}``."""
    return {i: f"LABEL_{i}" for i in range(num_labels)}


def has_generic_labels(id2label: dict[int, str]) -> bool:
    """True when the classes carry only :func:`generic_id2label`'s placeholder names (no real names)."""
    return all(name == f"LABEL_{i}" for i, name in id2label.items())
