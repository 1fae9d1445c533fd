"""The Mix-FFN activations a config may name (``hidden_act``), as transformers spells and computes them.

One table: the config validates names against it and the layers build their activation from it. Closed forms are
written as transformers writes them, so results match to the bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
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


def _gelu_python(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _gelu_python_tanh(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_10(x: torch.Tensor) -> torch.Tensor:
    return torch.clip(F.gelu(x), -10, 10)


def _gelu_accurate(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _laplace(x: torch.Tensor, mu: float = 0.707107, sigma: float = 0.282095) -> torch.Tensor:
    x = (x - mu).div(sigma * math.sqrt(2.0))
    return 0.5 * (1.0 + torch.erf(x))


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


def _sqrtsoftplus(x: torch.Tensor) -> torch.Tensor:
    return F.softplus(x).sqrt()


def _formula(fn: Callable[[torch.Tensor], torch.Tensor], name: str) -> Callable[[], nn.Module]:
    return lambda: _Formula(fn, name)


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
    # the rest of transformers' table, but for its activations with weights (prelu, xielu: keys no layout has)
    "gelu_python": _formula(_gelu_python, "gelu_python"),
    "gelu_python_tanh": _formula(_gelu_python_tanh, "gelu_python_tanh"),
    "gelu_10": _formula(_gelu_10, "gelu_10"),
    "gelu_accurate": _formula(_gelu_accurate, "gelu_accurate"),
    "hardswish": _formula(F.hardswish, "hardswish"),
    "laplace": _formula(_laplace, "laplace"),
    "leaky_relu": _formula(F.leaky_relu, "leaky_relu"),
    "linear": nn.Identity,
    "mish": _formula(F.mish, "mish"),
    "relu2": _formula(_relu2, "relu2"),
    "relu6": _formula(F.relu6, "relu6"),
    "sigmoid": _formula(torch.sigmoid, "sigmoid"),
    "sqrtsoftplus": _formula(_sqrtsoftplus, "sqrtsoftplus"),
    "tanh": _formula(torch.tanh, "tanh"),
}


def get_activation(act: str | Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """The module for a config's ``hidden_act``: a name of :data:`ACTIVATIONS`, a module, or a plain function."""
    if callable(act) and not isinstance(act, str):
        return act if isinstance(act, nn.Module) else _Formula(act, getattr(act, "__name__", "custom"))
    if act not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {act!r}; choose from {list(ACTIVATIONS)}")
    return ACTIVATIONS[act]()
