"""Defects found by a seeded random search over the command line's flags and values (round 31), each held here
against a value computed independently of the code under test."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_SMALL_IMAGES, save_tiny_classifier

from pvtv2 import PvtV2Config
from pvtv2.cli import main


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny 3-class classifier at 32 px and two images in two places."""
    root = tmp_path_factory.mktemp("fuzz31")
    model = save_tiny_classifier(root / "model")
    rng = np.random.default_rng(0)
    (root / "more").mkdir()
    images = [root / "one.png", root / "more" / "two.png"]
    for path in images:
        PIL.Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return root, model, images


def _probabilities(model, path) -> list[float]:
    """By hand: resize to 32 (already), ImageNet statistics, softmax of the logits."""
    pixels = np.asarray(PIL.Image.open(path).convert("RGB"), dtype=np.float32) / 255
    pixels = (pixels - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    with torch.no_grad():
        logits = model(torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None]).logits
    return sorted(torch.softmax(logits, -1)[0].tolist(), reverse=True)


@pytest.mark.parametrize("command", ["predict", "detect"])
def test_images_on_both_sides_of_the_flags(classifier, capsys, command):
    """`pvtv2 predict a.png --model M more/` (images before and after the flags) was refused with "unrecognized
    arguments: more/": argparse takes one run of IMAGE words and the error called a valid image folder unknown.
    detect has the same positional list (its model here is no detector: the words must reach the model check)."""
    root, model, images = classifier
    argv = [command, str(images[0]), "--model", str(root / "model"), str(root / "more"), "--no-progress", "--json"]
    if command == "detect":
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "unrecognized" not in err and "has no trained detector" in err
        return
    assert main([*argv, "--top-k", "3"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in got] == [str(images[0]), str(images[1])]
    for record, path in zip(got, images):
        assert [p["score"] for p in record["predictions"]] == pytest.approx(_probabilities(model, path), abs=1e-5)
    # A real unknown flag among them is still named, with its nearest spelling.
    assert main([command, str(images[0]), "--model", str(root / "model"), str(images[1]), "--topk", "2"]) == 2
    assert "unrecognized arguments: " in capsys.readouterr().err


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    from pvtv2 import PvtV2ForSemanticSegmentation

    root = tmp_path_factory.mktemp("fuzz31seg")
    torch.manual_seed(0)
    model = PvtV2ForSemanticSegmentation(PvtV2Config(**TINY_SMALL_IMAGES, id2label={0: "a", 1: "b"}, image_size=64))
    model.eval().save_pretrained(root / "model")
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 255, (96, 96, 3), dtype=np.uint8))
    image.save(root / "in.png")
    return root, model, image


def test_slide_crop_alone_takes_a_stride_that_fits_it(segmenter, tmp_path, capsys):
    """`segment --mode slide --crop 64` was refused: "--stride must be between 1 and 64, got 341", a stride the user
    never gave (the default of 512 windows). The default is now two thirds of the crop (341 for 512, unchanged):
    here 42, the windows of mmsegmentation's slide_inference at 0, 32 (the last moved back inside 96)."""
    from pvtv2.inference import predict_segmentation, window_starts

    root, model, image = segmenter
    assert window_starts(96, 64, 42) == [0, 32]
    out = tmp_path / "s.png"
    assert main(["segment", str(root / "in.png"), "-m", str(root / "model"), "-o", str(out), "--size", "96",
                 "--mode", "slide", "--crop", "64"]) == 0
    counts = json.loads(capsys.readouterr().out.split("pixels per class: ", 1)[1])
    expected = predict_segmentation(model, image, (96, 96), mode="slide", crop=64, stride=42)
    assert counts == {model.config.id2label[int(c)]: int((expected == c).sum()) for c in np.unique(expected)}
    assert out.stat().st_size > 0


