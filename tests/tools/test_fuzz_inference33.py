"""A seeded differential slice of the classification data and inference pipeline.

Image folders: ``scan_split`` on random trees (nested and hidden folders, extension case, unicode and space names,
links to files and folders, dangling links, files that are not images under image extensions, empty classes)
against the documented reading written out here and against torchvision's ``ImageFolder``: every class both have
gets the same index, or a warning says why not. ``pvtv2 predict`` / ``eval`` on random tiny models (pvtv2's
save_pretrained, transformers' folders with and without transformers' own preprocessor_config.json, timm files) and
random images (modes L, LA, P with and without transparency, RGBA, CMYK, I;16, EXIF orientations; batch sizes that do
not divide the count; any ``--top-k``): the JSON and the text output agree with each other and with a hand
computation (PIL's decoded pixels made RGB by hand, the documented resize written out, transformers' or timm's own
float64 model, softmax, top-k, accuracy and loss in NumPy).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from pvtv2 import PvtV2Config, PvtV2ForImageClassification
from pvtv2.cli import main
from pvtv2.data.folders import find_image_files, scan_split
from pvtv2.data.processing import IMAGE_EXTENSIONS

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
ORIENTATION = {2: [PIL.Image.Transpose.FLIP_LEFT_RIGHT], 3: [PIL.Image.Transpose.ROTATE_180],
               4: [PIL.Image.Transpose.FLIP_TOP_BOTTOM], 5: [PIL.Image.Transpose.TRANSPOSE],
               6: [PIL.Image.Transpose.ROTATE_270], 7: [PIL.Image.Transpose.TRANSVERSE],
               8: [PIL.Image.Transpose.ROTATE_90]}
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".gif": "GIF", ".tif": "TIFF",
           ".tiff": "TIFF", ".webp": "WEBP", ".ppm": "PPM"}


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------------------ image folders
def _small_image(path: Path, rng: np.random.Generator) -> None:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        path.write_bytes(b"not an image")
        return
    pixels = rng.integers(0, 256, (int(rng.integers(4, 12)), int(rng.integers(4, 12)), 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path, format=fmt)


def _random_tree(root: Path, rng: np.random.Generator) -> list[str]:
    """root/train with random classes; returns notes on the links it made."""
    split, outside = root / "train", root / "outside"
    split.mkdir(parents=True)
    (outside / "sub").mkdir(parents=True)
    _small_image(outside / "o.png", rng)
    _small_image(outside / "sub" / "s.png", rng)
    names = ["cat", "Dog", "dog", "a b", "café", "日本", "-x", "1", "10", "2", "a.b", "Zeta", "e\u0301"]
    notes = []
    classes = list(rng.choice(names, size=int(rng.integers(1, 6)), replace=False))
    if rng.random() < 0.25:
        classes.append(".hidden")
    for name in classes:
        folder = split / name
        if rng.random() < 0.08:
            folder.symlink_to(outside, target_is_directory=True)
            continue
        folder.mkdir()
        for i in range(int(rng.integers(0, 5))):
            ext = str(rng.choice([".png", ".PNG", ".PnG", ".jpg", ".JPG", ".jpeg", ".bmp", ".gif", ".tif", ".TIFF",
                                  ".webp", ".ppm", ".txt", "", ".png.bak"]))
            path = folder / f"{rng.choice(['', '.', 'x ', 'é'])}{i}{ext}"
            if rng.random() < 0.1 and ext.lower() in FORMATS:
                path.write_bytes(b"garbage" * 5)
            else:
                _small_image(path, rng)
        if rng.random() < 0.3:
            sub = folder / str(rng.choice(["sub", ".hid", "a-x", "nested dir"]))
            sub.mkdir()
            _small_image(sub / f"n{rng.choice(['.png', '.JPG'])}", rng)
        if rng.random() < 0.12:
            (folder / "linkdir").symlink_to(outside, target_is_directory=True)
            notes.append("linked folder")
        if rng.random() < 0.12:
            (folder / "link.png").symlink_to(outside / "o.png")
        if rng.random() < 0.12:
            (folder / "dangling.png").symlink_to(root / "gone.png")
            notes.append("dangling")
    return notes


def _readable(path: str) -> bool:
    try:
        with PIL.Image.open(path) as image:
            image.load()
        return True
    except (OSError, ValueError, SyntaxError):
        return False


def _documented_reading(split: Path, verify: bool) -> tuple[list[str], list[tuple[str, int]]]:
    """scan_split's docstrings, written out: classes are the sorted non-hidden folders (links to folders followed);
    their images are the files (links to files followed, dangling links listed) with an extension of
    IMAGE_EXTENSIONS in any case, walked without following folder links, sorted by path parts; with ``verify`` the
    ones PIL cannot read are left out."""
    classes = sorted(e for e in os.listdir(split) if not e.startswith(".") and os.path.isdir(split / e))
    samples = []
    for label, name in enumerate(classes):
        found = []
        for folder, _, files in os.walk(split / name):
            for file in files:
                path = os.path.join(folder, file)
                ext = os.path.splitext(file)[1]
                if ext.lower() in IMAGE_EXTENSIONS and (os.path.isfile(path) or os.path.islink(path)):
                    found.append(path)
        samples += [(p, label) for p in sorted(found, key=lambda p: Path(p).parts) if not verify or _readable(p)]
    return classes, samples


@pytest.mark.parametrize("seed", range(24))
def test_seeded_folders_against_the_documented_reading_and_torchvision(tmp_path, seed, caplog):
    from torchvision.datasets import ImageFolder

    rng = np.random.default_rng(seed)
    notes = _random_tree(tmp_path, rng)
    split = tmp_path / "train"
    try:
        theirs = ImageFolder(str(split), loader=lambda p: p).classes
    except (FileNotFoundError, OSError):  # torchvision refuses an empty class (a hidden one too)
        theirs = None
    for verify in (True, False):
        caplog.clear()
        classes, samples = _documented_reading(split, verify)
        empty = not classes or {label for _, label in samples} != set(range(len(classes)))
        with caplog.at_level(logging.WARNING, logger="pvtv2"):
            if empty:
                with pytest.raises(ValueError, match="no class folders|contain no readable images"):
                    scan_split(tmp_path, "train", verify=verify)
                continue
            got = scan_split(tmp_path, "train", verify=verify)
        assert got == (classes, samples)
        warned = " ".join(r.getMessage() for r in caplog.records)
        if theirs is not None and any(theirs.index(c) != i for i, c in enumerate(classes)):
            assert "hidden folder" in warned  # a class index other than torchvision's is said
        if "linked folder" in notes:
            assert "not following" in warned
        if "dangling" in notes and verify:
            assert "dangling.png (No such file or directory)" in warned


def test_a_hidden_class_folder_is_left_out_with_a_warning(tmp_path, caplog):
    """torchvision numbers `.ipynb_checkpoints` as class 0 and `cat`, `dog` as 1, 2; pvtv2 leaves it out (documented)
    and now says so: before, the indices differed from torchvision's without a word."""
    from torchvision.datasets import ImageFolder

    rng = np.random.default_rng(0)
    for name in (".ipynb_checkpoints", "cat", "dog"):
        (tmp_path / "train" / name).mkdir(parents=True)
        _small_image(tmp_path / "train" / name / "a.png", rng)
    assert ImageFolder(str(tmp_path / "train")).classes == [".ipynb_checkpoints", "cat", "dog"]
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        classes, _ = scan_split(tmp_path, "train")
    assert classes == ["cat", "dog"]
    assert "hidden folder(s) ['.ipynb_checkpoints']" in caplog.text and "ImageFolder" in caplog.text


