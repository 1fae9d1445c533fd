"""Reading and writing weight files safely: safetensors, PyTorch pickles (tensors only), sharded indexes.

Pickled files are opened with ``torch.load(weights_only=True)`` only: no code in a checkpoint ever runs. Training
checkpoints (``{"model": ...}``, ``{"state_dict": ...}``, ``module.`` prefixes) are unwrapped to their state dict.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import warnings
import zipfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..fileio import WriteError, atomic_write, temporary_path

__all__ = [
    "CheckpointError", "is_shard_index", "read_checkpoint", "read_checkpoint_and_config", "read_state_dict",
    "save_state_dict", "save_state_dicts", "shard_names",
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model."""


# An index of shards: transformers' ``model.safetensors.index.json``, or a variant's ``model.safetensors.index.fp16.json``
# (its name for a variant puts the variant before ``.json``).
_SHARD_INDEX = re.compile(r".*\.index\.json|.+\.(safetensors|bin)\.index\.[A-Za-z0-9_.-]+\.json")


def is_shard_index(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named as the index of a sharded checkpoint (a variant's index too)."""
    return bool(_SHARD_INDEX.fullmatch(Path(path).name))


# ---------------------------------------------------------------------------------------------- reading files
def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors``, sharded-safetensors index, or PyTorch (``.pth``/``.bin``/``.pt``) file."""
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], tuple[str, ...] | None]:
    """:func:`read_state_dict`'s tensors, and the class names a training framework recorded beside them:
    mmcv's ``meta["CLASSES"]`` (the authors' mmdetection / mmsegmentation files), mmengine's
    ``meta["dataset_meta"]["classes"]``; None where the file records none."""
    state, names, _ = read_checkpoint_and_config(path)
    return state, names


def read_checkpoint_and_config(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], tuple[str, ...] | None, str | None]:
    """:func:`read_checkpoint`'s tensors and class names, and the training config recorded as text beside them
    (mmcv's ``meta["config"]``, mmengine's ``meta["cfg"]``; None where the file records none)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {os.fspath(path)!r}")
    if is_shard_index(path):
        return _read_sharded(path), None, None
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} is empty (0 bytes)")
    with path.open("rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" and not _looks_like_safetensors(head) and (
        head.startswith(b"PK\x03\x04") or _is_plain_pickle(head) or head[:3] == b"\x80\x02\x8a"
    ):
        # A zip archive or a pickle: a .pth renamed. safetensors' own "header too large" reads as damage.
        raise CheckpointError(
            f"{os.fspath(path)!r} is named .safetensors but is a PyTorch checkpoint (torch.save), not a safetensors "
            f"file: name it .pth (it is then read with torch.load(weights_only=True))"
        )
    if path.suffix == ".safetensors" or _looks_like_safetensors(head):
        return _unwrap(_read_safetensors(path), path), None, None
    obj = _read_torch(path, head)
    return _unwrap(obj, path), _class_names(obj), _config_text(obj)


def _config_text(obj: Any) -> str | None:
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        return None
    text = meta.get("config", meta.get("cfg"))
    return text if isinstance(text, str) else None


def _class_names(obj: Any) -> tuple[str, ...] | None:
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        return None
    names = meta.get("CLASSES")
    if names is None and isinstance(meta.get("dataset_meta"), Mapping):
        names = meta["dataset_meta"].get("classes")
    if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
        return tuple(names)
    return None


def _looks_like_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(os.fspath(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{os.fspath(path)!r} is not a readable safetensors file (corrupt or truncated?): {err}") from None


def _is_plain_pickle(head: bytes) -> bool:
    """A ``pickle.dump`` file (protocol 2 to 5), not a ``torch.save`` one: that is a zip archive, or in torch's
    legacy format a pickle whose first object is its magic number, a long (``\\x8a``) right after the header."""
    return len(head) >= 3 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[2] != 0x8A


def _read_torch(path: Path, head: bytes = b"") -> Any:
    if head.startswith(b"PK\x03\x04"):
        _check_zip_members(path)
    try:
        with warnings.catch_warnings():
            # torch warns that a plain pickle's protocol is not its own before refusing it: the error says enough.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err)
        if "GLOBAL" not in detail and "global" not in detail and _is_plain_pickle(head):
            raise CheckpointError(
                f"refusing to load {os.fspath(path)!r}: it is a plain pickle (pickle.dump, not torch.save) and holds "
                f"pickled Python objects, which are not loaded: loading them could run code. Only weights are read "
                f"(torch.load(weights_only=True)); save the state dict with torch.save or safetensors instead"
            ) from None
        if "GLOBAL" not in detail and "global" not in detail:
            # Not a forbidden object: bytes that are no pickle at all.
            raise CheckpointError(
                f"{os.fspath(path)!r} is not a readable PyTorch checkpoint (corrupt, truncated or another format)"
            ) from None
        blocked = next((line.strip() for line in detail.splitlines() if "GLOBAL" in line or "global" in line), "")
        # mmengine (mmsegmentation / mmdetection 1.x and later) saves its message_hub's HistoryBuffer objects beside
        # the weights in every training checkpoint; the weights themselves are its "state_dict".
        mmengine = (
            " It is an mmengine training checkpoint: its weights are its 'state_dict', saved alone (where you trust "
            f"the file) by torch.save(torch.load({os.fspath(path)!r}, weights_only=False)['state_dict'], "
            "'weights.pth')."
            if "mmengine." in blocked else ""
        )
        raise CheckpointError(
            f"refusing to load {os.fspath(path)!r}: it holds pickled Python objects other than tensors and plain "
            f"containers, and loading them could run code. Only weights are read (torch.load(weights_only=True)); "
            f"convert it to safetensors where you trust its origin.{mmengine} Detail: {blocked}"
        ) from None
    except (EOFError, RuntimeError, OSError, ValueError, TypeError, AttributeError, KeyError, IndexError) as err:
        raise CheckpointError(
            f"{os.fspath(path)!r} is not a readable PyTorch checkpoint (corrupt, truncated or another format): "
            f"{type(err).__name__}: {err}"
        ) from None


def _check_zip_members(path: Path) -> None:
    """Refuse a ``torch.save`` archive naming one member twice: torch.save never writes one, and which copy torch
    reads (a tensor's bytes, or the pickle itself) is then not what another zip reader sees. Damage beyond that is
    left to torch.load to report."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return
    twice = sorted(name for name, count in Counter(names).items() if count > 1)
    if twice:
        raise CheckpointError(
            f"{os.fspath(path)!r} is a zip archive that holds the member {twice[0]!r} twice ({len(twice)} member(s) "
            f"in all), so which copy is meant is ambiguous: it was not written by torch.save as it is"
        )


def shard_names(index_path: str | os.PathLike) -> list[str]:
    """The shard files a sharded checkpoint's index (``model.safetensors.index.json``) names, each a plain file name
    beside the index, as transformers writes them ("../x" or "/x" would read another folder's files)."""
    return _read_index(Path(index_path))[1]


def _read_index(index_path: Path) -> tuple[dict, list[str]]:
    """A sharded checkpoint's index, read once: its weight map and the shard names (:func:`shard_names`)."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        shards = set(weight_map.values())
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{os.fspath(index_path)!r} is not a valid sharded-checkpoint index: {err}") from None
    for shard in shards:
        if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard:
            raise CheckpointError(
                f"{os.fspath(index_path)!r} names the shard {shard!r}, which is not a file name in its folder"
            )
        # read as an index in turn: itself (or two naming each other) recursed until a RecursionError
        if is_shard_index(shard):
            raise CheckpointError(
                f"{os.fspath(index_path)!r} names the shard {shard!r}, which is an index of shards, not a weights file"
            )
    if not shards:  # else reported as a checkpoint of no known layout, "its first keys are: ."
        raise CheckpointError(f"{os.fspath(index_path)!r} names no shards: its weight_map is empty")
    return weight_map, sorted(shards)


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    holder: dict[str, str] = {}  # which shard each tensor came from
    weight_map, shards = _read_index(index_path)
    for shard in shards:
        if not (index_path.parent / shard).is_file():  # named as the index's, not as a missing checkpoint
            raise FileNotFoundError(f"{os.fspath(index_path)!r} names the shard {shard!r}, which is not in its folder")
        part = read_state_dict(index_path.parent / shard)
        # A tensor in two shards (a stale copy left by an interrupted re-save) would be taken from whichever shard
        # sorts last, without a word: the checkpoint is ambiguous.
        twice = sorted(part.keys() & state.keys())
        if twice:
            raise CheckpointError(
                f"{os.fspath(index_path)!r}: the tensor {twice[0]!r} is in two shards, {holder[twice[0]]!r} and "
                f"{shard!r} ({len(twice)} tensor(s) in all), so which one is meant is ambiguous"
            )
        state.update(part)
        holder.update(dict.fromkeys(part, shard))
    # A tensor the index places in a shard that holds none of that name (a shard re-saved without it, or another
    # checkpoint's shard put in its place): it was reported as missing from the model's point of view only, and when
    # its absence fits another architecture (a spatial reduction) as a config.json to correct.
    lost = sorted(key for key in weight_map if _bare_name(key) not in state)
    if lost:
        raise CheckpointError(
            f"{os.fspath(index_path)!r} places the tensor {lost[0]!r} in the shard {weight_map[lost[0]]!r}, which does "
            f"not hold it, nor does any other shard ({len(lost)} tensor(s) in all): a shard is missing tensors or is "
            f"another checkpoint's"
        )
    return state


# What torch.nn.DataParallel / DistributedDataParallel ("module.") and torch.compile ("_orig_mod.") put before the
# names of the model they wrap.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _bare_name(key: str) -> str:
    """A state-dict key without the prefixes of the wrappers around the model (``module._orig_mod.x`` is ``x``)."""
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.partition(".")[2]
    return key


def _holds_weights(obj: Mapping) -> bool:
    """Whether a mapping's own entries are weights: a tensor of one or more dimensions under a layer's dotted name. A
    training checkpoint keeps scalar tensors beside its state dict too (pytorch/examples' ImageNet script saves its
    ``best_acc1`` so): a mapping holding only those is unwrapped, as timm's ``load_state_dict`` unwraps it."""
    return any(isinstance(v, torch.Tensor) and v.ndim and isinstance(k, str) and "." in k for k, v in obj.items())


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint (``{"model": ...}``, ``{"state_dict": ...}``), prefixes removed."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not _holds_weights(obj):
            # the EMA copies last: a checkpoint holding both is loaded with its model's own weights; one holding only
            # timm's EMA copy ("state_dict_ema", as timm's `--model-ema` runs save it) was "holds no tensors"
            for key in ("model", "state_dict", "model_state_dict", "module", "model_ema", "state_dict_ema"):
                if isinstance(obj.get(key), Mapping):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{os.fspath(path)!r} does not hold a state dict (a mapping from names to tensors)")
    state: dict[str, torch.Tensor] = {}
    named: dict[str, str] = {}  # each key as the file spells it
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{os.fspath(path)!r} has a non-string key {key!r}: not a state dict")
        if not isinstance(value, torch.Tensor):
            if key.endswith((".weight", ".bias")):
                # A parameter's name holding a list or a number: skipped, the layer was loaded as missing (a random
                # head "newly initialised", or a head-less model from `pvtv2 convert`) for a file that holds it.
                raise CheckpointError(
                    f"{os.fspath(path)!r}: {key!r} holds a {type(value).__name__}, not a tensor: the file is damaged "
                    f"or was not saved from a state dict"
                )
            continue  # e.g. a stray counter next to the weights
        # Neither has values a parameter can take (torch's load_state_dict refuses both too); left here, they failed
        # deep inside the loader with a backend error.
        if value.is_meta:
            raise CheckpointError(
                f"{os.fspath(path)!r}: the tensor {key!r} holds no data (a meta tensor, saved from a model that was "
                f"never given memory)"
            )
        if value.layout != torch.strided:
            raise CheckpointError(
                f"{os.fspath(path)!r}: the tensor {key!r} is a sparse tensor ({value.layout}), not a dense one; "
                f"save it with .to_dense()"
            )
        # Wrappers nest in either order: DataParallel around a compiled model, or torch.compile around DataParallel.
        name = _bare_name(key)
        if name in state:
            # "x" and "module.x" both: one copy was taken, whichever came last, without a word.
            raise CheckpointError(
                f"{os.fspath(path)!r} holds {named[name]!r} and {key!r}, which both name the weight {name!r} (a "
                f"wrapper's prefix removed), so which one is meant is ambiguous"
            )
        state[name] = value
        named[name] = key
    if not state:
        raise CheckpointError(f"{os.fspath(path)!r} holds no tensors")
    return state


def _contiguous_copies(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses strided tensors and two keys on one storage ("Some tensors share memory"), and torch.save
    # writes a view's whole storage (a row of a large matrix wrote all of it): each such tensor is written as a copy
    # of its own values. The first key on a storage that it fills exactly is kept as it is.
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[torch.device, int]] = set()
    for key, value in state.items():
        value = value.detach()
        storage = value.untyped_storage()
        where = (value.device, storage.data_ptr())
        whole = value.is_contiguous() and storage.nbytes() == value.numel() * value.element_size()
        if not whole or (value.numel() and where in seen):
            value = value.contiguous().clone()
        elif value.numel():
            seen.add(where)
        out[key] = value
    return out


def _serialize(state: Mapping[str, torch.Tensor], safetensors: bool, metadata: dict[str, str] | None) -> bytes:
    """The bytes of a safetensors file, or of a ``torch.save`` plain dict of tensors, holding ``state``."""
    from safetensors.torch import save

    tensors = {k: v.cpu() for k, v in _contiguous_copies(state).items()}
    if safetensors:
        return save(tensors, metadata={"format": "pt", **(metadata or {})})
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write tensors to ``path`` atomically: safetensors for ``.safetensors``, a plain tensor dict otherwise.

    The file is serialised in memory and written with Python's own I/O, because both serialisers report a full
    disk as their own error (``SafetensorError``, a ``RuntimeError`` "unexpected pos") instead of an ``OSError``:
    this way a failed write is a :class:`pvtv2.fileio.WriteError` naming ``path`` and the errno."""
    path = Path(path)
    data = _serialize(state, path.suffix == ".safetensors", metadata)
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def save_state_dicts(files: Mapping[str, Mapping[str, torch.Tensor]], folder: str | os.PathLike) -> list[Path]:
    """Write several weight files (file name in ``folder`` -> tensors; format by suffix, as :func:`save_state_dict`).

    Each is written to its hidden temporary sibling first, and all are renamed into place only once every one is
    complete: a write that fails (a full disk) or is interrupted before that leaves the previous files as they were,
    rather than new shards beside old ones under one index. Errors are :class:`pvtv2.fileio.WriteError`."""
    folder = Path(folder)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, state in files.items():
            target = folder / name
            tmp = temporary_path(target)
            staged.append((tmp, target))
            data = _serialize(state, name.endswith(".safetensors"), None)
            try:
                tmp.write_bytes(data)
            except OSError as err:
                raise WriteError(target, err) from err
            del data  # one shard's bytes in memory at a time
        for tmp, target in staged:
            try:
                os.replace(tmp, target)
            except OSError as err:
                raise WriteError(target, err) from err
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    return [target for _, target in staged]
