"""Hostile pass over pvtv2.training.engine.reconcile_classes as the three fine-tuning tasks use it: a model started
from a checkpoint whose classes come in another order must, before any training, give each class *name* the score
the checkpoint gives it (compared as numbers against the untouched checkpoint), whatever the names are (empty, told
apart by case only, one class), and names it cannot match are refused by name."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_SMALL_IMAGES, detections_by_name

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, PvtV2ForSemanticSegmentation
from pvtv2.training import TrainConfig
from pvtv2.training.classification import build_classifier
from pvtv2.training.segmentation import build_segmentation_model

ODD = ["Cat", "cat", "", "dog", " dog"]  # case only, empty, a leading space: five different names
SHUFFLED = ["dog", "", "cat", " dog", "Cat"]


def _by_name(logits: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    return {name: logits[:, i] for i, name in enumerate(names)}


def _classifier(tmp_path, names):
    torch.manual_seed(0)
    model = PvtV2ForImageClassification(PvtV2Config(**TINY_SMALL_IMAGES, id2label=dict(enumerate(names)))).eval()
    with torch.no_grad():
        model.classifier.bias.copy_(torch.arange(len(names), dtype=torch.float32))  # rows told apart clearly
    model.save_pretrained(tmp_path / "ckpt")
    return str(tmp_path / "ckpt"), model


def test_a_classifier_fine_tuned_on_odd_names_in_another_order_scores_each_name_as_the_checkpoint(tmp_path):
    source, original = _classifier(tmp_path, ODD)
    model = build_classifier(TrainConfig(model=source), SHUFFLED).eval()
    assert [model.config.id2label[i] for i in range(5)] == SHUFFLED
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = _by_name(model(x).logits, SHUFFLED), _by_name(original(x).logits, ODD)
    for name in ODD:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-5)
    assert model.config.label2id == {name: i for i, name in enumerate(SHUFFLED)}


def test_a_one_class_classifier(tmp_path):
    source, original = _classifier(tmp_path, ["only"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(build_classifier(TrainConfig(model=source), ["only"]).eval()(x).logits,
                                   original(x).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\('only', 'other'\).*--replace-head"):
        build_classifier(TrainConfig(model=source), ["other"])
    with pytest.raises(ValueError, match=r"\('only', 'Only'\)"):  # case is a different name: not matched silently
        build_classifier(TrainConfig(model=source), ["Only"])


def test_a_classifier_whose_checkpoint_names_a_class_twice(tmp_path):
    """ImageNet's two 'crane's: in the checkpoint's own order nothing changes; in another order the two rows cannot be
    told apart by name, so it is refused rather than one row serving both."""
    names = ["crane", "dog", "crane"]
    source, original = _classifier(tmp_path, names)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(build_classifier(TrainConfig(model=source), names).eval()(x).logits,
                                   original(x).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\('crane', 'dog'\).*--replace-head") as err:
        build_classifier(TrainConfig(model=source), ["dog", "crane", "crane"])
    # The same names, so "not the checkpoint's classes" alone left the reader to find why: the name given twice.
    assert "'crane' twice" in str(err.value)


TINY_SEG = dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 8, 8, 8], num_attention_heads=[1, 1, 1, 1], image_size=32)


def test_a_segmenter_fine_tuned_on_odd_names_in_another_order_scores_each_name_as_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    original = PvtV2ForSemanticSegmentation(PvtV2Config(**TINY_SEG, id2label=dict(enumerate(ODD)))).eval()
    with torch.no_grad():
        original.decode_head.classifier.bias.copy_(torch.arange(5, dtype=torch.float32))
    original.save_pretrained(tmp_path / "ckpt")
    cfg = TrainConfig(task="segmentation", model=str(tmp_path / "ckpt"), image_size=32)
    model = build_segmentation_model(cfg, dict(enumerate(SHUFFLED))).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = model(x).logits, original(x).logits
    for j, name in enumerate(SHUFFLED):
        torch.testing.assert_close(ours[:, j], theirs[:, ODD.index(name)], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"DIR/labels\.json"):
        build_segmentation_model(cfg, dict(enumerate(["CAT", "cat", "", "dog", " dog"])))


def _tiny_detector(detector, id2label):
    from pvtv2.models.detection import PvtV2ForObjectDetection

    torch.manual_seed(0)
    config = PvtV2Config(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 32, 64], num_attention_heads=[1, 1, 1, 1],
                         id2label=id2label, detector=detector, fpn_channels=64, min_size=64, max_size=128,
                         score_threshold=0.0)
    model = PvtV2ForObjectDetection(config)
    with torch.no_grad():
        for prefix in model.classifier_prefix:
            for p in model.get_submodule(prefix.rstrip(".")).parameters():
                p.add_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("detector", ["retinanet", "fcos", "mask_rcnn"])
def test_a_detector_fine_tuned_on_odd_names_in_another_order_finds_the_same_named_objects(tmp_path, detector):
    pytest.importorskip("torchvision")
    from pvtv2.training.detection import build_detector

    source = _tiny_detector(detector, dict(enumerate(ODD)))
    source.save_pretrained(tmp_path / "ckpt")
    cfg = TrainConfig(task="detection", model=str(tmp_path / "ckpt"), detector=detector, image_size=64)
    model = build_detector(cfg, dict(enumerate(SHUFFLED)))
    image = torch.rand(3, 64, 80)
    expected = detections_by_name(source, image)
    assert len({e[0] for e in expected}) >= 3
    assert detections_by_name(model, image) == expected
    if detector == "mask_rcnn":
        source.eval(), model.eval()
        with torch.no_grad():
            a, b = source([image])[0], model([image])[0]
        def keyed(out, names):  # each detection's mask, keyed by its class name, score and box
            return {(names[int(l)], round(float(s), 4), tuple(round(v, 2) for v in bx.tolist())): m
                    for l, s, bx, m in zip(out["labels"], out["scores"], out["boxes"], out["masks"])}

        ka, kb = keyed(a, ODD), keyed(b, SHUFFLED)
        assert ka.keys() == kb.keys()
        for key in ka:
            torch.testing.assert_close(ka[key], kb[key], rtol=1e-5, atol=1e-5)