def test_links_that_leave_images_out_are_named(tmp_path, caplog):
    """A linked folder inside a class is not followed (a loop could recurse forever) and a dangling link is no image:
    both were left out without a word; now the folder is named in a warning and the link is read and named as
    unreadable (skipped with verify, an error naming it in evaluation)."""
    rng = np.random.default_rng(1)
    cat = tmp_path / "train" / "cat"
    cat.mkdir(parents=True)
    _small_image(cat / "a.png", rng)
    (tmp_path / "elsewhere").mkdir()
    _small_image(tmp_path / "elsewhere" / "b.png", rng)
    (cat / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (cat / "gone.png").symlink_to(tmp_path / "nothing.png")
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        files, unlisted = find_image_files(cat)
    assert files == [cat / "a.png", cat / "gone.png"] and unlisted == []
    assert "not following 1 symbolic link(s) to folders" in caplog.text and str(cat / "more") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        _, samples = scan_split(tmp_path, "train")
    assert samples == [(str(cat / "a.png"), 0)]
    assert f"{cat / 'gone.png'} (No such file or directory)" in caplog.text
    with pytest.raises(FileNotFoundError, match="gone.png.*dangling symlink"):
        from pvtv2.data.processing import load_image

        load_image(scan_split(tmp_path, "train", verify=False)[1][1][0])


# ------------------------------------------------------------------------------------------------ predict and eval
MODES = ["RGB", "L", "LA", "P", "Pt", "RGBA", "CMYK", "I;16", "RGBexif", "Lexif"]


def _random_image(stem: Path, rng: np.random.Generator) -> Path:
    mode = str(rng.choice(MODES))
    h, w = int(rng.integers(5, 70)), int(rng.integers(5, 70))
    pixels = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    options: dict = {}
    if mode.endswith("exif"):
        image = PIL.Image.fromarray(pixels[..., :3]).convert(mode[:-4])
        exif = PIL.Image.Exif()
        exif[0x0112] = int(rng.integers(1, 9))
        options["exif"] = exif.tobytes()
        ext = str(rng.choice([".jpg", ".png", ".JPEG"]))
    elif mode == "LA":
        image, ext = PIL.Image.fromarray(pixels[..., :2], "LA"), ".png"
    elif mode == "RGBA":
        image, ext = PIL.Image.fromarray(pixels, "RGBA"), str(rng.choice([".png", ".webp", ".tif"]))
    elif mode in ("P", "Pt"):
        image = PIL.Image.fromarray(pixels[..., :3]).quantize(int(rng.integers(2, 40)))
        ext = str(rng.choice([".png", ".gif"]))
        if mode == "Pt":
            options["transparency"] = int(rng.integers(0, 2))
    elif mode == "CMYK":
        image, ext = PIL.Image.fromarray(pixels, "CMYK"), ".tiff"
    elif mode == "I;16":
        image, ext = PIL.Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16)), ".png"
    else:
        image, ext = PIL.Image.fromarray(pixels[..., :3]), str(rng.choice([".png", ".bmp", ".jpg", ".ppm", ".webp"]))
    if ext == ".webp":
        options["lossless"] = True
    path = stem.with_name(stem.name + ext)
    image.save(path, **options)
    return path


