"""ONNX export with dynamic batch, height and width, checked against PyTorch; checkpoint conversion between layouts.

What makes PVTv2 hard to export with free input sizes, and what is done about it:

- The spatial reduction reshapes tokens ``(B, N, C)`` back to ``(B, C, H, W)`` with the ``H, W`` of the patch
  embedding's output. Both exporters record these as shape computations, so the reshape follows the input size.
- Linear attention pools keys and values with ``AdaptiveAvgPool2d(7)``. Neither exporter writes that as a size-free
  ONNX graph: the TorchScript-based exporter refuses it ("input size not accessible") and the dynamo exporter writes
  an ``AveragePool`` whose kernel and stride are those of the example input, which gives wrong results (or a failing
  reshape) at any other size. Before exporting, every ``AdaptiveAvgPool2d`` of a copy of the model is therefore
  replaced by :class:`ExportableAdaptiveAvgPool2d`, the same average written as two small matrix products whose
  matrices are built from the input size at run time. It reproduces PyTorch's windows exactly (start
  ``floor(i*H/7)``, end ``ceil((i+1)*H/7)``), for every size, including sizes not divisible by 7 and sizes below 7.

Every export is run in onnxruntime at several input sizes and compared with PyTorch before the file is moved into
place; a file that does not match is never written.
"""

from __future__ import annotations

import copy
import errno
import glob
import hashlib
import logging
import os
import re
import secrets
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .fileio import WriteError, atomic_write_text, write_folder_atomically
from .runtime import raise_interrupt_behind

__all__ = [
    "DEFAULT_CHECK_SIZES",
    "DEFAULT_OPSET",
    "DEPTH_CHECK_SIZES",
    "EXPORTERS",
    "MAX_OPSET",
    "MIN_OPSET",
    "ExportCheck",
    "ExportError",
    "ExportResult",
    "ExportableAdaptiveAvgPool2d",
    "check_onnx",
    "checkpoint_task",
    "convert_checkpoint",
    "export_onnx",
    "graph_outputs",
    "load_checkpoint_model",
    "load_export_model",
    "load_task_model",
    "make_exportable",
]

logger = logging.getLogger(__name__)

# (batch, height, width): the square training size, a non-square batch of two, and odd sizes divisible by nothing.
DEFAULT_CHECK_SIZES: tuple[tuple[int, int, int], ...] = ((1, 224, 224), (2, 160, 192), (1, 97, 131))
# The depth decoder runs at multiples of 32 only: its default replaces the odd size by the nearest such one.
DEPTH_CHECK_SIZES: tuple[tuple[int, int, int], ...] = ((1, 224, 224), (2, 160, 192), (1, 96, 128))
EXPORTERS = ("auto", "torchscript", "dynamo")
# Opset 14 is the first the TorchScript exporter writes scaled_dot_product_attention in; 23 the last torch writes.
MIN_OPSET, DEFAULT_OPSET, MAX_OPSET = 14, 18, 23


class ExportError(ValueError):
    """The export failed, or its result does not agree with PyTorch."""


def _pool_matrix(size: torch.Tensor | int, out: int, like: torch.Tensor) -> torch.Tensor:
    """(out, size) averaging matrix: row i averages positions floor(i*size/out) .. ceil((i+1)*size/out) - 1."""
    i = torch.arange(out, device=like.device)
    start = torch.div(i * size, out, rounding_mode="floor")
    end = torch.div((i + 1) * size + out - 1, out, rounding_mode="floor")
    pos = torch.arange(size, device=like.device)
    inside = ((pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])).to(like.dtype)  # (out, size)
    return inside / inside.sum(dim=1, keepdim=True)


class ExportableAdaptiveAvgPool2d(nn.Module):
    """``AdaptiveAvgPool2d(output_size)`` as ``P_h @ x @ P_w^T``, with the pooling matrices computed from the input's
    size inside the graph, so an exported model pools correctly at every input size."""

    def __init__(self, output_size: int | tuple[int, int]) -> None:
        super().__init__()
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2], x.shape[-1]
        rows = _pool_matrix(height, self.output_size[0], x)  # (oh, H)
        cols = _pool_matrix(width, self.output_size[1], x)  # (ow, W)
        return rows @ x @ cols.transpose(0, 1)  # (B, C, oh, ow)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


