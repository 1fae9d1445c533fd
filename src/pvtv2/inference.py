"""Prediction and evaluation with a trained classifier: loading it with its preprocessing, top-k labels for image
files, accuracy on an image-folder dataset.

Unreadable images: ``predict`` reports each one (an entry with an ``error``) and goes on with the others, so one bad
file in a folder of thousands costs one result, not the run; the command then exits with status 2. An image the
preprocessing refuses, or one too small for the model, is reported the same way. ``evaluate``
stops at the first unreadable image instead, because an accuracy over a silently shrunken dataset would mislead.

Runtimes: both take a *runtime*, a callable ``pixel_values -> logits`` chosen once by :func:`load_runtime`: the PyTorch
model itself, or an ONNX export run by onnxruntime on the CPU (faster than eager PyTorch there). Batching,
top-k and the metrics are the same code for both; the model object still supplies the labels and the class count.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import operator
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data.folders import find_image_files, scan_split
from .data.processing import (
    IMAGE_EXTENSIONS,
    PREPROCESS_PROTOCOLS,
    PREPROCESSOR_CONFIG_NAME,
    PvtV2ImageProcessor,
    load_image,
    origin_processor,
    timm_repository_processor,
)
from . import fast
from .fileio import existing_folder, path_kind
from .models.config import is_preset_name, preset_key
from .models.depth import PvtV2ForDepthEstimation
from .models.labels import has_generic_labels
from .models.modeling import PvtV2ForImageClassification, check_input_size
from .models.segmentation import PvtV2ForSemanticSegmentation
from .progress import progress_bar
from .runtime import parse_device, raise_interrupt_behind
from .weights.hub import companion_file

__all__ = [
    "IMAGE_EXTENSIONS",
    "RUNTIMES",
    "Runtime",
    "OnnxRuntimeMissingError",
    "Prediction",
    "load_classifier",
    "load_segmenter",
    "load_depth_estimator",
    "load_processor",
    "find_images",
    "predict",
    "evaluate",
    "class_mapping",
    "torch_runtime",
    "onnx_runtime",
    "load_runtime",
    "fit_size",
    "predict_segmentation",
    "evaluate_segmenter",
    "predict_depth",
    "label_map_names",
    "checkpoint_input_size",
    "DetectionResult",
    "coco_rle",
    "load_detector",
    "detect_objects",
    "detection_label_map",
    "evaluate_detector",
    "SEGMENTATION_MODES",
    "segmentation_logits",
    "segmentation_probabilities",
    "window_starts",
]

logger = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime")

# pixel values (B, C, H, W), a torch tensor or a numpy array -> float32 logits (B, num_labels) as a torch tensor
Runtime = Callable[[Any], torch.Tensor]


class OnnxRuntimeMissingError(ImportError, ValueError):
    """onnxruntime is not installed. Also a ``ValueError``, so that the command prints it as one line."""


def _inference_device(device: str | torch.device) -> torch.device:
    device = parse_device(device)
    if device.type == "meta":
        raise ValueError(
            "device 'meta' holds shapes without data: a model there cannot compute anything; use cpu, cuda or cuda:N"
        )
    return device


def _refuse_random_weights(model: torch.nn.Module, source: str | os.PathLike, what: str, remedy: str) -> None:
    """Raise when ``from_pretrained`` had to initialise part of ``model`` at random (it records which keys in
    ``model.newly_initialized_keys``): a random head gives noise under real-looking labels."""
    new = getattr(model, "newly_initialized_keys", ())
    if not new:
        return
    modules = sorted({key.rsplit(".", 1)[0] for key in new})
    shown = ", ".join(modules[:4]) + (f" and {len(modules) - 4} more" if len(modules) > 4 else "")
    raise ValueError(
        f"{os.fspath(source)!r} has no trained {what}: the checkpoint has no weights for {shown} (or they do not fit "
        f"its config), so they would be random and the output noise. {remedy}"
    )


def _refuse_non_finite_weights(model: torch.nn.Module, source: str | os.PathLike) -> None:
    """Raise when a parameter or buffer holds NaN or infinity: every output that touches it is NaN, and ranking NaN
    scores gives labels in an arbitrary order (a diverged or damaged checkpoint)."""
    from .weights.loading import non_finite

    bad = non_finite(model.state_dict())
    if bad:
        raise ValueError(
            f"{os.fspath(source)!r} holds NaN or infinite weights in {bad}: its outputs would "
            f"be NaN. The checkpoint is damaged, or was saved after training diverged; use an earlier one"
        )


# What a checkpoint of another task is for, by the class its config.json names (``architectures``).
_SEGMENTATION_USE = "a segmentation model: pvtv2 eval --task segmentation scores it, pvtv2 segment draws it"
_DEPTH_USE = "a depth model: pvtv2 depth draws it"
_OTHER_TASKS = {
    "PvtV2ForSemanticSegmentation": _SEGMENTATION_USE,
    "SegformerForSemanticSegmentation": _SEGMENTATION_USE,
    "PvtV2ForDepthEstimation": _DEPTH_USE,
    "GLPNForDepthEstimation": _DEPTH_USE,
    "PvtV2ForObjectDetection": "a detector: pvtv2 eval --task detection scores it, pvtv2 detect draws it",
}


def _task_use(source: str | os.PathLike) -> str | None:
    """What a checkpoint without a config.json naming its class is for, read off its weights' names: a segmentation,
    depth or detection head (an mmsegmentation Semantic FPN file, transformers' SegFormer or GLPN weights alone).
    Read only when a classifier is refused, so the file is read twice then and once otherwise."""
    from .export import checkpoint_task

    task = checkpoint_task(source)
    return {"segmentation": _SEGMENTATION_USE, "depth": _DEPTH_USE,
            "detection": _OTHER_TASKS["PvtV2ForObjectDetection"]}.get(task)


def load_classifier(source: str | os.PathLike, device: str | torch.device = "cpu") -> PvtV2ForImageClassification:
    """A trained classifier from anything ``from_pretrained`` takes.

    Refused with ``ValueError``, because an untrained head's predictions are noise: a bare preset name, a checkpoint
    without a classifier (backbone weights), and one whose classifier does not fit its config (a ``config.json``
    that claims another number of labels than the weights have).
    """
    if is_preset_name(source):
        name = preset_key(source)
        raise ValueError(
            f"{os.fspath(source)!r} is a preset (an architecture without trained weights): its predictions would be "
            f"random. Pass trained weights: a save_pretrained folder, a checkpoint file (.safetensors/.pth) or a hub "
            f"id such as 'OpenGVLab/{name}'"
        )
    device = _inference_device(device)
    model = PvtV2ForImageClassification.from_pretrained(source)
    # A dense or detection checkpoint given where a classifier is expected (eval without --task): say what it is.
    # architectures is bookkeeping, read as it comes: a hand-edited 5 or [["x"]] must not stop a trained classifier
    # ("'int' object is not iterable"), and a bare string names one class.
    architectures = getattr(model.config, "architectures", None)
    if isinstance(architectures, str):
        architectures = [architectures]
    if not isinstance(architectures, (list, tuple)):
        architectures = []
    other = next((_OTHER_TASKS[a] for a in architectures if isinstance(a, str) and a in _OTHER_TASKS), None)
    if other is None and getattr(model, "newly_initialized_keys", ()):
        other = _task_use(source)
    _refuse_random_weights(
        model, source, "classifier",
        f"It is {other}" if other else
        f"Fine-tune one on your classes first: pvtv2 train --model {os.fspath(source)} --data DIR --output RUN "
        f"(DIR/train/<class>/*, DIR/val/<class>/*), then use RUN/best",
    )
    _refuse_non_finite_weights(model, source)
    return model.to(device).eval()


def load_segmenter(source: str | os.PathLike, device: str | torch.device = "cpu") -> PvtV2ForSemanticSegmentation:
    """A trained segmentation model (pvtv2 folder, SegFormer checkpoint, hub id); a classification or depth
    checkpoint, which has no trained decode head, is refused with ``ValueError`` saying how to train one."""
    device = _inference_device(device)
    model = PvtV2ForSemanticSegmentation.from_pretrained(source)
    size = checkpoint_input_size(source)
    if size is not None and tuple(model.config.image_size) != size:
        # transformers' SegFormer config.json has no image size (it read as 224): the size its checkpoints are
        # predicted at is their preprocessor_config.json's (512x512 for ADE20K, 1024x1024 for Cityscapes).
        logger.info("input size %dx%d, from %s", size[0], size[1], PREPROCESSOR_CONFIG_NAME)
        model.config.image_size = size
    head = "Semantic FPN" if model.head_type == "fpn" else "SegFormer decode head"
    _refuse_random_weights(
        model, source, f"segmentation head ({head})",
        f"Fine-tune one first: pvtv2 train --task segmentation --model {os.fspath(source)} --data DIR --output RUN "
        f"(DIR/train/images/*, DIR/train/masks/*.png, the same under DIR/val), then use RUN/best",
    )
    _refuse_non_finite_weights(model, source)
    return model.to(device).eval()


def checkpoint_input_size(source: str | os.PathLike) -> tuple[int, int] | None:
    """The fixed (height, width) of the checkpoint's ``preprocessor_config.json`` (``"size": {"height": h, "width":
    w}``, as SegFormer's and pvtv2's training runs write it: the size its validation images were resized to; ``"size":
    s``, the published SegFormer checkpoints' square, or ``[h, w]``, as transformers reads them), or
    None: no such file, or a size of another form (GLPN's ``size_divisor``: each image at its own size)."""
    path = companion_file(source, PREPROCESSOR_CONFIG_NAME)
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        size = data.get("size") if data.get("do_resize", True) is not False else None  # no resize: no size fixed
    except (OSError, ValueError, AttributeError):
        return None  # unreadable: left to the config's image_size, as before
    # transformers' forms (get_size_dict): {"height", "width"}; one number, a square (the published SegFormer
    # checkpoints' "size": 512, which was read as no size: predicted at 224x224); two, (height, width).
    if isinstance(size, dict) and set(size) >= {"height", "width"}:
        sides = (size["height"], size["width"])
    elif isinstance(size, int):
        sides = (size, size)
    elif isinstance(size, list) and len(size) == 2:
        sides = (size[0], size[1])
    else:
        return None
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sides):
        return sides
    return None


