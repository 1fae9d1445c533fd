"""A hostile user's pass over what docs pass 24 changed (eval's class folders, load_processor's size, --size, convert's
preprocessing warning, visualize's captions, unknown flags)."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from sklearn.datasets import load_digits

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, PvtV2ImageProcessor
from pvtv2.cli import main
from pvtv2.inference import class_mapping

from conftest import TINY, random_weights_


def _digits_folder(root, folders: dict[str, int], per_class: int = 2) -> None:
    """root/<folder>/*.png: sklearn's 8x8 digits of the given digit, enlarged to 32 px (nearest), as RGB."""
    digits = load_digits()
    for folder, digit in folders.items():
        (root / folder).mkdir(parents=True)
        for index in np.flatnonzero(digits.target == digit)[:per_class]:
            pixels = (digits.images[index] * 255 / 16).round().astype(np.uint8)
            image = PIL.Image.fromarray(pixels).resize((32, 32), PIL.Image.Resampling.NEAREST).convert("RGB")
            image.save(root / folder / f"{index}.png")


def test_label_named_class_folders_mixed_or_misspelt_are_refused_not_scored_as_other_classes(tmp_path, capsys):
    # With as many folders as classes, sorted order took over as soon as one folder was not an exact LABEL_i: LABEL_1
    # beside 'a' and 'b' was scored as class 0, label_10 of twelve lowercase folders as class 2, LABEL_-1 shifted
    # LABEL_0 to class 1; all silently. Such folders are now refused, naming them.
    three = {i: f"LABEL_{i}" for i in range(3)}
    twelve = {i: f"LABEL_{i}" for i in range(12)}
    with pytest.raises(ValueError) as error:
        class_mapping(["LABEL_1", "a", "b"], three)
    assert str(error.value) == (
        "class folders ['LABEL_1'] are named after the model's labels and ['a', 'b'] are not: name every folder "
        "LABEL_i (i its class, 0 ... 2), or none (sorted folders are then classes 0, 1, ..., one per class)")
    for folders, named in ((["LABEL_-1", "LABEL_0", "LABEL_1"], ["LABEL_-1"]),
                           (["LABEL_01", "LABEL_1", "LABEL_2"], ["LABEL_01"]),
                           (["label_2", "label_0", "label_1"], ["label_0", "label_1", "label_2"]),
                           (["LABEL_0", "LABEL_1", "LABEL_2", "LABEL_3"], ["LABEL_3"]),
                           (["LABEL_0 ", "b", "c"], ["LABEL_0 "])):
        with pytest.raises(ValueError) as error:
            class_mapping(folders, three)
        assert str(error.value) == (
            f"class folder(s) {named} look like label names but are none of the model's: its 3 class(es) are "
            f"named LABEL_0 ... LABEL_2, in that spelling and case (rename the folders, or give the model its class "
            f"names: id2label in its config.json)"), folders
    with pytest.raises(ValueError, match=r"class folder\(s\) \['label_0', 'label_1', 'label_10', "):
        class_mapping([f"label_{i}" for i in range(12)], twelve)
    # what held: exact names by name, other names in sorted order one per class, named models by name
    assert class_mapping(["LABEL_2", "LABEL_0", "LABEL_1"], three) == {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}
    assert class_mapping(["c", "a", "b"], three) == {"a": 0, "b": 1, "c": 2}
    assert class_mapping(["LABEL_0", "cat"], {0: "LABEL_0", 1: "cat"}) == {"LABEL_0": 0, "cat": 1}

    # The command on sklearn's digits: LABEL_2, LABEL_10 and LABEL_11 of a 12-class model are scored as classes
    # 2, 10 and 11 (checked against the model's own logits); one folder renamed label_10 is refused, naming it.
    model = random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=12, image_size=32)), seed=5)
    model.save_pretrained(tmp_path / "model")
    data = tmp_path / "digits"
    _digits_folder(data, {"LABEL_2": 2, "LABEL_10": 0, "LABEL_11": 1})
    assert main(["eval", "--model", str(tmp_path / "model"), "--data", str(data), "--json", "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out)
    processor = PvtV2ImageProcessor(size=32)
    logits, labels = [], []
    for folder, label in (("LABEL_2", 2), ("LABEL_10", 10), ("LABEL_11", 11)):
        for path in sorted((data / folder).iterdir()):
            pixels = processor(PIL.Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                logits.append(model.eval()(pixels).logits[0])
            labels.append(label)
    logits, labels = torch.stack(logits), torch.tensor(labels)
    assert got["images"] == 6 and got["classes"] == 3
    assert got["top1"] == pytest.approx((logits.argmax(-1) == labels).double().mean().item(), abs=1e-12)
    assert got["top5"] == pytest.approx((logits.topk(5, -1).indices == labels[:, None]).any(1).double().mean().item(),
                                        abs=1e-12)
    assert got["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    (data / "LABEL_10").rename(data / "label_10")
    assert main(["eval", "--model", str(tmp_path / "model"), "--data", str(data), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "pvtv2 eval: error: class folder(s) ['label_10'] look like label names but are none of the model's: its 12 "
        "class(es) are named LABEL_0 ... LABEL_11, in that spelling and case (rename the folders, or give the model "
        "its class names: id2label in its config.json)")


def test_load_processor_refuses_a_bool_or_bytes_size_and_takes_numpy_pairs(tmp_path):
    # True is an index (1), so load_processor(source, True) built a 1x1 resize; b"32" is a Sequence of ints, so it
    # was a 51x50 one (the bytes of '3' and '2'): both silently. A numpy pair (as (40, 56) was read before one number
    # was accepted) is taken again.
    from pvtv2.inference import load_processor

    (tmp_path / "config.json").write_text("{}")
    assert (ord("3"), ord("2")) == (51, 50)
    for bad in (True, False, (True, 32), b"32", bytearray(b"32"), np.array([40.0, 56.0]), np.array([[40, 56]])):
        with pytest.raises(ValueError) as error:
            load_processor(tmp_path, bad)
        assert str(error.value) == f"image_size must be a positive side or a (height, width) pair, got {bad!r}"
    assert load_processor(tmp_path, np.array([40, 56])).size == {"height": 40, "width": 56}
    assert load_processor(tmp_path, np.int64(48)).size == {"height": 48, "width": 48}
    assert load_processor(tmp_path, (np.int32(40), 56)).size == {"height": 40, "width": 56}


def test_size_flag_refuses_an_empty_side_or_a_non_digit(tmp_path, capsys):
    # "--size 32x" ran at 32x32 and "--size 32x64x" at 32x64 (empty sides were skipped), "--size 32_0" at 320 (int()
    # takes underscores): sizes nobody typed. Each side must now be plain digits; refused before the model is read
    # (the model path does not exist).
    from pvtv2.cli import _size_flag

    image = tmp_path / "room.png"
    PIL.Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(image)
    out = tmp_path / "out.png"
    for value in ("32x", "x32", "32x64x", "32_0", "1e2", "+64", "\uff13\uff12", "", "x", "64x64x64"):
        for command in ("depth", "visualize", "segment"):
            code = main([command, "--model", str(tmp_path / "no-model"), str(image), "-o", str(out), f"--size={value}"])
            assert code == 2 and not out.exists()
            assert capsys.readouterr().err.strip().splitlines() == [
                f"pvtv2 {command}: error: --size must be N or HxW (digits, e.g. 512 or 480x640), got {value!r}"]
    for value in ("0x32", "-32", "32x-32"):
        argv = ["depth", "--model", str(tmp_path / "no-model"), str(image), "-o", str(out), f"--size={value}"]
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == (
            f"pvtv2 depth: error: --size must be N or HxW with positive numbers, got {value!r}")
    # what held: the spellings docs/dense.md and the flags' help use, and spaces around a side
    assert [_size_flag(v) for v in ("48", "480x640", "480X640", "480,640", " 64 x 96 ")] == [
        (48, 48), (480, 640), (480, 640), (480, 640), (64, 96)]


def test_visualize_captions_name_the_grids_in_the_order_of_the_input_size(tmp_path, caplog):
    # --size 33x47 (height x width): the first panel said "model input 47x33" (width x height) and stage 1 "tokens
    # 9x12" (rows x columns): the grid read as transposed. The grids are now width x height too, and the single-key
    # warning, which points at --size, names its order.
    import logging

    from pvtv2.visualize import _grid_caption, _input_captions, attention_figure, attention_maps

    model = random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY)), seed=1).eval()
    assert model.config.sr_ratios == [8, 4, 2, 1]
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    processor = PvtV2ImageProcessor(size={"height": 33, "width": 47})
    pixels = processor(image, return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape[-2:]) == (33, 47)
    # token grids by the convolutions' arithmetic: a 7x7 stride-4 patch embedding, then 3x3 stride-2 ones (padded)
    rows, cols, expected = 33, 47, []
    for stage, (kernel, stride, reduction) in enumerate(((7, 4, 8), (3, 2, 4), (3, 2, 2), (3, 2, 1))):
        pad = kernel // 2
        rows, cols = (rows + 2 * pad - kernel) // stride + 1, (cols + 2 * pad - kernel) // stride + 1
        expected.append(f"tokens {cols}x{rows}, keys {cols // reduction}x{rows // reduction}")
    assert expected == ["tokens 12x9, keys 1x1", "tokens 6x5, keys 1x1", "tokens 3x3, keys 1x1", "tokens 2x2, keys 2x2"]
    assert [_grid_caption(entry) for entry in attention_maps(model, pixels)] == expected
    assert _input_captions(image, pixels) == ("image 50x40", "model input 47x33")
    with caplog.at_level(logging.WARNING, logger="pvtv2.visualize"):
        attention_figure(model, image, processor)
    assert [r.getMessage().split(", stage(s)")[0] for r in caplog.records] == [
        "at a 33x47 model input (height x width, as --size takes it)"]
    assert "stage(s) 1, 2, 3 attend over a single key" in caplog.text


def test_convert_to_a_single_file_is_not_stopped_by_an_unreadable_preprocessor_config(tmp_path, caplog):
    # Converting to a single weights file read the source's preprocessor_config.json only to say whether the file
    # loses it; a corrupt one (not JSON, wrong types) stopped the conversion of the weights. It now converts, the
    # warning names the unreadable file, and the weights are the source's.
    import logging

    from safetensors.torch import load_file

    from pvtv2.export import convert_checkpoint

    model = random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=3, image_size=32)), seed=6)
    for name, text, reason in (("bad", "not json {", "not valid JSON"),
                               ("types", '{"do_resize": "yes"}', "do_resize must be True or False, got 'yes'")):
        folder = tmp_path / name
        model.save_pretrained(folder)
        (folder / "preprocessor_config.json").write_text(text)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pvtv2.export"):
            convert_checkpoint(folder, tmp_path / f"{name}.safetensors", layout="transformers")
        lost = [r.getMessage() for r in caplog.records if "holds weights only" in r.getMessage()]
        assert len(lost) == 1 and "the image size (32x32)" in lost[0]
        assert "the preprocessing (unreadable: " in lost[0] and reason in lost[0]
        assert str(folder / "preprocessor_config.json") in lost[0]
        # transformers' layout is the model's own: the file is its state dict, tensor for tensor
        written, expected = load_file(tmp_path / f"{name}.safetensors"), model.state_dict()
        assert sorted(written) == sorted(expected)
        assert all(torch.equal(written[key], expected[key]) for key in expected)


def test_an_option_of_pvtv2_itself_after_the_command_says_where_it_goes(tmp_path, capsys):
    # "pvtv2 predict ... --verbose" said "unrecognized arguments: --verbose; see pvtv2 predict --help", whose help
    # does not list it (it is pvtv2's own, read before the command); "---" was offered "--top-k".
    image = tmp_path / "x.png"
    model = str(tmp_path / "m")
    cases = (
        (["--verbose"],
         "--verbose (an option of pvtv2 itself: give it before the command, pvtv2 --verbose predict ...)"),
        (["-v"], "-v (an option of pvtv2 itself: give it before the command, pvtv2 -v predict ...)"),
        (["--verbse"], "--verbse (did you mean --verbose? an option of pvtv2 itself, given before the command)"),
        (["---"], "---"),
        (["--topk", "3"], "--topk (did you mean --top-k?) 3"),
    )
    for flags, text in cases:
        assert main(["predict", "--model", model, str(image), *flags]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"pvtv2 predict: error: unrecognized arguments: {text}; see pvtv2 predict --help"], flags
    # what held: before the command it is read (verbose: the command's own error, the missing image, propagates)
    with pytest.raises(FileNotFoundError, match="image path"):
        main(["--verbose", "predict", "--model", model, str(image)])
    assert "unrecognized" not in capsys.readouterr().err


def test_predict_depth_takes_one_side_and_refuses_other_shapes_by_name():
    # predict_depth(model, image, 64) failed "'int' object is not subscriptable" (load_processor takes one number),
    # (32, 32, 32) ran at 32x32, (64,) raised IndexError and "64" "not all arguments converted during string
    # formatting". One number is now the square side, anything but a pair of positive integers a ValueError naming it.
    from pvtv2 import PvtV2ForDepthEstimation
    from pvtv2.inference import predict_depth

    torch.manual_seed(0)
    model = PvtV2ForDepthEstimation(PvtV2Config(**TINY)).eval()
    image = PIL.Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 70, 3), dtype=np.uint8))
    # the reference: GLPN's preprocessing written out (resize to 64x64, rescale to [0, 1]), the model, bilinear back
    resized = np.asarray(image.resize((64, 64), PIL.Image.Resampling.BILINEAR), dtype=np.float32) / 255
    with torch.no_grad():
        depth = model(torch.from_numpy(resized).permute(2, 0, 1)[None], return_dict=True).predicted_depth
    reference = torch.nn.functional.interpolate(depth[:, None], size=(40, 70), mode="bilinear", align_corners=False)
    for size in (64, (64, 64), np.int64(64)):
        got = predict_depth(model, image, size)
        assert got.shape == (40, 70)
        assert np.abs(got - reference[0, 0].numpy()).max() < 1e-4 * max(1.0, float(np.abs(got).max()))
    for bad in ((32, 32, 32), (64,), "64", b"@@", (True, 32), (64.0, 64.0), (-32, 64), 0, True, 64.0):
        with pytest.raises(ValueError) as error:
            predict_depth(model, image, bad)
        assert str(error.value) == f"size must be a positive integer or a (height, width) pair of them, got {bad!r}"
    with pytest.raises(ValueError, match=r"^size must be multiples of 32 per side \(GLPN's decoder\), got 48x64$"):
        predict_depth(model, image, (48, 64))


def test_visualize_size_keeps_the_checkpoints_normalisation(tmp_path, capsys):
    # visualize --size built a fresh processor with ImageNet's statistics, dropping the checkpoint's own (here mean
    # and std 0.5, bicubic): the maps were those of inputs the model never sees. --size now sets the geometry only.
    from pvtv2.visualize import attention_figure

    config = PvtV2Config(**TINY, num_labels=3, image_size=32)
    model = random_weights_(PvtV2ForImageClassification(config), seed=7).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    own = {"resample": "bicubic", "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    PvtV2ImageProcessor(size=32, **own).save_pretrained(folder)
    image_path = tmp_path / "photo.png"
    PIL.Image.fromarray(np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(image_path)
    out = tmp_path / "a.png"
    assert main(["visualize", "--model", str(folder), str(image_path), "-o", str(out), "--size", "64x96",
                 "--panel-size", "64"]) == 0
    got = np.asarray(PIL.Image.open(out).convert("RGB"), dtype=np.int16)
    image = PIL.Image.open(image_path).convert("RGB")
    kept = attention_figure(model, image, PvtV2ImageProcessor(size={"height": 64, "width": 96}, **own), panel_size=64)
    imagenet = attention_figure(model, image, PvtV2ImageProcessor(size={"height": 64, "width": 96}), panel_size=64)
    assert np.array_equal(got, np.asarray(kept, dtype=np.int16))
    # and the statistics matter: ImageNet's give another picture
    assert np.abs(got - np.asarray(imagenet, dtype=np.int16)).max() > 10


def test_a_name_as_near_to_every_preset_names_none_of_them(capsys):
    # "pvt_v2" and "pvt_v2_b6" are as near to each size (difflib's ratio ties); the hint named the last of the tie,
    # pvt_v2_b5 (82M parameters), a guess. They now get the list of presets alone.
    import difflib

    import pvtv2

    presets = pvtv2.list_presets()
    for typo in ("pvt_v2", "pvt_v2_b6"):
        ratios = sorted(difflib.SequenceMatcher(None, typo, name).ratio() for name in presets)
        assert ratios[-1] == ratios[-2] >= 0.75  # a tie, above the hint's cutoff
        assert main(["info", typo]) == 2
        assert capsys.readouterr().err.strip() == (
            f"pvtv2 info: error: {typo!r} is not an existing file or folder, a preset name, nor a hub id "
            f"'owner/name' (the presets are {', '.join(presets)})")
    # what held: a single nearest preset is named
    assert main(["info", "pvt_v2_b2_l"]) == 2
    assert "(did you mean 'pvt_v2_b2_li'? the presets are" in capsys.readouterr().err


def test_a_flag_of_another_command_is_not_offered_an_unrelated_flag(tmp_path, capsys):
    # "pvtv2 eval ... --top-k 3" (predict's flag) was answered "did you mean --task?": the shared leading dashes
    # made "--top-k" and "--task" look alike (difflib ratio 0.62 with them, 0.44 without). Spellings are compared
    # without the dashes now.
    import difflib

    assert difflib.SequenceMatcher(None, "--top-k", "--task").ratio() >= 0.6
    assert difflib.SequenceMatcher(None, "top-k", "task").ratio() < 0.6
    data, model = str(tmp_path / "d"), str(tmp_path / "m")
    for argv, text in ((["eval", "--model", model, "--data", data, "--top-k", "3"], "--top-k 3"),
                       (["segment", "-m", model, "x.png", "-o", "o.png", "--panel-size", "64"], "--panel-size 64"),
                       (["depth", "-m", model, "x.png", "-o", "o.png", "--sizes", "64"],
                        "--sizes (did you mean --size?) 64"),
                       (["predict", "-m", model, "x.png", "--jsn"], "--jsn (did you mean --json?)")):
        assert main(argv) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"pvtv2 {argv[0]}: error: unrecognized arguments: {text}; see pvtv2 {argv[0]} --help"], argv


def test_a_malformed_architectures_field_does_not_stop_a_trained_classifier(tmp_path, capsys):
    # The other-task hint iterated config.json's "architectures" (bookkeeping) as it came: a hand-edited 5 stopped
    # predict on a trained classifier with "'int' object is not iterable", [["x"]] with "unhashable type: 'list'".
    from pvtv2 import PvtV2Model

    model = random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=3, image_size=32)), seed=8)
    image = tmp_path / "photo.png"
    PIL.Image.fromarray(np.random.default_rng(4).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(image)
    with torch.no_grad():
        pixels = PvtV2ImageProcessor(size=32)(PIL.Image.open(image).convert("RGB"), return_tensors="pt")["pixel_values"]
        reference = model.eval()(pixels).logits[0].softmax(-1).tolist()
    for n, value in enumerate((5, [["x"]], {"a": 1})):
        folder = tmp_path / f"m{n}"
        model.save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        config["architectures"] = value
        (folder / "config.json").write_text(json.dumps(config))
        assert main(["predict", "--model", str(folder), str(image), "--json", "--top-k", "3", "--no-progress"]) == 0
        got = {p["index"]: p["score"] for p in json.loads(capsys.readouterr().out)[0]["predictions"]}
        assert max(abs(got[i] - reference[i]) for i in range(3)) < 1e-6, value
    # an encoder whose architectures is one string (not a list) is still named for its task
    encoder = tmp_path / "encoder"
    random_weights_(PvtV2Model(PvtV2Config(**TINY)), seed=8).save_pretrained(encoder)
    config = json.loads((encoder / "config.json").read_text())
    config["architectures"] = "PvtV2ForDepthEstimation"
    (encoder / "config.json").write_text(json.dumps(config))
    assert main(["predict", "--model", str(encoder), str(image)]) == 2
    assert capsys.readouterr().err.strip().endswith("It is a depth model: pvtv2 depth draws it")
