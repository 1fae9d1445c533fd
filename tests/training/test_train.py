"""Training: the schedule, the head logic, and the real `pvtv2 train` command end to end (single process, killed and
resumed, two processes under torchrun), with its refusals for bad datasets and occupied output folders."""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from pvtv2 import PvtV2Config, PvtV2ForImageClassification
from pvtv2.cli import main
from pvtv2.data.processing import PvtV2ImageProcessor
from pvtv2.training import TrainConfig
from pvtv2.training.classification import build_classifier
from pvtv2.training.engine import KILL_ENV, cosine_warmup_factor, parameter_groups
from conftest import TINY_SMALL_IMAGES
from training_fixtures import ENV, SIZE, common_args, run_train

# The fixtures tiny_config, digits and few_digits.
pytest_plugins = ["training_fixtures"]



def _accuracy(folder: Path, data: Path) -> float:
    """Top-1 of a saved checkpoint on the val split, computed here with the library's inference path only."""
    model = PvtV2ForImageClassification.from_pretrained(folder)
    processor = PvtV2ImageProcessor.from_pretrained(folder)
    correct = total = 0
    for class_dir in sorted((data / "val").iterdir()):
        paths = sorted(class_dir.glob("*.png"))
        with torch.no_grad():
            logits = model(processor([PIL.Image.open(p) for p in paths])["pixel_values"]).logits
        predicted = [model.config.id2label[i] for i in logits.argmax(-1).tolist()]
        correct += sum(p == class_dir.name for p in predicted)
        total += len(paths)
    return 100.0 * correct / total


# ------------------------------------------------------------------------------------------------ pieces
def test_cosine_warmup_matches_its_closed_form():
    total, warmup, floor = 100, 10, 0.01
    f = lambda s: cosine_warmup_factor(s, total_steps=total, warmup_steps=warmup, min_ratio=floor)  # noqa: E731
    assert [f(s) for s in range(warmup)] == pytest.approx([(s + 1) / 10 for s in range(warmup)])
    assert f(warmup) == pytest.approx(1.0)
    assert f(55) == pytest.approx(floor + (1 - floor) / 2)  # half-way through the cosine
    assert f(total) == pytest.approx(floor)
    # Against PyTorch's own schedulers: LinearLR for the warmup, then CosineAnnealingLR, stepped once per step.
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=floor)
    schedule = torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, cosine], milestones=[warmup])
    reference = []
    for _ in range(total):
        reference.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert [f(s) for s in range(total)] == pytest.approx(reference, abs=1e-9)
    assert cosine_warmup_factor(3, total_steps=10, warmup_steps=0) == pytest.approx(0.5 * (1 + math.cos(0.3 * math.pi)))


def test_weight_decay_spares_norms_and_biases():
    model = PvtV2ForImageClassification(PvtV2Config(**TINY_SMALL_IMAGES, num_labels=3))
    decay, no_decay = parameter_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("weight") and p.ndim > 1 for p in decay["params"])
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "classifier.bias" in skipped and any("layer_norm" in n and n.endswith("weight") for n in skipped)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def _checkpoint(tmp_path: Path, labels: list[str]) -> tuple[str, PvtV2ForImageClassification]:
    torch.manual_seed(0)
    model = PvtV2ForImageClassification(PvtV2Config(**TINY_SMALL_IMAGES, id2label=dict(enumerate(labels)))).eval()
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    return str(folder), model


def test_finetuning_replaces_the_head_when_the_class_count_differs(tmp_path, caplog):
    source, original = _checkpoint(tmp_path, ["a", "b", "c"])
    with caplog.at_level(logging.INFO, logger="pvtv2"):
        model = build_classifier(TrainConfig(model=source), ["x", "y"])
    assert model.classifier.weight.shape == (2, 64) and model.config.id2label == {0: "x", 1: "y"}
    assert "replacing the classifier head" in caplog.text
    torch.testing.assert_close(model.pvt_v2.state_dict(), original.pvt_v2.state_dict())


def test_finetuning_permutes_the_head_for_the_same_classes_in_another_order(tmp_path):
    source, original = _checkpoint(tmp_path, ["cat", "dog", "owl"])
    model = build_classifier(TrainConfig(model=source), ["owl", "cat", "dog"]).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, original(x).logits[:, [2, 0, 1]])
    assert model.config.id2label == {0: "owl", 1: "cat", 2: "dog"}


