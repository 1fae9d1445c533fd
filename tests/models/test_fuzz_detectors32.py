"""Seeded random search over the detectors (pass 32): random tiny encoders, detectors, FPN stages, extra levels, FPN
widths, resize settings, thresholds and batches of differently sized images, against torchvision's own detector
assembled by hand on timm's encoder with every weight copied (anchors, levels and RoI pools written from the
documented rules, not read off the model); and the fault the search found: FCOS at ``fpn_channels=32`` refused a
single small image that it detected in a batch of two."""

from __future__ import annotations


import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

from conftest import TINY_SHALLOW, TimmFeaturePyramid, perturb_, timm_features_twin  # noqa: E402
from torchvision.models import detection as tvd  # noqa: E402
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.ops import MultiScaleRoIAlign  # noqa: E402
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7  # noqa: E402

from pvtv2 import PvtV2Config, fast  # noqa: E402
from pvtv2.models.detection import DETECTORS, PvtV2ForObjectDetection  # noqa: E402




def _torchvisions(model: PvtV2ForObjectDetection, s: dict) -> torch.nn.Module:
    """torchvision's detector for the settings ``s``, by the docs' rules: stage strides 4, 8, 16, 32, each extra level
    twice the last; anchors 4 x stride x 2^(k/3) (RetinaNet, truncated as torchvision's defaults), 8 x stride (RPN),
    stride (FCOS); RoIAlign 7 / 14 with 2 samples on the stage levels; weights by name from ``model``."""
    c = model.config
    body = timm_features_twin(model)
    stages, width = s["fpn_stages"], s["fpn_channels"]
    if s["extra_levels"] == "max_pool":
        extra, levels = LastLevelMaxPool(), 1
    else:
        on_input = s["extra_levels"] == "p6p7_on_input"
        extra, levels = LastLevelP6P7(c.hidden_sizes[stages[-1] - 1] if on_input else width, width), 2
        extra.use_P5 = not on_input
    strides = [2 ** (stage + 1) for stage in stages]
    strides += [strides[-1] * 2 ** (k + 1) for k in range(levels)]
    kind = s["detector"]
    if kind == "retinanet":
        anchors = AnchorGenerator(tuple(tuple(int(4 * t * 2 ** (k / 3)) for k in range(3)) for t in strides),
                                  ((0.5, 1.0, 2.0),) * len(strides))
    elif kind == "fcos":
        anchors = AnchorGenerator(tuple((t,) for t in strides), ((1.0,),) * len(strides))
    else:
        anchors = AnchorGenerator(tuple((8 * t,) for t in strides), ((0.5, 1.0, 2.0),) * len(strides))
    backbone = TimmFeaturePyramid(body, stages, extra, width)
    common = dict(min_size=s["min_size"], max_size=s["max_size"])
    if kind in ("retinanet", "fcos"):
        cls = tvd.RetinaNet if kind == "retinanet" else tvd.FCOS
        det = cls(backbone, c.num_labels, anchor_generator=anchors, score_thresh=s["score_threshold"],
                  nms_thresh=s["nms_threshold"], detections_per_img=s["detections_per_image"], **common)
    else:
        names = [str(n) for n in range(len(stages))]
        kwargs = dict(rpn_anchor_generator=anchors, box_roi_pool=MultiScaleRoIAlign(names, 7, 2),
                      box_score_thresh=s["score_threshold"], box_nms_thresh=s["nms_threshold"],
                      box_detections_per_img=s["detections_per_image"], **common)
        if kind == "faster_rcnn":
            det = tvd.FasterRCNN(backbone, c.num_labels + 1, **kwargs)
        else:
            det = tvd.MaskRCNN(backbone, c.num_labels + 1, mask_roi_pool=MultiScaleRoIAlign(names, 14, 2), **kwargs)
    ours = {k[len("detector."):]: v for k, v in model.state_dict().items() if k.startswith("detector.")}
    missing, unexpected = det.load_state_dict(ours, strict=False)
    assert not unexpected and all(k.startswith("backbone.body.") for k in missing), (missing, unexpected)
    return det.eval()


