"""The run folder: its files, its lock, the checks of ``--resume`` / ``--overwrite``, and the atomic checkpoints.

Every epoch writes ``OUT/last`` (and ``OUT/best`` when the task's score improves): folders that ``from_pretrained``
loads, written to a temporary folder and renamed into place, so a run killed at any moment leaves the previous
complete checkpoint. ``OUT/last/training_state.pt`` holds what ``--resume`` needs to continue exactly where the run
stopped. ``OUT/run.json`` holds the run's settings and classes, ``OUT/metrics.jsonl`` one record per epoch.

``run.json`` records the data folder (and a ``--model`` that is a local file or folder) by its absolute path, so that
``--resume`` finds them from any working directory. A relative data path, as runs written before recorded it, is
resolved by :func:`resolve_recorded_data`.

``OUT/run.lock`` names the process (pid, host) that is using the folder, for as long as it does: a second run on
the same folder is refused, so two processes never interleave their checkpoints. A lock whose process is gone (a
run that was killed) is taken over with a warning.

Nothing here writes into the folder before :func:`start_run`: the checks of a new, resumed or overwritten run only
read, so a refused command leaves the folder as it was (the lock, taken first, is removed again, and so is the
folder when the lock created it).
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import io
import json
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.processing import PvtV2ImageProcessor
from ..fileio import WriteError, atomic_write_json, path_kind, recover_folder, write_folder_atomically
from ..models.config import is_preset_name, preset_key, short_repr
from .config import DEFAULT_IGNORE_INDEX, NO_RECIPE, TrainConfig, flag
from .curves import METRICS_FILE, read_metrics, write_metrics

__all__ = [
    "TRAINING_STATE_NAME",
    "RUN_FILE",
    "METRICS_FILE",
    "CURVES_FILE",
    "LOCK_FILE",
    "ABANDONED_LOCK_S",
    "RunLock",
    "RunFolderBusy",
    "prepare_output",
    "check_output",
    "check_output_path",
    "check_resumed_classes",
    "start_run",
    "read_run_file",
    "resolve_recorded_data",
    "load_training_state",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

TRAINING_STATE_NAME = "training_state.pt"
RUN_FILE = "run.json"
CURVES_FILE = "curves.png"
LOCK_FILE = "run.lock"
# Seconds after which an empty run.lock is taken to be abandoned: its process was killed (SIGKILL) between creating the
# file and writing its pid into it, which a live process does in the same instant.
ABANDONED_LOCK_S = 10.0
# What --overwrite removes from the output folder: only what a run writes there (not the lock: this run holds it).
# ``ema`` too (--ema): left behind, it was the replaced run's weight average under the new run's name. The files'
# temporary copies too (fileio.temporary_path), which a kill during their write leaves.
_RUN_ENTRIES = ("last", "best", "ema", ".last.tmp", ".last.old", ".best.tmp", ".best.old", ".ema.tmp", ".ema.old",
                RUN_FILE, METRICS_FILE, CURVES_FILE, f".{RUN_FILE}.tmp", f".{METRICS_FILE}.tmp", f".{CURVES_FILE}.tmp")
# The settings a run.json must hold to be resumed; the others, added to TrainConfig later, take their defaults.
_REQUIRED_RUN_FIELDS = ("data", "model", "image_size", "epochs", "batch_size")
# What every training_state.pt holds (the task adds its best score under its own key).
_STATE_KEYS = ("epoch", "best_epoch", "optimizer", "scheduler", "rng", "model_config")


# ---------------------------------------------------------------------------------------------- the lock
class RunFolderBusy(FileExistsError):
    """Another process holds the run folder's lock."""