def _upright_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8: PIL's decoded data made RGB by hand (alpha dropped, a transparent palette entry white, 16 bits
    as round(v / 257), CMYK as PIL's multiply), then the EXIF orientation applied."""
    with PIL.Image.open(path) as image:
        image.load()
        orientation, mode = image.getexif().get(0x0112, 1), image.mode
        data = np.asarray(image)
        if mode == "P":
            rgb = np.asarray(image.getpalette("RGB"), dtype=np.uint8).reshape(-1, 3)[data]
            key = image.info.get("transparency")
            if isinstance(key, int):
                rgb[data == key] = 255
        elif mode.startswith("I"):
            rgb = np.repeat(np.floor(data.astype(np.int64) / 257 + 0.5).astype(np.uint8)[..., None], 3, -1)
        elif mode in ("L", "LA"):
            rgb = np.repeat((data if mode == "L" else data[..., 0])[..., None], 3, -1)
        elif mode == "CMYK":
            t = (255 - data[..., :3].astype(np.int64)) * (255 - data[..., 3:].astype(np.int64)) + 128
            rgb = ((t + (t >> 8)) >> 8).astype(np.uint8)
        else:
            rgb = data[..., :3]
    picture = PIL.Image.fromarray(np.ascontiguousarray(rgb))
    for step in ORIENTATION.get(orientation, []):
        picture = picture.transpose(step)
    return np.asarray(picture)


