"""A seeded random search over the training engine's workflows, each case against an answer computed another way:

- sharding: every process's order of an epoch (plain, repeated augmentation, detection's grouped batches) against a
  count of what each sample must get (once per epoch, padding taken from the start of the epoch's order, equal
  shares, the same seed the same order), and the validation shards (every sample exactly once);
- the engine against a training loop written out by hand in float64 (AdamW with no decay on 1-d tensors, the
  documented warmup and cosine / poly closed forms, gradient accumulation as one batch of k x b samples, clipping as
  ``min(1, c / (norm + 1e-6))``): the same weights to float64 rounding;
- ``Schedule.plan``'s step counts and rates against closed forms and timm's ``CosineLRScheduler``, for any number of
  processes;
- (slow) the dense tasks killed with SIGKILL at a random moment (mid-epoch, while a checkpoint folder is swapped in,
  while evaluating), then ``--resume``: the weights, optimizer state and metrics of an uninterrupted run, bit for
  bit, and no temporary folder left behind; under torchrun too.
"""

from __future__ import annotations

import collections
import math
import os
import random
from pathlib import Path

import pytest
import torch
from training_fixtures import dense_task_data, launch, run_fingerprint
from safetensors.torch import load_file
from torch import nn

from pvtv2.data.augment import repeated_epoch_indices
from pvtv2.data.coco import grouped_batches
from pvtv2.data.folders import epoch_indices
from pvtv2.models.config import PvtV2Config
from pvtv2.models.modeling import PvtV2ForImageClassification
from pvtv2.training import engine
from pvtv2.training.config import TrainConfig
from pvtv2.training.distributed import DistInfo


# ---------------------------------------------------------------------------------------------- 1. sharding
def test_repeated_augmentation_gives_every_process_a_draw_when_there_are_fewer_draws_than_processes():
    """1 image x 2 copies for 5 processes: the draws were wrapped around once only, so processes 3 and 4 got nothing
    (an empty epoch while the others stepped: DistributedDataParallel's collectives unmatched)."""
    shards = [repeated_epoch_indices(1, repeats=2, seed=0, epoch=0, rank=r, world_size=5) for r in range(5)]
    assert shards == [[0], [1], [0], [1], [0]]  # copy 0 and copy 1 of image 0, round-robin
    shards = [repeated_epoch_indices(2, repeats=1, seed=3, epoch=1, rank=r, world_size=5) for r in range(5)]
    assert [len(s) for s in shards] == [1] * 5
    # with one copy it is the plain order, padded as epoch_indices pads
    assert shards == [epoch_indices(2, seed=3, epoch=1, shuffle=True, rank=r, world_size=5) for r in range(5)]


def test_seeded_shards_hold_every_sample_once_padding_from_the_start_of_the_order():
    rng = random.Random(32)
    for _ in range(600):
        n, world, seed, epoch = rng.randint(1, 30), rng.randint(1, 5), rng.randint(0, 9), rng.randint(0, 5)
        order = epoch_indices(n, seed=seed, epoch=epoch, shuffle=True)
        # the order is DistributedSampler's: torch.randperm seeded with seed + epoch
        assert order == torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        shards = [epoch_indices(n, seed=seed, epoch=epoch, shuffle=True, rank=r, world_size=world) for r in range(world)]
        per = math.ceil(n / world)
        assert [len(s) for s in shards] == [per] * world
        padded = (order * world)[: per * world]  # wrapped around from the start of the epoch's order
        assert collections.Counter(i for s in shards for i in s) == collections.Counter(padded)
        assert shards == [epoch_indices(n, seed=seed, epoch=epoch, shuffle=True, rank=r, world_size=world)
                          for r in range(world)]
        # validation: not padded, every sample exactly once
        val = [epoch_indices(n, seed=seed, epoch=epoch, shuffle=False, rank=r, world_size=world, pad=False)
               for r in range(world)]
        assert sorted(i for s in val for i in s) == list(range(n))
        # repeated augmentation: an epoch as long as one without; copy c of sample i is the draw c * n + i
        repeats = rng.randint(1, 4)
        drawn = [repeated_epoch_indices(n, repeats=repeats, seed=seed, epoch=epoch, rank=r, world_size=world)
                 for r in range(world)]
        assert [len(s) for s in drawn] == [per] * world
        assert all(0 <= d < n * repeats for s in drawn for d in s)
        if repeats == 1:
            assert drawn == shards
        elif world >= repeats and n * repeats >= world:
            # the copies of one image go to different processes: no process holds two copies of an image
            for s in drawn:
                assert len({d % n for d in s}) == len(s)
        # detection: whole batches, each of one orientation except the leftovers, the same count in every epoch
        batch = rng.randint(1, 5)
        ratios = [rng.choice([0.75, 1.0, 1.5]) for _ in range(n)]
        dealt = [grouped_batches(ratios, batch, seed=seed, epoch=epoch, rank=r, world_size=world) for r in range(world)]
        wide, tall = sum(r >= 1 for r in ratios), sum(r < 1 for r in ratios)
        left = wide % batch + tall % batch
        expected = wide // batch + tall // batch + math.ceil(left / batch)
        assert [len(d) for d in dealt] == [math.ceil(expected / world)] * world
        counted = collections.Counter(i for d in dealt for b in d for i in b)
        assert set(counted) == set(range(n)) and all(1 <= len(b) <= batch for d in dealt for b in d)
        if world == 1:
            assert sorted(counted.values()) == [1] * n
        later = [grouped_batches(ratios, batch, seed=seed, epoch=epoch + 1, rank=r, world_size=world)
                 for r in range(world)]
        assert [len(d) for d in later] == [len(d) for d in dealt]


