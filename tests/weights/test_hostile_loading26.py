"""from_pretrained's keyword arguments as transformers takes them, against a hub cache laid out as huggingface_hub
lays it out (refs, snapshots linking into blobs): ``revision`` and ``cache_dir`` for the config too, ``subfolder`` for
the model, the config and the processor. Each used to be taken as an unknown config field (a warning, and the file of
the main revision or of the repository's top folder read instead, without a word)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import pytest
import torch
import transformers
from huggingface_hub import constants

from pvtv2 import CheckpointError, PvtV2Config, PvtV2ForImageClassification, PvtV2ImageProcessor
from pvtv2.weights.hub import HubFileNotFound
from pvtv2.weights.layouts import convert_state_dict

from conftest import TINY, random_weights_, relative_error

MAIN = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def _snapshot(repo, commit: str, files: dict[str, bytes]) -> None:
    """``files`` (names may hold a subfolder) in the snapshot ``commit``, each a symlink into ``blobs/``."""
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        entry = repo / "snapshots" / commit / name
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.symlink_to(os.path.relpath(blob, entry.parent))


def _folder_files(folder, prefix: str = "") -> dict[str, bytes]:
    return {prefix + p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A cache of 'owner/tiny': main holds a 5-class model (and in 'sub/' a 3-class one with its own preprocessing),
    the tag v1 (another commit) a 7-class model. Offline, as HF_HUB_OFFLINE=1 makes it."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    models = {}
    for name, labels, seed in (("main", 5, 0), ("sub", 3, 1), ("v1", 7, 2)):
        models[name] = random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=labels)), seed).eval()
        models[name].save_pretrained(tmp_path / name)
    PvtV2ImageProcessor(size={"height": 96, "width": 80}, resample=0).save_pretrained(tmp_path / "sub")
    repo = tmp_path / "cache" / "models--owner--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(OTHER)
    _snapshot(repo, MAIN, {**_folder_files(tmp_path / "main"), **_folder_files(tmp_path / "sub", "sub/")})
    _snapshot(repo, OTHER, _folder_files(tmp_path / "v1"))
    return tmp_path / "cache", models


def _logits(model, seed: int = 0) -> torch.Tensor:
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("revision", ["v1", OTHER])
def test_the_config_of_another_revision_is_read(hub, revision):
    cache, _ = hub
    main = PvtV2Config.from_pretrained("owner/tiny", cache_dir=cache)
    assert main.num_labels == 5
    # It used to read the main revision's config.json and keep `revision` as an unknown field.
    config = PvtV2Config.from_pretrained("owner/tiny", revision=revision, cache_dir=cache)
    reference = transformers.PvtV2Config.from_pretrained("owner/tiny", revision=revision, cache_dir=cache)
    assert config.num_labels == reference.num_labels == 7
    assert not hasattr(config, "revision") and not hasattr(config, "cache_dir")


def test_the_model_of_another_revision_is_loaded(hub):
    cache, models = hub
    model = PvtV2ForImageClassification.from_pretrained("owner/tiny", revision="v1", cache_dir=cache)
    assert relative_error(_logits(models["v1"]), _logits(model)) < 1e-6


def test_a_hub_subfolder_is_read_by_the_model_the_config_and_the_processor(hub):
    cache, models = hub
    model = PvtV2ForImageClassification.from_pretrained("owner/tiny", subfolder="sub", cache_dir=cache)
    # The top folder's weights (5 classes) used to be loaded, with 'subfolder' kept as an unknown config field.
    assert model.config.num_labels == 3 and not hasattr(model.config, "subfolder")
    assert relative_error(_logits(models["sub"]), _logits(model)) < 1e-6
    config = PvtV2Config.from_pretrained("owner/tiny", subfolder="sub", cache_dir=cache)
    reference = transformers.PvtV2Config.from_pretrained("owner/tiny", subfolder="sub", cache_dir=cache)
    assert config.num_labels == reference.num_labels == 3
    processor = PvtV2ImageProcessor.from_pretrained("owner/tiny", subfolder="sub", cache_dir=cache)
    assert processor.size == {"height": 96, "width": 80} and processor.resample == 0


def test_a_local_subfolder_is_read(hub, tmp_path):
    _, models = hub
    top = tmp_path / "repo"
    shutil.copytree(tmp_path / "main", top)
    shutil.copytree(tmp_path / "sub", top / "sub")
    model = PvtV2ForImageClassification.from_pretrained(top, subfolder="sub")
    assert relative_error(_logits(models["sub"]), _logits(model)) < 1e-6
    assert PvtV2Config.from_pretrained(top, subfolder="sub").num_labels == 3
    assert PvtV2ImageProcessor.from_pretrained(top, subfolder="sub").size == {"height": 96, "width": 80}
    with pytest.raises(FileNotFoundError, match=re.escape(f"no weights in folder {str(top / 'nothing')!r}")):
        PvtV2ForImageClassification.from_pretrained(top, subfolder="nothing")


def test_a_subfolder_of_a_single_file_is_refused(hub, tmp_path):
    with pytest.raises(ValueError, match=r"subfolder='sub' names a folder inside a folder or hub repository, but .* is "
                                         r"a file"):
        PvtV2ForImageClassification.from_pretrained(tmp_path / "main" / "model.safetensors", subfolder="sub")


# ---------------------------------------------------------------------------------------------- tensors with no data
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "saved"
    model = random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5))).eval()
    model.save_pretrained(folder)
    return folder, model


ODD_TENSORS = {
    # They used to fail inside the NaN check, "Tensor.item() cannot be called on meta tensors", and inside it again,
    # "Could not run 'aten::ne.Scalar' with arguments from the 'SparseCPU' backend" (torch's load_state_dict refuses
    # both as well).
    "a meta tensor": (lambda t: torch.empty_like(t, device="meta"),
                      "the tensor 'classifier.weight' holds no data (a meta tensor"),
    "a sparse tensor": (lambda t: t.to_sparse(), "the tensor 'classifier.weight' is a sparse tensor (torch.sparse_coo)"),
}


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@pytest.mark.parametrize("case", list(ODD_TENSORS))
def test_tensors_without_dense_data_are_named(tiny, tmp_path, case):
    make, says = ODD_TENSORS[case]
    folder = tmp_path / "odd"
    shutil.copytree(tiny[0], folder)
    (folder / "model.safetensors").unlink()
    state = dict(tiny[1].state_dict())
    state["classifier.weight"] = make(state["classifier.weight"])
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=re.escape(says)):
        PvtV2ForImageClassification.from_pretrained(folder)


def test_a_view_into_a_larger_storage_loads_its_own_values(tiny, tmp_path):
    """torch.save keeps a view's whole storage and its offset and strides: the view's values are what loads."""
    state = dict(tiny[1].state_dict())
    weight = state["classifier.weight"]
    storage = torch.cat([torch.full((3, weight.shape[0]), 7.0), weight.t().contiguous()], 0)  # padded, transposed
    state["classifier.weight"] = storage[3:].t()
    assert not state["classifier.weight"].is_contiguous() and torch.equal(state["classifier.weight"], weight)
    torch.save(state, tmp_path / "view.pth")
    model = PvtV2ForImageClassification.from_pretrained(tmp_path / "view.pth", num_attention_heads=TINY["num_attention_heads"])
    assert relative_error(_logits(tiny[1]), _logits(model)) < 1e-6


# ---------------------------------------------------------------------------------------------- sharded .bin files
def test_a_sharded_pytorch_checkpoint_loads_as_in_transformers(tiny, tmp_path):
    """transformers writes (and reads) pytorch_model.bin.index.json beside pytorch_model-0000i-of-0000n.bin; it used to
    be 'no weights in folder'."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(tiny[0] / "config.json", folder)
    state = tiny[1].state_dict()
    keys = sorted(state)
    shard_of = {k: f"pytorch_model-0000{1 + (i >= len(keys) // 2)}-of-00002.bin" for i, k in enumerate(keys)}
    for shard in set(shard_of.values()):
        torch.save({k: state[k] for k in keys if shard_of[k] == shard}, folder / shard)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shard_of}))
    reference = transformers.PvtV2ForImageClassification.from_pretrained(folder).eval()
    model = PvtV2ForImageClassification.from_pretrained(folder)
    assert relative_error(_logits(reference), _logits(model)) < 1e-6
    assert relative_error(_logits(tiny[1]), _logits(model)) < 1e-6


