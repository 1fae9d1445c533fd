"""The paper's recipe in `pvtv2 train`: when it is on by default (a preset trained from scratch) and how each flag
overrides it, its flags' refusals, and real runs (slow) that learn with the recipe on, resume exactly after SIGKILL
with every augmentation and the weight EMA on, save an EMA whose independent evaluation is what the run logged,
carve a seeded validation split, freeze stages and decay learning rates by layer."""

from __future__ import annotations

import json
import logging
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pvtv2.training
from pvtv2 import PvtV2Config, PvtV2ForImageClassification
from pvtv2.cli import main
from pvtv2.data.processing import PvtV2ImageProcessor
from pvtv2.training import TrainConfig
from pvtv2.training.config import resolve_recipe
from pvtv2.training.engine import KILL_ENV
from pvtv2.training.rundir import RUN_FILE, prepare_output
from conftest import TINY_SMALL_IMAGES
from training_fixtures import ENV, common_args, run_train

# The fixtures tiny_config, digits and few_digits.
pytest_plugins = ["training_fixtures"]

RECIPE = ["--randaugment", "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25", "--repeated-aug", "3",
          "--train-interpolation", "bicubic", "--ema", "0.9"]


BAD_FLAGS = [
    (["--mixup", "-0.1"], "--mixup"),
    (["--mixup", "nan"], "--mixup"),
    (["--cutmix", "inf"], "--cutmix"),
    (["--reprob", "1.5"], "--reprob"),
    (["--repeated-aug", "0"], "--repeated-aug"),
    (["--train-interpolation", "lanczos"], "--train-interpolation"),
    (["--ema", "1"], "--ema"),
    (["--ema", "0"], "--ema"),
    (["--val-split", "1"], "--val-split"),
    (["--val-split", "0"], "--val-split"),
    (["--freeze-stages", "-1"], "--freeze-stages"),
    (["--freeze-stages", "5"], "--freeze-stages 5 is more than the 4 stages of the model"),  # the flag, not the field
    (["--layer-decay", "0"], "--layer-decay"),
    (["--layer-decay", "1.5"], "--layer-decay"),
    (["--val-split", "0.1"], "has its own val/ folder"),
    (["--task", "segmentation", "--mixup", "0.8"], "--mixup is a classification augmentation"),
    (["--task", "depth", "--recipe", "deit"], "--recipe deit is the ImageNet classification recipe"),
    (["--task", "detection", "--val-split", "0.1"], "--val-split does not apply to --task detection"),
]


