"""Hostile use of the COCO reading, ``coco_evaluate``'s mask checks and FCOS's ``GroupNormAnyBatch`` (pass 32):
real-world files that must still read (LVIS / Objects365 fields, ids of 2**40, float areas, crowd regions in
uncompressed RLE, a 10000 x 10000 aerial image's polygons) against pycocotools and COCOeval run directly; the faults
found (an integer box of 10**200 without 'area' was an OverflowError; a ground truth without image sizes was a
KeyError from inside COCOeval; a detection mask 'size' that is not [height, width] an IndexError or TypeError from
the size check); and ``GroupNormAnyBatch`` against ``nn.GroupNorm`` in float64, forward and backward."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import pickle

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from pvtv2.data.coco import coco_evaluate, read_coco_annotations  # noqa: E402
from pvtv2.models.detection import GroupNormAnyBatch  # noqa: E402


def _file(tmp_path, data) -> str:
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return str(path)


def _one(image=None, ann=None, category=None) -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 640, "height": 480, **(image or {})}],
        "categories": [{"id": 1, "name": "x", **(category or {})}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 30], "area": 600, "iscrowd": 0,
                         **(ann or {})}],
    }


def _gt(dataset: dict) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(dataset)
        gt.createIndex()
    return gt


def _cocoeval(dataset: dict, results: list, iou_type: str) -> list[float]:
    gt = _gt(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


# ---------------------------------------------------------------------------------------------- faults found
def test_an_integer_box_beyond_float_range_in_area_reads_as_a_float_area(tmp_path):
    """bbox w and h of 10**200 (each a float, their product not): an OverflowError and its traceback; now the area
    is the product of the floats (inf), as for the same box written 1e200, and an ordinary box's is w * h."""
    huge = _one(ann={"bbox": [0, 0, 10**200, 10**200], "area": None})
    del huge["annotations"][0]["area"]
    assert read_coco_annotations(_file(tmp_path, huge)).dataset["annotations"][0]["area"] == float("inf")
    plain = _one(ann={"bbox": [3, 4, 7, 9]})
    del plain["annotations"][0]["area"]
    assert read_coco_annotations(_file(tmp_path, plain)).dataset["annotations"][0]["area"] == 63.0


def _masked_dataset(sizes: bool) -> tuple[dict, np.ndarray]:
    mask = np.zeros((48, 64), np.uint8)
    mask[10:30, 12:40] = 1
    image = {"id": 7, "file_name": "a.jpg", **({"height": 48, "width": 64} if sizes else {})}
    ann = {"id": 1, "image_id": 7, "category_id": 1, "bbox": [12, 10, 28, 20], "area": 560.0, "iscrowd": 0,
           "segmentation": _rle(mask)}
    return {"images": [image], "categories": [{"id": 1, "name": "x"}], "annotations": [ann]}, mask


def test_mask_metrics_on_a_ground_truth_without_image_sizes_say_so():
    """pycocotools rasterises every mask at its image's height and width: a caller's COCO without them was a
    KeyError 'height' from inside COCOeval; now a ValueError naming the image."""
    dataset, mask = _masked_dataset(sizes=False)
    result = {"image_id": 7, "category_id": 1, "score": 0.9, "segmentation": _rle(mask)}
    with pytest.raises(ValueError, match=r"image sizes: image 7 has 'height' None"):
        coco_evaluate(_gt(dataset), [result], ("segm",))
    dataset["images"][0].update(height="48", width="64")  # strings: pycocotools cannot rasterise a polygon with them
    with pytest.raises(ValueError, match=r"image 7 has 'height' '48'"):
        coco_evaluate(_gt(dataset), [result], ("segm",))
    # box metrics need no image size: COCOeval's own numbers
    boxed = {**result, "bbox": [12, 10, 28, 20]}
    del boxed["segmentation"]
    dataset["images"][0].pop("height"), dataset["images"][0].pop("width")
    assert list(coco_evaluate(_gt(dataset), [boxed], ("bbox",))["bbox"].values()) == _cocoeval(dataset, [boxed], "bbox")


@pytest.mark.parametrize("size", [[48], 48, "48", [48, 64, 1], [48, None], None, "polygon"])
def test_a_detection_mask_size_that_is_not_height_width_is_a_value_error(size):
    """A malformed 'size' was an IndexError or TypeError from the size check, a missing one (or a polygon, which
    loadRes cannot take) a KeyError or TypeError from inside pycocotools."""
    dataset, mask = _masked_dataset(sizes=True)
    seg = _rle(mask)
    if size is None:
        del seg["size"]
    elif size == "polygon":
        seg = [[12, 10, 40, 10, 40, 30, 12, 30]]
    else:
        seg["size"] = size
    with pytest.raises(ValueError, match=r"image 7 has a mask 'size' .*expected an RLE"):
        coco_evaluate(_gt(dataset), [{"image_id": 7, "category_id": 1, "score": 0.9, "segmentation": seg}], ("segm",))


