"""A hostile user's pass on round 31's command-line changes (images on both sides of the flags, outputs that are
devices or FIFOs, empty paths): each test failed before its fix, and checks numbers computed here by hand."""

from __future__ import annotations

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_SHALLOW, save_tiny_classifier

from pvtv2 import PvtV2Config
from pvtv2.cli import main

from test_fuzz_cli31 import _probabilities


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny 3-class classifier at 32 px and images whose names look like flags."""
    root = tmp_path_factory.mktemp("hostile31b")
    model = save_tiny_classifier(root / "model")
    rng = np.random.default_rng(31)
    for name in ("one.png", "two.png", "-dash.png", "--top-k"):
        PIL.Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / name, format="PNG")
    return root, model


def _check_predictions(capsys, model, root, expected: list[tuple[str, str]]) -> None:
    """The JSON printed names the ``expected`` image words in order, each with its probabilities computed here."""
    got = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in got] == [word for word, _ in expected]
    for record, (_, name) in zip(got, expected):
        assert [p["score"] for p in record["predictions"]] == pytest.approx(_probabilities(model, root / name), abs=1e-5)


def test_images_after_the_flags_expand_tilde(classifier, capsys, monkeypatch):
    """`predict one.png --model M '~/two.png'`: a word after the flags was added to the images as typed, skipping the
    IMAGE argument's reading, so its `~` (expanded in the first run, and documented for every path argument) was
    not: "image path(s) not found: '~/two.png'"."""
    root, model = classifier
    monkeypatch.setenv("HOME", str(root))
    assert main(["predict", str(root / "one.png"), "--model", str(root / "model"), "--json", "--no-progress",
                 "--top-k", "3", "~/two.png"]) == 0
    _check_predictions(capsys, model, root, [(str(root / "one.png"), "one.png"), (str(root / "two.png"), "two.png")])


def test_an_empty_image_after_the_flags_is_refused_by_name(classifier, capsys):
    """`predict one.png --model M "$IMG"` with IMG unset: the empty word after the flags escaped the refusal an empty
    IMAGE gets in the first run ("an empty path names no file or folder"); the model was loaded and the error was
    "image path(s) not found: ''". Now argparse's own error for the argument, before any work."""
    root, _ = classifier
    with pytest.raises(SystemExit) as stop:
        main(["predict", str(root / "one.png"), "--model", str(root / "model"), "--no-progress", ""])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "pvtv2 predict: error: argument IMAGE: an empty path names no file or folder"
    assert "not found" not in err


def test_images_after_a_double_dash_follow_the_flags(classifier, capsys, monkeypatch):
    """`predict one.png --model M -- -dash.png --top-k`: `--` makes every later word an IMAGE (it did so before the
    first run: `predict --model M -- -dash.png`), but after images on both sides of the flags it was "unrecognized
    arguments: -- -dash.png --top-k". The files are named -dash.png and --top-k; --top-k after `--` is no flag,
    so the default top-k (3, every class) stays, and the order is the order typed."""
    root, model = classifier
    monkeypatch.chdir(root)
    assert main(["predict", "one.png", "--model", "model", "--json", "--no-progress", "two.png", "--", "-dash.png",
                 "--top-k"]) == 0
    _check_predictions(capsys, model, root, [(n, n) for n in ("one.png", "two.png", "-dash.png", "--top-k")])
    # An unknown flag before the `--` is still reported, with every word argparse left.
    assert main(["predict", "one.png", "--model", "model", "--topk", "2", "--", "-dash.png"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("pvtv2 predict: error: unrecognized arguments: --topk (did you mean --top-k?) 2 -- -dash.png; "
                           "see pvtv2 predict --help")


def test_detect_names_output_dir_for_a_picture_it_cannot_write(tmp_path, capsys):
    """detect --output-dir D, where D/NAME.png (the picture of NAME.png) is a FIFO or a folder: the error called it
    "--output 'D/NAME.png'", a flag the user never gave, and for a folder suggested 'D/NAME.png/out.png', a name
    detect does not take. Nothing is written, the FIFO and the folder are left as they were."""
    from pvtv2.models.detection import PvtV2ForObjectDetection

    torch.manual_seed(0)
    config = PvtV2Config(**TINY_SHALLOW, id2label={0: "x", 1: "y"}, detector="retinanet", min_size=64, max_size=96,
                         score_threshold=0.0, fpn_channels=32)
    PvtV2ForObjectDetection(config).eval().save_pretrained(tmp_path / "det")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        PIL.Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / name)
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "a.png")
    (out / "b.png").mkdir()
    argv = ["detect", str(tmp_path / "a.png"), "-m", str(tmp_path / "det"), "--no-progress", "--output-dir", str(out)]
    assert main(argv) == 2
    fifo = str(out / "a.png")
    assert capsys.readouterr().err.strip() == (
        f"pvtv2 detect: error: {fifo!r} (a picture of --output-dir {str(out)!r}) is a FIFO (named pipe), not a "
        f"regular file: it would be replaced; move it or give another --output-dir")
    assert main([*argv[:1], str(tmp_path / "b.png"), *argv[2:]]) == 2
    folder = str(out / "b.png")
    assert capsys.readouterr().err.strip() == (
        f"pvtv2 detect: error: {folder!r} (a picture of --output-dir {str(out)!r}) is a folder; move it or give "
        f"another --output-dir")
    assert (out / "a.png").is_fifo() and (out / "b.png").is_dir() and sorted(os.listdir(out)) == ["a.png", "b.png"]


@pytest.mark.parametrize("command", ["demo-seg", "demo-det"])
@pytest.mark.parametrize("seed", [-1, 2**63])
def test_demo_data_alone_checks_the_seed_as_training_does(tmp_path, capsys, command, seed):
    """demo-seg / demo-det --epochs 0 (the data alone) skipped training's check of --seed: -1 stopped in numpy with
    "expected non-negative integer" (no flag named), and 2**63 wrote data that --epochs 1, the same command
    training on it, refuses. Both are now refused with training's own message, nothing written."""
    argv = [command, "--output", str(tmp_path / "out"), "--seed", str(seed), "--train", "1", "--val", "1",
            "--no-progress"]
    assert main([*argv, "--epochs", "1"]) == 2
    training = capsys.readouterr().err.strip()
    assert training == f"pvtv2 {command}: error: --seed must be an integer in [0, 2**63-1], got {seed}"
    assert main([*argv, "--epochs", "0"]) == 2
    assert capsys.readouterr().err.strip() == training
    assert not (tmp_path / "out").exists()
