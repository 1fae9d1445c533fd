"""`pvtv2 detect`, `pvtv2 eval --task detection` and `pvtv2 demo-det`, on tiny detectors: results against the model
and torchvision called directly, COCO metrics against COCOeval run on files, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from pvtv2 import PvtV2Config  # noqa: E402
from pvtv2.data.digit_scenes import make_detection_example  # noqa: E402
from pvtv2.inference import load_detector  # noqa: E402
from pvtv2.models.detection import PvtV2ForObjectDetection  # noqa: E402

from conftest import TINY_SHALLOW, perturb_  # noqa: E402

LABELS = {i: str(i) for i in range(10)}  # the example's digits


def run_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """The command in this process (same parser, same error handling as the installed one)."""
    from pvtv2.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


def tiny_detector(folder: Path, detector: str = "retinanet", seed: int = 0) -> PvtV2ForObjectDetection:
    torch.manual_seed(seed)
    config = PvtV2Config(**TINY_SHALLOW, id2label=LABELS, detector=detector, min_size=64, max_size=96,
                         score_threshold=0.0, fpn_channels=32)
    model = perturb_(PvtV2ForObjectDetection(config), scale=0.05, seed=seed).eval()
    if detector == "retinanet":
        with torch.no_grad():  # no 1% prior: scores around 0.5, so that thresholds keep some detections
            model.detector.head.classification_head.cls_logits.bias.zero_()
    model.save_pretrained(folder)
    return model


def to_tensor(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(PIL.Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("detect")
    model = tiny_detector(root / "retinanet")
    rng = np.random.default_rng(0)
    images = []
    for i, size in enumerate([(48, 64), (70, 52), (64, 64)]):
        path = root / "images" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        images.append(path)
    return root, model, images


def test_detect_json_is_torchvisions_output_in_the_original_pixels(workspace, capsys):
    root, _, images = workspace
    # Loaded as the command loads it (weights packed for the fast path): random weights give many detections of
    # nearly equal score, whose order and NMS survivors the last float digit decides.
    model = load_detector(root / "retinanet")
    out = run_here(capsys, "detect", "--model", str(root / "retinanet"), *map(str, images), "--json",
                   "--score-threshold", "0.2", "--batch-size", "2", "--no-progress")
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert [r["image"] for r in results] == list(map(str, images))
    # torchvision's RetinaNet itself, on the same batches (a batch pads its images to a common size, which the
    # border features see)
    with torch.no_grad():
        references = model.detector([to_tensor(p) for p in images[:2]]) + model.detector([to_tensor(images[2])])
    total = 0
    for entry, path, reference in zip(results, images, references):
        image = to_tensor(path)
        keep = reference["scores"] >= 0.2
        assert (entry["width"], entry["height"]) == (image.shape[2], image.shape[1])
        got = entry["detections"]
        assert [d["index"] for d in got] == reference["labels"][keep].tolist()
        assert [d["label"] for d in got] == [LABELS[i] for i in reference["labels"][keep].tolist()]
        assert np.allclose(np.reshape([d["box"] for d in got], (-1, 4)), reference["boxes"][keep].numpy(), atol=0.01)
        assert np.allclose([d["score"] for d in got], reference["scores"][keep].numpy(), atol=1e-4)
        for d in got:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= image.shape[2] and 0 <= y1 <= y2 <= image.shape[1]  # clipped to the image
        total += len(got)
    assert total > 0  # the comparison covered detections


def test_detect_draws_one_image_or_a_folder(workspace, tmp_path, capsys):
    root, model, images = workspace
    target = tmp_path / "one.png"
    out = run_here(capsys, "detect", "-m", str(root / "retinanet"), str(images[0]), "-o", str(target),
                   "--score-threshold", "0.1", "--no-progress")
    assert out.returncode == 0, out.stderr
    drawn, original = PIL.Image.open(target), PIL.Image.open(images[0]).convert("RGB")
    assert drawn.size == original.size
    assert not np.array_equal(np.asarray(drawn), np.asarray(original))  # boxes were drawn
    assert f"-> {target}" in out.stdout
    out = run_here(capsys, "detect", "-m", str(root / "retinanet"), str(root / "images"), "--output-dir",
                   str(tmp_path / "all"), "--no-progress")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["0.png", "1.png", "2.png"]


def test_detect_mask_rcnn_draws_masks_and_counts_their_pixels(tmp_path, capsys):
    tiny_detector(tmp_path / "mask", "mask_rcnn", seed=1)
    model = load_detector(tmp_path / "mask")  # as the command loads it (see the first test)
    path = tmp_path / "im.png"
    PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(path)
    out = run_here(capsys, "detect", "-m", str(tmp_path / "mask"), str(path), "--json", "--score-threshold", "0.0",
                   "-o", str(tmp_path / "drawn.png"), "--no-progress")
    assert out.returncode == 0, out.stderr
    (entry,) = json.loads(out.stdout)
    with torch.no_grad():
        reference = model([to_tensor(path)])[0]
    assert [d["mask_pixels"] for d in entry["detections"]] == (reference["masks"][:, 0] >= 0.5).sum((1, 2)).tolist()
    assert entry["picture"] == str(tmp_path / "drawn.png") and PIL.Image.open(entry["picture"]).size == (80, 60)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "pvt_v2_b0", "IMG"], "is a preset"),
        (["--model", "MODEL", "IMG", "IMG", "-o", "x.png"], "use --output-dir"),
        (["--model", "MODEL", "IMG", "-o", "x.png", "--output-dir", "d"], "exclude each other"),
        (["--model", "MODEL", "IMG", "--score-threshold", "1.5"], "between 0 and 1"),
        (["--model", "MODEL", "missing.png"], "not found"),
        (["--model", "MODEL", "IMG", "--image-size", "8"], "at least 32"),
    ],
)
def test_detect_bad_input_is_one_line_and_status_2(workspace, capsys, args, message):
    root, _, images = workspace
    args = [a.replace("MODEL", str(root / "retinanet")).replace("IMG", str(images[0])) for a in args]
    out = run_here(capsys, "detect", *args, "--no-progress")
    assert out.returncode == 2
    assert out.stderr.startswith("pvtv2 detect: error: ") and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_detect_reports_unreadable_images_and_goes_on(workspace, tmp_path, capsys):
    root, _, images = workspace
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    out = run_here(capsys, "detect", "-m", str(root / "retinanet"), str(broken), str(images[1]), "--json", "--no-progress")
    assert out.returncode == 2
    results = json.loads(out.stdout)
    assert "error" in results[0] and "detections" in results[1]
    assert "1 of 2 image(s) could not be read" in out.stderr


# ---------------------------------------------------------------------------------------------- eval
@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return make_detection_example(tmp_path_factory.mktemp("example") / "data", n_train=2, n_val=6, size=64,
                                  backgrounds="synthetic")


def test_eval_detection_equals_cocoeval_on_files(workspace, example, tmp_path, capsys):
    root, _, _ = workspace
    model = load_detector(root / "retinanet")  # as the command loads it (see the first test)
    out = run_here(capsys, "eval", "--task", "detection", "--model", str(root / "retinanet"), "--data", str(example),
                   "--json", "--no-progress")
    assert out.returncode == 0, out.stderr
    ours = json.loads(out.stdout)
    # The reference: the model on each image, results written by hand, COCOeval on the two files.
    gt_path = example / "annotations" / "instances_val.json"
    gt = json.loads(gt_path.read_text())
    entries = []
    for image in gt["images"]:
        with torch.no_grad():
            result = model([to_tensor(example / "val" / image["file_name"])])[0]
        for (x1, y1, x2, y2), label, score in zip(result["boxes"].tolist(), result["labels"].tolist(), result["scores"].tolist()):
            entries.append({"image_id": image["id"], "category_id": label + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    (tmp_path / "results.json").write_text(json.dumps(entries))
    coco = COCO(str(gt_path))
    evaluator = COCOeval(coco, coco.loadRes(str(tmp_path / "results.json")), "bbox")
    evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    assert [ours["box"][n] for n in names] == pytest.approx(list(evaluator.stats), abs=1e-6)
    assert ours["detections"] == len(entries) > 0 and ours["images"] == 6 and "mask" not in ours


def test_eval_detection_text_and_bad_input(workspace, example, capsys):
    root, _, _ = workspace
    out = run_here(capsys, "eval", "--task", "detection", "-m", str(root / "retinanet"), "--data", str(example), "--no-progress")
    assert out.returncode == 0 and "box AP" in out.stdout and "AP50" in out.stdout
    out = run_here(capsys, "eval", "--task", "detection", "-m", str(root / "retinanet"), "--data", str(example),
                   "--runtime", "onnxruntime", "--no-progress")
    assert out.returncode == 2 and "a detector runs in PyTorch" in out.stderr
    out = run_here(capsys, "eval", "--task", "detection", "-m", str(root / "retinanet"), "--data", str(root), "--no-progress")
    assert out.returncode == 2 and "instances_val.json" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_demo_det_writes_the_example(tmp_path, capsys):
    out = run_here(capsys, "demo-det", "--output", str(tmp_path), "--train", "3", "--val", "2", "--size", "64",
                   "--backgrounds", "synthetic", "--epochs", "0")
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "data" / "annotations" / "instances_train.json").read_text())
    assert len(data["images"]) == 3 and len(list((tmp_path / "data" / "val").iterdir())) == 2
    out = run_here(capsys, "demo-det", "--output", str(tmp_path / "small"), "--size", "16")
    assert out.returncode == 2 and "--size must be between 48 and 4096, got 16" in out.stderr
    assert not (tmp_path / "small").exists()  # refused before anything is written


def test_detect_refuses_a_checkpoint_without_a_trained_detector(tmp_path, capsys):
    """A classifier's folder gives a detector whose FPN and heads are random: refused, naming them."""
    from pvtv2 import PvtV2ForImageClassification

    PvtV2ForImageClassification(PvtV2Config(**TINY_SHALLOW, id2label=LABELS)).save_pretrained(tmp_path / "classifier")
    image = tmp_path / "x.png"
    PIL.Image.new("RGB", (64, 64)).save(image)
    out = run_here(capsys, "detect", "--model", str(tmp_path / "classifier"), str(image), "--no-progress")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "has no trained detector" in out.stderr and "detector." in out.stderr


