"""Shared helpers: tiny configurations, the model classes by kind, weight perturbation, relative error."""

from __future__ import annotations

import os

import pytest
import torch

from pvtv2 import (
    PvtV2Backbone,
    PvtV2Config,
    PvtV2ForDepthEstimation,
    PvtV2ForImageClassification,
    PvtV2ForSemanticSegmentation,
    PvtV2Model,
)


if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n auto` (.ci/run): one intra-op thread per worker process, so that the workers share the cores without
    # oversubscribing them; the command-line runs the tests start as subprocesses get one too, so that a test comparing
    # an in-process run with a subprocess one compares the same GEMM reductions.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """max |expected - actual| / max |expected|: the measure every parity test bounds."""
    expected = expected.detach().double()
    actual = actual.detach().double()
    assert expected.shape == actual.shape, (expected.shape, actual.shape)
    return ((expected - actual).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def output_tensors(out) -> dict[str, torch.Tensor]:
    """Every tensor of a model output (an output object, a dict or a tuple), by its path."""
    found = {}

    def walk(path, value):
        if isinstance(value, torch.Tensor):
            found[path] = value
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                walk(f"{path}[{i}]", v)
        elif hasattr(value, "keys"):
            for k in value.keys():
                walk(f"{path}.{k}", value[k])

    walk("", out)
    return found


def training_results(model: torch.nn.Module, x: torch.Tensor, flags: dict, seed: int):
    """Every output of ``model`` in training mode on ``x``, and the gradients of every parameter and of the pixels
    of one random weighting (drawn from ``seed``) of all of them."""
    pixels = x.detach().clone().requires_grad_(True)
    found = output_tensors(model.train()(pixels, **flags))
    gen = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)).sum()
               for _, t in sorted(found.items()) if t.requires_grad)
    loss.backward()
    grads = {"pixels": pixels.grad, **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}
    return {k: v.detach() for k, v in found.items()}, grads


@torch.no_grad()
def perturb_(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Move every parameter (LayerNorm weights and biases included) away from its initial value, so that a model
    that ignores a parameter, or treats it differently, gives different numbers."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


@torch.no_grad()
def shrink_patch_embeddings_(model: torch.nn.Module, factor: float = 1e-3) -> torch.nn.Module:
    """Scale the patch-embedding convolutions down so the LayerNorms after them see variances near their epsilon:
    a model with the wrong epsilon then gives visibly different outputs."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d) and ("patch_embed" in name or "downsample" in name):
            module.weight.mul_(factor)
            module.bias.mul_(factor)
    return model


@torch.no_grad()
def scramble_batch_norm_statistics_(model: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """BatchNorm running means far from 0 (N(0, 2^2)) and variances far from 1 (U(0.1, 5.1)), drawn from ``gen`` in
    buffer-name order: a model that ignores its statistics, or uses batch statistics in eval, shows."""
    for name, b in sorted(model.named_buffers()):
        if name.endswith("running_mean"):
            b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float64) * 2)
        elif name.endswith("running_var"):
            b.copy_(torch.rand(b.shape, generator=gen, dtype=torch.float64) * 5 + 0.1)
    return model


@torch.no_grad()
def random_weights_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter with fresh random values (no reliance on any library's initialisation): matrices with
    std 1/sqrt(fan_in), norm scales around one, biases and shifts around zero. Works on models built on meta."""
    gen = torch.Generator().manual_seed(seed)
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device="cpu")
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen)
        if p.ndim > 1:
            p.copy_(noise * (p[0].numel() ** -0.5))
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.copy_(0.1 * noise)
    return model


# The tiny configurations the tests build on: fast on two cores, with every architectural feature present (several
# heads, spatial reduction in the first stages, two blocks in a stage).
TINY = dict(depths=[1, 2, 1, 1], hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4], mlp_ratios=[2, 2, 2, 2])
# One block per stage: for tests that run the command line, export or train.
TINY_SHALLOW = dict(TINY, depths=[1, 1, 1, 1])
# Every model class by the name the export tests give its kind (torch.export and ONNX): one list, so that a new model
# class is exported by both.
MODEL_KINDS = {"classifier": PvtV2ForImageClassification, "encoder": PvtV2Model, "backbone": PvtV2Backbone,
               "segmentation": PvtV2ForSemanticSegmentation, "depth": PvtV2ForDepthEstimation}
# For 16-64 px training images: spatial reductions no larger than each stage's token grid.
TINY_SMALL_IMAGES = dict(TINY_SHALLOW, sr_ratios=[4, 2, 1, 1])


def detections_by_name(model: torch.nn.Module, image: torch.Tensor) -> list:
    """A detector's detections on ``image`` as sorted (class name, score, box) triples, rounded: named by the model's
    own id2label, so two models whose class-sized layers are ordered differently compare by name."""
    model.eval()
    with torch.no_grad():
        out = model([image])[0]
    names = [model.config.id2label[int(i)] for i in out["labels"]]
    return sorted((name, round(float(s), 4), [round(v, 2) for v in b.tolist()])
                  for name, s, b in zip(names, out["scores"], out["boxes"]))


def hf_config(config):
    """transformers' ``PvtV2Config`` of the same architecture as our ``config`` (``stage_names`` it derives itself)."""
    import transformers

    data = config.to_dict()
    data.pop("stage_names")
    return transformers.PvtV2Config(**data)


def hf_twin(ours: torch.nn.Module) -> torch.nn.Module:
    """transformers' classifier with the config and the weights of our classifier ``ours`` (loaded strictly, made
    dense first: a strided weight of ours loads as its values), in ``ours``' training mode."""
    import transformers

    theirs = transformers.PvtV2ForImageClassification(hf_config(ours.config))
    theirs.load_state_dict({k: v.contiguous() for k, v in ours.state_dict().items()}, strict=True)
    return theirs.train(ours.training)


def transformers_twin(ours: torch.nn.Module, theirs_class: type) -> torch.nn.Module:
    """transformers' ``theirs_class`` (a ``PvtV2*`` class) with ``ours``' config, weights and dtype, in eval mode, its
    LayerNorms given pvtv2's two extra epsilons (fields transformers' config does not have)."""
    config = ours.config
    theirs = theirs_class(hf_config(config))
    theirs.load_state_dict({k: v.contiguous() for k, v in ours.state_dict().items()}, strict=True)
    encoder = theirs.pvt_v2.encoder if hasattr(theirs, "pvt_v2") else theirs.encoder
    for layer in encoder.layers:
        layer.patch_embedding.layer_norm.eps = config.patch_norm_eps
        for block in layer.blocks:
            if hasattr(block.attention, "layer_norm"):
                block.attention.layer_norm.eps = config.reduction_norm_eps
    return theirs.to(next(ours.parameters()).dtype).eval()


@pytest.fixture
def tiny_kwargs() -> dict:
    return dict(TINY)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Put torch's thread count back after each test: scripts run in-process (benchmarks) set their own, and a later
    test comparing an in-process training run with a subprocess one would then compare different GEMM reductions."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def save_tiny_classifier(folder) -> PvtV2ForImageClassification:
    """A tiny 3-class classifier at 32 px (seed 0), saved to ``folder``; the model, in eval mode."""
    torch.manual_seed(0)
    config = PvtV2Config(**TINY_SMALL_IMAGES, id2label={0: "a", 1: "b", 2: "c"}, image_size=32)
    model = PvtV2ForImageClassification(config).eval()
    model.save_pretrained(folder)
    return model


class TimmFeaturePyramid(torch.nn.Module):
    """timm's ``features_only`` encoder ``body`` under torchvision's ``FeaturePyramidNetwork`` on the 1-based
    ``stages``, wired from torchvision's own classes as a user would (not copied from the model under test)."""

    def __init__(self, body, stages, extra, width):
        from torchvision.ops import FeaturePyramidNetwork

        super().__init__()
        self.body, self.stages, self.out_channels = body, stages, width
        self.fpn = FeaturePyramidNetwork([body.feature_info.channels()[s - 1] for s in stages], width, extra_blocks=extra)

    def forward(self, x):
        from collections import OrderedDict

        maps = self.body(x)
        return self.fpn(OrderedDict((str(n), maps[s - 1]) for n, s in enumerate(self.stages)))


def timm_features_twin(model) -> torch.nn.Module:
    """timm's ``pvt_v2`` encoder (``features_only``) for a detector ``model``'s config, holding the weights of its
    encoder ``model.pvt_v2`` converted to timm's layout."""
    import timm

    from pvtv2.weights.layouts import convert_state_dict

    c = model.config
    body = timm.create_model("pvt_v2_b0", features_only=True, pretrained=False, depths=c.depths,
                             embed_dims=c.hidden_sizes, num_heads=c.num_attention_heads, mlp_ratios=c.mlp_ratios,
                             sr_ratios=c.sr_ratios)
    state = convert_state_dict(model.pvt_v2.state_dict(), "timm")
    body.load_state_dict({k.replace("stages.", "stages_", 1): v for k, v in state.items()})
    return body


def onnx_export_writing_opset(opset: int):
    """A stand-in for ``pvtv2.export._export_once`` that writes ``opset`` whatever was asked (as torch's dynamo
    exporter does where it cannot convert a graph down)."""
    import warnings

    def export_once(wrapper, example, path, exporter, asked, names, shapes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=["pixel_values"], output_names=list(names))

    return export_once


def write_square_coco(root, split: str, boxes: list[list[int]], masks: bool = False, category_id: int = 1,
                      size: int = 64) -> None:
    """A COCO-format split under ``root``: one white square per image (``boxes`` x, y, w, h) on dark noise, one
    category "square" of id ``category_id``, with (``masks``) or without the square's polygon."""
    import json

    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(len(split))
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for i, (x, y, w, h) in enumerate(boxes):
        pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        pixels[y : y + h, x : x + w] = 255
        ann = {"id": i + 1, "image_id": i + 1, "category_id": category_id, "bbox": [x, y, w, h], "area": w * h,
               "iscrowd": 0}
        if masks:
            ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        annotations.append(ann)
        PIL.Image.fromarray(pixels).save(root / split / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": size, "height": size})
    data = {"images": images, "annotations": annotations, "categories": [{"id": category_id, "name": "square"}]}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
