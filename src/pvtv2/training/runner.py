"""``train``: the entry point of a training run, whatever its task.

The order is what makes a refused run leave no trace: first every check that reads nothing (the settings, and the
model's architecture against the image size where it is known without weights), then, holding the run folder's
lock, the checks that read (the folder, the stored run on --resume, the data, the model), and only then the
run's first write (:func:`pvtv2.training.rundir.start_run`).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Collection
from typing import Any

import torch
import torch.distributed as dist

from ..models.config import PvtV2Config
from ..models.modeling import PvtV2Model
from .classification import ClassificationTask
from .config import TrainConfig, describe_recipe, resolve_recipe
from .detection import DetectionTask, resolve_detector
from .distributed import DistInfo, init_distributed, on_main, set_deterministic
from .engine import (RunContext, Task, check_freeze_stages, check_image_size, clear_stop, default_peak_lr,
                     request_stop, run)
from .rundir import RunLock, check_resumed_classes, prepare_output
from .depth_task import DepthTask
from .segmentation import SegmentationTask

__all__ = ["MAX_PARAMETERS", "TASK_CLASSES", "check_config", "check_model_size", "train"]

logger = logging.getLogger(__name__)

# PVTv2-B5, the largest published variant, has 82 million parameters: ten billion is far beyond any config meant to be
# trained here, and refusing above it turns a typo (mlp_ratios [1e9, ...]) into one line instead of an allocator error.
MAX_PARAMETERS = 10**10

# ``TrainConfig.task`` -> the task that supplies its data, model, loss and metrics.
TASK_CLASSES: dict[str, type[Task]] = {
    "classification": ClassificationTask, "segmentation": SegmentationTask, "detection": DetectionTask,
    "depth": DepthTask,
}


def train(cfg: TrainConfig, *, explicit: Collection[str] | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns a summary: output paths, best and last epoch metrics.

    ``explicit`` names the fields the caller set on purpose (the command passes the flags given on its command
    line): on --resume, each of them that the stored run overrides gets a warning, even when its value is the
    default. Without it, fields equal to their defaults count as not given.
    """
    check_config(cfg)
    info, device = init_distributed(cfg.device)
    _check_fp16(cfg, device)
    # Deterministic kernels for the run only: a caller's process gets its settings back.
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    lock = RunLock(cfg.output) if info.main else None  # rank 0 holds it for all the processes
    clear_stop()
    sigterm = _exit_on_sigterm()
    sigint = _interrupt_on_sigint()
    finished = False
    try:
        set_deterministic()
        summary = _train(cfg, info, device, lock, explicit)
        finished = True
        return summary
    finally:
        # The lock first: the default action put back, a second SIGTERM (torchrun forwards the one sent to its process
        # group) ended the process before it was released.
        if lock is not None:
            lock.release()
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
        if sigint is not None:
            signal.signal(signal.SIGINT, sigint)
        clear_stop()
        try:
            torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        except Exception:
            # PyTorch imports torch._inductor for this setting; a Ctrl-C or SIGTERM that landed during that import
            # (in set_deterministic, at the run's start) left it half-imported, and the import error here hid the
            # interrupt (a traceback and exit status 1): the interrupt goes on, the import error is dropped.
            if finished:
                raise
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _raise_exit(signum: int, frame: Any) -> None:
    # Further SIGTERMs are ignored while the run cleans up (train() puts the caller's handling back at its end): one
    # raised again inside a finally block skipped the rest of it, the lock's release included.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    request_stop(lambda: SystemExit(128 + signum))  # raised again if lost (engine.honour_stop)
    raise SystemExit(128 + signum)


def _raise_interrupt(signum: int, frame: Any) -> None:
    # Python's own Ctrl-C handler, remembered so that a KeyboardInterrupt lost while a DataLoader forks is raised again.
    request_stop(KeyboardInterrupt)
    raise KeyboardInterrupt