def _replace_adaptive_pools(model: nn.Module) -> int:
    """Replace every ``AdaptiveAvgPool2d`` of ``model`` in place; how many were."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.AdaptiveAvgPool2d):
                size = child.output_size
                if isinstance(size, (tuple, list)) and None in size:
                    raise ExportError(f"cannot export AdaptiveAvgPool2d with output size {size}")
                setattr(parent, name, ExportableAdaptiveAvgPool2d(size))
                replaced += 1
    return replaced


def make_exportable(model: nn.Module) -> tuple[nn.Module, int]:
    """A deep copy of ``model`` in eval mode with every ``AdaptiveAvgPool2d`` replaced (and how many were)."""
    model = copy.deepcopy(model).eval()
    return model, _replace_adaptive_pools(model)


def graph_outputs(model: nn.Module) -> tuple[str, ...]:
    """The names of the outputs an export of ``model`` has, in order; ``TypeError`` for a model that is not exported.

    ``PvtV2ForImageClassification``: ``logits`` (B, num_labels); ``PvtV2ForSemanticSegmentation``: ``logits``
    (B, num_labels, H/4, W/4); ``PvtV2ForDepthEstimation``: ``predicted_depth`` (B, H, W); ``PvtV2Model``:
    ``last_hidden_state`` (B, C, H/32, W/32); ``PvtV2Backbone``: one feature map per ``out_features`` entry, named
    after it (``stage1`` .. ``stage4``).
    """
    from .models.depth import PvtV2ForDepthEstimation
    from .models.detection import PvtV2ForObjectDetection
    from .models.modeling import PvtV2Backbone, PvtV2ForImageClassification, PvtV2Model
    from .models.segmentation import PvtV2ForSemanticSegmentation

    if isinstance(model, (PvtV2ForImageClassification, PvtV2ForSemanticSegmentation)):
        return ("logits",)
    if isinstance(model, PvtV2ForDepthEstimation):
        return ("predicted_depth",)
    if isinstance(model, PvtV2Model):
        return ("last_hidden_state",)
    if isinstance(model, PvtV2Backbone):
        return tuple(model.out_features)
    if isinstance(model, PvtV2ForObjectDetection):
        raise TypeError(
            "a detection model is not exported to ONNX: its output is a list of boxes per image after torchvision's "
            "post-processing (score threshold, non-maximum suppression), which has no fixed-shape graph here. Export "
            "its encoder instead (model.pvt_v2, a PvtV2Model) and run the detection head in PyTorch"
        )
    raise TypeError(
        f"cannot export a {type(model).__name__}: export_onnx takes PvtV2ForImageClassification, PvtV2Model, "
        f"PvtV2Backbone, PvtV2ForSemanticSegmentation or PvtV2ForDepthEstimation"
    )


class _Outputs(nn.Module):
    """The model as a function from pixel values to a tuple of its exported outputs (see :func:`graph_outputs`)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(names)
        self.backbone = hasattr(model, "out_features")

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(pixel_values, return_dict=True)
        if self.backbone:
            return tuple(out.feature_maps)  # one (B, C_i, H_i, W_i) per out_features entry
        return tuple(getattr(out, name) for name in self.names)


def _dynamic_axes(names: Sequence[str], ranks: Sequence[int]) -> dict[str, dict[int, str]]:
    """Named dynamic axes of each output: the batch, and the spatial sides of a map (its own names: a map's side is
    not the input's but a function of it)."""
    axes: dict[str, dict[int, str]] = {"pixel_values": {0: "batch", 2: "height", 3: "width"}}
    for name, rank in zip(names, ranks):
        if rank == 4:
            axes[name] = {0: "batch", 2: f"{name}_height", 3: f"{name}_width"}
        elif rank == 3:  # the depth map
            axes[name] = {0: "batch", 1: f"{name}_height", 2: f"{name}_width"}
        else:
            axes[name] = {0: "batch"}
    return axes


@dataclass
class ExportCheck:
    """One onnxruntime-versus-PyTorch comparison at one input shape, over every output of the graph."""

    shape: tuple[int, int, int, int]
    max_abs_diff: float | None
    tolerance: float | None
    ok: bool
    error: str | None = None
    # Per output: name -> (max abs diff, tolerance); the fields above hold the worst ratio of the two.
    outputs: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class ExportResult:
    path: Path | None
    exporter: str
    opset: int
    output_name: str
    pools_replaced: int
    seconds: float
    checks: list[ExportCheck] = field(default_factory=list)
    attempts: list[str] = field(default_factory=list)
    output_names: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": os.fspath(self.path) if self.path else None,
            "exporter": self.exporter,
            "opset": self.opset,
            "output": self.output_name,
            "outputs": list(self.output_names or (self.output_name,)),
            "adaptive_pools_replaced": self.pools_replaced,
            "export_seconds": round(self.seconds, 2),
            "checks": [
                {"shape": list(c.shape), "max_abs_diff": c.max_abs_diff, "tolerance": c.tolerance, "ok": c.ok,
                 **({"outputs": {k: {"max_abs_diff": d, "tolerance": t} for k, (d, t) in c.outputs.items()}}
                    if len(c.outputs) > 1 else {}),
                 **({"error": c.error} if c.error else {})}
                for c in self.checks
            ],
            "attempts": self.attempts,
        }


