"""Model outputs: dicts of their set fields, readable by attribute (``out.logits``), by key (``out["logits"]``) and
as a tuple (``out[0]``), as transformers' ModelOutput.

Each output is an ``OrderedDict`` subclass and a dataclass, as transformers' (``isinstance(out, dict)`` holds). The
dict holds the fields that are set (not None), in declaration order: ``keys``, ``values``, ``items``, ``get``, ``in``,
``len``, iteration (the keys: ``list(out)``, ``a, b = out`` are names; unpack values with
``loss, logits = out.to_tuple()``), ``dict(out)`` and ``**out`` read it, and ``out[0]``, slices and ``to_tuple()``
hold its values. Setting a field by attribute (``out.loss = x``) or by key (``out["loss"] = x``) sets both views.
``pop``, ``update``, ``setdefault`` and ``del out[k]`` raise ``Exception`` as transformers' do. Being a dict is what
lets ``torch.nn.DataParallel`` gather an output (it rebuilds dicts from their ``(key, value)`` pairs, as transformers'
outputs take them) and ``torch.jit.trace(model, x, strict=False)`` trace a model that returns one (the traced module
returns a plain dict). Copies, deep copies and pickles are rebuilt from the fields through the constructor; a
pickle reloads under ``torch.load(weights_only=True)`` once the class is allowed with
``torch.serialization.safe_globals``. Each output class is registered with ``torch.export`` (transformers registers
its outputs with the same pytree), so that ``torch.export.export`` of a model that returns one works.

Where transformers' outputs let the two views drift apart, ours keep them equal, and say so rather than guess:

- A field set to None leaves the dict, by attribute or by key (transformers keeps the old value under the key when
  the attribute is set to None, and a None value under the key when the key is).
- Keys keep declaration order whatever order the fields are set in, so ``to_tuple()`` is the ``return_dict=False``
  tuple of the same fields (transformers appends a field set later: ``loss, logits = out.to_tuple()`` could swap).
- A key that is no field is a ``KeyError`` (transformers adds it to the dict, where it shifts ``to_tuple()``).
- ``popitem``, ``clear`` and ``move_to_end`` raise as ``pop`` does (transformers lets them empty or reorder the dict
  and leaves the attributes).
- Built from ``(name, value)`` pairs (a dict, a generator: what DataParallel's gather and ``copy()`` pass as the
  first field), a pair that is not one, or a name that is no field, is an error; a list or tuple of values (a
  backbone's maps), empty too, is the field's value (transformers makes an empty one None).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import torch

__all__ = ["BackboneOutput", "BaseModelOutput", "ImageClassifierOutput", "ModelOutput", "exportable"]


def exportable(cls: type) -> type:
    """Register the output dataclass ``cls`` with torch.export's pytree: an exported model may return it.

    The pytree flattens the set fields and rebuilds the output with its constructor (None fields stay None)."""
    if not is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a dataclass to be registered as an output (put @dataclass under it)")
    torch.export.register_dataclass(cls, serialized_type_name=f"pvtv2.{cls.__name__}")
    return cls


def _is_pair(item: Any) -> bool:
    return isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)


class ModelOutput(OrderedDict):
    """Base of the output dataclasses: an ``OrderedDict`` of the fields that are set, kept equal to the attributes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Reached only where @dataclass wrote no __init__: the base itself, or a subclass left undecorated (whose
        # fields would never reach the dict). transformers refuses the latter with a TypeError too.
        raise TypeError(f"{type(self).__name__} is not a dataclass: an output class needs the @dataclass decorator")

    def __post_init__(self) -> None:
        # transformers' outputs also take their fields as (name, value) pairs in the first field, the others unset:
        # DataParallel's gather rebuilds a dict as type(out)(generator of pairs), OrderedDict.copy() and ``|`` as
        # type(out)(out). Anything else, a tensor, a tuple of maps, was set field by field by __init__.
        names = [f.name for f in fields(self)]
        first = getattr(self, names[0])
        if first is None or isinstance(first, torch.Tensor):
            return
        if any(getattr(self, name) is not None for name in names[1:]):
            return
        if isinstance(first, Mapping):
            pairs = list(first.items())
        elif isinstance(first, (tuple, list)):
            if not first or not _is_pair(first[0]):
                return  # values (a backbone's maps), not pairs
            pairs = list(first)
        elif isinstance(first, Iterator):
            pairs = list(first)  # a generator can be read once: the pairs or an error, never a half-read iterator
        else:
            return
        setattr(self, names[0], None)
        for pair in pairs:
            if not _is_pair(pair):
                raise ValueError(f"{type(self).__name__} built from (name, value) pairs got {pair!r}, not a pair")
            if pair[0] not in names:
                raise TypeError(f"{type(self).__name__} has no field {pair[0]!r} (its fields: {', '.join(names)})")
            setattr(self, pair[0], pair[1])

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in self.__dataclass_fields__:
            self._set_key(name, value)

    def _set_key(self, name: str, value: Any) -> None:
        # The dict holds the set fields in declaration order; OrderedDict's own methods, since ours refuse.
        if value is None:
            if OrderedDict.__contains__(self, name):
                OrderedDict.__delitem__(self, name)
            return
        known = OrderedDict.__contains__(self, name)
        OrderedDict.__setitem__(self, name, value)
        if known:
            return  # replaced in place
        later = list(self.__dataclass_fields__)
        for after in later[later.index(name) + 1:]:
            if OrderedDict.__contains__(self, after):
                OrderedDict.move_to_end(self, after)  # a field set after its successors goes before them

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise TypeError(f"{type(self).__name__} keys are field names (str), got {type(key).__name__} {key!r}")
        if key not in self.__dataclass_fields__:
            names = ", ".join(self.__dataclass_fields__)
            raise KeyError(f"{type(self).__name__} has no field {key!r} (its fields: {names})")
        setattr(self, key, value)

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            return OrderedDict.__getitem__(self, key)
        return self.to_tuple()[key]

    def to_tuple(self) -> tuple[Any, ...]:
        """The set fields' values in declaration order (what ``return_dict=False`` returns)."""
        return tuple(self.values())

    def __reduce__(self):
        # Rebuilt from the fields by the constructor (copy, deepcopy, pickle): nothing but the class and its values.
        return type(self), tuple(getattr(self, f.name) for f in fields(self))

    def _refuse(self, method: str):
        # Exception, not a subclass: as transformers raises, so that code written against it catches the same.
        raise Exception(f"You cannot use ``{method}`` on a {type(self).__name__} instance.")  # noqa: TRY002

    def __delitem__(self, *args, **kwargs):
        self._refuse("__delitem__")

    def pop(self, *args, **kwargs):
        self._refuse("pop")

    def update(self, *args, **kwargs):
        self._refuse("update")

    def setdefault(self, *args, **kwargs):
        self._refuse("setdefault")

    def popitem(self, *args, **kwargs):
        self._refuse("popitem")

    def clear(self, *args, **kwargs):
        self._refuse("clear")

    def move_to_end(self, *args, **kwargs):
        self._refuse("move_to_end")


@exportable
@dataclass
class BaseModelOutput(ModelOutput):
    """``last_hidden_state``: (B, C, H, W) of the last stage; ``hidden_states``: each stage's (B, C_i, H_i, W_i);
    ``attentions``: per stage (as transformers groups them), a tuple of its blocks' (B, heads, N, N')
    attention probabilities."""

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@exportable
@dataclass
class ImageClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@exportable
@dataclass
class BackboneOutput(ModelOutput):
    """``feature_maps``: one (B, C, H, W) map per requested stage."""

    feature_maps: tuple[torch.Tensor, ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
