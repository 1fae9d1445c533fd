"""The ``pvtv2`` command: a thin layer over the library. Each subcommand parses its flags and calls one function.

Every subcommand is registered by an ``_add_<name>(subparsers)`` function next to its ``_cmd_<name>(args)``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["main", "build_parser"]

logger = logging.getLogger("pvtv2")


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def _check_range(flag: str, value: float | None, low: float, high: float | None = None) -> None:
    """Refuse a flag's value outside [low, high] with a one-line error, before anything is loaded or written."""
    if value is None:
        return
    if not (value >= low and (high is None or value <= high)):  # also refuses NaN
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{flag} must be {bounds}, got {value}")


def _check_demo_seed(seed: int) -> None:
    """demo-seg's and demo-det's --seed, checked as training checks it (its words): with --epochs 0 training's check
    never ran, so -1 stopped in numpy ("expected non-negative integer", no flag named) and 2**70 wrote data that
    the same command with --epochs 1 refuses to train on."""
    from .training.config import MAX_SEED

    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"--seed must be an integer in [0, 2**63-1], got {seed}")


# Picture names whose extension promises another format than the PNG the commands write.
_OTHER_PICTURE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm",
                                     ".jp2", ".ico", ".avif", ".heic"})


def _check_output_file(path: str, output_dir: str | None = None, example: str = "out.png",
                       inputs: Sequence[str] = ()) -> None:
    """Refuse, before any work, an --output that cannot become a file: an existing folder, or a path under a
    file or under a folder this user may not write, or one of the ``inputs`` (the image a picture is drawn from,
    which the picture would replace). (Missing parent folders are created.) With ``output_dir``,
    ``path`` is a picture detect names in that --output-dir: the error names the flag given, not --output.
    ``example``: the file name an existing folder is suggested to take (a picture's, unless given)."""
    import os
    from pathlib import Path

    from .fileio import path_kind

    target = Path(path)
    # detect --output-dir names its pictures after the images: the user chose the folder, not the file name.
    named = f"--output {path!r}" if output_dir is None else f"{path!r} (a picture of --output-dir {output_dir!r})"
    remedy = "give a file name" if output_dir is None else "move it or give another --output-dir"
    if example.endswith(".png") and target.suffix.lower() in _OTHER_PICTURE_SUFFIXES:
        # The pictures are PNG data whatever the name: `-o out.jpg` wrote PNG bytes under a JPEG name.
        raise ValueError(f"{named} names a {target.suffix[1:].upper()} file, but the picture is written as PNG: "
                         f"give a name ending in .png")
    if target.is_dir():
        if output_dir is None:
            remedy = f"give a file name such as {os.path.join(path, example)!r}"
        raise ValueError(f"{named} is a folder; {remedy}")
    kind = path_kind(target)
    if kind not in ("file", "nothing", "dangling symlink"):
        # The picture is renamed into place: a device or FIFO there (`-o /dev/null`, run as root) was replaced by it.
        raise ValueError(f"{named} is a {kind}, not a regular file: it would be replaced; {remedy}")
    if kind == "file":
        for image in inputs:
            if path_kind(image) == "file" and os.path.samefile(target, image):
                other = "give another file name" if output_dir is None else "give another --output-dir"
                raise ValueError(f"{named} is the input image {os.fspath(image)!r}: the picture would replace it; "
                                 f"{other}")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot write {path!r}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path!r}: the folder {str(parent)!r} is not writable")


