"""The command as a hostile user runs it, end to end: an interrupt that lands while an optional extension initialises,
outputs that are symbolic links, and what the user reads (predict's classes on real photographs, eval's accuracy)
against an independent computation."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch
from conftest import TINY_SMALL_IMAGES, perturb_, save_tiny_classifier

from pvtv2 import PvtV2Config, PvtV2ForImageClassification
from pvtv2.cli import main
from pvtv2.runtime import MissingDependencyError, import_optional


class _InterruptedInit(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of ``names`` fail as a pybind11 extension (onnxruntime's, onnx's) fails when a Ctrl-C or SIGTERM lands
    while it initialises: ``ImportError("initialization failed")`` raised from the interrupt (seen on onnxruntime
    1 time in 3 with SIGINT sent 0-80 ms into ``import onnxruntime``)."""

    def __init__(self, names, interrupt):
        self.names, self.interrupt = set(names), interrupt

    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name.split(".")[0] in self.names else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):  # the import itself, not a probe (torch._dynamo looks for onnxruntime)
        try:
            raise self.interrupt
        except BaseException as err:
            raise ImportError("initialization failed") from err


@pytest.fixture
def interrupted_import(monkeypatch):
    def install(*names, interrupt=None):
        for name in list(sys.modules):
            if name.split(".")[0] in names:
                monkeypatch.delitem(sys.modules, name)
        finder = _InterruptedInit(names, interrupt or KeyboardInterrupt())
        monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])

    return install


@pytest.mark.parametrize("package", ["onnxruntime", "onnx"])
def test_a_ctrl_c_while_an_onnx_package_initialises_is_an_interrupt_not_a_missing_package(tmp_path, interrupted_import,
                                                                                         capsys, package):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    save_tiny_classifier(tmp_path / "m")
    out = tmp_path / "out" / "m.onnx"
    interrupted_import(package)
    # onnx is optional to the export (its opset read-back and output declarations): the interrupt was swallowed there.
    assert main(["export", "--model", str(tmp_path / "m"), "--output", str(out), "--check-sizes", "1x32x32"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "pip install" not in err
    assert not (tmp_path / "out").exists()  # no file, no temporary file, no folder it created
    if package == "onnxruntime":
        image = tmp_path / "a.png"
        PIL.Image.new("RGB", (32, 32), (200, 10, 30)).save(image)
        assert main(["predict", "--model", str(tmp_path / "m"), str(image), "--runtime", "onnxruntime"]) == 130
        err = capsys.readouterr().err
        assert "interrupted" in err and "pip install" not in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "m"]


def test_a_sigterm_while_an_optional_package_initialises_stays_a_sigterm(interrupted_import):
    interrupted_import("onnxruntime", interrupt=SystemExit(143))
    with pytest.raises(SystemExit) as stop:
        import_optional("onnxruntime", "onnx", "the check")
    assert stop.value.code == 143
    # A package that is really missing is still said to be missing.
    with pytest.raises(MissingDependencyError, match=r"pip install 'pvtv2\[onnx\]'"):
        import_optional("pvtv2_no_such_package_35", "onnx", "the check")


def test_convert_to_a_link_to_a_checkpoint_folder_replaces_the_link_and_leaves_its_folder(tmp_path, capsys):
    source = save_tiny_classifier(tmp_path / "src")
    other = perturb_(save_tiny_classifier(tmp_path / "other"), seed=3)
    other.save_pretrained(tmp_path / "other")
    before = {p.name: p.read_bytes() for p in (tmp_path / "other").iterdir()}
    (tmp_path / "link").symlink_to(tmp_path / "other", target_is_directory=True)
    # The swap put the new folder in place, then called rmtree on the link it had moved aside: "cannot write 'link':
    # Cannot call rmtree on a symbolic link", status 2, for an output that was in fact written.
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "link")]) == 0, capsys.readouterr().err
    assert (tmp_path / "link").is_dir() and not (tmp_path / "link").is_symlink()
    assert {p.name: p.read_bytes() for p in (tmp_path / "other").iterdir()} == before  # the link's folder untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "other", "src"]  # no .link.old, no .link.tmp
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    converted = PvtV2ForImageClassification.from_pretrained(tmp_path / "link").eval()
    with torch.no_grad():
        assert torch.equal(converted(x).logits, source(x).logits)


def test_sigterm_during_an_export_stops_it_as_ctrl_c_does_leaving_no_temporary_file(tmp_path):
    pytest.importorskip("onnxruntime")
    save_tiny_classifier(tmp_path / "m")
    out = tmp_path / "out.onnx"
    out.write_bytes(b"the previous export")
    command = [sys.executable, "-m", "pvtv2", "export", "--model", str(tmp_path / "m"), "--output", str(out),
               "--exporter", "torchscript", "--check-sizes", *["2x64x96"] * 8]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            if any(p.name.startswith(".out.onnx.") for p in tmp_path.iterdir()):
                break
            time.sleep(0.002)
        assert process.poll() is None, process.stderr.read()  # the export was still under way
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    # The default action ended the process at once: status -15 and the hidden `.out.onnx.<pid>-<hex>.tmp` left.
    assert process.returncode == 143, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out.onnx"]
    assert out.read_bytes() == b"the previous export"


