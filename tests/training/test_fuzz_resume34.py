"""`pvtv2 train` stopped from outside at seeded moments, then `--resume`d: the run ends as an uninterrupted one.

The kills come from outside the process, as a user's `kill -9` or a scheduler's would: the run folder is polled and
the signal sent when a temporary file appears (a checkpoint, metrics.jsonl or curves.png being written), after a
seeded delay, or at a seeded batch (``PVTV2_TEST_KILL_AT_STEP``), several times in a row. Each resumed run is compared
with one uninterrupted run of the same seed (one thread, OMP_NUM_THREADS=1): every tensor of ``last/``, ``best/``
and ``ema/``, the optimizer's moments and step counts, the scheduler, the EMA's state, the epoch and best-epoch
counters and best score, ``metrics.jsonl`` without its timings (no epoch missing or twice), ``curves.png`` byte for
byte, ``run.json``; and nothing left behind (no temporary or ``.old`` copy, no lock). The slow cases are seeds of a
search over the four tasks with the same draws, all 44 of whose cases ended as the uninterrupted run (SIGKILL after
a delay or while a file was written, SIGTERM, up to three in a row; its SIGINTs went to processes started in the
background, which inherit SIGINT ignored: the runs here get Ctrl-C's handling back, see _WITH_CTRL_C).

Compared exactly but for one field: a resumed run's ``training_state.pt`` holds its model's config with the
``architectures`` and ``dtype`` that ``last/config.json`` holds in both runs (the resumed model was read from it).

Faults found: a kill between the lock's creation and the write of its pid left an empty ``run.lock`` that refused
every later run of the folder ("not a lock file that pvtv2 can read"): an empty lock older than ``ABANDONED_LOCK_S``
is taken over. A SIGTERM or Ctrl-C that landed while a DataLoader forked its workers (``--workers``) was printed by
CPython as "Exception ignored" and lost: the run trained to its end with status 0, deaf to any later SIGTERM; it
stops at the next batch now.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pvtv2.data.digits import write_digits_folder
from pvtv2.training import rundir
from pvtv2.training.engine import KILL_ENV
from pvtv2.training.rundir import ABANDONED_LOCK_S, LOCK_FILE, RunFolderBusy, RunLock

from training_fixtures import ENV, SIZE, dense_task_data

pytest_plugins = ["training_fixtures"]

# What a run writes beside its files while writing them (fileio.temporary_path, write_folder_atomically's swap).
WRITING = (".last.tmp", ".best.tmp", ".ema.tmp", ".metrics.jsonl.tmp", ".curves.png.tmp")


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory) -> Path:
    """60 digits at 16 px: 40 to train (5 batches of 8), 20 to validate."""
    root = tmp_path_factory.mktemp("digits34")
    write_digits_folder(root, size=SIZE, limit_per_class=6, val_fraction=0.25, seed=2)
    return root


def _classification_args(data: Path, model: str, out: Path) -> list[str]:
    return ["--data", str(data), "--model", model, "--output", str(out), "--epochs", "2", "--image-size", str(SIZE),
            "--batch-size", "8", "--grad-accum", "2", "--lr", "3e-3", "--warmup-epochs", "1", "--drop-path", "0.1",
            "--crop-scale", "0.7", "--ema", "0.9", "--clip-grad", "0.5", "--seed", "34", "--no-progress"]


# `python -m pvtv2` with Ctrl-C's handling of a terminal: a process started in the background by a shell (a test
# run among them) inherits SIGINT ignored, and Python then leaves it ignored.
_WITH_CTRL_C = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "sys.argv[0] = 'pvtv2'; runpy.run_module('pvtv2', run_name='__main__', alter_sys=True)")


def _launch(args: list[str], env: dict[str, str] | None = None, processes: int = 1) -> subprocess.Popen:
    launcher = [sys.executable, "-c", _WITH_CTRL_C] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m", "pvtv2"]
    return subprocess.Popen([*launcher, "train", *args], env={**ENV, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def _stop_when_written(proc: subprocess.Popen, out: Path, name: str, nth: int, sig: int) -> bool:
    """Send ``sig`` once ``out/name`` has appeared ``nth`` times (polled); False if the run ended first. A first
    appearance missed by the polling (a busy machine) is caught by what it was written for (``.last.tmp``: ``last``)
    appearing, where that was not there before: still a moment of the epoch's writes."""
    seen, present = 0, False
    written = out / name.removeprefix(".").removesuffix(".tmp")
    fallback = nth == 1 and not written.exists()
    while proc.poll() is None:
        now = (out / name).exists() or (fallback and written.exists())
        if now and not present:
            seen += 1
            if seen == nth:
                for pid in [*_descendants(proc.pid), proc.pid]:  # torchrun's workers too, as a scheduler kills
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                return True
        present = now
        time.sleep(0.0005)
    return False


