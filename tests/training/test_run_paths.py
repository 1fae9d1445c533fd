"""The paths a run records in run.json, and how --resume reads them: the data folder (and a local --model) absolute,
so that `pvtv2 train --resume --output OUT` works from any folder; a relative data path, as older runs recorded it
(the demos' always), looked for under the current folder, then under the run folder and the folders above it."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest

from pvtv2.cli import main
from pvtv2.training import TrainConfig
from pvtv2.training.rundir import RUN_FILE, prepare_output, resolve_recorded_data, start_run


def test_a_new_run_records_its_data_and_a_local_model_by_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "arch.json").write_text("{}")
    for i, (model, recorded) in enumerate((("arch.json", str(tmp_path / "arch.json")), ("pvt_v2_b0", "pvt_v2_b0"),
                                           ("tiny", "tiny"), ("OpenGVLab/pvt_v2_b0", "OpenGVLab/pvt_v2_b0"))):
        out = tmp_path / f"run{i}"
        out.mkdir()
        start_run(TrainConfig(data=os.path.join("sets", "shapes"), model=model, output=os.path.relpath(out)), ["a"])
        stored = json.loads((out / RUN_FILE).read_text())
        assert stored["data"] == str(tmp_path / "sets" / "shapes") and stored["model"] == recorded


def _older_run(tmp_path, data: str) -> str:
    """A run folder as versions before recorded it: ``tmp/started/example/run`` started from ``tmp/started``, its
    data ``example/data`` relative to that."""
    run = tmp_path / "started" / "example" / "run"
    run.mkdir(parents=True)
    (tmp_path / "started" / "example" / "data").mkdir()
    stored = {"data": data, "model": "tiny", "image_size": 32, "epochs": 2, "batch_size": 2, "task": "segmentation"}
    (run / RUN_FILE).write_text(json.dumps(stored))
    return str(run)


def test_resume_finds_an_older_runs_relative_data_from_another_folder(tmp_path, monkeypatch, caplog):
    run = _older_run(tmp_path, "example/data")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with caplog.at_level(logging.WARNING):
        merged, _, _ = prepare_output(TrainConfig(output=run, resume=True))
    assert merged.data == str(tmp_path / "started" / "example" / "data")
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"--resume: the run recorded its data as 'example/data', relative to the folder it was started from; using "
        f"{tmp_path / 'started' / 'example' / 'data'}"]
    # --data given again as the same folder, relative to this one: the same setting, taken (not refused as changed)
    merged_again, _, _ = prepare_output(
        TrainConfig(output=run, resume=True, data=os.path.join("..", "started", "example", "data")), explicit={"data"})
    assert merged_again.data == merged.data


def test_the_current_folder_comes_first_as_it_always_did(tmp_path, monkeypatch):
    run = _older_run(tmp_path, "example/data")
    (tmp_path / "here" / "example" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "here")
    assert resolve_recorded_data("example/data", run) == str(tmp_path / "here" / "example" / "data")
    monkeypatch.chdir(tmp_path / "started")  # where it was started: its own data
    merged, _, _ = prepare_output(TrainConfig(output=run, resume=True))
    assert merged.data == str(tmp_path / "started" / "example" / "data")


def test_recorded_data_found_nowhere_is_named(tmp_path, monkeypatch, caplog, capsys):
    run = _older_run(tmp_path, "gone/data")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        merged, _, _ = prepare_output(TrainConfig(output=run, resume=True))
    assert merged.data == "gone/data"  # as recorded: the data's own check refuses it
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"--resume: the run in {run!r} recorded its data as 'gone/data', relative to the folder it was started from, "
        f"and neither the current folder nor {run!r} or a folder above it holds it; continue the run from the folder "
        "it was started from"]
    assert main(["train", "--resume", "--output", run, "--no-progress"]) == 2
    assert "gone/data" in capsys.readouterr().err.strip().splitlines()[-1]
    # An absolute path is the run's own: taken as it is (the data check names it if it is gone).
    assert resolve_recorded_data(str(tmp_path / "gone"), run) == str(tmp_path / "gone")


def test_resume_takes_a_preset_however_it_is_spelled(tmp_path, monkeypatch):
    """--model names a preset in any case, with - or _ (``PVT-v2-B0``), and run.json records it as typed: resuming
    with another spelling of the same preset was refused as a changed run setting, which left the run unfinishable
    from a command that wrote it differently. Another preset is still refused, and so is a file of that name here."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    start_run(TrainConfig(data=str(tmp_path / "data"), model="PVT-v2-B0", output=str(out)), ["a"])
    for spelling in ("pvt_v2_b0", "pvt-v2-b0", "PVT-v2-B0"):
        merged, _, _ = prepare_output(TrainConfig(output=str(out), resume=True, model=spelling), explicit={"model"})
        assert merged.model == "PVT-v2-B0"  # the run's own
    with pytest.raises(ValueError, match="it was started with --model 'PVT-v2-B0', not 'pvt_v2_b1'"):
        prepare_output(TrainConfig(output=str(out), resume=True, model="pvt_v2_b1"), explicit={"model"})
    (tmp_path / "pvt_v2_b0").mkdir()  # now a folder: a checkpoint, not the preset
    with pytest.raises(ValueError, match="it was started with --model 'PVT-v2-B0', not 'pvt_v2_b0'"):
        prepare_output(TrainConfig(output=str(out), resume=True, model="pvt_v2_b0"), explicit={"model"})


