"""The shipped ImageNet-1k class names against timm's synset lemmas and known published id2label entries."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from pvtv2.models.labels import IMAGENET_NUM_CLASSES, imagenet_id2label

# Entries of the id2label in the published OpenGVLab/pvt_v2_* configs (the classic ImageNet-1k class list).
KNOWN = {
    0: "tench, Tinca tinca",
    1: "goldfish, Carassius auratus",
    134: "crane",
    281: "tabby, tabby cat",
    319: "dragonfly, darning needle, devil's darning needle, sewing needle, snake feeder, snake doctor, "
    "mosquito hawk, skeeter hawk",
    517: "crane",
    638: "maillot",
    639: "maillot, tank suit",
    778: "scale, weighing machine",
    999: "toilet tissue, toilet paper, bathroom tissue",
}


def test_one_label_per_class_in_index_order():
    id2label = imagenet_id2label()
    assert IMAGENET_NUM_CLASSES == 1000
    assert list(id2label) == list(range(1000))
    assert all(isinstance(label, str) and label == label.strip() and label for label in id2label.values())


@pytest.mark.parametrize("index", sorted(KNOWN))
def test_known_entries(index):
    assert imagenet_id2label()[index] == KNOWN[index]


def test_labels_are_unique_except_the_two_cranes():
    # The published list names class 134 (the bird) and 517 (the machine) both "crane"; every other name is unique.
    counts = collections.Counter(imagenet_id2label().values())
    assert len(counts) == 999
    assert {label: count for label, count in counts.items() if count > 1} == {"crane": 2}


def test_equal_to_timm_imagenet_info():
    timm_data = pytest.importorskip("timm.data")
    assert list(imagenet_id2label().values()) == timm_data.ImageNetInfo("imagenet-1k").label_descriptions()


def test_package_file_is_the_source_and_results_are_independent_copies():
    path = Path(__file__).parents[2] / "src" / "pvtv2" / "assets" / "imagenet_classes.json"
    assert json.loads(path.read_text(encoding="utf-8")) == list(imagenet_id2label().values())
    first = imagenet_id2label()
    first[0] = "changed"
    assert imagenet_id2label()[0] == "tench, Tinca tinca"
