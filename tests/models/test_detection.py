"""Detection models: torchvision's detectors on the PVTv2 encoder, against the same detectors on timm's encoder, the
original configs' FPN levels, saving and loading, frozen parts, and clear errors."""

from __future__ import annotations

import ast
import logging
import math
import sys
from collections import OrderedDict
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet  # noqa: E402
from torchvision.models.detection.faster_rcnn import _default_anchorgen as rcnn_anchors  # noqa: E402
from torchvision.models.detection.retinanet import _default_anchorgen as retinanet_anchors  # noqa: E402

from pvtv2 import IMAGENET_MEAN, IMAGENET_STD, PvtV2Config, PvtV2ForImageClassification, fast  # noqa: E402
from pvtv2.models.detection import DETECTORS, PvtV2ForObjectDetection, detection_config  # noqa: E402
from pvtv2.runtime import MissingDependencyError  # noqa: E402
from pvtv2.weights.layouts import convert_state_dict  # noqa: E402

from conftest import TINY_SHALLOW, perturb_  # noqa: E402

# Small images: the detector's own resize is overridden (the original's 800 / 1333 are the defaults).
SMALL = dict(min_size=96, max_size=128)
LABELS = {0: "cat", 1: "dog", 2: "bird"}
# timm's (and the original code's) LayerNorm epsilon after the patch embeddings and the spatial reduction.
TIMM_EPS = dict(patch_embed_layer_norm_eps=1e-5, reduction_layer_norm_eps=1e-5)
SRC = Path(__file__).resolve().parents[2] / "src" / "pvtv2"


def tiny_detector(detector: str, seed: int = 0, **changes) -> PvtV2ForObjectDetection:
    torch.manual_seed(seed)
    config = PvtV2Config(**{**TINY_SHALLOW, **TIMM_EPS, "id2label": LABELS, "detector": detector, **SMALL, **changes})
    return PvtV2ForObjectDetection(config).eval()


def images(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 80, 100, generator=gen), torch.rand(3, 96, 72, generator=gen)]


def targets(detector: str) -> list[dict[str, torch.Tensor]]:
    out = [
        dict(boxes=torch.tensor([[10.0, 12.0, 45.0, 60.0], [50.0, 5.0, 90.0, 40.0]]), labels=torch.tensor([0, 2])),
        dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64)),  # a negative image
    ]
    if detector == "mask_rcnn":
        masks = torch.zeros(2, 80, 100, dtype=torch.uint8)
        masks[0, 12:60, 10:45] = 1
        masks[1, 5:40, 50:90] = 1
        out[0]["masks"] = masks
        out[1]["masks"] = torch.zeros(0, 96, 72, dtype=torch.uint8)
    return out


# ---------------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize(
    "detector, stages, strides, names",
    [
        ("retinanet", [2, 3, 4], [8, 16, 32, 64, 128], ["0", "1", "2", "p6", "p7"]),
        ("fcos", [2, 3, 4], [8, 16, 32, 64, 128], ["0", "1", "2", "p6", "p7"]),
        ("faster_rcnn", [1, 2, 3, 4], [4, 8, 16, 32, 64], ["0", "1", "2", "3", "pool"]),
        ("mask_rcnn", [1, 2, 3, 4], [4, 8, 16, 32, 64], ["0", "1", "2", "3", "pool"]),
    ],
)
def test_fpn_levels_and_strides_match_the_original_configs(detector, stages, strides, names):
    model = tiny_detector(detector, min_size=256, max_size=320)
    config = model.config
    assert config.fpn_stages == stages and config.fpn_channels == 256
    assert model.feature_strides == strides
    fpn = model.detector.backbone.fpn
    # The FPN's lateral 1x1 convolutions read exactly the stages of the original config.
    assert [block[0].in_channels for block in fpn.inner_blocks] == [config.hidden_sizes[s - 1] for s in stages]
    batch = model.detector.transform([torch.rand(3, 256, 320)])[0].tensors  # (1, 3, 256, 320): 256 is min_size
    assert batch.shape[-2:] == (256, 320)
    with torch.no_grad():
        levels = model.detector.backbone(batch)
    assert list(levels) == names
    for stride, level in zip(strides, levels.values()):
        assert level.shape[1:] == (256, math.ceil(256 / stride), math.ceil(320 / stride)), (stride, level.shape)