# ---------------------------------------------------------------------------------------------- what the cache lacks
def test_a_revision_the_cache_lacks_is_named_not_taken_for_an_absent_file(hub):
    """Offline, an optional file (preprocessor_config.json) counts as absent where the cache holds the revision's
    snapshot without it; a revision the cache does not hold at all says nothing of its files. The processor used to
    give the default preprocessing for it, without a word, and every error named the file alone (as though the main
    revision, which is cached, lacked it)."""
    cache, _ = hub
    says = r"revision 'v2' of 'owner/tiny' is not in the Hugging Face cache"
    with pytest.raises(HubFileNotFound, match=says):
        PvtV2ImageProcessor.from_pretrained("owner/tiny", revision="v2", cache_dir=cache)
    with pytest.raises(HubFileNotFound, match=says):
        PvtV2ForImageClassification.from_pretrained("owner/tiny", revision="v2", cache_dir=cache)
    with pytest.raises(HubFileNotFound, match=says):
        PvtV2Config.from_pretrained("owner/tiny", revision="v2", cache_dir=cache)
    # A cached revision without the file: the defaults, as before (main has no preprocessor_config.json at its top).
    assert PvtV2ImageProcessor.from_pretrained("owner/tiny", cache_dir=cache) == PvtV2ImageProcessor()


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "preprocessor_config.json"])
def test_a_folder_in_a_snapshot_where_a_file_belongs_is_named(hub, name):
    """A cache copied by hand can hold a folder under a file's name: it used to be "[Errno 21] Is a directory" for
    config.json and preprocessor_config.json, and "checkpoint file not found" for the weights."""
    cache, _ = hub
    entry = cache / "models--owner--tiny" / "snapshots" / MAIN / name
    if entry.is_symlink():
        entry.unlink()
    entry.mkdir()
    (entry / "x").write_text("{}")
    with pytest.raises(ValueError, match=re.escape(f"{str(entry)!r} is a folder, not a file")):
        if name == "preprocessor_config.json":
            PvtV2ImageProcessor.from_pretrained("owner/tiny", cache_dir=cache)
        else:
            PvtV2ForImageClassification.from_pretrained("owner/tiny", cache_dir=cache)


