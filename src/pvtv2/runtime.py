"""Process-wide settings that speed up CPU inference. A library should not change them behind its user's back, so
they are offered as calls; the ``pvtv2`` command makes them for its own process.

:func:`tune_malloc`. By default glibc's ``malloc`` gives large blocks back to the kernel when they are freed: a block
above the mmap threshold is unmapped, and free space at the top of the heap is trimmed. A forward pass allocates and
frees activations of several MiB per layer. Each new block then arrives as fresh pages that the kernel must fault in
and zero. On a 2-core VM that was 10-15% of the time of a batch-1 forward pass (2,500 page faults per B0 image, 6,000
per B2 image). Raising both thresholds keeps the freed memory in the process for the next layer. The page faults
fall to zero, and in our measurements B0 at batch 1 ran 20-30% faster and B2 10-20% faster, with the same peak
resident memory. PyTorch's CPU launcher (``python -m torch.backends.xeon.run_cpu``) gets the same effect by preloading
jemalloc or tcmalloc; this call needs no extra library.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import sys
from types import ModuleType

import torch

__all__ = [
    "tune_malloc", "tune_from_environment", "TUNE_MALLOC_ENV", "parse_device", "MissingDependencyError", "import_optional",
]

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2).
_MAX_MMAP_THRESHOLD = 32 << 20

TUNE_MALLOC_ENV = "PVTV2_TUNE_MALLOC"


def tune_malloc(mmap_threshold: int = _MAX_MMAP_THRESHOLD, trim_threshold: int = 256 << 20) -> bool:
    """Keep freed blocks below ``mmap_threshold`` bytes in the heap, and up to ``trim_threshold`` bytes of free heap
    in the process, through glibc's ``mallopt``. Returns whether the settings took effect. Returns False, changing
    nothing, on other C libraries and systems.

    The setting is process-wide and lasts until the process ends. Memory that a pass frees stays with the process (up
    to ``trim_threshold`` beyond what it uses) instead of going back to the system.
    """
    if not 0 < mmap_threshold <= _MAX_MMAP_THRESHOLD:
        raise ValueError(f"mmap_threshold must be in (0, {_MAX_MMAP_THRESHOLD}] bytes (glibc's limit), got {mmap_threshold}")
    if trim_threshold <= 0:
        raise ValueError(f"trim_threshold must be positive, got {trim_threshold}")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl's mallopt accepts and ignores the call
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, int(min(trim_threshold, 2**31 - 1))) == 1 and ok
    logger.debug("malloc thresholds: mmap %d, trim %d bytes: %s", mmap_threshold, trim_threshold, ok)
    return ok


def tune_from_environment() -> bool:
    """What the ``pvtv2`` command does at start: :func:`tune_malloc` unless ``PVTV2_TUNE_MALLOC=0``."""
    if os.environ.get(TUNE_MALLOC_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return tune_malloc()


def parse_device(name: str | torch.device) -> torch.device:
    """``name`` as a torch device that this machine has: a ValueError naming the problem otherwise (instead of the
    driver error that a later ``.to(device)`` would raise)."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {str(name)!r}: use cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(name)!r} asked for, but torch sees no CUDA device on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(name)!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu" and device.type != "meta":
        backend = getattr(torch, device.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise ValueError(f"device {str(name)!r} is not available on this machine")
    return device


class MissingDependencyError(ImportError, ValueError):
    """An optional dependency is not installed. Also a ``ValueError``, so that the command prints it as one line."""


def import_optional(module: str, extra: str, purpose: str) -> ModuleType:
    """``module``, imported where it is needed (the library's own import never needs it), or a
    :class:`MissingDependencyError` saying what needs it and which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"{purpose} needs {module.split('.')[0]}: pip install 'pvtv2[{extra}]'") from None
