"""What a seeded mutation fuzzer of checkpoint files found, and a compact seeded fuzz of its own.

Found: a timm / authors' ``attn.kv`` tensor that is a scalar (IndexError inside the renaming), a shard index naming
itself as a shard (RecursionError), a patch embedding of width 0 beside a config.json (ZeroDivisionError while
naming the misfit), a parameter's name holding a list (skipped: the head loaded as "newly initialised", and
``pvtv2 convert`` wrote a head-less model), and ``convert`` writing float16 / bfloat16 / float64 weights as float32
(float64 rounded). The fuzz below mutates a tiny checkpoint's bytes, header, tensors and files: every outcome must
be a documented error naming the problem, or a load whose weights are the file's own numbers.
"""

from __future__ import annotations

import json
import random
import re
import struct
import warnings

import numpy as np
import pytest
import torch

from pvtv2 import CheckpointError, PvtV2Config, PvtV2ForImageClassification, cli
from pvtv2.export import convert_checkpoint
from pvtv2.weights.files import read_state_dict, save_state_dict
from pvtv2.weights.layouts import convert_state_dict

from conftest import TINY, random_weights_

# The errors the project documents for bad files and arguments (the CLI prints these without a traceback).
DOCUMENTED = (CheckpointError, ValueError, TypeError, FileNotFoundError, OSError)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny classifier with random weights and its save_pretrained folder (safetensors)."""
    model = random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5))).eval()
    folder = tmp_path_factory.mktemp("fuzz31") / "tiny"
    model.save_pretrained(folder)
    return folder, model


def _timm_file(model, path, edit=None):
    state = convert_state_dict(model.state_dict(), "timm")
    if edit is not None:
        edit(state)
    return save_state_dict(state, path)


def _cli(capsys, *argv):
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the defects found
@pytest.mark.parametrize("shape", [(), (33,)])
def test_a_kv_tensor_that_is_no_stacked_pair_is_named(tiny, tmp_path, capsys, shape):
    # a scalar stopped with "IndexError: tuple index out of range" inside to_canonical, in from_pretrained and as a
    # traceback from `pvtv2 info` / `pvtv2 convert`; an odd row count split into a key and a value of unequal widths
    key = "stages.3.blocks.0.attn.kv.bias"
    path = _timm_file(tiny[1], tmp_path / "kv.safetensors", lambda s: s.__setitem__(key, torch.ones(shape)))
    says = f"{key} has the shape {shape}, which is not the key's and the value's bias stacked"
    with pytest.raises(CheckpointError, match=rf"{key} has the shape \({shape[0] if shape else ''},?\)"):
        PvtV2ForImageClassification.from_pretrained(path)
    for argv in (["info", str(path)], ["convert", str(path), str(tmp_path / "out")]):
        code, err = _cli(capsys, *argv)
        assert code == 2 and says in err


def test_a_shard_index_naming_an_index_as_its_shard_is_named(tiny, tmp_path):
    # it read itself as its own shard until a RecursionError
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny[0] / "config.json").read_bytes())
    index = {"weight_map": {k: "model.safetensors.index.json" for k in tiny[1].state_dict()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="names the shard 'model.safetensors.index.json', which is an index of "
                                              "shards, not a weights file"):
        PvtV2ForImageClassification.from_pretrained(folder)


def test_a_patch_embedding_of_width_zero_beside_a_config_json_is_named(tiny, tmp_path):
    # naming which config field the weights contradict divided by the stage's width: ZeroDivisionError
    folder = tmp_path / "zero"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny[0] / "config.json").read_bytes())
    key = "pvt_v2.encoder.layers.2.patch_embedding.proj.weight"
    state = dict(tiny[1].state_dict(), **{key: torch.zeros(0, 32, 3, 3)})
    save_state_dict(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{key}: .*\(0, 32, 3, 3\)") as raised:
        PvtV2ForImageClassification.from_pretrained(folder)
    assert "the model was built from" in str(raised.value)


@pytest.mark.parametrize("value", [[0.5] * 5, 3])
def test_a_parameter_holding_no_tensor_is_named_not_skipped(tiny, tmp_path, capsys, value):
    # skipped, the classifier was loaded as missing: from_pretrained gave a random head "newly initialised" and
    # `pvtv2 convert` wrote the encoder alone, for a file that holds the classifier (damaged)
    state = dict(tiny[1].state_dict())
    state["classifier.bias"] = value
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_bytes((tiny[0] / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match=rf"'classifier.bias' holds a {type(value).__name__}, not a tensor"):
        PvtV2ForImageClassification.from_pretrained(tmp_path)
    code, err = _cli(capsys, "convert", str(tmp_path), str(tmp_path / "out"))
    assert code == 2 and "'classifier.bias' holds a" in err and not (tmp_path / "out").exists()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("via", ["api", "cli"])
def test_convert_keeps_the_precision_the_weights_are_stored_in(tiny, tmp_path, capsys, dtype, via):
    # every conversion read the weights as float32: float64 ones came out rounded, float16 / bfloat16 ones twice
    # their size (and from_pretrained(dtype="auto") then built a float32 model)
    model = random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5)), seed=3).eval().to(dtype)
    model.save_pretrained(tmp_path / "src")
    steps = [(tmp_path / "src", tmp_path / "timm.safetensors", "timm"), (tmp_path / "timm.safetensors",
             tmp_path / "original.pth", "original"), (tmp_path / "original.pth", tmp_path / "back", None)]
    for source, output, layout in steps:
        if via == "api":
            convert_checkpoint(source, output, layout)
        else:
            assert cli.main(["convert", str(source), str(output)] + (["--layout", layout] if layout else [])) == 0
    written = read_state_dict(tmp_path / "timm.safetensors")
    assert {t.dtype for t in written.values()} == {dtype}
    expected = convert_state_dict(model.state_dict(), "timm")
    assert all(torch.equal(_bits(written[k]), _bits(v)) for k, v in expected.items())
    back = PvtV2ForImageClassification.from_pretrained(tmp_path / "back", dtype="auto")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    state = back.state_dict()
    assert all(state[k].dtype == dtype and torch.equal(_bits(state[k]), _bits(v)) for k, v in model.state_dict().items())


def test_convert_of_a_file_mixing_float_dtypes_keeps_every_value(tiny, tmp_path):
    # float16 beside bfloat16: neither holds the other, float32 holds both exactly
    state = convert_state_dict(tiny[1].state_dict(), "timm")
    state = {k: v.half() if i % 2 else v.bfloat16() for i, (k, v) in enumerate(state.items())}
    save_state_dict(state, tmp_path / "mixed.safetensors")
    convert_checkpoint(tmp_path / "mixed.safetensors", tmp_path / "out.safetensors", "timm")
    out = read_state_dict(tmp_path / "out.safetensors")
    assert all(out[k].dtype == torch.float32 and torch.equal(out[k], v.float()) for k, v in state.items())


# ---------------------------------------------------------------------------------------------- a compact fuzz
def _numpy_safetensors(raw: bytes) -> dict[str, np.ndarray]:
    """An independent reading of a float32 safetensors file (json + numpy, not the safetensors library)."""
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + size])
    body = raw[8 + size :]
    out = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        assert entry["dtype"] == "F32"
        start, stop = entry["data_offsets"]
        out[key] = np.frombuffer(body[start:stop], dtype="<f4").reshape(entry["shape"])
    return out


def _header_lie(rng: random.Random, raw: bytes) -> bytes:
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + size])
    body = raw[8 + size :]
    key = rng.choice(sorted(k for k in header if k != "__metadata__"))
    entry = header[key]
    lie = rng.randrange(9)
    if lie == 0:
        entry["data_offsets"] = [len(body) + 8, len(body) + 16]
    elif lie == 1:
        entry["shape"] = [2**31, 2**31]
    elif lie == 2:
        entry["dtype"] = rng.choice(["I32", "BOOL", "C64", "F99", "U8"])
    elif lie == 3:
        entry["shape"] = entry["shape"][::-1] + [1]
    elif lie == 4:
        header[key] = [1, 2]
    elif lie == 5:
        header[key + "x"] = header.pop(key)
    elif lie == 6:
        del header[key]
    elif lie == 7:
        return struct.pack("<Q", rng.choice([2**64 - 1, size + 1000, 3])) + raw[8:]
    else:
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text) + 2) + text + b"\xff\xfe" + body
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def _mutate(rng: random.Random, raw: bytes) -> tuple[bytes, str]:
    kind = rng.choice(["flip", "truncate", "extend", "header"])
    data = bytearray(raw)
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        return bytes(data), kind
    if kind == "truncate":
        return bytes(data[: rng.randrange(len(data))]), kind
    if kind == "extend":
        return bytes(data) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))), kind
    return _header_lie(rng, raw), kind


def test_seeded_mutations_of_a_safetensors_file_are_named_or_load_the_files_own_numbers(tiny, tmp_path, capsys):
    raw = (tiny[0] / "model.safetensors").read_bytes()
    rng = random.Random(31)
    outcomes = {"error": 0, "loaded": 0}
    for case in range(36):
        data, kind = _mutate(rng, raw)
        folder = tmp_path / str(case)
        folder.mkdir()
        (folder / "config.json").write_bytes((tiny[0] / "config.json").read_bytes())
        (folder / "model.safetensors").write_bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no library warning before the answer
                model = PvtV2ForImageClassification.from_pretrained(folder)
        except DOCUMENTED as err:
            outcomes["error"] += 1
            assert str(folder) in str(err) or "model.safetensors" in str(err), (case, kind, err)
            code, said = _cli(capsys, "info", str(folder))
            assert code == 2 and said.startswith("pvtv2 info: error:"), (case, kind, said)
            continue
        outcomes["loaded"] += 1
        # loaded: every weight is the file's own number, read independently of the safetensors library
        expected = _numpy_safetensors(data)
        state = model.state_dict()
        assert expected.keys() == state.keys(), (case, kind)
        for key, value in expected.items():
            assert np.array_equal(state[key].numpy(), value, equal_nan=True), (case, kind, key)
        code, said = _cli(capsys, "convert", str(folder), str(folder / "out"))
        assert code == 0, (case, kind, said)
        again = PvtV2ForImageClassification.from_pretrained(folder / "out").state_dict()
        assert all(torch.equal(_bits(again[k]), _bits(v)) for k, v in state.items()), (case, kind)
    assert outcomes["error"] >= 10 and outcomes["loaded"] >= 3, outcomes  # both paths were exercised


class _Marker:
    """Unpickled, it would create the marker file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_seeded_mutations_of_a_pytorch_checkpoint_are_named_and_run_no_code(tiny, tmp_path):
    base = tiny[1].state_dict()
    marker = tmp_path / "ran"
    rng = random.Random(131)
    wrappers = [
        lambda s: {"state_dict": s, "hook": _Marker(marker)},
        lambda s: dict(s, **{"zz": [_Marker(marker)]}),
        lambda s: [s],
        lambda s: dict(s, **{"pvt_v2.encoder.layers.0.layer_norm.bias": "x"}),
        lambda s: {7: torch.zeros(1), **s},
        lambda s: {k: v.to(rng.choice([torch.int32, torch.bool, torch.complex64])) if i == 3 else v
                   for i, (k, v) in enumerate(s.items())},
        lambda s: {k: v for i, (k, v) in enumerate(s.items()) if i != 5},
        lambda s: {"stages.0.blocks.0.attn.kv.weight": torch.tensor(1.0), **s},
    ]
    for case in range(16):
        state = rng.choice(wrappers)(dict(base))
        path = tmp_path / f"{case}.pth"
        torch.save(state, path)
        raw = bytearray(path.read_bytes())
        if rng.random() < 0.5:  # and damaged bytes on top, at times
            for _ in range(rng.randint(1, 3)):
                raw[rng.randrange(len(raw))] ^= 0xFF
            path.write_bytes(bytes(raw))
        try:
            model = PvtV2ForImageClassification.from_pretrained(path, num_attention_heads=TINY["num_attention_heads"])
        except DOCUMENTED as err:
            assert str(path) in str(err) or "shape" in str(err) or "keys" in str(err), (case, err)
        else:
            # only a flipped byte in a tensor's data can leave a loadable file, whose numbers are then its own
            loaded = model.state_dict()
            stored = read_state_dict(path)
            assert all(torch.equal(_bits(loaded[k]), _bits(stored[k])) for k in loaded), case
        assert not marker.exists(), case  # no pickled code ran


