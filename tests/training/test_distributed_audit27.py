"""An audit of `pvtv2 train` under torchrun (2 CPU processes, gloo) for every task, each run compared with something
that does not depend on the code under test: a run in one process, an uninterrupted run, a single-process evaluation
of the saved weights.

What differs by design, and is not asserted equal here: a training set that does not split evenly between the
processes is padded by repeating samples (DistributedSampler's way, docs/training.md "Deterministic resumption"), so
2 processes x batch b then train (and count in ``train_loss``) one or more images twice where 1 process x batch 2b
does not; stochastic depth draws from each process's own generator, so the runs below that compare with one process
train without it. Validation shards are not padded: every image counts once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_SMALL_IMAGES
from pvtv2.data.digits import write_digits_folder
from pvtv2.data.folders import EvalTransform, ImageFolder, scan_split
from pvtv2.data.scenes import make_depth_example
from pvtv2.data.shapes import make_segmentation_example
from pvtv2.models.depth import PvtV2ForDepthEstimation
from pvtv2.models.modeling import PvtV2ForImageClassification
from pvtv2.training import TrainConfig
from pvtv2.training.classification import evaluate_classifier
from pvtv2.training.depth_task import DepthTask
from pvtv2.training.distributed import DistInfo
from pvtv2.training.engine import KILL_ENV, RunContext
from training_fixtures import ENV, run_records, run_train, run_train_torchrun

SIZE = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("arch") / "tiny.json"
    path.write_text(json.dumps(TINY_SMALL_IMAGES))  # LayerNorm only: no BatchNorm statistics per process
    return str(path)


@pytest.fixture(scope="module")
def twenty(tmp_path_factory) -> Path:
    """20 training digits (2 per class) and 10 validation ones at 16 px."""
    root = tmp_path_factory.mktemp("twenty")
    write_digits_folder(root, size=SIZE, limit_per_class=3, val_fraction=0.34, seed=3)
    assert len(scan_split(root, "train")[1]) == 20 and len(scan_split(root, "val")[1]) == 10
    return root


def _args(data: Path, model: str, out: Path, batch: int, *extra: str, epochs: int = 2) -> list[str]:
    return ["--data", str(data), "--model", model, "--output", str(out), "--epochs", str(epochs), "--image-size",
            str(SIZE), "--batch-size", str(batch), "--lr", "3e-3", "--warmup-epochs", "1", "--crop-scale", "0.7",
            "--no-progress", *extra]


def _weights(out: Path, folder: str = "last") -> dict[str, torch.Tensor]:
    return load_file(out / folder / "model.safetensors")


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _torchrun_script(script: Path, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               *args]
    return subprocess.run(command, env=env or ENV, capture_output=True, text=True, timeout=300, check=False)


# ------------------------------------------------------------------------------------------------ 1. 2 x b == 1 x 2b
# 20 images: one process in batches of 8 reads 8 + 8 + 4, two processes in batches of 4 read 4 + 4 + 2 each, the
# same images in each step (process r takes every 2nd of the same shuffled order); with --grad-accum 2, 4 + 4 | 4 + 4
# | 4 (a short last group) against 2 + 2 | 2 + 2 | 2 in each process. No stochastic depth, no flip: the crops are a
# function of (seed, epoch, sample) alone.
@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_two_processes_of_batch_b_end_with_the_weights_of_one_of_batch_2b(twenty, tiny, tmp_path, accum):
    plain = ["--drop-path", "0", "--hflip", "0", "--grad-accum", str(accum)]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_train(_args(twenty, tiny, one, 8 // accum, *plain)).returncode == 0
    done = run_train_torchrun(_args(twenty, tiny, two, 4 // accum, *plain))
    assert done.returncode == 0, done.stderr[-3000:]
    # measured 8e-6 (1) and 2e-5 (2): AdamW's normalised steps amplifying float32 roundings, on weights up to 1.9
    difference = _max_difference(_weights(one), _weights(two))
    assert difference < 1e-4, difference
    for a, b in zip(run_records(one), run_records(two)):
        assert (a["epoch"], a["val_top1"], a["lr"]) == (b["epoch"], b["val_top1"], b["lr"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)


# ------------------------------------------------------------------------------------------------ 2. uneven shards
@pytest.mark.slow
def test_uneven_validation_shards_score_as_one_process_scores_the_saved_weights(twenty, tiny, tmp_path):
    """19 training images (one of them trained twice, by design) and 11 validation ones: shards of 6 and 5."""
    data = tmp_path / "data"
    for split in ("train", "val"):
        for path in sorted((twenty / split).rglob("*.png")):
            (data / path.relative_to(twenty)).parent.mkdir(parents=True, exist_ok=True)
            (data / path.relative_to(twenty)).write_bytes(path.read_bytes())
    min((data / "train").rglob("*.png")).unlink()
    extra = min((data / "val" / "1").glob("*.png"))
    (data / "val" / "1" / "extra.png").write_bytes(extra.read_bytes())
    out = tmp_path / "run"
    done = run_train_torchrun(_args(data, tiny, out, 2, "--grad-accum", "2", epochs=1))
    assert done.returncode == 0, done.stderr[-3000:]
    record = run_records(out)[-1]
    model = PvtV2ForImageClassification.from_pretrained(out / "last").eval()
    samples = scan_split(data, "val")[1]
    assert len(samples) == 11
    loader = torch.utils.data.DataLoader(ImageFolder(samples, EvalTransform(SIZE)), batch_size=11)
    loss, top1, top5, count = evaluate_classifier(model, loader, torch.device("cpu"))
    assert count == 11
    assert record["val_top1"] == pytest.approx(100 * top1 / 11, abs=1e-9)
    assert record["val_top5"] == pytest.approx(100 * top5 / 11, abs=1e-9)
    assert record["val_loss"] == pytest.approx(loss / 11, abs=1e-6)


# ------------------------------------------------------------------------------------------------ 3. SIGKILL, writes
# The wrapper runs `pvtv2 train` as torchrun's worker: it keeps PVTV2_TEST_KILL_AT_STEP in the processes that
# KILL_RANKS names only, and records in OUT.writes.<rank> every write of the run folder a process makes.
_WRAPPER = '''
import os, sys
from pvtv2.training import engine
if os.environ["RANK"] not in os.environ.get("KILL_RANKS", "").split(","):
    os.environ.pop(engine.KILL_ENV, None)
log = os.environ["WRITES_LOG"] + "." + os.environ["RANK"]

def spy(name, original):
    def call(*args, **kwargs):
        with open(log, "a") as file:
            file.write(name + "\\n")
        return original(*args, **kwargs)
    return call

engine.save_checkpoint = spy("save_checkpoint", engine.save_checkpoint)
engine.write_metrics = spy("write_metrics", engine.write_metrics)
engine.draw_curves = spy("draw_curves", engine.draw_curves)
from pvtv2.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
'''


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("wrapper") / "train_worker.py"
    path.write_text(_WRAPPER)
    return path


@pytest.fixture(scope="module")
def uninterrupted(twenty, tiny, wrapper, tmp_path_factory) -> Path:
    """Two epochs of 5 batches of 2 in each of two processes, stochastic depth, flips and a weight average on."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = _torchrun_script(wrapper, _args(twenty, tiny, out, 2, "--drop-path", "0.1", "--hflip", "0.5", "--ema",
                                           "0.9"), {**ENV, "WRITES_LOG": str(out) + ".writes"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_only_rank_0_writes_the_run_folder(uninterrupted):
    # 2 epochs: last/ and ema/ each time, best/ when the score improved, metrics and curves each time
    writes = Path(str(uninterrupted) + ".writes.0").read_text().splitlines()
    assert writes.count("write_metrics") == 2 and writes.count("draw_curves") == 2
    assert 4 <= writes.count("save_checkpoint") <= 6
    assert not Path(str(uninterrupted) + ".writes.1").exists()
    assert [r["epoch"] for r in run_records(uninterrupted)] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("killed", ["1", "0,1"], ids=["rank 1", "all ranks"])
def test_a_rank_killed_mid_epoch_resumes_to_the_uninterrupted_weights(twenty, tiny, wrapper, uninterrupted,
                                                                     tmp_path, killed):
    out = tmp_path / "run"
    env = {**ENV, KILL_ENV: "7", "KILL_RANKS": killed, "WRITES_LOG": str(out) + ".writes"}  # batch 2 of epoch 2
    stopped = _torchrun_script(wrapper, _args(twenty, tiny, out, 2, "--drop-path", "0.1", "--hflip", "0.5", "--ema",
                                              "0.9"), env)
    assert stopped.returncode != 0 and [r["epoch"] for r in run_records(out)] == [1]
    done = run_train_torchrun(["--output", str(out), "--resume", "--no-progress"])
    assert done.returncode == 0, done.stderr[-3000:]
    for folder in ("last", "best", "ema"):
        expected, got = _weights(uninterrupted, folder), _weights(out, folder)
        assert all(torch.equal(expected[k], got[k]) for k in expected), folder
    fields = ("epoch", "train_loss", "val_top1", "val_top5", "ema_val_top1", "lr")
    assert [[r[f] for f in fields] for r in run_records(out)] == [[r[f] for f in fields]
                                                                  for r in run_records(uninterrupted)]
    # the validation loss to float32 rounding: a process's evaluation after two epochs in memory and after one
    # loaded from last/ differ in the last bits (the same weights, bit for bit)
    for a, b in zip(run_records(out), run_records(uninterrupted)):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)


