"""`pvtv2 train` interrupted and resumed as a hostile user would: by another number of processes than started the
run, after --overwrite of a run that kept a weight average, and more. Each resumed or replaced run is compared with
numbers that do not depend on the code under test: the closed form of the learning rate schedule, an uninterrupted
run's weights and metrics."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pvtv2.cli import main
from pvtv2.training import engine
from pvtv2.training.classification import ClassificationTask
from pvtv2.training.engine import KILL_ENV
from training_fixtures import ENV, common_args, run_records, run_train, run_train_torchrun, training_state

# The fixtures tiny_config and few_digits.
pytest_plugins = ["training_fixtures"]

PEAK, MIN_LR = 3e-3, 1e-5  # common_args' --lr, and the default --min-lr


@pytest.fixture(scope="module")
def reference(few_digits, tiny_config, tmp_path_factory) -> Path:
    """An uninterrupted two-epoch run in this process, which the stopped and resumed runs below must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", *common_args(few_digits, tiny_config, out, epochs=2)]) == 0
    return out


def _same_as(out: Path, reference: Path) -> None:
    for folder in ("last", "best"):
        expected, got = load_file(reference / folder / "model.safetensors"), load_file(out / folder / "model.safetensors")
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), folder
    assert [(r["epoch"], r["train_loss"], r["val_top1"], r["lr"]) for r in run_records(out)] == [
        (r["epoch"], r["train_loss"], r["val_top1"], r["lr"]) for r in run_records(reference)]





def _cosine(step: int, total: int, warmup: int) -> float:
    """The learning rate after ``step`` optimizer steps: linear warmup, then a half cosine to MIN_LR (closed form)."""
    if step < warmup:
        return PEAK * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (total - warmup))
    return MIN_LR + (PEAK - MIN_LR) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------ 1. world size
