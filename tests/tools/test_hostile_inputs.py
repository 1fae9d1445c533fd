"""The non-training commands against a hostile user: random heads, flags out of range, devices without data, files
that are not files, outputs that cannot be written, a full disk. Each must end in one line ``pvtv2 CMD: error: ...``
with exit status 2, write nothing, and (where it succeeds) give numbers checked against an independent computation.

The commands run in this process (``pvtv2.cli.main``): the same parser and error handling as the installed command.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_SHALLOW, perturb_

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, PvtV2Model
from pvtv2.cli import main
from pvtv2.data.processing import PvtV2ImageProcessor
from pvtv2.inference import load_classifier, load_depth_estimator, load_segmenter
from pvtv2.models.depth import PvtV2ForDepthEstimation
from pvtv2.models.segmentation import PvtV2ForSemanticSegmentation
from pvtv2.visualize import LEGEND_WIDTH, colorize_depth, display_scale

LABELS = {0: "cat", 1: "dog", 2: "fish"}


def run_here(capsys, *args: str) -> subprocess.CompletedProcess:
    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


def assert_one_line_error(result: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"pvtv2 {command}: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert result.stdout == ""
    return lines[0]


def write_image(path: Path, height: int, width: int, seed: int = 0) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(pixels).save(path)
    return pixels


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Saved models of every kind, a classifier whose config.json claims more labels than its weights have, images
    and a small dataset."""
    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    config = PvtV2Config(**TINY_SHALLOW, id2label=LABELS, image_size=64)
    perturb_(PvtV2ForImageClassification(config).eval()).save_pretrained(root / "classifier")
    perturb_(PvtV2Model(config).eval()).save_pretrained(root / "encoder")
    dense = PvtV2Config(**TINY_SHALLOW, decoder_hidden_size=32, id2label=LABELS)
    perturb_(PvtV2ForSemanticSegmentation(dense).eval()).save_pretrained(root / "segmenter")
    perturb_(PvtV2ForDepthEstimation(dense).eval()).save_pretrained(root / "depth")
    more = root / "more_labels"
    more.mkdir()
    (more / "model.safetensors").write_bytes((root / "classifier" / "model.safetensors").read_bytes())
    data = json.loads((root / "classifier" / "config.json").read_text())
    data["id2label"] = {str(i): f"class {i}" for i in range(5)}
    data.pop("label2id", None)
    (more / "config.json").write_text(json.dumps(data))
    write_image(root / "img64.png", 64, 64)
    write_image(root / "img16.png", 16, 16, seed=1)
    for i, name in enumerate(["cat", "dog"]):
        write_image(root / "ds" / name / "0.png", 40, 52, seed=10 + i)
    return root


