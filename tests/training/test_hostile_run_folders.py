"""`pvtv2 train --resume` on a run folder whose last checkpoint is damaged, or which was killed with kill -9 while it
wrote that checkpoint: damage is named in one line (with the way out), a kill resumes from the last whole
checkpoint to the weights of an uninterrupted run."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pvtv2.cli import main
from pvtv2.training.engine import KILL_ENV

from training_fixtures import ENV, common_args, run_train, same_weights

pytest_plugins = ["training_fixtures"]


@pytest.fixture(scope="module")
def finished(few_digits, tiny_config, tmp_path_factory) -> Path:
    """A two-epoch run; with its run.json saying three epochs it is one that stopped after its second."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *common_args(few_digits, tiny_config, out)]) == 0
    return out


def _unfinished(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "run.json").write_text(json.dumps({**json.loads((out / "run.json").read_text()), "epochs": 3}))
    return out


def _nan_weights(last: Path) -> None:
    weights = load_file(last / "model.safetensors")
    save_file({k: v * float("nan") for k, v in weights.items()}, last / "model.safetensors", metadata={"format": "pt"})


DAMAGE = {
    # It used to resume with a new, randomly initialised model that the restored optimizer state went on training.
    "config.json missing": (lambda last: (last / "config.json").unlink(), r"config\.json' is missing"),
    "model.safetensors truncated": (lambda last: (last / "model.safetensors").write_bytes(
        (last / "model.safetensors").read_bytes()[:4000]), "is not a readable safetensors file"),
    "model.safetensors missing": (lambda last: (last / "model.safetensors").unlink(), "no weights in folder"),
    "config.json not JSON": (lambda last: (last / "config.json").write_text("{\"depths\": [1,"), "not valid JSON"),
    # It used to resume, diverge at its first step and call this checkpoint "intact".
    "NaN weights": (_nan_weights, "NaN or infinite weights"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_last_checkpoint_is_named_with_the_way_out(finished, tmp_path, capsys, damage):
    out = _unfinished(finished, tmp_path)
    make, says = DAMAGE[damage]
    make(out / "last")
    code = main(["train", "--output", str(out), "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"pvtv2 train: error: the last checkpoint {str(out / 'last')!r} cannot be loaded: "), err
    assert re.search(says, line) and line.endswith("the run cannot be resumed from it: pass --overwrite to start again")
    assert torch.load(out / "last" / "training_state.pt", weights_only=True)["epoch"] == 2  # nothing was trained


def test_a_last_folder_without_its_state_starts_again_and_says_so(finished, few_digits, tiny_config, tmp_path, capsys,
                                                                     caplog):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "last" / "training_state.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        code = main(["train", "--output", str(out), "--resume", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    said = [r.getMessage() for r in caplog.records if "training_state.pt" in r.getMessage()]
    assert said == [f"{str(out / 'last')!r} holds no training_state.pt: the run cannot continue from it and starts "
                    f"again from its first epoch"]
    assert same_weights(out / "last", finished / "last")  # started again, it ends where the first run ended
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.fixture(scope="module")
def uninterrupted(few_digits, tiny_config, tmp_path_factory) -> Path:
    """The two-epoch run in a subprocess, as the killed ones run (with one thread: the same numbers, bit for bit)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_train(common_args(few_digits, tiny_config, out))
    assert result.returncode == 0, result.stderr
    return out


# kill -9 inside the epoch-2 checkpoint swap of a two-epoch run resumed from its epoch-1 checkpoint.
_KILL = """
import os, signal, sys
import pvtv2.fileio as fileio
import pvtv2.models.modeling as modeling
WHERE = {where!r}
replace, save = fileio.os.replace, modeling.PvtV2PreTrainedModel.save_pretrained
def killing_replace(src, dst):
    replace(src, dst)
    if WHERE == "between the renames" and str(dst).endswith(".last.old"):
        os.kill(os.getpid(), signal.SIGKILL)  # last/ moved aside, the new one not yet in place
def killing_save(self, folder, *args, **kwargs):
    save(self, folder, *args, **kwargs)
    if WHERE == "mid-write" and str(folder).endswith(".last.tmp"):
        os.kill(os.getpid(), signal.SIGKILL)  # weights written, training state not yet
fileio.os.replace = killing_replace
modeling.PvtV2PreTrainedModel.save_pretrained = killing_save
from pvtv2.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["mid-write", "between the renames"])
def test_kill_9_while_writing_a_checkpoint_resumes_from_the_last_whole_one(few_digits, tiny_config, uninterrupted,
                                                                          tmp_path, where):
    out = tmp_path / "run"
    args = common_args(few_digits, tiny_config, out, epochs=2)
    first = run_train(args, env={**ENV, KILL_ENV: "12"})  # killed in epoch 2 (8 batches an epoch)
    assert first.returncode == -9, first.stderr[-2000:]
    resume = ["--output", str(out), "--resume", "--no-progress"]
    killed = subprocess.run([sys.executable, "-c", _KILL.format(where=where), *resume], env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith(".last"))
    assert leftovers == ([".last.tmp"] if where == "mid-write" else [".last.old", ".last.tmp"])
    resumed = run_train(resume)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr and "after epoch 1 of 2" in resumed.stderr
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    # The same weights as the run that was never interrupted.
    assert same_weights(out / "last", uninterrupted / "last")
    assert same_weights(out / "best", uninterrupted / "best")
