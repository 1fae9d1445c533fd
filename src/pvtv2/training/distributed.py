"""The process group, the random streams and determinism: what makes a run shard, reseed and resume exactly.

No randomness comes from global state that a restart would lose: the global generators (stochastic depth, dropout)
are reseeded from ``(seed, epoch, rank)`` at each epoch start, and saved with each checkpoint.
``torch.use_deterministic_algorithms(True)`` (warn-only for operations without a deterministic kernel), cuDNN
autotuning off and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` on GPUs make the kernels repeatable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..runtime import parse_device

__all__ = [
    "DistInfo",
    "init_distributed",
    "all_reduce",
    "broadcast",
    "on_main",
    "rng_state",
    "set_rng_state",
    "seed_everything",
    "set_deterministic",
    "autocast",
]


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str | None) -> tuple[DistInfo, torch.device]:
    """Join the process group that ``torchrun`` describes in RANK / WORLD_SIZE / LOCAL_RANK (NCCL on GPUs, gloo on
    CPUs), and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device_name is None:
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = parse_device(device_name)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if device.index is None:
            device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def all_reduce(values: Sequence[float], info: DistInfo, device: torch.device) -> list[float]:
    if not info.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast(obj: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], Any], info: DistInfo, *, share: bool = False) -> Any:
    """Call ``fn`` in rank 0 only (the run folder's reads and writes); with ``share``, every process gets its result.

    When ``fn`` fails, rank 0 raises its error and every other process a ``ValueError`` that quotes it, so that no
    process is left waiting for rank 0 in a collective (a failed checkpoint write under torchrun stops all of them).
    """
    result, error = None, None
    if info.main:
        try:
            result = fn()
        except BaseException as err:  # KeyboardInterrupt too: the others must not wait for a process that left
            error = err
    if info.enabled:
        failed = None if error is None else (str(error) or type(error).__name__)
        failed, shared = broadcast((failed, result if share else None), info)
        if error is None and failed is not None:
            raise ValueError(f"stopped because process 0 failed: {failed}")
        result = shared if share else result
    if error is not None:
        raise error
    return result


# ---------------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """This process's generators as tensors and plain numbers (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state(legacy=False)
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
        "numpy_pos": int(np_state["state"]["pos"]),
        "python": torch.tensor(py_internal, dtype=torch.int64),
        "python_version": int(py_version),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_key"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((state["python_version"], tuple(state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int, epoch: int, rank: int) -> None:
    """Reseed the global generators from (seed, epoch, rank): stochastic depth of an epoch does not depend on
    anything before it, so a resumed epoch draws what the uninterrupted one drew."""
    value = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)


def set_deterministic() -> None:
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