# ------------------------------------------------------------------------------------------------ 4. --val-split
@pytest.mark.slow
def test_val_split_under_torchrun_scores_the_split_as_one_process_does(twenty, tiny, tmp_path):
    data = tmp_path / "data"
    for path in sorted((twenty / "train").rglob("*.png")):
        (data / path.relative_to(twenty)).parent.mkdir(parents=True, exist_ok=True)
        (data / path.relative_to(twenty)).write_bytes(path.read_bytes())
    one, two = tmp_path / "one", tmp_path / "two"
    flags = ["--val-split", "0.3", "--drop-path", "0", "--hflip", "0"]
    assert run_train(_args(data, tiny, one, 4, *flags, epochs=1)).returncode == 0
    done = run_train_torchrun(_args(data, tiny, two, 2, *flags, epochs=1))
    assert done.returncode == 0, done.stderr[-3000:]
    # both processes carved the same split: the same weights as one process, the same validation images scored
    assert _max_difference(_weights(one), _weights(two)) < 1e-4
    a, b = run_records(one)[-1], run_records(two)[-1]
    assert (a["val_top1"], a["val_top5"]) == (b["val_top1"], b["val_top5"])
    assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)


# ------------------------------------------------------------------------------------------------ 5. data per rank
# Every machine reads its own copy of --data. Process 1 here lists one training image fewer (a file missing on its
# machine): the processes shuffled different lists, trained some images twice and others never, and the run
# finished without a word.
_FEWER = '''
import os, sys
if os.environ["RANK"] == "1":
    from pvtv2.training import classification
    scan = classification.scan_split
    def fewer(root, split):
        classes, samples = scan(root, split)
        return classes, samples[:-1] if split == "train" else samples
    classification.scan_split = fewer
from pvtv2.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
'''