def load_depth_estimator(source: str | os.PathLike, device: str | torch.device = "cpu") -> PvtV2ForDepthEstimation:
    """A trained depth model (pvtv2 folder, GLPN checkpoint, hub id); a classification or segmentation checkpoint,
    which has no trained depth decoder, is refused with ``ValueError``."""
    device = _inference_device(device)
    model = PvtV2ForDepthEstimation.from_pretrained(source)
    _refuse_random_weights(
        model, source, "depth head (GLPN decoder and head)",
        "Pass a depth model (a transformers GLPN checkpoint or a PvtV2ForDepthEstimation save_pretrained folder), "
        f"or train one: pvtv2 train --task depth --model {os.fspath(source)} --data DIR --output RUN "
        "(DIR/train/images/*, DIR/train/depth/*.png as 16-bit millimetres, the same under DIR/val), then use RUN/best",
    )
    _refuse_non_finite_weights(model, source)
    return model.to(device).eval()


def load_processor(
    source: str | os.PathLike,
    image_size: int | Sequence[int],
    protocol: str | None = None,
    origin: str | None = None,
) -> PvtV2ImageProcessor:
    """The preprocessing for the model read from ``source`` whose inputs are ``image_size`` (height, width), or
    ``image_size`` x ``image_size`` for one number.

    In this order: ``protocol`` when given (``"transformers"``, ``"timm"`` or ``"original"``, see
    :data:`~pvtv2.data.processing.PREPROCESS_PROTOCOLS`); else the checkpoint's own ``preprocessor_config.json``
    (its folder or hub repository); else, for a timm repository, the preprocessing its config.json's
    ``pretrained_cfg`` records (:func:`~pvtv2.data.processing.timm_processor`); else the protocol of the
    checkpoint's ``origin`` (the layout its weights were read from, ``model.checkpoint_layout``: a timm file is
    evaluated as timm does, an original file as the authors did), which is logged; else transformers' (bilinear
    resize to ``image_size``, ImageNet statistics).
    """
    if protocol is not None and protocol not in PREPROCESS_PROTOCOLS:
        raise ValueError(f"unknown preprocessing protocol {protocol!r}; choose one of {sorted(PREPROCESS_PROTOCOLS)}")
    # One number is a square side, as PvtV2ImageProcessor(size=224) takes it (the README's call passes either).
    height, width = _pair(
        "image_size", image_size, expected="a positive side or a (height, width) pair", index_sides=True
    )
    if protocol is not None:
        logger.info("preprocessing: the %s protocol", protocol)
        return _protocol_processor(protocol, height, width)
    path = companion_file(source, PREPROCESSOR_CONFIG_NAME)
    if path is not None:
        logger.info("preprocessing from %s", path)
        return PvtV2ImageProcessor.from_pretrained(path)
    processor = timm_repository_processor(source)  # a timm repository's pretrained_cfg
    if processor is not None:
        return processor
    processor = origin_processor(origin, height, width)
    if processor is not None:
        logger.info(
            "preprocessing: the %s protocol, as the checkpoint is %s %s file (--preprocess transformers for a plain "
            "resize)", origin, "an" if origin == "original" else "a", origin,
        )
        return processor
    return PvtV2ImageProcessor(size={"height": height, "width": width})


def _protocol_processor(protocol: str, height: int, width: int) -> PvtV2ImageProcessor:
    if protocol == "transformers":
        return PvtV2ImageProcessor(size={"height": height, "width": width})
    if height != width:
        raise ValueError(
            f"the {protocol} protocol crops a square from the resized image, but the model's inputs are "
            f"{height}x{width}; use the transformers protocol (a plain resize) for non-square inputs"
        )
    return PvtV2ImageProcessor.from_protocol(protocol, height)


def torch_runtime(model: PvtV2ForImageClassification, bf16: bool = False) -> Runtime:
    """The PyTorch model as a runtime: inputs are moved to the model's device and dtype, logits come back as float32
    (on the model's device; a CUDA model is synchronised so that timing the call measures the forward pass). With
    ``bf16`` the forward pass runs under bfloat16 autocast (fast on GPUs and on CPUs with AVX512-BF16 or AMX; slow
    elsewhere). The runtime owns the model from then on: its weights are packed for the fast CPU path once
    (:func:`pvtv2.fast.freeze`)."""
    device, dtype = model.device, model.dtype
    fast.freeze(model)

    @torch.no_grad()
    def run(pixel_values: Any) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            # return_dict: a config.json may say false (transformers honours it), and a tuple has no .logits
            logits = model(torch.as_tensor(pixel_values).to(device, dtype), return_dict=True).logits.float()  # (B, K)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return logits

    return run


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as err:
        raise_interrupt_behind(err)
        raise OnnxRuntimeMissingError(
            "--runtime onnxruntime needs the onnxruntime package: pip install 'pvtv2[onnx]'"
        ) from None
    return onnxruntime


def _check_external_data(path: str) -> None:
    """Refuse an ONNX file whose weights kept in external data files (``onnx.save(save_as_external_data=True)``) are
    missing or lie outside the file's folder, naming the file, the tensor and the data file. onnxruntime's own error
    was cut to 300 characters in the middle of the data file's path, and versions before 1.19 read paths outside the
    folder. Needs the onnx package (installed with onnxruntime by ``pvtv2[onnx]``); without it onnxruntime decides."""
    try:
        import onnx
    except ImportError as err:
        raise_interrupt_behind(err)
        return
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - not a readable graph: onnxruntime's load, next, says why
        return
    # Where the graph says, lexically: a link there may lead elsewhere (huggingface_hub's snapshots link to its blobs)
    folder = os.path.dirname(os.path.abspath(path))
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        target = os.path.normpath(os.path.join(folder, location))
        try:
            end = int(entries.get("offset") or 0) + int(entries.get("length") or 0)
        except ValueError:
            end = 0  # not numbers: onnxruntime's load says why
        if not location or os.path.isabs(location):
            problem = "is not a path relative to the ONNX file's folder"
        elif os.path.commonpath([folder, target]) != folder:
            problem = f"lies outside the ONNX file's folder {folder!r}"
        elif not os.path.isfile(target):
            problem = f"does not exist in {folder!r}"
        elif os.path.getsize(target) < end:
            problem = (f"holds {os.path.getsize(target)} bytes, fewer than the {end} the tensor reaches to (a truncated "
                       f"copy)")
        else:
            continue
        raise ValueError(f"the ONNX file {path!r} keeps the weights of {tensor.name!r} in the external data file "
                         f"{location!r}, which {problem}: keep an exported model's data files whole, next to it")