class RunLock:
    """An exclusive claim on a run folder: ``OUT/run.lock`` holds the holder's pid, host and start time.

    Created with ``O_EXCL``, so of two processes that try at once exactly one gets it. A lock left by a process that
    no longer runs on this host (compared by pid and, where the system says it, the process's start time, so a
    recycled pid is not mistaken for the holder) is taken over with a warning; a lock from another host cannot be
    checked and is refused, naming the file to remove. :meth:`release` removes the lock, and the folder too when
    :meth:`acquire` created it and nothing was written into it since.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.held = False
        self._created: list[Path] = []  # the folders acquire() made, deepest first

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        kind = path_kind(self.folder)  # a symlink loop or a FIFO named as such, not as "a file" or EEXIST
        if kind not in ("folder", "nothing"):
            raise ValueError(f"--output {str(self.folder)!r} is a {kind}, not a folder")
        missing = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise WriteError(self.folder, err) from err
        self._created = missing
        try:
            if not self._create():
                holder = self._holder()
                if not holder.get("abandoned") and _alive(holder) is not False:
                    raise RunFolderBusy(self._busy_message(holder))
                self._take_over()
        except BaseException:
            self._remove_created()
            raise
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                if self._holder().get("pid") == os.getpid():
                    self.path.unlink(missing_ok=True)
            except (OSError, ValueError):
                pass  # a lock we cannot read or remove is reported by the next run that finds it
        self._remove_created()

    def _create(self) -> bool:
        """Write the lock file if there is none; False if there is one."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid()),
              "since": datetime.datetime.now().isoformat(timespec="seconds")}
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as err:
            raise WriteError(self.path, err) from err
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(json.dumps(me) + "\n")
        except BaseException as err:
            # SIGTERM (SystemExit) or Ctrl-C between the creation and the write too: an empty lock left behind
            # refused every later run of the folder.
            self.path.unlink(missing_ok=True)
            if isinstance(err, OSError):
                raise WriteError(self.path, err) from err
            raise
        return True

    def _holder(self) -> dict[str, Any]:
        """The lock's holder; ``{}`` when the lock is gone, ``{"abandoned": True}`` for an empty lock older than
        :data:`ABANDONED_LOCK_S` (its holder was killed between creating it and writing it: a live one writes it at
        once, so a young empty lock is one being written)."""
        try:
            text = self.path.read_text(encoding="utf-8")
            if not text and time.time() - self.path.stat().st_mtime > ABANDONED_LOCK_S:
                return {"abandoned": True}
            holder = json.loads(text)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            holder = None
        pid = holder.get("pid") if isinstance(holder, dict) else None
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise RunFolderBusy(
                f"{str(self.path)!r} is not a lock file that pvtv2 can read; if no training run is using "
                f"{str(self.folder)!r}, remove it"
            )
        return holder  # type: ignore[return-value]

    def _take_over(self) -> None:
        """Replace a lock whose holder is gone (or an abandoned empty one), as one process at a time.

        Of several processes that found the same stale lock at once, each removed the lock and made its own, and a
        later one removed the lock an earlier one had just made: two or three of them ran in the folder. The takeover
        is done holding ``run.lock.takeover`` (``O_EXCL``), judging the lock again there: of the others, one that
        finds the file refuses, and one that comes after finds the new lock's live holder."""
        claim = self.path.with_name(LOCK_FILE + ".takeover")
        try:
            os.close(os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            raise RunFolderBusy(
                f"{str(self.folder)!r} is being taken over by another run starting now (file {str(claim)!r}); if no "
                f"run is starting in the folder, remove that file"
            ) from None
        except OSError as err:
            raise WriteError(claim, err) from err
        try:
            holder = self._holder()  # again: the lock found stale may have been replaced since
            if holder.get("abandoned"):
                logger.warning("taking over %s: it is empty, left by a process killed as it created the lock",
                               self.path)
            elif _alive(holder) is not False:
                raise RunFolderBusy(self._busy_message(holder))
            elif holder:
                logger.warning(
                    "taking over %s: process %s on this host that held it is gone (a run that was killed?)",
                    self.path, holder.get("pid"),
                )
            self.path.unlink(missing_ok=True)
            if not self._create():
                raise RunFolderBusy(self._busy_message(self._holder()))
        finally:
            claim.unlink(missing_ok=True)

    def _busy_message(self, holder: dict[str, Any]) -> str:
        where = "this host" if holder.get("host") == socket.gethostname() else f"host {holder.get('host')!r}"
        since = f" since {holder['since']}" if holder.get("since") else ""
        return (
            f"{str(self.folder)!r} is in use by process {holder.get('pid')} on {where}{since} (lock file "
            f"{str(self.path)!r}); wait for that run to end, or, if no run is using the folder any more, remove the "
            f"lock file"
        )

    def _remove_created(self) -> None:
        # Only folders this lock made, and only while empty: a refused command leaves no trace.
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []


def _alive(holder: dict[str, Any]) -> bool | None:
    """Whether the lock's process still runs: None when it cannot be known (another host)."""
    if not holder:
        return False  # removed between our attempt and this look: try again
    if holder.get("host") != socket.gethostname():
        return None
    pid = holder["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    except (OverflowError, ValueError):
        return False
    started = _process_start(pid)
    return not (started and holder.get("started") and started != holder["started"])


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a recycled pid from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


# ---------------------------------------------------------------------------------------------- reading a run
def read_run_file(folder: str | os.PathLike) -> dict[str, Any]:
    """``folder/run.json``: the settings of a run, checked to be a JSON object that holds them."""
    path = Path(folder) / RUN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} is damaged ({err}); it cannot be resumed: pass --overwrite to start again") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{str(path)!r} holds a JSON {type(data).__name__}, not the settings of a training run; it cannot be "
            f"resumed: pass --overwrite to start again"
        )
    missing = [k for k in _REQUIRED_RUN_FIELDS if k not in data]
    if missing:
        raise ValueError(f"{str(path)!r} lacks the run settings {missing}; it cannot be resumed: pass --overwrite to start again")
    return data


