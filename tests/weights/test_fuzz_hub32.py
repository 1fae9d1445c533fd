"""Hub ids loaded from random local caches laid out as huggingface_hub lays them out (refs/, snapshots/<commit>/,
blobs/, .no_exist/), offline: several revisions holding different weights in different file layouts (safetensors,
shards, PyTorch pickles, timm's files with timm's config.json), symlinked or copied, in a subfolder or not, some entries
damaged. The file that must be loaded is the one huggingface_hub's own ``try_to_load_from_cache`` resolves for the
revision asked (in transformers' order of weight file names), and the loaded tensors must be those written to it;
where huggingface_hub resolves nothing, or the snapshot is damaged, loading must fail naming the repository or the
damaged entry."""

from __future__ import annotations

import hashlib
import json
import os
import random

import pytest
import torch
from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub.file_download import _CACHED_NO_EXIST
from safetensors.torch import save_file

from pvtv2 import PvtV2Config, PvtV2ForImageClassification
from pvtv2.weights.hub import HubFileNotFound
from pvtv2.weights.layouts import convert_state_dict
from pvtv2.weights.loading import WEIGHT_FILES

timm = pytest.importorskip("timm")

REPO = "org/name"
SMALL = dict(num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
             sr_ratios=[2, 1], patch_sizes=[7, 3], strides=[4, 2], image_size=32)
