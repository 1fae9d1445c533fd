"""Resolving what a user names (a folder, a file, a hub id) to local files.

The hub is only ever asked through ``huggingface_hub``, which keeps its own cache; when the hub cannot be
reached, files already in that cache are used, and a missing file becomes an error that says how to get it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..fileio import path_kind

__all__ = [
    "HubFileNotFound", "MODEL_LOADING_ARGUMENTS", "check_loading_arguments", "check_subfolder", "companion_file",
    "folder_entry", "looks_like_hub_id", "resolve_file", "timm_architecture",
]

# A hub id is "name" or "owner/name" with the characters the hub allows.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class HubFileNotFound(FileNotFoundError):
    """A file of a hub repository is neither in the local cache nor downloadable."""


def looks_like_hub_id(source: str | os.PathLike) -> bool:
    """True when ``source`` names no local path and has the shape of a hub id (``owner/name``)."""
    text = os.fspath(source)
    return not os.path.exists(text) and "/" in text and bool(_HUB_ID.match(text))


# transformers' from_pretrained arguments about fetching and placing the weights, with what to do here instead. Taken
# as config fields they did nothing, and were written into the config.json of every save_pretrained after (a token
# among them, in plain text).
_LOADING_ARGUMENTS = {
    "use_auth_token": "pass token= (its newer name), set HF_TOKEN or log in with `hf auth login`",
    "force_download": "download again with `hf download <id> --force-download`",
    "resume_download": "download with `hf download <id>`",
    "proxies": "set HTTPS_PROXY",
    "from_tf": "only PyTorch and safetensors files are read",
    "from_flax": "only PyTorch and safetensors files are read",
    "state_dict": "load it with model.load_state_dict",
    # PvtV2Config.from_pretrained and from_dict take it (as transformers' configs do); a model's from_pretrained
    # returns the model alone, as transformers' does
    "return_unused_kwargs": "a model's from_pretrained returns the model alone (with output_loading_info=True, "
                            "(model, info)); PvtV2Config.from_pretrained(..., return_unused_kwargs=True) returns the "
                            "unused keyword arguments",
    # quantization_config is a key of transformers' configs too, so it was kept without a word; written into
    # config.json, it made transformers quantize the model saved from the float32 one loaded here
    "quantization_config": "the weights load in float32 (or dtype=); for int8, export to ONNX and quantize that file (onnxruntime.quantization)",
    "load_in_8bit": "the weights load in float32 (or dtype=); for int8, export to ONNX and quantize that file (onnxruntime.quantization)",
    "load_in_4bit": "the weights load in float32 (or dtype=); for int8, export to ONNX and quantize that file (onnxruntime.quantization)",
    "gguf_file": "only PyTorch and safetensors files are read",
    "max_memory": "pass device= (one device)",
    "offload_folder": "pass device= (one device); nothing is offloaded",
    "offload_state_dict": "pass device= (one device); nothing is offloaded",
    "offload_buffers": "pass device= (one device); nothing is offloaded",
    "tp_plan": "pass device= (one device); wrap the model in DistributedDataParallel to train on several",
    "tp_size": "pass device= (one device); wrap the model in DistributedDataParallel to train on several",
    "device_mesh": "pass device= (one device); wrap the model in DistributedDataParallel to train on several",
    "distributed_config": "pass device= (one device); wrap the model in DistributedDataParallel to train on several",
    "key_mapping": "checkpoint layouts (transformers, timm, the original authors') are recognised by their keys",
    "adapter_kwargs": "load the adapter with peft after loading the model",
    "adapter_name": "load the adapter with peft after loading the model",
    "use_kernels": "the fast path is on by default (pvtv2.fast)",
    "kernel_config": "the fast path is on by default (pvtv2.fast)",
    "disable_mmap": "drop it",
    "mirror": "set HF_ENDPOINT",
}


# transformers' loading arguments that the model classes' from_pretrained takes (pvtv2.weights.loading.load_pretrained):
# a config reads no weights, so PvtV2Config.from_pretrained refuses them rather than keep them as fields.
MODEL_LOADING_ARGUMENTS = frozenset({
    "ignore_mismatched_sizes", "output_loading_info", "variant", "use_safetensors", "weights_only", "low_cpu_mem_usage",
    "device_map", "trust_remote_code",
})


def check_loading_arguments(arguments: Iterable[str]) -> None:
    """Refuse, with what to do instead, any of transformers' loading arguments among the keyword ``arguments``."""
    for name in arguments:
        if name in MODEL_LOADING_ARGUMENTS:
            raise TypeError(f"{name} is one of transformers' loading arguments for the weights, which the model classes' "
                            f"from_pretrained takes (PvtV2ForImageClassification.from_pretrained(..., {name}=...)); a "
                            f"config reads no weights, and it is not a config field either")
        if name in _LOADING_ARGUMENTS:
            raise TypeError(f"{name} is one of transformers' loading arguments, which pvtv2's from_pretrained does not "
                            f"take (not a config field either): {_LOADING_ARGUMENTS[name]}")


