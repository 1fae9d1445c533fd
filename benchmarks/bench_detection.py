"""Detection speed: pvtv2's detectors beside the same torchvision detector on timm's PVTv2 (``features_only``), with
identical weights, at the original input scale (800 x 1333), on this machine.

    python benchmarks/bench_detection.py                                 # RetinaNet and Mask R-CNN, B0 and B2
    python benchmarks/bench_detection.py --cases retinanet:pvt_v2_b0     # the smallest case only
    python benchmarks/bench_detection.py --threads 2 --repeats 10 --output benchmarks/results_detection.json

For each case the two detectors share every weight: the FPN and heads are one torchvision module (deep-copied), and
timm's encoder gets ours through ``pvtv2.weights.layouts.convert_state_dict(..., "timm")``. They are timed in turn,
repeat after repeat, so that a slow moment of a shared machine hits both alike: whole-detector images/s (batch 1,
eval, no autograd; pvtv2's weights packed for the fast path, as ``pvtv2 detect`` does) and the encoder alone on the
same normalised, padded batch, which shows the backbone's share of the detector's time. Weights are random (the
detectors' own initialisation, 80 classes), so RetinaNet's and the R-CNNs' post-processing sees fewer candidates than
a trained model's would; the backbone times do not depend on it. Memory: each (implementation, case) runs once more
in a fresh subprocess holding that implementation only; after a small first pass (one-time buffers, packed
weights), the high-water mark is reset (``/proc/self/clear_refs``) and one 800 x 1333 pass reports its peak resident
set size (``VmHWM``) and that peak minus the resident size before the pass: what the forward pass itself needs
(Linux only).

Writes JSON (``--output``) with every time, and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import bench  # the comparison script beside this one: its CPU name
import torch
from torch import nn

IMPLS = ("pvtv2", "timm")
DEFAULT_CASES = ("retinanet:pvt_v2_b0", "retinanet:pvt_v2_b2", "mask_rcnn:pvt_v2_b0", "mask_rcnn:pvt_v2_b2")
SIZE = (800, 1333)  # the original's test scale: shorter side 800, longer at most 1333


class TimmFeatures(nn.Module):
    """timm's PVTv2 (``features_only``) feeding torchvision's FPN: a drop-in for pvtv2's detector backbone."""

    def __init__(self, body: nn.Module, fpn: nn.Module, stages: list[int]) -> None:
        super().__init__()
        self.body, self.fpn, self.stages = body, fpn, stages
        self.out_channels = fpn.layer_blocks[0].out_channels

    def forward(self, x):
        maps = self.body(x)
        return self.fpn(OrderedDict((str(n), maps[s - 1]) for n, s in enumerate(self.stages)))


def build(case: str, seed: int = 0) -> dict[str, dict]:
    """Both implementations of ``case`` (``detector:preset``): the whole detector and its encoder."""
    import timm

    from pvtv2 import PvtV2Config, fast
    from pvtv2.models.detection import PvtV2ForObjectDetection
    from pvtv2.weights.layouts import convert_state_dict

    detector, preset = case.split(":")
    # timm's encoder uses PyTorch's LayerNorm epsilon after the patch embeddings and the reduction, as the original.
    config = PvtV2Config.from_preset(preset, num_labels=80, detector=detector, patch_embed_layer_norm_eps=1e-5,
                                     reduction_layer_norm_eps=1e-5)
    torch.manual_seed(seed)
    ours = PvtV2ForObjectDetection(config).eval()
    fast.freeze(ours)
    body = timm.create_model(preset, pretrained=False, features_only=True).eval()
    state = convert_state_dict(ours.pvt_v2.state_dict(), "timm")
    body.load_state_dict({k.replace("stages.", "stages_", 1): v for k, v in state.items()}, strict=True)
    twin = copy.deepcopy(ours.detector)
    twin.backbone = TimmFeatures(body, twin.backbone.fpn, ours.config.fpn_stages)
    twin.eval()
    return {
        "pvtv2": {"detector": ours, "encoder": lambda x: ours.pvt_v2(x, output_hidden_states=True).hidden_states},
        "timm": {"detector": twin, "encoder": body},
    }