# ---------------------------------------------------------------------------------------------- 2. the engine by hand
TOY = dict(depths=[1, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 2], mlp_ratios=[2, 2], sr_ratios=[2, 1],
           patch_sizes=[3, 3], strides=[2, 2], num_encoder_blocks=2, drop_path_rate=0.0, num_labels=3)
TOY_SIZE = 8


class _Float64Task(engine.Task):
    """A task of fixed float64 tensors, so that the engine's arithmetic can be compared at float64 rounding."""

    model_class = PvtV2ForImageClassification
    best_metric = "score"
    best_state_key = "best_score"
    intro = "float64: %d samples"

    def __init__(self, cfg: TrainConfig, n: int) -> None:
        super().__init__(cfg)
        self.n = n

    def architecture(self):
        return None

    def load_data(self) -> None:
        generator = torch.Generator().manual_seed(123)
        images = torch.randn(self.n, 3, TOY_SIZE, TOY_SIZE, generator=generator, dtype=torch.float64)
        labels = torch.randint(0, 3, (self.n,), generator=generator)
        self.train_set = list(zip(images, labels))
        self.val_set = self.train_set[:2]
        self.classes = ["a", "b", "c"]

    def new_model(self) -> nn.Module:
        torch.manual_seed(7)
        return PvtV2ForImageClassification(PvtV2Config(**TOY, image_size=TOY_SIZE)).double()

    def default_lr(self, global_batch: int) -> float:
        return 1e-3

    def training_loss(self, model, batch, ctx):
        images, labels = batch
        logits = model(images, return_dict=True).logits
        return nn.functional.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)

    def evaluate(self, model, loader, ctx):
        return {"score": 0.0}

    def epoch_summary(self, record):
        return ""

    def result(self, records, best_epoch):
        return {}


def _rate(step: int, total: int, warmup: int, peak: float, min_lr: float, kind: str) -> float:
    """The documented schedule: (step + 1) / warmup of the peak, then a half cosine (or mmsegmentation's poly, power
    0.9) over the steps after the warmup, from the peak down to min_lr."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = (1 - progress) ** 0.9 if kind == "poly" else 0.5 * (1 + math.cos(math.pi * progress))
    low = min(min_lr, peak)
    return low + (peak - low) * shape


def _depth_of(name: str) -> int:
    """Layer-wise decay's depth of a parameter of the TOY model (two stages of one block), as documented: the first
    patch embedding 0, block b of the encoder b + 1, a later stage's patch embedding with the block after it, a
    stage's closing norm with its last block, everything else (the head) on top, 3."""
    parts = name.split(".")
    if parts[:3] != ["pvt_v2", "encoder", "layers"]:
        return 3
    stage, part = int(parts[3]), parts[4]
    return {(0, "patch_embedding"): 0, (0, "blocks"): 1, (0, "layer_norm"): 1,
            (1, "patch_embedding"): 2, (1, "blocks"): 2, (1, "layer_norm"): 2}[stage, part]