def test_detection_mask_sizes_as_numpy_tuple_or_float_score_as_cocoeval_and_a_padded_mask_is_refused():
    dataset, mask = _masked_dataset(sizes=True)
    rng = np.random.default_rng(32)
    shifted = np.roll(mask, 3, axis=1) ^ (rng.random(mask.shape) < 0.05)
    results = [{"image_id": 7, "category_id": 1, "score": 0.8, "segmentation": _rle(shifted)}]
    expected = _cocoeval(dataset, results, "segm")
    assert 0 < expected[0] < 1
    for size in (np.array([48, 64]), (48, 64), [48.0, 64.0]):
        given = [{**results[0], "segmentation": {**results[0]["segmentation"], "size": size}}]
        assert list(coco_evaluate(_gt(dataset), given, ("segm",))["segm"].values()) == expected
    dataset["images"][0].update(height=48.0, width=np.int64(64))  # a caller's COCO: numbers of other types
    assert list(coco_evaluate(_gt(dataset), results, ("segm",))["segm"].values()) == expected
    padded = np.zeros((64, 64), np.uint8)
    padded[:48] = shifted
    with pytest.raises(ValueError, match=r"mask of 64 x 64 pixels, but the image is 48(\.0)? x 64"):
        coco_evaluate(_gt(dataset), [{**results[0], "segmentation": _rle(padded)}], ("segm",))


# ---------------------------------------------------------------------------------------------- what held
def test_real_world_fields_large_ids_float_areas_and_crowd_rle_read_and_score_as_cocoeval(tmp_path):
    """LVIS's (no iscrowd, category synsets and frequencies, images' negative categories) and Objects365's
    (isfake, isreflected) extra fields, ids of 2**40, a float area, a crowd region in uncompressed RLE without an
    area (pycocotools' area of it): read, and scored as COCOeval scores the same data."""
    big = 2**40
    data = _one(image={"id": big, "coco_url": "http://x/a.jpg", "neg_category_ids": [big + 1],
                       "not_exhaustive_category_ids": []},
                category={"id": big + 1, "synset": "x.n.01", "frequency": "f", "image_count": 1, "synonyms": ["x"]},
                ann={"id": big + 2, "image_id": big, "category_id": big + 1, "area": 600.25, "isfake": 0,
                     "isreflected": 0})
    del data["annotations"][0]["iscrowd"]
    crowd = np.zeros((480, 640), np.uint8)
    crowd[200:300, 100:400] = 1
    flat = crowd.flatten(order="F")
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = [int(edges[0])] + np.diff(edges).tolist()
    data["annotations"].append({"id": 3, "image_id": big, "category_id": big + 1, "bbox": [100, 200, 300, 100],
                                "iscrowd": 1, "segmentation": {"size": [480, 640], "counts": counts}})
    ann = read_coco_annotations(_file(tmp_path, data))
    assert ann.category_ids == [big + 1] and [im["id"] for im in ann.images] == [big]
    areas = [a["area"] for a in ann.dataset["annotations"]]
    assert areas == [600.25, float(crowd.sum())]
    assert [o["id"] for o in ann.objects[big]] == [big + 2]  # the crowd region is left out of training
    results = [{"image_id": big, "category_id": big + 1, "bbox": [11, 9, 20, 31], "score": 0.7},
               {"image_id": big, "category_id": big + 1, "bbox": [120, 210, 100, 50], "score": 0.9}]
    expected = _cocoeval(ann.dataset, results, "bbox")
    assert expected[0] > 0.5
    assert list(coco_evaluate(ann, results)["bbox"].values()) == expected