def _normalise(rgb: np.ndarray, mean=MEAN, std=STD) -> np.ndarray:
    return ((rgb.astype(np.float64) / 255 - np.asarray(mean)) / np.asarray(std)).transpose(2, 0, 1)


def _random_model(root: Path, rng: np.random.Generator):
    """(source, float64 reference logits function, id2label, preprocessing rgb -> (3, h, w) float64)."""
    import transformers

    kind = str(rng.choice(["pvtv2", "transformers", "transformers+processor", "timm"]))
    k = int(rng.integers(2, 8))
    names = ["cat", "dog", "a b", "café", "日本語", "x-1", "Zebra", "zebra", "tabby cat", "9", "10"]
    generic = rng.random() < 0.3
    id2label = {i: f"LABEL_{i}" if generic else str(n) for i, n in enumerate(rng.choice(names, k, replace=False))}
    shape = dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 2, 3, 4],
                 mlp_ratios=[2, 2, 2, 2])
    torch.manual_seed(int(rng.integers(1 << 30)))
    if kind == "timm":
        timm = pytest.importorskip("timm")
        from safetensors.torch import save_file

        model = timm.create_model("pvt_v2_b0", num_classes=k, depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32),
                                  num_heads=(1, 2, 3, 4), mlp_ratios=(2, 2, 2, 2))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        source = root / "timm.safetensors"
        save_file(model.state_dict(), source)
        model = model.double().eval()
        cfg = timm.data.resolve_data_config({}, model=model)  # timm's eval transform: resize shorter side, crop
        side, resize = cfg["input_size"][1], math.floor(cfg["input_size"][1] / cfg["crop_pct"])

        def timm_pre(rgb):
            h, w = rgb.shape[:2]
            nh, nw = (int(resize * h / w), resize) if w <= h else (resize, int(resize * w / h))
            big = np.asarray(PIL.Image.fromarray(rgb).resize((nw, nh), PIL.Image.Resampling.BICUBIC))
            top, left = round((nh - side) / 2), round((nw - side) / 2)
            return _normalise(big[top:top + side, left:left + side], cfg["mean"], cfg["std"])

        return source, model, {i: f"LABEL_{i}" for i in range(k)}, timm_pre
    h = int(rng.choice([32, 40, 48]))
    w = h if rng.random() < 0.7 else int(rng.choice([32, 40, 48]))
    config = dict(shape, id2label=id2label, image_size=[h, w] if h != w else h)
    if kind == "pvtv2":
        model = PvtV2ForImageClassification(PvtV2Config(**config))
    else:
        model = transformers.PvtV2ForImageClassification(
            transformers.PvtV2Config(**config, label2id={v: i for i, v in id2label.items()}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    source = root / kind
    model.save_pretrained(source)
    reference = transformers.PvtV2ForImageClassification.from_pretrained(source, dtype=torch.float64).eval()
    mean, std, resample = MEAN, STD, PIL.Image.Resampling.BILINEAR
    if kind == "transformers+processor":  # transformers' own processor writes the checkpoint's preprocessing
        h, w, resample = int(rng.choice([32, 40, 56])), int(rng.choice([32, 40, 56])), int(rng.choice([2, 3]))
        mean, std = rng.uniform(0.2, 0.7, 3).round(3).tolist(), rng.uniform(0.1, 0.4, 3).round(3).tolist()
        transformers.PvtImageProcessorPil(size={"height": h, "width": w}, resample=resample, image_mean=mean,
                                          image_std=std).save_pretrained(source)

    def plain(rgb):
        return _normalise(np.asarray(PIL.Image.fromarray(rgb).resize((w, h), resample)), mean, std)

    return source, (lambda x: reference(x).logits), id2label, plain


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# one model of each kind: pvtv2, timm, transformers with and without its own preprocessor_config.json
@pytest.mark.parametrize("seed", range(4))
def test_seeded_predict_and_eval_against_a_hand_computation(tmp_path, capsys, seed):
    rng = np.random.default_rng(1000 + seed)
    source, reference, id2label, preprocess = _random_model(tmp_path, rng)
    k = len(id2label)
    (tmp_path / "images" / "sub dir").mkdir(parents=True)
    folder_images = [_random_image(tmp_path / "images" / str(rng.choice(["", "sub dir"])) / f"{n} é{i}", rng)
                     for i, n in enumerate(rng.choice(["a", "b b", "Z"], int(rng.integers(2, 7))))]
    loose = [_random_image(tmp_path / f"loose {i}", rng) for i in range(int(rng.integers(0, 3)))]
    args = [str(p) for p in loose] + [str(tmp_path / "images")]
    expected_order = [Path(p) for p in loose] + sorted(folder_images, key=lambda p: p.parts)
    top_k, batch = int(rng.integers(1, k + 3)), int(rng.integers(2, 5))
    flags = ["--model", str(source), "--top-k", str(top_k), "--batch-size", str(batch), "--no-progress"]
    code, out, err = run_cli(capsys, "predict", *args, *flags, "--json")
    assert code == 0, err
    got = json.loads(out)
    assert [Path(item["image"]) for item in got] == expected_order
    with torch.no_grad():
        logits = np.stack([reference(torch.from_numpy(preprocess(_upright_rgb(p)))[None]).numpy()[0]
                           for p in expected_order])
    probabilities = _softmax(logits)
    for item, p in zip(got, probabilities):
        indices = [e["index"] for e in item["predictions"]]
        assert indices == np.argsort(-p, kind="stable")[:min(top_k, k)].tolist()
        np.testing.assert_allclose([e["score"] for e in item["predictions"]], p[indices], rtol=0, atol=2e-5)
        assert [e["label"] for e in item["predictions"]] == [id2label[i] for i in indices]
    # the text output: the same images, labels and scores (to its two decimals of a percent)
    code, text, err = run_cli(capsys, "predict", *args, *flags)
    assert code == 0, err
    rows = []
    for line in text.splitlines():
        if line.startswith("  "):
            score, label = line.strip().split("%  ", 1)
            rows[-1][1].append((score.strip(), label))
        else:
            rows.append((line, []))
    assert rows == [(item["image"], [(f"{e['score'] * 100:.2f}", e["label"]) for e in item["predictions"]])
                    for item in got]

    # eval: class folders named after some of the labels (all of them, sorted, for generic ones)
    chosen = sorted(rng.choice(k, size=k if id2label[0] == "LABEL_0" else int(rng.integers(1, k + 1)), replace=False))
    split = tmp_path / "data" / ("val" if rng.random() < 0.5 else "")
    samples = []
    for index in chosen:
        (split / id2label[index]).mkdir(parents=True)
        count = int(rng.integers(1, 4))
        samples += [(_random_image(split / id2label[index] / str(j), rng), index) for j in range(count)]
    eflags = ["--model", str(source), "--data", str(tmp_path / "data"), "--batch-size", str(batch), "--no-progress"]
    code, out, err = run_cli(capsys, "eval", *eflags, "--json")
    assert code == 0, err
    result = json.loads(out)
    with torch.no_grad():
        logits = np.stack([reference(torch.from_numpy(preprocess(_upright_rgb(p)))[None]).numpy()[0]
                           for p, _ in samples])
    labels = np.array([label for _, label in samples])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :min(5, k)]
    log_p = np.log(_softmax(logits))
    assert (result["images"], result["classes"], result["top5_k"]) == (len(samples), len(chosen), min(5, k))
    assert result["top1"] == pytest.approx(float((top[:, 0] == labels).mean()), abs=1e-12)
    assert result["top5"] == pytest.approx(float((top == labels[:, None]).any(1).mean()), abs=1e-12)
    assert result["loss"] == pytest.approx(float(-log_p[np.arange(len(labels)), labels].mean()), rel=1e-4, abs=1e-6)
    code, text, err = run_cli(capsys, "eval", *eflags)
    assert code == 0, err
    assert text.splitlines()[1:4] == [f"  top-1 accuracy  {result['top1']:.2%}",
                                      f"  top-{min(5, k)} accuracy  {result['top5']:.2%}",
                                      f"  mean loss       {result['loss']:.4f}"]


def test_predict_prints_a_file_name_that_is_not_utf8_as_its_bytes(tmp_path, monkeypatch):
    """A name of non-UTF-8 bytes under a strict UTF-8 stdout (PYTHONIOENCODING=utf-8, or a UTF-8 locale other than
    C's): the text output stopped at it with "'utf-8' codec can't encode character '\\udcff'" (exit 2) and every
    result was lost; now the name goes out as its bytes and the others follow. JSON escapes it and is unchanged."""
    from conftest import save_tiny_classifier

    save_tiny_classifier(tmp_path / "model")
    rng = np.random.default_rng(2)
    images = tmp_path / "images"
    images.mkdir()
    odd = os.fsdecode(b"\xffodd.png")
    for name in (odd, "plain.png"):
        PIL.Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(images / name)

    def run(*extra: str) -> tuple[int, bytes]:
        raw = io.BytesIO()
        strict = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", write_through=True)
        monkeypatch.setattr(sys, "stdout", strict)
        code = main(["predict", str(images), "--model", str(tmp_path / "model"), "--no-progress", "--top-k", "1",
                     *extra])
        strict.flush()
        monkeypatch.undo()
        return code, raw.getvalue()

    code, out = run("--json")
    assert code == 0
    results = json.loads(out)
    assert [r["image"] for r in results] == [str(images / "plain.png"), str(images / odd)]  # sorted: U+DCFF last
    code, out = run()
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == os.fsencode(images / "plain.png") and lines[2] == os.fsencode(images / odd)
    for line, r in zip((lines[1], lines[3]), results):
        assert line.decode() == f"  {r['predictions'][0]['score']:7.2%}  {r['predictions'][0]['label']}"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2000, 2001])