def load_training_state(folder: str | os.PathLike) -> dict[str, Any]:
    """``folder/training_state.pt`` (tensors and plain containers only: no pickled code is run)."""
    path = Path(folder) / TRAINING_STATE_NAME
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many kinds for a damaged file; the first line says which
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"cannot read the training state {str(path)!r} ({reason}); the run cannot be resumed from it: pass "
            f"--overwrite to start again"
        ) from err
    missing = [k for k in _STATE_KEYS if k not in state] if isinstance(state, dict) else list(_STATE_KEYS)
    if missing:
        raise ValueError(f"{str(path)!r} is not a training state of pvtv2 (it lacks {missing}); pass --overwrite to start again")
    for key in ("epoch", "best_epoch"):
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{str(path)!r} is damaged: its {key} is {value!r}, not a count of epochs; the run "
                             f"cannot be resumed from it: pass --overwrite to start again")
    problem = _state_problem(state)
    if problem:
        raise ValueError(f"{str(path)!r} is damaged: {problem}; the run cannot be resumed from it: pass --overwrite "
                         f"to start again")
    return state


_RNG_KEYS = ("torch", "numpy_key", "numpy_pos", "python", "python_version")


def _state_problem(state: dict[str, Any]) -> str | None:
    """What makes a training state whose keys are all there unusable (what ``--resume`` would otherwise trip over
    with a traceback, or resume from silently): ``None`` when nothing does."""
    epoch, best_epoch, epochs = state["epoch"], state["best_epoch"], state.get("epochs")
    if best_epoch > epoch:
        return f"its best_epoch {best_epoch} comes after its epoch {epoch}"
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epoch > epochs):
        return f"its epoch {epoch} is not one of its run's epochs ({epochs!r})"
    for key in ("optimizer", "scheduler", "model_config"):
        if not isinstance(state[key], dict):
            return f"its {key} is a {type(state[key]).__name__}, not a dict"
    rng = state["rng"]
    # One generator state per process, each as distributed.rng_state writes it.
    if not isinstance(rng, list) or not rng or not all(isinstance(r, dict) and all(k in r for k in _RNG_KEYS)
                                                       for r in rng):
        return "its rng is not a list of random generator states"
    for key, value in state.items():  # the best value of its metric (best_top1, best_mean_iou, ...)
        if key.startswith("best_") and key != "best_epoch" and value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"its {key} is {value!r}, not a number"
    return None


