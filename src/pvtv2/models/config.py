"""PvtV2Config: the model's hyper-parameters, the named presets, validation, and ``config.json`` in and out.

The field names and defaults are those of the model documentation (and of transformers' ``PvtV2Config``), so a
published ``config.json`` reads as it is, and one written here loads in transformers. Two fields are extra:
the LayerNorm epsilons of the patch embeddings and of the spatial reduction. The original PVTv2 code and timm
use PyTorch's default (1e-5) there, transformers uses ``layer_norm_eps`` (1e-6) everywhere; carrying both
keeps a checkpoint's outputs identical to those of the code it came from.
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import difflib
import inspect
import json
import logging
import math
import numbers
import os
import re
import reprlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import atomic_write_text
from ..weights.hub import timm_architecture  # re-exported: a timm config.json's architecture
from .activations import ACTIVATIONS
from .labels import generic_id2label, imagenet_id2label

__all__ = [
    "PvtV2Config", "PvtV2Fields", "FIELDS", "merge_changes", "PRESETS", "SEGMENTATION_DEFAULTS", "DEPTH_DEFAULTS",
    "list_presets", "preset_key", "is_preset_name", "unknown_fields", "read_json_config", "short_repr",
    "check_problem_type", "STAGE_LISTS", "timm_architecture", "split_unused",
]

logger = logging.getLogger(__name__)


# The head defaults of transformers' SegformerConfig and GLPNConfig, filled in by the segmentation and depth models
# (and by a SegFormer / GLPN config.json read without them).
SEGMENTATION_DEFAULTS: dict[str, Any] = dict(
    decoder_hidden_size=256, classifier_dropout_prob=0.1, semantic_loss_ignore_index=255, reshape_last_stage=True
)
DEPTH_DEFAULTS: dict[str, Any] = dict(decoder_hidden_size=64, max_depth=10.0, head_in_index=-1)

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



# ---------------------------------------------------------------------------------------------- values in messages
class _ShortRepr(reprlib.Repr):
    """reprlib's abbreviations (the middle of a long number, the tail of a long list), for any integer: Python
    refuses to write one of more than 4300 digits at all (``sys.get_int_max_str_digits``)."""

    def repr_int(self, x: int, level: int) -> str:
        try:
            return super().repr_int(x, level)
        except ValueError:
            return f"<an integer of {x.bit_length()} bits>"


_SHORT = _ShortRepr()
_SHORT.maxlong = 40  # 40 digits in full (10**30 reads as itself); a longer number keeps its ends
_SHORT.maxlist = _SHORT.maxtuple = 8
_SHORT.maxstring = _SHORT.maxother = 40


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters: a value of 400 digits (or a list of a
    million numbers) written out in full buries the message that names it. Always one line, and never raises: a
    value's own ``__repr__`` may span lines (a 2-D array or tensor), hold control characters, or fail."""
    try:
        text = _SHORT.repr(value)
    except Exception:  # noqa: BLE001
        # a __repr__ that fails in a way reprlib does not catch: the message still names the type
        text = f"<{type(value).__name__} object>"
    # A line break and the indentation around it (a tensor's rows) become one space; plain spaces stay (inside a
    # string's repr they are part of the value), and other unprintable characters are escaped as repr escapes them.
    text = re.sub(r" *[^\S ]\s*", " ", text)
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _too_large(value: Any) -> bool:
    """An integer beyond any float (``10**400``): positive and whole, but too large to be used as any number here."""
    return _is_int(value) and not _is_number(value)


# ---------------------------------------------------------------------------------------------- field checks
# Each check takes a field's name and the value given, and returns the value as the config stores it, or raises a
# ValueError that names the field and the value. Checks that involve several fields come after the table.
Check = Callable[[str, Any], Any]


