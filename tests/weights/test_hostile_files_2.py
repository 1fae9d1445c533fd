"""More hostile checkpoints: safetensors headers that lie, odd dtypes and wrappers, entries of a folder that are not
files, NaN weights, another variant's weights, and a Hugging Face cache whose snapshot is broken."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct

import pytest
import torch
from huggingface_hub import constants

from pvtv2 import CheckpointError, PvtV2Config, PvtV2ForImageClassification
from pvtv2.inference import load_classifier
from pvtv2.weights.files import save_state_dict
from pvtv2.weights.hub import HubFileNotFound

from conftest import TINY, random_weights_, relative_error


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A save_pretrained folder of a tiny classifier with random weights, and the model."""
    model = random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5))).eval()
    folder = tmp_path_factory.mktemp("saved") / "tiny"
    model.save_pretrained(folder)
    return folder, model


def _copy(saved, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(saved[0], folder)
    return folder


# ---------------------------------------------------------------------------------------------- lying headers
def _with_header(raw: bytes, edit, length: int | None = None) -> bytes:
    """The safetensors file ``raw`` with its JSON header changed by ``edit`` (and its length field by ``length``)."""
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + size])
    edit(header)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + raw[8 + size :]


def _first(header):
    return header[sorted(k for k in header if k != "__metadata__")[0]]


def _second(header):
    return header[sorted(k for k in header if k != "__metadata__")[1]]


LIES = {
    "offsets past the end": lambda h: _first(h).update(data_offsets=[10**9, 10**9 + 64]),
    "overlapping tensors": lambda h: _second(h).update(data_offsets=_first(h)["data_offsets"]),
    "an unknown dtype": lambda h: _first(h).update(dtype="F99"),
    "a shape its bytes do not hold": lambda h: _first(h).update(shape=[999, 999]),
    "a huge header length": (lambda h: None, 2**62),
    "a header length past the end": (lambda h: None, 50_000_000),
}


@pytest.mark.parametrize("lie", list(LIES))
def test_safetensors_headers_that_lie_are_named(saved, tmp_path, lie):
    edit, length = LIES[lie] if isinstance(LIES[lie], tuple) else (LIES[lie], None)
    path = tmp_path / "lying.safetensors"
    path.write_bytes(_with_header((saved[0] / "model.safetensors").read_bytes(), edit, length))
    with pytest.raises(CheckpointError, match="is not a readable safetensors file"):
        PvtV2ForImageClassification.from_pretrained(path)


# ---------------------------------------------------------------------------------------------- dtypes, wrappers
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_other_float_dtypes_load_as_float32(saved, tmp_path, dtype, suffix):
    _, model = saved
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    loaded = PvtV2ForImageClassification.from_pretrained(save_state_dict(state, tmp_path / f"w{suffix}"))
    assert loaded.dtype == torch.float32
    for key, value in loaded.state_dict().items():  # the file's values, widened exactly
        assert torch.equal(value, state[key].float()), key


def test_a_training_checkpoint_with_two_copies_and_ddp_prefixes(saved, tmp_path):
    _, model = saved
    weights = {f"module.{k}": v for k, v in model.state_dict().items()}
    # A DeiT-style checkpoint (the original repository's) also holds an EMA copy, other weights: "model" is the one
    # loaded, which a checkpoint with two equal copies could not show.
    ema = {k: v + 0.05 * torch.randn_like(v) for k, v in weights.items()}
    torch.save({"model_ema": ema, "model": weights, "state_dict": weights, "optimizer": {"lr": 0.1}, "epoch": 3},
               tmp_path / "ckpt.pth")
    loaded = PvtV2ForImageClassification.from_pretrained(tmp_path / "ckpt.pth", num_labels=5).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(model(x).logits, loaded(x).logits) < 1e-6
        from_ema = PvtV2ForImageClassification.from_pretrained(tmp_path / "ckpt.pth", num_labels=5).eval()
        from_ema.load_state_dict({k[len("module."):]: v for k, v in ema.items()})
        assert relative_error(model(x).logits, from_ema(x).logits) > 1e-3  # the EMA copy would have shown