def prepare_output(
    cfg: TrainConfig, explicit: Collection[str] | None = None, *,
    default_lr: Callable[[TrainConfig, int], float] | None = None, world_size: int = 1,
) -> tuple[TrainConfig, dict[str, Any] | None, list[str] | None]:
    """Check the output folder against --resume / --overwrite, reading only (call it holding the folder's lock).

    Returns the run's settings (on --resume: the stored run's, with this invocation's execution settings), the
    training state of the last completed epoch when resuming from one, and the classes the run was trained on
    (``None`` for a new run).

    ``default_lr(run, n)``: the peak learning rate the run's task gives it, trained by ``n`` processes, when --lr is
    not set; with it, an --lr given on --resume of a run started without one is taken when it equals that rate (the
    rate the run trained with), and the refusal of another one says the rate. ``world_size``: this invocation's
    processes (those of a run resumed before its first epoch ended, which starts again).
    """
    out = Path(cfg.output)
    recover_folder(out / "last")  # a checkpoint swap interrupted between its two renames
    recover_folder(out / "best")
    recover_folder(out / "ema")
    has_run = (out / RUN_FILE).is_file()
    state_dir = out / "last"
    has_state = (state_dir / TRAINING_STATE_NAME).is_file()
    if cfg.overwrite:
        if not has_run:
            _refuse_foreign(out)
        _refuse_removed_model(cfg.model, out)
        return cfg, None, None
    if cfg.resume:
        if not has_run:
            raise FileNotFoundError(f"nothing to resume in {str(out)!r}: it holds no {RUN_FILE} of a training run")
        stored = read_run_file(out)
        if isinstance(stored["data"], str) and stored["data"]:
            stored = {**stored, "data": resolve_recorded_data(stored["data"], out)}
        loaded: list[dict[str, Any] | None] = []  # the training state, read once, when first needed

        def read_state() -> dict[str, Any] | None:
            if not loaded:
                loaded.append(load_training_state(state_dir) if has_state else None)
            return loaded[0]

        def run_lr(run: TrainConfig) -> float | None:
            if default_lr is None:
                return None
            # The processes that trained its last epoch set its rate (the optimizer's state keeps it on resume);
            # a run with no epoch done starts again, with this invocation's.
            state = read_state()
            processes = state.get("world_size", world_size) if state is not None else world_size
            try:
                return default_lr(run, processes)
            except (ValueError, TypeError, KeyError, ZeroDivisionError):  # a damaged run.json: validate() says what
                return None

        merged = _merge_resumed(cfg, stored, explicit, run_lr)
        try:
            merged.validate()
            if stored.get("lr") is not None and merged.lr is not None and merged.min_lr > merged.lr:
                raise ValueError(f"--min-lr ({merged.min_lr:g}) must not exceed --lr ({merged.lr:g})")
        except (ValueError, TypeError) as err:
            raise ValueError(f"{str(out / RUN_FILE)!r}: {err}") from None
        state = read_state()
        if state is not None:
            _refuse_another_runs_state(state, stored, state_dir)
        if state is None and path_kind(state_dir) != "nothing":
            # Only damage leaves last/ without its state (it is written whole): say that the weights are not used.
            logger.warning("%r holds no %s: the run cannot continue from it and starts again from its first epoch",
                           str(state_dir), TRAINING_STATE_NAME)
        read_metrics(out)  # readable: the resumed run keeps its records (read here, under the lock, by rank 0)
        return merged, state, _run_classes(stored, state)
    _refuse_taken(out)
    return cfg, None, None


# The run settings that decide what model last/ holds: a training state that records others was written by another
# run (its last/ copied into this folder).
_MODEL_KIND_FIELDS = ("task", "model", "decode_head", "detector", "max_depth")


def _refuse_another_runs_state(state: dict[str, Any], stored: dict[str, Any], state_dir: Path) -> None:
    """Refuse a ``last/`` whose training state records another task, model, decode head, detector or depth range than
    ``run.json``: a checkpoint copied from another run. A segmentation run started with ``--decode-head fpn`` went on
    training the SegFormer head of the copy (a RetinaNet run an FCOS copy, a run of one architecture another's) under
    its own settings, without a word; another task's copy was refused as data whose classes differ (advising to
    restore the data) or after loading it half."""
    written = state.get("run")
    if not isinstance(written, dict):
        return  # a state written before it recorded the run's settings
    differ = [key for key in _MODEL_KIND_FIELDS
              if key in written and key in stored and not _same_setting(key, written[key], stored[key])]
    if differ:
        settings = ", ".join(f"{flag(k)} {_show(written[k])}" for k in differ)
        started = ", ".join(f"{flag(k)} {_show(stored[k])}" for k in differ)
        raise ValueError(
            f"{str(state_dir)!r} is another run's checkpoint: its {TRAINING_STATE_NAME} was written by a run of "
            f"{settings}, and the run in {str(state_dir.parent)!r} was started with {started} ({RUN_FILE}); put the "
            f"run's own last/ back, or pass --overwrite to start again"
        )


