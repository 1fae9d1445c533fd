"""Process-wide settings that speed up CPU inference and training. A library should not change them behind its user's
back, so they are offered as calls; the ``pvtv2`` command makes them for its own process.

:func:`tune_malloc`. By default glibc's ``malloc`` gives memory back to the kernel when it is freed: a block above
the mmap threshold (128 KiB at first, at most 32 MiB) is unmapped, and free space at the top of the heap is trimmed.
A forward pass allocates and frees activations of several MiB per layer, and a training step at batch 16 keeps
activations of 50-100 MiB each. Each new block then arrives as fresh pages that the kernel must fault in and zero:
about 3 microseconds per 4 KiB page on the 2-core VM of docs/benchmarks.md. That was 10-15% of a batch-1 forward pass
(2,500 page faults per B0 image, 6,000 per B2 image), and 700,000 faults (2.8 GB of fresh pages) per B2 training step
at batch 16. With the heap serving every block and never trimmed, the page faults fall to zero: B0 at batch 1 ran
20-30% faster and B2 10-20% faster, and the B2 training step at batch 16 7-21% faster (pvtv2 and timm alike), with
a peak resident memory within 10% of glibc's. PyTorch's CPU launcher (``python -m torch.backends.xeon.run_cpu``) gets a
similar effect by preloading jemalloc or tcmalloc; this call needs no extra library.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import operator
import os
import sys
from types import ModuleType

import torch

__all__ = [
    "tune_malloc", "tune_from_environment", "TUNE_MALLOC_ENV", "parse_device", "MissingDependencyError", "import_optional",
    "raise_interrupt_behind",
]

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# The largest mmap threshold glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2).
_MAX_MMAP_THRESHOLD = 32 << 20
# glibc's default M_MMAP_MAX (DEFAULT_MMAP_MAX in malloc.c): what large_blocks=False sets back after an earlier call.
_DEFAULT_MMAP_MAX = 65536

TUNE_MALLOC_ENV = "PVTV2_TUNE_MALLOC"


def _whole_bytes(name: str, value: object) -> int:
    """``value`` as an int (numpy's integers too). A bool or a float would pass the range checks and reach mallopt as
    another number (a trim threshold of 0.5 bytes became 0)."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name} must be a whole number of bytes, got {type(value).__name__} {value!r}")
    return operator.index(value)  # type: ignore[arg-type]


def tune_malloc(
    mmap_threshold: int = _MAX_MMAP_THRESHOLD, trim_threshold: int | None = None, *, large_blocks: bool = True
) -> bool:
    """Keep freed memory in the process for the next allocation, through glibc's ``mallopt``. Returns whether the
    settings took effect. Returns False, changing nothing, on other C libraries and systems.

    - ``large_blocks`` (default): every block comes from the heap (``M_MMAP_MAX`` 0), however large. Without it,
      blocks above ``mmap_threshold`` bytes (at most glibc's 32 MiB) are mapped fresh for each allocation and
      unmapped when freed: at batch 16 the Mix-FFN's hidden activations are such blocks. False sets glibc's
      default back (``M_MMAP_MAX`` 65536), also after an earlier call with True.
    - ``trim_threshold``: free heap beyond this many bytes at its top goes back to the system; None (default) never
      trims, so a process keeps the memory of its peak until it exits.

    Each call sets all three, so the last call decides. A bool, a float or a string for a threshold is a TypeError
    (a trim threshold of 0.5 would reach mallopt as 0). The setting is process-wide and lasts until the process ends.
    A heap that serves large blocks can fragment: the peak resident memory was measured up to 10% above glibc's
    default (B2 inference at batch 64; training runs 2-5%; docs/benchmarks.md).
    """
    mmap_threshold = _whole_bytes("mmap_threshold", mmap_threshold)
    if trim_threshold is not None:
        trim_threshold = _whole_bytes("trim_threshold", trim_threshold)
    if not isinstance(large_blocks, bool):
        raise TypeError(f"large_blocks must be True or False, got {type(large_blocks).__name__} {large_blocks!r}")
    if not 0 < mmap_threshold <= _MAX_MMAP_THRESHOLD:
        raise ValueError(f"mmap_threshold must be in (0, {_MAX_MMAP_THRESHOLD}] bytes (glibc's limit), got {mmap_threshold}")
    if trim_threshold is not None and not 0 < trim_threshold < 2**31:
        raise ValueError(f"trim_threshold must be in (0, 2 GiB) bytes (mallopt takes an int) or None, got {trim_threshold}")
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
    # Set either way, so that large_blocks=False after an earlier tune_malloc() maps large blocks again.
    ok = mallopt(_M_MMAP_MAX, 0 if large_blocks else _DEFAULT_MMAP_MAX) == 1 and ok
    # -1 turns trimming off (mallopt(3)).
    ok = mallopt(_M_TRIM_THRESHOLD, -1 if trim_threshold is None else int(trim_threshold)) == 1 and ok
    logger.debug(
        "malloc: mmap threshold %d, large blocks from the heap %s, trim threshold %s: %s",
        mmap_threshold, large_blocks, trim_threshold, ok,
    )
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


def raise_interrupt_behind(err: BaseException) -> None:
    """Raise again the Ctrl-C (KeyboardInterrupt) or SIGTERM (SystemExit) that ``err`` stands for, if any; else return.

    A compiled extension that is interrupted while it initialises (onnxruntime's and onnx's pybind11 modules) raises
    ``ImportError("initialization failed")`` from the interrupt, which callers may wrap again (torch's ONNX exporter:
    "Module onnx is not installed!"): read as a missing package or a failed export, a Ctrl-C at that moment printed
    "pip install ..." and exited with status 2, or went unnoticed where the package is optional."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (KeyboardInterrupt, SystemExit)):
            raise type(cause)(*cause.args) from None
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__


class MissingDependencyError(ImportError, ValueError):
    """An optional dependency is not installed. Also a ``ValueError``, so that the command prints it as one line."""


def import_optional(module: str, extra: str, purpose: str) -> ModuleType:
    """``module``, imported where it is needed (the library's own import never needs it), or a
    :class:`MissingDependencyError` saying what needs it and which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise_interrupt_behind(err)
        raise MissingDependencyError(f"{purpose} needs {module.split('.')[0]}: pip install 'pvtv2[{extra}]'") from None