def _random_case(seed: int) -> tuple[dict, PvtV2Config, list[torch.Tensor]]:
    rng = np.random.default_rng([77, seed])
    kind = DETECTORS[seed % 4]
    count = int(rng.integers(1, 5)) if kind in ("faster_rcnn", "mask_rcnn") else int(rng.integers(2, 5))
    min_size = int(rng.integers(40, 120))
    settings = dict(
        detector=kind, fpn_stages=sorted(int(v) for v in rng.choice([1, 2, 3, 4], size=count, replace=False)),
        extra_levels=["max_pool", "p6p7_on_input", "p6p7_on_output"][int(rng.integers(0, 3))],
        fpn_channels=int(rng.choice([32, 64])), min_size=min_size, max_size=int(min_size * rng.uniform(1, 2)),
        score_threshold=float(rng.uniform(0, 0.3)), nms_threshold=float(rng.uniform(0.3, 0.9)),
        detections_per_image=int(rng.integers(1, 60)),
    )
    hidden = [int(h) for h in rng.choice([8, 16, 24, 32], 4)]
    config = PvtV2Config(
        depths=[1, 1, 1, 1], hidden_sizes=hidden, num_attention_heads=[1, 1] + [2 - h % 16 // 8 for h in hidden[2:]],
        mlp_ratios=[2, 2, 2, 2], sr_ratios=[int(rng.choice([1, 2, 4])), int(rng.choice([1, 2])), 1, 1],
        patch_embed_layer_norm_eps=1e-5, reduction_layer_norm_eps=1e-5,
        id2label={i: f"k{i}" for i in range(int(rng.integers(1, 5)))}, **settings,
    )
    gen = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, int(rng.integers(33, 130)), int(rng.integers(33, 130)), generator=gen)
              for _ in range(int(rng.integers(1, 4)))]
    return settings, config, images


@pytest.mark.parametrize("seed", range(8))
def test_random_detectors_are_torchvisions_own_in_the_input_images_pixels(seed):
    settings, config, images = _random_case(seed)
    torch.manual_seed(seed)
    model = perturb_(PvtV2ForObjectDetection(config).eval(), scale=0.02, seed=seed)
    twin = _torchvisions(model, settings)
    shift = 1 if settings["detector"] in ("faster_rcnn", "mask_rcnn") else 0
    with torch.no_grad(), fast.fast_path(False):
        ours, theirs = model(images), twin(images)
    for a, b, image in zip(ours, theirs, images):
        h, w = image.shape[1:]
        assert len(a["scores"]) == len(b["scores"]) <= settings["detections_per_image"]
        assert (a["scores"] >= settings["score_threshold"]).all()
        assert ((a["boxes"] >= 0) & (a["boxes"] <= torch.tensor([w, h, w, h]) + 1e-3)).all()  # the input's pixels
        torch.testing.assert_close(a["scores"], b["scores"], atol=1e-4, rtol=0)
        torch.testing.assert_close(a["labels"] + shift, b["labels"])
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-2, rtol=0)
        if "masks" in b:
            assert a["masks"].shape[1:] == (1, h, w)
            torch.testing.assert_close(a["masks"], b["masks"], atol=1e-3, rtol=0)


def test_fcos_32_channels_detects_a_single_small_image_as_in_a_batch_of_two():
    """FCOS's head normalises in 32 groups; at fpn_channels=32 each holds one channel, and P7 of an image padded to
    128 pixels or less is one cell: torch's group_norm refused a batch of one ("Expected more than 1 value per channel
    when training", in eval) and computed the same image in a batch of two. Now one image gives the batch's answer,
    in training too."""
    config = PvtV2Config(**TINY_SHALLOW, id2label={0: "a", 1: "b"}, detector="fcos", fpn_channels=32, min_size=64,
                         max_size=107, score_threshold=0.0)
    model = perturb_(PvtV2ForObjectDetection(config).eval(), scale=0.05)
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alone, (pair, _) = model([image]), model([image, image])
    alone = alone[0]
    assert len(alone["boxes"]) == len(pair["boxes"]) > 0
    for box, score, label in zip(alone["boxes"], alone["scores"], alone["labels"]):  # the same set (ties may swap)
        same = ((pair["labels"] == label) & ((pair["scores"] - score).abs() < 1e-5)
                & ((pair["boxes"] - box).abs().max(dim=1).values < 1e-3))
        assert same.any(), (box, score, label)
    model.train()
    losses = model([image], [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])}])
    assert all(torch.isfinite(v) for v in losses.values())
