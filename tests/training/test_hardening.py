"""`pvtv2 train` used as a hostile user would: bad flags, a diverging loss, data changed under --resume, two
processes on one run folder, a full disk, damaged run files. Each is refused with one line and exit status 2, writes
nothing it should not, and leaves the run resumable to the weights of an uninterrupted run."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from pvtv2 import PvtV2ForImageClassification
from pvtv2.cli import main
from pvtv2.data.shapes import make_segmentation_example
from pvtv2.fileio import recover_folder
from pvtv2.training.classification import ClassificationTask
from pvtv2.training.rundir import LOCK_FILE
from pvtv2.training.segmentation import SegmentationTask
from conftest import TINY_SMALL_IMAGES
from training_fixtures import ENV, common_args, same_weights

# The fixtures tiny_config, digits and few_digits.
pytest_plugins = ["training_fixtures"]



def _main(args: list[str], capsys, command: str = "train") -> tuple[int, str]:
    code = main([command, *args])
    return code, capsys.readouterr().err


def _one_line(err: str, command: str = "train") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pvtv2 {command}: error: "), err
    return lines[0]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def reference(few_digits, tiny_config, tmp_path_factory) -> Path:
    """An uninterrupted two-epoch run in this process (the in-process runs below are compared with it)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", *common_args(few_digits, tiny_config, out)]) == 0
    return out


def _interrupt(task_class, monkeypatch, at_call: int) -> None:
    """Ctrl-C in the middle of training: the ``at_call``-th batch's loss raises KeyboardInterrupt."""
    original, calls = task_class.training_loss, []

    def interrupted(self, model, batch, ctx):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return original(self, model, batch, ctx)

    monkeypatch.setattr(task_class, "training_loss", interrupted)


@pytest.fixture
def interrupted(few_digits, tiny_config, tmp_path, monkeypatch, capsys) -> tuple[Path, Path]:
    """(data, run folder) of a run stopped by Ctrl-C in its second epoch, on a copy of the digits it may change."""
    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(few_digits, data)
    with monkeypatch.context() as patch:
        _interrupt(ClassificationTask, patch, at_call=9)  # 8 batches per epoch: the first of epoch 2
        code, err = _main(common_args(data, tiny_config, out), capsys)
    assert code == 130 and "interrupted" in err
    assert not (out / LOCK_FILE).exists()  # released on KeyboardInterrupt too
    assert torch.load(out / "last" / "training_state.pt", weights_only=True)["epoch"] == 1
    return data, out


