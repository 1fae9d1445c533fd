"""Defects found by reading README.md and docs/*.md as a new user and running what they say (docs pass 24)."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import PIL.Image
import pytest
import torch

import pvtv2
from pvtv2 import (
    PvtV2Config,
    PvtV2ForDepthEstimation,
    PvtV2ForImageClassification,
    PvtV2ForSemanticSegmentation,
    PvtV2ImageProcessor,
)
from pvtv2.cli import main
from pvtv2.export import convert_checkpoint
from pvtv2.inference import class_mapping, load_processor, predict_depth
from pvtv2.visualize import _input_captions, attention_figure, attention_maps

from conftest import TINY, random_weights_


def test_info_states_the_papers_figure_relative_to_the_count(capsys):
    # docs/commands.md: pvt_v2_b2 counts 4.027 GMACs, the paper's Table 1 says 4.0. The line reads "paper 4.0 GMACs
    # (X% from the count above)", so X is the paper against the count: (4.0 - 4.027) / 4.027 = -0.67%, not +0.7%.
    assert main(["info", "pvt_v2_b2"]) == 0
    out = capsys.readouterr().out
    counted = float(re.search(r"compute at 224x224: ([0-9.]+) GMACs", out).group(1))
    assert abs(counted - 4.027) < 5e-4
    line = next(line for line in out.splitlines() if line.startswith("paper (Table 1)"))
    assert "4.0 GMACs" in line
    assert "(-0.7% from the count above)" in line
    # B5: 11.717 counted against the paper's 11.8, so the paper is 0.7% above the count.
    assert main(["info", "pvt_v2_b5"]) == 0
    assert "(+0.7% from the count above)" in capsys.readouterr().out


def test_load_processor_takes_one_side_as_the_readme_call_does(tmp_path):
    # README: load_processor(source, image_size, ...). One number (as PvtV2ImageProcessor(size=224) takes) used to
    # fail with "'int' object is not iterable"; it is the square side. A folder without preprocessor_config.json
    # gets the transformers resize to that side.
    (tmp_path / "config.json").write_text("{}")
    processor = load_processor(tmp_path, 48)
    assert processor.size == {"height": 48, "width": 48}
    assert load_processor(tmp_path, (40, 56)).size == {"height": 40, "width": 56}
    assert load_processor(tmp_path, 64, protocol="timm").size == {"shortest_edge": int(64 / 0.9)}  # timm: floor(size / crop_pct)
    for bad in (0, (32,), "224", (32, -1)):
        with pytest.raises(ValueError, match="image_size must be a positive side or a"):
            load_processor(tmp_path, bad)


def test_depth_size_not_a_multiple_of_32_is_refused_by_the_flag(tmp_path, capsys):
    # docs/dense.md: depth's --size is "multiples of 32 from 32 to 2048". --size 50 used to be read as valid, the
    # model loaded, and the decoder then failed with "got a (7, 7) stage under a (8, 8) upsampled one". It is now
    # refused first, in the flag's words (the model path here does not even exist), with the size rounded down.
    image = tmp_path / "room.png"
    PIL.Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(image)
    out = tmp_path / "depth.png"
    code = main(["depth", "--model", str(tmp_path / "no-model"), str(image), "--output", str(out), "--size", "50x100"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert err == ["pvtv2 depth: error: --size must be multiples of 32 per side (GLPN's decoder), got '50x100'; "
                   "e.g. 32x96"]
    torch.manual_seed(0)
    model = PvtV2ForDepthEstimation(PvtV2Config(**TINY))
    with pytest.raises(ValueError, match="size must be multiples of 32 per side"):
        predict_depth(model, PIL.Image.open(image), (50, 100))
    assert predict_depth(model, PIL.Image.open(image), (64, 96)).shape == (64, 96)  # the image's own size


def _trained_folder(tmp_path):
    """A save_pretrained folder as a run's best/ is: real class names, 32 px, its preprocessing beside it."""
    names = {i: name for i, name in enumerate(["cat", "dog", "owl"])}
    config = PvtV2Config(**TINY, image_size=32, id2label=names, label2id={v: k for k, v in names.items()})
    model = random_weights_(PvtV2ForImageClassification(config), seed=3)
    folder = tmp_path / "run" / "best"
    model.save_pretrained(folder)
    PvtV2ImageProcessor(size=32).save_pretrained(folder)
    return folder


def _image(tmp_path):
    path = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)).save(path)
    return path