def test_finetuning_refuses_other_class_names_unless_told(tmp_path):
    source, original = _checkpoint(tmp_path, ["cat", "dog"])
    with pytest.raises(ValueError, match="--replace-head"):
        build_classifier(TrainConfig(model=source), ["car", "bus"])
    model = build_classifier(TrainConfig(model=source, replace_head=True), ["car", "bus"])
    assert model.config.id2label == {0: "car", 1: "bus"}
    assert not torch.equal(model.classifier.weight, original.classifier.weight)
    torch.testing.assert_close(model.pvt_v2.state_dict(), original.pvt_v2.state_dict())


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_train_command_learns_the_digits(digits, tiny_config, tmp_path):
    out = tmp_path / "run"
    result = run_train(common_args(digits, tiny_config, out, epochs=6))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert set(records[0]) >= {"epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "seconds", "images_per_second"}
    best = max(r["val_top1"] for r in records)
    assert best > 85.0, records  # chance is 10%; measured 96.25
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    # The best checkpoint, evaluated independently, scores what the run logged for it.
    assert _accuracy(out / "best", digits) == pytest.approx(best, abs=1e-6)
    assert _accuracy(out / "last", digits) == pytest.approx(records[-1]["val_top1"], abs=1e-6)
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["id2label"] == {str(i): str(i) for i in range(10)}
    assert json.loads((out / "best" / "preprocessor_config.json").read_text())["size"] == {"height": SIZE, "width": SIZE}
    state = torch.load(out / "last" / "training_state.pt", weights_only=True)
    assert state["epoch"] == 6 and state["best_top1"] == pytest.approx(best)
    # The lr of the last step is the cosine's floor region: below the peak, above zero.
    assert 0 < records[-1]["lr"] < 3e-3 * 0.05
    with PIL.Image.open(out / "curves.png") as curves:
        assert curves.size == (920, 320)
        assert len(np.unique(np.asarray(curves.convert("RGB")).reshape(-1, 3), axis=0)) > 4  # axes, text and coloured lines were drawn
    assert "trained 6 epochs" in result.stdout


@pytest.fixture(scope="module")
def uninterrupted(few_digits, tiny_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_train(common_args(few_digits, tiny_config, out, epochs=2))
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [3, 12])  # 8 batches per epoch: in the first epoch, and in the second
def test_a_killed_run_resumes_to_the_same_weights(few_digits, tiny_config, uninterrupted, tmp_path, kill_at):
    out = tmp_path / "run"
    args = common_args(few_digits, tiny_config, out, epochs=2)
    killed = run_train(args, env={**ENV, KILL_ENV: str(kill_at)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if kill_at > 8:
        assert torch.load(out / "last" / "training_state.pt", weights_only=True)["epoch"] == 1
    else:
        assert not (out / "last").exists()
    refused = run_train(args)
    assert refused.returncode == 2 and "--resume" in refused.stderr and "unfinished" in refused.stderr
    resumed = run_train(["--output", str(out), "--resume", "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    for folder in ("last", "best"):
        expected = load_file(uninterrupted / folder / "model.safetensors")
        got = load_file(out / folder / "model.safetensors")
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{folder}: {key} differs"
    expected_metrics = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    got_metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(expected_metrics, got_metrics, strict=True):
        assert (a["epoch"], a["train_loss"], a["val_top1"]) == (b["epoch"], b["train_loss"], b["val_top1"])


@pytest.mark.slow
def test_torchrun_two_processes(digits, tiny_config, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pvtv2", "train", *common_args(digits, tiny_config, out, epochs=4)]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]  # one writer
    assert result.stdout.count("trained 4 epochs") == 1
    assert max(r["val_top1"] for r in records) > 80.0, records  # measured 95.62
    # Metrics are reduced over both processes' shards: the logged accuracy is that of the whole val split.
    assert _accuracy(out / "last", digits) == pytest.approx(records[-1]["val_top1"], abs=1e-6)
    state = torch.load(out / "last" / "training_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # each rank's own generator


# ------------------------------------------------------------------------------------------------ refusals
def _main(args: list[str], capsys) -> tuple[int, str]:
    code = main(["train", *args])
    return code, capsys.readouterr().err


def test_overwrite_is_needed_to_replace_a_finished_run(few_digits, tiny_config, uninterrupted, tmp_path, capsys):
    finished = tmp_path / "finished"
    shutil.copytree(uninterrupted, finished)
    before = (finished / "last" / "model.safetensors").read_bytes()
    code, err = _main(common_args(few_digits, tiny_config, finished, epochs=2), capsys)
    assert code == 2 and "finished training run" in err and "--overwrite" in err
    assert (finished / "last" / "model.safetensors").read_bytes() == before
    code, _ = _main([*common_args(few_digits, tiny_config, finished, epochs=1), "--overwrite"], capsys)
    assert code == 0 and len((finished / "metrics.jsonl").read_text().splitlines()) == 1
    other = tmp_path / "occupied"
    other.mkdir()
    (other / "notes.txt").write_text("should stay")
    code, err = _main(common_args(few_digits, tiny_config, other, epochs=1), capsys)
    assert code == 2 and "not empty" in err


def test_class_mismatch_is_an_error_before_training(few_digits, tmp_path, capsys):
    source, _ = _checkpoint(tmp_path, [f"class_{i}" for i in range(10)])
    out = tmp_path / "run"
    code, err = _main(common_args(few_digits, source, out, epochs=1), capsys)
    assert code == 2 and "--replace-head" in err and "('class_0', '0')" in err
    assert not (out / "last").exists()


def test_bad_datasets_are_refused_with_clear_errors(few_digits, tiny_config, tmp_path, capsys):
    empty = tmp_path / "empty"
    for split in ("train", "val"):
        for name in ("a", "b"):
            (empty / split / name).mkdir(parents=True)
            PIL.Image.new("RGB", (SIZE, SIZE)).save(empty / split / name / "x.png")
    (empty / "train" / "c").mkdir()
    code, err = _main(common_args(empty, tiny_config, tmp_path / "r1", epochs=1), capsys)
    assert code == 2 and "['c']" in err and "no readable images" in err

    no_val = tmp_path / "noval"
    (no_val / "train" / "a").mkdir(parents=True)
    PIL.Image.new("RGB", (SIZE, SIZE)).save(no_val / "train" / "a" / "x.png")
    code, err = _main(common_args(no_val, tiny_config, tmp_path / "r2", epochs=1), capsys)
    assert code == 2 and "split 'val' not found" in err

    code, err = _main(common_args(tmp_path / "missing", tiny_config, tmp_path / "r3", epochs=1), capsys)
    assert code == 2 and "not found" in err


def test_unreadable_images_are_named_and_skipped(few_digits, tiny_config, tmp_path, caplog):
    data = tmp_path / "data"
    for split in ("train", "val"):
        for digit in ("0", "1"):
            target = data / split / digit
            target.mkdir(parents=True)
            for path in sorted((few_digits / split / digit).glob("*.png"))[:4]:
                target.joinpath(path.name).write_bytes(path.read_bytes())
    broken = data / "train" / "1" / "broken.png"
    broken.write_bytes((data / "train" / "1").glob("*.png").__next__().read_bytes()[:40])
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        code = main(["train", *common_args(data, tiny_config, tmp_path / "run", epochs=1)])
    assert code == 0
    assert any(str(broken) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert np.isfinite(json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["train_loss"])


@pytest.mark.slow
def test_gradient_accumulation_equals_the_larger_batch(few_digits, tiny_config, tmp_path):
    """Two accumulated batches of 8 make the step of one batch of 16 (same images, same order; no stochastic
    depth): the weights after an epoch agree to float rounding."""
    runs = {}
    for name, batch, accum in (("big", "16", "1"), ("accumulated", "8", "2")):
        args = common_args(few_digits, tiny_config, tmp_path / name, epochs=1)
        args[args.index("--batch-size") + 1] = batch
        args[args.index("--drop-path") + 1] = "0"
        result = run_train([*args, "--grad-accum", accum])
        assert result.returncode == 0, result.stderr
        runs[name] = load_file(tmp_path / name / "last" / "model.safetensors")
    for key, value in runs["big"].items():
        torch.testing.assert_close(runs["accumulated"][key], value, rtol=1e-4, atol=1e-5)
    losses = [json.loads((tmp_path / name / "metrics.jsonl").read_text())["train_loss"] for name in runs]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


@pytest.mark.slow
def test_demo_command_trains_b0_on_the_bundled_digits(tmp_path):
    """One epoch of the offline demo (the full demo runs 8): B0 from scratch already beats chance many times over."""
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "pvtv2", "demo", "--output", str(out), "--epochs", "1", "--no-progress"],
        env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    top1 = float(result.stdout.split("top-1 ")[1].split("%")[0])
    assert top1 > 60.0, result.stdout  # measured 81.62 (chance: 10)
    record = json.loads((out / "run" / "metrics.jsonl").read_text())
    assert record["val_top1"] == pytest.approx(top1, abs=0.01)
    assert _accuracy(out / "run" / "best", out / "digits") == pytest.approx(top1, abs=0.01)
    predictions = [line for line in result.stdout.splitlines() if "predicted" in line]
    assert len(predictions) == 5
    assert (out / "run" / "curves.png").is_file() and (out / "attention.png").is_file()
    again = subprocess.run([sys.executable, "-m", "pvtv2", "demo", "--output", str(out), "--epochs", "1"],
                           env=ENV, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--overwrite" in again.stderr