def _plain(value: Any) -> Any:
    """A number of any numeric type (numpy's ``int64``, ``float32``, an ``IntEnum``...) as Python's own int or float,
    and numpy's bool as Python's, so that the config and its config.json hold the same values as one built from plain
    numbers; anything else (a tensor, a string) as given, for the check to judge."""
    if isinstance(value, np.bool_):  # a flag for the boolean fields (qkv_bias...); refused as a number, as bool is
        return bool(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # bool: a flag, never a number here
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _plain_tree(value: Any) -> Any:
    """:func:`_plain` through lists, tuples and dict values: the settings the config keeps without a check (a head's
    ``min_size``, ``score_threshold``...) are written to config.json as they are, and json cannot write numpy's
    numbers."""
    if isinstance(value, (list, tuple)):
        return type(value)(_plain_tree(v) for v in value) if type(value) in (list, tuple) else value
    if isinstance(value, dict):
        return {k: _plain_tree(v) for k, v in value.items()}
    return _plain(value)


def _not_plain_hint(values: Iterable[Any]) -> str:
    """Why a value that prints like a number was refused: a tensor or array element is not one (it may live on a GPU,
    carry a gradient, or change later); the caller converts it, once, as they mean it."""
    if any(_array_number(v) for v in values):
        return " (a tensor or array: pass plain numbers, e.g. its .tolist() or .item())"
    return ""


def _array_number(value: Any) -> bool:
    if isinstance(value, numbers.Number) or not hasattr(value, "item"):
        return False
    try:
        item = value.item()
    except Exception:  # noqa: BLE001  # more than one element: an array all the same
        return True
    return isinstance(item, numbers.Number) and not isinstance(item, bool)  # numpy's bool is no number either


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    # bool is an int to Python, never a number to a person; inf and nan are never meant
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float ({"layer_norm_eps": 1e400 written out}): not a usable number
        return False


def _scalar(what: str, test: Callable[[Any], bool]) -> Check:
    """A check that ``test`` passes, whose error says the value must be ``what``."""

    def check(name: str, value: Any) -> Any:
        value = _plain(value)
        if not test(value):
            reason = " (too large for any number this field holds)" if _too_large(value) else _not_plain_hint([value])
            raise ValueError(f"{name} must be {what}, got {short_repr(value)}{reason}")
        return value

    return check


_positive_int = _scalar("a positive integer", lambda v: _is_int(v) and v >= 1)
_non_negative_int = _scalar("a non-negative integer", lambda v: _is_int(v) and v >= 0)
_integer = _scalar("an integer", _is_int)
_positive_number = _scalar("a positive number", lambda v: _is_number(v) and v > 0)
_probability = _scalar("a probability in [0, 1)", lambda v: _is_number(v) and 0.0 <= v < 1.0)
_boolean = _scalar("True or False", lambda v: isinstance(v, bool))


def _as_float(check: Check) -> Check:
    """``check``, the value stored as a float: transformers 5 types these fields float and refuses a config.json
    that holds an int there (``"layer_norm_eps": 1``)."""

    def as_float(name: str, value: Any) -> Any:
        value = check(name, value)
        return None if value is None else float(value)

    return as_float


def _optional(check: Check) -> Check:
    """``check``, with None (unset) allowed."""

    def optional(name: str, value: Any) -> Any:
        return None if value is None else check(name, value)

    return optional


def _one_of(choices: Sequence[str]) -> Check:
    def one_of(name: str, value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{name}={short_repr(value)} is not one of {tuple(choices)}")
        return value

    return one_of


def _list(name: str, value: Any, what: str) -> list:
    # an ordered collection; a string, a mapping or a set would be read element by element, silently wrong
    if isinstance(value, (str, bytes, Mapping, set, frozenset)) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a list {what}, got {short_repr(value)}")
    return list(value)


def _per_stage(kind: type, zero: bool = False) -> Check:
    """A list with one positive number per stage, whole numbers stored as int (2.0 as 2); ``int``: only those.
    ``zero``: 0 is taken too (a stage of no blocks: its patch embedding and LayerNorm, as transformers and timm build)."""

    def per_stage(name: str, value: Any) -> list:
        values = [_plain(v) for v in _list(name, value, "with one number per stage")]
        for v in values:
            if _too_large(v) and v > 0:  # positive and whole: too large is what is wrong with it
                limit = f"{_MAX_DEPTH} (blocks in a stage)" if name == "depths" else _MAX_STAGE_VALUE
                raise ValueError(f"{name} must hold numbers up to {limit}, got {short_repr(values)}")
            if not _is_number(v) or v < 0 or v == 0 and not zero:
                what = "non-negative" if zero else "positive"
                raise ValueError(f"{name} must hold {what} numbers, got {short_repr(values)}{_not_plain_hint(values)}")
            if kind is int and not float(v).is_integer():
                raise ValueError(f"{name} must hold integers, got {short_repr(values)}")
        # Whole numbers as int for float lists too: transformers 5 types mlp_ratios int and refuses a config.json
        # holding 8.0 (timm and the original code take either)
        return [int(v) if kind is int or float(v).is_integer() else v for v in values]

    return per_stage


def _image_size(name: str, value: Any) -> tuple[int, int]:
    value = _plain(value)
    if _is_int(value):
        pair = [value, value]
    elif isinstance(value, Mapping) and {"height", "width"} <= value.keys():  # transformers' processor spelling
        pair = [value["height"], value["width"]]
    elif isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping, set, frozenset)):
        try:
            pair = list(value)
        except TypeError:  # a 0-dim tensor is Iterable to Python but cannot be iterated
            pair = []
    else:
        pair = []
    pair = [_plain(v) for v in pair]
    if len(pair) != 2 or not all(_is_number(v) and float(v).is_integer() and v > 0 for v in pair):
        too_large = any(_too_large(v) and v > 0 for v in pair)
        reason = " (too large for any image)" if too_large else _not_plain_hint([value, *pair])
        raise ValueError(
            f"{name} must be an int or a (height, width) pair of positive integers, got {short_repr(value)}{reason}"
        )
    return (int(pair[0]), int(pair[1]))


def _activation(name: str, value: Any) -> str | Callable:
    if isinstance(value, str):
        if value not in ACTIVATIONS:
            # transformers' names, too many to list in one line: the closest ones, and where all are
            close = difflib.get_close_matches(value, list(ACTIVATIONS), n=3)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"{name}={short_repr(value)} is not supported{hint} (every name: pvtv2.models.activations.ACTIVATIONS)"
            )
    elif not callable(value):
        raise ValueError(f"{name} must be an activation name or a callable, got {short_repr(value)}")
    return value


def _stage_names(name: str, value: Any) -> list[str]:
    names = _list(name, value, "of stage names")
    if not all(isinstance(f, str) for f in names):
        raise ValueError(f"{name} must be a list of stage names, got {short_repr(value)}")
    return names


def _stage_indices(name: str, value: Any) -> list[int]:
    indices = [_plain(i) for i in _list(name, value, "of integers")]
    if not all(_is_int(i) for i in indices):
        raise ValueError(f"{name} must be a list of integers, got {short_repr(value)}{_not_plain_hint(indices)}")
    return indices


def _label_index(key: Any) -> int:
    key = _plain(key)
    return key if _is_int(key) else int(key.strip())


def _id2label(name: str, value: Any) -> dict[int, str]:
    try:
        # JSON keys are strings: "0" is class 0; a float key would be truncated, so it is refused
        labels = {_label_index(k): str(v) for k, v in value.items()}
    except (TypeError, ValueError, AttributeError):
        raise ValueError(f"{name} must map class indices to names, got {short_repr(value)}") from None
    if sorted(labels) != list(range(len(labels))) or len(labels) != len(value):
        raise ValueError(f"{name} keys must be 0..{len(value) - 1}, got {short_repr(sorted(value, key=str)[:10])}...")
    return labels


def _label2id(name: str, value: Any) -> dict[str, int]:
    try:
        labels = {str(k): _plain(v) for k, v in value.items()}
    except (TypeError, AttributeError):
        raise ValueError(f"{name} must map class names to indices, got {short_repr(value)}") from None
    if not all(_is_int(v) for v in labels.values()):
        raise ValueError(f"{name} must map class names to indices, got {short_repr(value)}")
    return labels


# ---------------------------------------------------------------------------------------------- the table
# How a field is written to config.json: always; only when set (not None); only when it differs from its default;
# or not at all, because another field says it (num_labels is len(id2label)).
ALWAYS, WHEN_SET, WHEN_CHANGED, DERIVED = "always", "when set", "when changed", "derived"

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def _field(default: Any, check: Check, write: str = ALWAYS) -> Any:
    return dataclasses.field(default=default, metadata={"check": check, "write": write})