@pytest.mark.parametrize("key, value, shown", [
    ("block1.0.attn.sr.weight", torch.tensor(1.0), "()"),
    ("block2.0.mlp.fc1.weight", torch.tensor(1.0), "()"),
    ("block4.0.mlp.fc1.weight", torch.zeros(0, 64), "(0, 64)"),
])
def test_a_weight_of_no_layers_shape_is_named_when_the_config_is_read_off_the_shapes(tiny, tmp_path, key, value, shown):
    # reading the reduction ratio or the MLP width off a scalar stopped with "IndexError: tuple index out of range";
    # an MLP 0 wide with "mlp_ratios must hold positive numbers", naming neither the file's tensor nor its shape
    state = convert_state_dict(tiny[1].state_dict(), "original")
    state[key] = value
    torch.save(state, tmp_path / "original.pth")
    with pytest.raises(CheckpointError, match=rf"\.weight has the shape {re.escape(shown)}, where PVTv2 has a [24]-D "
                                              rf"weight with no side of 0"):
        PvtV2ForImageClassification.from_pretrained(tmp_path / "original.pth")


def test_convert_refuses_half_a_classifier_rather_than_dropping_it(tiny, tmp_path, capsys):
    # a classifier's bias without its weight: convert wrote the encoder alone (PvtV2Model), the bias dropped unnamed
    path = _timm_file(tiny[1], tmp_path / "half.safetensors", lambda s: s.pop("head.weight"))
    code, err = _cli(capsys, "convert", str(path), str(tmp_path / "out"))
    assert code == 2 and "classifier" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtypes", [(torch.float8_e4m3fn, torch.float32), (torch.float8_e5m2,), (torch.float16, torch.float64)])