def test_convert_of_a_runs_weights_file_keeps_its_preprocessing(tmp_path, capsys):
    # A user converts a run's best/model.safetensors to a folder (docs/commands.md: "any checkpoint layout ->
    # save_pretrained folder"). predict on the file uses the folder's 32 px preprocessing; the converted folder got
    # none, so predict on it resized to 224 px: other probabilities, silently. Both now predict the same.
    folder = _trained_folder(tmp_path)
    image = _image(tmp_path)
    converted = tmp_path / "converted"
    assert main(["convert", str(folder / "model.safetensors"), str(converted)]) == 0
    assert json.loads((converted / "preprocessor_config.json").read_text())["size"] == {"height": 32, "width": 32}
    capsys.readouterr()
    results = []
    for model in (folder / "model.safetensors", folder, converted):
        assert main(["predict", "--model", str(model), str(image), "--json", "--top-k", "3", "--no-progress"]) == 0
        results.append({p["index"]: p["score"] for p in json.loads(capsys.readouterr().out)[0]["predictions"]})
    # The reference: the model's own softmax on the image resized to its 32 px, computed here.
    model = PvtV2ForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        probs = model(PvtV2ImageProcessor(size=32)(PIL.Image.open(image), return_tensors="pt")["pixel_values"]).logits
    reference = dict(enumerate(probs[0].softmax(-1).tolist()))
    for other in results:
        assert other.keys() == reference.keys()
        assert max(abs(other[k] - reference[k]) for k in reference) < 1e-6


def test_convert_to_a_single_file_names_what_the_file_cannot_hold(tmp_path, caplog):
    folder = _trained_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pvtv2.export"):
        convert_checkpoint(folder, tmp_path / "w.safetensors", layout="timm")
    lost = [r.getMessage() for r in caplog.records if "holds weights only" in r.getMessage()]
    assert len(lost) == 1
    assert "the class names (3 labels)" in lost[0] and "the image size (32x32)" in lost[0]
    assert "preprocessor_config.json" in lost[0]
    # A file with nothing of that (generic labels, 224 px, the timm protocol it is read with) converts into another
    # timm file without the warning; into an authors' file, read with their protocol, it warns (docs pass 26).
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pvtv2.export"):
        convert_checkpoint(tmp_path / "w.safetensors", tmp_path / "w.pth", layout="timm")
    assert not [r for r in caplog.records if "holds weights only" in r.getMessage()]