def _declare_fixed_sizes(path: Path, names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> None:
    """Write each output's fixed sizes (a map's channel count) into the graph's output declarations, where the
    TorchScript exporter's shape inference lost them (it declares ``Transposelast_hidden_state_dim_1``: a symbolic
    size for what is always, say, 512). Needs the onnx package; without it the declarations stay as written."""
    try:
        import onnx
    except ImportError as err:
        raise_interrupt_behind(err)
        return
    if path.stat().st_size > 1_800_000_000:  # near protobuf's 2 GB limit, which onnx.save cannot write past
        return
    # The graph alone: the weights the exporter kept in data files beside it (a model past 2 GB) stay there (loaded,
    # they were written back into the graph, past protobuf's limit: "EncodeError: Failed to serialize proto")
    proto = onnx.load(os.fspath(path), load_external_data=False)
    dynamic = _dynamic_axes(names, [len(shape) for shape in shapes])
    for out, shape in zip(proto.graph.output, shapes):
        dims = out.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            continue
        for axis, (dim, size) in enumerate(zip(dims, shape)):
            if axis not in dynamic.get(out.name, {}) and not dim.HasField("dim_value"):
                dim.dim_value = size  # dim_value and dim_param are one field: this drops the symbolic name
    onnx.save(proto, os.fspath(path))


def _export_once(wrapper: nn.Module, example: torch.Tensor, path: Path, exporter: str, opset: int,
                 output_names: Sequence[str], output_shapes: Sequence[tuple[int, ...]]) -> None:
    # The exporters are chatty: deprecation and tracer warnings, and one INFO line per graph rewrite.
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(
                wrapper, (example,), os.fspath(path), dynamo=False, opset_version=opset,
                input_names=["pixel_values"], output_names=list(output_names),
                dynamic_axes=_dynamic_axes(output_names, [len(shape) for shape in output_shapes]),
            )
            _declare_fixed_sizes(path, output_names, output_shapes)
        else:
            batch = torch.export.Dim("batch", min=1, max=4096)
            height = torch.export.Dim("height", min=1, max=16384)
            width = torch.export.Dim("width", min=1, max=16384)
            torch.onnx.export(
                wrapper, (example,), os.fspath(path), dynamo=True, opset_version=opset,
                input_names=["pixel_values"], output_names=list(output_names),
                dynamic_shapes={"pixel_values": {0: batch, 2: height, 3: width}}, external_data=False,
                verbose=False,  # else it prints its progress to stdout, before the JSON of pvtv2 export --json
            )


def _check_sizes(sizes: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    if not sizes:  # an empty list would skip the check as silently as None, which says so
        raise ValueError("check sizes are empty: give at least one (batch, height, width), or None to skip the check")
    checked = []
    for size in sizes:
        if (len(size) != 3 or any(isinstance(v, bool) or not isinstance(v, int) for v in size)
                or min(size) < 1):
            raise ValueError(f"check sizes are (batch, height, width) of positive integers, got {size!r}")
        checked.append(tuple(size))
    return checked


def _reference_outputs(
    model: nn.Module, names: Sequence[str], sizes: Sequence[tuple[int, int, int]], channels: int, seed: int
) -> list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
    """Random inputs of each size and the float32 PyTorch outputs of ``model`` on them. A size the model itself
    cannot run (too small for its spatial reduction, not a multiple of 32 for the depth decoder) is a ``ValueError``
    naming it, raised before anything is exported."""
    wrapper = _Outputs(model, names).eval()
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for batch, height, width in sizes:
        x = torch.randn((batch, channels, height, width), generator=gen)
        try:
            with torch.no_grad():
                expected = tuple(t.float() for t in wrapper(x))
        except (ValueError, RuntimeError) as err:
            raise ValueError(
                f"check size {batch}x{height}x{width}: the PyTorch model itself does not run there: "
                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
            ) from None
        pairs.append((x, expected))
    return pairs


def _open_session(path: str | os.PathLike):
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise_interrupt_behind(err)
        raise ExportError(
            "checking the export needs onnxruntime: pip install 'pvtv2[onnx]' (or skip the check with --no-check)"
        ) from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def _compare(
    path: str | os.PathLike,
    names: Sequence[str],
    references: Sequence[tuple[torch.Tensor, tuple[torch.Tensor, ...]]],
    rtol: float,
    atol: float,
) -> list[ExportCheck]:
    try:
        session = _open_session(path)
    except ExportError:
        raise
    except Exception as err:  # onnxruntime raises its own exception types for a graph it cannot load
        reason = f"onnxruntime cannot load the graph: {str(err).splitlines()[0][:300]}"
        return [ExportCheck(tuple(x.shape), None, None, False, reason) for x, _ in references]
    got_names = [o.name for o in session.get_outputs()]
    if got_names != list(names):
        reason = f"the graph's outputs are {got_names}, expected {list(names)}"
        return [ExportCheck(tuple(x.shape), None, None, False, reason) for x, _ in references]
    input_name = session.get_inputs()[0].name
    checks = []
    for x, expected in references:
        shape = tuple(x.shape)
        try:
            got = session.run(None, {input_name: x.numpy()})
        except Exception as err:  # onnxruntime raises its own exception types
            checks.append(ExportCheck(shape, None, None, False, str(err).splitlines()[0][:300]))
            continue
        per_output: dict[str, tuple[float, float]] = {}
        error = None
        for name, want, have in zip(names, expected, got):
            have_t = torch.from_numpy(have)
            if have_t.shape != want.shape:
                error = f"output {name!r} has shape {tuple(have_t.shape)}, PyTorch's is {tuple(want.shape)}"
                break
            diff = float((have_t - want).abs().max()) if want.numel() else 0.0
            tol = atol + rtol * (float(want.abs().max()) if want.numel() else 0.0)
            per_output[name] = (diff, tol)
        if error is not None:
            checks.append(ExportCheck(shape, None, None, False, error))
            continue
        # NaN compares false everywhere: a NaN difference fails here.
        ok = all(diff <= tol for diff, tol in per_output.values())
        worst = max(per_output.values(), key=lambda dt: dt[0] / dt[1] if dt[1] > 0 and dt[0] == dt[0] else float("inf"))
        checks.append(ExportCheck(shape, worst[0], worst[1], ok, outputs=per_output))
    return checks


def check_onnx(
    path: str | os.PathLike,
    model: nn.Module,
    sizes: Sequence[tuple[int, int, int]] = DEFAULT_CHECK_SIZES,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    seed: int = 0,
) -> list[ExportCheck]:
    """Run the ONNX file in onnxruntime on random inputs of each ``(batch, height, width)`` and compare every output
    with ``model``'s (see :func:`graph_outputs`); the graph's output names must be those.

    An output passes when ``max |onnx - torch| <= atol + rtol * max |torch|``; a size passes when all its outputs do.
    """
    names = graph_outputs(model)
    channels = getattr(getattr(model, "config", None), "num_channels", 3)
    reference = copy.deepcopy(model).cpu().float().eval()
    references = _reference_outputs(reference, names, _check_sizes(sizes), channels, seed)
    return _compare(path, names, references, rtol, atol)


def _file_opset(path: Path) -> int | None:
    """The default-domain opset the file declares (None when the onnx package is not installed)."""
    try:
        import onnx
    except ImportError as err:
        raise_interrupt_behind(err)
        return None
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a readable graph: onnxruntime's load, next, says why
        return None
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _temporary_sibling(output: Path) -> Path:
    """The hidden file an export is written to before it is checked: ``.NAME.<unique>.tmp``, this export's own (two
    exports to one output at once shared ``.NAME.tmp``: each wrote over the other's between its check and its
    rename), or, where that would be longer than the 255 bytes a folder entry takes, the name cut short with a hash
    of it."""
    unique = f"{os.getpid()}-{secrets.token_hex(4)}"
    name = f".{output.name}.{unique}.tmp"
    if len(name.encode()) <= 255:
        return output.with_name(name)
    digest = hashlib.sha1(output.name.encode()).hexdigest()[:12]
    return output.with_name(f".{output.name.encode()[:200].decode(errors='ignore')}.{digest}.{unique}.tmp")


def _missing_folders(folder: Path) -> list[Path]:
    """The folders ``mkdir(parents=True)`` would create for ``folder``, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def export_onnx(
    model: nn.Module,
    output: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    check_sizes: Sequence[tuple[int, int, int]] | None = DEFAULT_CHECK_SIZES,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> ExportResult:
    """Export a PVTv2 model to ONNX with dynamic batch, height and width: a classifier (``logits``), the encoder
    (``last_hidden_state``), a backbone (one output per feature map), a segmentation model (``logits``) or a depth
    model (``predicted_depth``); see :func:`graph_outputs`. Detection models are refused with ``TypeError``.

    ``exporter``: ``torchscript`` (``torch.onnx.export(dynamo=False)``, fast), ``dynamo`` (``torch.export`` based,
    slower), or ``auto``: TorchScript first, then dynamo if that fails to export or to match. ``opset``: 14 (the first
    with attention's operators) to 23. The file is written next to ``output`` under a temporary name, checked with
    onnxruntime at ``check_sizes`` (by default :data:`DEFAULT_CHECK_SIZES`, :data:`DEPTH_CHECK_SIZES` for a depth
    model; ``None``: not checked; every output is compared with the PyTorch model's, in
    float32), and moved into place only when every size matches; otherwise :class:`ExportError` lists the
    differences. Arguments and check sizes the model cannot run are refused (``ValueError`` / ``TypeError``) before
    anything is exported. On any failure, interruptions included, nothing is left behind: no temporary file, no
    folder created for ``output``, and an existing file at ``output`` as it was. An existing file is replaced only by
    an export that passed its checks.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; choose from {EXPORTERS}")
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an integer, got {opset!r}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(
            f"opset must be between {MIN_OPSET} (the first with the operators attention needs) and {MAX_OPSET}, "
            f"got {opset}"
        )
    names = graph_outputs(model)
    output = Path(output)
    if output.is_dir():
        raise ValueError(f"--output must be a file path, but {os.fspath(output)!r} is a folder")
    if output.exists() and not output.is_file():
        raise ValueError(f"--output {os.fspath(output)!r} exists and is not a regular file (a FIFO or device?)")
    if check_sizes is DEFAULT_CHECK_SIZES and names == ("predicted_depth",):  # the default, not sizes one chose
        check_sizes = DEPTH_CHECK_SIZES
    sizes = None if check_sizes is None else _check_sizes(check_sizes)
    # A graph of NaN weights exports, but its outputs are NaN and no check can tell it from a broken export.
    from .weights.loading import non_finite

    bad = non_finite(model.state_dict())
    if bad:
        raise ValueError(f"the model holds NaN or infinite weights in {bad}: an exported graph would output NaN. "
                         f"The checkpoint is damaged, or was saved after training diverged")
    config = getattr(model, "config", None)
    channels = getattr(config, "num_channels", 3)
    # The exported graph is float32 on the CPU whatever the model's dtype and device (the example and the check inputs
    # are made there); the checks compare with the model as it is (its
    # AdaptiveAvgPool2d included), in float32, computed before the pools are replaced.
    exportable = copy.deepcopy(model).cpu().float().eval()
    references = _reference_outputs(exportable, names, sizes, channels, seed=0) if sizes else []
    replaced = _replace_adaptive_pools(exportable)
    wrapper = _Outputs(exportable, names).eval()
    height, width = getattr(config, "image_size", (224, 224))
    # A batch of two: an example batch of one lets the dynamo exporter specialise the batch dimension to 1.
    example = torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            shapes = [tuple(t.shape) for t in wrapper(example)]
    except (ValueError, RuntimeError) as err:
        raise ValueError(
            f"the model does not run on its own example input, 2x{channels}x{height}x{width} (config.image_size): "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    tmp = _temporary_sibling(output)
    created = _missing_folders(output.parent)
    attempts: list[str] = []
    written = False
    try:
        try:  # a folder that takes no file is found now, not after each exporter has traced the model
            output.parent.mkdir(parents=True, exist_ok=True)  # under a file: FileExistsError, NotADirectoryError
            with open(tmp, "wb"):
                pass
            if len(output.name.encode()) > 255:  # the temporary name is short enough; the rename would fail
                raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        except OSError as err:
            if err.errno == errno.EEXIST:  # mkdir's word for a file where a folder of the path should be
                err = OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            raise WriteError(output, err) from None
        for name in order:
            start = time.perf_counter()
            try:
                _export_once(wrapper, example, tmp, name, opset, names, shapes)
            except Exception as err:  # exporters raise many kinds of errors
                raise_interrupt_behind(err)  # torch's exporters import onnx: a Ctrl-C there is no exporter's failure
                failure = f"{name} exporter failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
                attempts.append(failure)
                logger.warning("%s", failure)
                continue
            seconds = time.perf_counter() - start
            declared = _file_opset(tmp)
            if declared is not None and declared != opset:
                failure = f"{name} exporter wrote opset {declared}, not the {opset} asked for"
                if name == "dynamo" and declared > opset:  # torch's dynamo exporter converts down from 18, or not
                    failure += (f" (it writes opset {declared} where torch cannot convert the graph down to {opset}: "
                                f"use the torchscript exporter or opset {declared} or later)")
                attempts.append(failure)
                logger.warning("%s", failure)
                continue
            result = ExportResult(None, name, opset, names[0], replaced, seconds, attempts=attempts,
                                  output_names=names)
            if sizes:
                result.checks = _compare(tmp, names, references, rtol, atol)
            if result.ok:
                os.replace(tmp, output)
                written = True
                result.path = output
                attempts.append(f"{name}: ok")
                return result
            failure = f"{name} export does not match PyTorch: " + "; ".join(
                _describe_check(c) for c in result.checks if not c.ok)
            attempts.append(failure)
            logger.warning("%s", failure)
        kept = f" ({os.fspath(output)!r} was left as it was)" if output.exists() else ""
        raise ExportError(f"ONNX export failed, nothing was written{kept}: " + " | ".join(attempts))
    finally:
        if output.parent.is_dir():  # else nothing was written (unlinking under a file raised NotADirectoryError)
            tmp.unlink(missing_ok=True)
            for extra in output.parent.glob(f"{glob.escape(tmp.name)}*"):  # its own only: another export's is in use
                extra.unlink(missing_ok=True)
        if not written:  # folders made for this output only; rmdir keeps any that something else filled meanwhile
            for folder in reversed(created):
                try:
                    folder.rmdir()
                except OSError:
                    break


def _describe_check(check: ExportCheck) -> str:
    size = "x".join(str(s) for s in check.shape)
    if check.error:
        return f"{size}: {check.error}"
    if len(check.outputs) > 1:
        return f"{size}: " + ", ".join(f"{name} max abs diff {d:.3g} > tolerance {t:.3g}"
                                        for name, (d, t) in check.outputs.items() if not d <= t)
    return f"{size}: max abs diff {check.max_abs_diff:.3g} > tolerance {check.tolerance:.3g}"


def _single_file_losses(config, preprocessor: Path | None, layout: str, origin=None) -> list[str]:
    """What of a checkpoint a single weights file in ``layout`` cannot hold: what reading the file back (224 px,
    generic labels, the layout's own evaluation protocol) would get otherwise. ``origin``: the processor of the
    source's origin protocol, where it has no ``preprocessor_config.json``."""
    from .data.processing import PvtV2ImageProcessor
    from .models.labels import has_generic_labels, imagenet_id2label

    lost = []
    # ImageNet's names come back by themselves: loading attaches them to any 1000-class file without labels.
    imagenet = len(config.id2label) == 1000 and dict(config.id2label) == imagenet_id2label()
    if not has_generic_labels(config.id2label) and not imagenet:
        lost.append(f"the class names ({len(config.id2label)} labels)")
    if tuple(config.image_size) != (224, 224):
        lost.append(f"the image size ({config.image_size[0]}x{config.image_size[1]})")
    if preprocessor is not None:
        # What predict uses for the file: transformers' resize for a transformers file, else the layout's protocol.
        if layout == "transformers":
            read_back = PvtV2ImageProcessor(size={"height": 224, "width": 224})
        else:
            read_back = PvtV2ImageProcessor.from_protocol(layout, 224)
        # An unreadable file (not JSON, wrong types) is not written to the weights file either: it is named, and
        # does not stop a conversion that never needed it.
        try:
            differs = PvtV2ImageProcessor.from_pretrained(preprocessor) != read_back
        except (OSError, ValueError, TypeError) as error:
            lost.append(f"the preprocessing (unreadable: {error})")
        else:
            if differs:
                lost.append(f"the preprocessing ({preprocessor})")
    elif origin is not None:
        read_back = (PvtV2ImageProcessor(size={"height": 224, "width": 224}) if layout == "transformers"
                     else PvtV2ImageProcessor.from_protocol(layout, 224))
        if origin != read_back:
            lost.append(f"the preprocessing (the {origin.protocol} protocol its file is predicted with)")
    return lost


def load_checkpoint_model(source: str | os.PathLike) -> nn.Module:
    """The model a checkpoint holds, with nothing invented: a ``PvtV2ForImageClassification`` when it has a
    classifier head, else the encoder alone (``PvtV2Model``).

    A classifier that ``from_pretrained`` would have to replace by a random one (weights sized for another number of
    classes than the checkpoint's ``config.json`` says) is refused with ``ValueError``: exporting or converting it
    would hand noise on under real-looking labels.
    """
    return _classifier_or_encoder(source, _canonical_keys(source))


def _canonical_keys(source: str | os.PathLike) -> set[str]:
    """The keys of the checkpoint ``source`` names, in the canonical (transformers) layout."""
    return set(_canonical_state(source))


def _canonical_state(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint ``source`` names, in the canonical (transformers) layout."""
    from .weights.files import read_state_dict
    from .weights.layouts import to_canonical
    from .weights.loading import checkpoint_layout, locate_checkpoint

    config, weights = locate_checkpoint(source, None, None)
    state = read_state_dict(weights)
    return to_canonical(state, checkpoint_layout(state, weights, config))


def _lossless_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating-point dtype that holds every float tensor of ``state`` exactly: the stored one where they
    share one of float16, bfloat16, float64; else float64 where one is, else float32 (which holds float16, bfloat16
    and the float8 types exactly; torch cannot promote float8, and a model cannot run in it)."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1 and dtypes <= {torch.float16, torch.bfloat16, torch.float64}:
        return dtypes.pop()
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _classifier_or_encoder(source: str | os.PathLike, keys: set[str], dtype: torch.dtype | None = None) -> nn.Module:
    """:func:`load_checkpoint_model` for a checkpoint whose canonical ``keys`` are already read (in ``dtype``:
    float32 unless given)."""
    from .models.modeling import PvtV2ForImageClassification, PvtV2Model

    # Half a classifier (its bias without its weight) is a damaged head, refused below, not an encoder to keep alone
    cls = PvtV2ForImageClassification if keys & {"classifier.weight", "classifier.bias"} else PvtV2Model
    model = cls.from_pretrained(source, dtype=dtype)
    new = getattr(model, "newly_initialized_keys", ())
    if new:
        raise ValueError(
            f"the classifier in {os.fspath(source)!r} does not fit its config (num_labels={model.config.num_labels}): "
            f"{', '.join(new)} would be initialised at random. Fix num_labels / id2label in its config.json, or "
            f"fine-tune: pvtv2 train --model {os.fspath(source)} --data DIR --output RUN"
        )
    return model


def load_export_model(source: str | os.PathLike) -> nn.Module:
    """The model ``pvtv2 export`` exports from a checkpoint: a segmentation checkpoint (with a trained decode head)
    as ``PvtV2ForSemanticSegmentation``, a depth checkpoint (GLPN decoder and head) as ``PvtV2ForDepthEstimation``,
    anything else as :func:`load_checkpoint_model` reads it (a classifier, or the encoder alone). A detection
    checkpoint is refused with ``TypeError`` (see :func:`graph_outputs`), a head that would be random with
    ``ValueError``: exporting the encoder of a dense-prediction checkpoint under its name would drop the head the
    user trained without a word."""
    keys = _canonical_keys(source)  # read once: the choice of model and, for a classifier or encoder, its head
    if _dense_task(keys) == "detection":
        raise TypeError(
            f"{os.fspath(source)!r} is a detection checkpoint, which is not exported to ONNX: its output is a list of "
            f"boxes per image after non-maximum suppression. Run it with pvtv2 detect"
        )
    return _task_model(source, keys)


def load_task_model(source: str | os.PathLike) -> nn.Module:
    """The whole model a checkpoint holds, as ``pvtv2 convert`` writes it to a folder: a detector, a segmentation
    or depth model with its trained head, else what :func:`load_checkpoint_model` reads (a classifier, or the encoder
    alone). A head that would be partly random is refused with ``ValueError``."""
    return _task_model(source, _canonical_keys(source))


def checkpoint_task(source: str | os.PathLike) -> str | None:
    """``detection``, ``segmentation`` or ``depth`` for a checkpoint holding such a head, None for a classifier or an
    encoder (read from its key names, without building a model)."""
    return _dense_task(_canonical_keys(source))


def _dense_task(keys: set[str]) -> str | None:
    """``detection``, ``segmentation`` or ``depth`` for a checkpoint whose canonical keys hold such a head."""
    if any(k.startswith("detector.") for k in keys):
        return "detection"
    if any(k.startswith("decode_head.") for k in keys):
        return "segmentation"
    if any(k.startswith(("decoder.", "head.")) for k in keys):
        return "depth"
    return None


def _task_model(source: str | os.PathLike, keys: set[str], dtype: torch.dtype | None = None) -> nn.Module:
    task = _dense_task(keys)
    if task is None:
        return _classifier_or_encoder(source, keys, dtype)
    if task == "detection":
        from .models.detection import PvtV2ForObjectDetection as cls
    elif task == "segmentation":
        from .models.segmentation import PvtV2ForSemanticSegmentation as cls
    else:
        from .models.depth import PvtV2ForDepthEstimation as cls
    model = cls.from_pretrained(source, dtype=dtype)
    new = getattr(model, "newly_initialized_keys", ())
    if new:
        raise ValueError(
            f"the {task} head in {os.fspath(source)!r} is incomplete: "
            f"{', '.join(list(new)[:5])}{' ...' if len(new) > 5 else ''} would be initialised at random"
        )
    return model.eval()


# What `convert` writes into a folder (and what a save_pretrained folder it may replace holds): anything else in an
# existing output folder is someone's data, which swapping in the new folder would delete.
_FOLDER_FILES = frozenset({"config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                           "pytorch_model.bin.index.json", "preprocessor_config.json"})
# The shards of a sharded save_pretrained folder (pvtv2's and transformers' names for them).
_SHARD_NAME = re.compile(r"(model-\d{5}-of-\d{5}\.safetensors|pytorch_model-\d{5}-of-\d{5}\.bin)")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def _is_weights_file(path: Path) -> bool:
    """The file starts as a safetensors file or a PyTorch checkpoint (a zip archive with a ``data.pkl``, or a
    legacy pickle) does: only the first bytes and, for a zip, its directory are read."""
    import zipfile

    with path.open("rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return True  # safetensors: an 8-byte little-endian header length, then the JSON header
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith("data.pkl") for name in archive.namelist())
        except (zipfile.BadZipFile, OSError):
            return False
    return head.startswith(b"\x80")  # a pickle (protocol 2 or later): torch.save's legacy format


def _check_convert_output(out: Path, layout: str | None) -> None:
    """Refuse an output that convert must not replace: anything but a weights file or a checkpoint folder."""
    text = os.fspath(out)
    if layout is None:
        if not out.exists():
            return
        if not out.is_dir():
            raise FileExistsError(f"{text!r} is a file; a save_pretrained folder needs a folder path")
        foreign = sorted(p.name for p in out.iterdir()
                         if p.name not in _FOLDER_FILES and not _SHARD_NAME.fullmatch(p.name))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise FileExistsError(
                f"{text!r} already holds files that are not a checkpoint's ({shown}): refusing to replace the folder; "
                f"choose a new or empty folder"
            )
        return
    if out.suffix.lower() not in _WEIGHT_SUFFIXES:
        raise ValueError(
            f"--layout {layout} writes one weights file, named *.safetensors (safetensors) or *.pth, *.pt, *.bin "
            f"(PyTorch), got {text!r}"
        )
    if out.is_dir():
        raise IsADirectoryError(f"--layout {layout} writes one file, but {text!r} is a folder")
    if out.exists() and not _is_weights_file(out):
        raise FileExistsError(
            f"{text!r} exists and is not a weights file (safetensors or PyTorch checkpoint): refusing to overwrite "
            f"it; choose another path"
        )


def _target_error(target: Path, err: OSError) -> WriteError:
    """``err`` as a WriteError naming ``target`` (not an inner temporary file) and the system's reason."""
    while isinstance(err, WriteError) and isinstance(err.__cause__, OSError):
        err = err.__cause__
    return WriteError(target, err)


def convert_checkpoint(source: str | os.PathLike, output: str | os.PathLike, layout: str | None = None) -> dict[str, Any]:
    """Convert any supported checkpoint (file in any layout, folder, hub id) to a ``save_pretrained`` folder
    (``layout=None``), or to a single weights file in ``layout`` (``transformers``, ``timm`` or ``original``).

    A folder gets the whole model (:func:`load_task_model`: a detector, a segmentation or depth model with its head);
    a single file the encoder and classifier (a dense-prediction head is named among what the file cannot hold). A
    checkpoint without a classifier head becomes a ``PvtV2Model`` (no random head is invented); one whose head does
    not fit its config is refused (:func:`load_checkpoint_model`). The source's ``preprocessor_config.json``
    (its folder's, or that of the ``save_pretrained`` folder a single weights file lies in, as ``pvtv2 predict``
    reads it) is copied along. A single file holds weights only: its class names, image size and preprocessing are
    lost, and a warning names them. The weights keep the precision they are stored in (float16, bfloat16, float64; a
    file mixing float dtypes the one that holds them all). An existing ``output`` is replaced only when it is a weights file (``layout``)
    or a folder holding nothing but a checkpoint's files; anything else raises ``FileExistsError`` before any work.
    The output is written atomically: a failed write (a full disk) raises :class:`pvtv2.fileio.WriteError` naming ``output`` and leaves no
    temporary file, and the previous output as it was.
    """
    from .data.processing import PREPROCESSOR_CONFIG_NAME, origin_processor, timm_repository_processor
    from .weights.files import save_state_dict
    from .weights.hub import companion_file
    from .weights.layouts import LAYOUTS, convert_state_dict
    from .weights.loading import layout_differences, locate_checkpoint

    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    out = Path(output)
    _check_convert_output(out, layout)
    canonical = _canonical_state(source)
    keys = set(canonical)
    # Converted in the stored precision: read as float32, a float64 checkpoint came out rounded and a float16 one
    # twice its size (and loaded as float32 by from_pretrained(dtype="auto")).
    dtype = _lossless_dtype(canonical)
    del canonical
    # A folder holds the whole model; a single file of one of the classification layouts the encoder and classifier.
    model = _task_model(source, keys, dtype) if layout is None else _classifier_or_encoder(source, keys, dtype)
    info: dict[str, Any] = {"source": os.fspath(source), "model": type(model).__name__,
                            "parameters": model.num_parameters()}
    # The preprocessing the source's predictions use (pvtv2 predict reads it the same way): its folder's, or its
    # save_pretrained folder's for a single weights file such as a run's best/model.safetensors.
    pre = companion_file(source, PREPROCESSOR_CONFIG_NAME)
    # Without one, a timm or authors' file is predicted with its origin's protocol (pvtv2.inference.load_processor).
    layout_read = getattr(model, "checkpoint_layout", None)
    origin = None
    if pre is None:  # a timm repository's pretrained_cfg, else the origin's protocol
        origin = timm_repository_processor(source)
        if origin is None:
            origin = origin_processor(layout_read, *model.config.image_size)
    if layout is None:
        # Read before writing: the output may be the source folder itself. A folder converted from a timm or
        # authors' file predicted with a plain resize, unlike its source, for want of this file.
        pre_text = Path(pre).read_text(encoding="utf-8") if pre is not None else None
        if origin is not None:
            pre_text = origin.to_json_string()

        def write(folder: Path) -> None:
            model.save_pretrained(folder)
            if pre_text is not None:
                atomic_write_text(folder / PREPROCESSOR_CONFIG_NAME, pre_text)

        try:
            write_folder_atomically(out, write)
        except OSError as err:
            raise _target_error(out, err) from err
        info.update(output=os.fspath(out), layout="transformers (save_pretrained folder)")
        return info
    for note in layout_differences(model.config, layout):
        logger.warning("%s", note)
    lost = _single_file_losses(model.config, pre, layout, origin)
    task = _dense_task(keys)
    article = "an" if layout == "original" else "a"
    if task is not None:
        lost.insert(0, f"the {task} head ({article} {layout} file holds the encoder and a classifier)")
    _, weights = locate_checkpoint(source, None, None)
    if lost and out.exists() and os.path.samefile(out, weights):
        # The warning below sends predictions back to the source: written over it, what it names would be gone.
        raise FileExistsError(
            f"refusing to replace {os.fspath(out)!r}, the source's own weights, with {article} {layout} file that "
            f"cannot hold {', '.join(lost)}; choose another output path"
        )
    if lost:
        # A single file is weights only: predictions from it use 224 px, that layout's protocol and generic
        # labels, which for a model trained otherwise look like answers but are not its answers.
        logger.warning(
            "%s %s file holds weights only: %s of %s are not in it; predict and evaluate with the source (or a "
            "save_pretrained folder converted from it) to keep them", article, layout, ", ".join(lost),
            os.fspath(source),
        )
    state = convert_state_dict(model.state_dict(), layout)
    try:
        save_state_dict(state, out)
    except OSError as err:
        raise _target_error(out, err) from err
    info.update(output=os.fspath(out), layout=layout, tensors=len(state))
    return info
