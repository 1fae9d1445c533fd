"""Hostile checkpoint files and hub caches: what a search found, and a compact seeded slice of that search.

Found: a training checkpoint keeping a scalar tensor beside its ``state_dict`` (pytorch/examples' ImageNet script
saves ``best_acc1`` so) was refused as "not a PVTv2 checkpoint ... its first keys are: best_acc1", where timm's
``load_state_dict`` reads its weights; a file holding a weight under its plain name and under a wrapper's prefix
(``x`` and ``module.x``) loaded whichever came last without a word; ``torch.compile`` around DataParallel
(``_orig_mod.module.x``) was not unwrapped; a shard index placing a tensor in a shard that does not hold it was
reported as a config.json to correct (the missing spatial reduction read as ``sr_ratios`` 1); a hub cache whose ref
leads out of its snapshots folder (``../../x``) surfaced huggingface_hub's "Invalid pointer path" instead of naming
the damaged ref; a preprocessor_config.json whose finite settings overflow float32 (``rescale_factor`` 1e300)
gave NaN scores for every class, which ``pvtv2 predict`` printed with exit status 0; a folder whose config.json
has other classes than its own classifier loaded a random head under the config's class names (a warning its only
sign; transformers refuses it); a BMP header PIL cannot decode for memory stopped ``pvtv2 predict`` as "not enough
memory to build or run the model".
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import struct

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file, save_file

from pvtv2 import CheckpointError, PvtV2Config, PvtV2ForImageClassification, PvtV2ImageProcessor, cli
from pvtv2.weights.files import read_state_dict
from pvtv2.weights.hub import HubFileNotFound

from conftest import TINY, random_weights_, relative_error, save_tiny_classifier

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
WRAPPERS = ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny 5-class classifier with random weights, its state dict, and its save_pretrained folder."""
    model = random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5)), seed=35).eval()
    folder = tmp_path_factory.mktemp("files35") / "tiny"
    model.save_pretrained(folder)
    return model, {k: v.clone() for k, v in model.state_dict().items()}, folder


def _logits(model):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(35))
    with torch.no_grad():
        return model.eval()(x).logits


def _same_tensors(found, expected):
    assert sorted(found) == sorted(expected)
    for key, value in expected.items():
        assert found[key].dtype == value.dtype and torch.equal(found[key], value), key


