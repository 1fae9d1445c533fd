"""Image loading and preprocessing for PVTv2 classifiers.

:class:`PvtV2ImageProcessor` reproduces, to float32 rounding, the slow PIL-based image processor of transformers
(``PvtImageProcessorPil`` in transformers 5, ``PvtImageProcessor`` in 4.x) called with ``do_convert_rgb=True``.
``AutoImageProcessor`` in transformers 5 picks the torchvision ("fast") ``PvtImageProcessor`` instead, whose
tensor resize rounds some pixels one uint8 step away from PIL's (up to 0.0175 after normalisation); we follow the
PIL one. Per image:

1. Inputs become RGB, channels first. A path is opened with PIL, EXIF-rotated and ``convert("RGB")``-ed, as
   transformers' ``load_image`` does: an alpha band is dropped, but a palette or colour-key transparency is made
   white (transformers keeps it in ``info`` until its processor's ``convert_to_rgb`` does it; :func:`load_image`
   does it at once, so the training loaders read the same pixels). An image already opened by the caller (a PIL image) is not
   EXIF-rotated, as transformers' processors do not rotate one either: only a path is. An in-memory PIL image or
   array with an alpha channel is composited onto white, one with one channel is repeated to three, as
   transformers' ``convert_to_rgb`` does.
   Here we differ from transformers on purpose: a 16-bit greyscale image (PIL modes ``I;16``, ``I;16B``,
   ``I;16L``), file or in-memory, is first scaled to 8 bits, ``round(v / 257)``, where ``convert("RGB")`` would
   clip every value above 255 to white. A 32-bit ``I`` image whose values all lie in [0, 255] is taken as it is,
   one whose values fit 16 bits is scaled the same way, and anything else (negative or above 65535) is an error.
   Its grey colour key (a 16-bit PNG's tRNS) is painted white, as an 8-bit one is.
2. Resize with PIL (``Image.resize``, default bilinear, no ``reducing_gap``) on a uint8 image: to ``size``'s height
   and width, or, with ``size={"shortest_edge": s}``, the shorter side to ``s`` and the longer one to
   ``int(s * long / short)`` (torchvision's and transformers' rule). Non-uint8 arrays get there as transformers takes
   them: values that are all whole numbers in [0, 255] are cast to uint8; otherwise values in [0, 1] are multiplied by
   255 (float64, then float32) and *truncated* to uint8, and the resized result is divided back into [0, 1]; anything
   else is an error.
   With ``do_center_crop``, the centred ``crop_size`` window of the resized image is kept; its top-left corner is
   ``int(round((H - h) / 2))``, ``int(round((W - w) / 2))`` as torchvision's ``CenterCrop`` puts it (Python's round:
   halves to even), so the pixels are those of timm's eval transform. transformers' ``center_crop`` floors instead;
   where the two differ (an odd margin whose half rounds up) transformers' crop sits one pixel to the top or left.
3. Rescale: ``float32(float64(x) * rescale_factor)``. Like transformers, floats are rescaled too: pass
   ``do_rescale=False`` for images already in [0, 1].
4. Normalise in float32: ``(x - mean) / std`` per channel.

Note that transformers 5 changed the class default ``resample`` of ``PvtImageProcessor`` to bicubic; the published
``OpenGVLab/pvt_v2_*`` configs (and transformers 4.x) say bilinear (``"resample": 2``), which is our default and is
always written to the saved config.

Evaluation protocols (:data:`PREPROCESS_PROTOCOLS`, :meth:`PvtV2ImageProcessor.from_protocol`): the published
checkpoints were scored with different preprocessing, and top-1 moves with it.

- ``transformers``: resize straight to 224x224, bilinear (the published ``preprocessor_config.json``).
- ``timm``: shorter side to ``floor(224 / 0.9) = 248``, bicubic, centre 224 crop (timm's ``pvt_v2_*`` pretrained
  configs: ``crop_pct=0.9``, ``interpolation="bicubic"``, the eval transform of ``timm.data.create_transform``).
- ``original``: shorter side to ``int(256 / 224 * 224) = 256``, bicubic, centre 224 crop: the authors'
  ``build_transform(is_train=False)`` (DeiT's), with which the paper's ImageNet table was measured. As there, an
  ``image_size`` of 32 or less neither resizes nor crops (images go in at their own size).

A timm hub repository (timm's own ``config.json``) records its eval preprocessing in ``pretrained_cfg``; without a
``preprocessor_config.json``, ``from_pretrained``, ``pvtv2 predict`` / ``eval`` and ``convert`` use that
(:func:`timm_processor`: ``input_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std``, centre or squash crop),
which for the published ``pvt_v2_*`` configs is the ``timm`` protocol at 224.

A centre-crop processor is written as transformers writes one (``"size": {"shortest_edge": 248}``,
``"do_center_crop": true``, ``"crop_size": {...}``) plus ``"crop_pct"``, which transformers keeps and ignores, so
transformers' ``PvtImageProcessor`` reads the file and crops (to the pixel offset noted above).
"""

from __future__ import annotations

import json
import logging
import math
import os
import reprlib
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from ..fileio import atomic_write_text, path_kind
from ..weights.hub import check_subfolder, companion_file, resolve_file, timm_architecture

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "PREPROCESSOR_CONFIG_NAME",
    "PREPROCESS_PROTOCOLS",
    "ImageInput",
    "ProcessorOutput",
    "PvtV2ImageProcessor",
    "TIMM_INTERPOLATIONS",
    "load_image",
    "origin_processor",
    "timm_processor",
    "timm_repository_processor",
    "to_8bit",
    "to_rgb",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"

# File extensions read as images wherever folders are searched (datasets, predict).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# The class name transformers writes, and reads back through AutoImageProcessor.
_TRANSFORMERS_TYPE = "PvtImageProcessor"

# The evaluation protocols by name: the settings each adds to the defaults (ImageNet statistics, rescale by 1/255).
# A protocol's image size is the crop (or the square) the model sees; ``crop_pct`` sets the resize before the crop.
PREPROCESS_PROTOCOLS: dict[str, dict[str, Any]] = {
    # transformers' published preprocessor_config.json: a straight resize, bilinear.
    "transformers": {"resample": int(PIL.Image.Resampling.BILINEAR)},
    # timm's pvt_v2_* pretrained configs (crop_pct 0.9, bicubic) through timm's eval transform.
    "timm": {"resample": int(PIL.Image.Resampling.BICUBIC), "crop_pct": 0.9},
    # The authors' classification/datasets.py build_transform(is_train=False): Resize(int(256 / 224 * size),
    # interpolation=3) and CenterCrop(size); floor(size / 0.875) is the same number for every size up to 10000.
    "original": {"resample": int(PIL.Image.Resampling.BICUBIC), "crop_pct": 0.875},
}