def onnx_runtime(
    path: str | os.PathLike, model: PvtV2ForImageClassification, *, model_source: str | os.PathLike | None = None
) -> Runtime:
    """An ONNX classifier (as written by ``pvtv2 export``) run by onnxruntime's CPU provider, with as many intra-op
    threads as PyTorch uses.

    The file must take ``pixel_values`` and give ``logits`` with ``model.config.num_labels`` classes, because the
    labels come from ``model``: a file exported from another model would otherwise be labelled with the wrong names.
    A mismatch raises ``ValueError`` naming the file and the model (``model_source``).
    """
    ort = _import_onnxruntime()
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"the ONNX file {path!r} is a folder, not a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX file not found: {path!r}")
    _check_external_data(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 4  # fatal only: an error is raised, and said in one line below, as well as logged
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for unreadable or invalid files
        # Its messages nest (an initializer's failure inside the session's): the last words name the tensor and the fault
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"onnxruntime cannot load {path!r}: "
                         f"{reason if len(reason) <= 400 else '...' + reason[-400:]}") from None
    num_labels = model.config.num_labels
    where = f"the ONNX file {path!r}"
    against = f"the model {os.fspath(model_source)!r}" if model_source is not None else "the model"
    inputs, outputs = session.get_inputs(), session.get_outputs()
    input_names, output_names = [i.name for i in inputs], [o.name for o in outputs]
    if input_names != ["pixel_values"] or not output_names or output_names[0] != "logits":
        raise ValueError(
            f"{where} has inputs {input_names} and outputs {output_names}, but {against} is a classifier, whose export "
            f"(pvtv2 export) has the input 'pixel_values' and the output 'logits'"
        )
    # onnxruntime reports a shape the file does not declare (not even its rank) as []: unknown, checked at run time
    rank = len(outputs[0].shape) if outputs[0].shape else None
    if rank is not None and rank != 2:
        # a segmentation export also names its output 'logits', but (B, K, H/4, W/4): no class scores per image
        raise ValueError(
            f"{where} outputs 'logits' of {rank} dimensions {outputs[0].shape}, not a classifier's (batch, classes): "
            f"a segmentation or other dense model's export, which {against} (a classifier) cannot run"
        )
    # What the images are fed as: float32 (B, C, H, W) with the model's channels. A file taking another dtype or
    # channel count (a half-precision or one-channel model's export) failed at the first batch with onnxruntime's
    # InvalidArgument traceback.
    if inputs[0].type != "tensor(float)":
        raise ValueError(f"{where} takes {inputs[0].type} pixel values, but images are fed as float32 "
                         f"(tensor(float)): export the model in float32 (pvtv2 export does)")
    input_shape = inputs[0].shape or None  # [] is undeclared, as above
    channels = getattr(model.config, "num_channels", 3)
    if input_shape is not None and len(input_shape) != 4:
        raise ValueError(f"{where} takes pixel values of {len(input_shape)} dimensions {input_shape}, not "
                         f"(batch, channels, height, width)")
    if input_shape is not None and isinstance(input_shape[1], int) and input_shape[1] != channels:
        raise ValueError(f"{where} takes images of {input_shape[1]} channel(s), but {against} has {channels}: "
                         f"the file is another model's export")
    declared = outputs[0].shape[-1] if outputs[0].shape else None

    def wrong_classes(count: Any) -> ValueError:
        return ValueError(
            f"{where} outputs {count} classes but {against} has {num_labels}: its labels would name the wrong "
            f"classes; export this model with pvtv2 export --model {os.fspath(model_source or 'MODEL')}"
        )

    if isinstance(declared, int) and declared != num_labels:
        raise wrong_classes(declared)

    def run(pixel_values: Any) -> torch.Tensor:
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.detach().cpu().numpy()
        feed = np.ascontiguousarray(pixel_values, dtype=np.float32)  # (B, C, H, W)
        try:
            (logits,) = session.run(["logits"], {"pixel_values": feed})
        except Exception as err:  # onnxruntime's own exception types: a file of fixed sizes fed another batch or size
            fixed = "x".join(str(d) if isinstance(d, int) else "?" for d in input_shape or ())
            # the advice only where the file fixes a batch or side (a channel count is the model's own)
            sides = any(isinstance(d, int) for axis, d in enumerate(input_shape or ()) if axis != 1)
            raise ValueError(
                f"{where} cannot run on pixel values of shape {'x'.join(map(str, feed.shape))} (it takes {fixed}; ? is "
                f"free): {str(err).splitlines()[0][:200]}"
                + (". Export the model with pvtv2 export (dynamic batch, height and width)" if sides else "")
            ) from None
        if logits.ndim != 2:  # a file that declares no output shape
            raise ValueError(f"{where} outputs 'logits' of {logits.ndim} dimensions {list(logits.shape)}, not a "
                             f"classifier's (batch, classes): {against} (a classifier) cannot run it")
        if logits.shape[1] != num_labels:  # a symbolic class dimension is only known now
            raise wrong_classes(logits.shape[1])
        return torch.from_numpy(logits).float()  # (B, num_labels)

    _check_same_model(run, model, input_shape, where, against)
    return run


def _check_same_model(run: Runtime, model: PvtV2ForImageClassification, input_shape: Any, where: str,
                      against: str) -> None:
    """Refuse an ONNX file whose logits are not ``model``'s: one image of random pixels at the model's size (the
    file's, where it fixes one) through both. The same input, output and class count do not make a file this model's
    export: another checkpoint of the architecture (an older epoch, another run) gave its logits under this model's
    labels without a word. The tolerance, a quarter of the largest logit, lets a float16, bfloat16 or int8-quantized
    version of the graph pass (tiny models: float16 0.1-0.4% off, bfloat16 about 2%, onnxruntime's dynamic int8
    quantization 5-12%); models of other weights were 68-430% apart."""
    config = model.config
    fixed = [d if isinstance(d, int) else None for d in (input_shape or [None] * 4)]
    height, width = fixed[2] or config.image_size[0], fixed[3] or config.image_size[1]
    pixels = torch.randn(fixed[0] or 1, config.num_channels, height, width, generator=torch.Generator().manual_seed(0))
    parameter = next(model.parameters())
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            expected = model(pixels.to(parameter.device, parameter.dtype), return_dict=True).logits.float().cpu()
    except (ValueError, RuntimeError) as err:  # the model cannot run at its own size: nothing to compare with
        logger.debug("ONNX file not compared with the model: %s", err)
        return
    finally:
        model.train(training)
    got = run(pixels)
    difference = float((got - expected).abs().max())
    tolerance = 0.25 * float(expected.abs().max()) + 1e-4
    if not difference <= tolerance:  # NaN fails too
        raise ValueError(
            f"{where} is not an export of {against}: on the same image their logits differ by up to {difference:.3g} "
            f"(largest logit {float(expected.abs().max()):.3g}); its answers would go out under the model's labels. "
            f"Export the model: pvtv2 export --model MODEL --output FILE.onnx"
        )


def load_runtime(
    model: PvtV2ForImageClassification,
    runtime: str = "torch",
    onnx: str | os.PathLike | None = None,
    *,
    model_source: str | os.PathLike | None = None,
    bf16: bool = False,
) -> Runtime:
    """The runtime for :func:`predict` and :func:`evaluate`, chosen once.

    ``torch``: the model itself (under bfloat16 autocast with ``bf16``). ``onnxruntime``: the ONNX file ``onnx``, or, when none is given, ``model`` exported
    with :func:`pvtv2.export.export_onnx` into a temporary file (checked against PyTorch at its default sizes, as
    ``pvtv2 export`` does) that is deleted once onnxruntime has loaded it.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose from {RUNTIMES}")
    if runtime == "torch":
        if onnx is not None:
            raise ValueError("--onnx FILE is run by onnxruntime: add --runtime onnxruntime")
        return torch_runtime(model, bf16=bf16)
    if bf16:
        raise ValueError("--bf16 is bfloat16 autocast in PyTorch: use it with --runtime torch")
    _import_onnxruntime()  # before a slow export, not after it
    if model.device.type != "cpu":
        raise ValueError(f"--runtime onnxruntime runs on the CPU; drop --device {model.device}")
    if onnx is not None:
        return onnx_runtime(onnx, model, model_source=model_source)
    from .export import export_onnx

    with tempfile.TemporaryDirectory(prefix="pvtv2-onnx-") as folder:
        result = export_onnx(model, Path(folder) / "model.onnx")
        logger.info("exported with %s in %.1f s for onnxruntime", result.exporter, result.seconds)
        return onnx_runtime(result.path, model, model_source=model_source)


def find_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named directly (any extension), and image files inside named folders (recursively, sorted).

    A path that does not exist (or is a symlink loop or a dangling symlink), or a folder without image files, raises
    ``FileNotFoundError``; a path that is neither a regular file nor a folder (a FIFO, a device, a socket, which
    would block or never end) raises ``ValueError`` naming it. Sub-folders that cannot be listed are named in a
    warning.
    """
    kinds = {os.fspath(p): path_kind(p) for p in paths}
    missing = [f"{p!r}" + (f" (a {k})" if k != "nothing" else "") for p, k in kinds.items()
               if k in ("nothing", "symlink loop", "dangling symlink")]
    if missing:
        raise FileNotFoundError(f"image path(s) not found: {', '.join(missing)}")
    special = [f"{p!r} is a {k}" for p, k in kinds.items() if k not in ("file", "folder")]
    if special:
        raise ValueError(f"not an image file or folder: {'; '.join(special)}")
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files, unlisted = find_image_files(p)
            if unlisted:
                logger.warning("cannot list %d folder(s), their images are left out: %s", len(unlisted), ", ".join(unlisted))
            if not files:
                raise FileNotFoundError(f"folder {os.fspath(p)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            found.extend(files)
        else:
            found.append(p)
    return found


@dataclass
class Prediction:
    """Top-k classes of one image, or the reason it could not be read."""

    image: str
    labels: list[str]
    indices: list[int]
    scores: list[float]
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"image": self.image, "error": self.error}
        return {
            "image": self.image,
            "predictions": [
                {"label": label, "index": index, "score": score}
                for label, index, score in zip(self.labels, self.indices, self.scores)
            ],
        }


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _open_images(paths: Sequence[str | os.PathLike]) -> tuple[list[Any], list[str], list[tuple[str, str]]]:
    """The images among ``paths`` that open, their names, and ``(name, reason)`` for each one that does not."""
    loaded, names, failed = [], [], []
    for path in paths:
        try:
            loaded.append(load_image(path))
            names.append(os.fspath(path))
        except (OSError, ValueError) as err:
            logger.debug("skipping: %s", err)
            failed.append((os.fspath(path), str(err)))
    return loaded, names, failed


