"""Depth estimation: the standard metrics (Eigen et al. 2014, as GLPN and BTS evaluate), per image and summed.

For one image, over the pixels whose ground truth lies in (``min_depth``, ``max_depth``) (and, with ``nyu_crop``,
inside Eigen's crop of NYU Depth v2), with the prediction clamped to [``min_depth``, ``max_depth``] as BTS does:

- ``abs_rel`` = mean(|p - t| / t); ``sq_rel`` = mean((p - t)^2 / t)
- ``rmse`` = sqrt(mean((p - t)^2)); ``rmse_log`` = sqrt(mean((ln p - ln t)^2)); ``log10`` = mean(|log10 p - log10 t|)
- ``delta1`` / ``delta2`` / ``delta3`` = the share of pixels with max(p / t, t / p) < 1.25, 1.25^2, 1.25^3

A data set's metrics are the means of its images' (as GLPN's and BTS's evaluation scripts average them); images
without a valid pixel are left out and counted. Depths are in metres.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

__all__ = [
    "DEPTH_METRICS",
    "depth_metric_sums",
    "depth_metrics",
    "eigen_crop_mask",
    "finish_depth_metrics",
]

DEPTH_METRICS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3")

# Eigen's evaluation crop of NYU Depth v2, rows 45:471 and columns 41:601 of the 480x640 frame (GLPN, BTS, AdaBins).
_NYU_FRAME = (480, 640)
_NYU_CROP = (45, 471, 41, 601)


def eigen_crop_mask(height: int, width: int) -> torch.Tensor:
    """(height, width) bool mask of Eigen's NYU crop; other frame sizes get the same fractions of the frame."""
    top, bottom, left, right = _NYU_CROP
    if (height, width) != _NYU_FRAME:
        top, bottom = round(top * height / _NYU_FRAME[0]), round(bottom * height / _NYU_FRAME[0])
        left, right = round(left * width / _NYU_FRAME[1]), round(right * width / _NYU_FRAME[1])
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


def _as_tensor(name: str, value: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"{name} must hold real numbers, got a NumPy array of dtype {value.dtype}")
        # A fresh float64 copy in native byte order: torch.from_numpy refused a flipped view (np.fliplr, [:, ::-1],
        # negative strides) and a big-endian array, both ordinary depth maps.
        value = torch.from_numpy(np.array(value, dtype=np.float64, order="C"))
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or a NumPy array, got {type(value).__name__}")
    if not value.is_floating_point():
        value = value.double()
    return value.detach().double().cpu()


def _check_range(min_depth: float, max_depth: float) -> None:
    if not (0 < min_depth < max_depth and math.isfinite(max_depth)):
        raise ValueError(f"need 0 < min_depth < max_depth (finite), got min_depth={min_depth}, max_depth={max_depth}")


def depth_metrics(
    pred: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    *,
    min_depth: float = 1e-3,
    max_depth: float = 10.0,
    nyu_crop: bool = False,
) -> dict[str, float] | None:
    """The metrics of one (H, W) prediction against its ground truth, or None when no pixel is valid."""
    _check_range(min_depth, max_depth)
    pred, target = _as_tensor("pred", pred), _as_tensor("target", target)
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(
            f"pred and target must be (H, W) maps of the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if not torch.isfinite(target).all():
        raise ValueError("the ground-truth depth holds NaN or infinite values; mark missing depth with 0")
    valid = (target > min_depth) & (target < max_depth)
    if nyu_crop:
        valid &= eigen_crop_mask(*target.shape)
    if not valid.any():
        return None
    # BTS's clamping: non-finite predictions to the range's ends, everything into [min_depth, max_depth].
    p = torch.nan_to_num(pred[valid], nan=min_depth, posinf=max_depth, neginf=min_depth).clamp(min_depth, max_depth)
    t = target[valid]
    ratio = torch.maximum(p / t, t / p)
    diff = p - t
    return {
        "abs_rel": float((diff.abs() / t).mean()),
        "sq_rel": float((diff**2 / t).mean()),
        "rmse": float(torch.sqrt((diff**2).mean())),
        "rmse_log": float(torch.sqrt(((torch.log(p) - torch.log(t)) ** 2).mean())),
        "log10": float((torch.log10(p) - torch.log10(t)).abs().mean()),
        "delta1": float((ratio < 1.25).double().mean()),
        "delta2": float((ratio < 1.25**2).double().mean()),
        "delta3": float((ratio < 1.25**3).double().mean()),
    }


def depth_metric_sums(
    pred: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    *,
    min_depth: float = 1e-3,
    max_depth: float = 10.0,
    nyu_crop: bool = False,
) -> list[float]:
    """For a batch (B, H, W): each metric summed over the images that have valid pixels, then that count and the
    count of images without one. Sums add across batches and processes; :func:`finish_depth_metrics` divides."""
    pred, target = _as_tensor("pred", pred), _as_tensor("target", target)
    if pred.ndim != 3 or pred.shape != target.shape:
        raise ValueError(
            f"pred and target must be (B, H, W) of the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    sums = [0.0] * (len(DEPTH_METRICS) + 2)
    for p, t in zip(pred, target):
        metrics = depth_metrics(p, t, min_depth=min_depth, max_depth=max_depth, nyu_crop=nyu_crop)
        if metrics is None:
            sums[-1] += 1
            continue
        for i, name in enumerate(DEPTH_METRICS):
            sums[i] += metrics[name]
        sums[-2] += 1
    return sums


def finish_depth_metrics(sums: list[float] | Mapping[int, float]) -> dict[str, float]:
    """The mean of each metric over the images summed by :func:`depth_metric_sums`, with ``images`` (those
    evaluated) and ``images_without_depth`` (those left out)."""
    values = list(sums)
    if len(values) != len(DEPTH_METRICS) + 2:
        raise ValueError(f"expected {len(DEPTH_METRICS) + 2} sums, got {len(values)}")
    count = values[-2]
    result = {name: (values[i] / count if count else math.nan) for i, name in enumerate(DEPTH_METRICS)}
    result["images"] = int(count)
    result["images_without_depth"] = int(values[-1])
    return result
