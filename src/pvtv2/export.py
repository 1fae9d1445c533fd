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
import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .fileio import WriteError, atomic_write_text, write_folder_atomically

__all__ = [
    "DEFAULT_CHECK_SIZES",
    "EXPORTERS",
    "ExportableAdaptiveAvgPool2d",
    "ExportCheck",
    "ExportResult",
    "ExportError",
    "make_exportable",
    "export_onnx",
    "check_onnx",
    "convert_checkpoint",
    "load_checkpoint_model",
]

logger = logging.getLogger(__name__)

# (batch, height, width): the square training size, a non-square batch of two, and odd sizes divisible by nothing.
DEFAULT_CHECK_SIZES: tuple[tuple[int, int, int], ...] = ((1, 224, 224), (2, 160, 192), (1, 97, 131))
EXPORTERS = ("auto", "torchscript", "dynamo")


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


def make_exportable(model: nn.Module) -> tuple[nn.Module, int]:
    """A deep copy of ``model`` in eval mode with every ``AdaptiveAvgPool2d`` replaced (and how many were)."""
    model = copy.deepcopy(model).eval()
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.AdaptiveAvgPool2d):
                size = child.output_size
                if isinstance(size, (tuple, list)) and None in size:
                    raise ExportError(f"cannot export AdaptiveAvgPool2d with output size {size}")
                setattr(parent, name, ExportableAdaptiveAvgPool2d(size))
                replaced += 1
    return model, replaced


class _Logits(nn.Module):
    """The classifier as a function from pixel values to logits (or the encoder to its last feature map)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values, return_dict=True)
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@dataclass
class ExportCheck:
    """One onnxruntime-versus-PyTorch comparison."""

    shape: tuple[int, int, int, int]
    max_abs_diff: float | None
    tolerance: float | None
    ok: bool
    error: str | None = None


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

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": os.fspath(self.path) if self.path else None,
            "exporter": self.exporter,
            "opset": self.opset,
            "output": self.output_name,
            "adaptive_pools_replaced": self.pools_replaced,
            "export_seconds": round(self.seconds, 2),
            "checks": [
                {"shape": list(c.shape), "max_abs_diff": c.max_abs_diff, "tolerance": c.tolerance, "ok": c.ok,
                 **({"error": c.error} if c.error else {})}
                for c in self.checks
            ],
            "attempts": self.attempts,
        }


def _export_once(wrapper: nn.Module, example: torch.Tensor, path: Path, exporter: str, opset: int, output_name: str) -> None:
    # The exporters are chatty: deprecation and tracer warnings, and one INFO line per graph rewrite.
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(
                wrapper, (example,), os.fspath(path), dynamo=False, opset_version=opset,
                input_names=["pixel_values"], output_names=[output_name],
                dynamic_axes={"pixel_values": {0: "batch", 2: "height", 3: "width"}, output_name: {0: "batch"}},
            )
        else:
            batch = torch.export.Dim("batch", min=1, max=4096)
            height = torch.export.Dim("height", min=1, max=16384)
            width = torch.export.Dim("width", min=1, max=16384)
            torch.onnx.export(
                wrapper, (example,), os.fspath(path), dynamo=True, opset_version=opset,
                input_names=["pixel_values"], output_names=[output_name],
                dynamic_shapes={"pixel_values": {0: batch, 2: height, 3: width}}, external_data=False,
            )


def check_onnx(
    path: str | os.PathLike,
    model: nn.Module,
    sizes: Sequence[tuple[int, int, int]] = DEFAULT_CHECK_SIZES,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    seed: int = 0,
) -> list[ExportCheck]:
    """Run the ONNX file in onnxruntime on random inputs of each ``(batch, height, width)`` and compare with ``model``.

    A size passes when ``max |onnx - torch| <= atol + rtol * max |torch|``.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError(
            "checking the export needs onnxruntime: pip install 'pvtv2[onnx]' (or skip the check with --no-check)"
        ) from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    wrapper = _Logits(model).eval()
    gen = torch.Generator().manual_seed(seed)
    channels = getattr(getattr(model, "config", None), "num_channels", 3)
    checks = []
    for batch, height, width in sizes:
        shape = (batch, channels, height, width)
        x = torch.randn(shape, generator=gen)
        with torch.no_grad():
            expected = wrapper(x).float()
        try:
            (got,) = session.run(None, {input_name: x.numpy()})[:1]
        except Exception as err:  # onnxruntime raises its own exception types
            checks.append(ExportCheck(shape, None, None, False, str(err).splitlines()[0][:300]))
            continue
        got_t = torch.from_numpy(got)
        if got_t.shape != expected.shape:
            checks.append(ExportCheck(shape, None, None, False, f"output shape {tuple(got_t.shape)} != {tuple(expected.shape)}"))
            continue
        diff = float((got_t - expected).abs().max())
        tol = atol + rtol * float(expected.abs().max())
        checks.append(ExportCheck(shape, diff, tol, diff <= tol))
    return checks