# ---------------------------------------------------------------------------------------------- misnamed files
def test_a_pytorch_checkpoint_named_safetensors_is_named_as_such(tiny, tmp_path):
    """A .pth renamed to model.safetensors (transformers refuses it too: 'header too large'): it used to be 'not a
    readable safetensors file (corrupt or truncated?)', which sends the user looking for damage."""
    folder = tmp_path / "renamed"
    shutil.copytree(tiny[0], folder)
    torch.save(tiny[1].state_dict(), folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(
            f"{str(folder / 'model.safetensors')!r} is named .safetensors but is a PyTorch checkpoint (torch.save)")):
        PvtV2ForImageClassification.from_pretrained(folder)
    with pytest.raises(Exception, match="header too large"):  # transformers' own refusal, for the record
        transformers.PvtV2ForImageClassification.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------- contradicting labels
def test_label2id_without_id2label_is_named_as_such():
    """transformers ignores a label2id given alone (its names stay LABEL_0...); pvtv2 refuses it, and used to say
    'label2id does not invert id2label (id2label has 3 classes)' of an id2label the file does not have."""
    data = {"num_labels": 3, "label2id": {"a": 0, "b": 1, "c": 2}}
    assert transformers.PvtV2Config.from_dict(data).id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    with pytest.raises(ValueError, match=re.escape("label2id is given without id2label")):
        PvtV2Config.from_dict(data)
    # Given with the generic names it inverts, it is what the config derives anyway.
    assert PvtV2Config.from_dict({"num_labels": 2, "label2id": {"LABEL_0": 0, "LABEL_1": 1}}).num_labels == 2


# ---------------------------------------------------------------------------------------------- dtype arguments
@pytest.mark.parametrize("kwargs", [{"torch_dtype": torch.float16}, {"torch_dtype": "float16"}, {"dtype": "float16"},
                                    {"dtype": torch.float16}])