def _by_hand(task: _Float64Task, *, batch, accum, epochs, lr, min_lr, wd, clip, warmup, smoothing, schedule,
             layer_decay=None, head_lr_mult=1.0, freeze=0):
    """One batch of ``batch * accum`` samples per step, in the epoch's seeded order; clipping and AdamW by hand;
    each parameter its own AdamW group at ``layer_decay ** (3 - depth)`` of the rate (times ``head_lr_mult`` on
    top), the first ``freeze`` stages left out."""
    model = task.new_model().train()
    params = {name: p for name, p in model.named_parameters()
              if not any(name.startswith(f"pvt_v2.encoder.layers.{s}.") for s in range(freeze))}
    for name, p in model.named_parameters():
        p.requires_grad_(name in params)
    scales = {name: (layer_decay or 1.0) ** (3 - _depth_of(name)) * (head_lr_mult if _depth_of(name) == 3 else 1.0)
              for name in params}
    opt = torch.optim.AdamW([{"params": [p], "weight_decay": wd if p.ndim > 1 else 0.0, "scale": scales[name]}
                             for name, p in params.items()], lr=lr)
    group, n = batch * accum, task.n
    total = math.ceil(n / group) * epochs
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).tolist()  # seed 0 + epoch
        for start in range(0, n, group):
            chosen = order[start:start + group]
            for g in opt.param_groups:
                g["lr"] = g["scale"] * _rate(step, total, min(total, warmup), lr, min_lr, schedule)
            images = torch.stack([task.train_set[i][0] for i in chosen])
            labels = torch.stack([task.train_set[i][1] for i in chosen])
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(images, return_dict=True).logits, labels,
                                               label_smoothing=smoothing)
            loss.backward()
            if clip:
                grads = [p.grad for p in params.values()]
                norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
                if clip / (norm + 1e-6) < 1:
                    for g in grads:
                        g.mul_(clip / (norm + 1e-6))
            opt.step()
            step += 1
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("seed", range(6))
def test_the_engine_in_float64_is_the_loop_by_hand(tmp_path, seed):
    rng = random.Random(seed)
    case = dict(batch=rng.randint(1, 4), accum=rng.randint(1, 4), epochs=rng.randint(1, 3),
                lr=rng.choice([1e-3, 3e-3]), min_lr=rng.choice([0.0, 1e-4]), wd=rng.choice([0.0, 0.05]),
                clip=rng.choice([None, 0.05, 1.0]), warmup=rng.choice([0, 1, 3]), smoothing=rng.choice([0.0, 0.1]),
                schedule=rng.choice(["cosine", "poly"]), layer_decay=rng.choice([None, 0.5, 1.0]),
                head_lr_mult=rng.choice([1.0, 10.0]), freeze=rng.choice([0, 0, 1, 2]))
    n = rng.randint(3, 13)
    cfg = TrainConfig(output=str(tmp_path / "run"), model="float64", image_size=TOY_SIZE, epochs=case["epochs"],
                      batch_size=case["batch"], grad_accum=case["accum"], lr=case["lr"], min_lr=case["min_lr"],
                      warmup_steps=case["warmup"], weight_decay=case["wd"], clip_grad=case["clip"],
                      label_smoothing=case["smoothing"], schedule=case["schedule"], layer_decay=case["layer_decay"],
                      head_lr_mult=case["head_lr_mult"], freeze_stages=case["freeze"], hflip=0.0, progress=False)
    task = _Float64Task(cfg, n)
    task.load_data()
    engine.run(task, cfg, None, engine.RunContext(torch.device("cpu"), False, DistInfo()))
    got = load_file(str(tmp_path / "run" / "last" / "model.safetensors"))
    expected = _by_hand(task, **case)
    assert got.keys() == expected.keys()
    worst = max(float((got[k] - expected[k]).abs().max()) for k in got)
    assert worst < 1e-12, (n, case, worst)
    moved = max(float((got[k] - v).abs().max()) for k, v in task.new_model().state_dict().items())
    assert moved > 1e-4  # the run trained: a comparison of untouched weights would pass anyway


