"""`pvtv2 train` resumed as a hostile user would, second pass over the resume changes of round 26: a run without --lr
(its peak rate scaled with the global batch) resumed by another number of processes, and more. Each resumed run is
compared with numbers that do not depend on the code under test: the closed form of the learning rate schedule."""

from __future__ import annotations

import math
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from pvtv2.cli import main
from training_fixtures import ENV, common_args, run_records, run_train, run_train_torchrun, training_state

# The fixtures tiny_config and few_digits.
pytest_plugins = ["training_fixtures"]

MIN_LR = 1e-5  # the default --min-lr





# ------------------------------------------------------------------------------------------------ 1. default --lr
# few_digits: 120 training images, batches of 16: 4 steps an epoch in each of two processes, 8 in one. Without --lr
# the peak rate is classification's 5e-4 * global batch / 512: 3.125e-5 for two processes' 32 images.
@pytest.mark.slow
def test_a_run_without_lr_resumed_by_fewer_processes_still_ends_at_min_lr(few_digits, tiny_config, tmp_path):
    out = tmp_path / "run"
    args = ["--data", str(few_digits), "--model", tiny_config, "--output", str(out), "--epochs", "3",
            "--image-size", "16", "--batch-size", "16", "--warmup-epochs", "1", "--hflip", "0", "--no-progress"]
    killed = run_train_torchrun(args, {**ENV, "PVTV2_TEST_KILL_AT_STEP": "6"})  # the 2nd batch of epoch 2
    assert killed.returncode != 0
    peak = 5e-4 * 32 / 512
    assert training_state(out)["epoch"] == 1 and training_state(out)["scheduler"]["base_lrs"] == [pytest.approx(peak)] * 2
    again = ["--output", str(out), "--resume", "--no-progress"]
    # One process trains epoch 2 and is killed in epoch 3 (its 2nd batch: 8 + 8 + 2); one process finishes the run.
    killed = run_train(again, env={**ENV, "PVTV2_TEST_KILL_AT_STEP": "18"})
    assert killed.returncode != 0 and training_state(out)["epoch"] == 2, killed.stderr[-3000:]
    done = run_train(again)
    assert done.returncode == 0, done.stderr[-3000:]
    # The run goes on at its own peak rate (the optimizer's state), and the cosine of the last invocation's 24 steps
    # ends at --min-lr. It ended at 2e-5: --min-lr / peak was taken of one process's default peak, half the run's.
    records = run_records(out)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert training_state(out)["scheduler"]["last_epoch"] == 24
    assert training_state(out)["scheduler"]["base_lrs"] == [pytest.approx(peak)] * 2
    # Epoch 2 ends at step 16 of 24 (a warmup of 1 epoch, capped at a quarter: 6 steps), on the cosine from the run's peak to --min-lr (closed form).
    progress = (16 - 6) / (24 - 6)
    assert records[1]["lr"] == pytest.approx(MIN_LR + (peak - MIN_LR) * 0.5 * (1 + math.cos(math.pi * progress)))
    assert records[2]["lr"] == pytest.approx(MIN_LR, rel=1e-9)


# ------------------------------------------------------------------------------------------------ 2. NaN in --model
# The tiny model at 16 px sees a 1x1 grid in its last stage: the corner taps of that stage's 3x3 patch embedding only
# ever meet padding, so NaN there leaves the loss finite. Runs before the NaN weight check was added saved such
# weights as best/ and last/ (tests/training/test_hostile_resume26.py); this fine-tunes from one.
_HIDDEN = "pvt_v2.encoder.layers.3.patch_embedding.proj.weight"


def test_fine_tuning_from_nan_weights_is_refused_before_the_first_epoch(few_digits, tiny_config, tmp_path, capsys):
    source, out = tmp_path / "source", tmp_path / "run"
    assert main(["train", *common_args(few_digits, tiny_config, source, epochs=1)]) == 0
    weights = load_file(source / "best" / "model.safetensors")
    weights[_HIDDEN][0, 0, 0, 0] = float("nan")
    save_file(weights, source / "best" / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    code = main(["train", *common_args(few_digits, str(source / "best"), out, epochs=1)])
    err = capsys.readouterr().err.strip().splitlines()
    # It trained an epoch, then said the weights "became NaN or infinite in epoch 1" and advised a lower --lr, which
    # cannot help: they were NaN before the run began.
    assert code == 2 and len(err) == 1, err
    assert "--model" in err[0] and str(source / "best") in err[0] and _HIDDEN in err[0] and "NaN" in err[0], err
    assert "became" not in err[0] and not (out / "metrics.jsonl").exists() and not (out / "run.json").exists()


# ------------------------------------------------------------------------------------------------ 3. SIGTERM twice
# torchrun forwards the SIGTERM it gets to its workers, so a signal sent to the whole process group (a scheduler's
# preemption, kill -TERM -PGID) reaches each worker twice; people press the kill twice too. This script sends the
# second while the run is releasing its lock (deterministic stand-ins for "a little later").
_TWICE = """
import os, signal, sys
from pvtv2.cli import main
from pvtv2.training import rundir
from pvtv2.training.classification import ClassificationTask

calls, loss, release = [], ClassificationTask.training_loss, rundir.RunLock.release

def terminated(self, model, batch, ctx):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return loss(self, model, batch, ctx)

def released(self):
    os.kill(os.getpid(), signal.SIGTERM)  # the second signal
    release(self)

ClassificationTask.training_loss = terminated
rundir.RunLock.release = released
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_a_second_sigterm_while_the_run_cleans_up_still_releases_the_lock(few_digits, tiny_config, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", _TWICE, *common_args(few_digits, tiny_config, out, epochs=1)],
                          env=ENV, capture_output=True, text=True, timeout=120, check=False)
    # It died of the second signal (the default action, put back before the lock was released), leaving run.lock,
    # which a run requeued on another host cannot take over.
    assert done.returncode == 128 + signal.SIGTERM, (done.returncode, done.stderr[-2000:])
    assert not (out / "run.lock").exists()
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "run.json"]


# ------------------------------------------------------------------------------------------------ 4. --overwrite
def test_overwrite_replaces_what_a_run_killed_while_writing_a_file_left(few_digits, tiny_config, tmp_path, capsys):
    """A kill (SIGKILL, the OOM killer) during a run's atomic writes leaves their temporary files: a new run killed
    while writing run.json leaves ``.run.json.tmp`` alone, any run killed while writing its metrics
    ``.metrics.jsonl.tmp``. --overwrite refused the first as a folder of the user's own ('holds no training run but
    '.run.json.tmp''), and a plain run and --resume refuse it too: no flag started the run again. The second it left
    in the new run's folder."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".run.json.tmp").write_text('{"data": "/some/whe')
    (out / ".metrics.jsonl.tmp").write_text('{"epoch": 1, "train_lo')
    assert main(["train", *common_args(few_digits, tiny_config, out, epochs=1), "--overwrite"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["best", "curves.png", "last", "metrics.jsonl", "run.json"]
    assert [r["epoch"] for r in run_records(out)] == [1]
