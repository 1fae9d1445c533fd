"""Reading and writing weights: file formats, layout detection, the rename rules between layouts, strict loading.

Three layouts of the same weights are in circulation:

- ``transformers``: the hub's (``OpenGVLab/pvt_v2_b0``), and this library's own ``state_dict()``:
  ``pvt_v2.encoder.layers.{i}.blocks.{j}.attention.query.weight`` ... ``classifier.weight``;
- ``timm``: ``patch_embed.proj.weight``, ``stages.{i}.downsample``, ``stages.{i}.blocks.{j}.attn.kv.weight`` ...
  ``head.weight``;
- ``original``: the authors' release files (``pvt_v2_b0.pth``): ``patch_embed{n}``, ``block{n}.{j}``, ``norm{n}``.

Two more are read (not written): the Mix Transformer encoders of transformers' SegFormer and GLPN, with their heads
(``segformer``: ``segformer.encoder.block.{i}.{j}.attention.self.query`` ... ``decode_head.linear_c.{i}`` ...;
``glpn``: ``glpn.encoder...``, ``decoder.stages...``, ``head.head...``), also in transformers 5's in-memory
spelling (``segformer.stages.{i}.blocks.{j}.attention.q_proj`` ...). Their heads keep their names in
``pvtv2.dense``, so only the encoder keys are renamed.

Every conversion goes through one canonical form, transformers' keys without the task prefix. Pickled files are
opened with ``torch.load(weights_only=True)`` only: no code in a checkpoint ever runs.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import PRESETS, PvtV2Config

__all__ = [
    "LAYOUTS",
    "CheckpointError",
    "read_state_dict",
    "detect_layout",
    "to_canonical",
    "from_canonical",
    "convert_state_dict",
    "infer_config",
    "locate_checkpoint",
    "load_pretrained",
    "save_pretrained",
    "save_state_dict",
]

logger = logging.getLogger(__name__)

LAYOUTS = ("transformers", "timm", "original")
# Layouts that are read only: transformers' SegFormer and GLPN (see the module docstring).
DENSE_LAYOUTS = ("segformer", "glpn")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# The original code and timm use PyTorch's default LayerNorm epsilon in the patch embeddings and the reduction.
_TORCH_DEFAULT_EPS = 1e-5


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model."""