# ------------------------------------------------------------------------------------------------ 1. bad flags
BAD_FLAGS = [
    (["--lr", "inf"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--clip-grad", "nan"], "--clip-grad"),
    (["--clip-grad", "-1"], "--clip-grad"),
    (["--warmup-epochs", "nan"], "--warmup-epochs"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"),
    (["--min-lr", "0.1", "--lr", "0.01"], "--min-lr"),
    (["--min-lr", "inf"], "--min-lr"),
    (["--workers", "-1"], "--workers"),
    (["--label-smoothing", "1"], "--label-smoothing"),
    (["--label-smoothing", "nan"], "--label-smoothing"),
    (["--drop-path", "-0.5"], "--drop-path"),
    (["--drop-path", "inf"], "--drop-path"),
    (["--hflip", "1.5"], "--hflip"),
    (["--hflip", "nan"], "--hflip"),
    (["--crop-scale", "0"], "--crop-scale"),
    (["--crop-scale", "2"], "--crop-scale"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--grad-accum", "0"], "--grad-accum"),
    (["--seed", "-1"], "--seed"),
    # Used to overflow in the seeding after run.json and metrics.jsonl were written.
    (["--seed", "99999999999999999999"], "--seed must be an integer in [0, 2**63-1], got 99999999999999999999"),
    (["--seed", str(2**63)], "--seed must be an integer in [0, 2**63-1]"),
    # Used to start training on 100000 x 100000 images; 4096 is the bound of every command.
    (["--image-size", "4097"], "--image-size must be an integer in [1, 4096], got 4097"),
    # Used to crash in the first step with a traceback, after run.json and metrics.jsonl were written.
    (["--device", "meta"], "--device meta holds shapes without data"),
    (["--device", "meta:0"], "--device meta"),
    # The tiny model reduces stage 1's keys 4x: its 1/4-resolution grid, (S - 1) // 4 + 1, needs S >= 13.
    (["--image-size", "8"], "--image-size 13 or more"),
    # B0 reduces them 8x: (S - 1) // 4 + 1 >= 8 needs S >= 29, so 16 px cannot train it.
    (["--model", "pvt_v2_b0"], "--image-size 29 or more"),
]


@pytest.mark.parametrize(("extra", "named"), BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_refused_before_anything_is_written(few_digits, tiny_config, tmp_path, capsys, extra, named):
    out = tmp_path / "run"
    code, err = _main([*common_args(few_digits, tiny_config, out), *extra], capsys)
    assert code == 2
    assert named in _one_line(err)
    assert not out.exists()


def test_an_absurd_architecture_is_refused_before_it_is_allocated(few_digits, tmp_path, capsys):
    """mlp_ratios [1e9, ...] used to reach the allocator (256 GB for stage 1's FFN): a 58-line traceback. (1e8 here:
    1e9 now gives a Mix-FFN wider than 2**31 - 1, which the config itself refuses.)"""
    config = tmp_path / "absurd.json"
    config.write_text(json.dumps({**TINY_SMALL_IMAGES, "mlp_ratios": [1e8, 2, 2, 2]}))
    out = tmp_path / "run"
    code, err = _main(common_args(few_digits, str(config), out), capsys)
    assert code == 2
    line = _one_line(err)
    # stage 1's FFN alone: dense1 and dense2 of (dim x dim * 1e8) weights, dense1's bias and the depthwise conv's
    hidden, dim = int(TINY_SMALL_IMAGES["hidden_sizes"][0] * 1e8), TINY_SMALL_IMAGES["hidden_sizes"][0]
    ffn = 2 * dim * hidden + hidden + dim + hidden * 9 + hidden
    count = int(re.search(r"would have ([\d,]+) parameters", line).group(1).replace(",", ""))
    assert ffn < count < ffn + 10**6 and "more than 10,000,000,000" in line
    assert not out.exists()


@pytest.mark.parametrize("kind", ["symlink loop", "FIFO (named pipe)", "file", "dangling symlink"])
def test_an_output_that_is_not_a_folder_is_named(few_digits, tiny_config, tmp_path, capsys, kind):
    """A symlink loop used to give "cannot write 'loop': File exists [EEXIST]", a FIFO "is a file"."""
    out = tmp_path / "out"
    if kind == "symlink loop":
        os.symlink(out, out)
    elif kind == "dangling symlink":
        os.symlink(tmp_path / "gone", out)
    elif kind == "file":
        out.write_text("x")
    else:
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs on this system")
        os.mkfifo(out)
    code, err = _main(common_args(few_digits, tiny_config, out), capsys)
    assert code == 2
    assert _one_line(err).endswith(f"error: --output {str(out)!r} is a {kind}, not a folder")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_the_alias_and_the_demo_refuse_bad_flags_before_writing(tmp_path, capsys):
    out = tmp_path / "seg"
    code, err = _main([str(tmp_path / "data"), "-o", str(out), "--clip-grad", "-1"], capsys, "train-seg")
    assert code == 2 and "--clip-grad" in _one_line(err, "train-seg") and not out.exists()
    demo = tmp_path / "demo"
    code, err = _main(["--output", str(demo), "--epochs", "0"], capsys, "demo")
    assert code == 2 and "--epochs" in _one_line(err, "demo") and not demo.exists()  # no digits written either
    shapes = tmp_path / "shapes"
    code, err = _main(["-o", str(shapes), "--epochs", "2", "--seed", "-1"], capsys, "demo-seg")
    assert code == 2 and "--seed" in _one_line(err, "demo-seg") and not shapes.exists()


def test_demo_names_an_output_it_cannot_make(tmp_path, capsys):
    """--output /proc/demo used to print "[Errno 2] No such file or directory: '/proc/demo'"."""
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "demo"
    code, err = _main(["--output", str(out), "--epochs", "1"], capsys, "demo")
    assert code == 2
    # Named before anything is written (rundir.check_output_path), the file above it too.
    assert _one_line(err, "demo").endswith(
        f"error: cannot write {str(out)!r}: {str(tmp_path / 'file')!r} is a file, not a folder")


def test_a_refused_command_can_be_corrected(few_digits, tiny_config, tmp_path, capsys):
    """--workers -1 used to fail in the DataLoader after run.json existed; the corrected command was then refused
    as an unfinished run."""
    out = tmp_path / "run"
    code, _ = _main([*common_args(few_digits, tiny_config, out, epochs=1), "--workers", "-1"], capsys)
    assert code == 2 and not out.exists()
    code, err = _main([*common_args(few_digits, tiny_config, out, epochs=1), "--workers", "0"], capsys)
    assert code == 0, err
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


# ------------------------------------------------------------------------------------------------ 2. divergence
def test_a_diverging_loss_stops_with_one_line(few_digits, tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _main([*common_args(few_digits, tiny_config, out), "--lr", "1e3"], capsys)
    assert code == 2
    line = _one_line(err)
    assert re.search(r"training loss became (nan|inf|-inf) at epoch 1, step \d of 8", line), line
    assert "--lr" in line and "--clip-grad" in line
    assert not (out / "last").exists() and not (out / LOCK_FILE).exists()


def test_divergence_keeps_the_last_checkpoint_resumable(few_digits, tiny_config, reference, tmp_path, capsys, monkeypatch):
    """A NaN in epoch 2 stops the run before it reaches the weights; epoch 1's checkpoint resumes to the
    uninterrupted run's weights, bit for bit."""
    out = tmp_path / "run"
    original, calls = ClassificationTask.training_loss, []

    def poisoned(self, model, batch, ctx):
        calls.append(1)
        loss = original(self, model, batch, ctx)
        return loss * float("nan") if len(calls) == 11 else loss  # epoch 2, batch 3

    with monkeypatch.context() as patch:
        patch.setattr(ClassificationTask, "training_loss", poisoned)
        code, err = _main(common_args(few_digits, tiny_config, out), capsys)
    assert code == 2
    line = _one_line(err)
    assert "became nan at epoch 2, step 3 of 8" in line and "epoch 1" in line and str(out / "last") in line
    assert torch.load(out / "last" / "training_state.pt", weights_only=True)["epoch"] == 1
    code, err = _main(["--output", str(out), "--resume", "--no-progress"], capsys)
    assert code == 0, err
    assert same_weights(out / "last", reference / "last") and same_weights(out / "best", reference / "best")


# `pvtv2 train` in which process 1's loss becomes NaN at its 3rd batch, and process 0's stays finite.
POISON_RANK_1 = """
import os, sys
from pvtv2.cli import main
from pvtv2.training.classification import ClassificationTask
original, calls = ClassificationTask.training_loss, []
def poisoned(self, model, batch, ctx):
    calls.append(1)
    loss = original(self, model, batch, ctx)
    return loss * float("nan") if os.environ["RANK"] == "1" and len(calls) == 3 else loss
ClassificationTask.training_loss = poisoned
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_distributed_divergence_stops_every_process(few_digits, tiny_config, tmp_path):
    """One process's loss turns NaN: both processes of the group stop at that batch, each by itself. They are started
    without torchrun, which would kill a straggler once the other exits: a process left waiting for the other in a
    collective would hang here (or fail with a broken connection)."""
    out = tmp_path / "run"
    command = [sys.executable, "-c", POISON_RANK_1, "train", *common_args(few_digits, tiny_config, out)]
    for _ in range(3):
        # A free port, closed again before rank 0 binds it: another test's process (pytest -n) may take it in
        # between, and then the group is started again on another one.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        ranks = [
            subprocess.Popen(command, env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for r in range(2)
        ]
        try:
            errors = [ranks[0].communicate(timeout=300)[1]]
            taken = ranks[0].returncode != 0 and ("EADDRINUSE" in errors[0]
                                                  or "address already in use" in errors[0].lower())
            if taken:  # process 1 waits for a rank 0 that is gone: ended here, and the pair started again
                continue
            errors.append(ranks[1].communicate(timeout=300)[1])
            break
        finally:
            for rank in ranks:
                rank.kill()
                rank.wait()
    assert [rank.returncode for rank in ranks] == [2, 2], [err[-2000:] for err in errors]
    lines = [err.strip().splitlines()[-1] for err in errors]
    # 60 samples per process, batches of 16: 4 batches each.
    assert "stopped being finite in another process at epoch 1, step 3 of 4" in lines[0], lines
    assert "became nan at epoch 1, step 3 of 4" in lines[1], lines
    assert not (out / "last").exists() and not (out / LOCK_FILE).exists()


# ------------------------------------------------------------------------------------------------ 3. resume checks
def _rename(folder: Path, new: str) -> None:
    folder.rename(folder.with_name(new))


@pytest.mark.parametrize("change", ["renamed", "added"])
def test_resume_refuses_data_whose_classes_changed(interrupted, capsys, change):
    data, out = interrupted
    before = (out / "last" / "model.safetensors").read_bytes()
    for split in ("train", "val"):
        if change == "renamed":  # the old code kept id2label's '3' for the images now labelled 'three'
            _rename(data / split / "3", "three")
        else:  # the old code ended in an IndexError: an 11th label for a 10-way head
            shutil.copytree(data / split / "0", data / split / "x")
    code, err = _main(["--output", str(out), "--resume", "--no-progress"], capsys)
    assert code == 2
    line = _one_line(err)
    assert "'0', '1', '2', '3'" in line  # the run's classes
    if change == "renamed":
        assert "only in the run: ['3']; only in the data: ['three']" in line
    else:
        assert "the data 11" in line and "only in the data: ['x']" in line
    assert (out / "last" / "model.safetensors").read_bytes() == before and not (out / LOCK_FILE).exists()


def test_segmentation_resume_refuses_renamed_labels(tmp_path, capsys, monkeypatch, caplog):
    data, out = tmp_path / "data", tmp_path / "run"
    make_segmentation_example(data, 16, 4, 32, seed=3)
    args = [str(data), "-o", str(out), "--image-size", "32", "--epochs", "2", "--no-progress"]
    with monkeypatch.context() as patch:
        _interrupt(SegmentationTask, patch, at_call=3)  # 2 batches of 8 per epoch: the first of epoch 2
        assert _main(args, capsys, "train-seg")[0] == 130
    labels = json.loads((data / "labels.json").read_text())
    (data / "labels.json").write_text(json.dumps({**labels, "1": "disc"}))
    code, err = _main(["--output", str(out), "--resume", "--no-progress"], capsys)
    assert code == 2
    assert f"only in the run: [{labels['1']!r}]; only in the data: ['disc']" in _one_line(err)
    # Restored, the run resumes through the alias; its default --epochs 8, given explicitly, is not the run's 2: refused
    # (it was ignored, with a warning), then resumed without it.
    (data / "labels.json").write_text(json.dumps(labels))
    code, err = _main([*args[:3], "--resume", "--epochs", "8", "--no-progress"], capsys, "train-seg")
    assert code == 2 and "it was started with --epochs 2, not 8;" in _one_line(err, "train-seg"), err
    assert main(["train-seg", *args[:3], "--resume", "--no-progress"]) == 0
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_refuses_every_flag_that_differs_from_the_run(interrupted, reference, capsys):
    """Run settings given on --resume were ignored, each with a warning in the log, and the run went on as stored
    (flags equal to their defaults, --epochs 300 and --hflip 0.5, were even dropped silently before that): now every
    one that differs is named in one refusal, which changes nothing, and the run resumes without them."""
    _, out = interrupted
    before = (out / "metrics.jsonl").read_text()
    code, err = _main(["--output", str(out), "--resume", "--no-progress", "--epochs", "300", "--hflip", "0.5",
                       "--batch-size", "16", "--seed", "0"], capsys)
    assert code == 2
    assert _one_line(err) == (
        f"pvtv2 train: error: --resume continues the run in {str(out)!r} with the settings it was started with, and "
        f"it was started with --epochs 2, not 300; --hflip 0.0, not 0.5; leave these flags out to continue it, or, to "
        f"train it for more epochs, fine-tune its weights in a new run (--model {str(out / 'last')!r} --epochs N "
        f"--output ANOTHER)"
    )  # --batch-size 16 and --seed 0 are the run's own: nothing to say
    assert (out / "metrics.jsonl").read_text() == before and not (out / LOCK_FILE).exists()
    code, err = _main(["--output", str(out), "--resume", "--no-progress", "--lr", "1e-3"], capsys)
    assert code == 2
    assert ("it was started with --lr 0.003, not 0.001; leave this flag out to continue it, or, to train with other "
            "settings, start a new run (another --output, or --overwrite)") in _one_line(err)
    code, err = _main(["--output", str(out), "--resume", "--no-progress", "--batch-size", "16"], capsys)
    assert code == 0, err
    assert same_weights(out / "last", reference / "last")  # the run as it was started, to the end


# ------------------------------------------------------------------------------------------------ 4. the lock
@pytest.mark.parametrize("holder", ["live", "other host", "unreadable"])
def test_a_locked_run_folder_is_refused(interrupted, capsys, holder):
    _, out = interrupted
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        content = {
            "live": json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}),
            "other host": json.dumps({"pid": sleeper.pid, "host": "elsewhere.example"}),
            "unreadable": "{half a lock",
        }[holder]
        (out / LOCK_FILE).write_text(content)
        before = (out / "last" / "training_state.pt").read_bytes()
        code, err = _main(["--output", str(out), "--resume", "--no-progress"], capsys)
        assert code == 2
        line = _one_line(err)
        assert str(out / LOCK_FILE) in line
        if holder == "unreadable":
            assert "remove it" in line
        else:
            assert f"in use by process {sleeper.pid} on " in line
            assert ("this host" if holder == "live" else "'elsewhere.example'") in line
        assert (out / LOCK_FILE).read_text() == content  # the holder's lock is left alone
        assert (out / "last" / "training_state.pt").read_bytes() == before
    finally:
        sleeper.kill()
        sleeper.wait()


def test_recover_folder_puts_back_or_removes_the_old_copy(tmp_path):
    target, old = tmp_path / "last", tmp_path / ".last.old"
    old.mkdir()
    (old / "a").write_text("previous")
    recover_folder(target)  # killed between the two renames: only the old copy exists
    assert (target / "a").read_text() == "previous" and not old.exists()
    old.mkdir()
    (old / "a").write_text("stale")
    recover_folder(target)  # killed after the second rename: the new one is in place, the old copy is stale
    assert (target / "a").read_text() == "previous" and not old.exists()
    recover_folder(target)  # nothing to do
    assert (target / "a").read_text() == "previous"


def test_resume_removes_old_checkpoints_left_by_a_kill(reference, tmp_path, capsys):
    """kill -9 in the last epoch's checkpoint swap, after its second rename, leaves ``.last.old`` / ``.best.old`` (a
    whole checkpoint each) beside ``last`` / ``best``; the resumed run has nothing left to train, so no later swap
    removed them: they used to stay in the run folder forever."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for name in ("last", "best"):  # the folder as the kill leaves it: the previous copy beside the new one
        shutil.copytree(out / name, out / f".{name}.old")
        (out / f".{name}.old" / "model.safetensors").write_bytes(b"stale")  # must not be read back
    code, err = _main(["--output", str(out), "--resume", "--no-progress"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert same_weights(out / "last", reference / "last") and same_weights(out / "best", reference / "best")


def test_a_stale_lock_is_taken_over(interrupted, reference, capsys, caplog):
    """The lock of a process that is gone (killed: its pid no longer runs here) is taken over with a warning."""
    _, out = interrupted
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / LOCK_FILE).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        code, err = _main(["--output", str(out), "--resume", "--no-progress"], capsys)
    assert code == 0, err
    assert any(f"process {gone.pid} on this host that held it is gone" in r.getMessage() for r in caplog.records)
    assert not (out / LOCK_FILE).exists()
    assert same_weights(out / "last", reference / "last")


# `pvtv2 train` whose first training batch waits until the file GO exists: the run holds its folder's lock meanwhile.
WAIT_FOR_GO = """
import os, sys, time
from pvtv2.cli import main
from pvtv2.training.classification import ClassificationTask
original = ClassificationTask.training_loss
def waiting(self, model, batch, ctx):
    deadline = time.monotonic() + 300
    while not os.path.exists(os.environ["GO"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return original(self, model, batch, ctx)
ClassificationTask.training_loss = waiting
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_processes_on_one_run_folder(few_digits, tiny_config, tmp_path, capsys, monkeypatch):
    """While one `--resume` runs, a second is refused, naming it (both used to finish, interleaving their
    checkpoints into weights that no single run gives); the first ends normally, as the only writer. The first
    waits at its first batch until the second has been refused: on a busy machine (pytest -n) it could otherwise
    finish, and release the folder, before the second asks for it."""
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _interrupt(ClassificationTask, patch, at_call=9)
        assert _main(common_args(few_digits, tiny_config, out, epochs=6), capsys)[0] == 130
    go = tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", WAIT_FOR_GO, "train", "--output", str(out), "--resume",
                              "--no-progress"], env={**ENV, "GO": str(go)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_FILE).exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == first.pid
        code, err = _main(["--output", str(out), "--resume", "--no-progress"], capsys)
        assert code == 2 and f"in use by process {first.pid} on this host" in _one_line(err)
        go.touch()
        _, first_err = first.communicate(timeout=300)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 0, first_err[-3000:]
    assert not (out / LOCK_FILE).exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------------------------ 5. full disk
def _disk_full(monkeypatch, out: Path, name: str) -> None:
    """Writes of ``name`` (and its temporary siblings) fail with ENOSPC once epoch 1's checkpoint exists; checkpoint
    files fail only inside ``last``'s temporary folder."""

    def failing(write):
        def attempt(self, *args, **kwargs):
            path = Path(self if isinstance(self, (str, os.PathLike)) else args[0])
            inside_last = name not in ("model.safetensors", "training_state.pt") or ".last.tmp" in str(path)
            if name in path.name and inside_last and (out / "last").is_dir():
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return write(self, *args, **kwargs)

        return attempt

    monkeypatch.setattr(Path, "write_bytes", failing(Path.write_bytes))
    monkeypatch.setattr(Path, "write_text", failing(Path.write_text))
    monkeypatch.setattr(PIL.Image.Image, "save", failing(PIL.Image.Image.save))


@pytest.mark.parametrize(("name", "target"), [
    ("model.safetensors", "last"), ("training_state.pt", "last"), ("metrics.jsonl", "metrics.jsonl"),
    ("curves.png", "curves.png"),
])
def test_a_full_disk_is_one_line_and_leaves_a_resumable_run(
    few_digits, tiny_config, reference, tmp_path, capsys, monkeypatch, name, target
):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _disk_full(patch, out, name)
        code, err = _main(common_args(few_digits, tiny_config, out), capsys)
    assert code == 2
    line = _one_line(err)
    assert f"cannot write {str(out / target)!r}: {os.strerror(errno.ENOSPC)} [ENOSPC]" in line, line
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert not leftovers and not (out / LOCK_FILE).exists()
    assert torch.load(out / "last" / "training_state.pt", weights_only=True)["epoch"] == 1  # whole, and loads
    PvtV2ForImageClassification.from_pretrained(out / "last")
    code, err = _main(["--output", str(out), "--resume", "--no-progress"], capsys)
    assert code == 0, err
    assert same_weights(out / "last", reference / "last")


# ------------------------------------------------------------------------------------------------ 6. damaged files
DAMAGE = {
    "run.json holds a list": ("run.json", b"[1, 2, 3]\n", "holds a JSON list"),
    "run.json is not JSON": ("run.json", b"{\"epochs\": 2,", "is damaged"),
    "run.json lacks settings": ("run.json", b"{}\n", "lacks the run settings"),
    "training_state.pt is garbage": ("last/training_state.pt", b"not a zip file", "cannot read the training state"),
    "training_state.pt holds a list": ("last/training_state.pt", None, "is not a training state"),
    "metrics.jsonl is not JSON lines": ("metrics.jsonl", b"{\"epoch\": 1}\n{\"epo", "is damaged"),
    "training_state.pt has a negative epoch": ("last/training_state.pt", {"epoch": -5}, "its epoch is -5"),
    "training_state.pt has a text best epoch": ("last/training_state.pt", {"best_epoch": "1"}, "its best_epoch is '1'"),
    "training_state.pt is past its run's end": ("last/training_state.pt", {"epoch": 99}, "its epoch 99 is not one"),
    "training_state.pt has a best epoch after its epoch": ("last/training_state.pt", {"best_epoch": 5},
                                                           "its best_epoch 5 comes after its epoch 2"),
    "training_state.pt has a number for rng": ("last/training_state.pt", {"rng": 5}, "its rng is not a list"),
    "training_state.pt has text for rng": ("last/training_state.pt", {"rng": "abc"}, "its rng is not a list"),
    "training_state.pt has foreign rng states": ("last/training_state.pt", {"rng": [{"x": 1}]},
                                                 "its rng is not a list"),
    "training_state.pt has a text scheduler": ("last/training_state.pt", {"scheduler": "x"},
                                               "its scheduler is a str, not a dict"),
    "training_state.pt has a text model config": ("last/training_state.pt", {"model_config": "x"},
                                                  "its model_config is a str, not a dict"),
    "training_state.pt has a text best score": ("last/training_state.pt", {"best_top1": "high"},
                                                "its best_top1 is 'high', not a number"),
    "training_state.pt has text for optimizer state": (
        "last/training_state.pt", lambda state: {**state, "optimizer": {**state["optimizer"], "state": "x"}},
        "does not fit the model"),
    "training_state.pt has a torch generator state of the wrong kind": (
        "last/training_state.pt", lambda state: {**state, "rng": [{**state["rng"][0], "torch": torch.zeros(3)}]},
        "its random generator state cannot be restored"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_run_files_are_named(reference, few_digits, tiny_config, tmp_path, capsys, damage):
    name, content, says = DAMAGE[damage]
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "run.json").write_text(json.dumps({**json.loads((out / "run.json").read_text()), "epochs": 3}))
    if content is None:
        torch.save([1, 2], out / name)
    elif isinstance(content, dict):  # the real state with some values changed
        torch.save({**torch.load(out / name, weights_only=True), **content}, out / name)
    elif callable(content):  # the real state changed deeper down
        torch.save(content(torch.load(out / name, weights_only=True)), out / name)
    else:
        (out / name).write_bytes(content)
    code, err = _main(["--output", str(out), "--resume", "--no-progress"], capsys)
    assert code == 2
    line = _one_line(err)
    assert str(out / name) in line and says in line and "--overwrite" in line
    # Without --resume the folder is still recognised as a run, and refused as such.
    code, err = _main(common_args(few_digits, tiny_config, out), capsys)
    assert code == 2 and f"{str(out)!r} holds a" in _one_line(err) and "training run" in err