def export_onnx(
    model: nn.Module,
    output: str | os.PathLike,
    *,
    opset: int = 18,
    exporter: str = "auto",
    check_sizes: Sequence[tuple[int, int, int]] | None = DEFAULT_CHECK_SIZES,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> ExportResult:
    """Export a PVTv2 classifier (logits) or encoder (last feature map) to ONNX with dynamic batch, height and width.

    ``exporter``: ``torchscript`` (``torch.onnx.export(dynamo=False)``, fast), ``dynamo`` (``torch.export`` based,
    slower), or ``auto``: TorchScript first, then dynamo if that fails to export or to match. The file is written
    next to ``output`` under a temporary name, checked with onnxruntime at ``check_sizes`` (``None``: not checked),
    and moved into place only when every size matches; otherwise :class:`ExportError` lists the differences.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; choose from {EXPORTERS}")
    output = Path(output)
    if output.is_dir():
        raise ValueError(f"--output must be a file path, but {os.fspath(output)!r} is a folder")
    # A graph of NaN weights exports, but its outputs are NaN and no check can tell it from a broken export.
    from .weights.loading import non_finite

    bad = non_finite(model.state_dict())
    if bad:
        raise ValueError(f"the model holds NaN or infinite weights in {bad}: an exported graph would output NaN. "
                         f"The checkpoint is damaged, or was saved after training diverged")
    output.parent.mkdir(parents=True, exist_ok=True)
    exportable, replaced = make_exportable(model)
    exportable = exportable.float()
    wrapper = _Logits(exportable).eval()
    output_name = "logits" if hasattr(exportable, "classifier") else "last_hidden_state"
    config = getattr(model, "config", None)
    height, width = getattr(config, "image_size", (224, 224))
    # A batch of two: an example batch of one lets the dynamo exporter specialise the batch dimension to 1.
    example = torch.randn(2, getattr(config, "num_channels", 3), height, width, generator=torch.Generator().manual_seed(0))
    order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    tmp = output.with_name(f".{output.name}.tmp")
    attempts: list[str] = []
    last_failure = ""
    try:
        for name in order:
            start = time.perf_counter()
            try:
                _export_once(wrapper, example, tmp, name, opset, output_name)
            except Exception as err:  # exporters raise many kinds of errors
                last_failure = f"{name} exporter failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
                attempts.append(last_failure)
                logger.warning("%s", last_failure)
                continue
            seconds = time.perf_counter() - start
            result = ExportResult(None, name, opset, output_name, replaced, seconds, attempts=attempts)
            if check_sizes:
                result.checks = check_onnx(tmp, exportable, check_sizes, rtol, atol)
            if result.ok:
                os.replace(tmp, output)
                result.path = output
                attempts.append(f"{name}: ok")
                return result
            last_failure = f"{name} export does not match PyTorch: " + "; ".join(_describe_check(c) for c in result.checks if not c.ok)
            attempts.append(last_failure)
            logger.warning("%s", last_failure)
        raise ExportError("ONNX export failed; nothing was written.\n  " + "\n  ".join(attempts))
    finally:
        tmp.unlink(missing_ok=True)
        for extra in output.parent.glob(f".{output.name}.tmp*"):
            extra.unlink(missing_ok=True)


def _describe_check(check: ExportCheck) -> str:
    size = "x".join(str(s) for s in check.shape)
    if check.error:
        return f"{size}: {check.error}"
    return f"{size}: max abs diff {check.max_abs_diff:.3g} > tolerance {check.tolerance:.3g}"


def load_checkpoint_model(source: str | os.PathLike) -> nn.Module:
    """The model a checkpoint holds, with nothing invented: a ``PvtV2ForImageClassification`` when it has a
    classifier head, else the encoder alone (``PvtV2Model``).

    A classifier that ``from_pretrained`` would have to replace by a random one (weights sized for another number of
    classes than the checkpoint's ``config.json`` says) is refused with ``ValueError``: exporting or converting it
    would hand noise on under real-looking labels.
    """
    from .models.modeling import PvtV2ForImageClassification, PvtV2Model
    from .weights.files import read_state_dict
    from .weights.layouts import to_canonical
    from .weights.loading import locate_checkpoint

    _, weights = locate_checkpoint(source, None, None)
    has_head = "classifier.weight" in to_canonical(read_state_dict(weights))
    model = (PvtV2ForImageClassification if has_head else PvtV2Model).from_pretrained(source)
    new = getattr(model, "newly_initialized_keys", ())
    if new:
        raise ValueError(
            f"the classifier in {os.fspath(source)!r} does not fit its config (num_labels={model.config.num_labels}): "
            f"{', '.join(new)} would be initialised at random. Fix num_labels / id2label in its config.json, or "
            f"fine-tune: pvtv2 train --model {os.fspath(source)} --data DIR --output RUN"
        )
    return model


# What `convert` writes into a folder (and what a save_pretrained folder it may replace holds): anything else in an
# existing output folder is someone's data, which swapping in the new folder would delete.
_FOLDER_FILES = frozenset({"config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                           "preprocessor_config.json"})
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
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _FOLDER_FILES)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise FileExistsError(
                f"{text!r} already holds files that are not a checkpoint's ({shown}): refusing to replace the folder; "
                f"choose a new or empty folder"
            )
        return
    if out.suffix.lower() not in _WEIGHT_SUFFIXES:
        raise ValueError(
            f"--layout {layout} writes one weights file, named *.safetensors (safetensors) or *.pth (PyTorch), got "
            f"{text!r}"
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

    A checkpoint without a classifier head becomes a ``PvtV2Model`` (no random head is invented); one whose head
    does not fit its config is refused (:func:`load_checkpoint_model`). A folder's ``preprocessor_config.json`` is
    copied along. An existing ``output`` is replaced only when it is a weights file (``layout``) or a folder holding
    nothing but a checkpoint's files; anything else raises ``FileExistsError`` before any work. The output is written
    atomically: a failed write (a full disk) raises :class:`pvtv2.fileio.WriteError` naming ``output`` and leaves no
    temporary file, and the previous output as it was.
    """
    from .data.processing import PREPROCESSOR_CONFIG_NAME
    from .weights.files import save_state_dict
    from .weights.hub import resolve_file
    from .weights.layouts import LAYOUTS, convert_state_dict
    from .weights.loading import layout_differences

    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    out = Path(output)
    _check_convert_output(out, layout)
    model = load_checkpoint_model(source)
    info: dict[str, Any] = {"source": os.fspath(source), "model": type(model).__name__,
                            "parameters": model.num_parameters()}
    if layout is None:
        text = os.fspath(source)
        pre = resolve_file(text, PREPROCESSOR_CONFIG_NAME, required=False) if os.path.isdir(text) else None
        # Read before writing: the output may be the source folder itself.
        pre_text = Path(pre).read_text(encoding="utf-8") if pre is not None else None

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
    state = convert_state_dict(model.state_dict(), layout)
    try:
        save_state_dict(state, out)
    except OSError as err:
        raise _target_error(out, err) from err
    info.update(output=os.fspath(out), layout=layout, tensors=len(state))
    return info