@pytest.mark.parametrize("detector", DETECTORS)
def test_anchors_are_torchvisions_for_the_original_strides(detector):
    """RetinaNet: mmdetection's octave anchors (torchvision's default); RPN: 32 ... 512; FCOS: one point per stride."""
    model = tiny_detector(detector).detector
    generator = model.rpn.anchor_generator if detector in ("faster_rcnn", "mask_rcnn") else model.anchor_generator
    if detector == "fcos":  # torchvision's FCOS default, written out in its constructor
        assert generator.sizes == ((8,), (16,), (32,), (64,), (128,))
        assert generator.aspect_ratios == ((1.0,),) * 5
        return
    reference = retinanet_anchors() if detector == "retinanet" else rcnn_anchors()
    assert generator.sizes == reference.sizes
    assert generator.aspect_ratios == reference.aspect_ratios


@pytest.mark.parametrize("hidden_sizes, heads", [([32, 64, 160, 256], [1, 2, 5, 8]), ([16, 32, 48, 64], [1, 2, 3, 4])])
def test_retinanet_p6_is_computed_from_c5_even_when_c5_is_as_wide_as_the_fpn(hidden_sizes, heads):
    """B0's last stage is 256 wide like the FPN: torchvision's LastLevelP6P7 would then take P5. The original config
    says ``on_input`` (C5) for every variant."""
    model = tiny_detector("retinanet", hidden_sizes=hidden_sizes, num_attention_heads=heads)
    perturb_(model)
    x = torch.rand(1, 3, 128, 160)
    with torch.no_grad():
        c5 = model.pvt_v2(x, output_hidden_states=True).hidden_states[-1]
        levels = model.detector.backbone(x)
        extra = model.detector.backbone.fpn.extra_blocks
        p6 = F.conv2d(c5, extra.p6.weight, extra.p6.bias, stride=2, padding=1)
        p7 = F.conv2d(F.relu(p6), extra.p7.weight, extra.p7.bias, stride=2, padding=1)
        assert torch.allclose(levels["p6"], p6, atol=1e-5)
        assert torch.allclose(levels["p7"], p7, atol=1e-5)
        if c5.shape[1] == 256:  # P5 fits the convolution too: make sure it is not what was used
            from_p5 = F.conv2d(levels["2"], extra.p6.weight, extra.p6.bias, stride=2, padding=1)
            assert (levels["p6"] - from_p5).abs().max() > 1e-2


def test_fcos_p6_is_computed_from_p5():
    model = perturb_(tiny_detector("fcos"))
    x = torch.rand(1, 3, 128, 160)
    with torch.no_grad():
        levels = model.detector.backbone(x)
        extra = model.detector.backbone.fpn.extra_blocks
        assert torch.allclose(levels["p6"], F.conv2d(levels["2"], extra.p6.weight, extra.p6.bias, stride=2, padding=1), atol=1e-5)


@pytest.mark.parametrize("detector", DETECTORS)
def test_image_normalisation_and_size_are_the_originals_by_default(detector):
    config = PvtV2Config(**TINY_SHALLOW, id2label=LABELS, detector=detector)
    with torch.device("meta"):
        model = PvtV2ForObjectDetection(config)
    transform = model.detector.transform
    assert transform.min_size == (800,) and transform.max_size == 1333 and transform.size_divisible == 32
    assert tuple(transform.image_mean) == IMAGENET_MEAN and tuple(transform.image_std) == IMAGENET_STD
    cls = {"retinanet": RetinaNet, "fcos": FCOS, "faster_rcnn": FasterRCNN, "mask_rcnn": MaskRCNN}[detector]
    assert type(model.detector) is cls


# ---------------------------------------------------------------------------------------------- against timm
class TimmFeatures(torch.nn.Module):
    """timm's PVTv2 (``features_only``) as a torchvision backbone: the same FPN on its stage maps."""

    def __init__(self, timm_model: torch.nn.Module, fpn: torch.nn.Module, stages: list[int]) -> None:
        super().__init__()
        self.body, self.fpn, self.stages, self.out_channels = timm_model, fpn, stages, fpn.layer_blocks[0].out_channels

    def forward(self, x):
        maps = self.body(x)
        return self.fpn(OrderedDict((str(n), maps[s - 1]) for n, s in enumerate(self.stages)))


