"""PvtV2Config: the model's hyper-parameters, the named presets, validation, and ``config.json`` in and out.

The field names and defaults are those of the model documentation (and of transformers' ``PvtV2Config``), so a
published ``config.json`` reads as it is, and one written here loads in transformers. Two fields are extra:
the LayerNorm epsilons of the patch embeddings and of the spatial reduction. The original PVTv2 code and timm
use PyTorch's default (1e-5) there, transformers uses ``layer_norm_eps`` (1e-6) everywhere; carrying both
keeps a checkpoint's outputs identical to those of the code it came from.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text
from .activations import ACTIVATIONS
from .labels import generic_id2label, imagenet_id2label

__all__ = ["PvtV2Config", "PRESETS", "SEGMENTATION_DEFAULTS", "DEPTH_DEFAULTS", "list_presets", "preset_key", "is_preset_name"]

logger = logging.getLogger(__name__)


# Keys of a config.json that describe the file rather than the model; kept, but not part of equality.
_METADATA_KEYS = ("architectures", "torch_dtype", "dtype", "transformers_version", "pvtv2_version")

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

# Fields of the dense-prediction heads (pvtv2.dense), written to config.json only when set.
_DENSE_FIELDS = (
    "decoder_hidden_size", "classifier_dropout_prob", "semantic_loss_ignore_index", "reshape_last_stage", "max_depth",
    "head_in_index",
)

# The head defaults of transformers' SegformerConfig and GLPNConfig, filled in by the segmentation and depth models
# (and by a SegFormer / GLPN config.json read without them).
SEGMENTATION_DEFAULTS: dict[str, Any] = dict(
    decoder_hidden_size=256, classifier_dropout_prob=0.1, semantic_loss_ignore_index=255, reshape_last_stage=True
)
DEPTH_DEFAULTS: dict[str, Any] = dict(decoder_hidden_size=64, max_depth=10.0, head_in_index=-1)

_STAGE_LISTS = ("depths", "sr_ratios", "hidden_sizes", "patch_sizes", "strides", "num_attention_heads", "mlp_ratios")

# The published variants (paper Table 1 and the authors' classification/pvt_v2.py). Only what differs from the
# defaults is listed; every variant classifies ImageNet-1k. ``drop_path_rate`` is the authors' training value.
_WIDE = [64, 128, 320, 512]
PRESETS: dict[str, dict[str, Any]] = {
    "pvt_v2_b0": dict(depths=[2, 2, 2, 2], hidden_sizes=[32, 64, 160, 256], drop_path_rate=0.1),
    "pvt_v2_b1": dict(depths=[2, 2, 2, 2], hidden_sizes=_WIDE, drop_path_rate=0.1),
    "pvt_v2_b2": dict(depths=[3, 4, 6, 3], hidden_sizes=_WIDE, drop_path_rate=0.1),
    "pvt_v2_b2_li": dict(depths=[3, 4, 6, 3], hidden_sizes=_WIDE, linear_attention=True, drop_path_rate=0.1),
    "pvt_v2_b3": dict(depths=[3, 4, 18, 3], hidden_sizes=_WIDE, drop_path_rate=0.3),
    "pvt_v2_b4": dict(depths=[3, 8, 27, 3], hidden_sizes=_WIDE, drop_path_rate=0.3),
    "pvt_v2_b5": dict(depths=[3, 6, 40, 3], hidden_sizes=_WIDE, mlp_ratios=[4, 4, 4, 4], drop_path_rate=0.3),
}


def list_presets() -> list[str]:
    """Names accepted by :meth:`PvtV2Config.from_preset`."""
    return list(PRESETS)


def preset_key(name: str | os.PathLike) -> str | None:
    """The preset a name means (``"PVT-v2-B0"`` -> ``"pvt_v2_b0"``), or None when it names no preset."""
    key = os.fspath(name).replace("-", "_").lower()
    return key if key in PRESETS else None


def is_preset_name(source: str | os.PathLike) -> bool:
    """True when ``source`` names a preset and no file or folder of that name exists (a path always wins)."""
    return preset_key(source) is not None and not os.path.exists(os.fspath(source))


class PvtV2Config:
    """Configuration of a PVTv2 model.

    Args mirror transformers' ``PvtV2Config``; see the model documentation for each. Beyond them:

    - ``patch_embed_layer_norm_eps``: epsilon of the LayerNorm after each overlapping patch embedding
      (``None``: ``layer_norm_eps``; the original code and timm: 1e-5).
    - ``reduction_layer_norm_eps``: epsilon of the LayerNorm after the spatial reduction in attention
      (``None``: ``layer_norm_eps``; the original code and timm: 1e-5).
    - ``num_labels`` / ``id2label`` / ``label2id`` / ``problem_type``: the classification head and its loss.

    Dense-prediction heads (``pvtv2.dense``; SegFormer's and GLPN's fields, same names). ``None`` means the task's
    default, which the model fills in when it is built, so a saved model's ``config.json`` holds explicit values;
    a field left ``None`` is not written:

    - ``decoder_hidden_size``: width of the decode head (SegFormer: 256 for b0/b1, 768 for b2+; GLPN: 64).
    - ``classifier_dropout_prob``: dropout before SegFormer's per-pixel classifier (default 0.1).
    - ``semantic_loss_ignore_index``: label value the segmentation loss skips (default 255).
    - ``reshape_last_stage``: SegFormer's flag; ``False`` returns the last stage's hidden state as tokens
      ``(B, N, C)`` (the logits are the same either way; default ``True``).
    - ``max_depth``: GLPN's depth range: predictions are ``sigmoid(x) * max_depth`` (default 10).
    - ``head_in_index``: which decoder output GLPN's depth head reads (default -1, the full-resolution one).

    Unknown keyword arguments are kept as attributes and written back by :meth:`to_dict`.
    """

    model_type = "pvt_v2"

    def __init__(
        self,
        image_size: int | Sequence[int] = 224,
        num_channels: int = 3,
        num_encoder_blocks: int = 4,
        depths: Sequence[int] = (2, 2, 2, 2),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        hidden_sizes: Sequence[int] = (32, 64, 160, 256),
        patch_sizes: Sequence[int] = (7, 3, 3, 3),
        strides: Sequence[int] = (4, 2, 2, 2),
        num_attention_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        hidden_act: str | Callable = "gelu",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        initializer_range: float = 0.02,
        drop_path_rate: float = 0.0,
        layer_norm_eps: float = 1e-6,
        qkv_bias: bool = True,
        linear_attention: bool = False,
        out_features: Sequence[str] | None = None,
        out_indices: Sequence[int] | None = None,
        patch_embed_layer_norm_eps: float | None = None,
        reduction_layer_norm_eps: float | None = None,
        decoder_hidden_size: int | None = None,
        classifier_dropout_prob: float | None = None,
        semantic_loss_ignore_index: int | None = None,
        reshape_last_stage: bool | None = None,
        max_depth: float | None = None,
        head_in_index: int | None = None,
        num_labels: int | None = None,
        id2label: dict[int | str, str] | None = None,
        label2id: dict[str, int] | None = None,
        problem_type: str | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> None:
        self.image_size = _as_size(image_size)
        self.num_channels = num_channels
        self.num_encoder_blocks = num_encoder_blocks
        self.depths = _as_list("depths", depths)
        self.sr_ratios = _as_list("sr_ratios", sr_ratios)
        self.hidden_sizes = _as_list("hidden_sizes", hidden_sizes)
        self.patch_sizes = _as_list("patch_sizes", patch_sizes)
        self.strides = _as_list("strides", strides)
        self.num_attention_heads = _as_list("num_attention_heads", num_attention_heads)
        self.mlp_ratios = _as_list("mlp_ratios", mlp_ratios)
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.initializer_range = initializer_range
        self.drop_path_rate = drop_path_rate
        self.layer_norm_eps = layer_norm_eps
        self.qkv_bias = qkv_bias
        self.linear_attention = linear_attention
        self.patch_embed_layer_norm_eps = patch_embed_layer_norm_eps
        self.reduction_layer_norm_eps = reduction_layer_norm_eps
        self.decoder_hidden_size = decoder_hidden_size
        self.classifier_dropout_prob = classifier_dropout_prob
        self.semantic_loss_ignore_index = semantic_loss_ignore_index
        self.reshape_last_stage = reshape_last_stage
        self.max_depth = max_depth
        self.head_in_index = head_in_index
        self.problem_type = problem_type
        self.output_attentions = output_attentions
        self.output_hidden_states = output_hidden_states
        self.return_dict = return_dict
        # transformers writes these for information only; they are derived here.
        for derived in ("stage_names", "transformers_version", "model_type"):
            kwargs.pop(derived, None)
        self._extra: dict[str, Any] = dict(kwargs)
        for key, value in kwargs.items():
            setattr(self, key, value)

        self._set_labels(num_labels, id2label, label2id)
        self._validate_stages()
        self.out_features, self.out_indices = self._resolve_out_features(out_features, out_indices)

    # ------------------------------------------------------------------ derived values
    @property
    def stage_names(self) -> list[str]:
        return [f"stage{i}" for i in range(1, self.num_encoder_blocks + 1)]

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, value: int) -> None:
        self._set_labels(value, None, None)

    @property
    def patch_norm_eps(self) -> float:
        """Epsilon of the patch-embedding LayerNorms."""
        return self.layer_norm_eps if self.patch_embed_layer_norm_eps is None else self.patch_embed_layer_norm_eps

    @property
    def reduction_norm_eps(self) -> float:
        """Epsilon of the spatial-reduction LayerNorms."""
        return self.layer_norm_eps if self.reduction_layer_norm_eps is None else self.reduction_layer_norm_eps

    @property
    def stage_strides(self) -> list[int]:
        """Total stride of each stage's output with respect to the input image."""
        out, total = [], 1
        for stride in self.strides:
            total *= stride
            out.append(total)
        return out

    # ------------------------------------------------------------------ validation
    def _set_labels(self, num_labels: int | None, id2label: dict | None, label2id: dict | None) -> None:
        if id2label is not None:
            try:
                id2label = {int(k): str(v) for k, v in id2label.items()}
            except (TypeError, ValueError, AttributeError):
                raise ValueError(f"id2label must map class indices to names, got {id2label!r}") from None
            if sorted(id2label) != list(range(len(id2label))):
                raise ValueError(f"id2label keys must be 0..{len(id2label) - 1}, got {sorted(id2label)[:10]}...")
            if num_labels is not None and num_labels != len(id2label):
                raise ValueError(f"num_labels={num_labels} but id2label has {len(id2label)} entries")
        else:
            if num_labels is None:
                num_labels = 2  # transformers' default
            if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 0:
                raise ValueError(f"num_labels must be a non-negative integer, got {num_labels!r}")
            id2label = generic_id2label(num_labels)
        self.id2label: dict[int, str] = id2label
        if label2id is not None and {str(k): int(v) for k, v in label2id.items()} != {v: k for k, v in id2label.items()}:
            if len(set(id2label.values())) == len(id2label):
                raise ValueError("label2id does not invert id2label")
        self.label2id: dict[str, int] = {v: k for k, v in id2label.items()}

    def _validate_stages(self) -> None:
        n = self.num_encoder_blocks
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"num_encoder_blocks must be a positive integer, got {n!r}")
        for name in _STAGE_LISTS:
            values = getattr(self, name)
            if len(values) != n:
                raise ValueError(
                    f"{name} has {len(values)} entries but num_encoder_blocks is {n}: every per-stage list needs one "
                    f"entry per stage ({name}={values})"
                )
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                    raise ValueError(f"{name} must hold positive numbers, got {values}")
                if name != "mlp_ratios" and int(v) != v:
                    raise ValueError(f"{name} must hold integers, got {values}")
        for i, (size, heads) in enumerate(zip(self.hidden_sizes, self.num_attention_heads)):
            if size % heads:
                raise ValueError(
                    f"num_attention_heads[{i}]={heads} does not divide hidden_sizes[{i}]={size}: each head needs "
                    f"an equal share of the channels"
                )
        for i, ratio in enumerate(self.mlp_ratios):
            if int(self.hidden_sizes[i] * ratio) < 1:
                raise ValueError(f"mlp_ratios[{i}]={ratio} gives an empty Mix-FFN for hidden size {self.hidden_sizes[i]}")
        if not isinstance(self.num_channels, int) or isinstance(self.num_channels, bool) or self.num_channels < 1:
            raise ValueError(f"num_channels must be a positive integer, got {self.num_channels!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            rate = getattr(self, name)
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1), got {rate!r}")
        if not isinstance(self.initializer_range, (int, float)) or self.initializer_range < 0:
            raise ValueError(f"initializer_range must be non-negative, got {self.initializer_range!r}")
        for name in ("layer_norm_eps", "patch_embed_layer_norm_eps", "reduction_layer_norm_eps"):
            eps = getattr(self, name)
            if eps is None and name != "layer_norm_eps":
                continue
            if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
                raise ValueError(f"{name} must be a positive number, got {eps!r}")
        if isinstance(self.hidden_act, str):
            if self.hidden_act not in list(ACTIVATIONS):
                raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use one of {list(ACTIVATIONS)}")
        elif not callable(self.hidden_act):
            raise ValueError(f"hidden_act must be an activation name or a callable, got {self.hidden_act!r}")
        self._validate_dense_heads()
        for name in ("qkv_bias", "linear_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type={self.problem_type!r} is not one of {PROBLEM_TYPES}")

    def _validate_dense_heads(self) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if self.decoder_hidden_size is not None and (not is_int(self.decoder_hidden_size) or self.decoder_hidden_size < 1):
            raise ValueError(f"decoder_hidden_size must be a positive integer, got {self.decoder_hidden_size!r}")
        rate = self.classifier_dropout_prob
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0):
            raise ValueError(f"classifier_dropout_prob must be a probability in [0, 1), got {rate!r}")
        if self.semantic_loss_ignore_index is not None and not is_int(self.semantic_loss_ignore_index):
            raise ValueError(f"semantic_loss_ignore_index must be an integer, got {self.semantic_loss_ignore_index!r}")
        if self.reshape_last_stage is not None and not isinstance(self.reshape_last_stage, bool):
            raise ValueError(f"reshape_last_stage must be true or false, got {self.reshape_last_stage!r}")
        depth = self.max_depth
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, (int, float)) or depth <= 0):
            raise ValueError(f"max_depth must be a positive number, got {depth!r}")
        if self.head_in_index is not None and (
            not is_int(self.head_in_index) or not -self.num_encoder_blocks <= self.head_in_index < self.num_encoder_blocks
        ):
            raise ValueError(
                f"head_in_index must index one of the {self.num_encoder_blocks} decoder outputs, got {self.head_in_index!r}"
            )

    def _resolve_out_features(
        self, out_features: Sequence[str] | None, out_indices: Sequence[int] | None
    ) -> tuple[list[str], list[int]]:
        """Align the backbone's ``out_features`` and ``out_indices`` (the last stage when neither is given)."""
        names = self.stage_names
        if out_features is not None:
            if isinstance(out_features, str) or not all(isinstance(f, str) for f in out_features):
                raise ValueError(f"out_features must be a list of stage names, got {out_features!r}")
            unknown = [f for f in out_features if f not in names]
            if unknown:
                hint = " (PVTv2 has no stem: the first patch embedding belongs to stage1)" if "stem" in unknown else ""
                raise ValueError(f"out_features has unknown stage names {unknown}; choose from {names}{hint}")
            if len(set(out_features)) != len(out_features):
                raise ValueError(f"out_features has duplicates: {list(out_features)}")
            if list(out_features) != sorted(out_features, key=names.index):
                raise ValueError(f"out_features must follow the stage order {names}, got {list(out_features)}")
        if out_indices is not None:
            if isinstance(out_indices, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in out_indices):
                raise ValueError(f"out_indices must be a list of integers, got {out_indices!r}")
            bad = [i for i in out_indices if not -len(names) <= i < len(names)]
            if bad:
                raise ValueError(f"out_indices {bad} out of range for {len(names)} stages (valid: 0..{len(names) - 1})")
            positive = [i % len(names) for i in out_indices]
            if len(set(positive)) != len(positive) or positive != sorted(positive):
                raise ValueError(f"out_indices must be increasing without duplicates, got {list(out_indices)}")
        if out_features is None and out_indices is None:
            return [names[-1]], [len(names) - 1]
        if out_features is None:
            return [names[i] for i in out_indices], list(out_indices)
        if out_indices is None:
            return list(out_features), [names.index(f) for f in out_features]
        if [names[i] for i in out_indices] != list(out_features):
            raise ValueError(f"out_features {list(out_features)} and out_indices {list(out_indices)} name different stages")
        return list(out_features), list(out_indices)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> PvtV2Config:
        """The configuration of a published variant (``pvt_v2_b0`` ... ``pvt_v2_b5``, ``pvt_v2_b2_li``).

        Presets classify the 1000 ImageNet classes, with their names attached; any field can be overridden.
        """
        key = preset_key(name)
        if key is None:
            raise ValueError(f"unknown preset {name!r}; choose from {list_presets()}")
        args: dict[str, Any] = copy.deepcopy(PRESETS[key])
        if not {"num_labels", "id2label"} & overrides.keys():
            args["id2label"] = imagenet_id2label()
        args.update(overrides)
        return cls(**args)

    def with_defaults(self, **defaults: Any) -> PvtV2Config:
        """A copy in which the fields that are unset (``None``) take the given values; ``self`` when none is unset."""
        missing = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return self.replace(**missing) if missing else self

    def replace(self, **changes: Any) -> PvtV2Config:
        """A copy with some fields changed (validated anew)."""
        data = self.to_dict()
        if "num_labels" in changes and "id2label" not in changes:
            data.pop("id2label", None)
            data.pop("label2id", None)
        if "id2label" in changes and "label2id" not in changes:
            data.pop("label2id", None)  # derived from the new id2label
        if ("out_features" in changes) != ("out_indices" in changes):
            data.pop("out_features", None)
            data.pop("out_indices", None)
        data.update(changes)
        if callable(self.hidden_act) and "hidden_act" not in changes:
            data["hidden_act"] = self.hidden_act
        return type(self).from_dict(data)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """All fields, in the layout of a published ``config.json``."""
        data: dict[str, Any] = {
            "model_type": self.model_type,
            "image_size": list(self.image_size),
            "num_channels": self.num_channels,
            "num_encoder_blocks": self.num_encoder_blocks,
            "depths": list(self.depths),
            "sr_ratios": list(self.sr_ratios),
            "hidden_sizes": list(self.hidden_sizes),
            "patch_sizes": list(self.patch_sizes),
            "strides": list(self.strides),
            "num_attention_heads": list(self.num_attention_heads),
            "mlp_ratios": list(self.mlp_ratios),
            "hidden_act": self.hidden_act,
            "hidden_dropout_prob": self.hidden_dropout_prob,
            "attention_probs_dropout_prob": self.attention_probs_dropout_prob,
            "initializer_range": self.initializer_range,
            "drop_path_rate": self.drop_path_rate,
            "layer_norm_eps": self.layer_norm_eps,
            "qkv_bias": self.qkv_bias,
            "linear_attention": self.linear_attention,
            "out_features": list(self.out_features),
            "out_indices": list(self.out_indices),
            "stage_names": self.stage_names,
            "id2label": {str(k): v for k, v in self.id2label.items()},
            "label2id": dict(self.label2id),
        }
        if self.patch_embed_layer_norm_eps is not None:
            data["patch_embed_layer_norm_eps"] = self.patch_embed_layer_norm_eps
        if self.reduction_layer_norm_eps is not None:
            data["reduction_layer_norm_eps"] = self.reduction_layer_norm_eps
        if self.problem_type is not None:
            data["problem_type"] = self.problem_type
        for name in _DENSE_FIELDS:
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        for flag, default in (("output_attentions", False), ("output_hidden_states", False), ("return_dict", True)):
            if getattr(self, flag) != default:
                data[flag] = getattr(self, flag)
        for key in self._extra:
            data[key] = getattr(self, key)
        return data

    def to_json_string(self) -> str:
        data = self.to_dict()
        if callable(data["hidden_act"]):
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is a callable and cannot be written to JSON; use one of "
                f"{list(ACTIVATIONS)}"
            )
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> PvtV2Config:
        if not isinstance(data, dict):
            raise ValueError(f"a PVTv2 config must be a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"config has model_type={model_type!r}, expected {cls.model_type!r}")
        args = dict(data)
        if "num_labels" in overrides and "id2label" not in overrides:
            if overrides["num_labels"] != len(args.get("id2label") or {}):
                args.pop("id2label", None)
                args.pop("label2id", None)
        if "id2label" in overrides and "label2id" not in overrides:
            args.pop("label2id", None)  # derived from the new id2label
        if ("out_features" in overrides) != ("out_indices" in overrides):
            args.pop("out_features", None)
            args.pop("out_indices", None)
        args.update(overrides)
        # transformers' own config may carry these private spellings.
        for private in ("_out_features", "_out_indices"):
            if private in args:
                args.setdefault(private[1:], args.pop(private))
        return cls(**args)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``config.json`` into ``folder`` (created if needed); returns its path."""
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        target = path / "config.json"
        atomic_write_text(target, self.to_json_string())
        return target

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> PvtV2Config:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{os.fspath(path)!r} is not valid JSON: {err}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{os.fspath(path)!r} is not a UTF-8 text file") from None
        return cls.from_dict(data, **overrides)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, **overrides: Any) -> PvtV2Config:
        """Read ``config.json`` from a folder, a JSON file, a hub id, or a preset name."""
        from ..weights.hub import resolve_file

        text = os.fspath(source)
        if os.path.isfile(text):
            return cls.from_json_file(text, **overrides)
        if is_preset_name(text):
            return cls.from_preset(text, **overrides)
        return cls.from_json_file(resolve_file(text, "config.json"), **overrides)

    def __eq__(self, other: object) -> bool:
        """Equal when every field is; bookkeeping that travels in config.json (``architectures``...) aside."""
        if not isinstance(other, PvtV2Config):
            return False
        mine, theirs = self.to_dict(), other.to_dict()
        for key in _METADATA_KEYS:
            mine.pop(key, None)
            theirs.pop(key, None)
        return mine == theirs

    def __repr__(self) -> str:
        data = self.to_dict()
        for key in ("id2label", "label2id"):
            if len(data[key]) > 4:
                data[key] = f"<{len(data[key])} labels>"
        return f"PvtV2Config({json.dumps(data, sort_keys=True, default=repr)})"


def _as_list(name: str, value: Any) -> list:
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a list with one number per stage, got {value!r}")
    return list(value)


def _as_size(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, dict) and {"height", "width"} <= value.keys():
        return (int(value["height"]), int(value["width"]))
    try:
        height, width = value  # type: ignore[misc]
        return (int(height), int(width))
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be an int or a (height, width) pair, got {value!r}") from None