# ---------------------------------------------------------------------------------------------- random heads
REFUSALS = {
    # (command line, folder, what the message must say)
    "predict, config claims more labels": ("predict --no-progress -m {m} {root}/img64.png", "more_labels", "pvtv2 train --model"),
    "predict, backbone weights": ("predict --no-progress -m {m} {root}/img64.png", "encoder", "pvtv2 train --model"),
    "eval, config claims more labels": ("eval --no-progress -m {m} --data {root}/ds", "more_labels", "pvtv2 train --model"),
    "eval, backbone weights": ("eval --no-progress -m {m} --data {root}/ds", "encoder", "pvtv2 train --model"),
    "segment, classifier": ("segment {root}/img64.png -m {m} -o {out}", "classifier", "pvtv2 train --task segmentation"),
    "segment, depth model": ("segment {root}/img64.png -m {m} -o {out}", "depth", "pvtv2 train --task segmentation"),
    "depth, classifier": ("depth {root}/img64.png -m {m} -o {out}", "classifier", "PvtV2ForDepthEstimation"),
    "depth, segmenter": ("depth {root}/img64.png -m {m} -o {out}", "segmenter", "PvtV2ForDepthEstimation"),
    "export, config claims more labels": ("export -m {m} -o {out}.onnx --no-check", "more_labels", "pvtv2 train --model"),
    "convert, config claims more labels": ("convert {m} {out}", "more_labels", "pvtv2 train --model"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_inference_refuses_a_randomly_initialised_head(ws, tmp_path, capsys, case):
    line, folder, remedy = REFUSALS[case]
    out = tmp_path / "out.png"
    args = line.format(m=ws / folder, root=ws, out=out).split()
    result = run_here(capsys, *args)
    if folder == "more_labels":
        # Refused by the loader itself (as transformers refuses it): the keys and shapes that do not fit, on lines
        # of their own, with the classes the config names and how to train a new head.
        assert result.returncode == 2 and result.stdout == "", result.stderr
        assert result.stderr.startswith(f"pvtv2 {args[0]}: error: "), result.stderr
        for needle in (str(ws / folder / "config.json"), "5 classes", "checkpoint (3,) vs model (5,)", remedy):
            assert needle in result.stderr, (needle, result.stderr)
    else:
        message = assert_one_line_error(result, args[0], repr(str(ws / folder)), remedy)
        assert "random" in message
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_the_loaders_refuse_what_does_not_fit_and_load_what_does(ws):
    for load, wrong in ((load_classifier, ["encoder", "more_labels"]), (load_segmenter, ["classifier", "depth"]),
                        (load_depth_estimator, ["classifier", "segmenter"])):
        for folder in wrong:
            # A config naming more classes than the classifier holds is refused by from_pretrained itself.
            with pytest.raises(ValueError, match="5 classes" if folder == "more_labels" else "random"):
                load(ws / folder)
    # what fits loads, with the saved weights (the logits of the directly loaded model, bit for bit)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = PvtV2ForImageClassification.from_pretrained(ws / "classifier")(x).logits
        assert torch.equal(load_classifier(ws / "classifier")(x).logits, expected)
        seg = PvtV2ForSemanticSegmentation.from_pretrained(ws / "segmenter")(x).logits
        assert torch.equal(load_segmenter(ws / "segmenter")(x).logits, seg)
        depth = PvtV2ForDepthEstimation.from_pretrained(ws / "depth")(x).predicted_depth
        assert torch.equal(load_depth_estimator(ws / "depth")(x).predicted_depth, depth)


def test_export_of_backbone_weights_writes_the_encoder(ws, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "encoder.onnx"
    result = run_here(capsys, "export", "-m", str(ws / "encoder"), "-o", str(out), "--check-sizes", "64", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["output"] == "last_hidden_state"  # no random classifier was invented
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 96, 80)
    (got,) = session.run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        expected = PvtV2Model.from_pretrained(ws / "encoder")(x).last_hidden_state
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-4 * float(expected.abs().max()))


# ---------------------------------------------------------------------------------------------- flags
BAD_FLAGS = [
    ("benchmark -m pvt_v2_b0 --threads 0", "--threads"),
    ("benchmark -m pvt_v2_b0 --threads -2", "--threads"),
    ("benchmark -m pvt_v2_b0 --repeats -1", "--repeats"),
    ("benchmark -m pvt_v2_b0 --repeats 0", "--repeats"),
    ("benchmark -m pvt_v2_b0 --batch-size -4", "--batch-size"),
    ("benchmark -m pvt_v2_b0 --image-size -224", "--image-size"),
    ("benchmark -m pvt_v2_b0 --warmup -1", "--warmup"),
    ("benchmark -m pvt_v2_b0 --device meta", "meta"),
    ("predict -m {root}/classifier {root}/img64.png --device meta", "meta"),
    ("eval -m {root}/classifier --data {root}/ds --device meta", "meta"),
    ("predict -m {root}/classifier {root}/img64.png --top-k 0", "--top-k"),
    ("predict -m {root}/classifier {root}/img64.png --top-k 1001", "--top-k"),
    ("predict -m {root}/classifier {root}/img64.png --batch-size 0", "--batch-size"),
    ("predict -m {root}/classifier {root}/img64.png --batch-size 100000", "--batch-size"),
    ("eval -m {root}/classifier --data {root}/ds --batch-size -1", "--batch-size"),
    ("visualize {root}/img64.png -m {root}/classifier -o {out} --panel-size 100000", "--panel-size"),
    ("visualize {root}/img64.png -m {root}/classifier -o {out} --panel-size 0", "--panel-size"),
    ("segment {root}/img64.png -m {root}/segmenter -o {out} --alpha 1.5", "--alpha"),
    ("segment {root}/img64.png -m {root}/segmenter -o {out} --alpha nan", "--alpha"),
    ("segment {root}/img64.png -m {root}/segmenter -o {out} --size 100000", "--size"),
    ("segment {root}/img64.png -m {root}/segmenter -o {out} --size 8", "--size"),
    ("depth {root}/img64.png -m {root}/depth -o {out} --size 64x100000", "--size"),
    ("export -m {root}/classifier -o {out} --check-sizes 1x100000x100000", "--check-sizes"),
    # info used to print 1513777045 GMACs for 100000: the bound of every other command now holds here too.
    # export used to write an ONNX model named x.txt
    ("export -m {root}/classifier -o {out}", "--output must be an ONNX file named *.onnx, got '"),
    ("export -m {root}/classifier -o {root}/x.onnx.txt", "*.onnx"),
    ("info pvt_v2_b0 --image-size 4097", "--image-size height and width must be between 1 and 4096, got 4097"),
    ("info {root}/classifier --image-size 64x100000", "--image-size"),
]


@pytest.mark.parametrize("line, flag", BAD_FLAGS, ids=[f"{line.split()[0]} {' '.join(line.split()[-2:])}" for line, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_errors(ws, tmp_path, capsys, line, flag):
    out = tmp_path / "out.png"
    args = line.format(root=ws, out=out).split()
    result = run_here(capsys, *args)
    assert_one_line_error(result, args[0], flag)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- files that are not files
@pytest.fixture
def alarm():
    """Turn a hang (a FIFO opened for reading) into a failure."""
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the command blocked"))
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)  # the worker process's own handling, for the tests after this one


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_is_refused_or_skipped_never_read(ws, tmp_path, capsys, alarm):
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    named = run_here(capsys, "predict", "--no-progress", "-m", str(ws / "classifier"), str(fifo))
    assert_one_line_error(named, "predict", str(fifo), "FIFO")
    for command in ("segment", "depth", "visualize"):
        model = {"segment": "segmenter", "depth": "depth", "visualize": "classifier"}[command]
        result = run_here(capsys, command, str(fifo), "-m", str(ws / model), "-o", str(tmp_path / "out.png"))
        assert_one_line_error(result, command, str(fifo), "FIFO")
    as_model = run_here(capsys, "predict", "-m", str(fifo), str(ws / "img64.png"))
    assert_one_line_error(as_model, "predict", str(fifo), "FIFO")
    # inside a folder a FIFO is not an image file: the real image beside it is predicted, as the library predicts it
    write_image(tmp_path / "real.png", 40, 40)
    result = run_here(capsys, "predict", "--no-progress", "-m", str(ws / "classifier"), str(tmp_path), "--json", "-k", "1")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert [Path(r["image"]).name for r in got] == ["real.png"]
    model = PvtV2ForImageClassification.from_pretrained(ws / "classifier")
    with torch.no_grad():
        probs = model(PvtV2ImageProcessor(size=64)(PIL.Image.open(tmp_path / "real.png"))["pixel_values"]).logits.softmax(-1)
    assert got[0]["predictions"][0]["index"] == int(probs.argmax())
    assert got[0]["predictions"][0]["score"] == pytest.approx(float(probs.max()), abs=1e-6)


def test_a_symlink_loop_is_named_as_one(ws, tmp_path, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    as_model = run_here(capsys, "predict", "-m", str(tmp_path / "a"), str(ws / "img64.png"))
    message = assert_one_line_error(as_model, "predict", "symlink loop")
    assert "hub" not in message
    as_image = run_here(capsys, "predict", "-m", str(ws / "classifier"), str(tmp_path / "a"))
    assert_one_line_error(as_image, "predict", "symlink loop")
    for command, model in (("convert", "a"), ("info", "a")):
        args = [command, str(tmp_path / model)] + ([str(tmp_path / "out")] if command == "convert" else [])
        assert_one_line_error(run_here(capsys, *args), command, "symlink loop")


# ---------------------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("command, model", [("visualize", "classifier"), ("segment", "segmenter"), ("depth", "depth")])
def test_unwritable_outputs_name_the_output_not_a_temporary_file(ws, tmp_path, capsys, monkeypatch, command, model):
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    under_file = run_here(capsys, command, str(ws / "img64.png"), "-m", str(ws / model), "-o", str(blocker / "out.png"))
    assert ".tmp" not in assert_one_line_error(under_file, command, str(blocker / "out.png"))
    folder = run_here(capsys, command, str(ws / "img64.png"), "-m", str(ws / model), "-o", str(tmp_path))
    assert_one_line_error(folder, command, str(tmp_path), "is a folder")

    # A folder that refuses the write (as a read-only one does for anyone but root): the error names the output
    # and the system's reason, and leaves no temporary file behind.
    def refuse(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half a picture")
        raise PermissionError(errno.EACCES, "Permission denied", os.fspath(fp))

    monkeypatch.setattr(PIL.Image.Image, "save", refuse)
    target = tmp_path / "pictures" / "out.png"
    denied = run_here(capsys, command, str(ws / "img64.png"), "-m", str(ws / model), "-o", str(target))
    message = assert_one_line_error(denied, command, repr(str(target)), "Permission denied", "EACCES")
    assert ".tmp" not in message
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a_file", "pictures"]


def _fill_disk(monkeypatch):
    """Every write of bytes stops half-way with ENOSPC, as on a full disk."""
    real = Path.write_bytes

    def full(self, data):
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)


@pytest.mark.parametrize("layout, name", [(None, "converted"), ("timm", "b0.safetensors"), ("original", "b0.pth")])
def test_convert_on_a_full_disk_names_the_target_and_leaves_the_old_output(ws, tmp_path, capsys, monkeypatch, layout, name):
    out = tmp_path / name
    extra = ["--layout", layout] if layout else []
    first = run_here(capsys, "convert", str(ws / "classifier"), str(out), *extra)
    assert first.returncode == 0, first.stderr
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    _fill_disk(monkeypatch)
    result = run_here(capsys, "convert", str(ws / "classifier"), str(out), *extra)
    assert_one_line_error(result, "convert", f"cannot write {str(out)!r}", "No space left on device", "ENOSPC")
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # no temporary file left, the previous output intact
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name or ".old" in p.name]


def test_convert_refuses_to_overwrite_what_it_did_not_write(ws, tmp_path, capsys):
    photo = tmp_path / "holiday.png"
    write_image(photo, 20, 20)
    original = photo.read_bytes()
    disguised = tmp_path / "weights.pth"
    disguised.write_bytes(original)  # a picture under a checkpoint's name
    album = tmp_path / "album"
    write_image(album / "beach.jpg", 20, 20)
    for args, needle in (([str(photo)], "is a file"), ([str(photo), "--layout", "timm"], "*.safetensors"),
                         ([str(disguised), "--layout", "timm"], "not a weights file"),
                         ([str(album)], "beach.jpg")):
        result = run_here(capsys, "convert", str(ws / "classifier"), *args)
        assert_one_line_error(result, "convert", needle)
    assert photo.read_bytes() == original and disguised.read_bytes() == original
    assert [p.name for p in album.iterdir()] == ["beach.jpg"]
    # a checkpoint this tool wrote is replaced: by the weights of the new source (the encoder's, here)
    for extra in ([], ["--layout", "timm"]):
        out = tmp_path / ("again" if not extra else "again.safetensors")
        assert run_here(capsys, "convert", str(ws / "classifier"), str(out), *extra).returncode == 0
        assert run_here(capsys, "convert", str(ws / "encoder"), str(out), *extra).returncode == 0
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = PvtV2Model.from_pretrained(ws / "encoder")(x).last_hidden_state
        assert torch.equal(PvtV2Model.from_pretrained(tmp_path / "again")(x).last_hidden_state, expected)


# ---------------------------------------------------------------------------------------------- small inputs enlarged
def test_display_scale_closed_forms():
    assert display_scale(64, 64) == 4 and display_scale(50, 70) == 6  # ceil(256 / shorter side)
    assert display_scale(256, 300) == 1 and display_scale(1000, 900) == 1  # large enough already
    assert display_scale(10, 1000) == 4  # ceil(256 / 10) = 26 would make the long side 26000: 4096 // 1000
    assert display_scale(1, 5000) == 1


def test_segment_of_a_small_image_is_enlarged_block_by_block(ws, tmp_path, capsys):
    out = tmp_path / "seg.png"
    result = run_here(capsys, "segment", str(ws / "img64.png"), "-m", str(ws / "segmenter"), "-o", str(out),
                      "--alpha", "0.5")
    assert result.returncode == 0, result.stderr
    assert "enlarged 4x" in result.stdout
    from pvtv2.inference import predict_segmentation
    from pvtv2.visualize import palette

    image = PIL.Image.open(ws / "img64.png").convert("RGB")
    labels = predict_segmentation(PvtV2ForSemanticSegmentation.from_pretrained(ws / "segmenter"), image)
    # the blend, computed here at the image's own size, then each pixel repeated 4 x 4
    blend = np.round(0.5 * np.asarray(image, dtype=np.float32) + 0.5 * palette(3)[labels].astype(np.float32))
    expected = blend.astype(np.uint8).repeat(4, axis=0).repeat(4, axis=1)
    picture = np.asarray(PIL.Image.open(out))
    assert picture.shape == (256, 256 + LEGEND_WIDTH, 3)
    assert np.array_equal(picture[:, :256], expected)


def test_depth_of_a_small_image_is_enlarged_block_by_block(ws, tmp_path, capsys):
    out = tmp_path / "depth.png"
    result = run_here(capsys, "depth", str(ws / "img64.png"), "-m", str(ws / "depth"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "enlarged 4x" in result.stdout
    from pvtv2.inference import predict_depth

    image = PIL.Image.open(ws / "img64.png").convert("RGB")
    depth = predict_depth(PvtV2ForDepthEstimation.from_pretrained(ws / "depth"), image)
    picture = np.asarray(PIL.Image.open(out))
    assert picture.shape == (256, 512, 3)
    assert np.array_equal(picture[:, :256], np.asarray(image).repeat(4, axis=0).repeat(4, axis=1))
    assert np.array_equal(picture[:, 256:], colorize_depth(depth).repeat(4, axis=0).repeat(4, axis=1))


def test_attention_picture_shows_a_small_input_as_sharp_blocks(ws, tmp_path, capsys):
    out = tmp_path / "attention.png"
    result = run_here(capsys, "visualize", str(ws / "img16.png"), "-m", str(ws / "classifier"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "enlarged" in result.stdout
    picture = np.asarray(PIL.Image.open(out))
    caption = 2 * 22  # two caption lines of max(18, 224 // 10) pixels
    assert picture.shape == (224 + caption, 5 * 224, 3)
    pixels = np.asarray(PIL.Image.open(ws / "img16.png").convert("RGB"))
    assert np.array_equal(picture[caption:, :224], pixels.repeat(14, axis=0).repeat(14, axis=1))  # 224 = 14 x 16


def test_info_of_weights_at_the_largest_size_counts_on_the_meta_device(ws, capsys):
    result = run_here(capsys, "info", str(ws / "classifier"), "--image-size", "4096", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    # overlapping patch embeddings: floor((n + 2 * (k // 2) - k) / s) + 1 with (k, s) = (7, 4), then (3, 2) thrice
    assert [s["output"] for s in info["stages"]] == [[1024, 1024], [512, 512], [256, 256], [128, 128]]
    model = PvtV2ForImageClassification.from_pretrained(ws / "classifier")
    assert info["parameters"] == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- out of memory
CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 256000000000 bytes. Error code 12 (Cannot allocate memory)")
CUDA_OOM = ("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which 1.00 GiB "
            "is free. If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF")


@pytest.mark.parametrize(("error", "reason"), [
    (RuntimeError(CPU_OOM), "you tried to allocate 256000000000 bytes."),  # the message torch 2.x gives on CPU
    (torch.OutOfMemoryError(CUDA_OOM), "Tried to allocate 20.00 GiB."),
    (MemoryError(), "MemoryError"),
])
def test_out_of_memory_is_one_line(ws, capsys, monkeypatch, error, reason):
    def allocate(*args, **kwargs):
        raise error

    monkeypatch.setattr("pvtv2.flops.model_summary", allocate)
    result = run_here(capsys, "info", str(ws / "classifier"))
    line = assert_one_line_error(result, "info", "not enough memory to build or run the model: ")
    assert line.endswith(f"model: {reason}")


def test_other_runtime_errors_still_show_their_traceback(ws, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("pvtv2.flops.model_summary", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["info", str(ws / "classifier")])


@pytest.mark.parametrize("verbose", [False, True])
def test_hub_retry_warnings_are_quiet_unless_verbose(ws, capsys, caplog, monkeypatch, verbose):
    """Offline, huggingface_hub logged each retry twice: 22 lines before the command's one-line error."""
    hub_logger = logging.getLogger("huggingface_hub")
    # As in a fresh process (an earlier main() in this one may have quieted it); put back afterwards.
    monkeypatch.setattr(hub_logger, "level", logging.WARNING)
    monkeypatch.delenv("HF_HUB_VERBOSITY", raising=False)

    def unreachable(*args, **kwargs):
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        raise ValueError("the hub could not be reached")

    monkeypatch.setattr("pvtv2.flops.model_summary", unreachable)
    with caplog.at_level(logging.DEBUG):
        if verbose:
            with pytest.raises(ValueError, match="could not be reached"):
                main(["-v", "info", str(ws / "classifier")])
        else:
            assert_one_line_error(run_here(capsys, "info", str(ws / "classifier")), "info", "could not be reached")
    retries = [r.getMessage() for r in caplog.records if r.name.startswith("huggingface_hub")]
    assert retries == (["Retrying in 1s [Retry 1/5]."] if verbose else [])


HUB_RETRY_SCRIPT = """
import logging, sys
import pvtv2.flops
from pvtv2.cli import main

def unreachable(*args, **kwargs):
    from huggingface_hub.utils import logging as hub_logging  # first imported here, as by a hub download
    hub_logging.get_logger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
    raise ValueError("the hub could not be reached")

pvtv2.flops.model_summary = unreachable
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_hub_retry_warnings_are_quiet_in_a_fresh_process(ws):
    """huggingface_hub sets its logger's level when first imported, after the command has started."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_VERBOSITY"}
    result = subprocess.run([sys.executable, "-c", HUB_RETRY_SCRIPT, "info", str(ws / "classifier")],
                            capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "pvtv2 info: error: the hub could not be reached"
    assert not [line for line in lines if "Retry" in line], result.stderr  # the command's own INFO lines may stay


def test_pictures_of_sixteen_bit_images_are_scaled_not_clipped():
    # Blending with alpha 0 leaves the image itself: mid grey 32768 must show as 128, not as clipped white 255.
    from pvtv2.visualize import segmentation_picture

    grey16 = PIL.Image.fromarray(np.full((300, 300), 32768, np.uint16))
    picture = segmentation_picture(grey16, np.zeros((300, 300), np.int64), {0: "a"}, alpha=0.0)
    assert np.asarray(picture.convert("RGB"))[150, 150].tolist() == [128, 128, 128]