def timm_twin(model: PvtV2ForObjectDetection) -> torch.nn.Module:
    """The same torchvision detector with timm's encoder, every weight copied from ``model``."""
    import copy

    config = model.config
    body = timm.create_model(
        "pvt_v2_b0", features_only=True, pretrained=False, depths=config.depths, embed_dims=config.hidden_sizes,
        num_heads=config.num_attention_heads, mlp_ratios=config.mlp_ratios, sr_ratios=config.sr_ratios,
    )
    # features_only flattens timm's module names: stages.0 -> stages_0
    state = {k.replace("stages.", "stages_", 1): v for k, v in convert_state_dict(model.pvt_v2.state_dict(), "timm").items()}
    body.load_state_dict(state, strict=True)
    twin = copy.deepcopy(model.detector)
    twin.backbone = TimmFeatures(body, twin.backbone.fpn, config.fpn_stages)
    return twin.eval()


def assert_same_detections(a: dict, b: dict, top: int = 30) -> None:
    """Each of the ``top`` best detections of ``a`` is in ``b``: same label, box and score (and mask). Random weights
    give many detections of nearly equal score, whose order two implementations equal to 1e-6 may swap."""
    assert len(a["scores"]) > 0
    for i in range(min(top, len(a["scores"]))):
        same = (
            (b["labels"] == a["labels"][i])
            & ((b["scores"] - a["scores"][i]).abs() < 1e-4)
            & ((b["boxes"] - a["boxes"][i]).abs().max(dim=1).values < 1e-2)
        )
        assert same.any(), (i, a["boxes"][i], a["scores"][i])
        if "masks" in a:  # pasted at the box rounded to pixels: compare on average, not pixel by pixel
            j = int(same.nonzero()[0])
            assert (a["masks"][i] - b["masks"][j]).abs().mean() < 1e-3


@pytest.mark.parametrize("detector", DETECTORS)
def test_outputs_and_losses_equal_the_same_detector_on_timms_encoder(detector):
    model = perturb_(tiny_detector(detector), scale=0.02)
    twin = timm_twin(model)
    x = images()
    with torch.no_grad(), fast.fast_path(False):
        ours, theirs = model(x), twin(x)
    assert len(ours) == len(theirs) == 2
    shift = 1 if detector in ("faster_rcnn", "mask_rcnn") else 0  # torchvision's background class
    for a, b in zip(ours, theirs):
        assert_same_detections(dict(a, labels=a["labels"] + shift), b)
    model.train(), twin.train()
    torch.manual_seed(3)  # the R-CNNs sample proposals at random: the same draws for both
    ours = model(images(), targets(detector))
    torch.manual_seed(3)
    theirs_targets = [dict(t, labels=t["labels"] + (1 if detector in ("faster_rcnn", "mask_rcnn") else 0)) for t in targets(detector)]
    theirs = twin(images(), theirs_targets)
    assert ours.keys() == theirs.keys()
    for key in ours:
        # The R-CNNs' second stage trains on proposals sampled after NMS: encoder outputs equal to 1e-6 can break a
        # tie between proposals differently, so its losses agree more loosely than the first stage's.
        second_stage = key in ("loss_classifier", "loss_box_reg", "loss_mask")
        assert torch.allclose(ours[key], theirs[key], rtol=1e-2 if second_stage else 1e-4, atol=1e-5), key


@pytest.mark.parametrize("detector", ["retinanet", "mask_rcnn"])
def test_the_fast_path_runs_the_encoder_inside_the_detector(detector):
    model = perturb_(tiny_detector(detector), scale=0.02)
    x = images()
    with torch.no_grad(), fast.fast_path(False):
        reference = model(x)
    fast.freeze(model)
    with torch.no_grad(), mock.patch.object(fast, "stage_forward", wraps=fast.stage_forward) as stage_forward:
        ours = model(x)
    for a, b in zip(reference, ours):
        assert_same_detections(a, b)
    # ... and it did run there: equal detections alone would also hold if the encoder ran the reference path.
    if fast.fast_path_available(torch.float32):
        assert stage_forward.call_count == model.config.num_encoder_blocks