def _save_png(picture, path: str) -> None:
    """Write a PIL picture as PNG atomically: an error names ``path`` (never a temporary file) and leaves nothing."""
    from .fileio import atomic_write

    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def _enlarged_note(scale: int, height: int, width: int) -> str:
    if scale == 1:
        return ""
    return f" (the {width}x{height} input enlarged {scale}x, nearest neighbour, to be legible)"


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="pvtv2",
        description="PVTv2 image models: predict, evaluate, train, export, inspect.",
    )
    parser.add_argument("--version", action="version", version=f"pvtv2 {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _REGISTRY:
        add(subparsers)
    for command in subparsers.choices.values():
        for action in command._actions:
            if action.dest in _PATH_ARGUMENTS and action.type is None:
                action.type = _user_path
    return parser


# The arguments that name files and folders, in every command: each gets ~ and ~user expanded, as the shell does
# only at the start of a word (so not in --data=~/x). A model may be a preset or hub id: neither starts with ~.
_PATH_ARGUMENTS = frozenset(("data", "model", "output", "output_dir", "images", "image", "onnx", "source"))


def _user_path(text: str) -> str:
    if not text:
        # An empty word (`-o "$OUT"` with OUT unset) read as the current folder: demo, demo-seg and demo-det wrote
        # there and convert tried to replace it, while detect took an empty --output or --output-dir as none given
        # and drew nothing. No command means "here" by it.
        raise argparse.ArgumentTypeError("an empty path names no file or folder")
    return os.path.expanduser(text)


_REGISTRY: list = []


def _epochs(count: int) -> str:
    return f"{count} epoch" if count == 1 else f"{count} epochs"


def _register(fn):
    _REGISTRY.append(fn)
    return fn


# ---------------------------------------------------------------------------------------------- benchmark
@_register
def _add_benchmark(subparsers) -> None:
    p = subparsers.add_parser(
        "benchmark", help="images/s, latency and peak memory of a model on this machine",
        description="Time a model on random images: inference (or a training step with --train) after warm-up. "
                    "A preset name gives random weights, which time the same as trained ones.",
    )
    p.add_argument("--model", "-m", required=True, help="preset name (e.g. pvt_v2_b2), config.json, folder, checkpoint file or hub id")
    p.add_argument("--batch-size", type=int, default=1, help="images per call, 1 to 1024 (default: 1)")
    p.add_argument("--image-size", type=int, default=224, help="square input side in pixels, 32 to 4096 (default: 224)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="fp32, or bf16 autocast (default: fp32)")
    p.add_argument("--compile", action="store_true", help="run through torch.compile")
    p.add_argument("--train", action="store_true", help="time a training step (forward, backward, AdamW)")
    p.add_argument("--backbone", action="store_true", help="time the multi-scale backbone instead of the classifier")
    p.add_argument("--threads", type=int, default=None, help="torch threads, 1 to 1024 (default: PyTorch's choice)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls after warm-up (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default: 2)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_benchmark)


def _cmd_benchmark(args: argparse.Namespace) -> int:
    import torch

    from . import fast
    from .benchmark import benchmark_model, build_model
    from .runtime import parse_device
    from .training.config import MAX_IMAGE_SIDE

    _check_range("--threads", args.threads, 1, 1024)
    _check_range("--batch-size", args.batch_size, 1, 1024)
    _check_range("--image-size", args.image_size, 32, MAX_IMAGE_SIDE)
    _check_range("--repeats", args.repeats, 1, 100_000)
    _check_range("--warmup", args.warmup, 0, 100_000)
    device = parse_device(args.device)
    if device.type == "meta":
        raise ValueError("--device meta holds shapes without data: nothing can be timed there; use cpu or cuda")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = build_model(args.model, backbone=args.backbone).to(device)
    if not args.train:
        fast.freeze(model)  # as predict and eval do: the weights packed once for the fast CPU path
    result = benchmark_model(
        model, batch_size=args.batch_size, image_size=args.image_size, dtype=args.dtype, compile=args.compile,
        train=args.train, warmup=args.warmup, repeats=args.repeats, name=args.model,
    )
    if args.json:
        _print_json(result.to_dict())
    else:
        print(
            f"{result.model} {result.mode} batch {result.batch_size} {result.image_size}x{result.image_size} "
            f"{result.dtype}{' compiled' if result.compiled else ''}, {result.threads} threads: "
            f"{result.images_per_s:.2f} images/s, {result.latency_ms:.1f} ms per batch (best "
            f"{result.best_latency_ms:.1f}), peak RSS {result.peak_rss_mb:.0f} MiB"
            + (f", peak GPU memory {result.peak_gpu_mb:.0f} MiB" if result.peak_gpu_mb is not None else "")
        )
    return 0


# ---------------------------------------------------------------------------------------------- train
def _clip_norm(text: str) -> float:
    """``--clip-grad``'s number. One written non-zero that a float cannot hold (``1e-400`` parses as 0.0) is refused:
    0 means no clipping, the opposite of the tightest clip it asked for."""
    import decimal

    value = float(text)  # ValueError: argparse's "invalid _clip_norm value"
    try:
        written_zero = decimal.Decimal(text.strip()) == 0
    except decimal.InvalidOperation:
        written_zero = True  # a spelling float reads and Decimal does not: its value is what it says
    if value == 0 and not written_zero:
        raise argparse.ArgumentTypeError(
            f"{text!r} is too small for a floating-point number and would be read as 0, which means no clipping; "
            "pass a norm of at least 1e-300, or 0 for no clipping")
    return value


_clip_norm.__name__ = "float"  # argparse names the type in its message: "invalid float value: 'x'"


def _add_training_flags(p: argparse.ArgumentParser, recipe: dict) -> None:
    """The flags of a training run, shared by `train` and `train-seg`. Every default is None, so that the command
    knows which flags were given (``--resume`` warns about each one the stored run overrides); ``recipe`` (over
    TrainConfig's defaults) supplies the rest and the defaults shown in the help."""
    from .training import TrainConfig

    d = {**TrainConfig().run_fields(), **recipe}
    lr_default = (f"default {d['lr']:g}" if d["lr"] is not None else
                  "default: 5e-4 x global batch / 512 for classification, 6e-5 x global batch / 16 for segmentation, "
                  "1e-4 x global batch / 16 for depth and detection")
    p.add_argument("--model", "-m", help=f"preset name, config.json, folder, checkpoint file or hub id (default {d['model']})")
    p.add_argument("--output", "-o", required=True, help="run folder for checkpoints, metrics and curves")
    p.add_argument("--image-size", type=int, help=f"training and evaluation resolution (default {d['image_size']})")
    p.add_argument("--epochs", type=int, help=f"default {d['epochs']}")
    p.add_argument("--batch-size", type=int, help=f"images per process per forward pass (default {d['batch_size']})")
    p.add_argument("--lr", type=float, help=f"peak learning rate ({lr_default})")
    p.add_argument("--min-lr", type=float, help=f"learning rate at the end of the cosine (default {d['min_lr']:g})")
    p.add_argument("--warmup-epochs", type=float, help=f"linear warmup length (default {d['warmup_epochs']:g})")
    p.add_argument("--warmup-steps", type=int, help="linear warmup length in optimizer steps, instead of --warmup-epochs "
                   "(default: none; detection: 500, at most a fifth of the run)")
    p.add_argument("--weight-decay", type=float, help=f"AdamW weight decay, not on norms and biases (default {d['weight_decay']:g})")
    p.add_argument("--label-smoothing", type=float, help=f"classification (default {d['label_smoothing']:g})")
    p.add_argument("--drop-path", type=float, help="stochastic depth rate (default: the preset's or the checkpoint's)")
    p.add_argument("--grad-accum", type=int, help=f"forward passes per optimizer step (default {d['grad_accum']})")
    p.add_argument("--crop-scale", type=float,
                   help=f"classification: smallest area fraction of random resized crops (default {d['crop_scale']:g})")
    p.add_argument("--hflip", type=float, help=f"probability of a horizontal flip (default {d['hflip']:g})")
    p.add_argument("--clip-grad", type=_clip_norm, help="clip the gradient's global 2-norm to this value, e.g. 1.0 (the "
                   "authors' for B3-B5); 0: no clipping (default: no clipping); negative values are refused")
    p.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast where the device supports it")
    p.add_argument("--amp", help="mixed precision: bf16 (the same as --bf16) or fp16 (float16 autocast with a "
                   "gradient scaler, for CUDA GPUs without bfloat16; refused on CPUs)")
    p.add_argument("--seed", type=int, help=f"default {d['seed']}")
    p.add_argument("--replace-head", action="store_true", default=None,
                   help="fine-tuning: train a new head when the dataset's classes are not the checkpoint's")
    p.add_argument("--recipe", choices=("deit", "none"),
                   help="classification: the paper's (DeiT's) augmentation, i.e. the five flags below at the paper's "
                   "values and --repeated-aug 3 under torchrun (deit), or all of it off (none). Default: deit when "
                   "training a preset from scratch, none when fine-tuning or training a config.json; each flag below "
                   "overrides it (e.g. --mixup 0)")
    p.add_argument("--randaugment", action=argparse.BooleanOptionalAction, default=None,
                   help="classification: RandAugment as the paper's rand-m9-mstd0.5-inc1 (torchvision's ops); "
                   "default: the recipe's")
    p.add_argument("--mixup", type=float, help="classification: MixUp's alpha; 0: off (default: the recipe's 0.8, "
                   "else 0)")
    p.add_argument("--cutmix", type=float, help="classification: CutMix's alpha; 0: off (default: the recipe's 1.0, "
                   "else 0)")
    p.add_argument("--reprob", type=float, help="classification: random-erasing probability (default: the recipe's "
                   "0.25, else 0)")
    p.add_argument("--repeated-aug", type=int, help="classification: copies of each image per epoch, each augmented "
                   "its own way (default: the recipe's 3 under torchrun, else 1)")
    p.add_argument("--train-interpolation", help="classification: bilinear or bicubic for the random resized crop "
                   "(default: the recipe's bicubic, else bilinear)")
    p.add_argument("--ema", type=float, metavar="DECAY", help="keep an exponential moving average of the weights "
                   "(e.g. 0.9998), evaluated each epoch and saved as OUT/ema (default: off)")
    p.add_argument("--val-split", type=float, metavar="FRACTION", help="without DIR/val: hold out this fraction of "
                   "DIR/train (of each class for classification; seeded by --seed), e.g. 0.1; not for detection")
    p.add_argument("--freeze-stages", type=int, metavar="K", help="fine-tuning: keep the first K encoder stages fixed "
                   "(default 0)")
    p.add_argument("--layer-decay", type=float, help="fine-tuning: layer-wise learning-rate decay, e.g. 0.75: each "
                   "block below the head learns at this factor of the one above (default: off)")
    p.add_argument("--reduce-labels", action="store_true", default=None,
                   help="segmentation: ADE20K-style masks, 0 = no label and class k + 1 -> k")
    p.add_argument("--seg-augment", action="store_true", default=None,
                   help="segmentation: SegFormer's pipeline: random rescale 0.5-2x, random --image-size crop (at most "
                   "75%% one class), flip, photometric distortion")
    p.add_argument("--ignore-index", type=int, metavar="N",
                   help="segmentation: the mask value left out of the loss, mean IoU and pixel accuracy (default 255); "
                   "1 to 65535 and above every class index (one that is a class is refused)")
    p.add_argument("--head-lr-mult", type=float, help="learning-rate factor of the head (SegFormer: 10; default 1)")
    p.add_argument("--decode-head", choices=("segformer", "fpn"),
                   help="segmentation: the head of a new model or of a classification checkpoint: segformer (SegFormer's "
                        "all-MLP head) or fpn (Semantic FPN, the PVTv2 paper's ADE20K head); default: a segmentation "
                        "checkpoint's own, else segformer")
    p.add_argument("--schedule", help="cosine (default) or poly (mmsegmentation's, power 0.9) after the warmup")
    p.add_argument("--depth-scale", type=float, help="depth: PNG units per metre (default 1000: millimetres)")
    p.add_argument("--nyu-crop", action="store_true", default=None,
                   help="depth: evaluate inside Eigen's NYU Depth v2 crop only")
    p.add_argument("--max-depth", type=float,
                   help="depth: metres the model can predict (sigmoid x max depth) and the metrics count (default: "
                        "the model's, 10 as GLPN's NYU models; KITTI: 80)")
    p.add_argument("--workers", type=int, help="data-loading processes (default 0 on CPU, up to 8 on GPU)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--resume", action="store_true", help="continue the unfinished run in --output with its stored "
                   "settings (a run setting given with another value, --epochs included, is refused)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train, command_defaults=recipe)


@_register
def _add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", aliases=["finetune", "fine-tune"],
        help="train or fine-tune a classifier on an image folder (single process or under torchrun)",
        description="Train from scratch (--model a preset name such as pvt_v2_b0, or a config.json) or fine-tune "
        "(--model a folder, checkpoint file or hub id) on DIR/train/<class>/* and DIR/val/<class>/*. Defaults are the "
        "PVTv2 paper's recipe. Writes OUT/last and OUT/best (from_pretrained folders), OUT/metrics.jsonl and "
        "OUT/curves.png. Run under `torchrun --nproc_per_node N` for DistributedDataParallel.",
    )
    p.add_argument("--task", choices=("classification", "segmentation", "detection", "depth"),
                   help="classification (default; DIR/train/<class>/*), segmentation (DIR/train/images/*, "
                   "DIR/train/masks/*.png, the same under val/; reports mean IoU and pixel accuracy), detection "
                   "(COCO format: DIR/annotations/instances_{train,val}.json, DIR/train/, DIR/val/; reports COCO box "
                   "AP; defaults are the original 1x recipe: --image-size 800 (the shorter side), 12 epochs with the "
                   "rate x0.1 after epochs 8 and 11, batch 2, lr 1e-4 x global batch / 16, weight decay 1e-4, 500 "
                   "warmup steps) or depth (DIR/train/images/*, DIR/train/depth/*.png 16-bit, the same under val/; "
                   "GLPN head, AbsRel, RMSE, delta metrics)")
    p.add_argument("--data", help="dataset folder with train/<class>/ and val/<class>/ sub-folders")
    p.add_argument("--detector", choices=("retinanet", "faster_rcnn", "mask_rcnn", "fcos"),
                   help="detection: the torchvision detector on the PVTv2 encoder (default: a saved detector's own "
                   "kind when --model is one, else retinanet; another kind than a saved detector's is refused unless "
                   "its weights fit, e.g. a faster_rcnn fine-tuned as a mask_rcnn)")
    p.add_argument("--multiscale", action="store_true", default=None,
                   help="detection: draw each training image's shorter side from 480 ... 800 (step 32) scaled to "
                   "--image-size (the 3x recipe, with --epochs 36)")
    _add_training_flags(p, {})


def _cmd_train(args: argparse.Namespace) -> int:
    """`train` and its alias `train-seg`, which differ only in ``args.command_defaults``: the defaults of the flags not
    given."""
    import dataclasses

    from .training import TrainConfig, train

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if given.get("resume") and "task" not in given and given.get("output"):
        # The run's task, for the checks of task-only flags (--max-depth given to resume a depth run was refused as
        # "applies to --task depth only, not --task classification"); a missing or damaged run.json is reported later.
        from .training.rundir import RUN_FILE, read_run_file

        folder = os.path.expanduser(given["output"])
        if os.path.isfile(os.path.join(folder, RUN_FILE)):
            try:
                task = read_run_file(folder).get("task")
            except (OSError, ValueError):
                task = None
            if isinstance(task, str):
                given["task"] = task
    if args.amp is not None:
        if args.amp not in ("bf16", "fp16"):
            raise ValueError(f"--amp must be bf16 or fp16, got {args.amp!r}")
        given["bf16" if args.amp == "bf16" else "fp16"] = True
    recipe = args.command_defaults
    if given.get("task") == "detection":
        from .training.detection import DETECTION_RECIPE

        recipe = DETECTION_RECIPE
        if "warmup_epochs" in given and "warmup_steps" not in given:
            # The recipe's warmup is in steps, which override epochs: --warmup-epochs alone was silently ignored.
            recipe = {**recipe, "warmup_steps": None}
    elif not given.get("resume") and (given.get("detector") or given.get("multiscale")):
        raise ValueError("--detector and --multiscale are detection settings: add --task detection")
    cfg = TrainConfig(**{**recipe, **given, "progress": not args.no_progress})
    if not cfg.resume and not cfg.data:
        raise ValueError("--data is required (unless --resume continues a run)")
    # --resume and --overwrite left out are False, not None: not given.
    result = train(cfg, explicit={k for k, v in given.items() if not (k in ("resume", "overwrite") and v is False)})
    if result["rank"] == 0 and result.get("task") == "segmentation":
        _print_segmentation_result(result)
    elif result["rank"] == 0 and result.get("task") == "detection":
        _print_detection_result(result)
    elif result["rank"] == 0 and result.get("task") == "depth":
        final, best = result["final"] or {}, result["best_record"] or {}
        print(f"trained {_epochs(final.get('epoch', 0))}: val AbsRel {final.get('abs_rel', float('nan')):.4f}, RMSE "
              f"{final.get('rmse', float('nan')):.4f}, delta1 {final.get('delta1', float('nan')):.4f} (best delta1 "
              f"{best.get('delta1', 0):.4f} at epoch {result['best_epoch']})")
        print(f"checkpoints: {result['last']} and {result['best']}")
        print(f"metrics: {result['metrics']}; curves: {result['curves']}")
    elif result["rank"] == 0:
        final = result["final"] or {}
        print(f"trained {_epochs(final.get('epoch', 0))}: val top-1 {final.get('val_top1', float('nan')):.2f}% "
              f"(best {result['best_top1'] or 0:.2f}% at epoch {result['best_epoch']})")
        print(f"checkpoints: {result['last']} and {result['best']}")
        print(f"metrics: {result['metrics']}; curves: {result['curves']}")
    return 0


# ---------------------------------------------------------------------------------------------- demo
@_register
def _add_demo(subparsers) -> None:
    from .demo import DEMO_DEFAULTS

    p = subparsers.add_parser(
        "demo",
        help="offline demo: train PVTv2-B0 on the bundled handwritten digits, evaluate and predict",
        description="Writes scikit-learn's handwritten digits (bundled) as an image folder, trains PVTv2-B0 from "
        "scratch on them, evaluates on held-out digits, predicts a few, and draws the training curves and an "
        "attention map. Needs no network.",
    )
    p.add_argument("--output", "-o", default="pvtv2-demo",
                   help="folder for the dataset, the run and the pictures (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=DEMO_DEFAULTS["epochs"], help="default %(default)s")
    p.add_argument("--image-size", type=int, default=DEMO_DEFAULTS["image_size"], help="default %(default)s")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(
        args.output, epochs=args.epochs, image_size=args.image_size, overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(f"held-out accuracy: top-1 {result['val_top1']:.2f}%, top-5 {result['val_top5']:.2f}% "
          f"on {result['num_val']} digits after {_epochs(result['epochs'])} ({result['seconds']:.0f} s)")
    print("predictions on held-out digits:")
    for item in result["predictions"]:
        print(f"  {item['image']}: true {item['true']}, predicted {item['label']} (p={item['probability']:.3f})")
    print(f"dataset:    {result['data']}")
    print(f"checkpoint: {result['best']}  (pvtv2 predict --model {result['best']} IMAGE)")
    print(f"metrics:    {result['metrics']}")
    print(f"curves:     {result['curves']}")
    if result.get("attention"):
        print(f"attention:  {result['attention']}")
    return 0


# ---------------------------------------------------------------------------------------------- inference
def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False)


def _size_pair(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 224 or 160x192, got {text!r}") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 224 or 160x192, got {text!r}")
    return values[0], values[1]


def _check_size(text: str) -> tuple[int, int, int]:
    """BxHxW, HxW or S (batch 1)."""
    parts = text.lower().split("x")
    # ASCII digits only: int() also reads "1_28" as 128, "+64", and digits of other scripts
    if not all(p.isascii() and p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected a size like 224, 160x192 or 2x160x192, got {text!r}")
    values = [int(p) for p in parts]
    if len(values) == 1:
        values = [1, values[0], values[0]]
    elif len(values) == 2:
        values = [1, *values]
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 224, 160x192 or 2x160x192, got {text!r}")
    return values[0], values[1], values[2]


def _add_model_flags(p: argparse.ArgumentParser, batch_help: str = "default: 16") -> None:
    p.add_argument("--model", "-m", required=True,
                   help="trained weights: a save_pretrained folder, a checkpoint file (transformers, timm or original "
                        "layout) or a hub id such as OpenGVLab/pvt_v2_b0")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--batch-size", type=int, default=16, help=f"images per forward pass, 1 to 1024 ({batch_help})")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_preprocess_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preprocess", choices=("transformers", "timm", "original"),
        help="evaluation preprocessing: transformers (resize to the square, bilinear), timm (shorter side to "
             "size/0.9, bicubic, centre crop) or original (size/0.875, bicubic, centre crop: the paper's ImageNet "
             "table). Default: the checkpoint's preprocessor_config.json, else a timm repository's pretrained_cfg, "
             "else its origin's protocol (a timm or "
             "original file), else transformers",
    )


def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",
                   help="what computes the logits: torch (default), or onnxruntime on the CPU (faster there; needs "
                        "pip install 'pvtv2[onnx]'). Labels and preprocessing still come from --model")
    p.add_argument("--bf16", action="store_true",
                   help="with --runtime torch: bfloat16 autocast (fast on GPUs and CPUs with AVX512-BF16 or AMX)")
    p.add_argument("--onnx", metavar="FILE",
                   help="with --runtime onnxruntime: the model's export (pvtv2 export); default: export --model into "
                        "a temporary file, checked against PyTorch")


@_register
def _add_predict(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="top-k classes of images",
        description="Top-k classes and probabilities of image files (folders are searched recursively). Unreadable "
                    "images are reported one by one and skipped; the exit status is then 2.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    _add_model_flags(p)
    p.add_argument("--top-k", "-k", type=int, default=5,
                   help="classes per image, 1 to 1000, at most the model's classes (default: 5)")
    _add_preprocess_flag(p)
    _add_runtime_flags(p)
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from .inference import find_images, load_classifier, load_processor, load_runtime, predict

    _check_range("--top-k", args.top_k, 1, 1000)
    _check_range("--batch-size", args.batch_size, 1, 1024)
    paths = find_images(args.images)
    model = load_classifier(args.model, args.device)
    processor = load_processor(
        args.model, model.config.image_size, args.preprocess, getattr(model, "checkpoint_layout", None)
    )
    runtime = load_runtime(model, args.runtime, args.onnx, model_source=args.model, bf16=args.bf16)
    results = predict(model, processor, paths, args.top_k, args.batch_size, progress=_progress(args), runtime=runtime)
    failed = [r for r in results if r.error is not None]
    if args.json:
        _print_json([r.to_dict() for r in results])
    else:
        for r in results:
            if r.error is not None:
                continue
            _print_file_name(r.image)
            for label, score in zip(r.labels, r.scores):
                print(f"  {score:7.2%}  {label}")
    for r in failed:
        print(f"pvtv2 predict: error: {r.error}", file=sys.stderr)
    if failed:
        print(f"pvtv2 predict: {len(failed)} of {len(results)} image(s) could not be read or predicted", file=sys.stderr)
        return 2
    return 0


def _print_file_name(name: str) -> None:
    """A file name on a line of stdout as the file system spells it. A name whose bytes are not UTF-8 (Python keeps
    them as surrogates) cannot be encoded for a strict UTF-8 stdout (a UTF-8 locale other than C's, or
    PYTHONIOENCODING=utf-8): printed as text, it stopped the command after the images before it, and every result
    after it was lost. It goes out as its own bytes, as ``ls`` prints it."""
    try:
        print(name)
    except UnicodeEncodeError:
        buffer = getattr(sys.stdout, "buffer", None)
        if buffer is None:  # a text-only stream (a StringIO): the name with the undecodable bytes escaped
            print(name.encode("utf-8", "backslashreplace").decode("utf-8"))
            return
        sys.stdout.flush()
        buffer.write(os.fsencode(name) + b"\n")
        buffer.flush()


@_register
def _add_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", aliases=["evaluate"], help="accuracy on an image-folder dataset",
        description="Top-1/top-5 accuracy, mean cross-entropy and images per second on DIR/<class>/*.jpg (or "
                    "DIR/val/<class>/...). Class folder names must be the model's label names; a model with generic "
                    "LABEL_i labels takes folders named LABEL_i as class i, or else the sorted folder names as classes "
                    "0, 1, ... (one folder per class)",
    )
    _add_model_flags(p, batch_help="default: 32; detection: 2")
    p.add_argument("--data", required=True, metavar="DIR", help="dataset folder")
    p.add_argument("--task", choices=("classification", "segmentation", "detection"), default="classification",
                   help="classification (default); segmentation: mean IoU, pixel accuracy and per-class IoU on "
                        "DIR/SPLIT/images/* with DIR/SPLIT/masks/*.png, at each mask's resolution; detection: COCO "
                        "box AP (and mask AP) of a detector on DIR/annotations/instances_val.json + DIR/val/ (batch "
                        "size 2 unless given), the mean over every category with objects, those that are not classes "
                        "of the model included at AP 0 (a warning names them)")
    _add_preprocess_flag(p)
    _add_runtime_flags(p)
    seg = p.add_argument_group("segmentation")
    seg.add_argument("--split", default="val", help="segmentation: the sub-folder of DIR (default: val)")
    seg.add_argument("--size", help="segmentation: model input size, N or HxW, 32 to 2048 (default: the config's "
                     "image_size for --mode whole, each image's own size for --mode slide)")
    seg.add_argument("--reduce-labels", action="store_true",
                     help="segmentation: ADE20K-style masks, 0 = no label and class k + 1 -> k")
    seg.add_argument("--ignore-index", type=int, metavar="N",
                     help="segmentation: the mask value left out of the metrics, 1 to 65535 and above every class index "
                     "(default: the model's semantic_loss_ignore_index, the one it was trained with; 255 unless set)")
    _add_segmentation_inference_flags(seg)
    p.set_defaults(func=_cmd_eval, batch_size=None)


def _cmd_eval(args: argparse.Namespace) -> int:
    from .inference import evaluate, load_classifier, load_processor, load_runtime

    if args.task != "segmentation":
        seg_only = [name for name, used in (("--size", args.size is not None), ("--reduce-labels", args.reduce_labels),
                                            ("--ignore-index", args.ignore_index is not None),
                                            ("--mode slide", args.mode != "whole"), ("--crop", args.crop is not None),
                                            ("--stride", args.stride is not None), ("--scales", args.scales != "1.0"),
                                            ("--flip", args.flip), ("--split", args.split != "val"),
                                            ("--fit", args.fit is not None)) if used]
        if seg_only:
            verb = "applies" if len(seg_only) == 1 else "apply"
            raise ValueError(f"{', '.join(seg_only)} {verb} to --task segmentation only")
    if args.task == "detection":
        if args.preprocess is not None:
            raise ValueError("--preprocess applies to classification only (a detector resizes and normalises its images)")
        return _cmd_eval_detection(args)
    args.batch_size = 32 if args.batch_size is None else args.batch_size
    _check_range("--batch-size", args.batch_size, 1, 1024)
    if args.task == "segmentation":
        return _eval_segmentation(args)
    model = load_classifier(args.model, args.device)
    processor = load_processor(
        args.model, model.config.image_size, args.preprocess, getattr(model, "checkpoint_layout", None)
    )
    runtime = load_runtime(model, args.runtime, args.onnx, model_source=args.model, bf16=args.bf16)
    result = {**evaluate(model, processor, args.data, args.batch_size, progress=_progress(args), runtime=runtime),
              "runtime": args.runtime, "bf16": args.bf16}
    if args.json:
        _print_json(result)
    else:
        print(f"{result['dataset']}: {result['images']} images, {result['classes']} classes, "
              f"{result['preprocess']} preprocessing")
        print(f"  top-1 accuracy  {result['top1']:.2%}")
        print(f"  top-{result['top5_k']} accuracy  {result['top5']:.2%}")
        print(f"  mean loss       {result['loss']:.4f}")
        print(f"  images/s        {result['images_per_second']:.1f} end to end, "
              f"{result['model_images_per_second']:.1f} model only")
    return 0


def _eval_segmentation(args: argparse.Namespace) -> int:
    from .inference import evaluate_segmenter, load_segmenter

    unused = [name for name, used in (("--preprocess", args.preprocess is not None), ("--bf16", args.bf16),
                                      ("--runtime onnxruntime", args.runtime != "torch"), ("--onnx", args.onnx))
              if used]
    if unused:
        verb = "applies" if len(unused) == 1 else "apply"
        raise ValueError(f"{', '.join(unused)} {verb} to --task classification only")
    size = _size_flag(args.size)
    options = _segmentation_inference_flags(args)
    model = load_segmenter(args.model, args.device)
    result = evaluate_segmenter(model, args.data, args.split, size, reduce_labels=args.reduce_labels,
                                ignore_index=args.ignore_index, progress=_progress(args), **options)
    result = {**result, **{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}}
    if args.mode != "slide":  # no windows were used: a crop and stride reported here would be read as the ones used
        result["crop"] = result["stride"] = None
    if args.json:
        _print_json(result)
    else:
        print(f"{result['dataset']}: {result['images']} images, {args.mode} inference"
              + (f", scales {','.join(map(str, options['scales']))}" if options["scales"] != (1.0,) else "")
              + (", flip" if args.flip else "")
              + (f", each image fitted to {options['fit'][0]}x{options['fit'][1]}" if options["fit"] else ""))
        print(f"  mean IoU        {result['mean_iou']:.4f}")
        print(f"  pixel accuracy  {result['pixel_accuracy']:.4f}")
    return 0


@_register
def _add_export(subparsers) -> None:
    from .export import DEFAULT_CHECK_SIZES, DEFAULT_OPSET, EXPORTERS, MAX_OPSET, MIN_OPSET

    default_sizes = " ".join("x".join(map(str, s)) for s in DEFAULT_CHECK_SIZES)
    p = subparsers.add_parser(
        "export", help="export to ONNX (dynamic batch and image size), checked with onnxruntime",
        description="Export to ONNX with dynamic batch, height and width, then compare onnxruntime with PyTorch at "
                    "several input sizes; the file is written only when all match.",
    )
    p.add_argument("--model", "-m", required=True,
                   help="folder, checkpoint file, hub id, or a preset name (random weights): a classifier exports "
                        "logits, a segmentation model logits (B, K, H/4, W/4), a depth model predicted_depth "
                        "(input sides multiples of 32); weights without a head export the encoder (output "
                        "last_hidden_state); detection models are not exported")
    p.add_argument("--output", "-o", required=True,
                   help="the .onnx file to write; an existing file is replaced only by an export that passed its "
                        "checks, and left as it was on any failure")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default: {DEFAULT_OPSET})")
    p.add_argument("--exporter", choices=EXPORTERS, default="auto",
                   help="torchscript (dynamo=False, fast), dynamo, or auto: torchscript then dynamo (default)")
    p.add_argument("--check-sizes", nargs="+", type=_check_size, metavar="BxHxW", default=DEFAULT_CHECK_SIZES,
                   help=f"input sizes to check, batch up to 64, sides up to 4096 (default: {default_sizes}; for a "
                        f"depth model, whose sides must be multiples of 32, 1x96x128 in place of the last)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison (excludes --check-sizes)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_export)


def _load_any(source: str):
    """A classifier from weights, or an untrained one from a preset name."""
    from .models.config import PvtV2Config, is_preset_name
    from .models.modeling import PvtV2ForImageClassification

    if is_preset_name(source):
        logger.warning("%s is a preset: using random weights", source)
        return PvtV2ForImageClassification(PvtV2Config.from_preset(source)).eval()
    return PvtV2ForImageClassification.from_pretrained(source)


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import DEFAULT_CHECK_SIZES, MAX_OPSET, MIN_OPSET, export_onnx, load_export_model
    from .models.config import is_preset_name
    from .training.config import MAX_IMAGE_SIDE

    if args.no_check and args.check_sizes is not DEFAULT_CHECK_SIZES:  # the sizes asked for were dropped unchecked
        raise ValueError("--no-check and --check-sizes exclude each other: --no-check skips the comparison the sizes "
                         "are for; pass one")
    for size in args.check_sizes:
        _check_range("--check-sizes batch", size[0], 1, 64)
        _check_range("--check-sizes height and width", max(size[1:]), 1, MAX_IMAGE_SIDE)
    _check_range("--opset", args.opset, MIN_OPSET, MAX_OPSET)
    if not args.output.lower().endswith(".onnx"):  # a .txt or .png name would hide an ONNX model behind it
        raise ValueError(f"--output must be an ONNX file named *.onnx, got {args.output!r}")
    _check_output_file(args.output, example="model.onnx")  # before minutes of loading and exporting
    if os.path.isfile(args.model) and os.path.exists(args.output) and os.path.samefile(args.model, args.output):
        raise ValueError(f"--output {args.output!r} is the --model checkpoint itself: the export would replace the "
                         f"weights it is made from; give another file name")
    # From weights: what the checkpoint holds (a classifier, a segmentation or depth model; a head-less one exports
    # its encoder), never a random head.
    preset = is_preset_name(args.model)
    model = _load_any(args.model) if preset else load_export_model(args.model)
    result = export_onnx(model, args.output, opset=args.opset, exporter=args.exporter,
                         check_sizes=None if args.no_check else args.check_sizes)
    if args.json:
        _print_json(dict(result.to_dict(), random_weights=preset))
        return 0
    outputs = ", ".join(repr(n) for n in result.output_names)
    print(f"wrote {result.path} ({result.exporter} exporter, opset {result.opset}, output {outputs}, "
          f"dynamic batch/height/width)" + (f"; RANDOM weights: {args.model} is a preset name, not a checkpoint"
                                            if preset else ""))
    if result.pools_replaced:
        print(f"  {result.pools_replaced} AdaptiveAvgPool2d layer(s) of linear attention exported as size-independent "
              f"matrix products: every input size is supported")
    for c in result.checks:
        print(f"  checked {'x'.join(map(str, c.shape))}: max abs diff {c.max_abs_diff:.2e} (tolerance {c.tolerance:.1e})")
    if not result.checks:
        print("  not checked against PyTorch (--no-check)")
    return 0


@_register
def _add_info(subparsers) -> None:
    p = subparsers.add_parser(
        "info", aliases=["inspect"], help="architecture, parameters and multiply-adds",
        description="Per-stage architecture, output sizes, parameter count and compute. Compute is counted in "
                    "multiply-adds (GMACs), the unit the PVTv2 paper reports as GFLOPs.",
    )
    p.add_argument("model", metavar="MODEL",
                   help="preset name (e.g. pvt_v2_b0), config.json, folder, checkpoint file or hub id")
    p.add_argument("--image-size", type=_size_pair, default=(224, 224), metavar="S|HxW",
                   help="input size for output shapes and compute, sides up to 4096 (default: 224)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .export import load_task_model
    from .flops import format_summary, model_summary
    from .models.modeling import PvtV2ForImageClassification
    from .training.config import MAX_IMAGE_SIDE
    from .training.engine import new_architecture

    _check_range("--image-size height and width", max(args.image_size), 1, MAX_IMAGE_SIDE)
    # A preset, or a config.json as `pvtv2 train --model` takes one (it was read as a PyTorch checkpoint, "corrupt").
    config = new_architecture(args.model)
    if config is not None:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = PvtV2ForImageClassification(config)
    else:
        # The model the checkpoint holds (a segmentation or depth model with its head: it was shown as a classifier
        # with a new head, and the head's parameters and compute left out), counted on the meta device too: the
        # count needs shapes, not values, so any --image-size costs no memory. A detector's forward pass (NMS) cannot
        # run on shapes alone: its encoder is shown.
        model = load_task_model(args.model).to("meta")
        detector = hasattr(model, "detector")
        if detector:
            model = model.pvt_v2
    summary = model_summary(model, args.image_size, name=args.model)
    if config is None and detector:
        summary["class"] = "PvtV2ForObjectDetection (its encoder; the FPN and heads are not counted)"
        # what decides the detections: the classes, the detector and whose arithmetic it follows
        summary["num_labels"] = model.config.num_labels
        summary["detector"] = model.config.detector
        summary["detection_convention"] = model.config.detection_convention
    if hasattr(model, "head_type"):  # SegFormer's or Semantic FPN: the class alone did not tell them apart
        summary["decode_head"] = model.head_type
    if args.json:
        _print_json(summary)
    else:
        print(format_summary(summary))
    return 0


@_register
def _add_convert(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a checkpoint to a save_pretrained folder or another layout",
        description="Read a checkpoint in any supported layout (file, folder or hub id) and write a save_pretrained "
                    "folder (loads in transformers), or with --layout a single file in that layout.",
    )
    p.add_argument("source", metavar="SRC", help="checkpoint file, folder or hub id")
    p.add_argument("output", metavar="OUT", help="output folder (or *.safetensors / *.pth / *.pt / *.bin file with --layout); an "
                   "existing one is replaced only if it is a checkpoint")
    p.add_argument("--layout", choices=("transformers", "timm", "original"),
                   help="write one weights file in this layout instead of a folder (safetensors for .safetensors, a "
                        "PyTorch checkpoint for .pth, .pt, .bin)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from .export import convert_checkpoint

    info = convert_checkpoint(args.source, args.output, args.layout)
    if args.json:
        _print_json(info)
    else:
        print(f"wrote {info['output']} ({info['layout']}; {info['model']}, {info['parameters']:,} parameters)")
    return 0


@_register
def _add_visualize(subparsers) -> None:
    p = subparsers.add_parser(
        "visualize", help="attention maps of each stage over an image",
        description="Draw the image beside one heat map per stage: how much attention each key position receives "
                    "in the stage's last block, averaged over heads and queries.",
    )
    p.add_argument("image", metavar="IMAGE", help="image file")
    p.add_argument("--model", "-m", required=True, help="folder, checkpoint file, hub id, or a preset name (random weights)")
    p.add_argument("--output", "-o", required=True, help="PNG file to write")
    p.add_argument("--panel-size", type=int, default=224, help="pixels per panel, 32 to 1024 (default: 224)")
    p.add_argument("--size", help="model input size, N or HxW, 32 to 2048: the image resized to it (no crop; the "
                   "checkpoint's resampling and normalisation, ImageNet's for a preset); small inputs leave a stage a "
                   "single key and nothing to show (default: the checkpoint's preprocessing, else its image_size)")
    p.set_defaults(func=_cmd_visualize)


def _cmd_visualize(args: argparse.Namespace) -> int:
    from .data.processing import PvtV2ImageProcessor, load_image
    from .inference import load_processor
    from .models.config import is_preset_name
    from .visualize import PANEL_SIZES, attention_figure

    _check_range("--panel-size", args.panel_size, *PANEL_SIZES)
    size = _size_flag(args.size)
    _check_output_file(args.output, inputs=[args.image])
    image = load_image(args.image)
    model = _load_any(args.model)  # the attention maps do not use the head: any weights will do
    processor = None if is_preset_name(args.model) else load_processor(args.model, model.config.image_size)
    if size is not None:
        # --size sets the geometry only: a model trained on other statistics (mean 0.5, say) attends otherwise
        # under ImageNet's, so the checkpoint's resampling, rescaling and normalisation stay.
        kept = {} if processor is None else {
            "resample": processor.resample, "do_rescale": processor.do_rescale,
            "rescale_factor": processor.rescale_factor, "do_normalize": processor.do_normalize,
            "image_mean": processor.image_mean, "image_std": processor.image_std,
        }
        processor = PvtV2ImageProcessor(size={"height": size[0], "width": size[1]}, **kept)
    figure = attention_figure(model, image, processor, panel_size=args.panel_size)
    _save_png(figure, args.output)
    small = image.width < args.panel_size and image.height < args.panel_size
    note = f" (the {image.width}x{image.height} input enlarged, nearest neighbour, to be legible)" if small else ""
    print(f"wrote {args.output} ({figure.width}x{figure.height}){note}")
    return 0


# ---------------------------------------------------------------------------------------------- dense prediction
# --size of segment and depth: the model's input, in pixels per side. Above the bound the first stage's attention
# alone needs gigabytes; below, no PVTv2 stage has a token grid left.
_DENSE_SIZES = (32, 2048)


def _size_flag(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    # Each side in plain digits: empty sides were skipped ("32x" was 32x32, "32x64x" 32x64) and int() takes
    # "32_0" as 320, so a slip of the keyboard ran at a size nobody typed.
    parts = [part.strip() for part in value.lower().replace("x", ",").split(",")]
    if any(part.startswith("-") for part in parts):
        raise ValueError(f"--size must be N or HxW with positive numbers, got {value!r}")
    if len(parts) not in (1, 2) or not all(part.isascii() and part.isdigit() for part in parts):
        raise ValueError(f"--size must be N or HxW (digits, e.g. 512 or 480x640), got {value!r}")
    sizes = [int(part) for part in parts]
    if min(sizes) < 1:
        raise ValueError(f"--size must be N or HxW with positive numbers, got {value!r}")
    low, high = _DENSE_SIZES
    if min(sizes) < low or max(sizes) > high:
        raise ValueError(f"--size must be between {low} and {high} pixels per side, got {value!r}")
    return (sizes[0], sizes[-1])


@_register
def _add_segment(subparsers) -> None:
    p = subparsers.add_parser(
        "segment", help="semantic segmentation of an image (SegFormer head)",
        description="Predict a class for every pixel and write the image with the coloured label map blended over "
                    "it, and a legend of the classes found (names from the model's id2label). An image with a side "
                    "under 256 px is drawn enlarged by a whole factor (nearest neighbour). A model without a trained "
                    "segmentation head (a classification or depth checkpoint) is refused.",
    )
    p.add_argument("image", metavar="IMAGE", help="image file")
    p.add_argument("--model", "-m", required=True, help="segmentation model: folder, checkpoint file or hub id "
                   "(pvtv2 or transformers' SegFormer layout)")
    p.add_argument("--output", "-o", required=True, help="PNG file to write")
    p.add_argument("--size", help="model input size, N or HxW, 32 to 2048 (default: the size the checkpoint's "
                   "preprocessor_config.json fixes, else the config's image_size)")
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the label colours, 0 to 1 (default: 0.5)")
    _add_segmentation_inference_flags(p)
    p.set_defaults(func=_cmd_segment)


def _add_segmentation_inference_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=("whole", "slide"), default="whole",
                   help="whole (default): the image resized to --size in one pass; slide: --crop windows every "
                        "--stride pixels over the image at --size (default: its own size), logits averaged")
    p.add_argument("--crop", type=int, help="slide: window side, 32 to 2048 (default 512)")
    p.add_argument("--stride", type=int, help="slide: step between windows, 1 to --crop (default: two thirds of "
                   "--crop, 341 for 512, as mmsegmentation's configs)")
    p.add_argument("--scales", default="1.0", help="multi-scale testing: comma-separated factors of the input, each "
                   "in (0, 4], e.g. 0.5,0.75,1.0,1.25,1.5,1.75 (default 1.0)")
    p.add_argument("--flip", action="store_true", help="also predict the mirrored image and average")
    p.add_argument("--fit", metavar="LONGxSHORT",
                   help="instead of --size: each image rescaled keeping its aspect ratio to fit LONGxSHORT (longer "
                        "side at most LONG, shorter at most SHORT, each 32 to 2048), then each side up to a multiple "
                        "of 32; the authors' ADE20K test protocol is --fit 2048x512")


def _fit_flag(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    parts = [part.strip() for part in value.lower().split("x")]
    if len(parts) != 2 or not all(part.isascii() and part.isdigit() for part in parts):
        raise ValueError(f"--fit must be LONGxSHORT (digits, e.g. 2048x512), got {value!r}")
    sides = (int(parts[0]), int(parts[1]))
    low, high = _DENSE_SIZES  # as --size: a fitted input is at most 2048 a side (4096 let --scales 4 reach 16384)
    if min(sides) < low or max(sides) > high:
        raise ValueError(f"--fit sides must be between {low} and {high} pixels, got {value!r}")
    return sides


def _segmentation_inference_flags(args: argparse.Namespace) -> dict:
    """The keyword arguments of predict_segmentation, checked before any work."""
    fit = _fit_flag(args.fit)
    if fit is not None and args.size is not None:
        raise ValueError("--fit and --size exclude each other: --fit sizes each image by its own aspect ratio")
    # The windows' flags mean nothing to whole-image inference: given there, they were dropped without a word.
    given = [flag for flag, value in (("--crop", args.crop), ("--stride", args.stride)) if value is not None]
    if given and args.mode != "slide":
        verb = "applies" if len(given) == 1 else "apply"
        raise ValueError(f"{', '.join(given)} {verb} to --mode slide only (--mode whole predicts the image at once)")
    crop = 512 if args.crop is None else args.crop
    _check_range("--crop", crop, *_DENSE_SIZES)
    # The default follows --crop (the 341 of a 512 window): a fixed 341 refused `--crop 64` for a stride not given.
    stride = max(1, crop * 2 // 3) if args.stride is None else args.stride
    _check_range("--stride", stride, 1, crop)
    try:
        scales = tuple(float(v) for v in args.scales.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--scales must be comma-separated numbers, got {args.scales!r}") from None
    if not scales or not all(0 < v <= 4 for v in scales):  # also refuses NaN
        raise ValueError(f"--scales must be numbers in (0, 4], got {args.scales!r}")
    return {"mode": args.mode, "crop": crop, "stride": stride, "scales": scales, "flip": args.flip,
            "fit": fit}


def _cmd_segment(args: argparse.Namespace) -> int:
    from .data.processing import load_image
    from .inference import label_map_names, load_segmenter, predict_segmentation
    from .visualize import display_scale, segmentation_picture

    _check_range("--alpha", args.alpha, 0.0, 1.0)
    size = _size_flag(args.size)
    options = _segmentation_inference_flags(args)
    _check_output_file(args.output, inputs=[args.image])
    image = load_image(args.image).convert("RGB")
    model = load_segmenter(args.model)
    label_map = predict_segmentation(model, image, size, **options)
    names = label_map_names(model.config)  # a one-class model's map holds 0 ("not NAME") and 1 (NAME), not id2label's
    _save_png(segmentation_picture(image, label_map, names, args.alpha), args.output)
    counts = {names.get(int(c), str(c)): int((label_map == c).sum()) for c in set(label_map.flat)}
    note = _enlarged_note(display_scale(image.height, image.width), image.height, image.width)
    print(f"wrote {args.output}{note}; pixels per class: {json.dumps(counts)}")
    return 0


@_register
def _add_depth(subparsers) -> None:
    p = subparsers.add_parser(
        "depth", help="monocular depth of an image (GLPN head)",
        description="Predict a depth map and write it, colour-mapped (viridis, near to far: purple to yellow), "
                    "beside the image. An image with a side under 256 px is drawn enlarged by a whole factor "
                    "(nearest neighbour). A model without a trained depth head is refused.",
    )
    p.add_argument("image", metavar="IMAGE", help="image file")
    p.add_argument("--model", "-m", required=True, help="depth model: folder, checkpoint file or hub id "
                   "(pvtv2 or transformers' GLPN layout)")
    p.add_argument("--output", "-o", required=True, help="PNG file to write")
    p.add_argument("--size", help="model input size, N or HxW, multiples of 32 from 32 to 2048 (default: the size the "
                   "checkpoint's preprocessor_config.json fixes, as a pvtv2 depth run's --image-size; else the image's, "
                   "rounded down; a larger image scaled down to fit 2048)")
    p.set_defaults(func=_cmd_depth)


def _cmd_depth(args: argparse.Namespace) -> int:
    from .data.processing import load_image
    from .inference import checkpoint_input_size, load_depth_estimator, predict_depth
    from .visualize import depth_picture, display_scale

    size = _size_flag(args.size)
    if size is not None and (size[0] % 32 or size[1] % 32):
        # Refused before the model is read, in the flag's words (GLPN's decoder would fail only after loading).
        nearest = "x".join(str(max(32, side // 32 * 32)) for side in size)
        raise ValueError(
            f"--size must be multiples of 32 per side (GLPN's decoder), got {args.size!r}; e.g. {nearest}")
    _check_output_file(args.output, inputs=[args.image])
    image = load_image(args.image).convert("RGB")
    model = load_depth_estimator(args.model)
    if size is None:
        # A pvtv2 depth run evaluated its images resized to --image-size (its preprocessor_config.json): at the
        # image's own size its depth differed from what its metrics describe (AbsRel 0.21 against the run's 0.16 on
        # 96 px rooms trained at 64). GLPN's checkpoints fix no size: their images keep their own, as GLPN does.
        fixed = checkpoint_input_size(args.model)
        size = fixed if fixed is not None and fixed[0] % 32 == 0 and fixed[1] % 32 == 0 else None
    scaled = ""
    high = _DENSE_SIZES[1]
    if size is None and max(image.height, image.width) // 32 * 32 > high:
        # Above --size's bound the first stage's attention alone needs gigabytes: a 12-megapixel photograph ran at
        # its own 4032x3008. It is predicted scaled down to fit the bound, its aspect kept, and the run says so.
        factor = high / max(image.height, image.width)
        size = (max(32, round(image.height * factor) // 32 * 32), max(32, round(image.width * factor) // 32 * 32))
        scaled = f" (predicted at {size[0]}x{size[1]}: at most {high} px per side, as --size)"
    depth = predict_depth(model, image, size)
    _save_png(depth_picture(image, depth), args.output)
    note = _enlarged_note(display_scale(image.height, image.width), image.height, image.width) + scaled
    print(f"wrote {args.output}{note}; depth from {depth.min():.3f} to {depth.max():.3f} "
          f"(max_depth {model.config.max_depth})")
    return 0


def _print_segmentation_result(result: dict) -> None:
    final, best = result["final"] or {}, result["best_record"] or {}
    print(f"trained {_epochs(final.get('epoch', 0))}: val mean IoU {final.get('mean_iou', float('nan')):.4f}, pixel "
          f"accuracy {final.get('pixel_accuracy', float('nan')):.4f} (best mean IoU {best.get('mean_iou', 0):.4f} at "
          f"epoch {result['best_epoch']})")
    print(f"checkpoints: {result['last']} and {result['best']}")
    print(f"metrics: {result['metrics']}; curves: {result['curves']}")


@_register
def _add_train_seg(subparsers) -> None:
    from .training.segmentation import EXAMPLE_RECIPE

    p = subparsers.add_parser(
        "train-seg", help="train a segmentation model on image / mask folders (an alias of pvtv2 train --task "
        "segmentation, with defaults for small data)",
        description="An alias: `pvtv2 train-seg DIR ...` runs `pvtv2 train --task segmentation --data DIR ...` (the "
        "same code and flags), with the shapes example's defaults for the flags not given (a tiny model, 64 px, 8 "
        "epochs, batch 8, lr 2e-3) instead of the ImageNet recipe's. Evaluates mean IoU and pixel accuracy on DIR/val "
        "each epoch; writes OUTPUT/best, OUTPUT/last (resumable), metrics.jsonl and curves.png. Runs under torchrun "
        "like `pvtv2 train`.",
    )
    p.add_argument("data", metavar="DIR", help="folder with train/ and val/ (images/*.png|jpg, masks/*.png)")
    _add_training_flags(p, EXAMPLE_RECIPE)
    p.set_defaults(task="segmentation")  # implied by the command: --resume warns if the stored run is another task


def _demo_resume(run: str) -> str:
    """How an unfinished demo run is continued: the demos have no --resume (they would write their data again), the
    training command has, and finds the run's data and settings in its run.json."""
    import shlex

    return f"continue it with `pvtv2 train --resume --output {shlex.quote(run)}`"


@_register
def _add_demo_seg(subparsers) -> None:
    p = subparsers.add_parser(
        "demo-seg", help="make the synthetic shapes segmentation data (and optionally train on it)",
        description="Write circles, squares and triangles on textured backgrounds with exact masks into "
                    "OUTPUT/data; with --epochs > 0 also train the tiny model on it into OUTPUT/run.",
    )
    p.add_argument("--output", "-o", required=True, help="folder to create")
    p.add_argument("--train", type=int, default=2000, help="training images (default: 2000)")
    p.add_argument("--val", type=int, default=200, help="validation images (default: 200)")
    p.add_argument("--size", type=int, default=64, help="image size in pixels (default: 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=0, help="train for this many epochs afterwards (default: 0, data only)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in OUTPUT/run (with --epochs 0: write OUTPUT/data beside it anyway)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo_seg)


def _cmd_demo_seg(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .data.shapes import make_segmentation_example
    from .training import check_config, train
    from .training.rundir import check_output, check_output_path
    from .training.segmentation import example_config

    from .training.config import MAX_IMAGE_SIDE

    if args.epochs < 0:
        raise ValueError(f"--epochs must be 0 (the data only) or more, got {args.epochs}")
    # Bounded as demo-det's: --val 2147483648 set about writing two billion images before anything else was checked.
    _check_range("--train", args.train, 1, 1_000_000)
    _check_range("--val", args.val, 1, 1_000_000)
    _check_range("--size", args.size, 32, MAX_IMAGE_SIDE)
    _check_demo_seed(args.seed)
    out = Path(args.output)
    cfg = example_config(data=str(out / "data"), output=str(out / "run"), image_size=args.size, epochs=args.epochs,
                         seed=args.seed, overwrite=args.overwrite, progress=not args.no_progress)
    check_output_path(out)  # OUTPUT (or a folder above it) a file: named as such
    if args.epochs > 0:
        check_config(cfg)
    # Before the data is written: a run that would be refused must leave OUTPUT as it was. With --epochs 0 too: the
    # data of a run in OUTPUT/run, rewritten (another --seed or --size), would no longer be the data it was trained on.
    check_output(cfg, continue_with=_demo_resume(cfg.output))
    _check_example_data(out / "data", "segmentation", overwrite=args.overwrite)
    data = make_segmentation_example(out / "data", args.train, args.val, args.size, args.seed)
    print(f"wrote the example to {data}")
    if args.epochs > 0:
        _print_segmentation_result(train(cfg))
    return 0


def _check_example_data(data: os.PathLike, kind: str, *, overwrite: bool) -> None:
    """Refuse an OUTPUT/data that is not an earlier example of ``kind``: the example writes its files over files of the
    same names (``train/images/00000.png``, ``annotations/instances_train.json``) and removes the numbered images past
    its count, so a dataset of one's own kept there was overwritten. With --overwrite, files the example does not
    write are left beside it; a dataset whose labels.json or instances_train.json is not the example's is refused."""
    from pathlib import Path

    data = Path(data)
    if kind == "segmentation":
        from .data.shapes import EXAMPLE_CLASSES

        folders = {"": {"train", "val", "labels.json"}, "train": {"images", "masks"}, "val": {"images", "masks"}}
        marker = data / "labels.json"
        expected = {str(i): name for i, name in enumerate(EXAMPLE_CLASSES)}
    else:
        folders = {"": {"annotations", "train", "val"}, "annotations": {"instances_train.json", "instances_val.json"}}
        marker = data / "annotations" / "instances_train.json"
        expected = None
    image = re.compile(r"[0-9]{5}\.png")
    if not data.is_dir():
        return  # nothing there yet (a file there is named by the write)
    for path in [] if overwrite else sorted(data.rglob("*")):
        parent = path.parent.relative_to(data).as_posix()
        parent = "" if parent == "." else parent
        if path.is_dir() and not path.is_symlink() and path.name in folders.get(parent, ()):
            continue
        if path.is_file() and not path.is_symlink() and (path.name in folders.get(parent, ()) or (
                image.fullmatch(path.name) and parent in ("train", "val", "train/images", "train/masks",
                                                          "val/images", "val/masks"))):
            continue
        raise FileExistsError(f"{str(data)!r} holds {str(path)!r}, which the {kind} example does not write: refusing "
                              f"to write the example over it; choose another --output, or pass --overwrite to write "
                              f"it beside")
    if not marker.is_file():
        return  # an example interrupted before its last file: nothing of anyone else's
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
        ours = content == expected if expected is not None else \
            content.get("info", {}).get("description", "").startswith("pvtv2's detection example")
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise FileExistsError(f"{str(data)!r} holds a dataset that is not the {kind} example ({str(marker)!r}): "
                              f"refusing to write the example over it; choose another --output")


# ---------------------------------------------------------------------------------------------- object detection
def _detection_size(image_size: int | None) -> dict:
    """``--image-size S``: the shorter side S, the longer capped in the original's proportion (800 / 1333)."""
    from .training.config import MAX_IMAGE_SIDE

    if image_size is None:
        return {}
    if image_size < 32:
        raise ValueError(f"--image-size must be at least 32 pixels, got {image_size}")
    if image_size > MAX_IMAGE_SIDE:  # as train --task detection bounds it: 100000 tried to allocate 154 GB
        raise ValueError(f"--image-size must be at most {MAX_IMAGE_SIDE} pixels (the shorter side), got {image_size}")
    return {"min_size": image_size, "max_size": round(image_size * 1333 / 800)}


@_register
def _add_detect(subparsers) -> None:
    p = subparsers.add_parser(
        "detect", help="objects in images: boxes, labels, scores (and masks) drawn or as JSON",
        description="Run a detector (a pvtv2 train --task detection run's best/ or last/, or any save_pretrained "
                    "detector folder) on image files (folders are searched recursively). Boxes are in the pixels of "
                    "the original image. Unreadable images, and ones too small for the encoder, are reported one by "
                    "one and skipped; the exit status is then 2.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument("--model", "-m", required=True, help="a trained detector: save_pretrained folder or hub id")
    p.add_argument("--score-threshold", type=float, default=0.3, help="smallest score shown (default: 0.3)")
    p.add_argument("--output", "-o", help="PNG file to draw the detections of one image into")
    p.add_argument("--output-dir", help="folder to draw every image's detections into (NAME.png each)")
    p.add_argument("--image-size", type=int, help="shorter side the detector resizes to, 32 to 4096 (default: the model's)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--batch-size", type=int, default=2, help="images per forward pass, 1 to 1024 (default: 2)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_detect)


def _cmd_detect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .data.processing import load_image
    from .inference import detect_objects, find_images, load_detector
    from .visualize import detection_picture

    if args.output and args.output_dir:
        raise ValueError("--output (one image) and --output-dir (every image) exclude each other: pass one")
    _check_range("--batch-size", args.batch_size, 1, 1024)
    # detect_objects refused these only after the detector was loaded (a hub id downloaded first); the size after
    # the images were listed.
    _check_range("--score-threshold", args.score_threshold, 0, 1)
    size = _detection_size(args.image_size)
    # Checked before any work, as segment's and depth's outputs: they were found unwritable only after detecting.
    if args.output:
        _check_output_file(args.output)
    if args.output_dir:
        from .fileio import path_kind

        kind = path_kind(args.output_dir)
        if kind not in ("folder", "nothing"):
            raise ValueError(f"--output-dir {args.output_dir!r} is a {kind}, not a folder")
    paths = find_images(args.images)
    if args.output and len(paths) > 1:
        raise ValueError(f"--output draws one image, but {len(paths)} were given: use --output-dir DIR")
    if args.output:
        _check_output_file(args.output, inputs=paths)
    # The detector's own threshold (the config's, 0.05) dropped lower scores before --score-threshold saw them:
    # it is set to the flag's (the same detections at or above any threshold, NMS being greedy by score).
    model = load_detector(args.model, args.device, score_threshold=args.score_threshold, **size)
    if args.json and model.config.detector == "mask_rcnn":
        # --json writes the masks as COCO RLE: without pycocotools that failed after every image was detected (and
        # --output-dir's pictures drawn), naming "COCO data and metrics"
        from .runtime import import_optional

        import_optional("pycocotools.mask", "detection", "detect --json (mask_rcnn's masks as COCO RLE)")
    results = detect_objects(model, paths, args.score_threshold, args.batch_size, progress=_progress(args), bf16=args.bf16)
    failed = [r for r in results if r.error is not None]
    targets: dict[str, str] = {}
    if args.output:
        targets = {results[0].image: args.output} if not failed else {}
    elif args.output_dir:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        used: set[str] = set()
        for r in results:
            if r.error is None:
                stem, n = Path(r.image).stem, 1
                name = f"{stem}.png"
                while name in used:  # two images of the same name from different folders
                    n += 1
                    name = f"{stem}-{n}.png"
                used.add(name)
                targets[r.image] = str(Path(args.output_dir) / name)
                _check_output_file(targets[r.image], args.output_dir, inputs=paths)
    for r in results:
        if r.image in targets:
            picture = detection_picture(load_image(r.image), r.boxes, r.labels, r.scores, model.config.id2label, r.masks)
            _save_png(picture, targets[r.image])
    if args.json:
        _print_json([dict(r.to_dict(), **({"picture": targets[r.image]} if r.image in targets else {})) for r in results])
    else:
        for r in results:
            if r.error is not None:
                continue
            drawn = f" -> {targets[r.image]}" if r.image in targets else ""
            print(f"{r.image}: {len(r.boxes)} object(s) with score >= {args.score_threshold:g}{drawn}")
            for name, score, box in zip(r.names, r.scores, r.boxes):
                print(f"  {score:6.3f}  {name:<20} [{', '.join(f'{v:.1f}' for v in box)}]")
    for r in failed:
        print(f"pvtv2 detect: error: {r.error}", file=sys.stderr)
    if failed:
        print(f"pvtv2 detect: {len(failed)} of {len(results)} image(s) could not be read", file=sys.stderr)
        return 2
    return 0


def _cmd_eval_detection(args: argparse.Namespace) -> int:
    from .inference import evaluate_detector, load_detector

    if args.runtime != "torch" or args.onnx:
        raise ValueError("--runtime onnxruntime and --onnx serve classifiers; a detector runs in PyTorch")
    batch_size = 2 if args.batch_size is None else args.batch_size
    _check_range("--batch-size", batch_size, 1, 1024)
    model = load_detector(args.model, args.device)
    result = evaluate_detector(model, args.data, batch_size=batch_size, progress=_progress(args), bf16=args.bf16)
    if args.json:
        _print_json({k: v for k, v in result.items() if k != "summary"})
        return 0
    print(f"{result['dataset']}: {result['images']} images, {result['annotations']} annotations, "
          f"{result['categories']} categories; {result['detections']} detections")
    for kind in ("box", "mask"):
        if kind in result:
            m = result[kind]
            print(f"  {kind} AP {m['AP']:.4f}  AP50 {m['AP50']:.4f}  AP75 {m['AP75']:.4f}  "
                  f"APs {m['APs']:.4f}  APm {m['APm']:.4f}  APl {m['APl']:.4f}")
    print(f"  images/s  {result['images_per_second']:.2f} end to end, {result['model_images_per_second']:.2f} model only")
    if args.verbose:
        for iou_type, text in result["summary"].items():
            print(f"COCOeval ({iou_type}):\n{text}")
    return 0


def _print_detection_result(result: dict) -> None:
    final, best = result["final"] or {}, result["best_record"] or {}
    mask = f", mask AP {final['mask_ap']:.4f}" if "mask_ap" in final else ""
    print(f"trained {_epochs(final.get('epoch', 0))}: val box AP {final.get('box_ap', float('nan')):.4f}, AP50 "
          f"{final.get('box_ap50', float('nan')):.4f}{mask} (best box AP {best.get('box_ap', 0):.4f} at epoch "
          f"{result['best_epoch']})")
    print(f"checkpoints: {result['last']} and {result['best']}")
    print(f"metrics: {result['metrics']}; curves: {result['curves']}")


@_register
def _add_demo_det(subparsers) -> None:
    from .training.detection import EXAMPLE_DATA, EXAMPLE_RECIPE

    p = subparsers.add_parser(
        "demo-det", help="offline detection example: digits on photographs (COCO format), a detector trained on "
        "them, COCO AP and drawn predictions",
        description="Write handwritten digits pasted on photographs (scikit-learn's sample photos when it is "
                    "installed, synthetic textures otherwise) with exact boxes and masks, as a COCO-format dataset "
                    "in OUTPUT/data; then (unless --epochs 0) train a small detector (FCOS by default) from scratch on "
                    "it into OUTPUT/run (pvtv2 train --task detection --model tiny), report its COCO box AP on the "
                    "validation images and draw its detections of a few of them into OUTPUT/predictions/. Needs no "
                    "network.",
    )
    p.add_argument("--output", "-o", required=True, help="folder to create")
    p.add_argument("--train", type=int, default=EXAMPLE_DATA["train"], help="training images (default: %(default)s)")
    p.add_argument("--val", type=int, default=EXAMPLE_DATA["val"], help="validation images (default: %(default)s)")
    p.add_argument("--size", type=int, default=EXAMPLE_RECIPE["image_size"],
                   help="image size in pixels, at least 48 (default: %(default)s)")
    p.add_argument("--backgrounds", choices=("auto", "photos", "synthetic"), default="auto",
                   help="photos (needs scikit-learn), synthetic, or auto: photos when available (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=EXAMPLE_RECIPE["epochs"],
                   help="training epochs; 0: the data only (default: %(default)s)")
    p.add_argument("--detector", choices=("retinanet", "faster_rcnn", "mask_rcnn", "fcos"),
                   default=EXAMPLE_RECIPE["detector"], help="default: %(default)s")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in OUTPUT/run (with --epochs 0: write OUTPUT/data beside it anyway)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo_det)


def _cmd_demo_det(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from .data.digit_scenes import make_detection_example
    from .training import check_config, train
    from .training.config import MAX_IMAGE_SIDE
    from .training.detection import example_config
    from .training.rundir import check_output, check_output_path

    _check_range("--train", args.train, 1, 1_000_000)
    _check_range("--val", args.val, 1, 1_000_000)
    _check_range("--size", args.size, 48, MAX_IMAGE_SIDE)
    _check_range("--epochs", args.epochs, 0, 10_000)
    _check_demo_seed(args.seed)
    out = Path(args.output)
    cfg = example_config(data=str(out / "data"), output=str(out / "run"), image_size=args.size, epochs=args.epochs,
                         seed=args.seed, detector=args.detector, overwrite=args.overwrite, progress=not args.no_progress)
    check_output_path(out)  # OUTPUT (or a folder above it) a file: named as such
    if args.epochs > 0:
        check_config(cfg)
    # As demo-seg: a run in OUTPUT/run is refused before anything is written, for --epochs 0 (the data alone) too.
    check_output(cfg, continue_with=_demo_resume(cfg.output))
    _check_example_data(out / "data", "detection", overwrite=args.overwrite)
    began = time.perf_counter()
    data = make_detection_example(out / "data", args.train, args.val, args.size, args.seed,
                                  backgrounds=args.backgrounds)
    print(f"wrote the example to {data}")
    if args.epochs == 0:
        return 0
    result = train(cfg)
    _print_detection_result(result)
    pictures = _draw_demo_predictions(result["best"], sorted((data / "val").glob("*.png"))[:4], out / "predictions")
    print(f"predictions: {', '.join(pictures)}")
    print(f"total time: {time.perf_counter() - began:.0f} s")
    return 0


def _draw_demo_predictions(model_dir: str, images: list, folder) -> list[str]:
    from pathlib import Path

    from .data.processing import load_image
    from .inference import detect_objects, load_detector
    from .visualize import detection_picture

    import numpy as np
    import PIL.Image

    model = load_detector(model_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for r in detect_objects(model, images, score_threshold=0.3, batch_size=4):
        target = str(folder / f"{Path(r.image).stem}.png")
        image = load_image(r.image)
        # The example's images are small (96 px): drawn enlarged, so that the captions leave the digits visible.
        k = max(1, 384 // min(image.size))
        image = image.resize((image.width * k, image.height * k), PIL.Image.Resampling.NEAREST)
        masks = None if r.masks is None else np.repeat(np.repeat(r.masks, k, axis=1), k, axis=2)
        _save_png(detection_picture(image, np.asarray(r.boxes) * k, r.labels, r.scores, model.config.id2label, masks),
                  target)
        written.append(target)
    return written


def _unknown_flags_message(parser: argparse.ArgumentParser, command: str, extras: list[str]) -> str:
    """One line for flags the command does not have, each with its nearest real flag (``--topk``: ``--top-k``)."""
    import difflib

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    own = {option for action in sub._actions for option in action.option_strings}
    # pvtv2's own options (--verbose) are read before the command only: after it they are unknown to the command,
    # whose --help does not list them.
    before = {option for action in parser._actions for option in action.option_strings} - own
    known = sorted(option for option in own | before if option.startswith("--"))
    parts = []
    for extra in extras:
        name = extra.split("=", 1)[0]
        if name in before:
            parts.append(f"{extra} (an option of pvtv2 itself: give it before the command, pvtv2 {name} {command} ...)")
            continue
        words = sorted(name.strip("-").replace("_", "-").split("-"))
        # The same words in another order first (--lr-min: --min-lr), then the nearest spelling (--topk: --top-k);
        # nothing for a name of dashes alone ("---" is no near miss of anything).
        close = [option for option in known if sorted(option.strip("-").split("-")) == words][:1]
        # Spellings compared without the leading dashes, which every flag shares: with them, eval's --task passed
        # for a near miss of --top-k (a flag of predict).
        bare = {option.lstrip("-"): option for option in known}
        near = difflib.get_close_matches(name.lstrip("-").replace("_", "-"), list(bare), n=1, cutoff=0.6)
        close = close or [bare[option] for option in near]
        if not (close and name.startswith("-") and name.strip("-")):
            parts.append(extra)
        elif close[0] in before:
            parts.append(f"{extra} (did you mean {close[0]}? an option of pvtv2 itself, given before the command)")
        else:
            parts.append(f"{extra} (did you mean {close[0]}?)")
    return f"unrecognized arguments: {' '.join(parts)}; see pvtv2 {command} --help"


def _answer_to_alias(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """The command typed by another of its names (``finetune``, ``evaluate``, ``inspect``) answers to that name in
    argparse's own usage lines and errors, which otherwise named the main one ("pvtv2 train: error: ...")."""
    commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    typed = next((a for a in argv if not a.startswith("-")), None)
    if typed in commands:
        commands[typed].prog = f"{parser.prog} {typed}"


def _later_images(parser: argparse.ArgumentParser, args: argparse.Namespace, extras: list[str]) -> list[str]:
    """Add to ``args.images`` the IMAGE words argparse left over (it takes one run of them: in `predict a.jpg
    --model M b/` it left b/ and called it an unrecognized argument); the words it leaves are returned, to be
    reported as unrecognized, when an unknown flag is among them. The run taken is the first one typed, so the words
    left over follow it in order. Every word after `--` is an IMAGE (`predict a.png -m M -- -b.png`), as it is where
    argparse takes the run after it; each is read as the IMAGE argument reads its words (`~` expanded, an empty one
    refused by name), which argparse did not do for them."""
    cut = extras.index("--") if "--" in extras else len(extras)
    if any(word.startswith("-") for word in extras[:cut]):
        return extras
    command = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    for word in extras[:cut] + extras[cut + 1:]:
        try:
            args.images.append(_user_path(word))
        except argparse.ArgumentTypeError as err:
            command.error(f"argument IMAGE: {err}")  # as argparse reports one in the first run: usage, status 2
    return []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Read twice (the alias, then argparse): a generator was consumed up to the command, argparse got the rest.
    argv = None if argv is None else list(argv)
    _answer_to_alias(parser, sys.argv[1:] if argv is None else argv)
    args, extras = parser.parse_known_args(argv)
    if extras and isinstance(getattr(args, "images", None), list):
        extras = _later_images(parser, args, extras)
    if extras:
        # argparse would name the top-level parser ("pvtv2: error: unrecognized arguments: --topk") under the
        # top-level usage; the command's name and the flag it probably meant help more.
        print(f"pvtv2 {args.command}: error: {_unknown_flags_message(parser, args.command, extras)}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        # Offline, huggingface_hub logs each of its retries twice (its own handler and ours): 22 lines before the
        # one-line error that says the hub could not be reached. -v shows them. huggingface_hub sets its logger's
        # level from HF_HUB_VERBOSITY when it is first imported (a user's own value is kept), so both are set.
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    from .runtime import tune_from_environment

    tune_from_environment()  # this process only; PVTV2_TUNE_MALLOC=0 leaves malloc as it is
    with _exit_on_sigterm(args.func):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # The reader of our output went away (`pvtv2 info MODEL | head -3`): stop quietly, as shell tools do. Python
        # would report the pipe again when it flushes stdout at exit, so stdout is pointed at the null device.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, the status a shell reports for a tool its pipe stopped
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, OSError) as err:
        # Errors meant for people: print them without a traceback (use -v for one).
        if args.verbose:
            raise
        print(f"pvtv2 {args.command}: error: {_worker_error_message(err)}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as err:
        # Out of memory while building or running a model (an absurd config, a batch too large for the device):
        # one line naming it, not the allocator's traceback. Any other RuntimeError is a bug: let it show.
        if args.verbose or not _is_out_of_memory(err):
            raise
        print(f"pvtv2 {args.command}: error: not enough memory to build or run the model: {_memory_reason(err)}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pvtv2 {args.command}: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _exit_on_sigterm(func) -> Iterator[None]:
    """SIGTERM (kill, a scheduler's time limit) ends a command as Ctrl-C does, through every ``finally``: its default
    action ended the process at once, leaving an export's hidden temporary file (named by its pid, so no later export
    removes it), a temporary folder of convert, or the temporary export of --runtime onnxruntime. The process exits
    with status 143, as the signal's would. Training sets its own handler (the run stops at a safe point)."""
    import signal
    import threading

    if func in (_cmd_train, _cmd_demo, _cmd_demo_seg, _cmd_demo_det) or \
            threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _worker_error_message(err: BaseException) -> str:
    """The message of ``err``; for an error a DataLoader worker process raised (a mask or image it could not take),
    the worker's own message: torch re-raises it as "Caught ValueError in DataLoader worker process 0." followed by
    the worker's whole traceback, which the command printed as its one-line error (with --workers, the default on a
    GPU)."""
    text = str(err)
    if not (text.startswith("Caught ") and " in DataLoader worker process " in text and "\nOriginal Traceback" in text):
        return text
    # The traceback ends with "[module.]Name: message" (the message may run over several lines).
    lines = text.splitlines()
    head = re.compile(rf"^(?:[\w.]+\.)?{re.escape(type(err).__name__)}: ")
    for i in range(len(lines) - 1, -1, -1):
        if head.match(lines[i]):
            return "\n".join([head.sub("", lines[i], count=1), *lines[i + 1:]]).strip()
    return text


def _is_out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(err)


def _memory_reason(err: BaseException) -> str:
    """The allocator's own words in one line: CPU "you tried to allocate N bytes", CUDA "Tried to allocate N GiB"."""
    text = " ".join(str(err).split())
    for marker in ("can't allocate memory: ", "CUDA out of memory. "):
        if marker in text:
            text = text.split(marker, 1)[1]
    text = text.split(" Error code ")[0].split(" If reserved ")[0].split(" GPU ")[0]
    return text or type(err).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