# The constructor's arguments, which a call may also take (for that call only).
_SETTINGS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "crop_pct", "do_rescale", "rescale_factor",
             "do_normalize", "image_mean", "image_std")

# What one image may be; `__call__` also takes a list of these or a (B, C, H, W) / (B, H, W, C) array.
ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | str | os.PathLike

_CHANNEL_COUNTS = (1, 3, 4)


def load_image(path: str | os.PathLike) -> PIL.Image.Image:
    """Read an image file as an upright RGB PIL image, as transformers' ``load_image`` does.

    The EXIF orientation is applied and an alpha band dropped; a palette or colour-key transparency is painted white,
    as :class:`PvtV2ImageProcessor` paints it (transformers' ``load_image`` keeps it in ``image.info`` for its
    processor's ``convert_to_rgb``): the same pixels, whether the image then goes to the processor or to a training
    transform, which reads the pixels alone (a transparent pixel kept its hidden colour in training and was white in
    evaluation).

    Raises ``FileNotFoundError`` when nothing is at ``path`` (a symlink loop or a dangling symlink is named as such)
    and ``ValueError`` naming the path and the reason when it is not a readable image: unknown format, corrupt or
    truncated data, a folder, or anything else that is not a regular file (a FIFO, a device, a socket: opening one
    could block forever or read without end).
    """
    text = os.fspath(path)
    kind = path_kind(text)
    if kind == "nothing":
        raise FileNotFoundError(f"image file not found: {text!r}")
    if kind in ("symlink loop", "dangling symlink"):
        raise FileNotFoundError(f"image file not found: {text!r} is a {kind}")
    if kind != "file":
        raise ValueError(f"cannot read image {text!r}: it is a {kind}, not an image file")
    if os.path.getsize(text) == 0:  # Pillow would say only that it "cannot identify" it
        raise ValueError(f"cannot read image {text!r}: the file is empty (0 bytes)")
    in_exif = False
    width = height = "?"
    try:
        with PIL.Image.open(text) as image:
            width, height = image.size
            image.load()  # decode now, so a truncated file fails here and the file can be closed
            in_exif = True
            upright = PIL.ImageOps.exif_transpose(image)
            in_exif = False
            rgb = to_8bit(upright).convert("RGB")
            return rgb if rgb.info.get("transparency") is None else to_rgb(rgb)
    # struct.error: PIL's TIFF reader unpacking a cut-short EXIF block (a PNG eXIf or WebP EXIF chunk under 8 bytes)
    # let through, where every other kind of corrupt file is a ValueError naming it; predict stopped there.
    # MemoryError: PIL's decoders' word for a row too wide for them (a corrupt BMP header's 100,000,000 x 1 pixels,
    # under the decompression-bomb limit); it ended `pvtv2 predict` as "not enough memory to build or run the model".
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, MemoryError,
            PIL.Image.DecompressionBombError) as error:
        reason = str(error) or type(error).__name__
        if isinstance(error, MemoryError):
            reason = f"PIL could not allocate the memory to decode its {width} x {height} pixels (MemoryError)"
        # PIL's own words ("not a TIFF file") do not say that the pixels are fine and the EXIF is not. Memory running
        # out while turning the image upright (a copy of it) is no corrupt EXIF.
        if in_exif and not isinstance(error, MemoryError):
            reason = f"its EXIF data is corrupt ({reason})"
        raise ValueError(f"cannot read image {text!r}: {reason}") from error