def test_attention_figure_names_the_size_the_model_ran_at_and_warns_of_single_keys(tmp_path, caplog):
    # The demo draws its 32 px digit at 128 px: the picture said "input 32x32" above "tokens 32x32" for stage 1,
    # whose stride is 4 (a 32 px input has 8x8 tokens). The first panel now says both sizes. At 32 px every stage of
    # B0's reductions (8, 4, 2, 1) leaves one key: the maps are uniform, and a warning says so.
    config = PvtV2Config(**TINY)
    model = random_weights_(PvtV2ForImageClassification(config), seed=1).eval()
    digit = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)).convert("RGB")
    pixels = PvtV2ImageProcessor(size=128)(digit, return_tensors="pt")["pixel_values"]
    assert _input_captions(digit, pixels) == ("image 32x32", "model input 128x128")
    maps = attention_maps(model, pixels)
    assert maps[0]["tokens"] == (128 // config.strides[0],) * 2  # 32x32 tokens: the model's input, not the image's
    assert [m["keys"] for m in maps] == [(128 // s // r,) * 2 for s, r in zip((4, 8, 16, 32), config.sr_ratios)]
    with caplog.at_level(logging.WARNING, logger="pvtv2.visualize"):
        attention_figure(model, digit, PvtV2ImageProcessor(size=128))
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="pvtv2.visualize"):
        attention_figure(model, digit, PvtV2ImageProcessor(size=32))
    # 32 px: tokens 8, 4, 2, 1 per side over reductions 8, 4, 2, 1 -> one key in every stage
    assert [32 // s // r for s, r in zip((4, 8, 16, 32), config.sr_ratios)] == [1, 1, 1, 1]
    assert len(caplog.records) == 1 and "stage(s) 1, 2, 3, 4 attend over a single key" in caplog.text


def test_visualize_size_flag_sets_the_model_input(tmp_path, capsys, caplog):
    folder = _trained_folder(tmp_path)  # 32 px, with its preprocessing
    image = _image(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pvtv2.visualize"):
        assert main(["visualize", "--model", str(folder), str(image), "-o", str(tmp_path / "a.png")]) == 0
    assert "at a 32x32 model input" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pvtv2.visualize"):
        assert main(["visualize", "--model", str(folder), str(image), "-o", str(tmp_path / "b.png"),
                     "--size", "128"]) == 0
    assert "single key" not in caplog.text
    assert main(["visualize", "--model", str(folder), str(image), "-o", str(tmp_path / "c.png"), "--size", "8"]) == 2
    assert "--size must be between 32 and 2048" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_a_mistyped_flag_is_one_line_naming_the_command_and_the_flag_meant(tmp_path, capsys):
    # README: errors meant for people, "a bad flag" among them, print one line "pvtv2 COMMAND: error: ...". A flag
    # the command lacks printed the top-level usage and "pvtv2: error: unrecognized arguments: --topk".
    image = _image(tmp_path)
    code = main(["predict", "--model", str(tmp_path / "m"), "--topk", "3", str(image)])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        "pvtv2 predict: error: unrecognized arguments: --topk (did you mean --top-k?); see pvtv2 predict --help"]
    code = main(["train", "--data", str(tmp_path), "--output", str(tmp_path / "run"), "--lr-min", "1e-5",
                 "--warmup_epochs=2"])
    assert code == 2 and not (tmp_path / "run").exists()
    assert capsys.readouterr().err.splitlines() == [
        "pvtv2 train: error: unrecognized arguments: --lr-min (did you mean --min-lr?) 1e-5 --warmup_epochs=2 (did "
        "you mean --warmup-epochs?); see pvtv2 train --help"]


def test_a_near_miss_of_a_preset_name_lists_the_presets(capsys):
    presets = pvtv2.list_presets()
    assert presets == ["pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2", "pvt_v2_b2_li", "pvt_v2_b3", "pvt_v2_b4", "pvt_v2_b5"]
    for typo, meant in (("pvtv2_b2", "pvt_v2_b2"), ("pvt_v2_b2li", "pvt_v2_b2_li"), ("PVT-V2-B0x", "pvt_v2_b0")):
        assert main(["info", typo]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"(did you mean {meant!r}? the presets are {', '.join(presets)})"), err
    # a mistyped path is no near preset: the message stays as it was
    assert main(["info", "runs/b0/bset"]) == 2
    assert capsys.readouterr().err.strip().endswith("nor a hub id 'owner/name'")


def test_eval_with_unnamed_classes_refuses_a_subset_of_class_folders(tmp_path, capsys):
    # docs/commands.md: a model with generic LABEL_i labels takes the sorted folder names as classes 0, 1, ... A
    # digits model converted from a weights file (labels lost) evaluated on the folders 3 and 5 scored them as classes
    # 0 and 1: top-1 0.00% where the named model scores 100%, with no warning. Fewer folders than classes are now
    # refused; folders named LABEL_i map by name (LABEL_10 sorts before LABEL_2).
    generic = {i: f"LABEL_{i}" for i in range(12)}
    assert class_mapping([f"LABEL_{i}" for i in (2, 10, 11)], generic) == {"LABEL_2": 2, "LABEL_10": 10, "LABEL_11": 11}
    assert class_mapping([f"c{i:02d}" for i in range(12)], generic) == {f"c{i:02d}": i for i in range(12)}
    model = random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=4, image_size=32)), seed=2)
    model.save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(1)
    for name in ("3", "5"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for n in range(2):
            PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "data" / name / f"{n}.png")
    assert main(["eval", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("pvtv2 eval: error: the model's 4 classes have no names (LABEL_0 ... LABEL_3) and the "
                          "dataset has 2 class folder(s), ['3', '5']")
    # Named LABEL_1 and LABEL_3, the same images are scored as those classes: checked against the model directly.
    (tmp_path / "data" / "3").rename(tmp_path / "data" / "LABEL_1")
    (tmp_path / "data" / "5").rename(tmp_path / "data" / "LABEL_3")
    assert main(["eval", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--json",
                 "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out)
    processor = PvtV2ImageProcessor(size=32)
    logits, labels = [], []
    for folder, label in (("LABEL_1", 1), ("LABEL_3", 3)):
        for n in range(2):
            pixels = processor(PIL.Image.open(tmp_path / "data" / folder / f"{n}.png").convert("RGB"),
                               return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                logits.append(model.eval()(pixels).logits[0])
            labels.append(label)
    loss = torch.nn.functional.cross_entropy(torch.stack(logits), torch.tensor(labels)).item()
    assert abs(got["loss"] - loss) < 1e-5 * max(1.0, loss)


def test_convert_warns_of_preprocessing_only_where_reading_the_file_back_differs(tmp_path, caplog):
    # A 224 px folder with transformers' resize: a transformers file is read back with that same resize (no loss);
    # a timm file is evaluated with timm's protocol (bicubic, shorter side 248, centre crop): that is a loss.
    folder = tmp_path / "plain"
    random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=3))).save_pretrained(folder)
    PvtV2ImageProcessor(size=224).save_pretrained(folder)
    assert PvtV2ImageProcessor.from_protocol("timm", 224).size == {"shortest_edge": 248}
    for layout, lost in (("transformers", False), ("timm", True), ("original", True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pvtv2.export"):
            convert_checkpoint(folder, tmp_path / f"{layout}.safetensors", layout=layout)
        messages = [r.getMessage() for r in caplog.records if "holds weights only" in r.getMessage()]
        assert len(messages) == int(lost), (layout, messages)
        if lost:
            assert "the preprocessing" in messages[0] and "class names" not in messages[0]


def test_a_run_folder_given_as_model_names_the_checkpoint_to_pass(tmp_path, capsys):
    # training.md: "run/best/: the best checkpoint: pvtv2 predict --model pvtv2-demo/run/best IMAGE". Passing the run
    # folder (or the demo's folder) itself said only "no weights in folder"; it now names the checkpoint inside.
    best = _trained_folder(tmp_path)  # tmp_path/run/best
    image = _image(tmp_path)
    for given, meant in ((best.parent, best), (tmp_path, best)):
        assert main(["predict", "--model", str(given), str(image)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"pvtv2 predict: error: no weights in folder {str(given)!r}")
        assert err.endswith(f"; it holds a training run: pass {str(meant)!r}")
    assert main(["predict", "--model", str(meant), str(image), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["predictions"]) == 3


def test_a_resumed_run_logs_its_recipe_as_its_own(tmp_path, caplog, capsys):
    # training.md: "The run's first lines say which [recipe] and why". A resumed run said "recipe none (--recipe
    # none)", a flag nobody gave (run.json's stored value); it now says the recipe is the run's own.
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for name in ("a", "b"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                PIL.Image.fromarray(pixels).save(tmp_path / "data" / split / name / f"{i}.png")
    (tmp_path / "arch.json").write_text(json.dumps(dict(TINY, depths=[1, 1, 1, 1])))
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="pvtv2.training.runner"):
        assert main(["train", "--data", str(tmp_path / "data"), "--model", str(tmp_path / "arch.json"), "--output",
                     str(out), "--epochs", "1", "--image-size", "32", "--batch-size", "4", "--no-progress"]) == 0
    first = [r.getMessage() for r in caplog.records if r.getMessage().startswith("recipe ")]
    assert first[0].startswith("recipe none (a config.json architecture; --recipe deit turns it on)")
    assert json.loads((out / "run.json").read_text())["recipe"] == "none"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pvtv2.training.runner"):
        assert main(["train", "--output", str(out), "--resume", "--no-progress"]) == 0
    again = [r.getMessage() for r in caplog.records if r.getMessage().startswith("recipe ")]
    assert len(again) == 1 and again[0].startswith("recipe none (the run's own, as it was started): RandAugment off")


def test_eval_of_another_tasks_checkpoint_says_which_command_takes_it(tmp_path, capsys):
    # A plausible slip: `pvtv2 eval --model shapes/run/best --data DIR` without --task segmentation. The refusal
    # (no trained classifier) used to advise fine-tuning a classifier; it now says what the checkpoint is for.
    names = {0: "background", 1: "circle"}
    seg = random_weights_(PvtV2ForSemanticSegmentation(PvtV2Config(**TINY, id2label=names)), seed=4)
    seg.save_pretrained(tmp_path / "seg")
    assert json.loads((tmp_path / "seg" / "config.json").read_text())["architectures"] == [
        "PvtV2ForSemanticSegmentation"]
    (tmp_path / "data" / "circle").mkdir(parents=True)
    PIL.Image.open(_image(tmp_path)).save(tmp_path / "data" / "circle" / "0.png")
    assert main(["eval", "--model", str(tmp_path / "seg"), "--data", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"pvtv2 eval: error: {str(tmp_path / 'seg')!r} has no trained classifier")
    assert err.endswith("It is a segmentation model: pvtv2 eval --task segmentation scores it, pvtv2 segment draws it")
    # and one flag of the other task is named in the singular
    assert main(["eval", "--model", str(tmp_path / "seg"), "--data", str(tmp_path / "data"), "--flip"]) == 2
    assert capsys.readouterr().err.strip() == "pvtv2 eval: error: --flip applies to --task segmentation only"
