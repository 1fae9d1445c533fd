"""The Mix-FFN activations a config may name (``hidden_act``), as transformers spells and computes them.

One table: the config validates names against it and the layers build their activation from it. Closed forms are
written as transformers writes them, so results match to the bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "get_activation"]


class _Formula(nn.Module):
    """An activation given by a closed form."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str) -> None:
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


# name -> a factory of the module
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_new": lambda: _Formula(_gelu_new, "gelu_new"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu_fast": lambda: _Formula(_gelu_fast, "gelu_fast"),
    "quick_gelu": lambda: _Formula(_quick_gelu, "quick_gelu"),
    "relu": nn.ReLU,
    "selu": nn.SELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
}


def get_activation(act: str | Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """The module for a config's ``hidden_act``: a name of :data:`ACTIVATIONS`, a module, or a plain function."""
    if callable(act) and not isinstance(act, str):
        return act if isinstance(act, nn.Module) else _Formula(act, getattr(act, "__name__", "custom"))
    if act not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {act!r}; choose from {list(ACTIVATIONS)}")
    return ACTIVATIONS[act]()