def test_the_state_dict_of_a_compiled_model_loads(saved, tmp_path):
    """torch.compile wraps a model, and its state dict's keys start with ``_orig_mod.``: they load as the model's."""
    _, model = saved
    compiled = torch.compile(model)  # nothing is compiled before a call: only the wrapper's state dict is used
    state = compiled.state_dict()
    assert all(k.startswith("_orig_mod.") for k in state)
    torch.save({"model": state}, tmp_path / "compiled.pth")
    loaded = PvtV2ForImageClassification.from_pretrained(tmp_path / "compiled.pth", num_labels=5).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(model(x).logits, loaded(x).logits) < 1e-6


# ---------------------------------------------------------------------------------------------- folder entries
# config.json as a folder used to be skipped without a word, the configuration guessed from the tensor shapes instead;
# model.safetensors as a folder used to say "expected model.safetensors ..., found [..., 'model.safetensors']".
@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_folder_where_a_checkpoint_file_belongs_is_named(saved, tmp_path, name):
    folder = _copy(saved, tmp_path)
    (folder / name).unlink()
    (folder / name).mkdir()
    with pytest.raises(ValueError, match=rf"{re.escape(name)}' is a folder, not a file"):
        PvtV2ForImageClassification.from_pretrained(folder)


def test_a_dangling_config_symlink_is_named_not_skipped(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(tmp_path / "gone.json")
    with pytest.raises(FileNotFoundError, match=r"config\.json' is a symlink to .*gone\.json.*which does not exist"):
        PvtV2ForImageClassification.from_pretrained(folder)


def test_a_folder_behind_a_symlink_and_a_unicode_path_with_spaces_load(saved, tmp_path):
    folder = tmp_path / "poids du modèle ✓"
    shutil.copytree(saved[0], folder)
    (tmp_path / "link").symlink_to(folder)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = saved[1](x).logits
        for source in (folder, tmp_path / "link", folder / "model.safetensors"):
            model = PvtV2ForImageClassification.from_pretrained(source, num_labels=5).eval()
            assert relative_error(expected, model(x).logits) < 1e-6


# ---------------------------------------------------------------------------------------------- NaN weights
def test_nan_weights_are_named_on_loading_and_refused_for_inference(saved, tmp_path, caplog):
    """They used to load without a word; `pvtv2 predict` then ranked NaN scores and printed "nan%" (and NaN, which
    is not JSON, with --json), exit status 0."""
    _, model = saved
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["pvt_v2.encoder.layers.1.blocks.0.mlp.dense1.weight"][0, 0] = float("nan")
    state["classifier.bias"][2] = float("inf")
    folder = _copy(saved, tmp_path)
    save_state_dict(state, folder / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        loaded = PvtV2ForImageClassification.from_pretrained(folder)
    warned = [r.getMessage() for r in caplog.records if "NaN or infinite" in r.getMessage()]
    assert len(warned) == 1 and "2 tensor(s)" in warned[0]
    assert "classifier.bias" in warned[0] and "layers.1.blocks.0.mlp.dense1.weight" in warned[0]
    assert not torch.isfinite(loaded(torch.randn(1, 3, 64, 64)).logits).all()  # what the warning is about
    with pytest.raises(ValueError, match=r"NaN or infinite weights in 2 tensor\(s\): classifier\.bias, pvt_v2\."):
        load_classifier(folder)
    # Export too: it used to fail its own check with "max abs diff nan > tolerance nan".
    from pvtv2.export import export_onnx

    with pytest.raises(ValueError, match=r"NaN or infinite weights in 2 tensor\(s\): classifier\.bias, pvt_v2\."):
        export_onnx(loaded, tmp_path / "nan.onnx")
    assert not (tmp_path / "nan.onnx").exists() and not list(tmp_path.glob(".nan.onnx*"))


def test_finite_weights_give_no_nan_warning(saved, caplog):
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        load_classifier(saved[0])
    assert not [r for r in caplog.records if "NaN" in r.getMessage()]


# ---------------------------------------------------------------------------------------------- another variant
def test_another_variants_weights_are_named_as_such(tmp_path, caplog):
    """B2's weights (1000 classes) with a config.json of a tiny 5-class model: the error says what the checkpoint is,
    and lists the classifier with both shapes. It used to warn "replacing the classifier head" first and then list
    the classifier as missing."""
    b2 = PvtV2ForImageClassification(PvtV2Config.from_preset("pvt_v2_b2"))
    b2.save_pretrained(tmp_path / "b2")
    (tmp_path / "b2" / "config.json").write_text(PvtV2Config(**TINY, num_labels=5).to_json_string())
    with caplog.at_level(logging.WARNING, logger="pvtv2"), pytest.raises(CheckpointError) as raised:
        PvtV2ForImageClassification.from_pretrained(tmp_path / "b2")
    message = str(raised.value)
    assert "the checkpoint has hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3] (pvt_v2_b2)" in message
    assert "hidden_sizes=[16, 32, 48, 64], depths=[1, 2, 1, 1]" in message
    assert "classifier.weight: checkpoint (1000, 512) vs model (5, 64)" in message
    assert "pvt_v2.encoder.layers.0.blocks.0.attention.key.weight: checkpoint (64, 64) vs model (16, 16)" in message
    assert "missing keys" not in message
    assert not [r for r in caplog.records if "replacing" in r.getMessage()]


# ---------------------------------------------------------------------------------------------- the hub cache
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def _hub_cache(root, saved_folder):
    """A cache laid out as huggingface_hub lays it out: refs/main -> commit, snapshot files linking into blobs/."""
    repo = root / "models--owner--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    blobs = {}
    for name in ("config.json", "model.safetensors"):
        data = (saved_folder / name).read_bytes()
        blobs[name] = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blobs[name].write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blobs[name], snapshot))
    return repo, blobs


