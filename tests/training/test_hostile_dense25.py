"""Hostile pass over the dense25 merge (class order on fine-tuning and evaluation, binary and 0/255 masks, depth's
--max-depth, EXIF-upright training): each test holds a defect found, against an independent computation (the
untouched model's own outputs, NumPy by hand)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pvtv2 import PvtV2Config
from conftest import detections_by_name


def _tiny_detector(detector: str, id2label: dict[int, str], **extra):
    from pvtv2.models.detection import PvtV2ForObjectDetection

    torch.manual_seed(0)
    config = PvtV2Config(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 32, 64], num_attention_heads=[1, 1, 1, 1],
                         id2label=id2label, detector=detector, fpn_channels=64, min_size=64, max_size=128,
                         score_threshold=0.0, **extra)
    model = PvtV2ForObjectDetection(config)
    with torch.no_grad():  # class-sized layers whose rows differ clearly
        for prefix in model.classifier_prefix:
            for p in model.get_submodule(prefix.rstrip(".")).parameters():
                p.add_(torch.randn_like(p))
    return model


def test_a_faster_rcnn_fine_tuned_as_mask_rcnn_on_its_classes_in_another_order_finds_the_same_objects(tmp_path):
    """A saved Faster R-CNN fine-tuned as a Mask R-CNN (its box predictor loads, the mask predictor is new): one new
    class-sized layer made the whole detector count as untrained, so its box predictor was neither permuted to the
    data's order (every detection changed class) nor refused under other names."""
    pytest.importorskip("torchvision")
    from pvtv2.training import TrainConfig
    from pvtv2.training.detection import build_detector

    source = _tiny_detector("faster_rcnn", {0: "a", 1: "b", 2: "c"})
    source.save_pretrained(tmp_path / "ckpt")
    cfg = TrainConfig(task="detection", model=str(tmp_path / "ckpt"), detector="mask_rcnn", image_size=64)
    model = build_detector(cfg, {0: "c", 1: "a", 2: "b"})
    image = torch.rand(3, 64, 80)
    expected = detections_by_name(source, image)
    assert len(expected) > 10 and len({e[0] for e in expected}) >= 2
    assert detections_by_name(model, image) == expected
    with pytest.raises(ValueError, match="--replace-head"):
        build_detector(cfg, {0: "x", 1: "y", 2: "z"})
    replaced = build_detector(dataclasses.replace(cfg, replace_head=True), {0: "x", 1: "y", 2: "z"})
    layer = "detector.roi_heads.box_predictor.cls_score"
    assert not torch.equal(replaced.get_submodule(layer).weight, source.get_submodule(layer).weight)


TINY_SEG = dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 8, 8, 8], num_attention_heads=[1, 1, 1, 1], image_size=32)


def test_fine_tuning_a_segmenter_on_a_labels_json_with_a_gap_is_refused_by_name(tmp_path):
    """labels.json {"0": "a", "2": "b", "3": "c"} (class 1 left out): fine-tuning a checkpoint stopped with a bare
    ``KeyError: 1`` (the new class-order check read the classes as 0..N-1); a new model says which keys it needs."""
    from pvtv2 import PvtV2ForSemanticSegmentation
    from pvtv2.training import TrainConfig
    from pvtv2.training.segmentation import build_segmentation_model

    PvtV2ForSemanticSegmentation(PvtV2Config(**TINY_SEG, id2label={0: "a", 1: "b", 2: "c"})).save_pretrained(
        tmp_path / "ckpt")
    for model in (str(tmp_path / "ckpt"), "tiny"):
        cfg = TrainConfig(task="segmentation", model=model, image_size=32)
        with pytest.raises(ValueError, match=r"0\.\.2.*\[0, 2, 3\]"):
            build_segmentation_model(cfg, {0: "a", 2: "b", 3: "c"})
    cfg = TrainConfig(task="segmentation", model=str(tmp_path / "ckpt"), image_size=32)
    with pytest.raises(ValueError, match=r"'a'.*twice|twice.*'a'"):  # one name for two classes: told apart by name
        build_segmentation_model(cfg, {0: "a", 1: "a", 2: "b"})