@pytest.mark.slow
def test_processes_that_read_different_datasets_are_refused(twenty, tiny, tmp_path):
    script = tmp_path / "fewer.py"
    script.write_text(_FEWER)
    out = tmp_path / "run"
    done = _torchrun_script(script, _args(twenty, tiny, out, 2, epochs=1))
    assert done.returncode != 0
    assert "process 0 has 20 training images" in done.stderr and "process 1 has 19 training images" in done.stderr, done.stderr[-3000:]
    assert not (out / "metrics.jsonl").exists() and not (out / "last").exists()


# ------------------------------------------------------------------------------------------------ 6. dense tasks
@pytest.mark.slow
def test_segmentation_mean_iou_under_torchrun_is_that_of_pvtv2_eval(tmp_path):
    """7 validation images: shards of 4 and 3; the decode head's BatchNorm statistics differ per process."""
    data = make_segmentation_example(tmp_path / "shapes", n_train=12, n_val=7, size=32, seed=4)
    out = tmp_path / "run"
    done = run_train_torchrun(["--task", "segmentation", "--data", str(data), "--model", "tiny", "--output", str(out),
                               "--epochs", "1", "--image-size", "32", "--batch-size", "2", "--lr", "1e-3",
                               "--warmup-epochs", "0", "--ema", "0.5", "--no-progress"])
    assert done.returncode == 0, done.stderr[-3000:]
    record = run_records(out)[-1]
    for folder, prefix in (("last", ""), ("ema", "ema_")):  # the weight average's BatchNorm statistics too
        evaluated = subprocess.run([sys.executable, "-m", "pvtv2", "eval", "--task", "segmentation", "-m",
                                    str(out / folder), "--data", str(data), "--json", "--no-progress"], env=ENV,
                                   capture_output=True, text=True, timeout=300, check=True)
        got = json.loads(evaluated.stdout)
        assert got["images"] == 7 and record[f"{prefix}mean_iou"] > 0  # measured 0.156: no 0 == 0
        assert record[f"{prefix}mean_iou"] == pytest.approx(got["mean_iou"], abs=1e-9)
        assert record[f"{prefix}pixel_accuracy"] == pytest.approx(got["pixel_accuracy"], abs=1e-9)
        assert record[f"{prefix}per_class_iou"] == pytest.approx(list(got["per_class_iou"].values()), abs=1e-9)


