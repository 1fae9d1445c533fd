"""The demos run again into a folder that holds a finished run: refused as ``pvtv2 train`` refuses one (docs/training.md:
"a finished run needs --overwrite"), before anything is written, so the folder is left as it was, byte for byte and
time for time (demo-det and demo-seg used to rewrite OUTPUT/data before the run refused). An unfinished one is refused
naming the command that continues it (the demos have no --resume), and that command finishes the run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from pathlib import Path

import pytest
import torch

from pvtv2.cli import main
from pvtv2.training.detection import DetectionTask
from pvtv2.training.segmentation import SegmentationTask


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Every path under ``folder``: its kind, modification time (ns) and, for a file, its size and digest."""
    seen = {}
    for path in sorted(folder.rglob("*")):
        stat = path.stat()
        if path.is_file():
            seen[str(path.relative_to(folder))] = ("file", stat.st_mtime_ns, stat.st_size,
                                                   hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            seen[str(path.relative_to(folder))] = ("dir", stat.st_mtime_ns)
    return seen


def _finished(command: str, out: Path) -> str:
    return (f"pvtv2 {command}: error: {str(out / 'run')!r} holds a finished training run (1 epochs); pass --overwrite "
            "to replace it, or choose another --output")


DEMOS = {
    "demo-det": ["--train", "2", "--val", "1", "--size", "48", "--backgrounds", "synthetic"],
    "demo-seg": ["--train", "2", "--val", "1", "--size", "32"],
}
TASKS = {"demo-det": DetectionTask, "demo-seg": SegmentationTask}


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(DEMOS))
def test_a_dense_demo_into_a_finished_run_changes_nothing(tmp_path, capsys, command):
    out = tmp_path / "example"
    args = [command, "--output", str(out), *DEMOS[command], "--epochs", "1", "--no-progress"]
    assert main(args) == 0
    assert (out / "data").is_dir() and (out / "run" / "last" / "training_state.pt").is_file()
    capsys.readouterr()
    before = _snapshot(out)
    # Another seed: data that would differ, had it been written.
    assert main([*args, "--seed", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [_finished(command, out)]
    assert _snapshot(out) == before
    # The data alone (--epochs 0) neither: OUTPUT/data is the run's (it used to be rewritten, with the new seed).
    assert main([*args, "--seed", "1", "--epochs", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [_finished(command, out)]
    assert _snapshot(out) == before
    # The advice holds: --overwrite is a flag of the command, and it trains again.
    assert main([*args, "--seed", "1", "--overwrite"]) == 0
    assert _snapshot(out) != before


def test_the_classification_demo_into_an_earlier_run_changes_nothing(tmp_path, capsys):
    """`pvtv2 demo` refuses any OUTPUT/run (it has no resume): checked here on a stand-in run folder."""
    out = tmp_path / "demo"
    (out / "run").mkdir(parents=True)
    (out / "run" / "run.json").write_text("{}\n")
    (out / "digits" / "train" / "0").mkdir(parents=True)
    (out / "digits" / "train" / "0" / "0000.png").write_bytes(b"not rewritten")
    before = _snapshot(out)
    assert main(["demo", "--output", str(out), "--epochs", "1", "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"pvtv2 demo: error: {str(out)!r} already holds a demo run; pass --overwrite to replace it"]
    assert _snapshot(out) == before


def _epochs_done(run: Path) -> int:
    return torch.load(run / "last" / "training_state.pt", weights_only=True)["epoch"]


def _interrupted_after_epoch_1(monkeypatch, command: str, run, args: list[str]) -> int:
    """``main(args)`` with a Ctrl-C at the first batch after epoch 1's checkpoint (the first batch of epoch 2)."""
    task, original = TASKS[command], TASKS[command].training_loss

    def interrupted(self, model, batch, ctx):
        if (run / "last" / "training_state.pt").is_file():
            raise KeyboardInterrupt
        return original(self, model, batch, ctx)

    with monkeypatch.context() as patch:
        patch.setattr(task, "training_loss", interrupted)
        return main(args)


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(DEMOS))
def test_a_dense_demo_into_an_unfinished_run_names_the_command_that_finishes_it(tmp_path, capsys, monkeypatch, command):
    out = tmp_path / "an example"  # a space: the command is quoted for a shell
    run = out / "run"
    args = [command, "--output", str(out), *DEMOS[command], "--epochs", "2", "--no-progress"]
    assert _interrupted_after_epoch_1(monkeypatch, command, run, args) == 130
    assert _epochs_done(run) == 1
    capsys.readouterr()
    before = _snapshot(out)
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [(
        f"pvtv2 {command}: error: {str(run)!r} holds an unfinished training run (1 of 2 epochs done); continue it "
        f"with `pvtv2 train --resume --output {shlex.quote(str(run))}`, or pass --overwrite to start again")], lines
    assert _snapshot(out) == before
    # The command named, as written there, finishes the run: epoch 2 trained on the demo's data, nothing repeated.
    suggested = shlex.split(re.search(r"`pvtv2 (.*?)`", lines[0]).group(1))
    assert main([*suggested, "--no-progress"]) == 0
    assert _epochs_done(run) == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert json.loads((run / "run.json").read_text())["data"] == str(out / "data")


@pytest.mark.slow
@pytest.mark.parametrize("recorded", ["absolute", "relative"])
@pytest.mark.parametrize("command", sorted(DEMOS))
def test_a_demo_run_resumes_from_another_folder(tmp_path, capsys, monkeypatch, command, recorded):
    """A demo run with a relative --output, interrupted, continued from another folder by `pvtv2 train --resume`: its
    run.json names the data by absolute path; one that names it relative, as runs written before did, is found above
    the run folder."""
    started, elsewhere = tmp_path / "started", tmp_path / "elsewhere"
    started.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(started)
    run = started / "example" / "run"
    args = [command, "-o", "example", *DEMOS[command], "--epochs", "2", "--no-progress"]
    assert _interrupted_after_epoch_1(monkeypatch, command, run, args) == 130
    stored = json.loads((run / "run.json").read_text())
    assert stored["data"] == str(started / "example" / "data")
    if recorded == "relative":
        (run / "run.json").write_text(json.dumps({**stored, "data": os.path.join("example", "data")}))
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["train", "--resume", "--output", str(run), "--no-progress"]) == 0
    assert _epochs_done(run) == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert list(elsewhere.iterdir()) == []


def _stand_in_run(run: Path, *, epochs: int, done: int | None) -> None:
    """A run folder as a demo leaves it, without the training: run.json, and (``done`` epochs) last/'s state."""
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"data": "elsewhere", "model": "tiny", "image_size": 32, "epochs": epochs,
                                              "batch_size": 2}))
    if done is not None:
        (run / "last").mkdir()
        rng = {key: 0 for key in ("torch", "numpy_key", "numpy_pos", "python", "python_version")}
        torch.save({"epoch": done, "best_epoch": done, "epochs": epochs, "optimizer": {}, "scheduler": {}, "rng": [rng],
                    "model_config": {}}, run / "last" / "training_state.pt")


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "unfinished"])
@pytest.mark.parametrize("command", sorted(DEMOS))
def test_the_data_alone_is_not_rewritten_under_a_run(tmp_path, capsys, command, finished):
    """--epochs 0 into an OUTPUT whose run was trained on OUTPUT/data: refused as a training run would be (it used to
    rewrite OUTPUT/data, with whatever --seed and --size, under the run); --overwrite writes the data anyway."""
    out = tmp_path / "example"
    _stand_in_run(out / "run", epochs=2, done=2 if finished else None)
    (out / "data").mkdir()
    (out / "data" / "kept.txt").write_bytes(b"the run's data")
    before, run_before = _snapshot(out), _snapshot(out / "run")
    args = [command, "--output", str(out), *DEMOS[command], "--epochs", "0", "--no-progress"]
    assert main(args) == 2
    run = out / "run"
    expected = (
        f"pvtv2 {command}: error: {str(run)!r} holds a finished training run (2 epochs); pass --overwrite to replace "
        "it, or choose another --output" if finished else
        f"pvtv2 {command}: error: {str(run)!r} holds an unfinished training run (0 of 2 epochs done); continue it with "
        f"`pvtv2 train --resume --output {shlex.quote(str(run))}`, or pass --overwrite to start again")
    assert capsys.readouterr().err.strip().splitlines() == [expected]
    assert _snapshot(out) == before
    assert main([*args, "--overwrite"]) == 0
    assert (out / "data" / "val").is_dir() and _snapshot(out / "run") == run_before  # the run is left as it was


