"""Measuring a model's speed and memory on this machine: images per second, latency, peak memory.

The figures a user gets from ``pvtv2 benchmark`` and the comparison script ``benchmarks/bench.py`` come from here, so
both measure the same way: a few warm-up calls (oneDNN weight packing, ``torch.compile``, allocator growth), then
``repeats`` timed calls; throughput from the median call. Peak memory is the process's peak resident set size
(``ru_maxrss``), which only grows: it is the figure of a whole run, meaningful when the run is alone in a fresh
process (the comparison script starts one per configuration).
"""

from __future__ import annotations

import contextlib
import logging
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["BenchmarkResult", "build_model", "benchmark_model", "peak_rss_mb"]

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class BenchmarkResult:
    """What one measurement gives: throughput, latency per batch (median, best), and the process's peak memory."""

    model: str
    mode: str  # "inference" or "train"
    batch_size: int
    image_size: int
    dtype: str
    compiled: bool
    images_per_s: float
    latency_ms: float
    best_latency_ms: float
    peak_rss_mb: float
    threads: int
    repeats: int
    device: str = "cpu"
    peak_gpu_mb: float | None = None  # CUDA: torch.cuda.max_memory_allocated over the timed calls

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_rss_mb() -> float:
    """The process's peak resident set size so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def build_model(source: str, *, backbone: bool = False, num_labels: int | None = None) -> nn.Module:
    """A preset name or a config.json (random weights, fine for timing), or anything ``from_pretrained`` accepts."""
    from .models.modeling import PvtV2Backbone, PvtV2ForImageClassification
    from .training.engine import new_architecture
    from .training.runner import check_model_size

    cls = PvtV2Backbone if backbone else PvtV2ForImageClassification
    overrides = {} if num_labels is None else {"num_labels": num_labels}
    # A config.json as `pvtv2 train` and `info` take one (it was read as a checkpoint: "not a readable checkpoint").
    config = new_architecture(source, **overrides)
    if config is not None:
        # As `pvtv2 train`: an absurd hand-written architecture is refused on the meta device, before it is allocated.
        check_model_size(config, source)
        return cls(config).eval()
    if not backbone:
        from .export import checkpoint_task, load_task_model

        # A segmentation or depth checkpoint is timed with its head (it was timed as a classifier with a new head).
        task = checkpoint_task(source)
        if task == "detection":
            raise ValueError(f"{source!r} is a detection checkpoint: time detectors with benchmarks/bench_detection.py, "
                             f"or their encoder with --backbone")
        if task is not None:
            return load_task_model(source).eval()
    return cls.from_pretrained(source, **overrides).eval()


def _autocast(dtype: torch.dtype, device: torch.device):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_model(
    model: nn.Module,
    *,
    batch_size: int = 1,
    image_size: int = 224,
    dtype: str = "fp32",
    compile: bool = False,
    train: bool = False,
    warmup: int = 2,
    repeats: int = 5,
    name: str = "model",
    num_labels: int | None = None,
) -> BenchmarkResult:
    """Time ``model`` on random ``(batch_size, C, image_size, image_size)`` inputs, ``C`` the model's
    ``config.num_channels`` (3 for a model without one).

    Inference runs in eval mode under ``torch.inference_mode()``; ``train=True`` times a training step instead
    (forward, cross-entropy on random labels, backward, AdamW step). ``dtype="bf16"`` runs under autocast with the
    weights left in fp32, as mixed precision does. The model may be any module returning a tensor, a tuple or an
    object with ``logits`` / ``last_hidden_state`` / ``feature_maps``, so other implementations time the same way.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    counts = {"batch_size": batch_size, "image_size": image_size, "repeats": repeats, "warmup": warmup}
    for key, value in counts.items():
        # 1.5 or True reached torch.randn ("received an invalid combination of arguments") or range()
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise ValueError(f"{key} must be a whole number, got {value!r}")
    if batch_size < 1 or image_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError(
            f"batch_size, image_size and repeats must be positive and warmup >= 0, got "
            f"{batch_size}, {image_size}, {repeats}, {warmup}"
        )
    torch_dtype = _DTYPES[dtype]
    device = next(model.parameters()).device
    # The model's own channel count (a 1-channel checkpoint was refused: "pixel_values has 3 channels").
    channels = getattr(getattr(model, "config", None), "num_channels", 3)
    x = torch.randn(batch_size, channels, image_size, image_size, device=device)
    run = torch.compile(model) if compile else model

    if train:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        labels = torch.randint(0, num_labels or 1000, (batch_size,), device=device)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with _autocast(torch_dtype, device):
                logits = _first_tensor(run(x))
                if logits.ndim != 2:
                    logits = logits.flatten(1)
                loss = nn.functional.cross_entropy(logits.float(), labels % logits.shape[-1])
            loss.backward()
            optimizer.step()

    else:
        model.eval()

        def step() -> None:
            with torch.inference_mode(), _autocast(torch_dtype, device):
                _first_tensor(run(x))

    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    model.eval()
    return BenchmarkResult(
        model=name,
        mode="train" if train else "inference",
        batch_size=batch_size,
        image_size=image_size,
        dtype=dtype,
        compiled=compile,
        images_per_s=batch_size / median,
        latency_ms=median * 1e3,
        best_latency_ms=min(times) * 1e3,
        peak_rss_mb=peak_rss_mb(),
        threads=torch.get_num_threads(),
        repeats=repeats,
        device=str(device),
        peak_gpu_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    )


def _first_tensor(out: Any) -> torch.Tensor:
    """The logits (or last feature map) of whatever a model returned."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "predicted_depth", "last_hidden_state", "feature_maps"):
        value = getattr(out, attr, None)
        if value is not None:
            return value[-1] if isinstance(value, (tuple, list)) else value
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[-1] if isinstance(out[0], (tuple, list)) else out[0])
    raise TypeError(f"cannot find an output tensor in {type(out).__name__}")