@torch.no_grad()
def predict(
    model: PvtV2ForImageClassification,
    processor: PvtV2ImageProcessor,
    images: Sequence[str | os.PathLike],
    top_k: int = 5,
    batch_size: int = 16,
    progress: bool = False,
    runtime: Runtime | None = None,
) -> list[Prediction]:
    """Softmax probabilities of the ``top_k`` most likely classes of each image file, in batches.

    ``runtime`` computes the logits (default: the PyTorch model; see :func:`load_runtime`)."""
    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    k = min(top_k, model.config.num_labels)
    id2label = model.config.id2label
    forward = runtime if runtime is not None else torch_runtime(model)
    results: list[Prediction] = []
    bar = progress_bar(total=len(images), unit="img", enabled=progress, desc="predict")
    for chunk in _batches(list(images), batch_size):
        loaded, names, failed = _open_images(chunk)
        results.extend(Prediction(name, [], [], [], error=why) for name, why in failed)
        # One image at a time: an image the preprocessing refuses (a 1 x 4000 strip whose shortest-edge resize
        # passes the pixel limit, one smaller than the crop of a no-resize config) or that comes out too small for
        # the model (a strip kept at its size without a resize) is reported as an unreadable one is; refused in the
        # batch's call, it ended the run and every other image's result with it.
        arrays, kept = [], []
        for name, image in zip(names, loaded):
            try:
                array = processor(image, return_tensors="np")["pixel_values"][0]
                check_input_size(array.shape[1], array.shape[2], model.config)
            except ValueError as err:
                logger.debug("skipping: %s", err)
                results.append(Prediction(name, [], [], [], error=f"cannot predict image {name!r}: {err}"))
                continue
            arrays.append(array)
            kept.append(name)
        if arrays:
            probs = _forward_by_shape(forward, arrays).softmax(dim=-1)  # (B, num_labels)
            scores, indices = probs.topk(k, dim=-1)
            for name, s, i in zip(kept, scores.tolist(), indices.tolist()):
                results.append(Prediction(name, [id2label[j] for j in i], i, s))
        bar.update(len(chunk))
    bar.close()
    return _in_input_order(results, images)


def _in_input_order(results: Sequence[Any], images: Sequence[str | os.PathLike]) -> list[Any]:
    """One result per entry of ``images`` (each with its ``.image`` name), in the order of ``images``. A file named
    twice (``predict a.jpg photos/`` with ``a.jpg`` among the photos, or typed twice) keeps both of its places: sorted
    by name, both of its results went to its last place, and every result between moved up one."""
    by_name: dict[str, list[Any]] = {}
    for result in results:
        by_name.setdefault(result.image, []).append(result)
    return [by_name[os.fspath(path)].pop(0) for path in images]