def test_resume_finds_data_that_moved_with_data(tmp_path, monkeypatch, caplog):
    """Data moved since the run started (another disk): the recorded folder is gone, and --data NEW was refused as a
    changed setting while the run without it could not read its data, so the run could not be finished at all. Now
    the new folder is taken, with a warning; a folder given while the recorded one is still there is refused."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "old").mkdir()
    out = tmp_path / "run"
    out.mkdir()
    start_run(TrainConfig(data="old", model="pvt_v2_b0", output=str(out)), ["a"])
    (tmp_path / "new").mkdir()
    with pytest.raises(ValueError, match=f"it was started with --data {str(tmp_path / 'old')!r}, not 'new'"):
        prepare_output(TrainConfig(output=str(out), resume=True, data="new"), explicit={"data"})
    (tmp_path / "old").rmdir()
    with caplog.at_level(logging.WARNING):
        merged, _, _ = prepare_output(TrainConfig(output=str(out), resume=True, data="new"), explicit={"data"})
    assert merged.data == str(tmp_path / "new") and merged.model == "pvt_v2_b0"
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"--resume: the run's data {str(tmp_path / 'old')!r} is no longer there; using --data {tmp_path / 'new'}"]
    # Another run setting given with it is still refused; a --data that does not exist either is the run's own one
    with pytest.raises(ValueError, match="it was started with --epochs 300, not 3;"):
        prepare_output(TrainConfig(output=str(out), resume=True, data="new", epochs=3), explicit={"data", "epochs"})
    with pytest.raises(ValueError, match="not 'elsewhere'"):
        prepare_output(TrainConfig(output=str(out), resume=True, data="elsewhere"), explicit={"data"})


def test_resume_of_a_run_older_than_recipe_refuses_turning_its_augmentation_on(tmp_path):
    """run.json written before --recipe existed has neither "recipe" nor its fields: the run trained with them off.
    --recipe deit given on --resume was silently ignored, and --mixup 0.8 accepted, changing the run mid-way (its
    weights then differ from an uninterrupted run's); both are refused now, and the run's own values accepted."""
    out = tmp_path / "run"
    out.mkdir()
    start_run(TrainConfig(data=str(tmp_path), model="pvt_v2_b0", output=str(out), recipe="none", mixup=0.0,
                          cutmix=0.0, reprob=0.0, randaugment=False, repeated_aug=1, train_interpolation="bilinear"),
              ["a"])
    stored = json.loads((out / RUN_FILE).read_text())
    for key in ("recipe", "randaugment", "mixup", "cutmix", "reprob", "repeated_aug", "train_interpolation"):
        del stored[key]
    (out / RUN_FILE).write_text(json.dumps(stored))
    for given, message in (({"recipe": "deit"}, "--recipe 'none', not 'deit'"),
                           ({"mixup": 0.8}, "--mixup 0.0, not 0.8"),
                           ({"randaugment": True}, "--randaugment off, not on")):
        with pytest.raises(ValueError, match=f"it was started with {re.escape(message)};"):
            prepare_output(TrainConfig(output=str(out), resume=True, **given), explicit=set(given))
    same = {"recipe": "none", "mixup": 0.0, "repeated_aug": 1, "train_interpolation": "bilinear"}
    merged, _, _ = prepare_output(TrainConfig(output=str(out), resume=True, **same), explicit=set(same))
    assert (merged.recipe, merged.mixup, merged.cutmix, merged.reprob, merged.randaugment, merged.repeated_aug,
            merged.train_interpolation) == ("none", 0.0, 0.0, 0.0, False, 1, "bilinear")


def _run_without_lr(tmp_path, **settings) -> str:
    out = tmp_path / "run"
    out.mkdir()
    start_run(TrainConfig(data=str(tmp_path), model="pvt_v2_b0", output=str(out), **settings), ["a"])
    assert json.loads((out / RUN_FILE).read_text())["lr"] is None
    return str(out)


def _classification_lr(cfg: TrainConfig, world_size: int) -> float:
    """DeiT's rule, the classification task's default (written out here, not read from the task)."""
    return 5e-4 * cfg.batch_size * cfg.grad_accum * world_size / 512


def test_resume_takes_an_lr_equal_to_the_one_a_run_without_lr_trained_with(tmp_path):
    """A run started without --lr trains with its task's default (5e-4 x 128 / 512 for batch 128); --lr with that
    value on --resume was refused as "--lr (not set), not 0.000125". It is taken now; another one is still refused,
    with the rate the run trained with in the message."""
    out = _run_without_lr(tmp_path, batch_size=128)
    resume = {"output": out, "resume": True}
    merged, _, _ = prepare_output(TrainConfig(**resume, lr=1.25e-4), explicit={"lr"}, default_lr=_classification_lr)
    assert merged.lr is None and merged.batch_size == 128  # the run as it was: its lr stays the default
    # two processes: the rate doubles with the global batch (the world size of the run's own epochs decides, below)
    merged, _, _ = prepare_output(TrainConfig(**resume, lr=2.5e-4), explicit={"lr"}, default_lr=_classification_lr,
                                  world_size=2)
    assert merged.lr is None
    with pytest.raises(ValueError, match=re.escape(
            "it was started with --lr not set (the default, 0.000125 for this run), not 0.001; leave this flag out")):
        prepare_output(TrainConfig(**resume, lr=1e-3), explicit={"lr"}, default_lr=_classification_lr)
    # without a way to know the default (a library caller's prepare_output), as before: refused
    with pytest.raises(ValueError, match=re.escape("it was started with --lr (not set), not 0.000125;")):
        prepare_output(TrainConfig(**resume, lr=1.25e-4), explicit={"lr"})


def test_resume_reads_the_lr_of_a_run_from_the_processes_that_trained_it(tmp_path, monkeypatch):
    """The rate of a run with epochs done is that of its own processes (the optimizer state restored on resume keeps
    it), whatever this invocation's number of processes."""
    from pvtv2.training import rundir

    out = _run_without_lr(tmp_path, batch_size=64)
    (tmp_path / "run" / "last").mkdir()
    (tmp_path / "run" / "last" / rundir.TRAINING_STATE_NAME).write_bytes(b"")
    state = {"world_size": 4, "model_config": {"id2label": {"0": "a"}}}  # what the test reads of a training state
    monkeypatch.setattr(rundir, "load_training_state", lambda folder: state)
    lr_of_4 = 5e-4 * 64 * 4 / 512
    merged, read, _ = prepare_output(TrainConfig(output=out, resume=True, lr=lr_of_4), explicit={"lr"},
                                     default_lr=_classification_lr, world_size=1)
    assert merged.lr is None and read is state
    with pytest.raises(ValueError, match=re.escape("--lr not set (the default, 0.00025 for this run), not 6.25e-05")):
        prepare_output(TrainConfig(output=out, resume=True, lr=5e-4 * 64 / 512), explicit={"lr"},
                       default_lr=_classification_lr, world_size=1)


def test_resume_names_a_precision_or_switch_as_the_flag_typed(tmp_path, capsys):
    """`--amp bf16` on --resume of a float32 run read "--bf16 False, not True"; switches read "False, not True"."""
    out = _run_without_lr(tmp_path, batch_size=128, randaugment=False)
    for args, message in (
        (["--amp", "bf16"], "it was started with float32 (no --amp), not --amp bf16; leave this flag out"),
        (["--bf16"], "it was started with float32 (no --amp), not --amp bf16; leave this flag out"),
        (["--randaugment", "--replace-head"], "it was started with --replace-head off, not on; --randaugment off, "
                                              "not on; leave these flags out"),
        (["--lr", "0.001"], "it was started with --lr not set (the default, 0.000125 for this run), not 0.001;"),
    ):
        assert main(["train", "--output", out, "--resume", "--no-progress", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("pvtv2 train: error: --resume continues"), err
        assert message in err, err
    # The run's own rate, typed out, is taken (the command's default rate is the classification task's): the run goes
    # on, to its data, which this test has not written
    assert main(["train", "--output", out, "--resume", "--no-progress", "--lr", "0.000125"]) == 2
    err = capsys.readouterr().err
    assert "pvtv2 train: error: dataset split 'train' not found" in err and "--resume continues" not in err, err
    stored = json.loads((tmp_path / "run" / RUN_FILE).read_text())
    (tmp_path / "run" / RUN_FILE).write_text(json.dumps({**stored, "fp16": True}))
    assert main(["train", "--output", out, "--resume", "--no-progress", "--amp", "bf16"]) == 2
    assert "it was started with --amp fp16, not --amp bf16; leave this flag out" in capsys.readouterr().err