def _same_setting(key: str, written: Any, stored: Any) -> bool:
    """Whether a training state's setting (as the run was started: ``--model`` as typed) is run.json's."""
    if written == stored:
        return True
    if key == "detector":
        # A detector left out is decided when the run starts; a run.json written before that was recorded keeps None.
        return stored is None
    if key == "model":
        if _same_preset(written, stored) or _same_path(written, stored):
            return True
        if isinstance(written, str) and os.path.isabs(written) and os.path.abspath(written) == stored:
            # typed absolute but not as run.json spells it (a trailing slash, "/./"): the same path even once the
            # model it names is gone (only the run's start reads it)
            return True
        # run.json records a local path absolute; typed relative to the folder the run was started from (not
        # recorded), it cannot be compared from here.
        return isinstance(written, str) and isinstance(stored, str) and os.path.isabs(stored) and not os.path.isabs(written)
    return False


def check_output(cfg: TrainConfig, *, continue_with: str | None = None) -> None:
    """Refuse the output folder of a new run (neither ``resume`` nor ``overwrite``) as :func:`prepare_output` will,
    reading only, without the lock: for callers that write something before :func:`pvtv2.training.train` (the demos
    write their data), so that a folder the run would refuse is refused before anything is written.

    ``continue_with``: the advice for an unfinished run, for a caller whose users have no ``--resume`` to pass (the
    demos name the ``pvtv2 train`` command that continues it); None: "pass --resume to continue it"."""
    out = Path(cfg.output)
    check_output_path(out)
    if not (cfg.resume or cfg.overwrite) and out.is_dir():
        _refuse_taken(out, continue_with)
    if cfg.overwrite and not (out / RUN_FILE).is_file():
        _refuse_foreign(out)


def check_output_path(output: str | os.PathLike) -> None:
    """Refuse an output folder that cannot be made, stat only: ``output`` is a file (or a FIFO, a symlink loop...),
    or the first existing folder above it is not one (``OUT/run`` under a file ``OUT``). Otherwise the demos wrote
    their data first and were then refused, or answered with ``[Errno 20] Not a directory: 'OUT/data/...'``."""
    out = Path(output)
    for path in (out, *out.parents):
        kind = path_kind(path)
        if kind == "nothing":
            continue
        if kind == "folder":
            return
        if path == out:  # RunLock's words
            raise ValueError(f"--output {str(out)!r} is a {kind}, not a folder")
        raise ValueError(f"cannot write {str(out)!r}: {str(path)!r} is a {kind}, not a folder")


def _refuse_taken(out: Path, continue_with: str | None = None) -> None:
    """Refuse a folder that holds a run, or anything but the lock, for a new run (``continue_with``: see
    :func:`check_output`)."""
    if (out / RUN_FILE).is_file():
        state_dir = out / "last"
        try:
            stored = read_run_file(out)
            done = load_training_state(state_dir)["epoch"] if (state_dir / TRAINING_STATE_NAME).is_file() else 0
        except ValueError as err:
            raise FileExistsError(f"{str(out)!r} holds a training run whose files are damaged: {err}") from None
        if isinstance(stored["epochs"], int) and done >= stored["epochs"]:
            raise FileExistsError(
                f"{str(out)!r} holds a finished training run ({stored['epochs']} epochs); pass --overwrite to replace "
                f"it, or choose another --output"
            )
        advice = "pass --resume to continue it or --overwrite" if continue_with is None else (
            f"{continue_with}, or pass --overwrite")
        raise FileExistsError(
            f"{str(out)!r} holds an unfinished training run ({done} of {stored['epochs']} epochs done); {advice} to "
            "start again"
        )
    entries = sorted(entry.name for entry in out.iterdir() if entry.name != LOCK_FILE)
    if entries and all(name in _RUN_ENTRIES for name in entries):
        # What a run killed before its run.json was in place leaves: --overwrite replaces it (_refuse_foreign).
        raise FileExistsError(
            f"--output {str(out)!r} holds no training run (no run.json), only what a run writes ({', '.join(entries)}); "
            f"pass --overwrite to replace it, or choose an empty or new folder"
        )
    if entries:
        raise FileExistsError(
            f"--output {str(out)!r} is not empty and holds no training run; choose an empty or new folder"
        )