@pytest.mark.slow
def test_detect_runs_as_a_command(workspace):
    root, _, images = workspace
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "pvtv2", "detect", "-m", str(root / "retinanet"), str(images[0]),
                          "--json", "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["image"] == str(images[0])


def test_detection_picture_draws_class_coloured_boxes_and_blends_masks():
    from pvtv2.visualize import detection_picture, palette

    image = PIL.Image.fromarray(np.full((60, 80, 3), 100, dtype=np.uint8))
    mask = np.zeros((1, 60, 80), dtype=bool)
    mask[0, 30:50, 40:70] = True
    picture = np.asarray(detection_picture(image, [[40, 30, 70, 50]], [2], [0.9], LABELS, masks=mask, alpha=0.5,
                                           line_width=1))
    colour = palette(11)[3]  # class 2's colour: the palette without its first (background) entry
    assert picture.shape == (60, 80, 3)
    assert (picture[50, 55] == colour).all() and (picture[40, 70] == colour).all()  # bottom and right edges
    inside = np.round(0.5 * 100 + 0.5 * colour.astype(np.float64)).astype(np.uint8)
    assert (picture[40, 55] == inside).all()  # the mask, blended
    assert (picture[5, 5] == 100).all() and (picture[55, 10] == 100).all()  # untouched outside
    with pytest.raises(ValueError, match="one each per detection"):
        detection_picture(image, [[1, 1, 5, 5]], [0, 1], [0.5], LABELS)