BROKEN = {
    # The config's blob gone: it used to be skipped (an optional file) and the configuration guessed from shapes.
    "config blob missing": (lambda repo, blobs: blobs["config.json"].unlink(), r"config\.json' links to .*missing"),
    "weights blob missing": (lambda repo, blobs: blobs["model.safetensors"].unlink(),
                             r"model\.safetensors' links to .*missing"),
    "dangling ref": (lambda repo, blobs: (repo / "refs" / "main").write_text("f" * 40),
                     r"refs/main' names commit f{40}, whose snapshot folder .* is missing"),
    "garbage ref": (lambda repo, blobs: (repo / "refs" / "main").write_text("not a commit\n"),
                    r"refs/main' holds 'not a commit', not a commit hash"),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_a_broken_hub_cache_is_named(saved, tmp_path, monkeypatch, broken):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets: no network is tried
    cache = tmp_path / "hub"
    repo, blobs = _hub_cache(cache, saved[0])
    x = torch.randn(1, 3, 64, 64)
    intact = PvtV2ForImageClassification.from_pretrained("owner/tiny", cache_dir=cache).eval()
    with torch.no_grad():
        assert relative_error(saved[1](x).logits, intact(x).logits) < 1e-6  # the layout is one the hub code reads
    damage, says = BROKEN[broken]
    damage(repo, blobs)
    with pytest.raises(HubFileNotFound, match=f"the Hugging Face cache of 'owner/tiny' is damaged: .*{says}") as raised:
        PvtV2ForImageClassification.from_pretrained("owner/tiny", cache_dir=cache)
    assert f"Delete {str(repo)!r}" in str(raised.value)


def test_a_file_the_cache_never_had_is_still_absent_not_damaged(saved, tmp_path, monkeypatch):
    """Only damage is called damage: a snapshot without config.json loads with the configuration read off the
    shapes, as before."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hub"
    repo, _ = _hub_cache(cache, saved[0])
    (repo / "snapshots" / COMMIT / "config.json").unlink()
    model = PvtV2ForImageClassification.from_pretrained("owner/tiny", cache_dir=cache).eval()
    assert model.config.hidden_sizes == TINY["hidden_sizes"] and model.config.num_labels == 5
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # loaded, not just configured: the saved model's numbers
        assert relative_error(saved[1](x).logits, model(x).logits) < 1e-6


# ---------------------------------------------------------------------------------------------- sharded indexes
def _sharded(saved, tmp_path, weight_map=None):
    """``saved`` as two shards and a model.safetensors.index.json (``weight_map`` replaces the true one)."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(saved[0] / "config.json", folder)
    state = saved[1].state_dict()
    keys = sorted(state)
    true_map = {k: f"model-0000{1 + (i >= len(keys) // 2)}-of-00002.safetensors" for i, k in enumerate(keys)}
    for shard in set(true_map.values()):
        save_state_dict({k: state[k] for k in keys if true_map[k] == shard}, folder / shard)
    index = {"metadata": {}, "weight_map": true_map if weight_map is None else weight_map(keys)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_a_sharded_checkpoint_loads(saved, tmp_path):
    model = PvtV2ForImageClassification.from_pretrained(_sharded(saved, tmp_path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(saved[1](x).logits, model(x).logits) < 1e-6


SHARD_INDEXES = {
    # These used to read the files they named, wherever they were.
    "an absolute shard path": (lambda keys, saved: {k: str(saved[0] / "model.safetensors") for k in keys},
                               CheckpointError, "which is not a file name in its folder"),
    "a shard path out of the folder": (lambda keys, saved: {k: "../../saved0/tiny/model.safetensors" for k in keys},
                                       CheckpointError, "which is not a file name in its folder"),
    # It used to say "checkpoint file not found: '<the folder>'".
    "the folder as a shard": (lambda keys, saved: {k: "." for k in keys}, CheckpointError, "'.', which is not a file"),
    "a missing shard": (lambda keys, saved: {k: "model-00003-of-00002.safetensors" for k in keys}, FileNotFoundError,
                        "names the shard 'model-00003-of-00002.safetensors', which is not in its folder"),
    "a list for a weight map": (lambda keys, saved: [1, 2], CheckpointError, "not a valid sharded-checkpoint index"),
}


@pytest.mark.parametrize("case", list(SHARD_INDEXES))
def test_hostile_shard_indexes_are_named(saved, tmp_path, case):
    weight_map, error, says = SHARD_INDEXES[case]
    folder = _sharded(saved, tmp_path, lambda keys: weight_map(keys, saved))
    with pytest.raises(error, match=re.escape(says)):
        PvtV2ForImageClassification.from_pretrained(folder)


def test_a_sharded_hub_checkpoint_fetches_its_shards_from_the_hub(saved, tmp_path, monkeypatch):
    """A hub id whose weights are sharded: the shards are the repository's files too. They used to be looked for
    beside the cached index only, so a cache holding the index but not every shard failed with 'not in its folder'
    where the hub would have given them. Here a stand-in for huggingface_hub's download serves a folder as the hub
    and caches what it serves; the cache starts with the config and the index only."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    remote = _sharded(saved, tmp_path)
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    for name in ("config.json", "model.safetensors.index.json"):
        shutil.copy(remote / name, cache)
    asked = []

    def hub_download(repo_id, filename, *, revision=None, cache_dir=None, local_files_only=False, **_):
        assert repo_id == "owner/sharded"
        asked.append((filename, local_files_only))
        if (cache / filename).is_file():
            return str(cache / filename)
        if local_files_only or not (remote / filename).is_file():
            raise LocalEntryNotFoundError(f"{filename} not cached")
        shutil.copy(remote / filename, cache / filename)
        return str(cache / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the stand-in is the only "network"
    # The repository is known to the cache (huggingface_hub's folder for it exists): offline, a file it lacks is then
    # absent, not unknown (a repository never downloaded makes every file an error).
    known = tmp_path / "hf" / "models--owner--sharded"
    (known / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (known / "refs").mkdir()
    (known / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    model = PvtV2ForImageClassification.from_pretrained("owner/sharded").eval()
    shards = sorted({v for v in json.loads((remote / "model.safetensors.index.json").read_text())["weight_map"].values()})
    assert [name for name, local in asked if not local and name in shards] == shards  # each downloaded once
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(saved[1](x).logits, model(x).logits) < 1e-6
    # Without the hub, a shard missing from the cache is named as the hub's file, with how to get it.
    (cache / shards[0]).unlink()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo_id, filename, **kw: hub_download(repo_id, filename, **kw) if filename != shards[0]
                        else (_ for _ in ()).throw(LocalEntryNotFoundError("offline")))
    with pytest.raises(HubFileNotFound, match=re.escape(f"{shards[0]!r} of 'owner/sharded' is not in the Hugging Face cache")):
        PvtV2ForImageClassification.from_pretrained("owner/sharded")