# ---------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("detector", DETECTORS)
def test_a_saved_detector_reloads_to_identical_outputs(tmp_path, detector):
    model = perturb_(tiny_detector(detector, score_threshold=0.01, frozen_stages=1), scale=0.02)
    model.save_pretrained(tmp_path)
    loaded = PvtV2ForObjectDetection.from_pretrained(tmp_path)
    assert loaded.config == model.config and loaded.config.detector == detector and loaded.config.id2label == LABELS
    assert loaded.config.score_threshold == 0.01 and loaded.config.frozen_stages == 1
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert sum(k.startswith("pvt_v2.encoder.") for k in got) == len(model.pvt_v2.state_dict())  # the encoder once
    x = images()
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x)):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_classification_checkpoint_initialises_the_encoder_and_torchvision_the_rest(tmp_path, caplog):
    torch.manual_seed(0)
    classifier = perturb_(PvtV2ForImageClassification(PvtV2Config(**TINY_SHALLOW, num_labels=10)))
    classifier.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        model = PvtV2ForObjectDetection.from_pretrained(tmp_path, detector="retinanet", id2label=LABELS, **SMALL)
    assert "newly initialised" in caplog.text and "detector." in caplog.text
    for key, value in classifier.pvt_v2.state_dict().items():
        assert torch.equal(model.pvt_v2.state_dict()[key], value)
    head = model.detector.head.classification_head
    assert torch.allclose(head.cls_logits.bias, torch.full_like(head.cls_logits.bias, -math.log(99)))  # prior 0.01
    assert head.cls_logits.weight.std().item() == pytest.approx(0.01, rel=0.1)  # torchvision's normal(0, 0.01)
    assert all(torch.count_nonzero(block[0].bias) == 0 for block in model.detector.backbone.fpn.inner_blocks)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("detector", ["retinanet", "mask_rcnn"])
def test_other_classes_replace_only_the_class_sized_layers(tmp_path, detector, caplog):
    model = perturb_(tiny_detector(detector), scale=0.02)
    model.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        other = PvtV2ForObjectDetection.from_pretrained(tmp_path, id2label={0: "a", 1: "b", 2: "c", 3: "d", 4: "e"})
    assert "replacing the classifier head" in caplog.text
    prefixes = other.classifier_prefix
    before, after = model.state_dict(), other.state_dict()
    for key, value in after.items():
        if key.startswith(prefixes):
            assert value.shape[0] != before[key].shape[0]
        else:
            assert torch.equal(value, before[key]), key


def test_imagenet_labels_are_refused_for_a_detector():
    with pytest.raises(ValueError, match="ImageNet's 1000 classification labels"):
        detection_config(PvtV2Config.from_preset("pvt_v2_b0"))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(detector="yolo"), "unknown detector"),
        (dict(min_size=0), "min_size"),
        (dict(min_size=[]), "min_size"),
        (dict(min_size=900, max_size=800), "max_size"),
        (dict(fpn_stages=[3, 2]), "fpn_stages"),
        (dict(fpn_stages=[1, 5]), "fpn_stages"),
        (dict(frozen_stages=5), "frozen_stages"),
        (dict(frozen_stages=True), "frozen_stages"),
        (dict(extra_levels="p8"), "extra_levels"),
        (dict(score_threshold=1.5), "score_threshold"),
        (dict(nms_threshold=0), "nms_threshold"),
        (dict(image_std=[0.2, 0.0, 0.2]), "image_std"),
        (dict(image_mean=[0.5, 0.5]), "image_mean"),
        (dict(image_mean=[float("nan"), 0.5, 0.5]), "image_mean must be 3 finite numbers"),  # NaN pixels
        (dict(image_std=[0.2, float("inf"), 0.2]), "image_std must be 3 finite numbers"),  # zero pixels
        (dict(detector="fcos", fpn_channels=48), "multiple of 32"),
        (dict(id2label=None, num_labels=0), "num_labels >= 1"),
    ],
)
def test_bad_settings_are_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        detection_config(PvtV2Config(**{**TINY_SHALLOW, "id2label": LABELS, **changes}))