# ---------------------------------------------------------------------------------------------- the defects found
def test_a_training_checkpoint_with_a_scalar_metric_beside_its_state_dict_loads_as_timm_reads_it(tiny, tmp_path):
    model, state, _ = tiny
    path = tmp_path / "checkpoint.pth.tar"
    # pytorch/examples imagenet/main.py's save_checkpoint: best_acc1 is a 0-d tensor (an AverageMeter of tensors)
    torch.save({"epoch": 90, "arch": "pvt_v2_b0", "state_dict": {f"module.{k}": v for k, v in state.items()},
                "best_acc1": torch.tensor(71.25), "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}, path)
    _same_tensors(read_state_dict(path), timm.models.load_state_dict(str(path)))
    loaded = PvtV2ForImageClassification.from_pretrained(path, num_labels=5)
    assert relative_error(_logits(model), _logits(loaded)) < 1e-6


@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("plain_first", [True, False])
def test_a_weight_under_its_plain_and_a_wrapped_name_is_refused_not_one_taken(tiny, tmp_path, wrapper, plain_first):
    _, state, _ = tiny
    key = "classifier.weight"
    copies = [(key, state[key]), (wrapper + key, state[key] + 1)]
    weights = dict(state)
    del weights[key]
    weights.update(copies if plain_first else copies[::-1])
    path = tmp_path / "two.pth"
    torch.save(weights, path)  # in this order (safetensors writes its keys sorted)
    first, second = [name for name, _ in (copies if plain_first else copies[::-1])]
    with pytest.raises(CheckpointError, match=re.escape(f"holds {first!r} and {second!r}, which both name the weight {key!r}")):
        PvtV2ForImageClassification.from_pretrained(path)


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_weights_of_nested_wrappers_load_in_either_order(tiny, tmp_path, wrapper):
    # torch.compile(DistributedDataParallel(model)).state_dict() names "_orig_mod.module.x": it was refused as no
    # known layout, its first keys listed
    model, state, _ = tiny
    torch.save({"model": {wrapper + k: v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    _same_tensors(read_state_dict(tmp_path / "wrapped.pth"), state)
    loaded = PvtV2ForImageClassification.from_pretrained(tmp_path / "wrapped.pth", num_labels=5)
    assert relative_error(_logits(model), _logits(loaded)) < 1e-6


def test_a_shard_index_placing_a_tensor_in_a_shard_without_it_is_named(tiny, tmp_path):
    model, _, _ = tiny
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="200KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    # the first stage's spatial reduction lost from its shard: its absence fits sr_ratios[0] = 1, and the error
    # said "its sr_ratios [8, 4, 2, 1] is not the checkpoint's [1, 4, 2, 1]; correct config.json to fit the weights"
    key = "pvt_v2.encoder.layers.0.blocks.0.attention.spatial_reduction.weight"
    shard = folder / index["weight_map"][key]
    assert list(index["weight_map"].values()).count(shard.name) > 1  # the shard holds other tensors too
    save_file({k: v for k, v in load_file(shard).items() if k != key}, shard)
    with pytest.raises(CheckpointError, match=re.escape(f"places the tensor {key!r} in the shard {shard.name!r}, which "
                                                        f"does not hold it, nor does any other shard")):
        PvtV2ForImageClassification.from_pretrained(folder)



@pytest.mark.parametrize("rows", [0, 3])
def test_a_folder_whose_classifier_has_other_classes_than_its_config_is_refused_as_transformers_refuses_it(
        tiny, tmp_path, rows):
    # nothing asked for another head (no num_labels=): a random head labelled with config.json's five classes was
    # loaded, a warning its only sign
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny[2] / "config.json").read_bytes())
    weights = dict(tiny[1])
    weights["classifier.weight"], weights["classifier.bias"] = torch.randn(rows, 64), torch.randn(rows)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises((RuntimeError, ValueError), match="size mismatch|ignore_mismatched_sizes"):
        transformers.PvtV2ForImageClassification.from_pretrained(folder)
    with pytest.raises(CheckpointError, match=re.escape(f"classifier.weight: checkpoint ({rows}, 64) vs model (5, 64)")):
        PvtV2ForImageClassification.from_pretrained(folder)
    # asking for a head of the file's classes (or another), as fine-tuning does, still gives one
    assert PvtV2ForImageClassification.from_pretrained(folder, num_labels=7).config.num_labels == 7

def _hub_cache(root, folder, ref: str):
    """``folder``'s files as the snapshot COMMIT of 'owner/tiny' (symlinks into blobs/), refs/main holding ``ref``."""
    repo = root / "models--owner--tiny"
    for entry in folder.iterdir():
        data = entry.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / COMMIT / entry.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(ref)
    return repo


@pytest.mark.parametrize("ref", ["../../../outside", "../" + COMMIT, "/tmp"])
def test_a_ref_leading_out_of_the_snapshots_folder_is_named_as_the_damage(tiny, tmp_path, monkeypatch, ref):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = _hub_cache(tmp_path / "cache", tiny[2], ref)
    says = f"the Hugging Face cache of 'owner/tiny' is damaged: its ref {str(repo / 'refs' / 'main')!r} holds {ref!r}"
    for load in (PvtV2ForImageClassification.from_pretrained, PvtV2Config.from_pretrained):
        with pytest.raises(HubFileNotFound, match=f"^{re.escape(says)}"):
            load("owner/tiny", cache_dir=tmp_path / "cache")


def test_the_same_cache_with_a_good_ref_loads_the_snapshots_weights(tiny, tmp_path, monkeypatch):
    # the control of the test above: the cache as built is read, and holds the model's own numbers
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _hub_cache(tmp_path / "cache", tiny[2], COMMIT)
    loaded = PvtV2ForImageClassification.from_pretrained("owner/tiny", cache_dir=tmp_path / "cache")
    _same_tensors(loaded.state_dict(), tiny[1])


# ---------------------------------------------------------------------------------------------- a seeded slice
class _Payload:
    """Unpickled, it would create the file ``marker``: no file read may ever run it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _training_checkpoint(rng: random.Random, state, marker):
    """A state dict as a training script might save it: each key behind random wrapper prefixes, inside zero to two
    containers, with scalars, counters and metrics beside it. Returns it, the outcome expected ('load', or the
    message of the error) and a description."""
    weights = {rng.choice(["", *WRAPPERS]) + k: v for k, v in state.items()}
    expect, what = "load", []
    trick = rng.choice(["none", "none", "twice", "payload", "scalar"])
    if trick == "twice":  # one weight under two spellings, with different values
        key = rng.choice(sorted(state))
        weights[rng.choice(WRAPPERS) + key] = state[key] * 2 + 1
        weights[key] = state[key].clone()
        expect = re.escape(f"which both name the weight {key!r}")
    elif trick == "payload":
        weights[rng.choice(["extra", "classifier.extra"])] = _Payload(marker)
        expect = "refusing to load"
    obj = weights
    for container in rng.sample(["model", "state_dict", "model_state_dict", "module"], rng.randint(0, 2)):
        obj = {container: obj, "epoch": rng.randint(0, 300), "optimizer": {"param_groups": [{"lr": 0.01}]}}
        if trick == "scalar" or rng.random() < 0.5:
            obj[rng.choice(["best_acc1", "acc", "step"])] = torch.tensor(rng.random())
        what.append(container)
    return obj, expect, f"{trick} in {what}"


def test_seeded_training_checkpoints_load_their_own_weights_or_are_refused_by_name(tiny, tmp_path):
    """60 checkpoints (seed 35): safetensors where flat, torch.save zip or legacy format otherwise. Each reads as
    exactly the weights written, or is refused naming the problem; no payload ever runs."""
    _, state, _ = tiny
    rng = random.Random(35)
    marker = tmp_path / "payload-ran"
    outcomes = {"load": 0, "refused": 0}
    for i in range(60):
        obj, expect, what = _training_checkpoint(rng, state, marker)
        flat = all(isinstance(v, torch.Tensor) for v in obj.values()) and rng.random() < 0.5
        path = tmp_path / f"{i}.{'safetensors' if flat else 'pth'}"
        if flat:
            save_file({k: v.contiguous() for k, v in obj.items()}, path)
        else:
            torch.save(obj, path, _use_new_zipfile_serialization=rng.random() < 0.7)
        if expect == "load":
            _same_tensors(read_state_dict(path), state)
            outcomes["load"] += 1
        else:
            with pytest.raises(CheckpointError, match=expect):
                read_state_dict(path)
            outcomes["refused"] += 1
        assert not marker.exists(), (i, what)
    assert min(outcomes.values()) >= 10, outcomes  # both kinds drawn


def _safetensors_parts(path):
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def _safetensors_bytes(header, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def test_seeded_lying_safetensors_headers_are_refused_by_name_without_allocating(tiny, tmp_path):
    """40 headers (seed 35) that lie about a tensor: offsets overlapping the next tensor's or past the data, shapes
    of 10**12 elements, a negative or fractional dimension, an unknown dtype, a wrong data length. Each is refused as
    an unreadable safetensors file naming the file (safetensors checks the header before it reads any data, so no
    10**12-element tensor is ever allocated: the process would run out of memory)."""
    _, state, folder = tiny
    header, data = _safetensors_parts(folder / "model.safetensors")
    names = sorted(k for k in header if k != "__metadata__")
    rng = random.Random(35)
    for i in range(40):
        lie = dict(header)
        key = rng.choice(names)
        entry = dict(lie[key])
        start, end = entry["data_offsets"]
        kind = rng.choice(["overlap", "past", "huge", "negative", "fraction", "dtype", "short", "long"])
        if kind == "overlap":
            entry["data_offsets"] = [max(0, start - 4), end - 4 if end - 4 > start else end]
        elif kind == "past":
            entry["data_offsets"] = [start, len(data) + rng.randint(1, 10**6)]
        elif kind == "huge":
            entry["shape"] = [10**6, 10**6]
        elif kind == "negative":
            entry["shape"] = [-1, *entry["shape"][1:]]
        elif kind == "fraction":
            entry["shape"] = [s + 0.5 for s in entry["shape"]]
        elif kind == "dtype":
            entry["dtype"] = rng.choice(["F4", "float32", "Q8", ""])
        lie[key] = entry
        body = data[:-4] if kind == "short" else data + b"\0" * 4 if kind == "long" else data
        path = tmp_path / f"{i}.safetensors"
        path.write_bytes(_safetensors_bytes(lie, body))
        with pytest.raises(CheckpointError, match=f"^{re.escape(repr(str(path)))} is not a readable safetensors file"):
            read_state_dict(path)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_payload_in_a_plain_pickle_of_any_protocol_never_runs(tmp_path, protocol):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "weights.bin"
    path.write_bytes(pickle.dumps({"state_dict": {"classifier.weight": _Payload(marker)}}, protocol=protocol))
    # protocols 0 and 4-5: torch's unpickler stops at an opcode it does not take before it meets the payload
    with pytest.raises(CheckpointError, match="refusing to load|is not a readable PyTorch checkpoint") as error:
        PvtV2ForImageClassification.from_pretrained(path)
    assert repr(str(path)) in str(error.value)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- a hostile processor file
@pytest.mark.parametrize("setting", [{"rescale_factor": 1e300}, {"image_std": [1e-300, 0.224, 0.225]}])
def test_preprocessing_settings_that_overflow_float32_are_named_not_nan_scores(tmp_path, capsys, setting):
    # finite settings whose pixels are not (transformers' processor computes them: inf and NaN); predict printed
    # NaN scores for every class and exited 0
    save_tiny_classifier(tmp_path / "model")
    config = {"image_processor_type": "PvtImageProcessor", "size": {"height": 32, "width": 32}, **setting}
    (tmp_path / "model" / "preprocessor_config.json").write_text(json.dumps(config))
    pixels = np.random.default_rng(35).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    theirs = transformers.PvtImageProcessor(**setting)(pixels, return_tensors="np")["pixel_values"]
    assert not np.isfinite(theirs).all()
    name = next(iter(setting))
    with pytest.raises(ValueError, match=f"image 0: its pixel values overflow float32 .*{name}="):
        PvtV2ImageProcessor.from_pretrained(tmp_path / "model")(pixels)
    PIL.Image.fromarray(pixels).save(tmp_path / "a.png")
    assert cli.main(["predict", "-m", str(tmp_path / "model"), str(tmp_path / "a.png"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"cannot predict image {str(tmp_path / 'a.png')!r}: image 0: its pixel values overflow float32" in err


# ---------------------------------------------------------------------------------------------- hostile image files
def _wide_bmp(width: int) -> bytes:
    """A BMP header declaring ``width`` x 1 pixels of 32 bits (under PIL's decompression-bomb limit), 16 bytes of
    data: PIL's decoder refuses a row that wide with a bare MemoryError."""
    info = struct.pack("<IiiHHIIiiII", 40, width, 1, 1, 32, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 16, 0, 0, 54) + info + b"\0" * 16


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_whose_header_pil_cannot_decode_for_memory_is_named_and_the_others_predicted(tmp_path, capsys):
    from transformers.image_utils import load_image as transformers_load_image

    from pvtv2.data.depth import read_depth_png
    from pvtv2.data.masks import read_mask
    from pvtv2.data.processing import load_image

    save_tiny_classifier(tmp_path / "model")
    wide = tmp_path / "wide.bmp"
    wide.write_bytes(_wide_bmp(100_000_000))
    with pytest.raises(MemoryError):  # the reference reader raises it bare
        transformers_load_image(str(wide))
    with pytest.raises(ValueError, match=re.escape(f"cannot read image {str(wide)!r}: PIL could not allocate the "
                                                   f"memory to decode its 100000000 x 1 pixels (MemoryError)")):
        load_image(wide)
    for read, what in ((read_mask, "mask"), (read_depth_png, "depth map")):
        with pytest.raises(ValueError, match=re.escape(f"cannot read {what} {str(wide)!r}: MemoryError")):
            read(wide)
    good = tmp_path / "good.png"
    PIL.Image.fromarray(np.random.default_rng(35).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(good)
    # it ended the run as "not enough memory to build or run the model", the good image's result lost with it
    assert cli.main(["predict", "-m", str(tmp_path / "model"), str(wide), str(good), "--no-progress", "--json"]) == 2
    out = capsys.readouterr()
    results = {r["image"]: r for r in json.loads(out.out)}
    assert "PIL could not allocate the memory" in results[str(wide)]["error"]
    # the good image's result is the one it gets alone
    assert cli.main(["predict", "-m", str(tmp_path / "model"), str(good), "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [results[str(good)]] and "predictions" in results[str(good)]


_FORMATS = [("PNG", "png"), ("JPEG", "jpg"), ("GIF", "gif"), ("WEBP", "webp"), ("TIFF", "tif"), ("BMP", "bmp"),
            ("PPM", "ppm")]
_MODES = ["RGB", "L", "RGBA", "P", "LA", "CMYK", "I;16", "F", "1"]
SEED, CASES = 35, 300


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's "Corrupt EXIF data", "Truncated File Read"...
def test_seeded_damaged_image_files_read_as_transformers_reads_them_or_are_named(tmp_path):
    """300 image files (seed 35) of random formats, modes, sizes and EXIF orientations, cut short, with bytes
    flipped or zeroed, or intact: each reads as the RGB pixels transformers' load_image and convert_to_rgb give (16-bit
    greyscale scaled, not clipped: documented), or is a ValueError naming the file; nothing else escapes."""
    from transformers.image_transforms import convert_to_rgb
    from transformers.image_utils import load_image as transformers_load_image

    from pvtv2.data.processing import load_image

    rng = random.Random(SEED)
    outcomes = {"read": 0, "refused": 0}
    while sum(outcomes.values()) < CASES:
        (fmt, ext), mode = rng.choice(_FORMATS), rng.choice(_MODES)
        pixels = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (rng.randint(1, 40), rng.randint(1, 40), 3),
                                                                       dtype=np.uint8)
        image = PIL.Image.fromarray(pixels).convert(mode) if mode != "I;16" else PIL.Image.fromarray(
            pixels[..., 0].astype(np.uint16) * 257)
        exif = image.getexif()
        if rng.random() < 0.3:
            exif[0x0112] = rng.randint(0, 10)
        buffer = io.BytesIO()
        try:
            image.save(buffer, format=fmt, exif=exif)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a mode this format cannot store
        data = bytearray(buffer.getvalue())
        damage = rng.choice(["cut", "flip", "zero", "none"])
        if damage == "cut":
            data = data[: rng.randrange(len(data))]
        elif damage == "flip":
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif damage == "zero":
            start = rng.randrange(len(data))
            end = min(len(data), start + rng.randint(1, 64))
            data[start:end] = bytes(end - start)
        path = tmp_path / f"{sum(outcomes.values())}.{ext}"
        path.write_bytes(bytes(data))
        try:
            ours = load_image(path)
        except ValueError as error:
            assert repr(str(path)) in str(error), (fmt, mode, damage, error)
            outcomes["refused"] += 1
            continue
        assert ours.mode == "RGB"
        outcomes["read"] += 1
        if mode != "I;16":
            theirs = convert_to_rgb(transformers_load_image(str(path)))
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs), err_msg=f"{fmt} {mode} {damage}")
    assert min(outcomes.values()) >= 50, outcomes  # both kinds drawn