def _normalised_batch(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The detector's own transform of one image: resized, normalised, padded to a multiple of 32."""
    with torch.no_grad():
        return model.transform([image])[0].tensors


def measure_speed(case: str, repeats: int, warmup: int) -> dict:
    models = build(case)
    image = torch.rand(3, *SIZE, generator=torch.Generator().manual_seed(0))
    batch = _normalised_batch(models["timm"]["detector"], image)
    with torch.no_grad():
        a = models["pvtv2"]["encoder"](batch)
        b = models["timm"]["encoder"](batch)
        agreement = max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b))
    times: dict[str, dict[str, list[float]]] = {i: {"detector": [], "encoder": []} for i in IMPLS}
    with torch.no_grad():
        for round_ in range(warmup + repeats):
            for impl in IMPLS:
                for part, fn, arg in (("detector", models[impl]["detector"], [image]), ("encoder", models[impl]["encoder"], batch)):
                    t0 = time.perf_counter()
                    fn(arg)
                    if round_ >= warmup:
                        times[impl][part].append(time.perf_counter() - t0)
    row: dict = {"case": case, "input": list(batch.shape), "encoder_max_rel_diff": agreement, "times": times}
    for impl in IMPLS:
        det, enc = statistics.median(times[impl]["detector"]), statistics.median(times[impl]["encoder"])
        row[impl] = {
            "images_per_s": 1.0 / det,
            "best_images_per_s": 1.0 / min(times[impl]["detector"]),
            "detector_ms": det * 1e3,
            "encoder_ms": enc * 1e3,
            "encoder_share": enc / det,
        }
    row["paired_ratio"] = statistics.median(
        t / p for p, t in zip(times["pvtv2"]["detector"], times["timm"]["detector"])
    )  # > 1: pvtv2 faster
    row["paired_encoder_ratio"] = statistics.median(
        t / p for p, t in zip(times["pvtv2"]["encoder"], times["timm"]["encoder"])
    )
    return row


def _memory_worker(case: str, impl: str) -> None:
    import gc

    models = build(case)
    model = models.pop(impl)["detector"]
    models.clear()  # the other implementation was needed for its weights only
    gc.collect()

    def rss_mb(field: str) -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024

    with torch.no_grad():
        model([torch.rand(3, 64, 64)])  # libraries' one-time buffers, packed weights: loaded by a small pass first
        with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark (VmHWM) to the current RSS
            f.write("5")
        before = rss_mb("VmRSS:")
        model([torch.rand(3, *SIZE)])
    peak = rss_mb("VmHWM:")
    print(json.dumps({"peak_rss_mb": peak, "forward_mb": peak - before}))


def measure_memory(case: str, impl: str, threads: int | None) -> dict[str, float]:
    args = [sys.executable, __file__, "--memory-worker", case, impl]
    if threads:
        args += ["--threads", str(threads)]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="detector:preset (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the results")
    parser.add_argument("--memory-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        _memory_worker(*args.memory_worker)
        return 0
    from pvtv2.runtime import tune_malloc

    tune_malloc()  # as the pvtv2 command does
    rows = []
    for case in args.cases:
        row = measure_speed(case, args.repeats, args.warmup)
        if not args.no_memory:
            for impl in IMPLS:
                row[impl].update(measure_memory(case, impl, args.threads))
        rows.append(row)
        p, t = row["pvtv2"], row["timm"]
        print(
            f"{case:<22} {'x'.join(map(str, row['input'][2:]))}: pvtv2 {p['images_per_s']:.3f} img/s "
            f"(encoder {p['encoder_ms']:.0f} ms, {p['encoder_share']:.0%} of {p['detector_ms']:.0f} ms), "
            f"timm {t['images_per_s']:.3f} img/s (encoder {t['encoder_ms']:.0f} ms, {t['encoder_share']:.0%}); "
            f"paired ratio {row['paired_ratio']:.2f}x (encoder {row['paired_encoder_ratio']:.2f}x)"
            + ("" if args.no_memory else f"; forward pass memory pvtv2 {p['forward_mb']:.0f} MiB (peak RSS "
               f"{p['peak_rss_mb']:.0f}), timm {t['forward_mb']:.0f} MiB ({t['peak_rss_mb']:.0f})"),
            flush=True,
        )
    result = {
        "machine": {"cpu": bench._cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "repeats": args.repeats,
        "warmup": args.warmup,
        "rows": rows,
    }
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