# few_digits: 120 training images, batches of 16: 8 steps an epoch in one process, 4 in each of two; 2 epochs, the
# warmup (1 epoch) capped at a quarter of the run.
@pytest.mark.slow
@pytest.mark.parametrize("started, resumed", [(2, 1), (1, 2)])
def test_a_run_resumed_by_another_number_of_processes_finishes_its_schedule(few_digits, tiny_config, tmp_path,
                                                                           started, resumed):
    out = tmp_path / "run"
    args = common_args(few_digits, tiny_config, out, epochs=2)
    steps = {1: 8, 2: 4}
    kill = {KILL_ENV: str(steps[started] + 2)}  # the 2nd batch of epoch 2: epoch 1's checkpoint is whole
    killed = run_train_torchrun(args, {**ENV, **kill}) if started == 2 else run_train(args, env={**ENV, **kill})
    assert killed.returncode != 0
    assert training_state(out)["epoch"] == 1 and training_state(out)["scheduler"]["last_epoch"] == steps[started]
    again = ["--output", str(out), "--resume", "--no-progress"]
    done = run_train_torchrun(again) if resumed == 2 else run_train(again)
    assert done.returncode == 0, done.stderr[-3000:]
    total = 2 * steps[resumed]
    records = run_records(out)
    assert [r["epoch"] for r in records] == [1, 2]
    # Epoch 1 as the starting processes trained it, epoch 2 ending where the cosine ends: --min-lr, after all of
    # this invocation's steps (the saved step count kept as it was left 2->1 at 3/4 of the cosine, 7.6e-4, and
    # ran 1->2 past its end).
    assert records[0]["lr"] == pytest.approx(_cosine(steps[started], 2 * steps[started], max(1, steps[started] // 2)))
    assert records[1]["lr"] == pytest.approx(MIN_LR, rel=1e-9)
    assert training_state(out)["scheduler"]["last_epoch"] == total


# ------------------------------------------------------------------------------------------------ 2. --overwrite
def test_overwrite_removes_the_weight_average_of_the_run_it_replaces(few_digits, tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *common_args(few_digits, tiny_config, out, epochs=1), "--ema", "0.9"]) == 0
    assert (out / "ema" / "model.safetensors").is_file()
    (out / ".ema.old").mkdir()  # what a kill between the two renames of its swap leaves
    assert main(["train", *common_args(few_digits, tiny_config, out, epochs=1), "--overwrite"]) == 0
    capsys.readouterr()
    # The new run keeps no average: an ema/ left there was the replaced run's weights under this run's name.
    assert sorted(p.name for p in out.iterdir()) == ["best", "curves.png", "last", "metrics.jsonl", "run.json"]
    assert [r["epoch"] for r in run_records(out)] == [1] and "ema_val_top1" not in run_records(out)[0]


def test_overwrite_of_a_folder_that_holds_no_run_removes_nothing_of_it(few_digits, tiny_config, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "best").mkdir(parents=True)
    (out / "best" / "thesis.txt").write_text("precious")  # a folder of the user's, named as a run's checkpoint
    (out / "notes.txt").write_text("mine too")
    code = main(["train", *common_args(few_digits, tiny_config, out, epochs=1), "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    # It used to train, after removing best/ with the thesis in it: --overwrite removes a run, and none was there.
    assert code == 2 and len(err) == 1 and "holds no training run" in err[0] and "'notes.txt'" in err[0], err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["best", "best/thesis.txt", "notes.txt"]
    assert (out / "best" / "thesis.txt").read_text() == "precious"


def test_overwrite_finishes_what_an_interrupted_overwrite_left(few_digits, tiny_config, tmp_path, capsys):
    """A run's own files without its run.json (an --overwrite killed between its removals) are still replaced."""
    out = tmp_path / "run"
    assert main(["train", *common_args(few_digits, tiny_config, out, epochs=1)]) == 0
    (out / "run.json").unlink()
    (out / "last").rename(out / ".last.tmp")
    assert main(["train", *common_args(few_digits, tiny_config, out, epochs=1), "--overwrite"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["best", "curves.png", "last", "metrics.jsonl", "run.json"]
    assert [r["epoch"] for r in run_records(out)] == [1]


# ------------------------------------------------------------------------------------------------ 3. run folders
def test_a_last_checkpoint_of_another_architecture_is_refused_by_name(few_digits, tiny_config, tmp_path, capsys):
    """last/'s weights swapped for those of a narrower model with the same classes (a copy from another run)."""
    narrow = tmp_path / "narrow.json"
    narrow.write_text(json.dumps({**json.loads(Path(tiny_config).read_text()), "hidden_sizes": [8, 16, 24, 32],
                                  "num_attention_heads": [1, 1, 1, 1]}))
    other, out = tmp_path / "other", tmp_path / "run"
    assert main(["train", *common_args(few_digits, str(narrow), other, epochs=1)]) == 0
    assert main(["train", *common_args(few_digits, tiny_config, out, epochs=1)]) == 0
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "epochs": 2}))  # a run stopped after its first epoch
    for name in ("config.json", "model.safetensors"):
        (out / "last" / name).write_bytes((other / "last" / name).read_bytes())
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    code = main(["train", "--output", str(out), "--resume", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    # It used to load them, restore the optimizer state of the wider model over them and stop at its first step
    # with a traceback: "The size of tensor a (16) must match the size of tensor b (8)".
    assert code == 2 and len(err) == 1, err
    assert "does not fit the model" in err[0] and str(out / "last") in err[0] and "--overwrite" in err[0]
    assert (out / "metrics.jsonl").read_text() == before and len(before.splitlines()) == 1
    assert not (out / "run.lock").exists()


def test_images_added_under_resume_are_said_and_the_schedule_still_ends_at_min_lr(few_digits, tiny_config, tmp_path,
                                                                                  capsys, caplog):
    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(few_digits, data)
    assert main(["train", *common_args(data, tiny_config, out, epochs=1)]) == 0
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "epochs": 2}))  # a run stopped after its first epoch
    for folder in sorted((data / "train").iterdir()):  # 40 more training images: 160, 10 batches of 16
        for i, image in enumerate(sorted(folder.iterdir())[:4]):
            shutil.copy(image, folder / f"more_{i}.png")
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        assert main(["train", "--output", str(out), "--resume", "--no-progress"]) == 0
    capsys.readouterr()
    said = [r.getMessage() for r in caplog.records if "step(s) per epoch" in r.getMessage()]
    assert len(said) == 1 and "made 8 optimizer step(s) per epoch, this invocation makes 10" in said[0], said
    assert "step 10 of 20" in said[0]
    # The cosine of this invocation's 20 steps, continued from step 10: it ends at --min-lr (the saved step 8, kept,
    # ended it at step 18 of 20, above it).
    assert training_state(out)["scheduler"]["last_epoch"] == 20
    assert [r["epoch"] for r in run_records(out)] == [1, 2]
    assert run_records(out)[1]["lr"] == pytest.approx(MIN_LR, rel=1e-9)


@pytest.mark.parametrize("inside", ["best", "last", "last/model.safetensors"])
def test_overwrite_refuses_to_remove_the_checkpoint_it_starts_from(few_digits, tiny_config, tmp_path, capsys, inside):
    out = tmp_path / "run"
    assert main(["train", *common_args(few_digits, tiny_config, out, epochs=1)]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    code = main(["train", *common_args(few_digits, str(out / inside), out, epochs=1), "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    # It used to remove them before the first epoch ended: a run killed then could not be resumed ("not in the
    # Hugging Face cache"), or, killed between its best/ and last/ writes, started again from its own best/.
    assert code == 2 and len(err) == 1 and "--model" in err[0] and "--overwrite" in err[0], err
    assert str(out / inside) in err[0]
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# ------------------------------------------------------------------------------------------------ 4. NaN weights
# The tiny model at 16 px sees a 1x1 grid in its last stage: the corner taps of that stage's 3x3 patch embedding
# only ever meet padding, so NaN there leaves every output (and the loss) finite. PyTorch's bfloat16 convolution on
# CPUs returns NaN gradients in such taps now and then; this puts one there at step 11 (epoch 2), as it did.
_HIDDEN = "pvt_v2.encoder.layers.3.patch_embedding.proj.weight"


def test_weights_that_became_nan_with_a_finite_loss_stop_the_run_before_they_are_saved(
        few_digits, tiny_config, reference, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    steps, original = [], engine._optimizer_step

    def poisoned(cfg, training):
        steps.append(1)
        if len(steps) == 11:
            dict(training.model.named_parameters())[_HIDDEN].grad[0, 0, 0, 0] = float("nan")
        original(cfg, training)

    with monkeypatch.context() as patch:
        patch.setattr(engine, "_optimizer_step", poisoned)
        code = main(["train", *common_args(few_digits, tiny_config, out, epochs=2)])
    err = capsys.readouterr().err.strip().splitlines()
    # It used to finish ("trained 2 epochs", top-1 as if nothing happened) and save the NaN weights as last/ and
    # best/, which --resume then refused and inference on larger images turned into NaN.
    assert code == 2 and len(err) == 1, err
    assert "NaN or infinite" in err[0] and _HIDDEN in err[0] and "epoch 2" in err[0], err
    assert training_state(out)["epoch"] == 1 and [r["epoch"] for r in run_records(out)] == [1]
    weights = load_file(out / "last" / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())
    # The intact epoch-1 checkpoint resumes to the uninterrupted run's weights.
    assert main(["train", "--output", str(out), "--resume", "--no-progress"]) == 0
    capsys.readouterr()
    _same_as(out, reference)


# ------------------------------------------------------------------------------------------------ 5. SIGTERM
def test_sigterm_stops_the_run_as_ctrl_c_does_leaving_no_lock(few_digits, tiny_config, reference, tmp_path, capsys,
                                                              monkeypatch):
    """SIGTERM is how kill, schedulers (SLURM's preemption) and torchrun stop a run. It used to end the process at
    once, leaving run.lock: the same host takes it over, but a job requeued on another host was refused."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("this test process handles SIGTERM itself, and train() leaves a caller's handler alone")
    out = tmp_path / "run"
    calls, original = [], ClassificationTask.training_loss

    def terminated(self, model, batch, ctx):
        calls.append(1)
        if len(calls) == 11:  # the 3rd batch of epoch 2
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, model, batch, ctx)

    with monkeypatch.context() as patch:
        patch.setattr(ClassificationTask, "training_loss", terminated)
        with pytest.raises(SystemExit) as stopped:
            main(["train", *common_args(few_digits, tiny_config, out, epochs=2)])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the process's own handling, given back
    assert not (out / "run.lock").exists()
    assert sorted(p.name for p in out.iterdir()) == ["best", "curves.png", "last", "metrics.jsonl", "run.json"]
    assert training_state(out)["epoch"] == 1 and [r["epoch"] for r in run_records(out)] == [1]
    assert main(["train", "--output", str(out), "--resume", "--no-progress"]) == 0
    capsys.readouterr()
    _same_as(out, reference)