def folder_entry(path: Path) -> str:
    """``"file"`` or ``"nothing"`` for a file a model folder may hold; anything else under that name (a folder, a
    dangling symlink, a FIFO) is refused by name: skipping it would load other weights, infer a configuration from
    the tensor shapes, or preprocess with the defaults, without a word."""
    kind = path_kind(path)
    if kind in ("file", "nothing"):
        return kind
    if kind == "dangling symlink":
        raise FileNotFoundError(f"{os.fspath(path)!r} is a symlink to {os.readlink(path)!r}, which does not exist")
    if kind == "symlink loop":
        raise FileNotFoundError(f"{os.fspath(path)!r} is a symlink loop (it points, through links, back at itself)")
    raise ValueError(f"{os.fspath(path)!r} is a {kind}, not a file: a model folder's {path.name} must be a file")


def check_subfolder(source: str | os.PathLike, subfolder: str | os.PathLike | None) -> str | None:
    """``subfolder`` as transformers' ``from_pretrained`` takes it (a folder inside a local folder or hub repository;
    ``None`` or ``""``: the top one), refused for a single file, which has no folders inside."""
    if subfolder is None or os.fspath(subfolder) == "":
        return None
    if os.path.isfile(os.fspath(source)):
        raise ValueError(
            f"subfolder={os.fspath(subfolder)!r} names a folder inside a folder or hub repository, but "
            f"{os.fspath(source)!r} is a file"
        )
    text = os.fspath(subfolder)
    if not os.path.isdir(os.fspath(source)) and (os.path.isabs(text) or ".." in Path(text).parts):
        # huggingface_hub refuses the file path made of it, but as a file of the repository ("ask the repository
        # owner to rename this file"); in a local folder it is followed, as transformers follows it
        raise ValueError(
            f"subfolder={text!r} is not a folder inside the hub repository {os.fspath(source)!r}: give a path "
            f"relative to the repository's top folder, without '..'"
        )
    return text


def resolve_file(
    source: str | os.PathLike,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    subfolder: str | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    required: bool = True,
) -> Path | None:
    """Return the local path of ``filename`` inside ``source`` (inside its ``subfolder``, when given).

    ``source`` is a local folder or a hub id. For a hub id the file comes from the Hugging Face cache, or is
    downloaded into it (never with ``local_files_only``; ``token``: huggingface_hub's, for a private repository). When it is absent and ``required`` is False, ``None`` is returned; when it is absent and
    required, :class:`HubFileNotFound` explains where it was looked for and how to get it. In a local folder, a
    folder or a broken symlink under that name is an error (see :func:`folder_entry`), never "absent".
    """
    text = os.fspath(source)
    subfolder = check_subfolder(text, subfolder)
    if os.path.isdir(text):
        folder = Path(text) / subfolder if subfolder else Path(text)
        if not folder.is_dir():  # a misspelt subfolder: an optional file there is not "absent" (defaults without a word)
            raise FileNotFoundError(f"no {filename} in {os.fspath(folder)!r}: {text!r} has no subfolder {subfolder!r}")
        if folder_entry(folder / filename) == "file":
            return folder / filename
        if required:
            raise FileNotFoundError(f"{filename!r} not found in folder {os.fspath(folder)!r}")
        return None
    if not looks_like_hub_id(text):
        raise FileNotFoundError(
            f"{text!r} is neither an existing file or folder nor a hub id of the form 'owner/name'"
        )
    return _hub_download(text, filename, revision=revision, cache_dir=cache_dir, subfolder=subfolder,
                         local_files_only=local_files_only, token=token, required=required)