def test_the_dtype_is_taken_in_transformers_spellings(tiny, kwargs):
    """transformers takes dtype= (and torch_dtype=, its former name) as a torch dtype or its name. torch_dtype used to
    be kept as a config field: the model stayed float32 without a word, and its config.json then said "float16" (or
    could not be written at all, for a torch.float16)."""
    reference = transformers.PvtV2ForImageClassification.from_pretrained(tiny[0], **kwargs)
    model = PvtV2ForImageClassification.from_pretrained(tiny[0], **kwargs)
    assert model.dtype == reference.dtype == torch.float16
    theirs = reference.state_dict()
    assert all(torch.equal(value, theirs[key]) for key, value in model.state_dict().items())
    assert not hasattr(model.config, "torch_dtype")


@pytest.mark.parametrize("kwargs, says", [
    ({"dtype": "float17"}, "dtype='float17' is not a floating-point torch dtype"),
    ({"dtype": torch.int8}, "dtype=torch.int8 is not a floating-point torch dtype"),
    ({"dtype": torch.float16, "torch_dtype": torch.bfloat16}, "dtype=torch.float16 and torch_dtype=torch.bfloat16 "
                                                              "disagree"),
])
def test_dtypes_that_cannot_be_are_named(tiny, kwargs, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        PvtV2ForImageClassification.from_pretrained(tiny[0], **kwargs)


def test_dtype_auto_is_the_checkpoints_own_as_transformers_reads_it(tiny, tmp_path):
    """dtype="auto" (transformers 5's default): the dtype config.json names, else the weights' as stored. It was
    refused."""
    folder = tmp_path / "bf16"
    transformers.PvtV2ForImageClassification.from_pretrained(tiny[0]).to(torch.bfloat16).save_pretrained(folder)
    reference = transformers.PvtV2ForImageClassification.from_pretrained(folder, dtype="auto")
    model = PvtV2ForImageClassification.from_pretrained(folder, dtype="auto")
    assert model.dtype == reference.dtype == torch.bfloat16
    theirs = reference.state_dict()
    assert all(torch.equal(value, theirs[key]) for key, value in model.state_dict().items())
    assert PvtV2ForImageClassification.from_pretrained(tiny[0], dtype="auto").dtype == torch.float32
    # A bare file has no config.json: its tensors' dtype.
    timm_file = tmp_path / "half.pth"
    state = convert_state_dict(PvtV2ForImageClassification.from_pretrained(tiny[0]).state_dict(), "timm")
    state = {k: v.half() for k, v in state.items()}
    torch.save(state, timm_file)
    model = PvtV2ForImageClassification.from_pretrained(timm_file, dtype="auto")
    assert model.dtype == torch.float16
    assert torch.equal(model.state_dict()["classifier.weight"], state["head.weight"])


# ---------------------------------------------------------------------------------------------- loading arguments
def test_a_config_given_to_from_pretrained_is_the_one_built(tiny):
    """transformers builds from_pretrained(path, config=c) from c, not from the folder's config.json. It used to be
    kept as a config field named 'config' (the folder's config built, and save_pretrained then failing on it)."""
    config = PvtV2Config(**TINY, num_labels=5, layer_norm_eps=1e-3)
    reference = transformers.PvtV2ForImageClassification.from_pretrained(
        tiny[0], config=transformers.PvtV2Config(**TINY, num_labels=5, layer_norm_eps=1e-3)).eval()
    model = PvtV2ForImageClassification.from_pretrained(tiny[0], config=config)
    assert model.config.layer_norm_eps == 1e-3 and not hasattr(model.config, "config")
    assert relative_error(_logits(reference), _logits(model)) < 1e-5
    assert relative_error(_logits(tiny[1]), _logits(model)) > 1e-4  # the epsilon changes the numbers
    # Overrides apply to it as to a config.json; one that does not fit the weights is named as such.
    assert PvtV2ForImageClassification.from_pretrained(tiny[0], config=config, num_labels=2).config.num_labels == 2
    with pytest.raises(CheckpointError, match="do not fit"):
        PvtV2ForImageClassification.from_pretrained(tiny[0], config=PvtV2Config(**dict(TINY, depths=[1, 1, 1, 1]),
                                                                                  num_labels=5))
    with pytest.raises(TypeError, match=r"config must be a PvtV2Config .*, got builtins.dict"):
        PvtV2ForImageClassification.from_pretrained(tiny[0], config={"num_labels": 5})


@pytest.mark.parametrize("name, value, hint", [
    ("use_auth_token", "hf_secret", "token="),
    ("proxies", {"https": "proxy:3128"}, "HTTPS_PROXY"),
])
def test_transformers_loading_arguments_are_not_config_fields(tiny, tmp_path, name, value, hint):
    """They used to be kept as config fields (a warning, 'unknown field') and written into the config.json of every
    save_pretrained after: a token among them, in plain text. Each is now refused, saying what to do instead.
    (device_map, ignore_mismatched_sizes and use_safetensors, refused here before, are taken now:
    tests/weights/test_loading_args30.py.)"""
    with pytest.raises(TypeError, match=rf"{name} is one of transformers' loading arguments.*{re.escape(hint)}"):
        PvtV2ForImageClassification.from_pretrained(tiny[0], **{name: value})


def test_the_config_refuses_loading_arguments_too(tiny, tmp_path):
    """PvtV2Config.from_pretrained(path, use_auth_token=...) kept the token as a field, written by save_pretrained."""
    with pytest.raises(TypeError, match=r"use_auth_token is one of transformers' loading arguments.*token="):
        PvtV2Config.from_pretrained(tiny[0], use_auth_token="hf_secret")
    # return_unused_kwargs is taken now, as transformers' configs take it (tests/models/test_fuzz_api34.py): the
    # config and the keyword arguments it does not take, never kept as a field
    config, unused = PvtV2Config.from_pretrained(tiny[0], return_unused_kwargs=True, use_cache=True)
    assert unused == {"use_cache": True} and "return_unused_kwargs" not in config.to_dict()
    assert PvtV2Config.from_pretrained(tiny[0], num_labels=3).num_labels == 3  # fields still override


@pytest.fixture
def hub_calls(hub, monkeypatch):
    """The hub cache online (HF_HUB_OFFLINE unset), each hf_hub_download call recorded with its arguments."""
    import huggingface_hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []
    real = huggingface_hub.hf_hub_download

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        if not kwargs.get("local_files_only"):
            raise AssertionError("the network was asked for a file")
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recorded)
    return hub, calls