def test_polygons_of_a_10000_pixel_aerial_image_read_with_pycocotools_areas(tmp_path):
    """A large but real image: a polygon round the whole 10000 x 10000 image (perimeter 40000) and a 2000-point
    outline of a field (edges of a few pixels) read, with pycocotools' areas; a polygon zigzagging 1100 times across
    the image (more than 10**7 pixels of edges) is refused, naming the limit."""
    t = np.linspace(0, 2 * np.pi, 2000, endpoint=False)
    outline = np.stack([5000 + 3000 * np.cos(t), 5000 + 2000 * np.sin(3 * t) * 0.3 + 2000 * np.sin(t)], 1)
    polygons = [[0, 0, 9999, 0, 9999, 9999, 0, 9999], [round(v, 2) for v in outline.ravel().tolist()]]
    data = _one(image={"width": 10000, "height": 10000})
    data["annotations"] = [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 9999, 9999], "iscrowd": 0,
                            "segmentation": [p]} for i, p in enumerate(polygons)]
    ann = read_coco_annotations(_file(tmp_path, data))
    expected = [float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects([p], 10000, 10000)))) for p in polygons]
    assert [a["area"] for a in ann.dataset["annotations"]] == expected
    zigzag = [v for i in range(1100) for v in (i * 9, 0, i * 9 + 4, 9999)]
    data["annotations"] = [{**data["annotations"][0], "segmentation": [zigzag]}]
    with pytest.raises(ValueError, match=r"annotation 1: a polygon whose edges run 2\.2e\+07 pixels \(more than 1e\+07"):
        read_coco_annotations(_file(tmp_path, data))


# ---------------------------------------------------------------------------------------------- GroupNormAnyBatch
def _pair(groups: int, channels: int, eps: float, affine: bool, gen: torch.Generator):
    ref = nn.GroupNorm(groups, channels, eps=eps, affine=affine).double()
    if affine:
        with torch.no_grad():
            ref.weight.copy_(torch.randn(channels, generator=gen, dtype=torch.float64))
            ref.bias.copy_(torch.randn(channels, generator=gen, dtype=torch.float64))
    ours = GroupNormAnyBatch(groups, channels, eps=eps, affine=affine).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(ref.state_dict()) == (["weight", "bias"] if affine else [])
    return ref, ours


def test_group_norm_any_batch_is_group_norm_forward_and_backward_in_float64():
    gen = torch.Generator().manual_seed(32)
    for trial in range(60):
        groups = [1, 2, 4, 8][trial % 4]
        channels = groups * int(torch.randint(1, 4, (1,), generator=gen))
        shape = [int(torch.randint(1, 4, (1,), generator=gen)), channels]
        shape += [int(v) for v in torch.randint(2, 6, (trial % 4,), generator=gen)]
        ref, ours = _pair(groups, channels, [1e-5, 1e-3, 0.5][trial % 3], trial % 2 == 0, gen)
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        grad = torch.randn(shape, generator=gen, dtype=torch.float64)
        ref(a).backward(grad)
        ours(b).backward(grad)
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-12)
        if trial % 2 == 0:
            torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=0, atol=1e-12)
            torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=0, atol=1e-12)
    restored = pickle.loads(pickle.dumps(ours))
    assert type(restored) is GroupNormAnyBatch
    torch.testing.assert_close(restored(x), ours(x), rtol=0, atol=0)


def test_group_norm_any_batch_one_value_per_group_gives_the_bias_as_group_norm_does_in_a_batch_of_two():
    """Where torch refuses a batch of one (one value per group, training), ours gives what nn.GroupNorm gives the
    same image in a batch of two: x minus its own mean is 0, so the output is the bias and the input's gradient 0
    (no NaN, with the default eps)."""
    gen = torch.Generator().manual_seed(5)
    ref, ours = _pair(4, 4, 1e-5, True, gen)
    ref.train(), ours.train()
    x = torch.randn(1, 4, 1, 1, generator=gen, dtype=torch.float64)
    with pytest.raises((ValueError, RuntimeError), match="more than 1 value"):
        ref(x)
    single = x.clone().requires_grad_(True)
    out = ours(single)
    out.sum().backward()
    pair = ref(torch.cat([x, x]))
    torch.testing.assert_close(out, pair[:1], rtol=0, atol=1e-12)
    torch.testing.assert_close(out.flatten(), ref.bias.detach(), rtol=0, atol=1e-6)
    assert torch.equal(single.grad, torch.zeros_like(x))


@pytest.mark.parametrize("points", [333, 334])
def test_the_polygon_length_limit_at_its_edge_where_every_edge_runs_three_image_sides(tmp_path, points):
    """Points alternating between x = -10000 and x = 20000 (the farthest the file may place them in a 10000-pixel
    image): each edge runs 30000 pixels, so 333 edges are 9.99e6 pixels (read) and 334 are 1.002e7 (refused)."""
    polygon = [v for i in range(points) for v in ((-10000, i) if i % 2 == 0 else (20000, i))]
    data = _one(image={"width": 10000, "height": 10000}, ann={"segmentation": [polygon]})  # 'area' given: no raster
    if points * 30000 <= 10**7:
        assert read_coco_annotations(_file(tmp_path, data)).dataset["annotations"][0]["area"] == 600.0
    else:
        with pytest.raises(ValueError, match=r"edges run 1\.002e\+07 pixels \(more than 1e\+07\)"):
            read_coco_annotations(_file(tmp_path, data))