@dataclasses.dataclass(frozen=True)
class PvtV2Fields:
    """The fields of :class:`PvtV2Config`: name, type, default, check and how ``config.json`` holds them.

    The constructor's signature, its validation and :meth:`PvtV2Config.to_dict` are all read from this table, in
    this order. The first twenty are transformers' ``PvtV2Config`` arguments, with its defaults (those of PVTv2-B0).
    A table, not a config: nothing checks an instance of it; build a :class:`PvtV2Config`.
    """

    # --- the encoder (transformers' PvtV2Config; the per-stage lists have one entry per stage)
    image_size: int | Sequence[int] = _field(224, _image_size)  # the training resolution; any input size works
    num_channels: int = _field(3, _positive_int)  # channels of the input image
    num_encoder_blocks: int = _field(4, _positive_int)  # number of stages
    depths: Sequence[int] = _field((2, 2, 2, 2), _per_stage(int, zero=True))  # transformer blocks per stage (0: none)
    sr_ratios: Sequence[int] = _field((8, 4, 2, 1), _per_stage(int))  # spatial-reduction ratio of the keys/values
    hidden_sizes: Sequence[int] = _field((32, 64, 160, 256), _per_stage(int))  # channels per stage
    patch_sizes: Sequence[int] = _field((7, 3, 3, 3), _per_stage(int))  # kernel of the overlapping patch embedding
    strides: Sequence[int] = _field((4, 2, 2, 2), _per_stage(int))  # stride of the patch embedding
    num_attention_heads: Sequence[int] = _field((1, 2, 5, 8), _per_stage(int))  # heads; each divides hidden_sizes
    mlp_ratios: Sequence[float] = _field((8, 8, 4, 4), _per_stage(float))  # Mix-FFN width / hidden size
    hidden_act: str | Callable = _field("gelu", _activation)  # Mix-FFN activation: a name of ACTIVATIONS or a callable
    hidden_dropout_prob: float = _field(0.0, _probability)  # dropout after the attention and Mix-FFN projections
    attention_probs_dropout_prob: float = _field(0.0, _probability)  # dropout on the attention weights
    initializer_range: float = _field(0.02, _as_float(_positive_number))  # std of the truncated-normal weight init
    drop_path_rate: float = _field(0.0, _probability)  # stochastic depth of the last block, linear from 0
    layer_norm_eps: float = _field(1e-6, _as_float(_positive_number))  # epsilon of the blocks' and stages' LayerNorms
    qkv_bias: bool = _field(True, _boolean)  # biases in the query, key and value projections
    linear_attention: bool = _field(False, _boolean)  # Linear SRA (pooling to 7x7) instead of strided-conv SRA
    out_features: Sequence[str] | None = _field(None, _optional(_stage_names))  # backbone outputs by name...
    out_indices: Sequence[int] | None = _field(None, _optional(_stage_indices))  # ...or index (None: the last stage)
    # --- the LayerNorm epsilons where the original code and timm use PyTorch's default, 1e-5 (None: layer_norm_eps)
    patch_embed_layer_norm_eps: float | None = _field(None, _optional(_as_float(_positive_number)), WHEN_SET)  # patch embeddings
    reduction_layer_norm_eps: float | None = _field(None, _optional(_as_float(_positive_number)), WHEN_SET)  # spatial reduction
    # --- the dense heads (SegFormer's and GLPN's fields, same names; None: the task's default, filled in by the model)
    decoder_hidden_size: int | None = _field(None, _optional(_positive_int), WHEN_SET)  # decode head width
    classifier_dropout_prob: float | None = _field(None, _optional(_probability), WHEN_SET)  # before SegFormer's classifier
    semantic_loss_ignore_index: int | None = _field(None, _optional(_integer), WHEN_SET)  # label the loss skips (255)
    reshape_last_stage: bool | None = _field(None, _optional(_boolean), WHEN_SET)  # False: last stage as (B, N, C)
    max_depth: float | None = _field(None, _optional(_positive_number), WHEN_SET)  # GLPN: sigmoid(x) * max_depth
    head_in_index: int | None = _field(None, _optional(_integer), WHEN_SET)  # GLPN: the decoder output the head reads
    # --- the classification head and its loss (None: two classes named LABEL_0, LABEL_1, as in transformers)
    num_labels: int | None = _field(None, _optional(_non_negative_int), DERIVED)  # number of classes: len(id2label)
    id2label: Mapping[int, str] | None = _field(None, _optional(_id2label))  # class names, keys 0..num_labels-1
    label2id: Mapping[str, int] | None = _field(None, _optional(_label2id))  # its inverse (derived when not given)
    problem_type: str | None = _field(None, _optional(_one_of(PROBLEM_TYPES)), WHEN_SET)  # which loss; None: by labels
    # --- what forward returns when its call does not say (transformers' PretrainedConfig flags)
    output_attentions: bool = _field(False, _boolean, WHEN_CHANGED)  # the attention weights of every block
    output_hidden_states: bool = _field(False, _boolean, WHEN_CHANGED)  # every stage's output
    return_dict: bool = _field(True, _boolean, WHEN_CHANGED)  # an output object rather than a tuple