def test_seeded_onnxruntime_predict_and_eval_agree_with_torch(tmp_path, capsys, seed):
    """--runtime onnxruntime (the model exported on the fly): the same images, top-k and labels as the torch runtime,
    probabilities within 1e-4, and the same accuracy and loss (to 1e-4) on the same dataset."""
    pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(seed)
    source, _, id2label, _ = _random_model(tmp_path, rng)
    (tmp_path / "images").mkdir()
    for i in range(int(rng.integers(2, 6))):
        _random_image(tmp_path / "images" / f"i{i}", rng)
    for index in range(len(id2label)):
        (tmp_path / "data" / id2label[index]).mkdir(parents=True)
        _random_image(tmp_path / "data" / id2label[index] / "a", rng)
    flags = ["--model", str(source), "--no-progress", "--json", "--batch-size", str(int(rng.integers(1, 4)))]
    answers = {}
    for runtime in ("torch", "onnxruntime"):
        code, out, err = run_cli(capsys, "predict", str(tmp_path / "images"), *flags, "--top-k", "3",
                                 "--runtime", runtime)
        assert code == 0, err
        code, evaluated, err = run_cli(capsys, "eval", "--data", str(tmp_path / "data"), *flags, "--runtime", runtime)
        assert code == 0, err
        answers[runtime] = json.loads(out), json.loads(evaluated)
    (torch_predictions, torch_eval), (onnx_predictions, onnx_eval) = answers["torch"], answers["onnxruntime"]
    assert [p["image"] for p in onnx_predictions] == [p["image"] for p in torch_predictions]
    for ours, theirs in zip(torch_predictions, onnx_predictions):
        assert [e["label"] for e in theirs["predictions"]] == [e["label"] for e in ours["predictions"]]
        np.testing.assert_allclose([e["score"] for e in theirs["predictions"]],
                                   [e["score"] for e in ours["predictions"]], rtol=0, atol=1e-4)
    assert onnx_eval["runtime"] == "onnxruntime" and torch_eval["runtime"] == "torch"
    assert (onnx_eval["top1"], onnx_eval["top5"]) == (torch_eval["top1"], torch_eval["top5"])
    assert onnx_eval["loss"] == pytest.approx(torch_eval["loss"], abs=1e-4)