def test_convert_of_float8_or_mixed_weights_writes_every_value_exactly(tiny, tmp_path, capsys, dtypes):
    # float8 beside float32 stopped with torch's "Promotion for Float8 Types is not supported" (a traceback from
    # `pvtv2 convert`); float8 alone is upcast to float32, float16 beside float64 kept as float64
    state = convert_state_dict(tiny[1].state_dict(), "timm")
    state = {k: v.to(dtypes[i % len(dtypes)]) for i, (k, v) in enumerate(state.items())}
    save_state_dict(state, tmp_path / "in.safetensors")
    code, err = _cli(capsys, "convert", str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"),
                     "--layout", "timm")
    assert code == 0, err
    out = read_state_dict(tmp_path / "out.safetensors")
    wide = torch.float64 if torch.float64 in dtypes else torch.float32
    assert all(out[k].dtype == wide and torch.equal(out[k], v.to(wide)) for k, v in state.items())


def test_a_pytorch_archive_holding_a_member_twice_is_named(tiny, tmp_path):
    # torch read one of the two copies of a tensor's bytes without a word (the fuzzer's loads had other numbers)
    import zipfile

    torch.save(tiny[1].state_dict(), tmp_path / "whole.bin")
    with zipfile.ZipFile(tmp_path / "whole.bin") as src, zipfile.ZipFile(tmp_path / "pytorch_model.bin", "w") as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info.filename))
            if info.filename.endswith("/data/3"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # zipfile's "Duplicate name": the point of the file
                    out.writestr(info.filename, src.read(info.filename)[::-1])
    (tmp_path / "config.json").write_bytes((tiny[0] / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match=r"holds the member '.*/data/3' twice .* ambiguous"):
        PvtV2ForImageClassification.from_pretrained(tmp_path)


_ODD_VALUES = [None, True, 0, -1, 1.5, 10**12, "x", "", [], [1, 2, 3], [0, 0, 0, 0], ["a", "b", "c", "d"],
               [1.5, 2, 2, 2], {"a": 1}, float("nan"), float("inf"), "1e-6", [[1]], {"0": 1}, [10**6, 32, 48, 64]]
_FIELDS = ["depths", "hidden_sizes", "num_attention_heads", "mlp_ratios", "sr_ratios", "patch_sizes", "strides",
           "num_channels", "num_encoder_blocks", "num_labels", "layer_norm_eps", "hidden_act", "qkv_bias",
           "linear_attention", "model_type", "id2label", "label2id", "image_size", "drop_path_rate"]


def test_seeded_mutations_of_a_config_json_and_a_shard_index_are_named_or_load_the_weights_exactly(tiny, tmp_path):
    """config.json fields of wrong types and values, and a two-shard index whose weight map lies: each load is a
    documented error or the saved weights bit for bit (a field that changes no weight, such as the labels, may load)."""
    saved = tiny[1].state_dict()
    sharded = tmp_path / "sharded"
    tiny[1].save_pretrained(sharded, max_shard_size="100KB")
    index_name = "model.safetensors.index.json"
    index = json.loads((sharded / index_name).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    rng = random.Random(1031)
    outcomes = {"error": 0, "loaded": 0}
    for case in range(40):
        folder = tmp_path / str(case)
        folder.mkdir()
        for name in [index_name, *shards]:
            (folder / name).symlink_to(sharded / name)
        config = json.loads((sharded / "config.json").read_text())
        if case % 4 == 3:  # what no weight depends on: loads
            config[rng.choice(["architectures", "_name_or_path", "transformers_version"])] = rng.choice(_ODD_VALUES)
        elif case % 2:
            config[rng.choice(_FIELDS)] = rng.choice(_ODD_VALUES)
        else:
            weight_map = dict(index["weight_map"])
            key = rng.choice(sorted(weight_map))
            weight_map[key] = rng.choice([
                "../sharded/" + weight_map[key], "/etc/passwd", "model-99999.safetensors", index_name, 7, None, "",
                shards[0] if weight_map[key] != shards[0] else shards[1], "config.json", ".",
            ])
            if rng.random() < 0.3:
                del weight_map[rng.choice(sorted(weight_map))]
            (folder / index_name).unlink()
            (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (folder / "config.json").write_text(json.dumps(config))
        try:
            model = PvtV2ForImageClassification.from_pretrained(folder)
        except DOCUMENTED as err:
            outcomes["error"] += 1
            assert str(folder) in str(err) or "config" in str(err), (case, err)
            continue
        outcomes["loaded"] += 1
        state = model.state_dict()
        assert state.keys() == saved.keys(), case
        assert all(torch.equal(_bits(state[k]), _bits(v)) for k, v in saved.items()), case
    assert outcomes["error"] >= 10 and outcomes["loaded"] >= 3, outcomes