# ---------------------------------------------------------------------------------------------- 3. the plan
class _Sized(engine.Task):
    def __init__(self, cfg: TrainConfig, n: int) -> None:
        super().__init__(cfg)
        self.train_set = [None] * n

    def default_lr(self, global_batch: int) -> float:
        return 5e-4 * global_batch / 512


def test_schedule_plans_and_rates_against_closed_forms_and_timm():
    timm_scheduler = pytest.importorskip("timm.scheduler")
    rng = random.Random(320)
    for _ in range(150):
        n, world = rng.randint(1, 50), rng.randint(1, 4)
        batch, accum, epochs = rng.randint(1, 8), rng.randint(1, 4), rng.randint(1, 6)
        explicit = rng.random() < 0.5
        cfg = TrainConfig(batch_size=batch, grad_accum=accum, epochs=epochs, lr=rng.choice([None, 1e-3]),
                          min_lr=rng.choice([0.0, 1e-6, 1e-5]), warmup_epochs=rng.choice([0.0, 0.5, 1.0, 2.0, 5.0]),
                          warmup_steps=rng.choice([0, 2, 7, 1000]) if explicit else None,
                          schedule=rng.choice(["cosine", "poly"]))
        plan = engine.Schedule.plan(cfg, _Sized(cfg, n), DistInfo(0, world))
        batches = math.ceil(math.ceil(n / world) / batch)
        steps = math.ceil(batches / accum)
        total = steps * epochs
        warmup = (min(total, cfg.warmup_steps) if explicit
                  else min(round(cfg.warmup_epochs * steps), math.floor(total / 4)))
        peak = cfg.lr if cfg.lr is not None else 5e-4 * batch * accum * world / 512
        assert (plan.batches_per_epoch, plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (
            batches, steps, total, warmup)
        assert plan.peak_lr == pytest.approx(peak, rel=1e-15)
        for step in range(total + 1):
            assert peak * plan.factor(step) == pytest.approx(
                _rate(step, total, warmup, peak, cfg.min_lr, cfg.schedule), rel=1e-12, abs=1e-18)
        if cfg.schedule == "cosine" and total > warmup:
            # after the warmup: timm's CosineLRScheduler stepped per update (t_in_epochs=False, warmup_prefix=True)
            opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
            timm = timm_scheduler.CosineLRScheduler(opt, t_initial=total - warmup, lr_min=min(cfg.min_lr, peak),
                                                    warmup_t=warmup, warmup_prefix=True, t_in_epochs=False,
                                                    warmup_lr_init=peak if warmup else 0)
            for step in range(warmup, total):
                assert peak * plan.factor(step) == pytest.approx(timm._get_lr(step)[0], rel=1e-12, abs=1e-18)


# ---------------------------------------------------------------------------------------------- 3b. evaluation shards
def test_segmentation_validation_loss_is_that_of_every_labelled_pixel_whatever_the_batches_and_processes(tmp_path):
    """Validation masks with 0 to 24 of 32 rows ignored (255). The loss was each batch's pixel mean weighted by its
    images: 1.4211 at batch 1, 1.4125 at batch 5 and 1.4087 for two processes of batch 2 (shards 0, 2, 4 and 1, 3),
    for the same weights. Now all of them are the cross-entropy over every labelled pixel of the split."""
    import numpy as np
    import PIL.Image

    from pvtv2.data.shapes import make_segmentation_example
    from pvtv2.training.segmentation import SegmentationTask

    root = make_segmentation_example(tmp_path / "shapes", n_train=4, n_val=5, size=32, seed=2)
    for i, path in enumerate(sorted((root / "val" / "masks").iterdir())):
        mask = np.array(PIL.Image.open(path))
        mask[: 6 * i] = 255
        PIL.Image.fromarray(mask).save(path)
    task = SegmentationTask(TrainConfig(task="segmentation", data=str(root), model="tiny", image_size=32,
                                        output=str(tmp_path / "run")))
    task.load_data()
    torch.manual_seed(0)
    model = task.new_model().eval()
    pixels = torch.stack([task.val_set[i][0] for i in range(5)])
    labels = torch.stack([task.val_set[i][1] for i in range(5)])
    assert 0 < int((labels == 255).sum()) < labels.numel()
    with torch.no_grad():
        logits = nn.functional.interpolate(model(pixels).logits, size=labels.shape[-2:], mode="bilinear",
                                           align_corners=False)
    expected = float(nn.functional.cross_entropy(logits, labels, ignore_index=255))

    class Shards(engine.RunContext):
        """Two processes' evaluations, each of its shard, combined as ctx.sum combines them under torchrun."""

        def __init__(self) -> None:
            super().__init__(torch.device("cpu"), False, DistInfo())
            self.parts: list[list[float]] = []

        def sum(self, values):
            self.parts.append(list(values))
            return list(values)

    def scored(indices: list[int], batch: int, ctx) -> dict:
        loader = torch.utils.data.DataLoader(task.val_set, batch_size=batch, sampler=indices)
        return task.evaluate(model, loader, ctx)

    alone = engine.RunContext(torch.device("cpu"), False, DistInfo())
    for batch in (1, 2, 5):
        assert scored(list(range(5)), batch, alone)["val_loss"] == pytest.approx(expected, rel=1e-6), batch
    shards = Shards()
    for rank in range(2):
        order = epoch_indices(5, seed=0, epoch=0, shuffle=False, rank=rank, world_size=2, pad=False)
        scored(order, 2, shards)
    combined = [a + b for a, b in zip(*shards.parts)]
    assert combined[0] / combined[1] == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------- 4. killed and resumed
# `pvtv2 train` with kill points of its own: SIGKILL right after the first os.replace whose source ends with
# KILL32_AFTER_REPLACE_OF (".../last": between the two renames that swap a checkpoint folder in, the moment
# fileio.recover_folder repairs), before the n-th os.replace (KILL32_BEFORE_REPLACE: e.g. metrics.jsonl written, the
# checkpoints not yet) or the first onto a name ending with KILL32_BEFORE_REPLACE_TO, or at the start of the n-th
# evaluation (KILL32_VALIDATE); KILL32_RANK: only that process.
_KILLER = '''
import os, signal, sys

if os.environ.get("KILL32_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0"):
    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    replace, count = os.replace, [0]
    after, before = os.environ.get("KILL32_AFTER_REPLACE_OF"), int(os.environ.get("KILL32_BEFORE_REPLACE", "0"))
    before_to = os.environ.get("KILL32_BEFORE_REPLACE_TO")

    def killing_replace(src, dst, *args, **kwargs):
        count[0] += 1
        if count[0] == before or (before_to and os.fspath(dst).endswith(before_to)):
            die()
        replace(src, dst, *args, **kwargs)
        if after and os.fspath(src).endswith(after):
            die()

    os.replace = killing_replace
    if os.environ.get("KILL32_VALIDATE"):
        from pvtv2.training import engine
        validate, calls = engine._validate, [0]

        def killing_validate(*args, **kwargs):
            calls[0] += 1
            if calls[0] == int(os.environ["KILL32_VALIDATE"]):
                die()
            return validate(*args, **kwargs)

        engine._validate = killing_validate
else:
    os.environ.pop("PVTV2_TEST_KILL_AT_STEP", None)
from pvtv2.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
'''


def _dense_args(task: str, data: Path, out: Path, rng: random.Random) -> list[str]:
    args = ["--task", task, "--data", str(data), "--model", "tiny", "--output", str(out), "--epochs", "2",
            "--image-size", "64" if task == "detection" else "32", "--batch-size", str(rng.choice([2, 3])),
            "--grad-accum", str(rng.choice([1, 2])), "--lr", "1e-3", "--warmup-steps", str(rng.choice([0, 1, 2])),
            "--hflip", "0.5", "--no-progress"]
    if rng.random() < 0.5:
        args += ["--ema", "0.9"]
    if rng.random() < 0.5:
        args += ["--clip-grad", "0.5"]
    return args


def _kill_and_resume(tmp_path: Path, task: str, seed: int, kill: dict[str, str], processes: int = 1,
                     killed_state=None) -> None:
    """An uninterrupted run and one killed at ``kill`` then resumed end the same (``killed_state``: a check of the
    folder the kill left)."""
    rng = random.Random(seed)
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    data = dense_task_data(tmp_path / "data", task)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = _dense_args(task, data, whole, rng)
    done = launch(script, args, processes=processes)
    assert done.returncode == 0, done.stderr[-3000:]
    cut_args = [cut.as_posix() if a == whole.as_posix() else a for a in args]
    killed = launch(script, cut_args, kill, processes=processes)
    assert killed.returncode != 0, (kill, killed.stderr[-2000:])  # it was killed where asked
    if killed_state is not None:
        killed_state(cut)
    resumed = launch(script, ["--output", str(cut), "--resume", "--no-progress"], processes=processes)
    assert resumed.returncode == 0, (kill, resumed.stderr[-3000:])
    expected, got = run_fingerprint(whole), run_fingerprint(cut)
    assert got == expected, (task, seed, kill, args)
    assert expected["left"] == [] and len(expected["records"]) == 2 and expected["steps"] > 0


def test_depth_killed_between_the_renames_of_its_checkpoint_resumes_to_the_same_bits(tmp_path):
    """Killed right after last/ of epoch 1 moved to .last.old, before .last.tmp took its place: the resume puts the
    old copy back and retrains epoch 2 (seeded flags: see _dense_args)."""
    def halfway(cut: Path) -> None:
        assert (cut / ".last.old" / "training_state.pt").is_file() and not (cut / "last").exists()
        assert (cut / ".last.tmp" / "training_state.pt").is_file()

    _kill_and_resume(tmp_path, "depth", 3, {"KILL32_AFTER_REPLACE_OF": os.sep + "last"}, killed_state=halfway)


@pytest.mark.slow
# Kept short for CI: a segmentation run killed while evaluating is the two-process test's below, a depth run killed
# between renames the test above; the search itself drew 37 such moments over the three tasks.
@pytest.mark.parametrize("task, moment, seed", [("detection", "before_replace", 2)])
def test_dense_runs_killed_at_a_seeded_moment_resume_to_the_same_bits(tmp_path, task, moment, seed):
    """The moment's count is drawn by the seed: the n-th batch of the run, the n-th evaluation, or before the n-th
    file or folder is renamed into place (run.json, metrics.jsonl, the checkpoints, curves.png)."""
    rng = random.Random(seed * 1000 + 32)
    if moment == "step":
        kill = {"PVTV2_TEST_KILL_AT_STEP": str(rng.randint(1, 4))}
    elif moment == "validate":
        kill = {"KILL32_VALIDATE": str(rng.randint(1, 2))}
    else:
        kill = {"KILL32_BEFORE_REPLACE": str(rng.randint(2, 9))}
    _kill_and_resume(tmp_path, task, seed, kill)


@pytest.mark.slow
def test_a_two_process_segmentation_run_with_a_rank_killed_while_evaluating_resumes_to_the_same_bits(tmp_path):
    _kill_and_resume(tmp_path, "segmentation", 5, {"KILL32_VALIDATE": "2", "KILL32_RANK": "1"}, processes=2)


def test_a_run_killed_after_its_last_checkpoint_draws_its_curves_when_resumed(tmp_path):
    """Killed after the last epoch's checkpoint, before its curves.png was written: the resumed run has nothing left
    to train, and said so, leaving curves.png one epoch short (here: missing, a 1-epoch run) for good. It draws them
    from the records: the bytes of the uninterrupted run's picture."""
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    data = dense_task_data(tmp_path / "data", "segmentation")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = ["--task", "segmentation", "--data", str(data), "--model", "tiny", "--epochs", "1", "--image-size", "32",
            "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "0", "--no-progress"]
    assert launch(script, [*args, "--output", str(whole)]).returncode == 0
    killed = launch(script, [*args, "--output", str(cut)], {"KILL32_BEFORE_REPLACE_TO": "curves.png"})
    assert killed.returncode != 0 and (cut / "last" / "training_state.pt").is_file()
    assert not (cut / "curves.png").exists()
    resumed = launch(script, ["--output", str(cut), "--resume", "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "already finished" in resumed.stderr
    assert (cut / "curves.png").read_bytes() == (whole / "curves.png").read_bytes()