DEMO_ARGS = {**DEMOS, "demo": []}


# pvtv2 demo has no --epochs 0 (it refuses it).
@pytest.mark.parametrize("command, epochs", [("demo", "1"), ("demo-det", "0"), ("demo-det", "1"), ("demo-seg", "0"),
                                             ("demo-seg", "1")])
def test_a_demo_into_a_file_names_it_and_writes_nothing(tmp_path, capsys, command, epochs):
    """OUTPUT a file (or a file above it): one line naming it, for --epochs 0 too (demo-det and demo-seg said
    "[Errno 20] Not a directory: 'OUTPUT/data/...'", pvtv2 demo "File exists [EEXIST]")."""
    taken = tmp_path / "taken"
    taken.write_bytes(b"kept")
    for out, line in ((taken, f"--output {str(taken)!r} is a file, not a folder"),
                      (taken / "sub", f"cannot write {str(taken / 'sub')!r}: {str(taken)!r} is a file, not a folder")):
        code = main([command, "--output", str(out), *DEMO_ARGS[command], "--epochs", epochs, "--no-progress"])
        assert code == 2 and capsys.readouterr().err.strip().splitlines() == [f"pvtv2 {command}: error: {line}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"] and taken.read_bytes() == b"kept"


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["", "overwrite"])
@pytest.mark.parametrize("command", sorted(DEMO_ARGS))
def test_a_demo_whose_run_folder_is_a_file_is_refused_before_writing(tmp_path, capsys, command, overwrite):
    """OUTPUT/run a file: refused before the data is written (demo-det and demo-seg wrote OUTPUT/data, then the run
    refused; pvtv2 demo called the file 'a demo run')."""
    out = tmp_path / "example"
    out.mkdir()
    (out / "run").write_bytes(b"kept")
    code = main([command, "--output", str(out), *DEMO_ARGS[command], "--epochs", "1", "--no-progress", *overwrite])
    assert code == 2 and capsys.readouterr().err.strip().splitlines() == [
        f"pvtv2 {command}: error: --output {str(out / 'run')!r} is a file, not a folder"]
    assert [p.name for p in out.iterdir()] == ["run"] and (out / "run").read_bytes() == b"kept"