LAYOUTS = ["safetensors", "bin", "sharded_st", "sharded_bin", "both", "timm_st", "timm_bin", "no_config"]
DAMAGE = ["broken_blob", "loop", "no_exist", "ghost_ref", "folder"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets: no network is tried


def _state(seed: int, labels: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = PvtV2ForImageClassification(PvtV2Config(**SMALL, num_labels=labels))
    return {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in model.state_dict().items()}


def _timm_config(labels: int) -> bytes:
    # What timm's hub repositories hold (timm/pvt_v2_b0.in1k): no model_type, no PVTv2 field.
    return json.dumps({"architecture": "pvt_v2_b0", "num_classes": labels, "num_features": 16,
                       "pretrained_cfg": {"input_size": [3, 32, 32], "num_classes": labels, "crop_pct": 0.9,
                                          "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
                                          "std": [0.229, 0.224, 0.225], "classifier": "head"}}).encode()


def _write(path, tensors: dict[str, torch.Tensor]) -> None:
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    else:
        torch.save(tensors, path)


def _revision_files(rng: random.Random, seed: int, layout: str, tmp) -> tuple[dict[str, bytes], dict[str, dict]]:
    """The files of one revision ({name: bytes}) and the canonical tensors each weights file holds."""
    labels = rng.randint(2, 5)
    state = _state(seed, labels)
    config = PvtV2Config(**SMALL, num_labels=labels).to_json_string().encode()
    files, holds = {"config.json": config}, {}

    def add(name, tensors, canonical):
        _write(tmp / f"t.{name.rsplit('.', 1)[1]}", tensors)
        files[name] = (tmp / f"t.{name.rsplit('.', 1)[1]}").read_bytes()
        if canonical is not None:
            holds[name] = canonical

    if layout in ("safetensors", "no_config", "both"):
        add("model.safetensors", state, state)
    if layout in ("bin", "both"):
        other = _state(seed + 1000, labels) if layout == "both" else state
        add("pytorch_model.bin", other, other)
    if layout in ("sharded_st", "sharded_bin"):
        ext, stem = ("safetensors", "model") if layout == "sharded_st" else ("bin", "pytorch_model")
        keys, n = sorted(state), rng.randint(2, 3)
        weight_map = {}
        for i in range(n):
            shard = f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}"
            add(shard, {k: state[k] for k in keys[i::n]}, None)
            weight_map.update({k: shard for k in keys[i::n]})
        files[f"{stem}.{ext}.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
        holds[f"{stem}.{ext}.index.json"] = state
    if layout.startswith("timm"):
        add("model.safetensors" if layout == "timm_st" else "pytorch_model.bin", convert_state_dict(state, "timm"), state)
        files["config.json"] = _timm_config(labels)
    if layout == "no_config" or (layout.startswith("timm") and rng.random() < 0.3):
        del files["config.json"]
    return files, holds


def _random_cache(rng: random.Random, seed: int, root) -> tuple[list[dict], str | None, list[tuple]]:
    repo = root / "models--org--name"
    for folder in ("refs", "blobs", "snapshots"):
        (repo / folder).mkdir(parents=True)
    sub = rng.choice([None, None, "sub", "a/b"])
    branches = ["dev", "v1.0", "refs/pr/1"]
    rng.shuffle(branches)
    revisions = []
    for r in range(rng.randint(1, 3)):
        commit = f"{rng.getrandbits(160):040x}"
        files, holds = _revision_files(rng, seed * 10 + r, rng.choice(LAYOUTS), root)
        prefix = f"{sub}/" if sub and rng.random() < 0.85 else ""
        snapshot = repo / "snapshots" / commit
        for name, data in files.items():
            entry = snapshot / (prefix + name)
            entry.parent.mkdir(parents=True, exist_ok=True)
            if rng.random() < 0.8:  # as huggingface_hub stores it: a relative symlink into blobs/
                blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
                blob.write_bytes(data)
                entry.symlink_to(os.path.relpath(blob, entry.parent))
            else:  # a copied cache (or a file system without symlinks)
                entry.write_bytes(data)
        refs = ["main"] if r == 0 else [branches.pop()] if rng.random() < 0.7 else []
        for ref in refs:
            (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
            (repo / "refs" / ref).write_text(commit)
        revisions.append(dict(commit=commit, refs=refs, prefix=prefix,
                              holds={prefix + k: v for k, v in holds.items()}))
    damaged = []  # (commit, entry) of each entry made unreadable
    for _ in range(rng.choice([0, 0, 1, 2])):
        kind, rev = rng.choice(DAMAGE), rng.choice(revisions)
        snapshot = repo / "snapshots" / rev["commit"]
        entries = sorted(os.path.relpath(os.path.join(d, f), snapshot) for d, _, fs in os.walk(snapshot) for f in fs)
        entries = [e for e in entries if os.path.lexists(snapshot / e) and (snapshot / e).is_file()]
        if not entries:
            continue
        entry = rng.choice(entries)
        path = snapshot / entry
        if kind == "broken_blob" and path.is_symlink():
            path.resolve().unlink()  # every blob is one file's: no other entry loses it
            damaged.append((rev["commit"], entry))
        elif kind == "loop":
            path.unlink()
            path.symlink_to(path.name)
            damaged.append((rev["commit"], entry))
        elif kind == "folder":
            path.unlink()
            path.mkdir()
            damaged.append((rev["commit"], entry))
        elif kind == "no_exist" and entry.endswith("model.safetensors"):
            # the hub said the file is not at this commit: gone from the snapshot, recorded under .no_exist/
            path.unlink()
            marker = repo / ".no_exist" / rev["commit"] / entry
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            rev["holds"].pop(entry, None)
        elif kind == "ghost_ref":
            (repo / "refs" / "ghost").write_text(f"{rng.getrandbits(160):040x}")  # a ref to a snapshot not there
    return revisions, sub, damaged


def _resolved(root, revision: str | None, subfolder: str | None, use_safetensors: bool | None
              ) -> tuple[str, str] | None:
    """(file, commit) huggingface_hub's cache lookup resolves, trying transformers' weight file names in order
    (``use_safetensors``: True the safetensors ones only, False the PyTorch ones only)."""
    for name in {None: WEIGHT_FILES, True: WEIGHT_FILES[:2], False: WEIGHT_FILES[2:]}[use_safetensors]:
        filename = f"{subfolder}/{name}" if subfolder else name
        found = try_to_load_from_cache(REPO, filename, cache_dir=root, revision=revision)
        if found is None or found is _CACHED_NO_EXIST:
            continue
        if name.endswith("index.json"):
            shards = set(json.loads(open(found).read())["weight_map"].values())
            if not all(isinstance(try_to_load_from_cache(REPO, f"{subfolder}/{s}" if subfolder else s, cache_dir=root,
                                                         revision=revision), str) for s in shards):
                return None
        return filename, os.path.basename(found[: -len(filename) - 1])
    return None


@pytest.mark.parametrize("seed", range(60))
def test_a_random_cache_loads_the_revision_huggingface_hub_resolves(tmp_path, seed):
    rng = random.Random(seed)
    revisions, sub, damaged = _random_cache(rng, seed, tmp_path)
    asked = [None, f"{0x3039:040x}", revisions[0]["commit"][:7], "ghost", "nope"]
    asked += [r["commit"] for r in revisions] + [ref for r in revisions for ref in r["refs"]]
    revision = rng.choice(asked)
    subfolder = sub if rng.random() < 0.9 else rng.choice([None, "sub", "zzz"])
    where = dict(revision=revision, cache_dir=tmp_path, subfolder=subfolder,
                 use_safetensors=rng.choice([None, None, True, False]))
    resolved = _resolved(tmp_path, revision, subfolder, where["use_safetensors"])
    if resolved is not None:
        filename, commit = resolved
        rev = next(r for r in revisions if r["commit"] == commit)
        read = [f"{subfolder}/config.json" if subfolder else "config.json", filename]
        broken = [entry for c, entry in damaged if c == commit and (entry in read or filename.endswith("index.json")
                                                                   and entry.startswith(rev["prefix"]))]
        if not broken:
            model = PvtV2ForImageClassification.from_pretrained(REPO, **where)
            loaded, expected = model.state_dict(), rev["holds"][filename]
            assert set(loaded) == set(expected), (where, filename)
            for key, tensor in expected.items():
                assert torch.equal(loaded[key], tensor), (where, filename, key)
            return
        with pytest.raises((FileNotFoundError, ValueError)) as raised:  # a damaged entry it reads: named
            PvtV2ForImageClassification.from_pretrained(REPO, **where)
        assert any(entry in str(raised.value) for entry in broken), str(raised.value)
        return
    with pytest.raises((FileNotFoundError, ValueError)) as raised:  # nothing loads where huggingface_hub finds nothing
        PvtV2ForImageClassification.from_pretrained(REPO, **where)
    assert REPO in str(raised.value) or "models--org--name" in str(raised.value), str(raised.value)


def _timm_repo(root, model, config: bytes, name: str = "timm/pvt_v2_tiny.in1k") -> None:
    commit = "c" * 40
    repo = root / ("models--" + name.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, snapshot / "model.safetensors")
    (snapshot / "config.json").write_bytes(config)


def test_a_timm_hub_repository_loads_as_timm_computes_it(tmp_path):
    """timm's hub repositories hold timm's config.json (architecture, num_classes, pretrained_cfg) beside the
    weights. It used to be read as a PVTv2 config of nothing but defaults: B0's widths and two classes, so any other
    size failed to load, and B0 itself came with a random two-class head in place of its classifier."""
    torch.manual_seed(0)
    reference = timm.models.pvt_v2.PyramidVisionTransformerV2(
        depths=(1, 2), embed_dims=(16, 32), num_heads=(1, 2), mlp_ratios=(2, 2), sr_ratios=(2, 1), num_classes=7,
    ).eval()
    _timm_repo(tmp_path, reference, _timm_config(7))
    model = PvtV2ForImageClassification.from_pretrained("timm/pvt_v2_tiny.in1k", cache_dir=tmp_path).eval()
    assert model.config.num_labels == 7 and not model.newly_initialized_keys
    # the same files downloaded into a folder (`hf download timm/... --local-dir DIR`)
    folder = next((tmp_path / "models--timm--pvt_v2_tiny.in1k" / "snapshots").iterdir())
    local = PvtV2ForImageClassification.from_pretrained(folder).eval()
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        want, got, got_local = reference(x), model(x).logits, local(x).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(got, got_local)
    # The file is no PVTv2 config: read as one, it is refused by name rather than taken for the defaults.
    with pytest.raises(ValueError, match=r"timm's config\.json \(architecture 'pvt_v2_b0'\), not a PVTv2 config"):
        PvtV2Config.from_pretrained("timm/pvt_v2_tiny.in1k", cache_dir=tmp_path)


def test_a_commit_the_cache_never_had_is_not_called_damage(tmp_path):
    """A full commit hash without a snapshot folder was never downloaded: said so, as for a branch the cache lacks,
    not "the cache is damaged ... delete it", which would not bring the commit either."""
    files, _ = _revision_files(random.Random(0), 0, "safetensors", tmp_path)
    repo = tmp_path / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
    for name, data in files.items():
        (repo / "snapshots" / ("a" * 40) / name).write_bytes(data)
    PvtV2ForImageClassification.from_pretrained(REPO, cache_dir=tmp_path)  # main is cached
    other = "b" * 40
    assert try_to_load_from_cache(REPO, "model.safetensors", cache_dir=tmp_path, revision=other) is None
    with pytest.raises(HubFileNotFound) as raised:
        PvtV2ForImageClassification.from_pretrained(REPO, revision=other, cache_dir=tmp_path)
    message = str(raised.value)
    assert f"revision {other!r} of {REPO!r} is not in the Hugging Face cache" in message
    assert f"--revision {other}" in message and "damaged" not in message and "Delete" not in message


def test_a_symlink_loop_in_a_snapshot_is_called_a_loop(tmp_path):
    """A snapshot entry linking back to itself was reported as linking to a file "which is missing"."""
    files, _ = _revision_files(random.Random(0), 0, "safetensors", tmp_path)
    snapshot = tmp_path / "models--org--name" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "models--org--name" / "refs").mkdir()
    (tmp_path / "models--org--name" / "refs" / "main").write_text("a" * 40)
    (snapshot / "model.safetensors").write_bytes(files["model.safetensors"])
    (snapshot / "config.json").symlink_to("config.json")
    assert try_to_load_from_cache(REPO, "config.json", cache_dir=tmp_path) is None  # huggingface_hub finds nothing
    with pytest.raises(HubFileNotFound, match=r"is damaged: .*config\.json' is a symlink loop") as raised:
        PvtV2ForImageClassification.from_pretrained(REPO, cache_dir=tmp_path)
    assert "missing" not in str(raised.value)


def test_a_ref_written_with_a_newline_is_named_not_the_file_called_absent(tmp_path):
    """`echo HASH > refs/main` (a cache written by hand) names no snapshot for huggingface_hub, which reads the
    newline as part of the hash; the error said model.safetensors was not in the cache, though it is."""
    files, _ = _revision_files(random.Random(0), 0, "safetensors", tmp_path)
    repo = tmp_path / "models--org--name"
    (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
    for name, data in files.items():
        (repo / "snapshots" / ("a" * 40) / name).write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40 + "\n")
    assert try_to_load_from_cache(REPO, "model.safetensors", cache_dir=tmp_path) is None  # huggingface_hub: nothing
    with pytest.raises(HubFileNotFound, match=r"is damaged: its ref .*refs/main' holds 'a{40}\\n': the commit hash "
                                              r"with white space around it"):
        PvtV2ForImageClassification.from_pretrained(REPO, cache_dir=tmp_path)
    (repo / "refs" / "main").write_text("a" * 40)
    PvtV2ForImageClassification.from_pretrained(REPO, cache_dir=tmp_path)