class ProcessorOutput(dict[str, Any]):
    """What :class:`PvtV2ImageProcessor` returns: a dict with attribute access (``out.pixel_values``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}; it has {sorted(self)}") from None

    @property
    def pixel_values(self) -> torch.Tensor | np.ndarray:
        """The preprocessed batch, (B, 3, H, W) float32 (with ``return_tensors=None``, a list of (3, H, W) arrays)."""
        return self["pixel_values"]

    def to(self, *args: Any, **kwargs: Any) -> ProcessorOutput:
        """Move (or cast) the tensors, as ``torch.Tensor.to``; arrays are left alone."""
        return ProcessorOutput(
            {key: _move(value, *args, **kwargs) for key, value in self.items()},
        )


def _move(value: Any, *args: Any, **kwargs: Any) -> Any:
    return value.to(*args, **kwargs) if isinstance(value, torch.Tensor) else value


class PvtV2ImageProcessor:
    """Resize, centre-crop (optionally), rescale and normalise images for a PVTv2 model (see the module docstring
    for the exact steps).

    Keyword arguments and the saved ``preprocessor_config.json`` use transformers' names, so
    ``transformers.AutoImageProcessor.from_pretrained`` reads what :meth:`save_pretrained` writes and vice versa.

    Args:
        do_resize: resize every image.
        size: ``{"height": h, "width": w}``, an int for a square, or an ``(h, w)`` pair: the size images are resized
            to. ``{"shortest_edge": s}`` resizes the shorter side to ``s`` keeping the aspect ratio (centre-crop mode
            only). With ``crop_pct``, ``size`` is the crop the model sees instead (see there).
        resample: PIL resampling filter (``PIL.Image.Resampling`` or its int, e.g. 2 = bilinear, 3 = bicubic).
        do_center_crop: keep the centred ``crop_size`` window of the resized image.
        crop_size: ``{"height": h, "width": w}`` (or an int, or a pair) of the centre crop.
        crop_pct: timm's way to say the same: the fraction of the resized image's shorter side the crop keeps. With
            ``crop_pct`` and no ``crop_size``, ``size`` (square) is the crop and the shorter side is resized to
            ``floor(size / crop_pct)``: ``crop_pct=0.9`` with ``size=224`` resizes to 248 and crops 224, as timm.
            In (0, 1].
        do_rescale: multiply pixel values by ``rescale_factor``.
        rescale_factor: 1/255 maps uint8 values to [0, 1].
        do_normalize: subtract ``image_mean`` and divide by ``image_std`` per channel.
        image_mean: a float or one per RGB channel; ImageNet's by default.
        image_std: a float or one per RGB channel; ImageNet's by default.
        do_convert_rgb: transformers' switch for making grey, palette and RGBA images RGB; always done here, so only
            True is accepted.

    16-bit greyscale images (PIL modes ``I;16``, ``I;16B``, ``I;16L``, files or PIL images) are scaled to 8 bits,
    ``round(v / 257)``, before anything else; transformers clips them to white instead. A 32-bit ``I`` image is
    taken as 8-bit when its values fit [0, 255], scaled as 16-bit when they fit [0, 65535], refused otherwise.
    """

    model_input_names = ("pixel_values",)

    def __init__(
        self,
        *,
        do_resize: bool = True,
        size: Mapping[str, int] | int | Sequence[int] | None = None,
        resample: PIL.Image.Resampling | int | str = PIL.Image.Resampling.BILINEAR,
        do_center_crop: bool | None = None,
        crop_size: Mapping[str, int] | int | Sequence[int] | None = None,
        crop_pct: float | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_convert_rgb: bool | None = None,
    ) -> None:
        if do_convert_rgb is not None and not _check_bool("do_convert_rgb", do_convert_rgb):
            raise ValueError(f"do_convert_rgb must be True (or left out): every image is made RGB, got {do_convert_rgb!r}")
        self.do_resize = _check_bool("do_resize", do_resize)
        self.resample = _check_resample(resample)
        self.crop_pct = None if crop_pct is None else _check_crop_pct(crop_pct)
        if do_center_crop is not None:
            _check_bool("do_center_crop", do_center_crop)
        if self.crop_pct is not None and do_center_crop is False:
            raise ValueError(f"crop_pct={crop_pct!r} sets a centre crop, but do_center_crop is False; drop one of them")
        self.do_center_crop = bool(do_center_crop) or self.crop_pct is not None
        size = {"height": 224, "width": 224} if size is None else size
        if self.crop_pct is not None and crop_size is None:
            # timm's form: `size` is the crop; the shorter side is resized to floor(size / crop_pct) first.
            crop = _check_size(size)
            if crop["height"] != crop["width"]:
                raise ValueError(
                    f"crop_pct needs a square size (timm resizes the shorter side to size / crop_pct), got {crop}; "
                    f"pass size={{'shortest_edge': s}} and crop_size for other shapes"
                )
            crop_size = crop
            size = {"shortest_edge": math.floor(crop["height"] / self.crop_pct)}
        self.size = _check_size(size, shortest_edge=True)
        self.crop_size = _check_size(crop_size, name="crop_size") if crop_size is not None else None
        self._check_crop_settings()
        self.do_rescale = _check_bool("do_rescale", do_rescale)
        self.rescale_factor = _check_number("rescale_factor", rescale_factor)
        self.do_normalize = _check_bool("do_normalize", do_normalize)
        self.image_mean = _check_channel_values("image_mean", IMAGENET_MEAN if image_mean is None else image_mean)
        self.image_std = _check_channel_values("image_std", IMAGENET_STD if image_std is None else image_std)
        if any(value == 0 for value in _per_channel(self.image_std)):
            raise ValueError(f"image_std must not contain 0 (it divides), got {self.image_std}")
        # Keys of a loaded config that this class does not use; written back unchanged by save_pretrained.
        self.extra: dict[str, Any] = {}

    def _check_crop_settings(self) -> None:
        """The resize and the crop must fit together: a crop never larger than what the resize gives."""
        shortest = self.size.get("shortest_edge")
        if not self.do_center_crop:
            if shortest is not None:
                raise ValueError(
                    f"size={self.size} (a shortest_edge resize) gives images of varying shape; it needs "
                    f"do_center_crop=True and a crop_size (or pass size as {{'height': h, 'width': w}})"
                )
            if self.crop_size is not None:
                logger.debug("crop_size %s is unused without do_center_crop", self.crop_size)
            return
        if self.crop_size is None:
            raise ValueError("do_center_crop=True needs a crop_size ({'height': h, 'width': w}) or a crop_pct")
        crop_h, crop_w = self.crop_size["height"], self.crop_size["width"]
        if shortest is not None and self.do_resize and shortest < max(crop_h, crop_w):
            raise ValueError(
                f"crop_size {self.crop_size} does not fit in images resized to a shorter side of {shortest} "
                f"(size={self.size}); the shorter side must be at least the crop"
            )
        if shortest is None and self.do_resize and (self.size["height"] < crop_h or self.size["width"] < crop_w):
            raise ValueError(f"crop_size {self.crop_size} is larger than the resized images (size={self.size})")
        if self.crop_pct is not None and (
            shortest is None or crop_h != crop_w or shortest != math.floor(crop_h / self.crop_pct)
        ):
            raise ValueError(
                f"crop_pct={self.crop_pct} does not match size={self.size} and crop_size={self.crop_size}: a "
                f"crop of {crop_h} with crop_pct {self.crop_pct} resizes the shorter side to "
                f"{math.floor(crop_h / self.crop_pct)}"
            )

    @classmethod
    def from_protocol(cls, name: str, image_size: int = 224, **overrides: Any) -> PvtV2ImageProcessor:
        """The processor of a named evaluation protocol (:data:`PREPROCESS_PROTOCOLS`) for ``image_size``-pixel
        model inputs: ``"transformers"`` (resize to the square, bilinear), ``"timm"`` (crop_pct 0.9, bicubic) or
        ``"original"`` (crop_pct 0.875, bicubic). Keyword arguments override the protocol's settings (None keeps
        the protocol's, as in a call)."""
        if not isinstance(name, str) or name not in PREPROCESS_PROTOCOLS:
            raise ValueError(f"unknown preprocessing protocol {name!r}; choose one of {sorted(PREPROCESS_PROTOCOLS)}")
        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        settings: dict[str, Any] = dict(PREPROCESS_PROTOCOLS[name], size=int(image_size))
        if name == "original" and image_size <= 32:
            # The authors' build_transform resizes and crops only when input_size > 32: CIFAR-sized inputs go to the
            # model as they are (ToTensor and Normalize alone).
            # The size is kept only as a record (the saved config says 32; `protocol` finds the name by it).
            settings = {"resample": PREPROCESS_PROTOCOLS[name]["resample"], "do_resize": False, "size": int(image_size)}
        # None is "not given", as in a call: passed on, size=None was the class default's 224 whatever image_size.
        settings.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**settings)

    @property
    def protocol(self) -> str | None:
        """The name of the protocol these settings are (at their output size), or None for other settings."""
        output = self.output_size
        if output is None and not self.do_resize and "height" in self.size:
            # The authors' protocol at 32 pixels or fewer neither resizes nor crops: its size is only recorded.
            output = (self.size["height"], self.size["width"])
        if output is None or output[0] != output[1]:
            return None
        for name in PREPROCESS_PROTOCOLS:
            candidate = self.from_protocol(name, output[0])
            candidate.extra = self.extra
            if candidate.to_dict() == self.to_dict():
                return name
        return None

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every processed image, or None when it depends on the input (no resize, no crop)."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]  # type: ignore[index]
        if self.do_resize:
            return self.size["height"], self.size["width"]
        return None

    # ----------------------------------------------------------------------------------------- configuration

    def to_dict(self) -> dict[str, Any]:
        """The settings as transformers writes them for ``PvtImageProcessor``, plus any unknown loaded keys."""
        config = dict(self.extra)
        config.update(
            {
                "do_normalize": self.do_normalize,
                "do_rescale": self.do_rescale,
                "do_resize": self.do_resize,
                "image_mean": _json_channel_values(self.image_mean),
                "image_processor_type": _TRANSFORMERS_TYPE,
                "image_std": _json_channel_values(self.image_std),
                "resample": self.resample,
                "rescale_factor": self.rescale_factor,
                "size": dict(self.size),
            }
        )
        # transformers writes no crop keys for PvtImageProcessor; they appear only when a crop is on, so a plain
        # resize still writes the published file byte for byte.
        if self.do_center_crop:
            # A loaded file's crop_pct kept while its crop was off is not this crop's (a crop turned on per call or
            # in from_pretrained): written back, the file was refused on reading as not matching size.
            config.pop("crop_pct", None)
            config["do_center_crop"] = True
            config["crop_size"] = dict(self.crop_size)  # type: ignore[arg-type]
            if self.crop_pct is not None:
                config["crop_pct"] = self.crop_pct
        return config

    def to_json_string(self) -> str:
        """``to_dict`` as transformers formats it: sorted keys, two-space indent, final newline."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> PvtV2ImageProcessor:
        """Build from a ``preprocessor_config.json`` dict; unknown keys are kept in ``extra`` for the round trip."""
        if not isinstance(config, Mapping):
            raise TypeError(f"a preprocessor config must be a JSON object (dict), got {type(config).__name__}")
        known = {"do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize"}
        kwargs = {key: value for key, value in config.items() if key in known}
        if config.get("do_center_crop"):
            known |= {"do_center_crop", "crop_size", "crop_pct"}
            kwargs.update(do_center_crop=True, crop_size=config.get("crop_size"), crop_pct=config.get("crop_pct"))
            if kwargs["crop_size"] is None:
                raise ValueError("do_center_crop is true but the config has no crop_size")
        for key in ("image_mean", "image_std"):
            if config.get(key) is not None:
                kwargs[key] = config[key]
        processor = cls(**kwargs)
        extra = {
            key: value
            for key, value in config.items()
            if key not in known and key not in ("image_mean", "image_std", "image_processor_type")
        }
        kind = config.get("image_processor_type")
        if kind is not None and kind not in (_TRANSFORMERS_TYPE, "PvtImageProcessorPil", "PvtImageProcessorFast"):
            logger.info("preprocessor config names %r; reading it as %s", kind, _TRANSFORMERS_TYPE)
        unused = {key for key, value in extra.items() if value not in (None, False)} - {"processor_class"}
        if unused:
            logger.info("preprocessor config keys not used by %s (kept when saving): %s", cls.__name__, sorted(unused))
        processor.extra = extra
        return processor

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        subfolder: str | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        **settings: Any,
    ) -> PvtV2ImageProcessor:
        """Read a ``preprocessor_config.json`` from a JSON file, a folder, or a hub id such as ``OpenGVLab/pvt_v2_b0``
        (``subfolder``: from that folder inside the folder or hub repository). ``settings``: constructor arguments
        that replace the file's (``do_resize=False``; None keeps the file's), as transformers' ``from_pretrained``
        takes them.

        A folder or hub repository without the file gives, for a timm repository (timm's config.json), the
        preprocessing its ``pretrained_cfg`` records (:func:`timm_processor`, as transformers' AutoImageProcessor
        reads it), else the defaults (224x224 bilinear, ImageNet statistics); one holding something else under that
        name (a folder, a dangling symlink) is an error.
        """
        text = os.fspath(source)
        subfolder = check_subfolder(text, subfolder)
        if os.path.isfile(text):
            path: Path | None = Path(text)
        elif text.endswith(".json"):
            raise FileNotFoundError(f"preprocessor config file not found: {text!r}")
        else:
            path = resolve_file(text, PREPROCESSOR_CONFIG_NAME, revision=revision, cache_dir=cache_dir,
                                subfolder=subfolder, local_files_only=local_files_only, token=token, required=False)
        if path is None:
            processor = timm_repository_processor(text, revision=revision, cache_dir=cache_dir, subfolder=subfolder,
                                                   local_files_only=local_files_only, token=token)
            if processor is not None:
                return processor._for_call(settings) if settings else processor
            logger.info("no %s in %r%s; using the default preprocessing", PREPROCESSOR_CONFIG_NAME, text,
                        f" (subfolder {subfolder!r})" if subfolder else "")
            return cls()._for_call(settings) if settings else cls()
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:  # not UTF-8, not JSON, or an integer of more than 4300 digits
            raise ValueError(f"cannot read preprocessor config {str(path)!r}: not valid JSON ({error})") from error
        except RecursionError:  # arrays nested thousands deep: json's own error is a RecursionError
            raise ValueError(f"cannot read preprocessor config {str(path)!r}: its JSON is nested too deeply") from None
        try:
            processor = cls.from_dict(config)
        except (TypeError, ValueError) as error:
            raise type(error)(f"in preprocessor config {str(path)!r}: {error}") from error
        if settings:
            processor = processor._for_call(settings)
        return processor

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``preprocessor_config.json`` into ``folder`` (created if needed) and return its path."""
        directory = Path(folder)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"save_pretrained needs a folder, but {str(directory)!r} is a file")
        directory.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(directory / PREPROCESSOR_CONFIG_NAME, self.to_json_string())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PvtV2ImageProcessor):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    # ----------------------------------------------------------------------------------------- processing

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput],
        return_tensors: Literal["pt", "np"] | None = "pt",
        input_data_format: str | None = None,
        data_format: str | None = None,
        **settings: Any,
    ) -> ProcessorOutput:
        """Preprocess one image or a batch into ``pixel_values`` of shape (B, 3, H, W), float32: a tensor
        (``return_tensors="pt"``), an array (``"np"``), or, with ``None`` (transformers' default), a list of one
        (3, H, W) array per image, which may differ in size.

        ``images`` is a PIL image, a NumPy array or torch tensor ((H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4;
        or a 4-d batch of those), a file path, or a list of any of these. The channel axis of a 3-d array is the
        first one when its size is 1, 3 or 4, else the last, as in transformers; ``input_data_format``
        (``"channels_first"`` or ``"channels_last"``, transformers' argument) says which for arrays and tensors.

        ``settings``: arguments of the constructor (``do_resize=False``, ``size=...``) for this call only, as
        transformers' processors take them; one given as None keeps the instance's. ``do_convert_rgb=True`` is
        accepted: every image is made RGB. ``data_format`` (transformers' argument, the output's channel axis) may be
        ``"channels_first"`` (or ``ChannelDimension.FIRST``), which is what pixel values always are, or None; as in
        transformers 5, no other is supported (``"channels_last"`` is refused rather than ignored).
        """
        # isinstance first: an array compared with a string is an array, whose truth is numpy's raw ValueError
        if data_format is not None and not (isinstance(data_format, str) and data_format == "channels_first"):
            raise ValueError(
                f"data_format={data_format!r} is not supported: pixel values are always channels first (B, 3, H, W), "
                f"as the model takes them; pass data_format='channels_first' or leave it out"
            )
        if settings:
            return self._for_call(settings)(images, return_tensors, input_data_format)
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        if input_data_format is not None and not (
            isinstance(input_data_format, str) and input_data_format in ("channels_first", "channels_last")
        ):
            raise ValueError(
                f"input_data_format must be 'channels_first', 'channels_last' or None, got {input_data_format!r}"
            )
        items = _as_image_list(images)
        warned = False
        processed = []
        for index, item in enumerate(items):
            image = _to_rgb_chw(item, index, input_data_format)
            if self.do_rescale and not warned and _looks_scaled(image):
                logger.warning(
                    "image %d is a float array already in [0, 1] and will be multiplied by rescale_factor=%g again; "
                    "pass do_rescale=False for such inputs",
                    index,
                    self.rescale_factor,
                )
                warned = True
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # refused below, by name
                # As float32, what the pixel values become: a float64 input left unscaled overflowed in that cast,
                # after this check, and came out as infinity.
                pixels = self._preprocess(image).astype(np.float32, copy=False)
            if not np.isfinite(pixels).all():
                # Finite pixels and finite settings, past float32's range (a preprocessor_config.json's rescale_factor
                # of 1e300, an image_std of 1e-300): the model's scores were NaN, and predict printed them, exit 0.
                peak = float(np.abs(image).max())
                cause = ("these settings give no finite pixel values" if peak <= float(np.finfo(np.float32).max) else
                         f"the image's own values reach {peak:g}, past float32's range")
                raise ValueError(
                    f"image {index}: its pixel values overflow float32 once rescaled and normalised "
                    f"(rescale_factor={self.rescale_factor!r}, image_mean={self.image_mean!r}, "
                    f"image_std={self.image_std!r}); {cause}"
                )
            processed.append(pixels)
        if return_tensors is None:
            # Always copies: with nothing to do (no resize, rescale or normalise), an image would come back as the
            # caller's own array or tensor memory, and editing the output would edit the input.
            return ProcessorOutput(pixel_values=[array.astype(np.float32) for array in processed])
        shapes = {array.shape for array in processed}
        if len(shapes) > 1:
            raise ValueError(
                f"images of different sizes cannot be batched without resizing, got shapes {sorted(shapes)}; "
                f"use do_resize=True, return_tensors=None (a list) or pass them one at a time"
            )
        batch = np.stack(processed).astype(np.float32, copy=False)  # (B, 3, H, W)
        pixel_values = torch.from_numpy(batch) if return_tensors == "pt" else batch
        return ProcessorOutput(pixel_values=pixel_values)

    def preprocess(self, images: ImageInput | Sequence[ImageInput], **kwargs: Any) -> ProcessorOutput:
        """The same as calling the processor (transformers' processors have both)."""
        return self(images, **kwargs)

    def _for_call(self, settings: dict[str, Any]) -> PvtV2ImageProcessor:
        """A processor with ``settings`` (constructor arguments given to one call) over this one's."""
        unknown = sorted(set(settings) - set(_SETTINGS) - {"do_convert_rgb"})
        if unknown:
            raise TypeError(
                f"PvtV2ImageProcessor takes no setting {', '.join(map(repr, unknown))}; it takes {_SETTINGS}"
            )
        # None is "not given": the instance's setting stays, as transformers 4.x reads it (`x if x is not None else
        # self.x`); passed on, it meant the class default (ImageNet statistics, 224x224) for this call.
        settings = {name: value for name, value in settings.items() if value is not None}
        current = {name: getattr(self, name) for name in _SETTINGS}
        if current["crop_pct"] is not None and {"size", "crop_size", "do_center_crop"} & set(settings):
            # crop_pct only recorded how size was derived from the crop; the size or crop given now replace that.
            current["crop_pct"] = None
        if "crop_pct" in settings and "crop_size" not in settings:
            # timm's form, as the constructor reads it: the size is the crop and the resize follows from crop_pct.
            # The instance's crop stands for the size unless one is given (its resize, derived from the old
            # crop_pct, was refused as not matching the new one); without a crop, its size is the crop.
            current["crop_size"] = None
            if "size" not in settings and self.do_center_crop:
                current["size"] = self.crop_size
            if "do_center_crop" not in settings:
                current["do_center_crop"] = None  # crop_pct turns the crop on (the instance's False was refused)
        if not settings.get("do_center_crop", current["do_center_crop"]):
            current["crop_size"] = None
        processor = type(self)(**{**current, **settings})
        processor.extra = dict(self.extra)  # a loaded file's other keys, written back by save_pretrained
        return processor

    def _preprocess(self, image: np.ndarray) -> np.ndarray:
        """One RGB (3, H, W) array through resize, centre crop, rescale and normalise, with transformers'
        arithmetic (and torchvision's crop position)."""
        if self.do_resize:
            height, width = _resized_size(image.shape[1], image.shape[2], self.size)
            _check_pixels(self.size, height, width)
            image = _pil_resize(image, height, width, self.resample)
        if self.do_center_crop:
            image = _center_crop(image, self.crop_size["height"], self.crop_size["width"])  # type: ignore[index]
        if self.do_rescale:
            image = (image.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            if not np.issubdtype(image.dtype, np.floating):
                image = image.astype(np.float32)
            mean = np.array(_per_channel(self.image_mean), dtype=image.dtype)[:, None, None]
            std = np.array(_per_channel(self.image_std), dtype=image.dtype)[:, None, None]
            image = (image - mean) / std
        return image


# --------------------------------------------------------------------------------------------- input handling


def _as_image_list(images: Any) -> list[Any]:
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("got an empty list of images; pass at least one image")
        for index, item in enumerate(images):
            if isinstance(item, (list, tuple)):
                raise TypeError(f"image {index} is a {type(item).__name__}; pass a flat list of images")
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        if images.shape[0] == 0:
            raise ValueError(f"got an empty batch of images, shape {tuple(images.shape)}")
        return list(images)
    return [images]


def _to_rgb_chw(item: Any, index: int, layout: str | None = None) -> np.ndarray:
    """Any one input as an RGB array (3, H, W), following transformers' process_image with do_convert_rgb=True;
    ``layout`` (``"channels_first"``, ``"channels_last"`` or None: inferred) is that of an array or tensor."""
    if isinstance(item, (str, os.PathLike)):
        # As in transformers, the loaded RGB image still goes through convert_to_rgb: a palette or colour-key
        # transparency survives convert("RGB") in `info` and then sends those pixels to white.
        return np.moveaxis(np.asarray(to_rgb(load_image(item))), -1, 0)
    if isinstance(item, PIL.Image.Image):
        if item.width == 0 or item.height == 0:  # resized, it became a uniform picture the model classified
            raise ValueError(f"image {index} is empty: a {item.width}x{item.height} (width x height) PIL image")
        return np.moveaxis(np.asarray(to_rgb(item)), -1, 0)
    if isinstance(item, torch.Tensor):
        item = _tensor_to_numpy(item, index)
    if not isinstance(item, np.ndarray):
        raise TypeError(
            f"image {index} is a {type(item).__name__}; expected a PIL image, a NumPy array, a torch tensor "
            f"or a file path"
        )
    return _array_to_rgb_chw(item, index, layout)


_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def to_8bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """A 16-bit or 32-bit integer greyscale image as 8-bit ``L``; other modes unchanged.

    PIL's ``convert("RGB")`` / ``convert("L")`` clip such values at 255 rather than scale them, so a 16-bit picture
    would come out almost all white. 65535 / 257 = 255 exactly: ``round(v / 257)`` maps the 16-bit range onto 8 bits.
    A grey colour key (``info["transparency"]``, a 16-bit PNG's tRNS) is painted white (255), as an 8-bit key is.
    """
    if image.mode not in _SIXTEEN_BIT_MODES and image.mode != "I":
        return image
    values = np.asarray(image).astype(np.int64)
    scaled = None
    if image.mode == "I" and values.size:
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ValueError(
                f"a 32-bit greyscale image with values in [{low}, {high}] cannot be shown as 8 bits; expected values "
                f"in [0, 255] (8-bit) or [0, 65535] (16-bit)"
            )
        if high <= 255:  # 8-bit values stored in 32 bits: nothing to scale
            scaled = values.astype(np.uint8)
    if scaled is None:
        # Integer round half up of v / 257 (no float rounding questions): (2v + 257) // 514.
        scaled = ((2 * values + 257) // 514).astype(np.uint8)
    # A grey colour key (a 16-bit PNG's tRNS) is painted white here, as convert_to_rgb paints an 8-bit one: the key
    # is a 16-bit value, and several 16-bit values share its 8-bit one, so it cannot be carried over as a key.
    key = image.info.get("transparency")
    if isinstance(key, int) and not isinstance(key, bool):
        scaled[values == key] = 255
    return PIL.Image.fromarray(scaled)


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """A PIL image as the processor makes it RGB: 16-bit values scaled to 8 bits (:func:`to_8bit`), then, as
    transformers' ``convert_to_rgb``, any transparency (an alpha band, a palette or colour-key transparency)
    composited onto white."""
    image = to_8bit(image)  # not in transformers: 16-bit values would be clipped to white (see the module docstring)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _tensor_to_numpy(tensor: torch.Tensor, index: int) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"image {index} has dtype {tensor.dtype}; expected an integer or floating point tensor")
    if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds it exactly
        tensor = tensor.float()
    return tensor.numpy()


def _array_to_rgb_chw(array: np.ndarray, index: int, layout: str | None = None) -> np.ndarray:
    if array.dtype.kind not in "uif":
        raise TypeError(
            f"image {index} has dtype {array.dtype}; expected an unsigned/signed integer or floating point array"
        )
    if array.ndim == 2:
        array = array[None]  # (1, H, W): one grey channel
    elif array.ndim == 3 and layout is not None:
        axis = 0 if layout == "channels_first" else -1
        if array.shape[axis] not in _CHANNEL_COUNTS:
            raise ValueError(
                f"image {index} has shape {tuple(array.shape)}: with input_data_format={layout!r} its channel axis "
                f"has {array.shape[axis]} entries, not 1, 3 or 4"
            )
        array = np.moveaxis(array, axis, 0)
    elif array.ndim == 3:
        first, last = array.shape[0], array.shape[-1]
        if first in _CHANNEL_COUNTS:
            if last in _CHANNEL_COUNTS:
                logger.warning(
                    "image %d of shape %s could be (C, H, W) or (H, W, C); taking channels first, as transformers does",
                    index,
                    tuple(array.shape),
                )
        elif last in _CHANNEL_COUNTS:
            array = np.moveaxis(array, -1, 0)
        else:
            raise ValueError(
                f"image {index} has shape {tuple(array.shape)}: cannot find a channel axis of size 1, 3 or 4 "
                f"first (C, H, W) or last (H, W, C)"
            )
    else:
        raise ValueError(
            f"image {index} has shape {tuple(array.shape)}: expected (H, W), (H, W, C) or (C, H, W) for one image, "
            f"or a 4-d batch"
        )
    if array.shape[1] == 0 or array.shape[2] == 0:
        raise ValueError(f"image {index} is empty: its (C, H, W) shape is {tuple(array.shape)}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError(f"image {index} contains NaN or infinite values")

    channels = array.shape[0]
    if channels == 1:
        return np.repeat(array, 3, axis=0)
    if channels == 4:
        # transformers' convert_to_rgb for arrays: blend onto white; integers are rounded back to their dtype.
        if array.dtype.kind == "f" and (array.min() < 0.0 or array.max() > 1.0):
            raise ValueError(
                f"image {index} is a 4-channel float array with values in [{array.min()}, {array.max()}]; "
                f"alpha compositing needs floats in [0, 1]"
            )
        white = 255 if array.dtype.kind in "ui" else 1.0
        alpha = array[3:4] / white
        composite = alpha * array[:3] + (1 - alpha) * white
        return np.round(composite).astype(array.dtype) if white == 255 else composite.astype(array.dtype)
    return array


def _looks_scaled(image: np.ndarray) -> bool:
    return image.dtype.kind == "f" and bool(image.min() >= 0) and bool(image.max() <= 1)


def _pil_resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """Resize (3, H, W) with PIL as transformers' ``resize`` does, returning (3, height, width)."""
    rescaled = _needs_rescale_for_pil(image)
    hwc = np.moveaxis(image, 0, -1)
    if rescaled:
        hwc = (hwc.astype(np.float64) * 255).astype(np.float32)  # transformers' rescale(image, 255)
    pil_image = PIL.Image.fromarray(hwc.astype(np.uint8))  # truncates, as transformers does
    resized = np.moveaxis(np.asarray(pil_image.resize((width, height), resample=resample)), -1, 0)
    if rescaled:
        resized = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    return resized


def _resized_size(height: int, width: int, size: Mapping[str, int]) -> tuple[int, int]:
    """The (height, width) a resize to ``size`` gives: fixed, or the shorter side to ``shortest_edge`` and the longer
    one to ``int(shortest_edge * long / short)`` (torchvision's ``Resize(int)`` and transformers' rule)."""
    shortest = size.get("shortest_edge")
    if shortest is None:
        return size["height"], size["width"]
    short, long = (width, height) if width <= height else (height, width)
    try:
        longer = int(shortest * long / short)
    except OverflowError:  # past floats (a hostile 10**400): exact, and then refused by the pixel limit
        longer = shortest * long // short
    return (longer, shortest) if width <= height else (shortest, longer)


def _check_pixels(size: Mapping[str, int], height: int, width: int) -> None:
    """Refuse, before any memory is taken, a resize no image can have: PIL's decompression-bomb limit bounds it. A
    hostile preprocessor_config.json's 100000 x 100000 took 120 GB per image as float32 (the machine out of memory),
    and 10**400 failed inside PIL with "Python int too large to convert to C int". The bound is where PIL itself
    refuses to open an image (twice MAX_IMAGE_PIXELS; it only warns from once): once made it, a 1 x 640 strip at the
    timm protocol's 384 (426 x 272,640 pixels) was refused where timm's and the authors' transforms take it."""
    limit = PIL.Image.MAX_IMAGE_PIXELS
    if limit is not None and height * width > 2 * limit:
        raise ValueError(
            f"cannot resize to {reprlib.repr(height)} x {reprlib.repr(width)} (size={reprlib.repr(dict(size))}): "
            f"more pixels than twice PIL.Image.MAX_IMAGE_PIXELS ({2 * limit:,}, PIL's decompression-bomb error)"
        )


def origin_processor(origin: str | None, height: int, width: int) -> PvtV2ImageProcessor | None:
    """The protocol of a checkpoint's ``origin`` (``model.checkpoint_layout``, the layout its weights were read
    from) for inputs of ``height`` x ``width``: a timm file's is timm's, an original file's the authors'; None for
    another layout or non-square inputs (which those protocols' square crop cannot make)."""
    if origin in ("timm", "original") and height == width:
        return PvtV2ImageProcessor.from_protocol(origin, height)
    return None


# timm's interpolation names (timm.data.transforms.str_to_interp_mode): each is PIL's filter of that name.
TIMM_INTERPOLATIONS = {
    name: int(getattr(PIL.Image.Resampling, name.upper()))
    for name in ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
}


def timm_processor(config: Any, path: str | os.PathLike = "config.json") -> PvtV2ImageProcessor | None:
    """The eval preprocessing a timm hub repository's ``config.json`` (``config``, read from ``path``) records in its
    ``pretrained_cfg``: the pixels of ``timm.data.create_transform(**resolve_data_config({}, pretrained_cfg=...))``
    and of transformers' ``TimmWrapperImageProcessor``. ``input_size`` (3, H, W) is the crop, resized first by
    ``crop_pct`` with ``interpolation``, then normalised by ``mean`` and ``std``; a missing field takes timm's
    default (224, 0.875, bicubic, ImageNet statistics, centre crop), as ``resolve_data_config`` does, which also
    takes an empty one (null, "", 0, []) for missing, except ``input_size``; a one-value ``mean`` or ``std`` is every
    channel's.
    ``crop_mode`` "center" (the shorter side to ``floor(H / crop_pct)``, square inputs) and "squash" (both sides to
    ``floor(side / crop_pct)``) are supported; "border", a non-square "center" crop, ``crop_pct`` outside (0, 1] and
    ``test_input_size`` (timm reads it only when asked to) are not: the first ones are refused naming ``path``.
    None when the file holds no ``pretrained_cfg``."""
    where = f"timm config {os.fspath(path)!r}"
    cfg = config.get("pretrained_cfg") if isinstance(config, Mapping) else None
    if cfg is None:
        return None
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{where}: pretrained_cfg must be an object, got {reprlib.repr(cfg)}")

    def field(name: str, default: Any) -> Any:
        value = cfg.get(name)  # resolve_data_config: `elif pretrained_cfg.get(name)`, so "", 0, [] are missing too
        if name in ("mean", "std") and isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 1:
            value = value[0]  # one mean / std for every channel, as timm's Normalize broadcasts it
        return value if value else default

    input_size = cfg.get("input_size")
    input_size = (3, 224, 224) if input_size is None else input_size
    if (isinstance(input_size, (str, bytes)) or not isinstance(input_size, Sequence) or len(input_size) != 3
            or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in input_size)):
        raise ValueError(f"{where}: pretrained_cfg input_size must be [channels, height, width] of positive "
                         f"integers, got {reprlib.repr(input_size)}")
    if input_size[0] != 3:
        raise ValueError(f"{where}: pretrained_cfg input_size {list(input_size)} has {input_size[0]} channels; "
                         f"PVTv2 takes 3 (RGB)")
    height, width = input_size[1], input_size[2]
    crop_pct = field("crop_pct", 0.875)
    interpolation = field("interpolation", "bicubic")
    if not isinstance(interpolation, str) or interpolation not in TIMM_INTERPOLATIONS:
        raise ValueError(f"{where}: pretrained_cfg interpolation must be one of {sorted(TIMM_INTERPOLATIONS)}, got "
                         f"{reprlib.repr(interpolation)}")
    crop_mode = field("crop_mode", "center")
    if crop_mode not in ("center", "squash"):
        raise ValueError(f"{where}: pretrained_cfg crop_mode {reprlib.repr(crop_mode)} is not supported (timm's "
                         f"'border' pads the image); 'center' and 'squash' are")
    try:
        pct = _check_crop_pct(crop_pct)
        common = dict(resample=TIMM_INTERPOLATIONS[interpolation], image_mean=field("mean", IMAGENET_MEAN),
                      image_std=field("std", IMAGENET_STD))
        if crop_mode == "squash":
            resized = {"height": math.floor(height / pct), "width": math.floor(width / pct)}
            processor = PvtV2ImageProcessor(size=resized, crop_size={"height": height, "width": width},
                                            do_center_crop=True, **common)
        elif height != width:
            raise ValueError(f"input_size {list(input_size)} is not square: timm's centre crop of another shape "
                             f"(ResizeKeepRatio) is not supported")
        else:
            processor = PvtV2ImageProcessor(size=height, crop_pct=pct, **common)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{where}: pretrained_cfg: {error}") from None
    if "test_input_size" in cfg:
        logger.info("%s: pretrained_cfg test_input_size is not used (timm uses it only when asked)", where)
    return processor


def timm_repository_processor(source: str | os.PathLike, **where: Any) -> PvtV2ImageProcessor | None:
    """A timm hub repository's preprocessing (its config.json's pretrained_cfg, as transformers'
    AutoImageProcessor reads it into a TimmWrapperImageProcessor; :func:`timm_processor`), or None where ``source``
    has no timm config.json or it holds no pretrained_cfg. ``source``: a folder, hub id (``where``: revision,
    subfolder... as for ``resolve_file``) or a weights file in a folder with the config.json beside it."""
    text = os.fspath(source)
    path = resolve_file(text, "config.json", required=False, **where) if where else companion_file(text, "config.json")
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as error:  # not UTF-8 or not JSON
        raise ValueError(f"cannot read config {str(path)!r}: not valid JSON ({error})") from error
    except RecursionError:
        raise ValueError(f"cannot read config {str(path)!r}: its JSON is nested too deeply") from None
    if timm_architecture(data) is None:
        return None
    processor = timm_processor(data, path)
    if processor is not None:
        logger.info("preprocessing from the pretrained_cfg of the timm config %s", path)
    return processor


def _center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centred (height, width) window of (C, H, W), placed as torchvision's ``CenterCrop`` places it."""
    _, full_height, full_width = image.shape
    if full_height < height or full_width < width:
        raise ValueError(
            f"cannot centre-crop {height}x{width} from an image of {full_height}x{full_width}; resize first "
            f"(do_resize=True) or choose a smaller crop_size"
        )
    # torchvision: int(round((H - h) / 2.0)), Python's round (halves to even); transformers floors.
    top = round((full_height - height) / 2.0)
    left = round((full_width - width) / 2.0)
    return image[:, top : top + height, left : left + width]


def _needs_rescale_for_pil(image: np.ndarray) -> bool:
    # transformers' _rescale_for_pil_conversion: whole numbers in [0, 255] go to uint8 as they are, other values in
    # [0, 1] are scaled by 255 first; the rest cannot become a PIL image.
    if image.dtype == np.uint8:
        return False
    with np.errstate(invalid="ignore"):  # huge floats overflow the int cast; they then fail the range check
        whole = np.allclose(image, image.astype(int))
    if whole:
        if np.all(image >= 0) and np.all(image <= 255):
            return False
        raise ValueError(
            f"an image of whole numbers must have values in [0, 255] to be resized, got [{image.min()}, {image.max()}]"
        )
    if np.all(image >= 0) and np.all(image <= 1):
        return True
    raise ValueError(
        f"a float image must hold whole numbers in [0, 255] or values in [0, 1] to be resized, "
        f"got [{image.min()}, {image.max()}]"
    )


# --------------------------------------------------------------------------------------------- argument checks


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _check_size(size: Any, *, name: str = "size", shortest_edge: bool = False) -> dict[str, int]:
    """``{"height": h, "width": w}`` from a dict, an int or a pair; ``{"shortest_edge": s}`` where allowed."""
    if isinstance(size, Mapping) and shortest_edge and set(size) == {"shortest_edge"}:
        value = size["shortest_edge"]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must hold a positive integer shortest_edge, got {dict(size)!r}")
        return {"shortest_edge": int(value)}
    if isinstance(size, Mapping):
        if set(size) != {"height", "width"}:
            also = " (or only 'shortest_edge')" if shortest_edge else ""
            raise ValueError(f"{name} must have exactly the keys 'height' and 'width'{also}, got {dict(size)!r}")
        height, width = size["height"], size["width"]
    elif isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        height = width = size
    elif isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2:
        height, width = size
    else:
        raise ValueError(f"{name} must be {{'height': h, 'width': w}}, an int or an (h, w) pair, got {size!r}")
    for value in (height, width):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must hold positive integers, got {size!r}")
    return {"height": int(height), "width": int(width)}


def _check_crop_pct(value: Any) -> float:
    number = _check_number("crop_pct", value)
    if not 0 < number <= 1:
        raise ValueError(f"crop_pct must be in (0, 1] (the fraction of the resized image the crop keeps), got {value!r}")
    return number


def _check_resample(resample: Any) -> int:
    if isinstance(resample, str):
        try:
            return int(PIL.Image.Resampling[resample.upper()])
        except KeyError:
            names = [member.name.lower() for member in PIL.Image.Resampling]
            raise ValueError(f"resample must be one of {names} or their ints, got {resample!r}") from None
    if isinstance(resample, bool) or not isinstance(resample, (int, np.integer)):
        raise TypeError(f"resample must be a PIL.Image.Resampling, an int or a name, got {resample!r}")
    try:
        return int(PIL.Image.Resampling(int(resample)))
    except ValueError:
        valid = {member.name.lower(): int(member) for member in PIL.Image.Resampling}
        raise ValueError(f"resample must be one of {valid}, got {resample!r}") from None


def _check_channel_values(name: str, values: Any) -> float | tuple[float, float, float]:
    if isinstance(values, (int, float, np.integer, np.floating)) and not isinstance(values, bool):
        return _check_number(name, values)
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be a number or 3 numbers (one per RGB channel), got {values!r}")
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (one per RGB channel), got {len(values)}: {list(values)!r}")
    return tuple(_check_number(name, value) for value in values)  # type: ignore[return-value]


def _per_channel(values: float | tuple[float, ...]) -> tuple[float, ...]:
    return values if isinstance(values, tuple) else (values,) * 3


def _json_channel_values(values: float | tuple[float, ...]) -> float | list[float]:
    return list(values) if isinstance(values, tuple) else values