@pytest.mark.slow
def test_depth_metrics_under_torchrun_are_those_of_the_saved_weights(tmp_path):
    """5 validation images: process 0 scores 0, 2, 4 and process 1 scores 1, 3 in batches of 2. The decoder's
    BatchNorm statistics of process 1 (its own last training batch) are not the saved ones (process 0's): process 1
    scored its shard with weights that were never saved (abs_rel, delta1 off in the 4th digit, the loss by 1%)."""
    data = make_depth_example(tmp_path / "rooms", n_train=10, n_val=5, size=64, seed=3)
    out = tmp_path / "run"
    done = run_train_torchrun(["--task", "depth", "--data", str(data), "--model", "tiny", "--output", str(out),
                               "--epochs", "1", "--image-size", "64", "--batch-size", "2", "--lr", "1e-3",
                               "--warmup-epochs", "0", "--no-progress"])
    assert done.returncode == 0, done.stderr[-3000:]
    record = run_records(out)[-1]
    cfg = TrainConfig(task="depth", data=str(data), model="tiny", image_size=64, batch_size=2, output=str(tmp_path / "x"))
    task = DepthTask(cfg)
    task.load_data()
    model = PvtV2ForDepthEstimation.from_pretrained(out / "last")
    ctx = RunContext(torch.device("cpu"), False, DistInfo())

    def scored(indices: list[int]) -> dict:
        loader = torch.utils.data.DataLoader(task.val_set, batch_size=2, sampler=indices, collate_fn=task.collate)
        return task.evaluate(model, loader, ctx)

    whole, shard0, shard1 = scored(list(range(5))), scored([0, 2, 4]), scored([1, 3])
    assert record["images"] == whole["images"] == 5
    for name in ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3"):
        assert record[name] == pytest.approx(whole[name], rel=1e-6, abs=1e-9), name
    # the loss is a batch's SILog, so it is that of the same batches: the shards' batches of 2
    assert record["val_loss"] == pytest.approx((3 * shard0["val_loss"] + 2 * shard1["val_loss"]) / 5, rel=1e-6)


# ------------------------------------------------------------------------------------------------ 7. one rank fails
# Process 1 cannot read an image in epoch 2 (a file damaged on its machine after the scan): the run stops, process 0
# with it (torchrun ends the others), the lock is released, epoch 1's checkpoint stays whole and --resume finishes.
_BROKEN = '''
import os, sys
if os.environ["RANK"] == "1":
    from pvtv2.data import folders
    read = folders.ImageFolder.__getitem__
    def broken(self, index):
        if getattr(self, "epoch", 0) == 1 and isinstance(self.transform, folders.TrainTransform):
            raise OSError(f"cannot read {self.samples[index][0]!r}: damaged on this machine")
        return read(self, index)
    folders.ImageFolder.__getitem__ = broken
from pvtv2.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
'''


@pytest.mark.slow
def test_a_rank_that_fails_stops_the_run_and_it_resumes(twenty, tiny, tmp_path):
    script = tmp_path / "broken.py"
    script.write_text(_BROKEN)
    out = tmp_path / "run"
    stopped = _torchrun_script(script, _args(twenty, tiny, out, 2))
    assert stopped.returncode != 0 and "damaged on this machine" in stopped.stderr, stopped.stderr[-3000:]
    assert [r["epoch"] for r in run_records(out)] == [1] and not (out / "run.lock").exists()
    assert sorted(p.name for p in out.iterdir()) == ["best", "curves.png", "last", "metrics.jsonl", "run.json"]
    done = run_train_torchrun(["--output", str(out), "--resume", "--no-progress"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["epoch"] for r in run_records(out)] == [1, 2]


# ------------------------------------------------------------------------------------------------ 8. other count
@pytest.mark.slow
def test_a_two_process_run_resumed_by_one_says_so_and_keeps_its_first_epoch(twenty, tiny, wrapper, uninterrupted,
                                                                            tmp_path):
    out = tmp_path / "run"
    env = {**ENV, KILL_ENV: "7", "KILL_RANKS": "0,1", "WRITES_LOG": str(out) + ".writes"}
    stopped = _torchrun_script(wrapper, _args(twenty, tiny, out, 2, "--drop-path", "0.1", "--hflip", "0.5", "--ema",
                                              "0.9"), env)
    assert stopped.returncode != 0
    done = run_train(["--output", str(out), "--resume", "--no-progress"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained by 2 process(es), this one by 1" in done.stderr, done.stderr[-3000:]
    # epoch 1 as the two processes trained it (the uninterrupted run's), epoch 2 by one process: 10 batches of 2
    # where the two made 5 steps of 2 x 2, ending at --min-lr all the same
    records, reference = run_records(out), run_records(uninterrupted)
    assert records[0] == {**reference[0], "seconds": records[0]["seconds"],
                          "images_per_second": records[0]["images_per_second"]}
    assert [r["epoch"] for r in records] == [1, 2] and records[1]["lr"] == pytest.approx(1e-5, rel=1e-9)
    assert not all(torch.equal(a, b) for a, b in zip(_weights(out).values(), _weights(uninterrupted).values()))
