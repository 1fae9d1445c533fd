"""Defects found by reading README.md and docs/*.md as a new user and running what they say (docs pass 26)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import TINY_SMALL_IMAGES

from pvtv2.data.digits import write_digits_folder

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(args: list[str], env: dict[str, str] | None = None, processes: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "pvtv2"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m", "pvtv2"]
    return subprocess.run([*launcher, "train", *args], env=env or ENV, capture_output=True, text=True, timeout=300,
                          check=False)


# docs/training.md: a run resumed by another number of processes "keeps its peak learning rate and its schedule ...
# down to --min-lr at its last step". The resumed invocation warned "--min-lr 2e-05 is above the default peak lr
# 1.56e-05: the lr stays at the peak" (this invocation's default, one process's global batch) while the run went on
# from its own peak, 3.125e-05, down to --min-lr: the warning contradicted the schedule it ran.
@pytest.mark.slow
def test_a_resumed_run_warns_about_min_lr_only_against_its_own_peak(tmp_path):
    data = tmp_path / "digits"
    write_digits_folder(data, size=16, limit_per_class=16, val_fraction=0.25, seed=2)  # 120 training images
    arch = tmp_path / "tiny.json"
    arch.write_text(json.dumps(TINY_SMALL_IMAGES))
    out, min_lr = tmp_path / "run", 2e-5
    args = ["--data", str(data), "--model", str(arch), "--output", str(out), "--epochs", "3", "--image-size", "16",
            "--batch-size", "16", "--warmup-epochs", "0", "--hflip", "0", "--min-lr", f"{min_lr:g}", "--no-progress"]
    # Two processes: 4 steps an epoch, a peak of 5e-4 * 32 / 512; killed in the 2nd batch of epoch 2.
    killed = _train(args, {**ENV, "PVTV2_TEST_KILL_AT_STEP": "6"}, processes=2)
    assert killed.returncode != 0 and "stays at the peak" not in killed.stderr
    done = _train(["--output", str(out), "--resume", "--no-progress"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stays at the peak" not in done.stderr, done.stderr[-3000:]
    # One process: 8 steps an epoch, 24 in all, from step 8; the cosine from the run's peak to --min-lr (closed form).
    peak = 5e-4 * 32 / 512
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[1]["lr"] == pytest.approx(min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * 16 / 24)))
    assert records[2]["lr"] == pytest.approx(min_lr, rel=1e-9)
    # A new run whose default peak is below --min-lr is still warned, with that peak: 5e-4 * 16 / 512.
    fresh = _train([*args[:5], str(tmp_path / "fresh"), "--epochs", "1", *args[8:]])
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "--min-lr 2e-05 is above the default peak lr 1.56e-05: the lr stays at the peak" in fresh.stderr
    assert json.loads((tmp_path / "fresh" / "metrics.jsonl").read_text())["lr"] == pytest.approx(5e-4 * 16 / 512)


# The training summaries say "trained 1 epoch" since this round; the demo's still said "after 1 epochs".
@pytest.mark.parametrize("epochs, words", [(1, "after 1 epoch (57 s)"), (8, "after 8 epochs (57 s)")])
def test_the_demo_summary_counts_its_epochs_in_words(monkeypatch, capsys, tmp_path, epochs, words):
    import pvtv2.demo
    from pvtv2.cli import main

    def fake_demo(output, *, epochs, image_size, overwrite, progress):
        return {"val_top1": 84.12256, "val_top5": 98.88579, "num_val": 359, "epochs": epochs, "seconds": 57.2,
                "predictions": [], "data": "d", "best": "c", "metrics": "m", "curves": "k", "attention": "a"}

    monkeypatch.setattr(pvtv2.demo, "run_demo", fake_demo)
    assert main(["demo", "--output", str(tmp_path / "demo"), "--epochs", str(epochs), "--no-progress"]) in (0, None)
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"held-out accuracy: top-1 84.12%, top-5 98.89% on 359 digits {words}"


# docs/commands.md said "With --layout the output must be named *.safetensors or *.pth", and so did the error; the
# code writes .pt and .bin (pytorch_model.bin's suffix) as PyTorch checkpoints too. The doc and message now list them.
def test_convert_layout_writes_the_pytorch_suffixes_it_takes(tmp_path, capsys):
    import torch

    from pvtv2 import PvtV2Config, PvtV2ForImageClassification
    from pvtv2.cli import main
    from pvtv2.weights.layouts import convert_state_dict

    torch.manual_seed(0)
    model = PvtV2ForImageClassification(PvtV2Config(**TINY_SMALL_IMAGES, num_labels=3)).eval()
    model.save_pretrained(tmp_path / "src")
    expected = convert_state_dict(model.state_dict(), "timm")
    for suffix in (".pth", ".pt", ".bin"):
        out = tmp_path / f"timm{suffix}"
        assert main(["convert", str(tmp_path / "src"), str(out), "--layout", "timm"]) in (0, None)
        assert out.read_bytes()[:4] == b"PK\x03\x04"  # torch.save's zip format, not safetensors
        written = torch.load(out, weights_only=True)
        assert written.keys() == expected.keys()
        assert all(torch.equal(written[k], expected[k]) for k in expected)
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "timm.txt"), "--layout", "timm"]) == 2
    assert "named *.safetensors (safetensors) or *.pth, *.pt, *.bin (PyTorch), got" in capsys.readouterr().err
    assert not (tmp_path / "timm.txt").exists()


# README: `pvtv2 info MODEL_OR_PRESET`, where docs/training.md's --model MODEL_OR_PRESET takes a config.json for a
# custom architecture. `pvtv2 info arch.json` said "'arch.json' is not a readable PyTorch checkpoint (corrupt,
# truncated or another format)"; it now counts the architecture as it does a preset's, checked against transformers.
def test_info_counts_a_config_json_architecture(tmp_path, capsys):
    import transformers

    from pvtv2.cli import main

    fields = {**TINY_SMALL_IMAGES, "num_labels": 7}
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(fields))
    reference = transformers.PvtV2ForImageClassification(transformers.PvtV2Config(**fields))
    assert main(["info", str(arch), "--image-size", "32", "--json"]) in (0, None)
    summary = json.loads(capsys.readouterr().out)
    assert summary["parameters"] == sum(p.numel() for p in reference.parameters())
    assert summary["num_labels"] == 7
    # A misspelt field is named, as `pvtv2 train --model arch.json` names it.
    arch.write_text(json.dumps({**fields, "depth": [1, 1, 1, 1]}))
    assert main(["info", str(arch)]) == 2
    assert "unknown field 'depth' (did you mean 'depths'?)" in capsys.readouterr().err


# docs/training.md: a non-empty folder that holds no run is refused, "with --overwrite too (unless it holds only what
# a run writes)". A folder left by a run killed while writing its run.json was refused without --overwrite with
# "choose an empty or new folder" alone, though --overwrite replaces it: the refusal now names that way out.
@pytest.mark.slow
def test_a_folder_of_a_runs_leftovers_is_refused_with_overwrite_as_the_way_out(tmp_path):
    data = tmp_path / "digits"
    write_digits_folder(data, size=16, limit_per_class=4, val_fraction=0.5, seed=3)  # 20 training images
    arch = tmp_path / "tiny.json"
    arch.write_text(json.dumps(TINY_SMALL_IMAGES))
    out = tmp_path / "run"
    out.mkdir()
    (out / ".run.json.tmp").write_text("{")
    args = ["--data", str(data), "--model", str(arch), "--output", str(out), "--epochs", "1", "--image-size", "16",
            "--batch-size", "8", "--no-progress"]
    refused = _train(args)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"pvtv2 train: error: --output {str(out)!r} holds no training run (no run.json), only what a run writes "
        f"(.run.json.tmp); pass --overwrite to replace it, or choose an empty or new folder")
    assert sorted(p.name for p in out.iterdir()) == [".run.json.tmp"]
    done = _train([*args, "--overwrite"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (out / ".run.json.tmp").exists()
    # A user's own file is still refused without naming --overwrite, which refuses it too.
    own = tmp_path / "own"
    own.mkdir()
    (own / "notes.txt").write_text("mine")
    refused = _train([*args[:5], str(own), *args[6:]])
    assert refused.returncode == 2 and "choose an empty or new folder" in refused.stderr
    assert "--overwrite" not in refused.stderr.strip().splitlines()[-1]


# README: "on a machine without network access an uncached hub id is a clear error that says how to fetch it", and
# local_files_only= is taken "as transformers takes it" by PvtV2ImageProcessor.from_pretrained too. For a hub id the
# cache had never seen, the processor returned the default preprocessing (224x224 bilinear) without a word, where
# transformers raises; a repository with another size or a crop would then have been fed wrong pixels.
def test_the_processor_of_an_uncached_hub_id_is_an_error_offline(tmp_path):
    import numpy as np
    import transformers

    from pvtv2 import PvtV2ImageProcessor
    from pvtv2.weights.hub import HubFileNotFound

    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(HubFileNotFound) as info:
        PvtV2ImageProcessor.from_pretrained("someone/pvt_v2_crop", cache_dir=cache, local_files_only=True)
    assert "not in the Hugging Face cache" in str(info.value) and "hf download someone/pvt_v2_crop" in str(info.value)
    with pytest.raises(OSError):  # transformers refuses the same call
        transformers.PvtImageProcessor.from_pretrained("someone/pvt_v2_crop", cache_dir=cache, local_files_only=True)
    # A cached repository without the file still means the defaults, as transformers' PIL-based processor computes them
    # with the published resample (bilinear).
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--pvt_v2_plain"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text(json.dumps({"model_type": "pvt_v2"}))
    processor = PvtV2ImageProcessor.from_pretrained("someone/pvt_v2_plain", cache_dir=cache, local_files_only=True)
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    ours = processor(image, return_tensors="pt")["pixel_values"]
    theirs = transformers.PvtImageProcessorPil(resample=2)(image, return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (1, 3, 224, 224)
    assert float((ours - theirs).abs().max()) < 1e-5


# docs/training.md: "A run started without --lr takes an --lr equal to the rate it trained with". Resumed with that
# --lr, a run started with its own --min-lr (below the default 1e-5) was refused: "--min-lr (1e-05) must not exceed
# --lr (3.90625e-06)", the command line's default --min-lr compared before the run's own was read.
@pytest.mark.slow
def test_a_resume_with_the_runs_own_rate_is_taken_whatever_its_min_lr(tmp_path):
    data = tmp_path / "digits"
    write_digits_folder(data, size=16, limit_per_class=4, val_fraction=0.5, seed=3)  # 20 training images
    arch = tmp_path / "tiny.json"
    arch.write_text(json.dumps(TINY_SMALL_IMAGES))
    out, min_lr = tmp_path / "run", 1e-7
    args = ["--data", str(data), "--model", str(arch), "--output", str(out), "--epochs", "2", "--image-size", "16",
            "--batch-size", "4", "--warmup-epochs", "0", "--min-lr", f"{min_lr:g}", "--no-progress"]
    killed = _train(args, {**ENV, "PVTV2_TEST_KILL_AT_STEP": "7"})  # 5 steps an epoch: the 2nd of epoch 2
    assert killed.returncode != 0
    peak = 5e-4 * 4 / 512  # 3.90625e-06: the default for one process's batch of 4
    done = _train(["--output", str(out), "--resume", "--lr", repr(peak), "--no-progress"])
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0]["lr"] == pytest.approx(min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert records[1]["lr"] == pytest.approx(min_lr, rel=1e-9)
    # A new run is still refused a --min-lr above its --lr.
    refused = _train([*args[:5], str(tmp_path / "new"), *args[6:], "--lr", "1e-6", "--min-lr", "1e-5"])
    assert refused.returncode == 2
    assert "--min-lr (1e-05) must not exceed --lr (1e-06)" in refused.stderr


# docs/commands.md: a folder output of convert "gets the source's preprocessor_config.json too ..., so it predicts
# what its source did". An authors' .pth is predicted with the authors' protocol (shorter side 256 = 224 / 0.875,
# bicubic, centre 224 crop); the folder converted from it had no preprocessor_config.json and predicted with a plain
# 224x224 resize: other probabilities from the same weights. A single file in another layout now warns of it.
def test_a_folder_converted_from_an_authors_file_predicts_what_its_source_did(tmp_path, capsys, caplog):
    import numpy as np
    import PIL.Image
    import torch

    from pvtv2 import PvtV2Config, PvtV2ForImageClassification
    from pvtv2.cli import main
    from pvtv2.weights.layouts import convert_state_dict

    torch.manual_seed(0)
    model = PvtV2ForImageClassification(PvtV2Config(**{**TINY_SMALL_IMAGES, "image_size": 224}, num_labels=4))
    torch.save(convert_state_dict(model.state_dict(), "original"), tmp_path / "authors.pth")
    PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 150, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert main(["convert", str(tmp_path / "authors.pth"), str(tmp_path / "folder")]) in (0, None)
    written = json.loads((tmp_path / "folder" / "preprocessor_config.json").read_text())
    assert written["size"] == {"shortest_edge": 256} and written["crop_size"] == {"height": 224, "width": 224}
    assert written["resample"] == 3 and written["do_center_crop"] is True and written["crop_pct"] == 0.875
    capsys.readouterr()
    scores = []
    for source in ("authors.pth", "folder"):
        assert main(["predict", "--model", str(tmp_path / source), str(tmp_path / "a.png"), "--top-k", "4", "--json",
                     "--no-progress"]) in (0, None)
        scores.append({p["index"]: p["score"] for p in json.loads(capsys.readouterr().out)[0]["predictions"]})
    assert scores[0].keys() == scores[1].keys()
    assert all(abs(scores[0][k] - scores[1][k]) < 1e-6 for k in scores[0])
    caplog.clear()
    with caplog.at_level("WARNING", logger="pvtv2.export"):
        assert main(["convert", str(tmp_path / "authors.pth"), str(tmp_path / "t.safetensors"),
                     "--layout", "transformers"]) in (0, None)
    assert "the preprocessing (the original protocol its file is predicted with)" in caplog.text


# README: revision= is taken as transformers takes it, and an uncached hub id "is a clear error that says how to
# fetch it". For revision='v2' of a repository never downloaded, the error said `hf download owner/name`, which
# fetches main's files: the cache would still lack v2's.
def test_an_uncached_revision_is_named_in_the_download_command(tmp_path):
    from pvtv2 import PvtV2ForImageClassification
    from pvtv2.weights.hub import HubFileNotFound

    (tmp_path / "cache").mkdir()
    with pytest.raises(HubFileNotFound) as info:
        PvtV2ForImageClassification.from_pretrained("someone/pvt_v2_x", revision="v2", cache_dir=tmp_path / "cache",
                                                    local_files_only=True)
    assert "`hf download someone/pvt_v2_x --revision v2`" in str(info.value)
    with pytest.raises(HubFileNotFound) as info:
        PvtV2ForImageClassification.from_pretrained("someone/pvt_v2_x", cache_dir=tmp_path / "cache",
                                                    local_files_only=True)
    assert "`hf download someone/pvt_v2_x`" in str(info.value)