def companion_file(source: str | os.PathLike, filename: str) -> Path | None:
    """The ``filename`` (e.g. ``preprocessor_config.json``) that goes with the checkpoint ``source``, or None: in a
    folder or hub repository, that file; beside a single weights file, the file in the same folder when that folder
    is a ``save_pretrained`` one (it holds a ``config.json``), since a run's ``best/model.safetensors`` keeps the
    preprocessing its folder records. ``pvtv2 predict`` and ``pvtv2 convert`` both read it this way, so a converted
    folder predicts what its source did."""
    text = os.fspath(source)
    if os.path.isdir(text) or (not os.path.isfile(text) and looks_like_hub_id(text)):
        return resolve_file(text, filename, required=False)
    if os.path.isfile(text):
        folder = Path(text).parent
        # config.json first: only a save_pretrained folder's entry counts, and there one that is no file is an error
        if (folder / "config.json").is_file() and folder_entry(folder / filename) == "file":
            return folder / filename
    return None


def _hub_download(
    repo_id: str,
    filename: str,
    *,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    subfolder: str | None,
    local_files_only: bool,
    token: str | bool | None,
    required: bool,
) -> Path | None:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    # The cache first: a file already there needs no network (and no retries on a machine without one).
    try:
        return _a_file(hf_hub_download(
            repo_id, filename, subfolder=subfolder, revision=revision, cache_dir=cache_dir, local_files_only=True,
            token=token,
        ))
    except LocalEntryNotFoundError:
        pass
    except ValueError:
        # huggingface_hub refuses a ref whose text would lead out of the snapshots folder ("../../x": "Invalid
        # pointer path"), in its own words, which do not say that the cache is damaged nor where.
        cache = Path(cache_dir or constants.HF_HUB_CACHE)
        broken = _broken_cache_entry(cache, repo_id, f"{subfolder}/{filename}" if subfolder else filename, revision)
        if not broken:
            raise
        raise HubFileNotFound(_damaged(cache, repo_id, broken)) from None
    except EntryNotFoundError:
        # The cache records that the repository has no such file.
        if required:
            raise HubFileNotFound(f"the hub repository {repo_id!r} has no file {filename!r}") from None
        return None
    try:
        return _a_file(hf_hub_download(repo_id, filename, subfolder=subfolder, revision=revision, cache_dir=cache_dir,
                                       local_files_only=local_files_only, token=token))
    except LocalEntryNotFoundError:
        # No connection (or offline mode) and nothing in the cache. (A subclass of EntryNotFoundError: first.)
        cache = cache_dir or constants.HF_HUB_CACHE
        offline = constants.HF_HUB_OFFLINE or local_files_only
        unreached = ("the hub was not asked (local_files_only=True)" if local_files_only else
                     "the hub could not be reached (HF_HUB_OFFLINE is set)" if offline else "the hub could not be reached")
        broken = _broken_cache_entry(Path(cache), repo_id, f"{subfolder}/{filename}" if subfolder else filename, revision)
        if broken:
            # Not "absent": an optional config.json skipped here would have its configuration guessed from shapes.
            raise HubFileNotFound(_damaged(Path(cache), repo_id, broken)) from None
        if _uncached_revision(Path(cache), repo_id, revision):
            # The repository is cached, but not at this revision: nothing is known of its files, so an optional one
            # is not "absent" either (a processor would fall back to the defaults), and "not in the cache" alone
            # reads as though the cached revision lacked the file.
            rev = revision or "main"
            raise HubFileNotFound(
                f"revision {rev!r} of {repo_id!r} is not in the Hugging Face cache ({cache}) and {unreached}. On a "
                f"machine with network access run `hf download {repo_id} --revision {rev}` and copy the cache folder here, or "
                f"pass a local folder or checkpoint file instead."
            ) from None
        # An optional file counts as absent only in offline mode, and only in a repository the cache holds: a failed
        # connection says nothing about it, nor does a repository never downloaded (a processor fell back to the
        # defaults for any uncached hub id under local_files_only, where transformers names the missing repository).
        if not required and offline and _repo_folder(Path(cache), repo_id).is_dir():
            return None
        # The revision asked for, in the command too: a plain `hf download` fetches main's files only.
        fetch = f"{repo_id} --revision {revision}" if revision and revision != "main" else repo_id
        raise HubFileNotFound(
            f"{filename!r} of {repo_id!r} is not in the Hugging Face cache ({cache}) and {unreached}. On a machine "
            f"with network access run `hf download {fetch}` (or `huggingface-cli download {fetch}`) and copy the cache "
            f"folder here (or point HF_HUB_CACHE at it), or pass a local folder or checkpoint file instead."
        ) from None
    except EntryNotFoundError:
        # The hub answered: the repository has no such file.
        if required:
            raise HubFileNotFound(f"the hub repository {repo_id!r} has no file {filename!r}") from None
        return None
    except RepositoryNotFoundError:
        raise HubFileNotFound(
            f"{repo_id!r} is not a hub repository this machine can see (nor a local file or folder)"
        ) from None