# ---------------------------------------------------------------------------------------------- training
def test_frozen_stages_and_layer_norms_get_no_gradient():
    model = tiny_detector("retinanet", frozen_stages=2, freeze_layer_norms=True, drop_path_rate=0.5)
    stages = model.pvt_v2.encoder.layers
    frozen = {id(p) for stage in stages[:2] for p in stage.parameters()}
    frozen |= {id(p) for m in model.pvt_v2.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    model.train()
    assert not stages[0].training and not stages[1].training and stages[2].training  # no drop path in frozen stages
    sum(model(images(), targets("retinanet")).values()).backward()
    for p in model.parameters():
        assert p.requires_grad == (id(p) not in frozen)
        assert (p.grad is None) == (id(p) in frozen)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in model.parameters() if id(p) in frozen
    )


@pytest.mark.parametrize("detector", DETECTORS)
def test_training_mode_returns_torchvisions_losses(detector):
    model = tiny_detector(detector).train()
    losses = model(images(), targets(detector))
    expected = {
        "retinanet": {"classification", "bbox_regression"},
        "fcos": {"classification", "bbox_regression", "bbox_ctrness"},
        "faster_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
        "mask_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_mask"},
    }[detector]
    assert set(losses) == expected and all(torch.isfinite(v) and v >= 0 for v in losses.values())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, t: (x, None), "needs targets"),
        (lambda x, t: ([im * 255 for im in x], t), r"takes unnormalised images in \[0, 1\]"),
        (lambda x, t: ([im[:1] for im in x], t), r"shape \(3, H, W\)"),
        (lambda x, t: (x, t[:1]), "one dict per image"),
        (lambda x, t: (x, [dict(t[0], boxes=torch.tensor([[10.0, 10.0, 5.0, 30.0], [1.0, 1.0, 9.0, 9.0]])), t[1]]), "no area"),
        (lambda x, t: (x, [dict(t[0], labels=torch.tensor([0, 3])), t[1]]), r"labels must be in 0\.\.2"),
        (lambda x, t: (x, [dict(t[0], labels=torch.tensor([0.0, 1.0])), t[1]]), "integer tensor"),
        (lambda x, t: (x, [{"boxes": t[0]["boxes"]}, t[1]]), "'boxes' and 'labels'"),
    ],
)
def test_bad_inputs_are_clear_errors(change, message):
    model = tiny_detector("retinanet").train()
    x, t = change(images(), targets("retinanet"))
    with pytest.raises((ValueError, TypeError), match=message):
        model(x, t)


def test_mask_rcnn_needs_masks():
    model = tiny_detector("mask_rcnn").train()
    with pytest.raises(ValueError, match="mask_rcnn needs masks"):
        model(images(), targets("retinanet"))


def test_too_small_images_are_a_clear_error():
    model = tiny_detector("retinanet", min_size=16, max_size=16)
    with pytest.raises(ValueError, match="too small"):
        model([torch.rand(3, 16, 16)])


# ---------------------------------------------------------------------------------------------- optional dependencies
def test_without_torchvision_a_detector_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'pvtv2\[detection\]'"):
        PvtV2ForObjectDetection(PvtV2Config(**TINY_SHALLOW, id2label=LABELS))


def test_the_library_never_imports_torchvision_or_pycocotools_at_module_level():
    """``import pvtv2`` must work without the detection extra: those imports happen inside functions."""
    offenders = []
    for path in SRC.rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("torchvision", "pycocotools")]
    assert not offenders, offenders
    assert any("import_optional(\"torchvision\"" in p.read_text() for p in SRC.rglob("*.py"))  # the walk saw the module


@pytest.mark.slow
def test_import_pvtv2_works_without_the_detection_extra():
    import subprocess

    code = (
        "import sys; sys.modules['torchvision'] = None; sys.modules['pycocotools'] = None\n"
        "import pvtv2, pvtv2.cli, pvtv2.inference, pvtv2.models.detection, pvtv2.data.coco\n"
        "from pvtv2.data.coco import read_coco_annotations\n"
        "try:\n    pvtv2.data.coco.import_pycocotools()\nexcept ValueError as err:\n    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "pip install 'pvtv2[detection]'" in out.stdout