def test_a_file_named_twice_keeps_both_places_in_the_output(tmp_path, capsys):
    """`predict a.png photos/ a.png` (or a.png among the photos): results were sorted by name with one place per
    name, so both results of a.png went to its last place and the others moved up: the output was no longer in the
    order typed. A bad file between them keeps its place too."""
    from conftest import save_tiny_classifier

    model = save_tiny_classifier(tmp_path / "model")
    rng = np.random.default_rng(3)
    (tmp_path / "photos").mkdir()
    paths = [tmp_path / "a.png", tmp_path / "photos" / "b.png", tmp_path / "photos" / "c.png"]
    for path in paths:
        PIL.Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(path)
    (tmp_path / "photos" / "bad.png").write_bytes(b"not a png")
    code, out, err = run_cli(capsys, "predict", str(paths[0]), str(tmp_path / "photos"), str(paths[0]),
                             "--model", str(tmp_path / "model"), "--json", "--batch-size", "2", "--no-progress")
    assert code == 2 and "bad.png" in err
    got = json.loads(out)
    assert [Path(r["image"]).name for r in got] == ["a.png", "b.png", "bad.png", "c.png", "a.png"]
    assert "error" in got[2]
    with torch.no_grad():  # each result is its own file's: resize to 32 and normalise, through the model
        for r in got[:2] + got[3:]:
            rgb = np.asarray(PIL.Image.open(r["image"]).convert("RGB").resize((32, 32), PIL.Image.Resampling.BILINEAR))
            p = model(torch.from_numpy(_normalise(rgb)).float()[None]).logits.softmax(-1)[0]
            assert r["predictions"][0]["score"] == pytest.approx(float(p.max()), abs=1e-5)


def test_detect_keeps_a_file_named_twice_in_both_places(tmp_path):
    """detect_objects ordered its results as predict did, by name with one place per name."""
    from conftest import TINY_SHALLOW
    from pvtv2 import PvtV2ForObjectDetection
    from pvtv2.inference import detect_objects

    torch.manual_seed(0)
    model = PvtV2ForObjectDetection(PvtV2Config(**TINY_SHALLOW, id2label={0: "a", 1: "b"}, detector="retinanet",
                                                min_size=64, max_size=96, score_threshold=0.0, fpn_channels=32)).eval()
    rng = np.random.default_rng(4)
    paths = [tmp_path / "x.png", tmp_path / "y.png"]
    for path in paths:
        PIL.Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    results = detect_objects(model, [paths[0], paths[1], paths[0]], batch_size=2)
    assert [Path(r.image).name for r in results] == ["x.png", "y.png", "x.png"]
    assert results[0].scores == results[2].scores and results[0].size == results[2].size
