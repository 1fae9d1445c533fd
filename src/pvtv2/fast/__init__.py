"""The fast inference paths, kept apart from the reference model they must equal.

``pvtv2.models.layers.PvtV2Stage.forward`` hands over to :func:`stage_forward` at one point when :func:`applies`
says so: on the CPU to :mod:`pvtv2.fast.cpu` (oneDNN's fused operators), on CUDA devices to :mod:`pvtv2.fast.cuda`
(Triton kernels for the memory-bound passes). The contract, the switch and the explicit packing step are described in
:mod:`pvtv2.fast.cpu`:

- ``with pvtv2.fast.fast_path(False): ...`` runs the reference path in a block (this thread only);
  ``PVTV2_FAST_PATH=0`` does so for a whole program;
- ``pvtv2.fast.freeze(model)`` packs the weights for oneDNN once (what the ``pvtv2`` command does for inference);
  on a GPU it keeps the weights autocast casts and the keys' and values' concatenated, for small inputs
  (:func:`pvtv2.fast.cuda.frozen_stage_forward`); ``pvtv2.fast.unfreeze(model)`` drops them.

Training has one fast piece, :mod:`pvtv2.fast.train`: on AMD CPUs with AVX-512 the blocks' linear layers run their
forward and backward GEMMs through oneDNN (``with pvtv2.fast.train_gemm("aten"): ...`` or ``PVTV2_TRAIN_GEMM=aten``
keeps ``F.linear``); under bf16 autocast, three backward passes are computed another way (the same numbers): see
:mod:`pvtv2.fast.train`.
"""

from __future__ import annotations

import torch
from torch import nn

from . import cpu, cuda
from .cpu import (
    aten_convolves,
    FAST_PATH_ENV,
    fast_path,
    fast_path_available,
    fast_path_enabled,
    forward_ad_active,
    freeze,
    fusable,
    is_frozen,
    one_kernel_wide_bf16,
    plain_modules,
    reference_conv_input,
    transformers_layouts,
    unfreeze,
)
from .train import depthwise_conv, forward_choices, linear, module_linear, patch_conv, train_gemm

__all__ = [
    "FAST_PATH_ENV",
    "applies",
    "aten_convolves",
    "depthwise_conv",
    "fast_path",
    "fast_path_available",
    "fast_path_enabled",
    "forward_ad_active",
    "forward_choices",
    "freeze",
    "fusable",
    "is_frozen",
    "linear",
    "module_linear",
    "one_kernel_wide_bf16",
    "patch_conv",
    "plain_modules",
    "reference_conv_input",
    "stage_forward",
    "train_gemm",
    "transformers_layouts",
    "unfreeze",
]


def applies(x: torch.Tensor, stage: nn.Module | None = None) -> bool:
    """Whether a stage called on ``x`` (without attention maps) hands over to :func:`stage_forward`: see
    :func:`pvtv2.fast.cpu.applies` and :func:`pvtv2.fast.cuda.applies`."""
    if x.device.type == "cuda":
        return cuda.applies(x, stage)
    return cpu.applies(x, stage)


def stage_forward(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A ``PvtV2Stage`` in eval mode on ``x`` by the fast path of ``x``'s device: its (B, C, H', W') output."""
    if x.device.type == "cuda":
        return cuda.stage_forward(stage, x)
    return cpu.stage_forward(stage, x)