def _descendants(pid: int) -> list[int]:
    """The processes under ``pid`` (Linux): torchrun starts each worker in a session of its own, so a signal to the
    launcher's process group leaves them running."""
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return [d for c in children for d in (*_descendants(c), c)]


def _stop_after(proc: subprocess.Popen, seconds: float, sig: int) -> bool:
    began = time.perf_counter()
    while proc.poll() is None and time.perf_counter() - began < seconds:
        time.sleep(0.002)
    if proc.poll() is not None:
        return False
    proc.send_signal(sig)
    return True


def _digest(tensors) -> str:
    return hashlib.sha256(b"".join(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors)).hexdigest()


def _flat(obj):
    """Every leaf of a nested state, tensors by their bytes: for comparing states exactly."""
    if isinstance(obj, dict):
        return [(k, x) for k in sorted(obj, key=str) for x in _flat(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in _flat(v)]
    if torch.is_tensor(obj):
        return [(str(obj.dtype), tuple(obj.shape), _digest([obj]))]
    return [repr(obj)]


def _fingerprint(out: Path) -> dict:
    """What a finished run leaves that no interruption may change (timings aside), and what must not be left."""
    found: dict = {}
    for folder in ("last", "best", "ema"):
        if (out / folder / "model.safetensors").is_file():
            tensors = load_file(str(out / folder / "model.safetensors"))
            found[folder] = (_digest(tensors[k] for k in sorted(tensors)),
                             sorted(p.name for p in (out / folder).iterdir()))
    state = torch.load(out / "last" / "training_state.pt", weights_only=True)
    # A resumed run's model was read from last/config.json, which save_pretrained writes with "architectures" and
    # "dtype": its config carries them, a new model's does not (last/config.json is the same file in both).
    state["model_config"] = {k: v for k, v in state["model_config"].items() if k not in ("architectures", "dtype")}
    found["state"] = {key: _flat(value) for key, value in state.items()}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    found["records"] = [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in records]
    found["curves"] = hashlib.sha256((out / "curves.png").read_bytes()).hexdigest()
    found["run"] = {k: v for k, v in json.loads((out / "run.json").read_text()).items() if k != "output"}
    found["left"] = sorted(p.name for p in out.iterdir() if p.name.endswith((".tmp", ".old")) or p.name == LOCK_FILE)
    return found


def _same_run(expected: Path, got: Path) -> None:
    a, b = _fingerprint(expected), _fingerprint(got)
    assert a["left"] == [] and len(a["records"]) == a["run"]["epochs"], a["records"]
    assert [r["epoch"] for r in b["records"]] == list(range(1, b["run"]["epochs"] + 1))  # none missing or twice
    differ = sorted(k for k in a if a[k] != b[k] and k != "state")
    differ += sorted(f"state[{k!r}]" for k in a["state"] if a["state"][k] != b["state"].get(k))
    assert not differ and a["state"].keys() == b["state"].keys(), differ


@pytest.fixture(scope="module")
def reference(small_digits, tiny_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference34") / "run"
    code, err = _finish(_launch(_classification_args(small_digits, tiny_config, out)))
    assert code == 0, err[-3000:]
    return out


# ---------------------------------------------------------------------------------------------- classification
@pytest.mark.parametrize("seed", [3])
def test_kill_9_while_a_file_is_written_then_again_mid_epoch_resumes_to_the_same_bits(
        small_digits, tiny_config, reference, tmp_path, seed):
    """SIGKILL the moment a seeded file of the run is being written (polled), then SIGKILL the resumed run at a
    seeded batch of its second epoch, then resume: the uninterrupted run's bits, records and curves."""
    rng = random.Random(seed)
    out = tmp_path / "run"
    name, nth = rng.choice(WRITING[:3]), 1
    proc = _launch(_classification_args(small_digits, tiny_config, out))
    assert _stop_when_written(proc, out, name, nth, signal.SIGKILL), f"the run ended before {name} appeared"
    code, _ = _finish(proc)
    assert code == -signal.SIGKILL
    assert (out / LOCK_FILE).exists()  # the killed run's lock, taken over below
    # What the kill left is a whole epoch-1 checkpoint or none, never a part of one.
    if (out / "last").exists():
        assert torch.load(out / "last" / "training_state.pt", weights_only=True)["epoch"] == 1
    step = rng.randint(6, 10)  # 5 batches per epoch: a batch of epoch 2, counted over the run
    code, err = _finish(_launch(["--output", str(out), "--resume", "--no-progress"], {KILL_ENV: str(step)}))
    assert code == -signal.SIGKILL, err[-3000:]
    code, err = _finish(_launch(["--output", str(out), "--resume", "--no-progress"]))
    assert code == 0, err[-3000:]
    assert "taking over" in err  # the lock of the process killed last
    _same_run(reference, out)


def test_sigterm_while_the_best_checkpoint_is_written_stops_cleanly_and_resumes(small_digits, tiny_config, reference,
                                                                                 tmp_path):
    """SIGTERM (a scheduler's preemption) while best/ of epoch 1 is being written: status 143, the temporary
    folder removed, the lock released; the resumed run ends as the uninterrupted one."""
    out = tmp_path / "run"
    proc = _launch(_classification_args(small_digits, tiny_config, out))
    assert _stop_when_written(proc, out, ".best.tmp", 1, signal.SIGTERM)
    code, err = _finish(proc)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    left = sorted(p.name for p in out.iterdir())
    assert LOCK_FILE not in left and not [n for n in left if n.endswith((".tmp", ".old"))], left
    code, err = _finish(_launch(["--output", str(out), "--resume", "--no-progress"]))
    assert code == 0, err[-3000:]
    assert "taking over" not in err
    _same_run(reference, out)


# A run whose first fork (a DataLoader starting its worker) sends the process a signal from inside an
# os.register_at_fork callback: the handler runs there, as it does for a signal that arrives while a loader forks.
_SIGNAL_AT_FORK = '''
import os, signal, sys

sent = []


def at_fork():
    if not sent:
        sent.append(True)
        os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL34"]))


# Ctrl-C's handling of a terminal: a process started in the background by a shell inherits SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
os.register_at_fork(after_in_parent=at_fork)
from pvtv2.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
'''


@pytest.mark.parametrize("name, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_stop_signal_that_lands_while_a_loader_forks_still_stops_the_run(small_digits, tiny_config, reference,
                                                                            tmp_path, name, status):
    """CPython ignores (prints) an exception raised in an at-fork callback, so SIGTERM's SystemExit or Ctrl-C's
    KeyboardInterrupt raised while a DataLoader forked its workers (--workers, the default on GPUs) was lost: the run
    trained to its last epoch with status 0, and every later SIGTERM was ignored. It stops at the next batch, its
    lock released, and resumes to the uninterrupted run's bits (the number of workers changes nothing)."""
    script = tmp_path / "signal_at_fork.py"
    script.write_text(_SIGNAL_AT_FORK)
    out = tmp_path / "run"
    stopped = subprocess.run([sys.executable, str(script), *_classification_args(small_digits, tiny_config, out),
                              "--workers", "1"], env={**ENV, "SIGNAL34": name}, capture_output=True, text=True,
                             timeout=600, check=False)
    assert stopped.returncode == status, stopped.stderr[-3000:]
    assert "Exception ignored" in stopped.stderr  # the handler did run inside the callback
    assert not (out / "last").exists() and sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "run.json"]
    if name == "SIGTERM":
        code, err = _finish(_launch(["--output", str(out), "--resume", "--no-progress"]))
        assert code == 0, err[-3000:]
        _same_run(reference, out)


# ---------------------------------------------------------------------------------------------- the lock
def test_an_empty_lock_left_by_a_kill_is_taken_over_once_it_is_old(tmp_path, caplog):
    """SIGKILL between creating run.lock (O_EXCL) and writing its pid leaves it empty: every later run was refused,
    the folder named as held by "not a lock file that pvtv2 can read". An old empty lock is taken over."""
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_bytes(b"")
    young = RunLock(out)
    with pytest.raises(RunFolderBusy, match="not a lock file that pvtv2 can read"):  # perhaps being written now
        young.acquire()
    old = time.time() - ABANDONED_LOCK_S - 5
    os.utime(out / LOCK_FILE, (old, old))
    with caplog.at_level(logging.WARNING, logger="pvtv2.training.rundir"):
        with RunLock(out):
            assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "it is empty, left by a process killed" in caplog.text
    assert not (out / LOCK_FILE).exists()
    # A lock that is not empty and not JSON is still refused as before: nothing says its writer is gone.
    (out / LOCK_FILE).write_text("garbage")
    os.utime(out / LOCK_FILE, (old, old))
    with pytest.raises(RunFolderBusy, match="not a lock file that pvtv2 can read"):
        RunLock(out).acquire()


def test_an_interrupt_between_creating_the_lock_and_writing_it_leaves_no_lock(tmp_path, monkeypatch):
    """SIGTERM (SystemExit) or Ctrl-C right after the lock file was created: the file is removed, not left empty."""
    out = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise SystemExit(128 + signal.SIGTERM)

    monkeypatch.setattr(rundir.os, "fdopen", interrupted)
    with pytest.raises(SystemExit):
        RunLock(out).acquire()
    monkeypatch.undo()
    assert not (out / LOCK_FILE).exists() and not out.exists()  # nothing left: not the lock, not the folder it made


# ---------------------------------------------------------------------------------------------- every task (slow)
def _task_data(root: Path, task: str) -> Path:
    if task == "classification":
        write_digits_folder(root, size=SIZE, limit_per_class=6, val_fraction=0.25, seed=2)
        return root
    return dense_task_data(root, task)


def _task_args(task: str, data: Path, out: Path, model: str, rng: random.Random) -> list[str]:
    if task == "classification":
        args = ["--data", str(data), "--model", model, "--image-size", str(SIZE), "--batch-size", "8", "--lr", "3e-3",
                "--warmup-epochs", "1", "--drop-path", "0.1", *(["--recipe", "deit"] if rng.random() < 0.5 else [])]
    else:
        args = ["--task", task, "--data", str(data), "--model", "tiny", "--image-size",
                "64" if task == "detection" else "32", "--batch-size", str(rng.choice([2, 3])), "--lr", "1e-3",
                "--warmup-steps", str(rng.choice([0, 1, 2])), "--hflip", "0.5"]
    args += ["--output", str(out), "--epochs", str(rng.choice([2, 3])), "--grad-accum", str(rng.choice([1, 2])),
             "--seed", str(rng.randint(0, 1000)), "--no-progress"]
    if rng.random() < 0.5:
        args += ["--ema", "0.9"]
    if rng.random() < 0.5:
        args += ["--clip-grad", "0.5"]
    if task != "detection" and rng.random() < 0.3:
        args += ["--bf16"]
    return args


@pytest.mark.slow
@pytest.mark.parametrize("task, seed", [("classification", 104), ("segmentation", 102), ("depth", 109),
                                        ("detection", 103)])
def test_every_task_stopped_several_times_from_outside_resumes_to_the_same_bits(tiny_config, tmp_path, task, seed):
    """Up to three stops in a row, each drawn by the seed: SIGKILL after a delay or when a file is being written,
    SIGTERM or SIGINT after a delay; then `--resume` until the run is done (a run stopped before its run.json was
    written is started again, as `--resume` says: there is nothing to resume)."""
    rng = random.Random(seed)
    data = _task_data(tmp_path / "data", task)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = _task_args(task, data, whole, tiny_config, rng)
    began = time.perf_counter()
    code, err = _finish(_launch(args))
    assert code == 0, err[-3000:]
    duration = time.perf_counter() - began
    first = [str(cut) if a == str(whole) else a for a in args]
    resume = ["--output", str(cut), "--resume", "--no-progress"]
    for _ in range(rng.randint(1, 3)):
        proc = _launch(resume if (cut / "run.json").is_file() else first)
        how = rng.choice(["delay", "written", "sigterm", "sigint"])
        if how == "written":
            _stop_when_written(proc, cut, rng.choice(WRITING), rng.randint(1, 2), signal.SIGKILL)
        else:
            sig = {"delay": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigint": signal.SIGINT}[how]
            _stop_after(proc, rng.uniform(0.0, duration), sig)
        code, err = _finish(proc)
        assert "Traceback" not in err or code < 0 or code == 130, err[-3000:]  # a signal during imports: Python's
        assert code in (0, 130, 143, -signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT), (how, code, err[-3000:])
    code, err = _finish(_launch(resume if (cut / "run.json").is_file() else first))
    assert code == 0, err[-3000:]
    _same_run(whole, cut)


@pytest.mark.slow
def test_torchrun_killed_with_its_workers_while_a_checkpoint_is_written_resumes_to_the_same_bits(
        small_digits, tiny_config, tmp_path):
    """Two CPU processes (gloo): the launcher and both workers SIGKILLed while last/ of epoch 1 is written, then
    resumed under torchrun: the bits of an uninterrupted two-process run."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    code, err = _finish(_launch(_classification_args(small_digits, tiny_config, whole), processes=2))
    assert code == 0, err[-3000:]
    proc = _launch(_classification_args(small_digits, tiny_config, cut), processes=2)
    assert _stop_when_written(proc, cut, ".last.tmp", 1, signal.SIGKILL)
    _finish(proc)
    # Stopped in epoch 1's writes: its whole checkpoint or none, and the second epoch still to train.
    assert not (cut / "last").exists() or torch.load(cut / "last" / "training_state.pt", weights_only=True)["epoch"] == 1
    code, err = _finish(_launch(["--output", str(cut), "--resume", "--no-progress"], processes=2))
    assert code == 0, err[-3000:]
    _same_run(whole, cut)
