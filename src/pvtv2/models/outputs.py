"""Model outputs: readable by attribute (``out.logits``), by key (``out["logits"]``) and as a tuple (``out[0]``).

As in transformers, the tuple view holds only the fields that are set, in declaration order, and ``in``, ``keys``,
``items``, ``values`` and ``get`` read the set fields as a mapping. As transformers' ModelOutput (an OrderedDict),
iterating an output gives its keys: ``list(out)``, ``tuple(out)``, ``for k in out``, ``reversed(out)`` and unpacking
(``a, b = out``) see the names of the set fields, while ``out[0]`` and ``out.to_tuple()`` hold the values (unpack
those with ``loss, logits = out.to_tuple()``); ``dict(out)`` and ``**out`` map the names to the values. (Until round
28, iterating gave the values.) Unlike transformers', an output is not a ``dict`` instance. Each output class is registered with ``torch.export`` (as transformers registers its outputs), so that
``torch.export.export`` of a model that returns one works.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

__all__ = ["ModelOutput", "BaseModelOutput", "ImageClassifierOutput", "BackboneOutput", "exportable"]


def exportable(cls: type) -> type:
    """Register the output dataclass ``cls`` with torch.export's pytree: an exported model may return it."""
    torch.export.register_dataclass(cls, serialized_type_name=f"pvtv2.{cls.__name__}")
    return cls


@dataclass
class ModelOutput:
    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        # A field name, as transformers' ModelOutput (a dict) answers it; without this, ``in`` fell back to __iter__
        # and compared the name with each tensor: ``"loss" in out`` was always False.
        return key in self.keys()

    def items(self) -> list[tuple[str, Any]]:
        return [(key, getattr(self, key)) for key in self.keys()]

    def values(self) -> list[Any]:
        return list(self.to_tuple())

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default

    def __iter__(self):
        # The keys, as transformers' ModelOutput (an OrderedDict) iterates: list(out), tuple(out) and a, b = out
        # are names there, and code written against transformers unpacked tensors here.
        return iter(self.keys())

    def __reversed__(self):
        # Without it, reversed() fell back to __len__ and __getitem__ and gave the values in reverse.
        return reversed(self.keys())

    def __len__(self) -> int:
        return len(self.to_tuple())


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