@pytest.mark.parametrize("argv_tail, named", [
    (["--crop", "100"], "--crop"), (["--stride", "7"], "--stride"), (["--crop", "64", "--stride", "8"], "--crop, --stride"),
])
def test_window_flags_without_slide_mode_are_refused(segmenter, classifier, tmp_path, capsys, argv_tail, named):
    """--crop / --stride with whole-image inference (segment's default mode, eval --task segmentation without
    --mode slide, eval of a classifier) were dropped without a word: the output was the whole-image one, under flags
    that asked for windows."""
    root, _, _ = segmenter
    out = tmp_path / "s.png"
    assert main(["segment", str(root / "in.png"), "-m", str(root / "model"), "-o", str(out), *argv_tail]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"pvtv2 segment: error: {named} appl{'ies' if ',' not in named else 'y'} to " \
                                        "--mode slide only (--mode whole predicts the image at once)"
    assert not out.exists()
    croot, _, _ = classifier
    assert main(["eval", "--model", str(croot / "model"), "--data", str(croot), *argv_tail]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pvtv2 eval: error: {named} appl{'ies' if ',' not in named else 'y'} to --task segmentation only"]


def test_a_picture_is_not_renamed_over_a_fifo(segmenter, classifier, tmp_path, capsys):
    """`segment ... -o PATH` where PATH is a FIFO (or a device: `-o /dev/null`, which root may replace) wrote the
    picture to a temporary sibling and renamed it over PATH: the pipe, or the system's /dev/null, became a PNG file.
    It is refused before any work, and the writer itself (atomic_write) refuses too."""
    import os
    import stat

    from pvtv2.fileio import WriteError, atomic_write

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    root, _, _ = segmenter
    croot, _, images = classifier
    for argv in (["segment", str(root / "in.png"), "-m", str(root / "model")],
                 ["visualize", str(images[0]), "-m", str(croot / "model"), "--size", "32", "--panel-size", "32"],
                 ["detect", str(images[0]), "-m", str(croot / "model")]):
        assert main([*argv, "-o", str(fifo)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        expected = (f"pvtv2 {argv[0]}: error: --output {str(fifo)!r} is a FIFO (named pipe), not a regular file: "
                    "it would be replaced; give a file name")
        assert err == [expected], argv
        assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    with pytest.raises(WriteError, match="it is a FIFO"):
        atomic_write(fifo, lambda tmp: tmp.write_bytes(b"x"))
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and sorted(os.listdir(tmp_path)) == ["pipe.png"]


def test_detect_output_dir_that_is_a_file_is_refused_before_any_work(classifier, tmp_path, capsys):
    """`detect --output-dir FILE` ran the detector, then failed with a bare "[Errno 17] File exists: 'FILE'". The
    model here is no detector: the refusal must come first, before the model is read."""
    _, _, images = classifier
    afile = tmp_path / "taken"
    afile.write_text("keep")
    assert main(["detect", str(images[0]), "-m", str(tmp_path / "no-such-model"), "--output-dir", str(afile)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"pvtv2 detect: error: --output-dir {str(afile)!r} is a file, not a folder"]
    assert afile.read_text() == "keep"


@pytest.mark.parametrize("argv", [
    ["demo-seg", "--output", "", "--train", "1", "--val", "1", "--size", "32", "--no-progress"],
    ["detect", "IMG", "--model", "MODEL", "--output-dir", ""],
    ["detect", "IMG", "--model", "MODEL", "--output", ""],
    ["convert", "MODEL", ""],
    ["predict", "", "--model", "MODEL"],
])
def test_an_empty_path_is_refused_by_name(classifier, tmp_path, monkeypatch, capsys, argv):
    """An empty path (`-o "$OUT"` with OUT unset) meant the current folder: demo-seg wrote its example there (exit 0),
    convert tried to replace it, and detect took an empty --output / --output-dir as none given and drew nothing, all
    without a word. It is refused as argparse refuses a bad value, naming the argument, and nothing is written."""
    root, _, images = classifier
    argv = [{"IMG": str(images[0]), "MODEL": str(root / "model")}.get(a, a) for a in argv]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    flag = argv[argv.index("") - 1] if argv.index("") > 1 and argv[argv.index("") - 1].startswith("-") else None
    name = {"--output": "--output/-o", None: "OUT" if argv[0] == "convert" else "IMAGE"}.get(flag, flag)
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"pvtv2 {argv[0]}: error: argument {name}: an empty path names no file or folder")
    assert list(tmp_path.iterdir()) == []


def test_eval_json_reports_windows_only_when_it_slid(tmp_path, capsys):
    """`eval --task segmentation --json` in whole mode reported "crop": 512, "stride": 341, windows it never used.
    In slide mode the crop given and the stride it implies (two thirds: 21 for 32) are reported, and the scores are
    the slide predictions' (pixel accuracy computed here from predict_segmentation)."""
    from pvtv2 import PvtV2ForSemanticSegmentation
    from pvtv2.data.shapes import make_segmentation_example
    from pvtv2.inference import predict_segmentation

    data = make_segmentation_example(tmp_path / "shapes", n_train=1, n_val=2, size=48, seed=3)
    names = {int(k): v for k, v in json.loads((data / "labels.json").read_text()).items()}
    torch.manual_seed(0)
    model = PvtV2ForSemanticSegmentation(PvtV2Config(**TINY_SMALL_IMAGES, id2label=names, image_size=48)).eval()
    model.save_pretrained(tmp_path / "model")
    base = ["eval", "--task", "segmentation", "-m", str(tmp_path / "model"), "--data", str(data), "--json",
            "--no-progress"]
    assert main(base) == 0
    whole = json.loads(capsys.readouterr().out)
    assert (whole["mode"], whole["crop"], whole["stride"]) == ("whole", None, None)
    assert main([*base, "--mode", "slide", "--crop", "32"]) == 0
    slide = json.loads(capsys.readouterr().out)
    assert (slide["mode"], slide["crop"], slide["stride"]) == ("slide", 32, 21)
    right = total = 0
    for image_path in sorted((data / "val" / "images").iterdir()):
        mask = np.asarray(PIL.Image.open(data / "val" / "masks" / image_path.name))
        predicted = predict_segmentation(model, PIL.Image.open(image_path).convert("RGB"), (48, 48), mode="slide",
                                         crop=32, stride=21)
        labelled = mask != 255
        right += int((predicted[labelled] == mask[labelled]).sum())
        total += int(labelled.sum())
    assert slide["pixel_accuracy"] == pytest.approx(right / total, abs=1e-9)


@pytest.mark.parametrize("flag, value, low, high", [("--val", "2147483648", 1, 1_000_000),
                                                    ("--train", "1000001", 1, 1_000_000),
                                                    ("--size", "4097", 32, 4096)])
def test_demo_seg_bounds_its_example_as_demo_det_does(tmp_path, capsys, flag, value, low, high):
    """`demo-seg --val 2147483648` set about writing two billion image pairs (the search's 120 s limit stopped it
    with its folder half full); demo-det bounds the same flags. Refused before anything is written."""
    out = tmp_path / "demo"
    argv = ["demo-seg", "--output", str(out), "--train", "2", "--val", "1", "--size", "32", "--no-progress"]
    assert main([*argv, flag, value]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"pvtv2 demo-seg: error: {flag} must be between {low} and {high}, got {value}"]
    assert not out.exists()


@pytest.mark.parametrize("argv", [["detect", "IMG"], ["eval", "--task", "detection", "--data", "DATA"]])
def test_detector_on_the_meta_device_is_one_line(classifier, tmp_path, capsys, argv):
    """`detect --device meta` printed torch.autocast's traceback ("unsupported autocast device_type 'meta'") with
    status 1, where predict, eval, segment and depth refuse the meta device in one line, as documented. Refused
    before the model is read (the folder here holds no detector)."""
    root, _, images = classifier
    argv = [{"IMG": str(images[0]), "DATA": str(tmp_path)}.get(a, a) for a in argv]
    assert main([*argv, "--model", str(root / "model"), "--device", "meta", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"pvtv2 {argv[0]}: error: device 'meta' holds shapes without data: a model there cannot compute anything; "
        "use cpu, cuda or cuda:N")