# ---------------------------------------------------------------------------------------------- reading files
def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors``, sharded-safetensors index, or PyTorch (``.pth``/``.bin``/``.pt``) file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {os.fspath(path)!r}")
    if path.name.endswith(".index.json"):
        return _read_sharded(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} is empty (0 bytes)")
    with path.open("rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or _looks_like_safetensors(head):
        state = _read_safetensors(path)
    else:
        state = _read_torch(path)
    return _unwrap(state, path)


def _looks_like_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(os.fspath(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{os.fspath(path)!r} is not a readable safetensors file (corrupt or truncated?): {err}") from None


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err)
        if "GLOBAL" not in detail and "global" not in detail:
            # Not a forbidden object: bytes that are no pickle at all.
            raise CheckpointError(
                f"{os.fspath(path)!r} is not a readable PyTorch checkpoint (corrupt, truncated or another format)"
            ) from None
        blocked = next((line.strip() for line in detail.splitlines() if "GLOBAL" in line or "global" in line), "")
        raise CheckpointError(
            f"refusing to load {os.fspath(path)!r}: it holds pickled Python objects other than tensors and plain "
            f"containers, and loading them could run code. Only weights are read (torch.load(weights_only=True)); "
            f"convert it to safetensors where you trust its origin. Detail: {blocked}"
        ) from None
    except (EOFError, RuntimeError, OSError, ValueError, TypeError, AttributeError, KeyError, IndexError) as err:
        raise CheckpointError(
            f"{os.fspath(path)!r} is not a readable PyTorch checkpoint (corrupt, truncated or another format): "
            f"{type(err).__name__}: {err}"
        ) from None


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        shards = sorted(set(index["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{os.fspath(index_path)!r} is not a valid sharded-checkpoint index: {err}") from None
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(read_state_dict(index_path.parent / shard))
    return state


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint (``{"model": ...}``, ``{"state_dict": ...}``), prefixes removed."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for key in ("model", "state_dict", "model_state_dict", "module", "model_ema"):
                if isinstance(obj.get(key), Mapping):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{os.fspath(path)!r} does not hold a state dict (a mapping from names to tensors)")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{os.fspath(path)!r} has a non-string key {key!r}: not a state dict")
        if not isinstance(value, torch.Tensor):
            continue  # e.g. a stray counter next to the weights
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        state[key] = value
    if not state:
        raise CheckpointError(f"{os.fspath(path)!r} holds no tensors")
    return state


# ---------------------------------------------------------------------------------------------- layouts
# Names inside a block: timm / original spelling -> transformers spelling. "attn.kv" is one fused matrix,
# split into key and value (its first half is the keys, as the reference code's reshape to (2, heads, dim) reads it).
_BLOCK_NAMES = {
    "norm1": "layer_norm_1",
    "norm2": "layer_norm_2",
    "attn.q": "attention.query",
    "attn.proj": "attention.proj",
    "attn.sr": "attention.spatial_reduction",
    "attn.norm": "attention.layer_norm",
    "mlp.fc1": "mlp.dense1",
    "mlp.fc2": "mlp.dense2",
}
_DWCONV = {"timm": "mlp.dwconv", "original": "mlp.dwconv.dwconv"}
_PATCH_NAMES = {"proj": "proj", "norm": "layer_norm"}

# Each layout: regexes giving (scope, stage, block, local name, parameter) for its keys.
_PARSERS: dict[str, list[tuple[re.Pattern[str], str]]] = {
    "transformers": [
        (re.compile(r"^encoder\.layers\.(?P<i>\d+)\.patch_embedding\.(?P<local>proj|layer_norm)\.(?P<p>\w+)$"), "patch"),
        (re.compile(r"^encoder\.layers\.(?P<i>\d+)\.blocks\.(?P<j>\d+)\.(?P<local>.+)\.(?P<p>\w+)$"), "block"),
        (re.compile(r"^encoder\.layers\.(?P<i>\d+)\.layer_norm\.(?P<p>\w+)$"), "norm"),
        (re.compile(r"^classifier\.(?P<p>\w+)$"), "head"),
    ],
    "timm": [
        (re.compile(r"^patch_embed\.(?P<local>proj|norm)\.(?P<p>\w+)$"), "patch0"),
        (re.compile(r"^stages\.(?P<i>\d+)\.downsample\.(?P<local>proj|norm)\.(?P<p>\w+)$"), "patch"),
        (re.compile(r"^stages\.(?P<i>\d+)\.blocks\.(?P<j>\d+)\.(?P<local>.+)\.(?P<p>\w+)$"), "block"),
        (re.compile(r"^stages\.(?P<i>\d+)\.norm\.(?P<p>\w+)$"), "norm"),
        (re.compile(r"^head\.(?P<p>\w+)$"), "head"),
    ],
    "original": [
        (re.compile(r"^patch_embed(?P<n>\d+)\.(?P<local>proj|norm)\.(?P<p>\w+)$"), "patch"),
        (re.compile(r"^block(?P<n>\d+)\.(?P<j>\d+)\.(?P<local>.+)\.(?P<p>\w+)$"), "block"),
        (re.compile(r"^norm(?P<n>\d+)\.(?P<p>\w+)$"), "norm"),
        (re.compile(r"^head\.(?P<p>\w+)$"), "head"),
    ],
}

# Prefixes transformers puts before the encoder keys, by model class.
_TASK_PREFIXES = ("pvt_v2.",)
# Top-level names of the heads a checkpoint may carry: classification, SegFormer's decode head, GLPN's decoder + head.
_HEAD_PREFIXES = ("classifier.", "decode_head.", "decoder.", "head.")

# SegFormer / GLPN -> canonical, applied in order to each key (first transformers 5's in-memory names back to the
# published ones, then the published ones to ours). The encoders have the same structure as PVTv2's; their
# LayerNorm epsilons and MLP ratios differ and travel in the config (see ``dense_config_from_dict``).
_MIT_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r) for p, r in [
        (r"^(segformer|glpn)\.", ""),
        (r"^stages\.(\d+)\.patch_embeddings\.", r"encoder.patch_embeddings.\1."),
        (r"^stages\.(\d+)\.blocks\.", r"encoder.block.\1."),
        (r"^stages\.(\d+)\.layer_norm\.", r"encoder.layer_norm.\1."),
        (r"\.layernorm_before\.", ".layer_norm_1."),
        (r"\.layernorm_after\.", ".layer_norm_2."),
        (r"\.attention\.q_proj\.", ".attention.self.query."),
        (r"\.attention\.k_proj\.", ".attention.self.key."),
        (r"\.attention\.v_proj\.", ".attention.self.value."),
        (r"\.attention\.o_proj\.", ".attention.output.dense."),
        (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attention.self.sr."),
        (r"\.attention\.sequence_reduction\.layer_norm\.", ".attention.self.layer_norm."),
        (r"\.mlp\.fc1\.", ".mlp.dense1."),
        (r"\.mlp\.fc2\.", ".mlp.dense2."),
        (r"^decode_head\.linear_projections\.", "decode_head.linear_c."),
        # published names -> canonical
        (r"^encoder\.patch_embeddings\.(\d+)\.", r"encoder.layers.\1.patch_embedding."),
        (r"^encoder\.block\.(\d+)\.(\d+)\.", r"encoder.layers.\1.blocks.\2."),
        (r"^encoder\.layer_norm\.(\d+)\.", r"encoder.layers.\1.layer_norm."),
        (r"\.attention\.self\.sr\.", ".attention.spatial_reduction."),
        (r"\.attention\.self\.", ".attention."),
        (r"\.attention\.output\.dense\.", ".attention.proj."),
    ]
]


def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    """``transformers``, ``timm`` or ``original``, from the key names; :class:`CheckpointError` otherwise."""
    keys = list(state)
    if any(k.startswith(("encoder.layers.", "pvt_v2.encoder.layers.")) for k in keys):
        return "transformers"
    if any(k.startswith("stages.") for k in keys) and "patch_embed.proj.weight" in state:
        return "timm"
    if "patch_embed1.proj.weight" in state and any(k.startswith("block1.") for k in keys):
        return "original"
    if any(k.startswith("glpn.") for k in keys) or (
        any(k.startswith("decoder.stages.") for k in keys) and any(k.startswith("head.head.") for k in keys)
    ):
        return "glpn"
    if any(re.match(r"^(segformer\.)?(encoder\.(block|patch_embeddings)\.|stages\.\d+\.blocks\.)", k) for k in keys):
        return "segformer"
    sample = ", ".join(keys[:8])
    raise CheckpointError(
        f"not a PVTv2 checkpoint in a known layout ({', '.join(LAYOUTS + DENSE_LAYOUTS)}); its first keys are: {sample}."
    )


def _parse(key: str, layout: str) -> tuple[str, int, int, str, str] | None:
    for pattern, scope in _PARSERS[layout]:
        m = pattern.match(key)
        if m:
            g = m.groupdict()
            stage = int(g["n"]) - 1 if g.get("n") else int(g.get("i") or 0)
            return scope.rstrip("0"), stage, int(g.get("j") or 0), g.get("local") or "", g["p"]
    return None


def to_canonical(state: Mapping[str, torch.Tensor], layout: str | None = None) -> dict[str, torch.Tensor]:
    """Keys of any layout renamed to transformers' (without the ``pvt_v2.`` prefix); fused ``kv`` split.

    Keys that no rule knows are kept unchanged, so that the strict load names them.
    """
    layout = layout or detect_layout(state)
    if layout in DENSE_LAYOUTS:
        return _mit_to_canonical(state)
    if layout == "transformers":
        out = {}
        for key, value in state.items():
            for prefix in _TASK_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
            out[key] = value
        return out
    block_names = dict(_BLOCK_NAMES, **{_DWCONV[layout]: "mlp.dwconv.dwconv"})
    out = {}
    for key, value in state.items():
        parsed = _parse(key, layout)
        if parsed is None:
            out[key] = value
            continue
        scope, i, j, local, param = parsed
        if scope == "patch":
            out[f"encoder.layers.{i}.patch_embedding.{_PATCH_NAMES[local]}.{param}"] = value
        elif scope == "norm":
            out[f"encoder.layers.{i}.layer_norm.{param}"] = value
        elif scope == "head":
            out[f"classifier.{param}"] = value
        elif local == "attn.kv":
            half = value.shape[0] // 2
            out[f"encoder.layers.{i}.blocks.{j}.attention.key.{param}"] = value[:half].clone()
            out[f"encoder.layers.{i}.blocks.{j}.attention.value.{param}"] = value[half:].clone()
        elif local in block_names:
            out[f"encoder.layers.{i}.blocks.{j}.{block_names[local]}.{param}"] = value
        else:
            out[key] = value
    return out


def _mit_to_canonical(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SegFormer / GLPN keys renamed by ``_MIT_RULES``; a fused ``key_value`` (as some conversions write it) split."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for pattern, replacement in _MIT_RULES:
            key = pattern.sub(replacement, key)
        if ".attention.key_value." in key:
            half = value.shape[0] // 2
            out[key.replace(".key_value.", ".key.")] = value[:half].clone()
            out[key.replace(".key_value.", ".value.")] = value[half:].clone()
        else:
            out[key] = value
    return out


def from_canonical(state: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """The canonical keys written in ``layout`` (``transformers`` adds the classification prefix when a head is present)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    if layout == "transformers":
        has_head = any(k.startswith("classifier.") for k in state)
        return {(f"pvt_v2.{k}" if has_head and k.startswith("encoder.") else k): v for k, v in state.items()}
    inverse = {v: k for k, v in _BLOCK_NAMES.items()}
    inverse["mlp.dwconv.dwconv"] = _DWCONV[layout]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parsed = _parse(key, "transformers")
        if parsed is None:
            raise ValueError(f"key {key!r} has no equivalent in the {layout} layout")
        scope, i, j, local, param = parsed
        if scope == "patch":
            name = "norm" if local == "layer_norm" else "proj"
            prefix = f"patch_embed{i + 1}" if layout == "original" else ("patch_embed" if i == 0 else f"stages.{i}.downsample")
            out[f"{prefix}.{name}.{param}"] = value
        elif scope == "norm":
            out[f"norm{i + 1}.{param}" if layout == "original" else f"stages.{i}.norm.{param}"] = value
        elif scope == "head":
            out[f"head.{param}"] = value
        else:
            prefix = f"block{i + 1}.{j}" if layout == "original" else f"stages.{i}.blocks.{j}"
            if local == "attention.key":
                value = torch.cat([value, state[key.replace("attention.key.", "attention.value.")]], dim=0)
                out[f"{prefix}.attn.kv.{param}"] = value
            elif local == "attention.value":
                continue
            elif local in inverse:
                out[f"{prefix}.{inverse[local]}.{param}"] = value
            else:
                raise ValueError(f"key {key!r} has no equivalent in the {layout} layout")
    return out


def convert_state_dict(state: Mapping[str, torch.Tensor], to: str, source: str | None = None) -> dict[str, torch.Tensor]:
    """Convert a PVTv2 state dict from its layout (detected unless ``source`` is given) to layout ``to``."""
    return from_canonical(to_canonical(state, source), to)


# ---------------------------------------------------------------------------------------------- config from shapes
def infer_config(canonical: Mapping[str, torch.Tensor], layout: str, **overrides: Any) -> PvtV2Config:
    """A config that fits a checkpoint that came without one, read off its tensor shapes.

    What shapes cannot tell is taken from the published models: strides 4, 2, 2, 2; heads of
    ``hidden_sizes[i] / hidden_sizes[0]`` (1, 2, 5, 8 for every published variant); the spatial-reduction
    ratios 8, 4, 2, 1 for linear attention, where they are unused.
    """
    stages = sorted({int(m.group(1)) for k in canonical if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    if not stages or stages != list(range(len(stages))):
        raise CheckpointError(f"cannot find the stages of a PVTv2 encoder in this checkpoint (stages found: {stages})")
    hidden, patches, depths, srs, mlps = [], [], [], [], []
    linear = False
    try:
        first = canonical["encoder.layers.0.patch_embedding.proj.weight"]
        channels = int(first.shape[1])
        for i in stages:
            proj = canonical[f"encoder.layers.{i}.patch_embedding.proj.weight"]
            hidden.append(int(proj.shape[0]))
            patches.append(int(proj.shape[-1]))
            blocks = {int(m.group(1)) for k in canonical if (m := re.match(rf"encoder\.layers\.{i}\.blocks\.(\d+)\.", k))}
            depths.append(len(blocks))
            sr = canonical.get(f"encoder.layers.{i}.blocks.0.attention.spatial_reduction.weight")
            srs.append(int(sr.shape[-1]) if sr is not None else 1)
            if sr is not None and sr.shape[-1] == 1:
                linear = True
            mlps.append(canonical[f"encoder.layers.{i}.blocks.0.mlp.dense1.weight"].shape[0] / hidden[-1])
        qkv_bias = "encoder.layers.0.blocks.0.attention.query.bias" in canonical
    except KeyError as err:
        raise CheckpointError(f"the checkpoint lacks {err.args[0]!r}, needed to infer its configuration") from None
    args: dict[str, Any] = dict(
        num_channels=channels,
        num_encoder_blocks=len(stages),
        depths=depths,
        hidden_sizes=hidden,
        patch_sizes=patches,
        strides=[4] + [2] * (len(stages) - 1),
        sr_ratios=([8, 4, 2, 1] if len(stages) == 4 else [1] * len(stages)) if linear else srs,
        num_attention_heads=[h // hidden[0] if h % hidden[0] == 0 else 1 for h in hidden],
        mlp_ratios=[int(r) if float(r).is_integer() else r for r in mlps],
        qkv_bias=qkv_bias,
        linear_attention=linear,
    )
    if "classifier.weight" in canonical:
        args["num_labels"] = int(canonical["classifier.weight"].shape[0])
    if layout in ("timm", "original"):
        args["patch_embed_layer_norm_eps"] = _TORCH_DEFAULT_EPS
        args["reduction_layer_norm_eps"] = _TORCH_DEFAULT_EPS
    if layout in DENSE_LAYOUTS:
        args["layer_norm_eps"] = _TORCH_DEFAULT_EPS  # every LayerNorm of SegFormer / GLPN has PyTorch's default
    if "decode_head.classifier.weight" in canonical:
        args["num_labels"] = int(canonical["decode_head.classifier.weight"].shape[0])
        args["decoder_hidden_size"] = int(canonical["decode_head.classifier.weight"].shape[1])
    if "head.head.0.weight" in canonical:
        args["decoder_hidden_size"] = int(canonical["head.head.0.weight"].shape[0])
    preset = _matching_preset(args)
    if preset:
        args["drop_path_rate"] = PRESETS[preset]["drop_path_rate"]
    logger.info("configuration inferred from the %s checkpoint's shapes%s", layout, f" (matches {preset})" if preset else "")
    if "num_labels" in overrides or "id2label" in overrides:
        args.pop("num_labels", None)
    args.update(overrides)
    return PvtV2Config(**args)


def _matching_preset(args: Mapping[str, Any]) -> str | None:
    for name, preset in PRESETS.items():
        full = PvtV2Config(**preset)
        if (
            full.depths == args["depths"]
            and full.hidden_sizes == args["hidden_sizes"]
            and full.mlp_ratios == args["mlp_ratios"]
            and full.linear_attention == args["linear_attention"]
        ):
            return name
    return None


# ---------------------------------------------------------------------------------------------- loading a model
def _model_prefix(model_cls: type) -> str:
    """Where the encoder sits in the target class's state dict."""
    from .modeling import PvtV2ForImageClassification

    if hasattr(model_cls, "encoder_prefix"):
        return model_cls.encoder_prefix
    return "pvt_v2." if issubclass(model_cls, PvtV2ForImageClassification) else ""


def locate_checkpoint(source: str | os.PathLike, revision: str | None, cache_dir: str | os.PathLike | None) -> tuple[Path | None, Path]:
    """(config.json or None, weights file) for a folder, a checkpoint file or a hub id (cache first)."""
    from .hub import looks_like_hub_id, resolve_file

    text = os.fspath(source)
    if os.path.isfile(text):
        return None, Path(text)
    if os.path.isdir(text):
        folder = Path(text)
        weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
        if weights is None:
            found = sorted(p.name for p in folder.iterdir())[:10]
            raise FileNotFoundError(f"no weights in folder {text!r}: expected one of {list(WEIGHT_FILES)}, found {found}")
        config = folder / "config.json"
        return (config if config.is_file() else None), weights
    if text.replace("-", "_").lower() in PRESETS:
        raise FileNotFoundError(
            f"{text!r} is a preset (an architecture), not weights: build it untrained with "
            f"PvtV2ForImageClassification(PvtV2Config.from_preset({text!r})), or pass a folder, a checkpoint file "
            f"or a hub id such as 'OpenGVLab/{text.replace('-', '_').lower()}'"
        )
    if not looks_like_hub_id(text):
        raise FileNotFoundError(f"{text!r} is not an existing file or folder, a preset name, nor a hub id 'owner/name'")
    config = resolve_file(text, "config.json", revision=revision, cache_dir=cache_dir, required=False)
    for name in WEIGHT_FILES:
        weights = resolve_file(text, name, revision=revision, cache_dir=cache_dir, required=False)
        if weights is not None:
            return config, weights
    return config, resolve_file(text, WEIGHT_FILES[0], revision=revision, cache_dir=cache_dir)  # raises, explaining


def load_pretrained(model_cls: type, source: str | os.PathLike, *, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None, **overrides: Any):
    """Build ``model_cls`` and load the weights named by ``source`` into it, strictly."""
    config_path, weights_path = locate_checkpoint(source, revision, cache_dir)
    state = read_state_dict(weights_path)
    layout = detect_layout(state)
    canonical = to_canonical(state, layout)
    if config_path is not None:
        config = read_config(config_path, **overrides)
    else:
        config = infer_config(canonical, layout, **overrides)
    _attach_imagenet_labels(config, canonical)
    # Built without memory or random initialisation: the checkpoint's tensors become the parameters.
    with torch.device("meta"):
        model = model_cls(config)
    load_canonical(model, canonical, origin=os.fspath(weights_path))
    logger.info("loaded %s weights (%s layout) from %s", model_cls.__name__, layout, os.fspath(weights_path))
    return model


def read_config(path: str | os.PathLike, **overrides: Any) -> PvtV2Config:
    """A ``config.json`` of PVTv2 (``model_type`` ``pvt_v2``) or of transformers' SegFormer / GLPN, as a PvtV2Config."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{os.fspath(path)!r} is not a valid JSON config: {err}") from None
    if isinstance(data, dict) and data.get("model_type") in DENSE_LAYOUTS:
        return dense_config_from_dict(data, **overrides)
    return PvtV2Config.from_dict(data, **overrides)


# Fields of SegformerConfig / GLPNConfig that PvtV2Config carries under the same name.
_DENSE_CONFIG_FIELDS = (
    "num_channels", "num_encoder_blocks", "depths", "sr_ratios", "hidden_sizes", "patch_sizes", "strides",
    "num_attention_heads", "mlp_ratios", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
    "initializer_range", "drop_path_rate", "decoder_hidden_size", "id2label", "label2id", "problem_type",
    "classifier_dropout_prob", "semantic_loss_ignore_index", "reshape_last_stage", "max_depth", "head_in_index",
)


def dense_config_from_dict(data: Mapping[str, Any], **overrides: Any) -> PvtV2Config:
    """The PvtV2Config of a transformers ``SegformerConfig`` / ``GLPNConfig`` dict.

    Their encoders differ from PVTv2's defaults only in values the config carries: MLP ratio 4 in every stage, and
    LayerNorms built with PyTorch's default epsilon (1e-5) everywhere -- their own ``layer_norm_eps`` (1e-6) is
    read by no layer, so it is not carried over.
    """
    args = {k: data[k] for k in _DENSE_CONFIG_FIELDS if k in data}
    args.setdefault("mlp_ratios", [4] * int(args.get("num_encoder_blocks", 4)))
    args["layer_norm_eps"] = _TORCH_DEFAULT_EPS
    if data.get("model_type") == "segformer":
        args.setdefault("decoder_hidden_size", 256)
        args.setdefault("classifier_dropout_prob", 0.1)
        args.setdefault("semantic_loss_ignore_index", 255)
        args.setdefault("reshape_last_stage", True)
    else:
        args.setdefault("decoder_hidden_size", 64)
        args.setdefault("max_depth", 10)
        args.setdefault("head_in_index", -1)
    if "max_depth" in args and isinstance(args["max_depth"], int):
        args["max_depth"] = float(args["max_depth"])
    if "num_labels" in overrides and "id2label" not in overrides and overrides["num_labels"] != len(args.get("id2label") or {}):
        args.pop("id2label", None)
        args.pop("label2id", None)
    args.update(overrides)
    return PvtV2Config(**args)


def _attach_imagenet_labels(config: PvtV2Config, canonical: Mapping[str, torch.Tensor]) -> None:
    head = canonical.get("classifier.weight")
    generic = all(name == f"LABEL_{i}" for i, name in config.id2label.items())
    if head is not None and head.shape[0] == 1000 and config.num_labels == 1000 and generic:
        from .labels import imagenet_id2label

        config._set_labels(None, imagenet_id2label(), None)


def load_canonical(model: torch.nn.Module, canonical: Mapping[str, torch.Tensor], origin: str = "checkpoint") -> None:
    """Load canonical-layout weights into ``model``: every key and shape must fit, except a head that is absent from
    the checkpoint or a classifier sized for another number of classes (then newly initialised, and logged).

    A model class names its head(s) in ``head_prefixes`` and its last, class-sized layer in ``classifier_prefix``
    (classification: ``classifier.``; ``pvtv2.dense``: ``decode_head.`` ..., ``decode_head.classifier.``). Heads in
    the checkpoint that the model does not have (a classifier's, when building a segmentation model) are dropped.
    """
    prefix = _model_prefix(type(model))
    expected = model.state_dict()
    model_heads = tuple(getattr(type(model), "head_prefixes", ("classifier.",)))
    classifier = getattr(type(model), "classifier_prefix", "classifier.")
    target: dict[str, torch.Tensor] = {}
    dropped: set[str] = set()
    for key, value in canonical.items():
        head = next((h for h in _HEAD_PREFIXES if key.startswith(h)), None)
        if head is not None:
            if not any(k.startswith(head) for k in expected):
                dropped.add(head.rstrip("."))  # e.g. an encoder-only model takes the encoder of a classifier
                continue
            target[key] = value
        else:
            target[prefix + key if key.startswith("encoder.") else key] = value
    if dropped:
        logger.info("%s has no %s: the checkpoint's are not used", type(model).__name__, ", ".join(sorted(dropped)))

    head_keys = {k for k in expected if k.startswith(model_heads)}
    weight = f"{classifier}weight"
    replaced = weight in expected and weight in target and target[weight].shape[0] != expected[weight].shape[0]
    if replaced:
        logger.warning(
            "replacing the classifier head: the checkpoint classifies %d classes, the model %d; the new head is "
            "randomly initialised and needs fine-tuning",
            target[weight].shape[0], expected[weight].shape[0],
        )
        for key in [k for k in target if k.startswith(classifier)]:
            target.pop(key)

    missing = sorted(set(expected) - set(target))
    unexpected = sorted(set(target) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(target[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(target) & set(expected)
        if target[k].shape != expected[k].shape
    )
    bad_dtype = sorted(
        f"{k}: {target[k].dtype}" for k in set(target) & set(expected)
        if expected[k].is_floating_point() and not target[k].is_floating_point()
    )
    head_missing = missing and set(missing) <= head_keys
    if (missing and not head_missing) or unexpected or misshaped or bad_dtype:
        parts = [f"the weights in {origin} do not fit {type(model).__name__} ({_describe(model)})"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
                             ("non-float tensors for float parameters", bad_dtype)):
            if items:
                shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
                parts.append(f"{len(items)} {title} keys:\n    {shown}")
        raise CheckpointError("\n  ".join(parts))
    if head_missing and not replaced:  # a replaced head was announced above
        logger.warning("the checkpoint has no weights for %s: newly initialised", _summarise_keys(missing))
    target = {k: v.to(expected[k].dtype) if expected[k].is_floating_point() else v for k, v in target.items()}
    model.load_state_dict(target, strict=not head_missing, assign=True)
    _materialize_and_init(model)


def _materialize_and_init(model: torch.nn.Module) -> None:
    """Give the modules left on the meta device (a new head) real memory and the library's initialisation."""
    from .layers import init_weights

    device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    for module in model.modules():
        if any(t.is_meta for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]):
            module.to_empty(device=device, recurse=False)
            # A model may initialise its own heads differently (pvtv2.dense: as transformers' SegFormer / GLPN).
            getattr(model, "init_new_module", lambda m: init_weights(m, model.config.initializer_range))(module)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()


def _summarise_keys(keys: list[str]) -> str:
    modules = sorted({k.rsplit(".", 1)[0] for k in keys})
    return ", ".join(modules[:6]) + (f" and {len(modules) - 6} more modules" if len(modules) > 6 else "")


def _describe(model: torch.nn.Module) -> str:
    c = model.config
    return f"hidden_sizes={c.hidden_sizes}, depths={c.depths}, linear_attention={c.linear_attention}, num_labels={c.num_labels}"


# ---------------------------------------------------------------------------------------------- writing
def _contiguous_copies(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or strided storage; clone what needs it.
    return {k: v.detach().contiguous().clone() if not v.is_contiguous() else v.detach() for k, v in state.items()}


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write tensors to ``path`` atomically: safetensors for ``.safetensors``, a plain tensor dict otherwise."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = _contiguous_copies(state)
    if path.suffix == ".safetensors":
        save_file({k: v.cpu() for k, v in tensors.items()}, os.fspath(tmp), metadata={"format": "pt", **(metadata or {})})
    else:
        torch.save({k: v.cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)
    return path


def save_pretrained(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """``config.json`` (with the class in ``architectures``) and ``model.safetensors`` in transformers' layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config: PvtV2Config = model.config
    data = config.to_dict()
    data["architectures"] = [type(model).__name__]
    save_state_dict(model.state_dict(), folder / "model.safetensors")
    if callable(config.hidden_act):
        config.to_json_string()  # raises with the explanation
    tmp = folder / ".config.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, folder / "config.json")