def _by_hand(image: PIL.Image.Image, size: int) -> torch.Tensor:
    """PIL's bilinear resize to a square, then ImageNet's normalisation: the pixels of a transformers-style
    preprocessor_config.json (resample 2) as transformers 4 computed them."""
    pixels = np.asarray(image.resize((size, size), PIL.Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
    x = (pixels - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return torch.tensor(x.transpose(2, 0, 1)[None], dtype=torch.float32)


def test_predict_on_photographs_in_every_format_is_the_model_on_pils_pixels_of_the_upright_image(tmp_path, capsys):
    """scikit-learn's two sample photographs (427x640) as JPEG, PNG, WebP, palette PNG, CMYK JPEG and a JPEG whose EXIF
    says rotate by 90 degrees, under a name with a space and a non-ASCII letter: each one's top-3 classes and
    probabilities are those of the model called on the upright image resized by PIL (bilinear) and normalised by
    hand, as the folder's preprocessor_config.json says. (transformers 5's processor resizes with torchvision, whose
    rounding differs from PIL's by one level in some pixels: 1e-3 in these probabilities.)"""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    model = perturb_(save_tiny_classifier(tmp_path / "m"), scale=0.1, seed=35)
    model.config.id2label = {i: f"class {i}" for i in range(3)}
    model.config.label2id = {f"class {i}": i for i in range(3)}
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "PvtImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    folder = tmp_path / "photos ü"
    folder.mkdir()
    for name, pixels in zip(["china", "flower"], sklearn_datasets.load_sample_images().images):
        photo = PIL.Image.fromarray(pixels)
        photo.save(folder / f"{name}.jpg", quality=90)
        photo.save(folder / f"{name} é.png")
        photo.save(folder / f"{name}.webp", quality=80)
        photo.convert("P").save(folder / f"{name}_palette.png")
        photo.convert("CMYK").save(folder / f"{name}_cmyk.jpg")
        exif = photo.getexif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
        photo.transpose(PIL.Image.Transpose.ROTATE_90).save(folder / f"{name}_exif.jpg", exif=exif, quality=90)
    assert main(["predict", "--model", str(tmp_path / "m"), str(folder), "--json", "-k", "3", "--no-progress"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 12
    scenes = {}
    for record in records:
        upright = PIL.ImageOps.exif_transpose(PIL.Image.open(record["image"])).convert("RGB")
        with torch.no_grad():
            p = model(_by_hand(upright, 32)).logits.softmax(-1)[0]
        assert [d["index"] for d in record["predictions"]] == p.argsort(descending=True).tolist()
        assert [d["label"] for d in record["predictions"]] == [f"class {i}" for i in p.argsort(descending=True)]
        assert [d["score"] for d in record["predictions"]] == pytest.approx(p.sort(descending=True).values.tolist(),
                                                                            abs=1e-5)
        scene = os.path.basename(record["image"]).split(".")[0].split("_")[0].split(" ")[0]
        scenes.setdefault(scene, set()).add(int(p.argmax()))
    assert scenes == {"china": {1}, "flower": {0}}  # each photograph one answer in every format, the two apart


def test_eval_accuracy_and_loss_are_a_hand_count_over_the_digits(tmp_path, capsys):
    from pvtv2.data.digits import write_digits_folder

    torch.manual_seed(35)
    config = PvtV2Config(**TINY_SMALL_IMAGES, id2label={i: str(i) for i in range(10)}, image_size=16)
    model = perturb_(PvtV2ForImageClassification(config).eval(), scale=0.5, seed=35)
    model.save_pretrained(tmp_path / "m")
    write_digits_folder(tmp_path / "digits", size=16, limit_per_class=12, val_fraction=0.5, seed=35)
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "digits"), "--json",
                 "--batch-size", "7", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    top1 = top5 = 0
    losses = []
    files = sorted((tmp_path / "digits" / "val").glob("*/*.png"))
    for path in files:
        with torch.no_grad():
            logits = model(_by_hand(PIL.Image.open(path).convert("RGB"), 16)).logits[0]
        label = int(path.parent.name)
        top1 += int(logits.argmax()) == label
        top5 += label in logits.topk(5).indices.tolist()
        losses.append(float(torch.nn.functional.cross_entropy(logits[None], torch.tensor([label]))))
    assert result["images"] == len(files) == 60
    assert result["top1"] == top1 / 60 and result["top5"] == top5 / 60
    assert 0 < top1 < 60  # neither all right nor all wrong: a count that can tell a mistake
    assert result["loss"] == pytest.approx(np.mean(losses), rel=1e-5)


@pytest.mark.parametrize("own", ["digits/train/3/my scan.jpg", "digits/notes.txt", "digits/val/7/0001.png/x"])
def test_demo_into_a_folder_with_its_own_digits_folder_leaves_it_alone(tmp_path, capsys, own):
    """`pvtv2 demo -o DIR` removed DIR/digits to write its copy of the digits there, whatever it held."""
    mine = tmp_path / "out" / own
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"someone's data")
    assert main(["demo", "-o", str(tmp_path / "out"), "--epochs", "1", "--no-progress"]) == 2
    assert f"holds '{tmp_path / 'out' / 'digits' / own.split('/')[1]}" in capsys.readouterr().err
    assert mine.read_bytes() == b"someone's data"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["digits"]  # no run started, nothing written


@pytest.mark.parametrize(("command", "own"), [
    ("demo-seg", {"data/train/images/00000.png": b"my image", "data/labels.json": b'{"0": "sky", "1": "cat"}'}),
    ("demo-seg", {"data/train/images/00007.png": b"my image", "data/train/images/cat.jpg": b"my photo"}),
    ("demo-det", {"data/annotations/instances_train.json": b'{"images": [], "annotations": [], "categories": []}',
                  "data/train/00000.png": b"my image"}),
])
def test_a_dense_example_is_not_written_over_a_dataset_of_ones_own(tmp_path, capsys, command, own):
    """demo-seg and demo-det write OUTPUT/data/train/images/00000.png, .../annotations/instances_train.json over files
    of those names, and demo-seg removed the numbered images past its count (00007.png of a 3-image example)."""
    pytest.importorskip("pycocotools")
    for name, content in own.items():
        (tmp_path / "out" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / name).write_bytes(content)
    assert main([command, "-o", str(tmp_path / "out"), "--epochs", "0", "--train", "3", "--val", "2"]) == 2
    assert "refusing to write the example over it" in capsys.readouterr().err
    assert {str(p.relative_to(tmp_path / "out")): p.read_bytes() for p in (tmp_path / "out").rglob("*")
            if p.is_file()} == own
    if any(name.endswith(".json") for name in own):  # a dataset's own labels: not the example's, --overwrite or not
        assert main([command, "-o", str(tmp_path / "out"), "--epochs", "0", "--train", "3", "--overwrite"]) == 2
        assert "is not the" in capsys.readouterr().err
        assert {str(p.relative_to(tmp_path / "out")): p.read_bytes() for p in (tmp_path / "out").rglob("*")
                if p.is_file()} == own
    # An earlier example in the same folder is still written over, as the command always did.
    fresh = tmp_path / "fresh"
    assert main([command, "-o", str(fresh), "--epochs", "0", "--train", "3", "--val", "2"]) == 0
    assert main([command, "-o", str(fresh), "--epochs", "0", "--train", "2", "--val", "2"]) == 0


@pytest.mark.parametrize("command", ["visualize", "segment", "depth", "detect"])
def test_a_picture_is_not_written_over_the_image_it_is_drawn_from(tmp_path, capsys, command):
    """`pvtv2 visualize photo.png --output photo.png` replaced the photograph with its attention picture (segment,
    depth and detect the same); refused before the model is read (here a path that holds none)."""
    image = tmp_path / "photo.png"
    PIL.Image.new("RGB", (40, 30), (10, 200, 30)).save(image)
    before = image.read_bytes()
    (tmp_path / "link.png").symlink_to(image)
    for output in (image, tmp_path / "." / "photo.png", tmp_path / "link.png"):
        assert main([command, "--model", str(tmp_path / "no model"), str(image), "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert f"is the input image {str(image)!r}: the picture would replace it" in err, err
        assert image.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.png", "photo.png"]


def test_detect_output_dir_that_holds_the_images_does_not_draw_over_them(tmp_path, capsys):
    """detect --output-dir names each picture after its image (`photo.png` -> DIR/photo.png): the images' own folder
    as --output-dir replaced each PNG photograph with its drawing."""
    pytest.importorskip("torchvision")
    from test_detect_cli import tiny_detector

    tiny_detector(tmp_path / "detector")
    photos = tmp_path / "photos"
    photos.mkdir()
    PIL.Image.new("RGB", (64, 48), (10, 200, 30)).save(photos / "a.png")
    PIL.Image.new("RGB", (64, 48), (200, 20, 30)).save(photos / "b.jpg")
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    assert main(["detect", "--model", str(tmp_path / "detector"), str(photos), "--output-dir", str(photos),
                 "--no-progress"]) == 2
    assert f"is the input image {str(photos / 'a.png')!r}" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before  # b.png was not drawn either