def _interrupt_on_sigint() -> Any:
    """Raise Ctrl-C's KeyboardInterrupt as Python does, through :func:`_raise_interrupt`; returns the handler to put
    back (None: a caller's own handler, or a thread other than the main one, is left alone)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not \
            signal.default_int_handler:
        return None
    return signal.signal(signal.SIGINT, _raise_interrupt)


def _exit_on_sigterm() -> Any:
    """Make SIGTERM (kill, a scheduler's preemption, torchrun stopping its workers) end the run as Ctrl-C does, through
    every ``finally``: the lock is released and a checkpoint being written is removed or left whole. Its default
    action ended the process at once, leaving run.lock, which a run requeued on another host could not take over.
    Returns the handler to put back (None: left alone, as a caller's own handler or a thread other than the main
    one must be); the process exits with status 143, as the signal's would."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return None
    return signal.signal(signal.SIGTERM, _raise_exit)


def check_config(cfg: TrainConfig) -> None:
    """The checks of a run's settings that read neither data nor the run folder: every flag's type and range, and
    the model's architecture against the image size where it is known without weights. Callers that prepare
    something before :func:`train` (the demo writes its dataset) call it first."""
    cfg.validate()
    if not cfg.resume:  # a resumed run's settings are the stored ones, checked once read
        architecture = TASK_CLASSES[cfg.task](cfg).architecture()
        if architecture is not None:
            check_image_size(architecture, cfg.image_size, cfg.model)
            check_freeze_stages(architecture, cfg.freeze_stages, cfg.model)
            check_model_size(architecture, cfg.model)


def check_model_size(config: PvtV2Config, model: str) -> None:
    """Refuse an encoder of more than :data:`MAX_PARAMETERS` parameters, counted on the meta device (shapes only:
    no memory, no initialisation), before the real one is allocated."""
    try:
        with torch.device("meta"):
            count = sum(p.numel() for p in PvtV2Model(config).parameters())
    except (RuntimeError, OverflowError) as err:
        raise ValueError(f"the architecture of {model!r} cannot be built: {err}") from None
    if count > MAX_PARAMETERS:
        raise ValueError(
            f"the architecture of {model!r} would have {count:,} parameters ({count * 4 / 2**30:,.0f} GiB in float32), "
            f"more than {MAX_PARAMETERS:,}: check its hidden_sizes, depths and mlp_ratios"
        )


def _train(
    cfg: TrainConfig, info: DistInfo, device: torch.device, lock: RunLock | None, explicit: Collection[str] | None
) -> dict[str, Any]:
    def look() -> tuple[TrainConfig, dict[str, Any] | None, list[str] | None]:
        assert lock is not None
        lock.acquire()
        return prepare_output(cfg, explicit, default_lr=_default_lr, world_size=info.world_size)

    cfg, state, run_classes = on_main(look, info, share=True)
    # Decided once, before run.json is written: a resumed run's stored settings are already decided.
    cfg, reason = resolve_recipe(cfg, world_size=info.world_size)
    if state is not None:  # resumed: the recipe is the stored run's, whoever decided it then
        reason = "the run's own, as it was started"
    if cfg.task == "detection":
        # --detector left out: the saved detector's own kind (else retinanet), recorded as such in run.json. Said by
        # rank 0 only: every process decides it, before the others' logs are turned down to errors.
        cfg = resolve_detector(cfg, announce=info.main)
    if cfg.task == "classification" and info.main:
        logger.info("recipe %s (%s): %s", cfg.recipe, reason, describe_recipe(cfg))
    _check_fp16(cfg, device)  # a resumed run's own setting
    # Data. Every process scans (they need the file lists); only rank 0 reports the bad files.
    if not info.main:
        logging.getLogger("pvtv2").setLevel(logging.ERROR)
    task = TASK_CLASSES[cfg.task](cfg)
    task.load_data()
    _check_same_data(task, info)
    check_resumed_classes(run_classes, task.classes, cfg)
    bf16 = cfg.bf16
    if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        logger.warning("--bf16: %s does not support bfloat16; training in float32", torch.cuda.get_device_name(device))
        bf16 = False
    return run(task, cfg, state, RunContext(device, bf16, info, fp16=cfg.fp16))


def _check_same_data(task: Task, info: DistInfo) -> None:
    """Refuse processes that read different datasets (each machine reads its own copy of --data): each shuffles its
    own list and takes its share of it, so a file missing on one machine had some images trained twice and others
    never, and the validation shards scored a mixture, without a word."""
    if not info.enabled:
        return
    mine = (len(task.train_set), len(task.val_set), list(task.classes))
    every: list[Any] = [None] * info.world_size
    dist.all_gather_object(every, mine)
    if all(other == every[0] for other in every):
        return
    described = ", ".join(
        f"process {rank} has {train} training images, {val} validation images and {len(classes)} classes"
        + ("" if classes == every[0][2] else " (named otherwise than process 0's)")
        for rank, (train, val, classes) in enumerate(every)
    )
    raise ValueError(f"the processes read different datasets: {described}; every machine needs the same dataset "
                     f"at --data")


def _default_lr(cfg: TrainConfig, world_size: int) -> float:
    """The peak learning rate of a run without --lr (Schedule.plan's), trained by ``world_size`` processes."""
    return default_peak_lr(cfg, TASK_CLASSES[cfg.task](cfg), world_size)


def _check_fp16(cfg: TrainConfig, device: torch.device) -> None:
    if cfg.fp16 and device.type != "cuda":
        raise ValueError(
            f"--amp fp16 needs a CUDA GPU (float16 autocast with a gradient scaler), not {device}; on a CPU train in "
            "float32 (the default) or with --amp bf16"
        )