def _forward_by_shape(forward: Runtime, arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """float32 logits (B, num_labels) of preprocessed (3, H, W) arrays, in their order. Arrays of one shape go
    through one forward pass; without a resize (``do_resize: false``, the authors' protocol at 32 px or less) images
    keep their sizes, and stacking them failed ("images of different sizes cannot be batched") for the whole run."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, array in enumerate(arrays):
        groups.setdefault(array.shape, []).append(index)
    rows: list[torch.Tensor | None] = [None] * len(arrays)
    for members in groups.values():
        logits = forward(torch.from_numpy(np.stack([arrays[i] for i in members]))).float()
        for i, row in zip(members, logits):
            rows[i] = row
    return torch.stack(rows)  # type: ignore[arg-type]


def _dataset_root(data: str | os.PathLike) -> tuple[Path, str]:
    root = existing_folder(data)
    if (root / "val").is_dir():
        return root, "val"
    _refuse_split_folders(root)
    return root, "."


# Folder names that say a dataset split rather than a class ("val": Val/, which DIR/val/ does not find; "training" and
# "testing": MNIST's folders of PNGs).
_SPLIT_NAMES = ("train", "test", "val", "valid", "validation", "training", "testing")


def _refuse_split_folders(root: Path) -> None:
    """``DIR/train/<class>/`` and ``DIR/test/<class>/`` without ``DIR/val/``, read as ``DIR/<class>/``, scored the
    splits as classes (silently for a model with generic labels). A folder named as a split that holds sub-folders
    and no image file of its own is refused, naming the ``--data`` to pass; a class that happens to be named so
    (CIFAR-100's "train") holds its images itself, or has other class folders beside it (a "train" class whose
    images are in sub-folders of its own)."""
    splits = []
    names = sorted(os.listdir(root))
    if not any(n.lower() in _SPLIT_NAMES for n in names) or any(
        not n.startswith(".") and n.lower() not in _SPLIT_NAMES and (root / n).is_dir() for n in names
    ):
        return
    for name in names:
        folder = root / name
        if name.lower() not in _SPLIT_NAMES or not folder.is_dir():
            continue
        try:
            entries = list(folder.iterdir())
        except OSError:  # not listable: scan_split names it
            continue
        if any(e.is_dir() for e in entries) and not any(
            e.suffix.lower() in IMAGE_EXTENSIONS and e.is_file() for e in entries
        ):
            splits.append(name)
    if splits:
        shown = " or ".join(f"--data {os.fspath(root / name)}" for name in splits)
        raise ValueError(
            f"{os.fspath(root)!r} has no val/ folder, and its folder(s) {splits} hold class folders, not images: "
            f"dataset splits, which would be scored as classes. Evaluate one split: {shown}"
        )


# A folder name that reads as a generic label (LABEL_01, label_2, LABEL_-1, "LABEL 3"), exact or not.
_LABEL_LIKE = re.compile(r"\s*label[\s_-]*[+-]?[0-9]+\s*", re.IGNORECASE)


def class_mapping(folder_names: Sequence[str], id2label: dict[int, str]) -> dict[str, int]:
    """Class folder name -> model class index.

    Folder names must be names of the model's labels. A model whose labels are the generic ``LABEL_0`` ... (as
    written when none were given) takes folders named ``LABEL_i`` as class i, and otherwise one folder per class, in
    sorted order as classes 0, 1, ...: with fewer folders than classes, which folder is which class cannot be told
    (the folders 3 and 5 of a digits set would be scored as classes 0 and 1), so that is refused. So are folders
    that mix ``LABEL_i`` names with others, and names that look like labels but are none of the model's
    (``LABEL_01``, ``label_2``, ``LABEL_12`` of twelve classes): sorted order would score them as other classes.
    """
    if has_generic_labels(id2label):
        names = sorted(folder_names)
        by_name = {name: index for index, name in id2label.items()}
        if all(name in by_name for name in names):  # LABEL_10 sorts before LABEL_2: by name, not by order
            return {name: by_name[name] for name in names}
        last = f"LABEL_{len(id2label) - 1}"
        # Folders named after labels are meant by name; sorted order would score them as other classes, silently
        # (LABEL_1 beside 'a' and 'b' as class 0; label_10 of twelve as class 2). Such a name must be exact and
        # then every folder must be one.
        unknown = [name for name in names if name not in by_name and _LABEL_LIKE.fullmatch(name)]
        if unknown:
            raise ValueError(
                f"class folder(s) {unknown[:10]} look like label names but are none of the model's: its "
                f"{len(id2label)} class(es) are named LABEL_0 ... {last}, in that spelling and case (rename the "
                f"folders, or give the model its class names: id2label in its config.json)"
            )
        named = [name for name in names if name in by_name]
        if named:
            others = [name for name in names if name not in by_name]
            raise ValueError(
                f"class folders {named[:10]} are named after the model's labels and {others[:10]} are not: name "
                f"every folder LABEL_i (i its class, 0 ... {len(id2label) - 1}), or none (sorted folders are then "
                f"classes 0, 1, ..., one per class)"
            )
        if len(names) != len(id2label):
            raise ValueError(
                f"the model's {len(id2label)} classes have no names (LABEL_0 ... {last}) and the dataset has "
                f"{len(names)} class folder(s), {names[:10]}: sorted folders are taken as classes 0, 1, ... only "
                f"when there is one per class; give the model its class names (id2label in its config.json), name "
                f"the folders LABEL_i, or evaluate on all {len(id2label)} classes"
            )
        return {name: i for i, name in enumerate(names)}
    label2id: dict[str, int] = {}
    for index, name in sorted(id2label.items()):
        label2id.setdefault(name, index)
    unknown = sorted(n for n in folder_names if n not in label2id)
    if unknown:
        known = sorted(label2id)
        shown = ", ".join(repr(k) for k in known[:10]) + (f" ... ({len(known)} labels)" if len(known) > 10 else "")
        raise ValueError(
            f"class folder(s) {unknown} are not labels of the model; each folder name must be one of the model's "
            f"id2label names: {shown}"
        )
    return {name: label2id[name] for name in folder_names}


@torch.no_grad()
def evaluate(
    model: PvtV2ForImageClassification,
    processor: PvtV2ImageProcessor,
    data: str | os.PathLike,
    batch_size: int = 32,
    progress: bool = False,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Top-1 and top-5 accuracy, mean cross-entropy and throughput on ``DIR/<class>/*`` (or ``DIR/val/<class>/*``).
    Without ``DIR/val/``, split folders (``DIR/train/<class>/``, ``DIR/test/<class>/``) are a ValueError naming the
    split to pass as ``data``.

    ``images_per_second`` is end to end (reading, preprocessing and the model); ``model_images_per_second`` counts
    the forward passes only (the ``runtime``'s calls; default: the PyTorch model, see :func:`load_runtime`).
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    root, split = _dataset_root(data)
    folders, samples = scan_split(root, split, verify=False)
    mapping = class_mapping(folders, model.config.id2label)
    targets = {i: mapping[name] for i, name in enumerate(folders)}
    k = min(5, model.config.num_labels)
    forward = runtime if runtime is not None else torch_runtime(model)
    correct1 = correct5 = 0
    loss_sum = 0.0
    model_seconds = 0.0
    start = time.perf_counter()
    bar = progress_bar(total=len(samples), unit="img", enabled=progress, desc="eval")
    for chunk in _batches(samples, batch_size):
        images = [load_image(path) for path, _ in chunk]  # an unreadable file stops the evaluation, naming it
        arrays = []  # one image at a time, so that a refusal names its file (sizes differ without a resize)
        for (path, _), image in zip(chunk, images):
            try:
                array = processor(image, return_tensors="np")["pixel_values"][0]
                check_input_size(array.shape[1], array.shape[2], model.config)
            except ValueError as err:  # the preprocessing's or the model's refusal said which image only by index
                raise ValueError(f"cannot evaluate image {os.fspath(path)!r}: {err}") from err
            arrays.append(array)
        t0 = time.perf_counter()
        logits = _forward_by_shape(forward, arrays)  # (B, num_labels)
        model_seconds += time.perf_counter() - t0
        labels = torch.tensor([targets[label] for _, label in chunk], device=logits.device)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        top = logits.topk(k, dim=-1).indices  # (B, k)
        correct1 += int((top[:, 0] == labels).sum())
        correct5 += int((top == labels[:, None]).any(dim=1).sum())
        bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - start
    n = len(samples)
    return {
        "dataset": os.fspath(root / split) if split != "." else os.fspath(root),
        "images": n,
        "classes": len(folders),
        "top1": correct1 / n,
        "top5": correct5 / n,
        "top5_k": k,
        "loss": loss_sum / n,
        "preprocess": processor.protocol or "custom",  # which evaluation protocol the numbers belong to
        "images_per_second": n / seconds if seconds > 0 else float("inf"),
        "model_images_per_second": n / model_seconds if model_seconds > 0 else float("inf"),
        "seconds": seconds,
    }


SEGMENTATION_MODES = ("whole", "slide")


def _pair(
    name: str,
    value: Any,
    *,
    expected: str = "a positive integer or a (height, width) pair of them",
    index_sides: bool = False,
) -> tuple[int, int]:
    """``value`` as (height, width): one side for a square, or a pair of sides; anything else is a ValueError
    "``name`` must be ``expected``, got ``value``".

    Never a bool as a side, a torch bool tensor included (True is an index: 1 px), nor a str or bytes as a pair
    (b"32" is a sequence of ints, read as 51x50; a memoryview of them too), nor a set or mapping as a pair (no
    order: height and width could come out swapped): all silently wrong. With ``index_sides`` (load_processor's
    image_size) a side is anything with ``__index__``, a torch or numpy 0-d integer tensor too, so only a sequence
    or array is read as a pair (a tensor is a side, never iterated); without it (the sizes of predict_depth and the
    sliding window) a side is a Python or numpy integer and any other iterable, a generator too, is read as a pair
    (three items at most are read).
    """
    message = f"{name} must be {expected}, got {value!r}"

    def side(item: Any) -> int | None:  # None: not one side
        # A torch bool tensor has __index__ too (torch.tensor(True) is 1): a bool however it comes.
        if isinstance(item, (bool, np.bool_)) or (isinstance(item, torch.Tensor) and item.dtype == torch.bool):
            return None
        if isinstance(item, (int, np.integer)):
            return int(item)
        if not index_sides:
            return None
        try:
            return operator.index(item)
        except TypeError:
            return None

    # A set or a mapping has no order to read height and width from ({2, 9} iterates as 9, 2): not a pair.
    if isinstance(value, (str, bytes, bytearray, memoryview, AbstractSet, Mapping)):
        raise ValueError(message)
    if index_sides:
        is_pair = isinstance(value, (Sequence, np.ndarray))
    else:
        is_pair = side(value) is None
    if is_pair:
        try:  # two sides and one more at most, to tell a longer iterable (an endless one would never end)
            sides = tuple(side(item) for item in itertools.islice(value, 3))
        except TypeError:  # not iterable (a float, a bool) or a 0-d tensor or array
            raise ValueError(message) from None
    else:
        sides = (side(value),) * 2
    if len(sides) != 2 or None in sides or min(sides) < 1:
        raise ValueError(message)
    return sides[0], sides[1]


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Where the windows of one axis start, as mmsegmentation's ``slide_inference`` places them: every ``stride``
    pixels, the last one moved back to end at the border; one window when ``crop`` covers ``length``."""
    count = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, length) - crop, 0) for i in range(count)]