def test_local_files_only_and_token_are_honoured_as_transformers_does(hub_calls, tmp_path):
    """local_files_only=True reads the cache and never the network; token= goes to huggingface_hub (a private
    repository's). Both were refused; before that, kept as config fields (the token written into config.json)."""
    (cache, models), calls = hub_calls
    model = PvtV2ForImageClassification.from_pretrained("owner/tiny", cache_dir=cache, local_files_only=True,
                                                        token="hf_secret")
    reference = transformers.PvtV2ForImageClassification.from_pretrained("owner/tiny", cache_dir=cache,
                                                                         local_files_only=True).eval()
    assert relative_error(_logits(model), _logits(reference)) < 1e-6
    saved = models["main"].state_dict()
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())
    assert calls and all(c["local_files_only"] and c["token"] == "hf_secret" for c in calls)
    model.save_pretrained(tmp_path / "saved")
    assert "hf_secret" not in (tmp_path / "saved" / "config.json").read_text()
    config = PvtV2Config.from_pretrained("owner/tiny", cache_dir=cache, revision="v1", local_files_only=True)
    assert config.num_labels == 7 and not hasattr(config, "local_files_only")
    processor = PvtV2ImageProcessor.from_pretrained("owner/tiny", cache_dir=cache, subfolder="sub",
                                                    local_files_only=True)
    assert processor.size == {"height": 96, "width": 80}


def test_local_files_only_names_itself_when_the_cache_lacks_the_file(hub_calls):
    (cache, _), calls = hub_calls
    with pytest.raises(HubFileNotFound, match=r"not in the Hugging Face cache .* the hub was not asked "
                                              r"\(local_files_only=True\)"):
        PvtV2ForImageClassification.from_pretrained("owner/absent", cache_dir=cache, local_files_only=True)
    # An optional file is absent there, as in offline mode: the processor's defaults, without the network.
    assert PvtV2ImageProcessor.from_pretrained("owner/tiny", cache_dir=cache, local_files_only=True).size == {
        "height": 224, "width": 224}
    assert all(c["local_files_only"] for c in calls)