FIELDS: tuple[dataclasses.Field, ...] = dataclasses.fields(PvtV2Fields)
# The constructor's: the table's fields (positional in table order, as before) and any unknown keyword.
_SIGNATURE = inspect.signature(PvtV2Fields).replace(return_annotation=None)
_SIGNATURE = _SIGNATURE.replace(
    parameters=[*_SIGNATURE.parameters.values(), inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
)
# The per-stage lists: the fields whose default is a tuple, one entry per stage.
_STAGE_LISTS = tuple(f.name for f in FIELDS if isinstance(f.default, tuple))
STAGE_LISTS = _STAGE_LISTS  # the per-stage fields, one entry per stage (read by the models)
_FIELD_NAMES = frozenset(f.name for f in FIELDS)

# Keys of a config.json that describe the file rather than the model; kept, but not part of equality. Besides our
# own, transformers' PretrainedConfig.to_dict writes a few generic ones that no PVTv2 field reads.
_METADATA_KEYS = (
    "architectures", "torch_dtype", "dtype", "transformers_version", "pvtv2_version", "_name_or_path",
    "chunk_size_feed_forward", "is_encoder_decoder",
)
# transformers' PretrainedConfig attributes that read None on a config that was not given them.
_UNSET_ATTRIBUTES = frozenset(("architectures", "dtype"))
# Keys transformers writes for information only; derived here, so ignored on input.
_IGNORED_KEYS = ("stage_names", "transformers_version", "model_type")
# Keys that transformers' PretrainedConfig itself knows (its arguments and what its to_dict writes, in 4.x and 5.x,
# generation settings of 4.x included): a hub config.json carries many that no PVTv2 field reads. Kept, unreported.
_TRANSFORMERS_KEYS = frozenset((
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "torch_dtype", "dtype", "use_bfloat16",
    "tf_legacy_loss", "pruned_heads", "tie_word_embeddings", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "architectures",
    "finetuning_task", "id2label", "label2id", "num_labels", "tokenizer_class", "prefix", "bos_token_id",
    "pad_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id", "task_specific_params", "problem_type",
    "name_or_path", "_name_or_path", "_commit_hash", "attn_implementation", "_attn_implementation",
    "_attn_implementation_internal", "_attn_implementation_autoset", "experts_implementation", "per_layer_config",
    "transformers_version", "model_type", "xla_device", "gradient_checkpointing", "quantization_config",
    "stage_names", "out_features", "out_indices", "_out_features", "_out_indices",
    # 4.x's generation settings, read from (and once written to) every config
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
))
# Settings of the task heads that they keep in the config beside the table's fields (the segmentation model's
# ``decode_head_type``, the detector's in models/detection.py); tests/models/test_config.py checks this list against
# them. Kept, unreported, and offered as spellings.
_HEAD_KEYS = frozenset((
    "decode_head_type", "detector", "min_size", "max_size", "fpn_channels", "frozen_stages", "freeze_layer_norms",
    "score_threshold", "detections_per_image", "image_mean", "image_std", "fpn_stages", "extra_levels", "nms_threshold",
    "detection_convention",
))
# The keys no field reads that are reported (a warning; an error for the command's --model X.json): not ours, not
# transformers', not a head's, not bookkeeping. A misspelt field ({"depth": ...} for depths) would otherwise build the
# default architecture without a word.
_KNOWN_KEYS = _TRANSFORMERS_KEYS | _HEAD_KEYS | frozenset(_METADATA_KEYS) | frozenset(_IGNORED_KEYS)
# What a misspelt key is compared with: the table's fields and the heads' settings.
_SPELLINGS = sorted(_FIELD_NAMES | _HEAD_KEYS)
# Keys the config being rebuilt by PvtV2Config.replace already carried (and reported when it was built).
_REPORTED: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("pvtv2_reported_keys", default=frozenset())


# The constructor arguments of timm's and the original authors' PVTv2 that our fields spell otherwise: someone who
# writes a config.json from those gets the right field suggested (difflib would offer 'num_channels' for 'num_heads').
_OTHER_NAMES = {
    "embed_dims": "hidden_sizes",
    "num_heads": "num_attention_heads",
    "mlp_ratio": "mlp_ratios",
    "in_chans": "num_channels",
    "num_classes": "num_labels",
    "img_size": "image_size",
    "num_stages": "num_encoder_blocks",
    "linear": "linear_attention",
    "drop_rate": "hidden_dropout_prob",
    "proj_drop_rate": "hidden_dropout_prob",
    "attn_drop_rate": "attention_probs_dropout_prob",
    "depth": "depths",
    "sr_ratio": "sr_ratios",
}


def unknown_fields(keys: Iterable[str]) -> str | None:
    """What is wrong with the keys of a config that no PVTv2 field, head or transformers' ``PretrainedConfig``
    knows, with the closest field for each where one is close (``"unknown field 'depth' (did you mean
    'depths'?)"``); None when every key is known."""
    unknown = [k for k in keys if k not in _FIELD_NAMES and k not in _KNOWN_KEYS]
    if not unknown:
        return None
    parts = []
    for key in unknown:
        close = [_OTHER_NAMES[key]] if key in _OTHER_NAMES else difflib.get_close_matches(str(key), _SPELLINGS, n=1)
        parts.append(short_repr(key) + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"unknown field{'s' if len(parts) > 1 else ''} {', '.join(parts)}"


def read_json_config(path: str | os.PathLike) -> Any:
    """The JSON value in the config file ``path``; a ``ValueError`` naming the file when it is no JSON text."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{os.fspath(path)!r} is not valid JSON: {err}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{os.fspath(path)!r} is not a UTF-8 text file") from None
    except RecursionError:  # objects nested thousands deep: no config, and json's own error is a traceback
        raise ValueError(f"{os.fspath(path)!r} is not a PVTv2 config: its JSON is nested too deeply") from None


def config_from_file(path: str | os.PathLike, data: Any, build: Callable[..., Any], **overrides: Any) -> Any:
    """``build(data, **overrides)``, the config of the file ``path`` holding ``data``. An error in the file's own
    values names the file (a model folder's config.json is otherwise not mentioned); an error that the overrides
    cause is raised as it is, also where the file has another error besides (blaming the file for an override's
    value sends the user looking for it there)."""
    try:
        return build(data, **overrides)
    except (ValueError, TypeError) as err:
        if overrides:
            try:
                build(data)
            except (ValueError, TypeError):
                try:  # the file is wrong too: the error is the overrides' where they give it on their own as well
                    build({}, **overrides)
                except (ValueError, TypeError) as alone:
                    if str(alone) == str(err):
                        raise err from None
            else:
                raise
        raise type(err)(f"{os.fspath(path)}: {err}") from None


# ---------------------------------------------------------------------------------------------- rules across fields
# The most classes a config names generically (LABEL_0...): far above any dataset's (ImageNet-21k: 21,841), far below
# what hangs building the names (a config.json saying 10**30).
_MAX_LABELS = 10**6


def check_problem_type(problem_type: str | None, num_labels: int) -> None:
    """Refuse single-label classification of one class: cross-entropy over one class is 0 whatever the logits, so
    a model trained on it learns nothing, without a word (transformers' config refuses the pair too). And refuse a name
    of no problem type (None is none: the loss infers it)."""
    if problem_type is not None and problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type={short_repr(problem_type)} is not one of {PROBLEM_TYPES}")
    if problem_type == "single_label_classification" and num_labels == 1:
        raise ValueError(
            "problem_type='single_label_classification' needs num_labels > 1: cross-entropy over one class is always "
            "0; use num_labels=2 for two classes, or problem_type='regression' (or 'multi_label_classification') for "
            "one output"
        )


def _resolve_labels(num_labels: int | None, id2label: dict | None, label2id: dict | None) -> tuple[dict, dict]:
    """(id2label, label2id) from the label fields as given (each already checked on its own)."""
    given = id2label is not None
    if id2label is None:
        if num_labels is not None and num_labels > _MAX_LABELS:  # a name each: 10**12 of them never finish
            raise ValueError(f"num_labels={short_repr(num_labels)} is more classes than a classifier head can have "
                             f"here (at most {_MAX_LABELS:,})")
        id2label = generic_id2label(2 if num_labels is None else num_labels)  # 2: transformers' default
    elif num_labels is not None and num_labels != len(id2label):
        raise ValueError(f"num_labels={short_repr(num_labels)} but id2label has {len(id2label)} entries")
    inverse = {name: index for index, name in id2label.items()}
    # Names may repeat (ImageNet has two "crane"s); then no label2id inverts id2label and the given one goes unchecked.
    if label2id is not None and label2id != inverse and len(inverse) == len(id2label):
        if not given:  # the generic names were made here: the file's own names are in label2id alone
            raise ValueError(
                f"label2id is given without id2label, and the class names come from id2label (index -> name); give "
                f"id2label (here {len(id2label)} generic names were made, which label2id {short_repr(label2id)} does "
                f"not invert)"
            )
        raise ValueError(f"label2id does not invert id2label (id2label has {len(id2label)} classes)")
    return id2label, inverse


# The largest per-stage value (a width, a depth, a kernel size...): far above any model that fits in memory, and
# below where PyTorch fails to build a layer with a multi-line C++ traceback (sizes beyond a 64-bit int).
_MAX_STAGE_VALUE = 2**31 - 1
# The most blocks in a stage: 25 times the deepest published stage (B5's 40). Depth costs time, not memory, so the
# bound above does not catch it: on the meta device, where loading builds a model before comparing it with the
# checkpoint, a block takes milliseconds to build, so 100,000 of them take many minutes and 2**31 - 1 of them months.
_MAX_DEPTH = 1000


# The per-stage lists of which transformers' modules read only the first num_encoder_blocks entries (depths and
# hidden_sizes are read whole: the drop-path schedule, the classifier's width).
_CUT_LISTS = ("sr_ratios", "patch_sizes", "strides", "num_attention_heads", "mlp_ratios")


def _cut_default_lists(v: dict[str, Any], explicit: set[str]) -> None:
    """With fewer stages than the four-stage defaults, a list left at its default is cut to its first entries, as
    transformers reads it (``PvtV2Config(num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[32, 64])`` builds there);
    a list given explicitly is never cut: a length that contradicts the count stays an error."""
    n = v["num_encoder_blocks"]
    for name in _CUT_LISTS:
        if name not in explicit and len(v[name]) > n:
            v[name] = v[name][:n]


def _drop_default_valued_lists(args: dict[str, Any]) -> None:
    """A stored config's lists that hold the four-stage defaults, with fewer stages, left out of ``args``: taken as
    left at their defaults, and so cut by :func:`_cut_default_lists`. transformers writes every field, so its
    two-stage ``config.json`` holds ``sr_ratios=[8, 4, 2, 1]`` beside ``num_encoder_blocks=2`` (it reads the first
    two); so does ``to_dict`` of a four-stage config, which :meth:`PvtV2Config.replace` reads back."""
    stages = args.get("num_encoder_blocks", 4)
    if isinstance(stages, bool) or not isinstance(stages, int) or not 0 < stages < 4:
        return  # four stages or more cut nothing; a bad count is the constructor's to report
    defaults = {f.name: f for f in FIELDS if f.name in _CUT_LISTS}
    for name, field in defaults.items():
        if name not in args:
            continue
        try:
            value = field.metadata["check"](name, args[name])
        except (TypeError, ValueError):
            continue  # reported by the constructor
        if value == list(field.default):
            del args[name]


def _check_stages(v: Mapping[str, Any]) -> None:
    """Every per-stage list has one entry per stage; the heads divide the channels; no value is absurdly large; no
    Mix-FFN is empty; GLPN's head reads a decoder output that exists."""
    n = v["num_encoder_blocks"]
    for name in _STAGE_LISTS:
        if len(v[name]) != n:
            raise ValueError(
                f"{name} has {len(v[name])} entries but num_encoder_blocks is {short_repr(n)}: every per-stage list "
                f"needs one entry per stage ({name}={short_repr(v[name])})"
            )
    for i, (size, heads) in enumerate(zip(v["hidden_sizes"], v["num_attention_heads"])):
        if size % heads:
            raise ValueError(
                f"num_attention_heads[{i}]={heads} does not divide hidden_sizes[{i}]={size}: each head needs "
                f"an equal share of the channels"
            )
    if any(depth > _MAX_DEPTH for depth in v["depths"]):  # first: the tighter bound, whatever the size
        raise ValueError(
            f"depths must hold numbers up to {_MAX_DEPTH} (blocks in a stage), got {short_repr(v['depths'])}"
        )
    for name in _STAGE_LISTS:
        if name != "mlp_ratios" and any(value > _MAX_STAGE_VALUE for value in v[name]):
            raise ValueError(f"{name} must hold numbers up to {_MAX_STAGE_VALUE}, got {short_repr(v[name])}")
    for name in ("num_channels", "decoder_hidden_size"):  # widths too, outside the per-stage lists
        if v[name] is not None and v[name] > _MAX_STAGE_VALUE:
            raise ValueError(f"{name} must be at most {_MAX_STAGE_VALUE}, got {short_repr(v[name])}")
    for i, (size, ratio) in enumerate(zip(v["hidden_sizes"], v["mlp_ratios"])):
        width = float(size) * ratio  # inf where the product overflows
        if width > _MAX_STAGE_VALUE:
            raise ValueError(
                f"mlp_ratios[{i}]={ratio:.6g} gives a Mix-FFN {width:.3g} channels wide for hidden size {size}; at most "
                f"{_MAX_STAGE_VALUE}"
            )
        if int(width) < 1:
            raise ValueError(f"mlp_ratios[{i}]={ratio} gives an empty Mix-FFN for hidden size {size}")
    head = v["head_in_index"]
    if head is not None and not -n <= head < n:
        raise ValueError(f"head_in_index must index one of the {n} decoder outputs, got {short_repr(head)}")


def _resolve_outputs(
    names: list[str], out_features: list[str] | None, out_indices: list[int] | None
) -> tuple[list[str], list[int]]:
    """Align the backbone's ``out_features`` and ``out_indices`` (the last stage when neither is given)."""
    if out_features is not None:
        unknown = [f for f in out_features if f not in names]
        if unknown:
            hint = " (PVTv2 has no stem: the first patch embedding belongs to stage1)" if "stem" in unknown else ""
            raise ValueError(f"out_features has unknown stage names {unknown}; choose from {names}{hint}")
        if len(set(out_features)) != len(out_features):
            raise ValueError(f"out_features has duplicates: {out_features}")
        if out_features != sorted(out_features, key=names.index):
            raise ValueError(f"out_features must follow the stage order {names}, got {out_features}")
    if out_indices is not None:
        bad = [i for i in out_indices if not -len(names) <= i < len(names)]
        if bad:
            raise ValueError(f"out_indices {bad} out of range for {len(names)} stages (valid: 0..{len(names) - 1})")
        positive = [i % len(names) for i in out_indices]
        if len(set(positive)) != len(positive) or positive != sorted(positive):
            raise ValueError(f"out_indices must be increasing without duplicates, got {out_indices}")
    if out_features is None and out_indices is None:
        return [names[-1]], [len(names) - 1]
    if out_features is None:
        return [names[i] for i in out_indices], out_indices
    if out_indices is None:
        return out_features, [names.index(f) for f in out_features]
    if [names[i] for i in out_indices] != out_features:
        raise ValueError(f"out_features {out_features} and out_indices {out_indices} name different stages")
    return out_features, out_indices


def merge_changes(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """Config arguments ``base`` updated with ``changes``, less what the changes make stale.

    - Labels: a new ``id2label`` replaces the old labels whole (``num_labels``, ``label2id``); a ``num_labels`` alone
      keeps the old names when the count stays the same (as transformers' setter does) and drops them otherwise.
    - Backbone outputs: ``out_features`` or ``out_indices`` alone drops the other, so that the new one decides.

    Every path that overrides fields of a stored config goes through here: :meth:`PvtV2Config.replace`,
    :meth:`PvtV2Config.from_dict` (and so ``from_pretrained``), :meth:`PvtV2Config.from_preset`, and the weight
    loader's configs of SegFormer / GLPN files and of checkpoints without a config.
    """
    args = dict(base)
    names = args.get("id2label")
    if "id2label" in changes:
        args.pop("num_labels", None)
        args.pop("label2id", None)
    elif "num_labels" in changes and not (isinstance(names, Mapping) and len(names) == changes["num_labels"]):
        args.pop("id2label", None)
        args.pop("label2id", None)
    if ("out_features" in changes) != ("out_indices" in changes):
        args.pop("out_features", None)
        args.pop("out_indices", None)
    args.update(changes)
    return args


def _public_spellings(data: Mapping[str, Any]) -> dict[str, Any]:
    """transformers' own config may carry ``_out_features`` / ``_out_indices``; the public spelling wins."""
    args = dict(data)
    for private in ("_out_features", "_out_indices"):
        if private in args:
            args.setdefault(private[1:], args.pop(private))
    return args


def _json_value(value: Any) -> Any:
    """A field's value as config.json holds it: sequences as lists, mapping keys as strings (JSON's only keys)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------- the config
class PvtV2Config:
    """Configuration of a PVTv2 model: the fields of :class:`PvtV2Fields` (one table: names, defaults, checks).

    The arguments mirror transformers' ``PvtV2Config`` (see the model documentation), plus the two LayerNorm
    epsilons of the original code, the dense heads' fields (``None`` means the task's default, which the
    segmentation or depth model fills in when it is built, so a saved model's ``config.json`` holds explicit
    values) and the classification labels. Every argument is checked here; a bad one raises a ``ValueError`` that names it.

    Unknown keyword arguments are kept as attributes and written back by :meth:`to_dict`.
    """

    model_type = "pvt_v2"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = _SIGNATURE.bind(*args, **kwargs)  # a TypeError for extra positional arguments, as any signature
        explicit = set(bound.arguments)
        bound.apply_defaults()
        given = dict(bound.arguments)
        extra: dict[str, Any] = given.pop("kwargs")
        values = {f.name: f.metadata["check"](f.name, given[f.name]) for f in FIELDS}
        _cut_default_lists(values, explicit)
        values["id2label"], values["label2id"] = _resolve_labels(
            values.pop("num_labels"), values["id2label"], values["label2id"]
        )
        check_problem_type(values["problem_type"], len(values["id2label"]))
        _check_stages(values)
        self._outputs = _resolve_outputs(
            _stage_names_of(values["num_encoder_blocks"]),
            values.pop("out_features"), values.pop("out_indices"),
        )
        for name, value in values.items():
            setattr(self, name, value)

        for key in _IGNORED_KEYS:
            extra.pop(key, None)
        for key in extra:
            if key in ("_extra", "_outputs") or hasattr(type(self), key):
                raise ValueError(f"{key!r} is not a config field, and cannot be one: it names PvtV2Config.{key}")
        problem = unknown_fields(k for k in extra if k not in _REPORTED.get())
        if problem:
            logger.warning("PvtV2Config: %s; kept as an attribute, but no part of the model reads it", problem)
        for key in ("dtype", "torch_dtype"):
            # transformers' configs take a torch dtype here and write its name; kept as the object, config.json could
            # not be written
            if key in extra:
                extra[key] = _dtype_name(key, extra[key])
            _check_dtype_name(key, extra.get(key))
        for key, value in extra.items():
            setattr(self, key, _plain_tree(value))
        self._extra = tuple(extra)  # written back by to_dict, with their current values

    __init__.__signature__ = _SIGNATURE.replace(  # type: ignore[attr-defined]  # help() shows the table's arguments
        parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *_SIGNATURE.parameters.values()]
    )

    # ------------------------------------------------------------------ derived values
    @property
    def stage_names(self) -> list[str]:
        return _stage_names_of(self.num_encoder_blocks)

    @property
    def out_features(self) -> list[str]:
        # A copy: appending to the config's own list renamed the outputs without changing out_indices (the backbone
        # named three stages and returned two maps); set the attribute to change them.
        return list(self._outputs[0])

    @out_features.setter
    def out_features(self, value: Sequence[str] | None) -> None:
        """Checked, and ``out_indices`` re-derived from it, as transformers' backbone configs do: a backbone built on
        the config would otherwise return the stages of the old ``out_indices`` under the new names."""
        features = _optional(_stage_names)("out_features", value)
        self._outputs = _resolve_outputs(self.stage_names, features, None)

    @property
    def out_indices(self) -> list[int]:
        return list(self._outputs[1])  # a copy, as out_features

    @out_indices.setter
    def out_indices(self, value: Sequence[int] | None) -> None:
        """Checked, and ``out_features`` re-derived from it (see ``out_features``)."""
        indices = _optional(_stage_indices)("out_indices", value)
        self._outputs = _resolve_outputs(self.stage_names, None, indices)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, value: int) -> None:
        """New generic names when the number changes; the names stay when it does not (as in transformers)."""
        value = _non_negative_int("num_labels", value)
        if value != len(self.id2label):
            self.id2label, self.label2id = _resolve_labels(value, None, None)

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

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> PvtV2Config:
        """The configuration of a published variant (``pvt_v2_b0`` ... ``pvt_v2_b5``, ``pvt_v2_b2_li``).

        Presets classify the 1000 ImageNet classes, with their names attached; any field can be overridden.
        """
        key = preset_key(name)
        if key is None:
            raise ValueError(f"unknown preset {name!r}; choose from {list_presets()}")
        args: dict[str, Any] = dict(copy.deepcopy(PRESETS[key]), id2label=imagenet_id2label())
        return cls(**merge_changes(args, overrides))

    def with_defaults(self, **defaults: Any) -> PvtV2Config:
        """A copy in which the fields that are unset (``None``) take the given values; ``self`` when none is unset."""
        missing = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return self.replace(**missing) if missing else self

    def replace(self, **changes: Any) -> PvtV2Config:
        """A copy with some fields changed (validated anew; see :func:`merge_changes` for the labels)."""
        # The unknown keys this config carries were reported when it was built: not again for each copy.
        token = _REPORTED.set(_REPORTED.get() | frozenset(self._extra_keys()))
        base = self.to_dict()
        stages = changes.get("num_encoder_blocks", self.num_encoder_blocks)
        if (stages != self.num_encoder_blocks and "out_features" not in changes and "out_indices" not in changes
                and self.out_features == self.stage_names[-1:]):
            # the backbone's default output (the last stage), written out by to_dict: the new last stage's now
            base.pop("out_features", None)
            base.pop("out_indices", None)
        try:
            return type(self).from_dict(base, **changes)
        finally:
            _REPORTED.reset(token)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """All fields, in the layout of a published ``config.json``: the fields written always, in table order,
        then those set, then those changed from their default, then the unknown keys."""
        data: dict[str, Any] = {"model_type": type(self).model_type}
        for write in (ALWAYS, WHEN_SET, WHEN_CHANGED):
            for f in FIELDS:
                value = getattr(self, f.name)
                if f.metadata["write"] != write or (write == WHEN_SET and value is None) or (
                    write == WHEN_CHANGED and value == f.default
                ):
                    continue
                if f.name == "id2label":
                    data["stage_names"] = self.stage_names  # transformers writes the derived names, before the labels
                data[f.name] = _json_value(value)
        for key in self._extra_keys():
            # a value set after construction (numpy's number, a torch dtype) as the constructor would have kept it
            data[key] = _dtype_name(key, _plain_tree(getattr(self, key)))
        return data

    def _extra_keys(self) -> list[str]:
        """The keys no field reads that this config carries: those it was given, then the public attributes set on it
        afterwards (``config.decode_head_type = "fpn"``, ``config.architectures = [...]``), which transformers' configs
        write to config.json too; one deleted since is left out."""
        given = [k for k in self._extra if k in vars(self)]
        # a class attribute shadowed (config.model_type = "bert") is no key: transformers writes the class's model_type
        later = [k for k in vars(self) if not k.startswith("_") and k not in _FIELD_NAMES and k not in self._extra
                 and not hasattr(type(self), k)]
        return given + later

    def to_diff_dict(self) -> dict[str, Any]:
        """transformers' name for the keys its ``config.json`` holds, the flags at their defaults left out: that is
        what :meth:`to_dict` gives here already."""
        return self.to_dict()

    def to_full_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` with every field of the table besides, each at its value (``None`` where unset), as
        transformers' ``to_dict`` (and ``to_json_string(use_diff=False)``) writes them all."""
        data = self.to_dict()
        for f in FIELDS:
            if f.metadata["write"] != DERIVED and f.name not in data:
                data[f.name] = _json_value(getattr(self, f.name))
        return data

    def to_json_string(self, use_diff: bool = True) -> str:
        """``config.json``'s text. ``use_diff`` (transformers' argument): True, the keys of :meth:`to_diff_dict`;
        False, every field (:meth:`to_full_dict`)."""
        if not isinstance(use_diff, (bool, np.bool_)):
            raise TypeError(f"use_diff must be True or False, got {short_repr(use_diff)}")
        data = self.to_dict() if use_diff else self.to_full_dict()
        if callable(data["hidden_act"]):
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is a callable and cannot be written to JSON; use one of "
                f"{list(ACTIVATIONS)}"
            )
        try:
            return json.dumps(data, indent=2, sort_keys=True) + "\n"
        except TypeError as err:  # a setting kept without a check (a head's, an unknown key) that JSON cannot hold
            bad = [k for k in self._extra_keys() if not _writable(data[k])]
            raise ValueError(f"{', '.join(map(repr, bad)) or 'a value'} cannot be written to JSON ({err}): give "
                             f"numbers, strings, lists or dicts") from None

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, return_unused_kwargs: bool = False, **overrides: Any
    ) -> PvtV2Config | tuple[PvtV2Config, dict[str, Any]]:
        """A config from a ``config.json``'s contents; ``overrides`` change fields (see :func:`merge_changes`).

        ``return_unused_kwargs`` (transformers' argument): returns ``(config, unused)``, ``unused`` the overrides
        that are no key a config takes (see :func:`split_unused`), which are then left out of the config."""
        if _wants_unused(return_unused_kwargs):
            keep, unused = split_unused(overrides, data if isinstance(data, Mapping) else {})
            return cls.from_dict(data, **keep), unused
        if not isinstance(data, Mapping):
            raise ValueError(f"a PVTv2 config must be a JSON object, got {type(data).__name__}")
        architecture = timm_architecture(data)
        if architecture is not None:
            raise ValueError(
                f"this is timm's config.json (architecture {short_repr(architecture)}), not a PVTv2 config: it sets "
                f"none of PVTv2's fields. Load the weights beside it with from_pretrained, which reads the "
                f"architecture off their shapes, or build a config with PvtV2Config.from_preset"
            )
        model_type = data.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"config has model_type={short_repr(model_type)}, expected {cls.model_type!r}")
        args = merge_changes(_public_spellings(data), _public_spellings(overrides))
        _drop_default_valued_lists(args)
        return cls(**args)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``config.json`` into ``folder`` (created if needed); returns its path."""
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        target = path / "config.json"
        atomic_write_text(target, self.to_json_string())
        return target

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, *, strict: bool = False, **overrides: Any) -> PvtV2Config:
        """A config from a ``config.json`` file. A key that nothing knows (see :func:`unknown_fields`) is logged and
        kept; ``strict``: refused with a ``ValueError`` instead (a config written by hand for a new model)."""
        data = read_json_config(path)
        problem = unknown_fields(data) if strict and isinstance(data, Mapping) else None
        if problem:
            raise ValueError(f"{os.fspath(path)}: {problem}")
        return config_from_file(path, data, cls.from_dict, **overrides)

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        subfolder: str | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        return_unused_kwargs: bool = False,
        **overrides: Any,
    ) -> PvtV2Config | tuple[PvtV2Config, dict[str, Any]]:
        """Read ``config.json`` from a folder, a JSON file, a hub id (its ``revision``, read through the cache in
        ``cache_dir``), or a preset name; ``subfolder``: from that folder inside the folder or hub repository. Other
        keyword arguments override fields. ``return_unused_kwargs`` (transformers' argument): returns
        ``(config, unused)``, ``unused`` the keyword arguments that are no key a config takes (see
        :func:`split_unused`), which are then left out of the config rather than kept as attributes."""
        from ..weights.hub import check_loading_arguments, check_subfolder, resolve_file

        check_loading_arguments(overrides)
        if _wants_unused(return_unused_kwargs):
            keep, unused = split_unused(overrides, {})
            config = cls.from_pretrained(source, revision=revision, cache_dir=cache_dir, subfolder=subfolder,
                                         local_files_only=local_files_only, token=token, **keep)
            for key in [k for k in unused if k in config._extra]:  # a key the file holds: the override sets it
                setattr(config, key, _plain_tree(unused.pop(key)))
            return config, unused
        text = os.fspath(source)
        subfolder = check_subfolder(text, subfolder)
        if os.path.isfile(text):
            return cls.from_json_file(text, **overrides)
        if is_preset_name(text) and subfolder is None:
            return cls.from_preset(text, **overrides)
        path = resolve_file(text, "config.json", revision=revision, cache_dir=cache_dir, subfolder=subfolder,
                            local_files_only=local_files_only, token=token)
        return cls.from_json_file(path, **overrides)

    def __getattr__(self, name: str) -> Any:
        """transformers' ``PretrainedConfig`` attributes that every config has, None until set (a config.json's
        ``architectures``, a ``dtype`` given): ``config.architectures`` read on a new config was an AttributeError."""
        if name in _UNSET_ATTRIBUTES:
            # dtype's former name where that is set: transformers 5 reads a 4.x config.json's {"torch_dtype":
            # "float16"} as dtype float16, which read None here
            return vars(self).get("torch_dtype") if name == "dtype" else None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __eq__(self, other: object) -> bool:
        """Equal when every field is; bookkeeping that travels in config.json (``architectures``...) aside."""
        if not isinstance(other, PvtV2Config):
            return False
        mine, theirs = self.to_dict(), other.to_dict()
        for key in _METADATA_KEYS:
            mine.pop(key, None)
            theirs.pop(key, None)
        return mine.keys() == theirs.keys() and all(_same_value(mine[k], theirs[k]) for k in mine)

    def __repr__(self) -> str:
        data = self.to_dict()
        for key in ("id2label", "label2id"):
            if len(data[key]) > 4:
                data[key] = f"<{len(data[key])} labels>"
        return f"PvtV2Config({json.dumps(data, sort_keys=True, default=repr)})"


def _wants_unused(flag: Any) -> bool:
    if not isinstance(flag, (bool, np.bool_)):
        raise TypeError(f"return_unused_kwargs must be True or False, got {short_repr(flag)}")
    return bool(flag)


def split_unused(overrides: Mapping[str, Any], data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """transformers' ``return_unused_kwargs``: the ``overrides`` a config takes (its fields, the keys transformers'
    configs and the task heads carry, and those the stored ``data`` holds) and the others, which transformers leaves
    out of the config and returns."""
    known = _FIELD_NAMES | _KNOWN_KEYS
    keep = {k: v for k, v in overrides.items() if k in known or k in data}
    return keep, {k: v for k, v in overrides.items() if k not in keep}


def _same_value(mine: Any, theirs: Any) -> bool:
    """``mine == theirs`` for a config's values, also where one is an array or tensor kept as an unknown key
    (``config.mask = torch.ones(3)``): ``==`` is then elementwise, and its truth a raw numpy / torch error."""
    try:
        return bool(mine == theirs)
    except (ValueError, RuntimeError, TypeError):
        try:
            return bool(np.array_equal(np.asarray(mine), np.asarray(theirs)))
        except Exception:  # noqa: BLE001  # no array either (a CUDA tensor...): equal only to itself
            return mine is theirs


def _check_dtype_name(key: str, value: Any) -> None:
    """A config's ``dtype`` (or ``torch_dtype``) names a torch dtype, or is None: transformers reads it with
    ``getattr(torch, value)`` and fails on any other (an AttributeError for ``"garbage"``), and the loader's
    ``dtype="auto"`` passed over it without a word."""
    if value is None:
        return
    import torch

    if not (isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype)):
        raise ValueError(f"{key}={short_repr(value)} is not a torch dtype: give one (torch.float16) or its name "
                         f"('float16', 'bfloat16', 'float32'), or leave it out")


def _dtype_name(key: str, value: Any) -> Any:
    """A torch dtype given as ``dtype`` (or ``torch_dtype``), to the constructor or set on the config afterwards, by
    its name, as transformers writes it."""
    if key in ("dtype", "torch_dtype") and type(value).__name__ == "dtype" and type(value).__module__ == "torch":
        return str(value).removeprefix("torch.")
    return value


def _writable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _stage_names_of(num_encoder_blocks: int) -> list[str]:
    return [f"stage{i}" for i in range(1, num_encoder_blocks + 1)]