@torch.no_grad()
def segmentation_logits(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    *,
    mode: str = "whole",
    crop: int | Sequence[int] = 512,
    stride: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """(B, K, H, W) logits at the input's resolution (the head's 1/4-resolution logits upsampled, bilinear).

    ``mode="whole"``: one forward pass over the whole input. ``mode="slide"``: mmsegmentation's sliding window:
    ``crop``-sized windows every ``stride`` pixels (default: two thirds of ``crop``, 341 for 512; the last ones moved
    back inside the image), each upsampled to its window, the overlaps averaged. A window never exceeds the image, so an input no larger than ``crop`` is one
    window, the same as ``"whole"``.
    """
    if mode not in SEGMENTATION_MODES:
        raise ValueError(f"mode must be one of {list(SEGMENTATION_MODES)}, got {mode!r}")
    if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values must be (batch, 3, height, width), got shape {tuple(pixel_values.shape)}")
    height, width = pixel_values.shape[-2:]

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        out = model(pixels)
        # A tuple where the config says "return_dict": false (any module with .logits is taken, so not asked for)
        logits = out[0] if isinstance(out, tuple) else out.logits  # (B, K, h/4, w/4)
        # At least float32 (a half-precision model's logits are summed and averaged): a float64 model's were rounded
        # to float32, its slide and whole logits only as exact as float32's 1e-7 relative.
        logits = logits if logits.dtype == torch.float64 else logits.float()
        return F.interpolate(logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)

    if mode == "whole":
        return forward(pixel_values)
    crop_h, crop_w = _pair("crop", crop)
    # By default two thirds of the window (mmsegmentation's 341 for 512), as the command's --stride: a fixed 341
    # refused a smaller crop for a stride the caller never gave.
    stride_h, stride_w = (max(1, crop_h * 2 // 3), max(1, crop_w * 2 // 3)) if stride is None else _pair("stride", stride)
    if (stride_h > crop_h and height > crop_h) or (stride_w > crop_w and width > crop_w):
        raise ValueError(
            f"stride {(stride_h, stride_w)} must not exceed crop {(crop_h, crop_w)} on a {height}x{width} input: "
            f"the windows would leave gaps"
        )
    total: torch.Tensor | None = None
    count = torch.zeros(1, 1, height, width, dtype=torch.float32, device=pixel_values.device)  # whole numbers: exact
    for top in window_starts(height, crop_h, stride_h):
        for left in window_starts(width, crop_w, stride_w):
            bottom, right = min(top + crop_h, height), min(left + crop_w, width)
            logits = forward(pixel_values[:, :, top:bottom, left:right])  # (B, K, window h, window w)
            if total is None:
                total = logits.new_zeros(logits.shape[0], logits.shape[1], height, width)
            total[:, :, top:bottom, left:right] += logits
            count[:, :, top:bottom, left:right] += 1
    return total / count.to(total.dtype)  # type: ignore[union-attr]


def _check_scales(scales: Sequence[float]) -> None:
    if isinstance(scales, (int, float)) or len(scales) == 0 or any(
        isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 16 for s in scales
    ):
        raise ValueError(f"scales must be a non-empty list of positive factors (at most 16), got {scales!r}")


@torch.no_grad()
def segmentation_probabilities(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    *,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    mode: str = "whole",
    crop: int | Sequence[int] = 512,
    stride: int | Sequence[int] | None = None,
    output_size: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """(B, K, H, W) class probabilities at ``output_size`` ((height, width), or one side for a square; default: the
    input's), averaged over test-time augmentations as mmsegmentation's ``aug_test`` does: the input resized by each
    of ``scales`` (bilinear), and with ``flip`` also mirrored; for each, :func:`segmentation_logits` (``mode``, ``crop``, ``stride``), resized to
    ``output_size``, softmax (sigmoid for a one-class model), mirrored back; then the mean."""
    _check_scales(scales)
    height, width = pixel_values.shape[-2:]
    # Checked as the window sizes are: (0, 5), (5,), 7.5 or (True, 3) reached F.interpolate's own errors.
    output_size = (height, width) if output_size is None else _pair("output_size", output_size)
    total: torch.Tensor | None = None
    views = 0
    for scale in scales:
        size = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
        scaled = pixel_values if size == (height, width) else F.interpolate(
            pixel_values, size=size, mode="bilinear", align_corners=False
        )
        for mirrored in (False, True) if flip else (False,):
            view = scaled.flip(-1) if mirrored else scaled
            logits = segmentation_logits(model, view, mode=mode, crop=crop, stride=stride)
            logits = F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)
            probs = torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(1)
            probs = probs.flip(-1) if mirrored else probs
            total = probs if total is None else total + probs
            views += 1
    return total / views  # type: ignore[operator]


def fit_size(height: int, width: int, fit: Sequence[int], divisor: int = 32) -> tuple[int, int]:
    """The input size of the authors' ADE20K test protocol for an image of ``height`` x ``width``: rescaled keeping
    its aspect ratio so that its longer side is at most ``max(fit)`` and its shorter at most ``min(fit)`` (mmcv's
    ``imrescale`` with ``img_scale=(2048, 512)``: the factor is the smaller of the two ratios, sides rounded half up),
    then each side up to a multiple of ``divisor`` (the ``AlignResize`` of the PVT repository's segmentation code,
    which the model's 32 px stride needs)."""
    if len(fit) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in fit):
        raise ValueError(f"fit must be two positive whole numbers (the longest and shortest sides), got {fit!r}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in (height, width)):
        # 0 divided by zero; a negative side came back as a size (-10 x 5: 512 x 32)
        raise ValueError(f"height and width must be positive whole numbers, got {height!r} x {width!r}")
    factor = min(max(fit) / max(height, width), min(fit) / min(height, width))
    new_height, new_width = int(height * factor + 0.5), int(width * factor + 0.5)
    return (max(1, math.ceil(new_height / divisor)) * divisor, max(1, math.ceil(new_width / divisor)) * divisor)


@torch.no_grad()
def predict_segmentation(
    model: PvtV2ForSemanticSegmentation,
    image,
    size: tuple[int, int] | None = None,
    *,
    fit: Sequence[int] | None = None,
    mode: str = "whole",
    crop: int | Sequence[int] = 512,
    stride: int | Sequence[int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> np.ndarray:
    """(H, W) class indices for a PIL image, at the image's own resolution.

    The image is resized to ``size`` and normalised with ImageNet's statistics, as SegFormer's processor does; the
    prediction is upsampled (bilinear) back to the image before the argmax. ``size`` defaults to
    ``config.image_size`` for ``mode="whole"`` and to the image's own size for ``mode="slide"`` (windows of ``crop``
    every ``stride`` pixels). ``fit`` instead of ``size``: each image at its own :func:`fit_size` (the authors' ADE20K
    protocol is ``fit=(2048, 512)``). ``scales`` and ``flip``: multi-scale and flip testing
    (:func:`segmentation_probabilities`); with ``fit``, each scale r is the image at its :func:`fit_size` for the fit
    times r, as the authors' multi-scale test (mmsegmentation's ``img_ratios``) sizes it.
    """
    model = model.eval()
    output_size = (image.height, image.width)
    if fit is not None:
        if size is not None:
            raise ValueError(f"give size or fit, not both (got size={size!r}, fit={fit!r})")
        fit_size(image.height, image.width, fit)  # checks fit
        _check_scales(scales)
        # As mmsegmentation's MultiScaleFlipAug with the PVT repository's AlignResize: each scale r fits the image
        # into (int(LONG r), int(SHORT r)) and aligns that to 32, from the image itself. Scaling the fitted size by r
        # instead gave unaligned sizes (48 x 72 for the authors' 64 x 64) and, for a thin image, too small an input.
        total = 0
        for scale in scales:
            height, width = fit_size(image.height, image.width, [max(1, int(side * scale)) for side in fit])
            pixels = PvtV2ImageProcessor(size={"height": height, "width": width})(image)["pixel_values"]
            total = total + segmentation_probabilities(
                model, pixels.to(model.device, model.dtype), flip=flip, mode=mode, crop=crop, stride=stride,
                output_size=output_size,
            )
        probs = total / len(scales)  # each scale holds as many views (1, or 2 with flip): the mean of them all
    else:
        if size is None:
            size = tuple(model.config.image_size) if mode == "whole" else output_size
        pixels = PvtV2ImageProcessor(size={"height": size[0], "width": size[1]})(image)["pixel_values"]
        probs = segmentation_probabilities(
            model, pixels.to(model.device, model.dtype), scales=scales, flip=flip, mode=mode, crop=crop,
            stride=stride, output_size=output_size,
        )
    if probs.shape[1] == 1:
        return (probs[0, 0] > 0.5).long().cpu().numpy()
    return probs.argmax(1)[0].cpu().numpy()


def label_map_names(config: Any) -> dict[int, str]:
    """The name of each value of a predicted label map: ``id2label``, except for a one-class (binary) model, whose
    single channel names class 1 (where its sigmoid passes 0.5) and whose 0 is everything else (``not NAME``);
    ``id2label[0]`` named the background pixels."""
    if config.num_labels == 1:
        name = config.id2label[0]
        return {0: f"not {name}", 1: name}
    return dict(config.id2label)


@torch.no_grad()
def predict_depth(model: PvtV2ForDepthEstimation, image, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """(H, W) depth for a PIL image, at the image's own resolution.

    As GLPN's processor: the image is resized to ``size`` (height, width, or one number for a square; default: its
    own size rounded down to multiples of 32) and rescaled to [0, 1], not normalised; the prediction is resized
    back (bilinear).
    """
    if size is None:
        size = (max(32, image.height // 32 * 32), max(32, image.width // 32 * 32))
    # A pair of integers, or one: (32, 32, 32) used its first two, 64 failed "'int' object is not subscriptable".
    size = _pair("size", size)
    if size[0] % 32 or size[1] % 32 or min(size) < 32:
        raise ValueError(f"size must be multiples of 32 per side (GLPN's decoder), got {size[0]}x{size[1]}")
    pixels = PvtV2ImageProcessor(size={"height": size[0], "width": size[1]}, do_normalize=False)(image)["pixel_values"]
    depth = model.eval()(pixels.to(model.device, model.dtype), return_dict=True).predicted_depth  # (1, h, w)
    depth = F.interpolate(depth[:, None].float(), size=(image.height, image.width), mode="bilinear", align_corners=False)
    return depth[0, 0].cpu().numpy()


# ---------------------------------------------------------------------------------------------- object detection
@dataclass
class DetectionResult:
    """The objects found in one image (boxes x1 y1 x2 y2 in its pixels), or the reason it could not be read."""

    image: str
    boxes: list[list[float]]
    labels: list[int]
    names: list[str]
    scores: list[float]
    masks: np.ndarray | None = None  # (N, H, W) bool, mask_rcnn only
    size: tuple[int, int] | None = None  # (width, height)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"image": self.image, "error": self.error}
        objects = [
            {"label": name, "index": label, "score": score, "box": box}
            for box, label, name, score in zip(self.boxes, self.labels, self.names, self.scores)
        ]
        if self.masks is not None:
            for entry, mask in zip(objects, self.masks):
                entry["mask_pixels"] = int(mask.sum())
                # The mask itself: its pixel count alone left a JSON reader without the masks the picture shows
                entry["mask"] = coco_rle(mask)
        return {"image": self.image, "width": self.size[0], "height": self.size[1], "detections": objects}


def coco_rle(mask: np.ndarray) -> dict[str, Any]:
    """An (H, W) binary mask as COCO's compressed RLE, ``{"size": [H, W], "counts": str}``: pycocotools'
    ``mask.encode``, its ``counts`` decoded to text as COCO results files hold it (what ``COCO.loadRes`` reads)."""
    from .data.coco import import_pycocotools

    rle = import_pycocotools().encode(np.asfortranarray(np.asarray(mask, dtype=bool), dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def load_detector(source: str | os.PathLike, device: str | torch.device = "cpu", **overrides: Any):
    """A trained detector from a ``save_pretrained`` folder (or anything ``from_pretrained`` takes), in eval mode, its
    encoder's weights packed for the fast CPU path; a bare preset name is refused (random boxes)."""
    from .models.detection import PvtV2ForObjectDetection

    if is_preset_name(source):
        raise ValueError(
            f"{os.fspath(source)!r} is a preset (an architecture without trained weights): its detections would be "
            f"random. Pass a trained detector: a save_pretrained folder (pvtv2 train --task detection writes OUT/best)"
        )
    device = _inference_device(device)  # meta refused, as every other loader does: autocast raised on it
    remedy = (f"Train one on your data first: pvtv2 train --task detection --model {os.fspath(source)} --data DIR "
              f"--output RUN (COCO format), then use RUN/best")
    try:
        model = PvtV2ForObjectDetection.from_pretrained(source, **overrides)
    except ValueError as err:
        # An ImageNet classifier's labels stop the detector's config before its missing heads are seen; the config's
        # own advice (pass id2label=) is for building a new detector in Python, not for a command that runs one.
        if "ImageNet's 1000 classification labels" not in str(err):
            raise
        raise ValueError(f"{os.fspath(source)!r} has no trained detector: it is an ImageNet classifier (1000 classes, "
                         f"no FPN or detection heads). {remedy}") from None
    _refuse_random_weights(model, source, "detector", remedy)
    _refuse_non_finite_weights(model, source)
    model = model.to(device).eval()
    fast.freeze(model)
    return model


@torch.no_grad()
def detect_objects(
    model: Any,
    images: Sequence[str | os.PathLike],
    score_threshold: float = 0.3,
    batch_size: int = 4,
    progress: bool = False,
    bf16: bool = False,
) -> list[DetectionResult]:
    """The objects the detector finds in each image file, with scores of at least ``score_threshold``, in batches;
    boxes in the original image's pixels. Unreadable images give a result with an ``error``."""
    from .data.coco import image_to_tensor

    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"--score-threshold must be between 0 and 1, got {score_threshold}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    id2label = model.config.id2label
    own = getattr(model.config, "score_threshold", None)
    if own is not None and score_threshold < own:  # lower scores are dropped inside the model, before this filter
        logger.warning("the detector drops scores below its own threshold %g: load it with score_threshold=%g to "
                       "see scores down to that", own, score_threshold)
    device = next(model.parameters()).device
    model.eval()
    results: list[DetectionResult] = []
    bar = progress_bar(total=len(images), unit="img", enabled=progress, desc="detect")
    check_sizes = getattr(model, "check_image_sizes", None)
    for chunk in _batches(list(images), batch_size):
        loaded, names, failed = _open_images(chunk)
        kept: list[tuple[str, Any, torch.Tensor]] = []
        for name, picture in zip(names, loaded):
            tensor = image_to_tensor(picture)
            try:
                # one image too thin for the encoder stopped the command, naming no file, and lost the others
                if check_sizes is not None:
                    check_sizes([tensor])
            except ValueError as err:
                failed.append((name, f"{name}: {err}"))
                continue
            kept.append((name, picture, tensor.to(device)))
        names, loaded, tensors = [k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept]
        results.extend(DetectionResult(name, [], [], [], [], error=why) for name, why in failed)
        if loaded:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                outputs = model(tensors)
            for name, picture, out in zip(names, loaded, outputs):
                keep = out["scores"] >= score_threshold
                labels = out["labels"][keep].tolist()
                masks = out.get("masks")
                results.append(DetectionResult(
                    name,
                    boxes=[[round(v, 2) for v in box] for box in out["boxes"][keep].float().tolist()],
                    labels=labels,
                    names=[id2label[i] for i in labels],
                    scores=[round(s, 4) for s in out["scores"][keep].float().tolist()],
                    masks=(masks[keep][:, 0] >= 0.5).cpu().numpy() if masks is not None else None,
                    size=(picture.width, picture.height),
                ))
        bar.update(len(chunk))
    bar.close()
    return _in_input_order(results, images)


def detection_label_map(id2label: dict[int, str], annotations: Any) -> dict[int, int]:
    """Model label -> category id of a COCO annotation file (:class:`pvtv2.data.coco.CocoAnnotations`).

    A model whose classes are the file's category names in id order (one trained on it) takes them in that order, as
    does a model with the generic ``LABEL_0`` ... names and as many classes; otherwise labels map by name (a name that
    several categories share is then an error). Model classes the file does not have are left out (their detections
    are not scored).
    """
    categories = annotations.category_ids
    file_names = [annotations.id2label[label] for label in range(len(categories))]
    trained_on_these = [id2label[label] for label in sorted(id2label)] == file_names
    if trained_on_these or (has_generic_labels(id2label) and len(id2label) == len(categories)):
        # Label k is the k-th category, even where two share a name.
        return dict(enumerate(categories))
    ids_of: dict[str, list[int]] = {}
    for name, category in zip(file_names, categories):
        ids_of.setdefault(name, []).append(category)
    ambiguous = {name: ids for name, ids in ids_of.items() if len(ids) > 1 and name in id2label.values()}
    if ambiguous:  # the first id of a shared name would take every detection of that class: a wrong AP, no error
        shown = "; ".join(f"{name!r}: ids {ids}" for name, ids in list(ambiguous.items())[:5])
        raise ValueError(
            f"{os.fspath(annotations.path)!r} has several categories with the same name ({shown}): the model's "
            f"classes cannot be matched to them by name"
        )
    mapping = {label: ids_of[name][0] for label, name in id2label.items() if name in ids_of}
    if not mapping:
        raise ValueError(
            f"none of the model's classes ({', '.join(list(id2label.values())[:10])} ...) is a category of "
            f"{os.fspath(annotations.path)!r} ({', '.join(list(annotations.id2label.values())[:10])} ...)"
        )
    unused = [name for label, name in id2label.items() if label not in mapping]
    if unused:
        logger.warning("%d of the model's classes are not categories of the data and are not scored: %s",
                       len(unused), ", ".join(unused[:10]))
    _warn_unpredictable(annotations, set(mapping.values()))
    return mapping


def _warn_unpredictable(annotations: Any, predicted: set[int]) -> None:
    """COCOeval averages over every category with objects to find: one the model has no class for scores AP 0 and
    lowers the mean. Said once, with its names; categories without objects (or with crowd regions only) have no AP
    and do not count."""
    with_objects = {a["category_id"] for a in annotations.dataset["annotations"] if not a.get("iscrowd")}
    missing = [c for c in annotations.category_ids if c in with_objects and c not in predicted]
    if not missing:
        return
    names = {c: annotations.id2label[label] for label, c in enumerate(annotations.category_ids)}
    shown = ", ".join(repr(names[c]) for c in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    logger.warning(
        "%d of the %d categories with objects in %s %s of the model (%s): each scores AP 0, and the mean AP includes "
        "%s", len(missing), len(with_objects), annotations.path.name,
        "is not a class" if len(missing) == 1 else "are not classes", shown, "it" if len(missing) == 1 else "them",
    )


@torch.no_grad()
def evaluate_detector(
    model: Any,
    data: str | os.PathLike,
    split: str = "val",
    batch_size: int = 4,
    progress: bool = False,
    bf16: bool = False,
) -> dict[str, Any]:
    """COCO box AP (and mask AP for ``mask_rcnn``) of the detector on ``DIR/annotations/instances_{split}.json``,
    computed by pycocotools' COCOeval: its twelve numbers per IoU type, and the text it prints."""
    from .data.coco import CocoDetection, coco_evaluate, detections_to_coco

    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    dataset = CocoDetection(data, split)
    if not any(not a.get("iscrowd") for a in dataset.annotations.dataset["annotations"]):
        # COCOeval scores -1 (no ground truth) for every number: printed as "box AP -1.0000", exit 0
        raise ValueError(
            f"{os.fspath(dataset.annotations.path)!r} lists no objects (no annotation, or crowd regions only): there "
            f"is nothing to score box AP on"
        )
    mapping = detection_label_map(model.config.id2label, dataset.annotations)
    device = next(model.parameters()).device
    iou_types = ["bbox"]
    if model.config.detector == "mask_rcnn":
        if all(a.get("segmentation") for a in dataset.annotations.dataset["annotations"]):
            iou_types.append("segm")
        else:
            logger.warning("some annotations of %s have no mask: mask AP is not computed", dataset.annotations.path.name)
    model.eval()
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    model_seconds = 0.0
    bar = progress_bar(total=len(dataset), unit="img", enabled=progress, desc="eval")
    check_sizes = getattr(model, "check_image_sizes", None)
    for chunk in _batches(range(len(dataset)), batch_size):
        items = [dataset[i] for i in chunk]  # an unreadable image stops the evaluation, naming it
        for i, (image, _) in zip(chunk, items):
            try:
                if check_sizes is not None:  # any callable with the detectors' outputs may be scored
                    check_sizes([image])
            except ValueError as err:  # ... as does one too small for the encoder (it named no file)
                name = os.fspath(dataset.image_dir / dataset.images[i]["file_name"])
                raise ValueError(f"{name!r}: {err}") from None
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            outputs = model([image.to(device) for image, _ in items])
        model_seconds += time.perf_counter() - t0
        results.extend(detections_to_coco(outputs, [t["image_id"] for _, t in items], mapping))
        bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - start
    metrics = coco_evaluate(dataset.annotations, results, iou_types)
    n = len(dataset)
    return {
        "dataset": os.fspath(dataset.annotations.path),
        "images": n,
        "annotations": len(dataset.annotations.dataset["annotations"]),
        "categories": len(dataset.annotations.category_ids),
        "detections": len(results),
        **{("box" if t == "bbox" else "mask"): metrics[t] for t in iou_types},
        "summary": metrics["summary"],
        "images_per_second": n / seconds if seconds > 0 else float("inf"),
        "model_images_per_second": n / model_seconds if model_seconds > 0 else float("inf"),
        "seconds": seconds,
    }


def _mask_classes_to_model(data: str | os.PathLike, config: Any) -> dict[int, int] | None:
    """Mask value -> model class, by name, where ``DATA/labels.json`` names the mask values otherwise than the model
    names its classes (a model trained on data that listed them in another order); None where the values are the
    model's classes (no labels.json, the same names, or a model whose classes have no names)."""
    from .data.masks import read_id2label

    path = Path(data) / "labels.json"
    if not path.is_file():
        return None
    names = read_id2label(data)
    model_names = dict(config.id2label)
    generic = has_generic_labels(model_names) or all(n == f"class_{i}" for i, n in model_names.items())
    if names == model_names or generic:
        return None
    where = os.fspath(path)
    if config.num_labels == 1:
        raise ValueError(f"{where!r} names the classes {sorted(names.values())[:10]} but the one-class model's class is "
                         f"{model_names[0]!r}: the masks are not of the model's classes")
    index: dict[str, int] = {}
    shared = set()
    for i, name in sorted(model_names.items()):
        if name in index:
            shared.add(name)
        index.setdefault(name, i)
    unknown = [n for n in names.values() if n not in index]
    if unknown:
        raise ValueError(f"classes {unknown[:10]} of {where!r} are not classes of the model "
                         f"({', '.join(list(model_names.values())[:10])} ...): its predictions cannot be scored on them")
    ambiguous = [n for n in names.values() if n in shared]
    if ambiguous:
        raise ValueError(f"classes {ambiguous[:10]} of {where!r} name several classes of the model: which is meant "
                         f"cannot be told")
    mapping = {value: index[name] for value, name in names.items()}
    moved = {names[v]: (v, m) for v, m in mapping.items() if v != m}
    if moved:
        shown = ", ".join(f"{name!r} {v}->{m}" for name, (v, m) in list(moved.items())[:5])
        logger.info("mask values mapped to the model's classes by the names of labels.json: %s", shown)
    return mapping


def _map_mask_classes(labels: np.ndarray, mapping: dict[int, int], mask_path: Path, ignore_index: int = 255) -> np.ndarray:
    """``labels`` with each value replaced by its model class (``ignore_index`` stays); a value labels.json does not
    name is a ``ValueError``."""
    values = np.unique(labels[labels != ignore_index])
    unnamed = [int(v) for v in values if int(v) not in mapping]
    if unnamed:
        raise ValueError(f"mask {os.fspath(mask_path)!r} holds class(es) {unnamed[:10]} that labels.json does not name")
    # A lookup table over the kept values only: the ignore value stays as it is. It was looked up too, and a
    # negative one (a model's -100, which --reduce-labels turns the 0s into) indexed the table from its end.
    kept = labels != ignore_index
    table = np.arange(int(labels[kept].max(initial=0)) + 1, dtype=np.int64)
    for value, model_class in mapping.items():
        if value < len(table):
            table[value] = model_class
    mapped = labels.astype(np.int64, copy=True)
    mapped[kept] = table[labels[kept]]
    return mapped


def evaluate_segmenter(
    model: PvtV2ForSemanticSegmentation,
    data: str | os.PathLike,
    split: str = "val",
    size: tuple[int, int] | None = None,
    *,
    reduce_labels: bool = False,
    ignore_index: int | None = None,
    progress: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Mean IoU, pixel accuracy and per-class IoU of ``model`` on ``data/split/{images,masks}``, each image predicted
    by :func:`predict_segmentation` (``size`` and ``options``: mode, crop, stride, scales, flip) at its mask's
    resolution; mask value ``ignore_index`` (None: the model's ``semantic_loss_ignore_index``, 255 unless it was
    trained with another) is left out, and ``reduce_labels`` reads ADE20K-style masks (0 = no label, which becomes
    ``ignore_index``). Where ``data/labels.json`` names the mask values, they are matched to the model's classes by
    name."""
    from .data.masks import check_ignore_index, check_not_binary_255, read_mask, scan_segmentation_split
    from .data.masks import reduce_labels as reduce
    from .training.segmentation import segmentation_metrics

    if ignore_index is not None:
        check_ignore_index(ignore_index, label_map_names(model.config))  # a binary model's classes: 0 and 1
    else:
        ignore_index = getattr(model.config, "semantic_loss_ignore_index", None)
        ignore_index = 255 if ignore_index is None else ignore_index
        # A negative one (transformers' -100 or -1) is a value no mask holds: every pixel counts, as in its loss.
        if ignore_index >= 0:
            check_ignore_index(ignore_index, label_map_names(model.config), "the model's semantic_loss_ignore_index")
    pairs = scan_segmentation_split(existing_folder(data), split)
    check_not_binary_255(pairs, ignore_index)  # 0/255 pictures: every object pixel ignored, mean IoU 1 for all-background
    to_model = _mask_classes_to_model(data, model.config)
    k = max(2, model.config.num_labels)
    confusion = np.zeros((k, k), dtype=np.int64)
    began = time.perf_counter()
    for image_path, mask_path in progress_bar(pairs, enabled=progress, desc="segment"):
        image = load_image(image_path).convert("RGB")
        labels = np.asarray(read_mask(mask_path), dtype=np.int64)
        if reduce_labels:
            labels = reduce(labels, ignore_index).astype(np.int64)
        if to_model is not None:
            labels = _map_mask_classes(labels, to_model, mask_path, ignore_index)
        if labels.shape != (image.height, image.width):
            raise ValueError(f"mask {os.fspath(mask_path)!r} is {labels.shape[1]}x{labels.shape[0]} but its image is "
                             f"{image.width}x{image.height}")
        predicted = predict_segmentation(model, image, size, **options)
        keep = labels != ignore_index
        if (labels[keep] >= k).any():
            raise ValueError(f"mask {os.fspath(mask_path)!r} has class {int(labels[keep].max())} but the model has "
                             f"{model.config.num_labels} classes" + ("" if reduce_labels else
                             " (ADE20K-style masks, 0 = no label: pass --reduce-labels)"))
        confusion += np.bincount(labels[keep] * k + predicted[keep], minlength=k * k).reshape(k, k)
    if not confusion.any():
        # Nothing to score: it was reported as mean IoU 0 and pixel accuracy 0, a model wrong at every pixel.
        raise ValueError(
            f"no mask in {os.fspath(Path(data) / split / 'masks')!r} holds a labelled pixel: every pixel is the "
            f"ignore value {ignore_index}" + (" or 0 (no label, with --reduce-labels)" if reduce_labels else "")
            + "; there is nothing to score mean IoU and pixel accuracy on"
        )
    metrics = segmentation_metrics(confusion)
    names = [label_map_names(model.config).get(i, str(i)) for i in range(k)]
    # Keyed by name: a name that several classes share (a checkpoint's id2label may repeat one) kept the IoU of the
    # last of them only, under a name that then meant another class. Those get their index too.
    shared = {name for name in names if names.count(name) > 1}
    names = [f"{name} ({i})" if name in shared else name for i, name in enumerate(names)]
    return {
        "dataset": os.fspath(Path(data) / split),
        "images": len(pairs),
        "mean_iou": metrics["mean_iou"],
        "pixel_accuracy": metrics["pixel_accuracy"],
        "per_class_iou": dict(zip(names, metrics["per_class_iou"])),
        "seconds": time.perf_counter() - began,
    }