def test_masks_whose_first_32_hold_only_background_and_ignored_pixels_are_not_refused_as_black_and_white(tmp_path):
    """A defect data set: 32 defect-free images first in name order (background 0 with an unlabelled border 255),
    then one with a defect (class 1). The 0/255 check judged from the first 32 alone and refused it as black-and-white
    masks; a real black-and-white set (all 0/255) is still refused."""
    import numpy as np
    import PIL.Image

    from pvtv2.data.masks import check_not_binary_255

    folder = tmp_path / "masks"
    folder.mkdir()
    pairs = []
    for i in range(33):
        mask = np.zeros((8, 8), dtype=np.uint8)
        mask[0] = 255  # unlabelled border
        if i == 32:
            mask[4:6, 4:6] = 1  # the defect
        path = folder / f"{i:03d}.png"
        PIL.Image.fromarray(mask).save(path)
        pairs.append((path, path))
    check_not_binary_255(pairs)  # held: class 1 is in the 33rd mask
    (folder / "032.png").unlink()
    PIL.Image.fromarray(np.full((8, 8), 255, dtype=np.uint8)).save(folder / "032.png")
    with pytest.raises(ValueError, match="hold only 0 and 255"):
        check_not_binary_255(pairs)


def test_pvtv2_segment_counts_a_binary_models_pixels_under_the_names_of_its_legend(tmp_path, capsys):
    """A one-class model ("crack") predicting its class on every pixel: the legend said "crack" (label_map_names),
    but the printed "pixels per class" read the label map through id2label, where 1 has no name and 0 is "crack":
    {"1": 3500} here, and {"crack": N} for the background pixels of any other image."""
    import json

    import numpy as np
    import PIL.Image

    from pvtv2 import PvtV2ForSemanticSegmentation
    from pvtv2.cli import main

    for bias, expected in ((5.0, {"crack": 50 * 70}), (-5.0, {"not crack": 50 * 70})):
        model = PvtV2ForSemanticSegmentation(PvtV2Config(**TINY_SEG, id2label={0: "crack"}))
        with torch.no_grad():  # a logit of `bias` at every pixel: sigmoid 0.993 (the class) or 0.007 (not)
            model.decode_head.classifier.weight.zero_()
            model.decode_head.classifier.bias.fill_(bias)
        model.save_pretrained(tmp_path / "m")
        PIL.Image.fromarray(np.full((50, 70, 3), 90, dtype=np.uint8)).save(tmp_path / "in.png")
        assert main(["segment", str(tmp_path / "in.png"), "-m", str(tmp_path / "m"), "-o", str(tmp_path / "o.png"),
                     "--size", "32"]) == 0
        assert json.loads(capsys.readouterr().out.split("pixels per class: ")[1]) == expected


def test_a_segformer_checkpoint_whose_processor_writes_its_size_as_one_number_is_predicted_at_that_square(tmp_path):
    """The published SegFormer checkpoints' preprocessor_config.json say ``"size": 512`` (the feature extractor's
    form), which transformers reads as 512x512; only the ``{"height", "width"}`` form was read, so these were
    predicted at the config's default 224x224 again. transformers' own processor is the reference."""
    import json

    import numpy as np
    import PIL.Image

    transformers = pytest.importorskip("transformers")
    from pvtv2.inference import load_segmenter, predict_segmentation

    torch.manual_seed(0)
    config = transformers.SegformerConfig(depths=[1, 1, 1, 1], hidden_sizes=[16, 16, 32, 32], decoder_hidden_size=32,
                                          num_attention_heads=[1, 1, 1, 1], num_labels=4)
    reference = transformers.SegformerForSemanticSegmentation(config).eval()
    with torch.no_grad():
        for p in reference.decode_head.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    reference.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({  # as on the hub (nvidia/segformer-*)
        "do_normalize": True, "do_resize": True, "feature_extractor_type": "SegformerFeatureExtractor",
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "reduce_labels": False,
        "resample": 2, "size": 96,
    }))
    processor = transformers.SegformerImageProcessor.from_pretrained(tmp_path)
    assert (processor.size["height"], processor.size["width"]) == (96, 96)
    model = load_segmenter(tmp_path)
    assert tuple(model.config.image_size) == (96, 96)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 150, 3), dtype=np.uint8))
    with torch.no_grad():
        logits = reference(**processor(image, return_tensors="pt")).logits
    expected = torch.nn.functional.interpolate(logits, size=(70, 150), mode="bilinear").argmax(1)[0].numpy()
    assert (predict_segmentation(model, image) == expected).mean() > 0.98