def _refuse_foreign(out: Path) -> None:
    """Refuse --overwrite of a folder that holds no run (no run.json) but something a run does not write: it removed
    the entries named as a run's (a user's own ``best/`` folder, whatever was in it) and left the rest. A folder of
    a run's entries alone (an --overwrite killed between its removals) is still replaced."""
    if not out.is_dir():
        return
    foreign = sorted(entry.name for entry in out.iterdir() if entry.name not in (*_RUN_ENTRIES, LOCK_FILE))
    if foreign:
        shown = ", ".join(repr(name) for name in foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise FileExistsError(
            f"--overwrite replaces a training run, and {str(out)!r} holds no training run (no {RUN_FILE}) but {shown}; "
            f"choose an empty or new folder"
        )


def _refuse_removed_model(model: str, out: Path) -> None:
    """Refuse --overwrite of the run that holds the checkpoint --model names (``--model OUT/best --output OUT``): it
    is removed before the new run's first epoch ends, so a run stopped then cannot start again from it, and one
    killed between its best/ and last/ writes started again from its own best/."""
    if not model or not os.path.exists(model):
        return
    source = Path(os.path.realpath(model))
    for name in _RUN_ENTRIES:
        entry = Path(os.path.realpath(out / name))
        if source == entry or entry in source.parents:
            raise ValueError(
                f"--model {model!r} is part of the run in {str(out)!r}, which --overwrite removes before the new run "
                f"ends; copy it out of that folder first, or choose another --output"
            )


def resolve_recorded_data(data: str, run: str | os.PathLike) -> str:
    """The data folder of the run in ``run``, from what its ``run.json`` recorded: an absolute path where it is found.

    Runs record it absolute; runs written before did not, and their relative path meant the folder the run was
    started from, which is not recorded. It is looked for, in this order, under the current folder (what the path
    always meant, and where a run is usually continued from), then under the run folder and each folder above it,
    nearest first: a run started with a relative ``--output`` (the demos' ``OUTPUT/run``) was started from one of
    them. The first that holds it wins; found above the run folder, the choice is logged. Found nowhere, it is
    returned as recorded (the data's own check then refuses it), after a warning that says where it was looked for."""
    if os.path.isabs(data):
        return data
    # A folder, not any path: a file of that name here (a download, a note) is not the run's data.
    if os.path.isdir(data):
        return os.path.abspath(data)
    folder = Path(os.path.abspath(run))
    for base in (folder, *folder.parents):
        candidate = base / data
        if candidate.is_dir():
            logger.warning("--resume: the run recorded its data as %r, relative to the folder it was started from; "
                           "using %s", data, candidate)
            return str(candidate)
    logger.warning(
        "--resume: the run in %r recorded its data as %r, relative to the folder it was started from, and neither the "
        "current folder nor %r or a folder above it holds it; continue the run from the folder it was started from",
        str(run), data, str(folder),
    )
    return data


def _recorded_path(model: str) -> str:
    """``--model`` as run.json records it: a local file or folder by its absolute path; a preset name or hub id (no
    such path here) as given."""
    return os.path.abspath(model) if model and os.path.exists(model) else model


def _same_path(given: Any, stored: Any) -> bool:
    """Whether ``given`` names what run.json recorded as ``stored``: the same path, given relative to this folder or
    through a symbolic link."""
    if not (isinstance(given, str) and given and isinstance(stored, str) and stored):
        return False
    if _recorded_path(given) == stored:
        return True
    try:
        return os.path.samefile(given, stored)
    except (OSError, ValueError):
        return False


def _data_moved(given: Any, stored: Any) -> bool:
    """Whether ``--data`` names an existing folder while the one run.json recorded is gone."""
    return (isinstance(given, str) and bool(given) and isinstance(stored, str) and os.path.isdir(given)
            and not os.path.isdir(stored))


def _same_preset(given: Any, stored: Any) -> bool:
    """Whether ``given`` and ``stored`` name the same preset, however spelled (``PVT-v2-B0``, ``pvt_v2_b0``): both
    preset names, and no file or folder of the given name here (a path always wins, as when the run started)."""
    if not (isinstance(given, str) and isinstance(stored, str)):
        return False
    return is_preset_name(given) and preset_key(stored) is not None and preset_key(given) == preset_key(stored)


def _merge_resumed(
    cfg: TrainConfig, stored: dict[str, Any], explicit: Collection[str] | None,
    run_lr: Callable[[TrainConfig], float | None] = lambda run: None,
) -> TrainConfig:
    """The stored run's settings, with this invocation's execution settings.

    A run setting given again with another value is refused, every one of them in one message: the run continues as
    it was started (its schedule was planned for its epochs, and a resumed run ends with the same weights as an
    uninterrupted one), and going on while ignoring the value asked for (it used to, with a warning lost in the log)
    trained something else than the command says. ``explicit`` names the fields the user gave; without it (a library
    call), a value that equals the default counts as not given. ``run_lr(run)``: the learning rate a run started
    without --lr trained with (None: unknown); an --lr equal to it is the run's own."""
    run_fields = cfg.run_fields()
    defaults = TrainConfig()
    if "recipe" not in stored:
        # A run stored before --recipe existed trained with the recipe's fields as stored, or off where absent: those
        # are its settings, which a --recipe deit or --mixup 0.8 given now must not change (it was silently ignored,
        # or the augmentation changed mid-run).
        stored = {**NO_RECIPE, **stored, "recipe": "none"}
    if "ignore_index" not in stored:
        # A run stored before --ignore-index existed ignored 255 (its model's loss still does): an --ignore-index 7
        # given now would have changed the data's ignore value under it.
        stored = {**stored, "ignore_index": DEFAULT_IGNORE_INDEX}
    if not stored.get("clip_grad", 1) and not run_fields["clip_grad"]:
        # --clip-grad 0 (or -0) is no clipping, as leaving it out: the same setting, not a changed one.
        run_fields = {**run_fields, "clip_grad": stored["clip_grad"]}
    merged = {k: v for k, v in stored.items() if k in run_fields}
    default_lr: float | None = None
    if stored.get("lr", 0) is None and run_fields["lr"] is not None:
        default_lr = run_lr(dataclasses.replace(cfg, **merged))
    changed, moved = [], {}
    for key, given in run_fields.items():
        if key not in stored or given == stored[key]:
            continue
        if key == "lr" and default_lr is not None and isinstance(given, (int, float)) and math.isclose(
                given, default_lr, rel_tol=1e-9):
            continue  # the rate the run trained with, typed out (to within the last digit of a float)
        if key in ("data", "model") and _same_path(given, stored[key]):
            continue  # the same folder, given relative to this one: run.json records it absolute
        if key == "data" and _data_moved(given, stored[key]):
            # The recorded folder is gone and this one exists: the data moved (another disk, another machine). Refusing
            # it would leave the run impossible to finish; the classes are still checked against the run's once read.
            moved["data"] = os.path.abspath(given)
            continue
        if key == "model" and _same_preset(given, stored[key]):
            continue  # pvt-v2-b0 is pvt_v2_b0: run.json records the name as it was typed
        was_given = key in explicit if explicit is not None else given not in (getattr(defaults, key), "")
        if was_given:
            changed.append(key)
    if changed:
        out = cfg.output
        changed = list(dict.fromkeys("amp" if k in _PRECISION else k for k in changed))  # bf16, fp16: one flag
        differences = "; ".join(_difference(k, stored, run_fields, default_lr) for k in changed)
        advice = (
            f"to train it for more epochs, fine-tune its weights in a new run (--model {str(Path(out) / 'last')!r} "
            f"--epochs N --output ANOTHER)" if "epochs" in changed else
            f"to train with other settings, start a new run (another --output, or --overwrite), or fine-tune its "
            f"weights (--model {str(Path(out) / 'last')!r})"
        )
        raise ValueError(
            f"--resume continues the run in {out!r} with the settings it was started with, and it was started with "
            f"{differences}; leave {'this flag' if len(changed) == 1 else 'these flags'} out to continue it, or, "
            f"{advice}"
        )
    if moved:
        logger.warning("--resume: the run's data %r is no longer there; using --data %s", stored["data"], moved["data"])
    return dataclasses.replace(cfg, **{**merged, **moved})


# The two fields of --amp (and --bf16): named together, as the flag the user types.
_PRECISION = ("bf16", "fp16")


def _difference(key: str, stored: dict[str, Any], given: dict[str, Any], default_lr: float | None) -> str:
    """A setting the run was started with and the one given, as a person types them: ``--epochs 2, not 8``,
    ``--multiscale off, not on``, ``float32 (no --amp), not --amp bf16`` (not ``--bf16 False, not True``);
    ``default_lr``: the rate a run without --lr trained with."""
    if key == "amp":
        run, asked = (next((f"--amp {k}" for k in _PRECISION if f.get(k)), "float32 (no --amp)") for f in (stored, given))
        return f"{run}, not {asked}"
    was, now = stored[key], given[key]
    if key == "lr" and was is None and default_lr is not None:
        return f"--lr not set (the default, {short_repr(default_lr)} for this run), not {_show(now)}"
    return f"{flag(key)} {_show(was)}, not {_show(now)}"


def _show(value: Any) -> str:
    """A setting in a message: paths and names quoted in full, numbers short."""
    if value is None:
        return "(not set)"
    if isinstance(value, bool):  # a switch: --multiscale on, not --multiscale True
        return "on" if value else "off"
    return repr(value) if isinstance(value, str) else short_repr(value)


def _run_classes(stored: dict[str, Any], state: dict[str, Any] | None) -> list[str] | None:
    """The classes a run was trained on: its weights' id2label when an epoch was completed, else run.json's. A depth
    run has no classes in its weights (its config's id2label is the generic LABEL_0, LABEL_1, which never matched the
    task's ["depth"], so no depth run could be resumed once an epoch was saved): run.json's."""
    if state is not None and stored.get("task") != "depth":
        id2label = state["model_config"].get("id2label") or {}
        return [str(id2label[k]) for k in sorted(id2label, key=int)]
    classes = stored.get("classes")
    return [str(c) for c in classes] if isinstance(classes, list) else None


def check_resumed_classes(run_classes: Sequence[str] | None, data_classes: Sequence[str], cfg: TrainConfig) -> None:
    """Refuse to resume on data whose classes are not the run's: renamed, added, removed or reordered classes would
    shift the labels under the trained head, or index past it."""
    if run_classes is None or list(run_classes) == list(data_classes):
        return
    run, data = list(run_classes), list(data_classes)
    if set(run) == set(data):
        i = next(i for i, (a, b) in enumerate(zip(run, data)) if a != b)
        change = f"the same classes in another order (class {i} was {run[i]!r}, is now {data[i]!r})"
    else:
        change = f"only in the run: {sorted(set(run) - set(data))[:10]}; only in the data: {sorted(set(data) - set(run))[:10]}"
    raise ValueError(
        f"--resume: the classes of {cfg.data!r} are not those of the run in {cfg.output!r}: the run has "
        f"{len(run)} {_some(run)}, the data {len(data)} {_some(data)}; {change}. Restore the data, or start a new run"
    )


def _some(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


# ---------------------------------------------------------------------------------------------- writing
def start_run(cfg: TrainConfig, classes: Sequence[str]) -> None:
    """The first writes of a new run, once every check has passed: --overwrite's removal of the old run, then
    ``run.json`` (the settings and the classes, which --resume compares with the data) and an empty metrics file."""
    out = Path(cfg.output)
    if cfg.overwrite:
        for name in _RUN_ENTRIES:
            path = out / name
            try:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            except OSError as err:
                raise WriteError(path, err) from err
    fields = cfg.run_fields()
    # Absolute: `pvtv2 train --resume --output OUT` (the command the demos name) then works from any folder.
    fields["data"] = os.path.abspath(cfg.data) if cfg.data else cfg.data
    fields["model"] = _recorded_path(cfg.model)
    atomic_write_json(out / RUN_FILE, {**fields, "classes": list(classes)})
    write_metrics(out, [])


def save_checkpoint(
    folder: Path, model: nn.Module, image_size: int, state: dict[str, Any] | None = None, *,
    processor: PvtV2ImageProcessor | None = None,
) -> None:
    """``from_pretrained`` weights, the preprocessing and (for ``last``) the training state, swapped in whole.

    ``processor``: the task's (:meth:`pvtv2.training.engine.Task.processor`); by default a resize to ``image_size``
    and ImageNet's normalisation, the classification task's."""
    if processor is None:
        processor = PvtV2ImageProcessor(size={"height": image_size, "width": image_size})

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if state is not None:
            # Serialised in memory, then written by Python: a full disk then raises OSError (ENOSPC), where
            # torch.save into the file reports only a RuntimeError about a position in its zip writer.
            buffer = io.BytesIO()
            torch.save(state, buffer)
            (tmp / TRAINING_STATE_NAME).write_bytes(buffer.getbuffer())

    try:
        write_folder_atomically(folder, write)
    except OSError as err:
        # Name the checkpoint, not the file inside its (removed) temporary folder that failed.
        code = err.errno or errno.EIO
        raise WriteError(folder, OSError(code, os.strerror(code))) from err