@pytest.mark.parametrize(("extra", "named"), BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_recipe_flags_are_refused_before_anything_is_written(few_digits, tiny_config, tmp_path, capsys, extra,
                                                                 named):
    out = tmp_path / "run"
    code = main(["train", *common_args(few_digits, tiny_config, out, hflip=None), *extra])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("pvtv2 train: error: ") and named in lines[0], lines
    assert not out.exists()


# ------------------------------------------------------------------------------------------ on by default
# The PVTv2 paper's augmentation (its section 4.1, DeiT's recipe), written out here from the paper and DeiT's main.py,
# not read from the library: RandAugment rand-m9-mstd0.5-inc1, mixup 0.8, cutmix 1.0, random erasing 0.25, bicubic
# random resized crops; repeated augmentation 3 over DDP's processes.
DEIT = {"randaugment": True, "mixup": 0.8, "cutmix": 1.0, "reprob": 0.25, "train_interpolation": "bicubic"}
OFF = {"randaugment": False, "mixup": 0.0, "cutmix": 0.0, "reprob": 0.0, "train_interpolation": "bilinear"}

# A short run with the recipe on: 640 digits at 16 px, 6 epochs. Measured: 58.1%, 65.0%, 82.5%, 77.5%, 86.9%, 87.5%
# held-out top-1 over the epochs (the same run without the recipe, test_train.py: 96.25%); chance is 10%.
EPOCHS_WITH_RECIPE = 6
TOP1_WITH_RECIPE = 70.0

DECISIONS = [
    # (flags, processes, recipe, the augmentation fields, repeated_aug)
    (["--model", "pvt_v2_b0"], 1, "deit", DEIT, 1),
    (["--model", "pvt_v2_b2_li"], 2, "deit", DEIT, 3),
    (["--model", "pvt_v2_b0", "--mixup", "0"], 1, "deit", {**DEIT, "mixup": 0.0}, 1),
    (["--model", "pvt_v2_b0", "--no-randaugment", "--repeated-aug", "2"], 4, "deit", {**DEIT, "randaugment": False}, 2),
    (["--model", "pvt_v2_b0", "--train-interpolation", "bilinear", "--reprob", "0"], 2, "deit",
     {**DEIT, "train_interpolation": "bilinear", "reprob": 0.0}, 3),
    (["--model", "pvt_v2_b0", "--recipe", "none"], 2, "none", OFF, 1),
    (["--model", "pvt_v2_b0", "--recipe", "none", "--cutmix", "1", "--randaugment"], 1, "none",
     {**OFF, "cutmix": 1.0, "randaugment": True}, 1),
    (["--model", "arch.json"], 2, "none", OFF, 1),  # a config.json architecture: as before the recipe existed
    (["--model", "arch.json", "--recipe", "deit"], 2, "deit", DEIT, 3),
    (["--model", "runs/b0/best"], 2, "none", OFF, 1),  # fine-tuning a checkpoint folder
    (["--model", "pvt_v2_b0.safetensors"], 1, "none", OFF, 1),  # fine-tuning a checkpoint file
    (["--model", "pvt_v2_b0", "--task", "segmentation"], 2, "none", OFF, 1),  # the dense tasks have their own
]


def test_freeze_stages_beyond_a_checkpoint_files_stages_names_the_flag(few_digits, tmp_path, capsys):
    """A checkpoint file's architecture is known only once it is loaded (after the data): the refusal still names
    --freeze-stages, not the library's argument, and the run folder is left as it was."""
    from pvtv2.weights.files import save_state_dict

    torch.manual_seed(0)
    model = PvtV2ForImageClassification(PvtV2Config(**TINY_SMALL_IMAGES, num_labels=10))
    weights = tmp_path / "start.safetensors"
    save_state_dict(model.state_dict(), weights)
    out = tmp_path / "run"
    code = main(["train", *common_args(few_digits, str(weights), out, hflip=None), "--freeze-stages", "5"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert lines[-1] == (f"pvtv2 train: error: --freeze-stages 5 is more than the 4 stages of the model "
                         f"{str(weights)!r}; use at most 4"), lines
    assert not out.exists()


def test_freeze_stages_of_any_size_is_refused_by_its_flag(tiny_config):
    """A whole number of more than 4300 digits (a library caller's) cannot be written out by Python: the refusal
    became "Exceeds the limit (4300 digits) for integer string conversion", naming no flag."""
    from pvtv2.training.engine import check_freeze_stages

    config = PvtV2Config(**TINY_SMALL_IMAGES)
    for value, shown in ((10**30, "1" + "0" * 30), (10**5000, "<an integer of 16610 bits>")):
        with pytest.raises(ValueError) as err:
            check_freeze_stages(config, value, tiny_config)
        assert str(err.value) == (f"--freeze-stages {shown} is more than the 4 stages of the model {tiny_config!r}; "
                                  "use at most 4")


@pytest.mark.parametrize(("flags", "processes", "recipe", "fields", "repeats"), DECISIONS,
                         ids=[f"{' '.join(f)} x{n}" for f, n, *_ in DECISIONS])
def test_the_recipe_is_on_for_a_preset_from_scratch_and_each_flag_overrides_it(
    monkeypatch, flags, processes, recipe, fields, repeats
):
    calls = []
    monkeypatch.setattr(pvtv2.training, "train", lambda cfg, *, explicit=None: calls.append(cfg) or {"rank": 1})
    assert main(["train", "--data", "DATA", "--output", "OUT", *flags]) == 0
    cfg, _ = resolve_recipe(calls[0], world_size=processes)
    assert cfg.recipe == recipe
    assert {name: getattr(cfg, name) for name in fields} == fields
    assert cfg.repeated_aug == repeats
    assert cfg.label_smoothing == 0.1  # the recipe's, and fine-tuning's default alike
    cfg.validate()


def test_a_folder_named_like_a_preset_is_a_checkpoint_to_fine_tune(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pvt_v2_b0").mkdir()
    cfg, reason = resolve_recipe(TrainConfig(model="pvt_v2_b0", output="OUT"))
    assert (cfg.recipe, cfg.mixup, cfg.randaugment) == ("none", 0.0, False) and reason.startswith("fine-tuning")


@pytest.mark.parametrize(("model", "says"), [
    ("pvt_v2_b0", ("recipe deit (the preset pvt_v2_b0 is trained from scratch): RandAugment rand-m9-mstd0.5-inc1, "
                   "mixup 0.8, cutmix 1, random erasing 0.25, bicubic crops, repeated augmentation x1, label smoothing "
                   "0.1")),
    ("CHECKPOINT", ("recipe none (fine-tuning CHECKPOINT; --recipe deit turns it on): RandAugment off, mixup 0, "
                    "cutmix 0, random erasing 0, bilinear crops, repeated augmentation x1")),
])
def test_the_log_says_which_recipe_is_on_and_why(tmp_path, caplog, capsys, model, says):
    # The decision is logged before the data is read: a missing dataset still shows it, then is refused.
    model = str(tmp_path / "ckpt") if model == "CHECKPOINT" else model
    says = says.replace("CHECKPOINT", model)
    with caplog.at_level(logging.INFO, logger="pvtv2"):
        code = main(["train", "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "run"), "--model", model])
    assert code == 2 and "missing" in capsys.readouterr().err
    assert says in caplog.text


def test_the_recipe_is_decided_once_and_stored(tmp_path):
    """run.json holds the decided values, so --resume continues with them; a run stored before --recipe existed
    (no recipe fields in run.json) resumes with the augmentation off, as it was trained."""
    stored = {"data": "DATA", "model": "pvt_v2_b0", "image_size": 224, "epochs": 300, "batch_size": 128}
    old, new = tmp_path / "old", tmp_path / "new"
    for folder, extra in ((old, {}), (new, {"recipe": "deit", **DEIT, "mixup": 0.0, "repeated_aug": 1})):
        folder.mkdir()
        (folder / RUN_FILE).write_text(json.dumps({**stored, **extra}))
    for folder, recipe, fields in ((old, "none", OFF), (new, "deit", {**DEIT, "mixup": 0.0})):
        merged, _, _ = prepare_output(TrainConfig(output=str(folder), resume=True))
        cfg, _ = resolve_recipe(merged, world_size=2)
        assert cfg.recipe == recipe and {name: getattr(cfg, name) for name in fields} == fields
        assert cfg.repeated_aug == 1  # as stored (or off), whatever the processes now


@pytest.mark.slow
def test_a_short_run_with_the_recipe_on_still_learns(digits, tiny_config, tmp_path):
    out = tmp_path / "run"
    result = run_train([*common_args(digits, tiny_config, out, epochs=EPOCHS_WITH_RECIPE), "--recipe", "deit"])
    assert result.returncode == 0, result.stderr
    assert "recipe deit (--recipe deit): RandAugment rand-m9-mstd0.5-inc1, mixup 0.8, cutmix 1" in result.stderr
    stored = json.loads((out / RUN_FILE).read_text())
    assert {name: stored[name] for name in DEIT} == DEIT and stored["recipe"] == "deit"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = max(r["val_top1"] for r in records)
    assert best > TOP1_WITH_RECIPE, records
    assert _top1(out / "best", digits) == pytest.approx(best, abs=1e-6)


def _top1(folder: Path, data: Path) -> float:
    """Top-1 of a saved checkpoint on the val split, with the library's inference path only."""
    model = PvtV2ForImageClassification.from_pretrained(folder)
    processor = PvtV2ImageProcessor.from_pretrained(folder)
    correct = total = 0
    for label, class_dir in enumerate(sorted((data / "val").iterdir())):
        paths = sorted(class_dir.iterdir())
        with torch.no_grad():
            logits = model(processor([str(p) for p in paths], return_tensors="pt")["pixel_values"]).logits
        correct += int((logits.argmax(-1) == label).sum())
        total += len(paths)
    return 100.0 * correct / total


@pytest.fixture(scope="module")
def recipe_run(few_digits, tiny_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recipe") / "run"
    result = run_train([*common_args(few_digits, tiny_config, out, hflip=None), *RECIPE])
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [3, 12])  # 8 batches per epoch: in the first epoch, and in the second
def test_a_killed_recipe_run_resumes_to_the_same_weights(few_digits, tiny_config, recipe_run, tmp_path, kill_at):
    out = tmp_path / "run"
    args = [*common_args(few_digits, tiny_config, out, hflip=None), *RECIPE]
    killed = run_train(args, env={**ENV, KILL_ENV: str(kill_at)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run_train(["--output", str(out), "--resume", "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    for folder in ("last", "best", "ema"):
        expected = load_file(recipe_run / folder / "model.safetensors")
        got = load_file(out / folder / "model.safetensors")
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5, msg=f"{folder}: {key} differs")
    expected_metrics = [json.loads(line) for line in (recipe_run / "metrics.jsonl").read_text().splitlines()]
    got_metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(expected_metrics, got_metrics, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)
        assert (a["val_top1"], a["ema_val_top1"]) == (b["val_top1"], b["ema_val_top1"])


@pytest.mark.slow
def test_the_recipe_runs_mix_and_save_an_ema_that_scores_what_was_logged(recipe_run, few_digits):
    records = [json.loads(line) for line in (recipe_run / "metrics.jsonl").read_text().splitlines()]
    assert _top1(recipe_run / "ema", few_digits) == pytest.approx(records[-1]["ema_val_top1"], abs=1e-6)
    assert _top1(recipe_run / "last", few_digits) == pytest.approx(records[-1]["val_top1"], abs=1e-6)
    state = torch.load(recipe_run / "last" / "training_state.pt", weights_only=True)
    # The EMA after epoch 2 of 8 steps each: 16 updates, and it is not the raw weights.
    assert int(state["ema"]["n_averaged"]) == 16
    last, ema = load_file(recipe_run / "last" / "model.safetensors"), load_file(recipe_run / "ema" / "model.safetensors")
    assert any(not torch.equal(last[k], ema[k]) for k in last)


@pytest.mark.slow
def test_val_split_freeze_and_layer_decay(few_digits, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(few_digits / "train", data / "train")
    start = tmp_path / "start"
    torch.manual_seed(0)
    labels = {i: str(i) for i in range(10)}
    PvtV2ForImageClassification(PvtV2Config(**TINY_SMALL_IMAGES, id2label=labels)).save_pretrained(start)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="pvtv2"):
        code = main(["train", *common_args(data, str(start), out, epochs=1, hflip=None), "--val-split", "0.25",
                     "--freeze-stages", "1", "--layer-decay", "0.5", "--lr", "1e-3"])
    assert code == 0
    # 12 training images per class: a quarter of each class (3) held out, 30 of 120.
    assert "validation split: 30 of the 120 training images" in caplog.text
    # 90 images in batches of 16: 6 steps; the 1-epoch warmup (6 steps) is cut to a quarter of the run, 1 step.
    assert "capped at 1 steps" in caplog.text
    before, after = load_file(start / "model.safetensors"), load_file(out / "last" / "model.safetensors")
    stage0 = [k for k in before if ".encoder.layers.0." in k]
    assert stage0 and all(torch.equal(before[k], after[k]) for k in stage0)  # frozen: not one bit moved
    assert all(not torch.equal(before[k], after[k]) for k in before if ".encoder.layers.1." in k and "weight" in k)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    state = torch.load(out / "last" / "training_state.pt", weights_only=True)
    ratios = sorted({round(group["lr"] / record["lr"], 6) for group in state["optimizer"]["param_groups"]})
    # Four stages of one block each, stage 1 frozen: depths 2, 3, 4 and the head (5) learn at 0.5^3, 0.5^2, 0.5, 1.
    assert ratios == [0.125, 0.25, 0.5, 1.0]


@pytest.mark.parametrize(("extra", "named"), [
    (["--amp", "fp16"], "--amp fp16 needs a CUDA GPU"),
    (["--amp", "fp32"], "--amp must be bf16 or fp16"),
    (["--amp", "fp16", "--bf16"], "contradict each other"),
])
def test_fp16_is_refused_on_a_cpu_before_anything_is_written(few_digits, tiny_config, tmp_path, capsys, extra, named):
    out = tmp_path / "run"
    code = main(["train", *common_args(few_digits, tiny_config, out, hflip=None), "--device", "cpu", *extra])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and named in lines[0], lines
    assert not out.exists()


@pytest.mark.slow
def test_the_gradient_scaler_steps_and_is_saved(few_digits, tiny_config, tmp_path, monkeypatch):
    # The fp16 path itself (autocast to float16, scaled backward, unscale before clipping, scaler.step / update),
    # run on the CPU with the CUDA-only refusal lifted: 8 steps without an overflow grow the tracker to 8.
    import pvtv2.training.runner as runner

    monkeypatch.setattr(runner, "_check_fp16", lambda cfg, device: None)
    out = tmp_path / "run"
    assert main(["train", *common_args(few_digits, tiny_config, out, epochs=1, hflip=None), "--amp", "fp16", "--clip-grad", "1"]) == 0
    state = torch.load(out / "last" / "training_state.pt", weights_only=True)
    assert state["scaler"]["scale"] == 65536.0 and state["scaler"]["_growth_tracker"] == 8
    assert _top1(out / "last", few_digits) == pytest.approx(
        json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["val_top1"], abs=1e-6)
