"""A hostile pass over today's serving and evaluation changes: detections_to_coco's counts."""

from __future__ import annotations

import re

import pytest
import torch

from pvtv2.data.coco import detections_to_coco


def _output(count: int, label: int = 0) -> dict[str, torch.Tensor]:
    boxes = torch.tensor([[1.0, 2.0, 11.0, 22.0]]).repeat(count, 1)
    return {"boxes": boxes, "scores": torch.full((count,), 0.5), "labels": torch.full((count,), label)}


@pytest.mark.parametrize("outputs, ids, message", [
    # one image's detections went without a word: zip stopped at the shorter list, and COCOeval scored the image
    # as one where nothing was found (recall down, no error)
    (3, 2, "3 outputs but 2 image ids"),
    (2, 3, "2 outputs but 3 image ids"),
])
def test_outputs_and_image_ids_of_other_counts_are_refused(outputs, ids, message):
    with pytest.raises(ValueError, match=re.escape(f"detections_to_coco: {message}")):
        detections_to_coco([_output(1) for _ in range(outputs)], list(range(ids)), [7])
    # and from generators, as an evaluation loop may pass them
    with pytest.raises(ValueError, match=re.escape(f"detections_to_coco: {message}")):
        detections_to_coco((_output(1) for _ in range(outputs)), iter(range(ids)), [7])


def test_equal_counts_give_one_entry_per_box_in_coco_form():
    results = detections_to_coco([_output(2), _output(1)], [10, 11], [7])
    assert [(r["image_id"], r["category_id"], r["bbox"]) for r in results] == [
        (10, 7, [1.0, 2.0, 10.0, 20.0]), (10, 7, [1.0, 2.0, 10.0, 20.0]), (11, 7, [1.0, 2.0, 10.0, 20.0])]


@pytest.mark.parametrize("shortest", [10**400, 10**309], ids=["1e400", "1e309"])
def test_a_shortest_edge_beyond_floats_is_refused_as_too_many_pixels(shortest):
    # The pixel limit came after the new size was computed in floats (transformers' arithmetic): a shortest_edge of
    # 10**309 or more stopped it with OverflowError ("integer division result too large for a float"), a traceback
    # in the command line, where the limit's ValueError is one line.
    import numpy as np

    from pvtv2 import PvtV2ImageProcessor

    processor = PvtV2ImageProcessor(size={"shortest_edge": shortest}, do_center_crop=True, crop_size=224)
    with pytest.raises(ValueError, match=re.escape("more pixels than twice PIL.Image.MAX_IMAGE_PIXELS (178,956,970")):
        processor(np.zeros((20, 30, 3), np.uint8))