def test_a_max_depth_at_or_under_the_metrics_floor_is_refused_before_training(tmp_path):
    """--max-depth 0.001 (1 mm, the metrics' min_depth) passed the config check and failed every evaluation after a
    whole epoch ("need 0 < min_depth < max_depth"): the metrics keep depths in (0.001, max_depth)."""
    from pvtv2.training import TrainConfig
    from pvtv2.training.depth import depth_metrics

    with pytest.raises(ValueError, match="min_depth < max_depth"):  # what evaluation did with it
        depth_metrics(torch.ones(2, 2), torch.ones(2, 2), min_depth=1e-3, max_depth=1e-3)
    for bad in (1e-3, 5e-4):
        with pytest.raises(ValueError, match=r"--max-depth must be a finite number > 0\.001"):
            TrainConfig(task="depth", max_depth=bad, output=str(tmp_path)).validate()
    TrainConfig(task="depth", max_depth=0.5, output=str(tmp_path)).validate()


def test_validation_masks_drawn_black_and_white_are_refused_when_the_training_ones_are_0_and_1(tmp_path, capsys):
    """Training masks converted to 0/1, validation masks left as 0/255 pictures: only the training masks were
    checked, so validation ignored every object pixel and scored background alone (its IoU near 1, the class's
    never counted) while best/ was chosen by that number."""
    import numpy as np
    import PIL.Image

    from pvtv2.cli import main

    rng = np.random.default_rng(0)
    for split, value in (("train", 1), ("val", 255)):
        for sub in ("images", "masks"):
            (tmp_path / "data" / split / sub).mkdir(parents=True)
        for i in range(3):
            mask = np.zeros((32, 32), dtype=np.uint8)
            mask[8:24, 8:24] = value
            PIL.Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "data" / split / "images" / f"{i}.png")
            PIL.Image.fromarray(mask).save(tmp_path / "data" / split / "masks" / f"{i}.png")
    out = tmp_path / "run"
    code = main(["train-seg", str(tmp_path / "data"), "--output", str(out), "--epochs", "1", "--image-size", "32",
                 "--batch-size", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "hold only 0 and 255" in err and "val" in err
    assert not out.exists()


def test_one_class_reconciliation_for_every_task():
    """Classification, segmentation and detection fine-tuning decide the same way (pvtv2.training.engine): the same
    names in another order give the permutation that maps each data class to its checkpoint row; names given twice
    cannot be matched (ImageNet's id2label holds "crane" twice: the first row served both), so they are refused
    like other names; --replace-head and generic checkpoint names as asked."""
    from pvtv2.training.engine import reconcile_classes

    names = ["cat", "dog", "owl", "eel"]
    order = reconcile_classes(names, ["owl", "cat", "eel", "dog"], replace_head=False, generic=False, new_layers="x")
    assert [names[i] for i in order] == ["owl", "cat", "eel", "dog"]
    assert order == [2, 0, 3, 1]
    with pytest.raises(ValueError, match=r"pairs differ, e\.g\. \[\('crane', 'dog'\)") as err:
        reconcile_classes(["crane", "crane", "dog"], ["dog", "crane", "crane"], replace_head=False, generic=False,
                          new_layers="a new head")
    assert str(err.value).endswith("Pass --replace-head to train a new head for the dataset's classes.")
    with pytest.raises(ValueError, match=r"name them as the checkpoint does \(DIR/labels\.json\)$"):
        reconcile_classes(names, ["a", "b", "c", "d"], replace_head=False, generic=False, new_layers="x",
                          names_from="DIR/labels.json")
    assert reconcile_classes(names, ["a", "b", "c", "d"], replace_head=True, generic=False, new_layers="x") == "replace"
    assert reconcile_classes(names, ["a", "b", "c", "d"], replace_head=False, generic=True, new_layers="x") == "take"
    # The same names in another order are matched even with --replace-head (as the flag's help says).
    assert reconcile_classes(names, names[::-1], replace_head=True, generic=False, new_layers="x") == [3, 2, 1, 0]