_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def _damaged(cache: Path, repo_id: str, broken: str) -> str:
    """The message for a cache entry of ``repo_id`` that :func:`_broken_cache_entry` found ``broken``."""
    return (f"the Hugging Face cache of {repo_id!r} is damaged: {broken} (an interrupted download, or a cache "
            f"cleaned or copied in part). Delete {os.fspath(_repo_folder(cache, repo_id))!r} and download it again "
            f"(`hf download {repo_id}`), or pass a local folder or checkpoint file instead")


def _a_file(found: str) -> Path:
    """The path huggingface_hub gives for a cached file, refused where a folder stands under the file's name (a
    cache copied or edited by hand): read as a file it was "Is a directory", or "checkpoint file not found"."""
    path = Path(found)
    folder_entry(path)
    return path


def _uncached_revision(cache: Path, repo_id: str, revision: str | None) -> bool:
    """Whether the cache holds ``repo_id`` but not ``revision``: no ref for a branch or tag name, no snapshot folder
    for a commit hash (one never downloaded: nothing is damaged, and deleting the cache would not bring it)."""
    repo = _repo_folder(cache, repo_id)
    revision = revision or "main"
    if _COMMIT.match(revision):
        return repo.is_dir() and not (repo / "snapshots" / revision).is_dir()
    return repo.is_dir() and not (repo / "refs" / revision).is_file()


def _repo_folder(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def _broken_cache_entry(cache: Path, repo_id: str, filename: str, revision: str | None) -> str | None:
    """What is wrong with the cache's copy of ``filename`` when huggingface_hub found none, in words; ``None`` when
    the cache simply does not hold it. The layout is huggingface_hub's: ``refs/<revision>`` holds a commit hash,
    ``snapshots/<commit>/<filename>`` is a symlink into ``blobs/``."""
    repo = _repo_folder(cache, repo_id)
    revision = revision or "main"
    if _COMMIT.match(revision):
        # a commit without a snapshot folder was never downloaded (see _uncached_revision), which is no damage
        commit, named_by = revision, f"revision {revision}"
        if not (repo / "snapshots" / commit).is_dir():
            return None
    else:
        ref = repo / "refs" / revision
        if not ref.is_file():
            return None
        try:
            text = ref.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            return f"its ref {os.fspath(ref)!r} cannot be read ({err})"
        commit = text.strip()
        if not _COMMIT.match(commit):
            return f"its ref {os.fspath(ref)!r} holds {commit[:60]!r}, not a commit hash"
        if text != commit:  # huggingface_hub reads the file as it is: `echo HASH > refs/main` names no snapshot
            return (f"its ref {os.fspath(ref)!r} holds {text!r}: the commit hash with white space around it, which "
                    f"huggingface_hub does not strip (write the 40 characters alone)")
        named_by = f"its ref {os.fspath(ref)!r}"
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir():
        return f"{named_by} names commit {commit}, whose snapshot folder {os.fspath(snapshot)!r} is missing"
    entry = snapshot / filename
    if path_kind(entry) == "symlink loop":
        return f"{os.fspath(entry)!r} is a symlink loop (it points, through links, back at itself)"
    if entry.is_symlink() and not entry.exists():
        return f"{os.fspath(entry)!r} links to {os.readlink(entry)!r}, which is missing"
    return None


def timm_architecture(data: Any) -> str | None:
    """The ``architecture`` of a timm ``config.json`` (what timm's hub repositories hold: ``architecture``,
    ``num_classes``, ``num_features``, ``pretrained_cfg``; transformers' TimmWrapper saves it with ``model_type``
    ``timm_wrapper``), None for any other config. Such a file sets no PVTv2 field: read as one, every field took its
    default (B0's widths, two classes) whatever the model."""
    if (isinstance(data, Mapping) and data.get("model_type", "timm_wrapper") == "timm_wrapper"
            and isinstance(data.get("architecture"), str)
            and ("pretrained_cfg" in data or "num_classes" in data)):
        return data["architecture"]
    return None
