"""Compare pvtv2 with timm and transformers on one GPU: inference, high resolution, a training step, peak memory.

    python benchmarks/bench_gpu.py --output benchmarks/gpu_h100        # on a CUDA machine: at most 8 minutes
    python benchmarks/bench_gpu.py --dry-run --output /tmp/bench_gpu    # the whole script on CPU at tiny sizes

The cases, in the order they run (a time budget, ``--budget-s``, skips what does not fit and records it as skipped,
so the script ends within 8 minutes on one GPU; the most asked-for figures come first):

1. classifier at 224, B0/B2/B5, batch 1, 64 and 256, bf16 autocast, eager;
2. the same under ``torch.compile`` (B2, batch 64 and 256; batch 1 with ``mode="reduce-overhead"``, CUDA graphs);
3. a B2 training step (forward, cross-entropy, backward, AdamW) at batch 64 under bf16 autocast;
4. classifier at 224 in fp32 (IEEE: no TF32 in matmuls or convolutions) and with TF32, eager;
5. the B2 backbone at 512 and 1024, batch 1, bf16 autocast and fp32;
6. ``torch.compile`` of B0 and B5 (batch 64 and 256, bf16);
7. the B2 training step of a compiled model (default mode, then ``mode="reduce-overhead"``).

Method (as ``benchmarks/bench.py``): the three implementations hold the same weights (transformers' random weights
loaded into ours and, converted, into timm's) in one process and run in turn, call after call; CUDA events time each
call, with the GPU synchronised between calls so that no two overlap. Per implementation: the best and the median
call; against timm and transformers: the ratio of the medians and the paired ratio, the median over rounds of the
ratio within a round. Memory: the peak of ``torch.cuda.max_memory_allocated`` during one more call minus what was
allocated before it, i.e. what the call needs beyond the weights (activations, workspaces; for training also the
gradients). Numbers: each inference case compares every implementation's output with transformers' in fp32 (IEEE) on
the same images, and the training case records each implementation's first loss. The GEMM peak of the card (a large
matmul in fp32, TF32 and bf16) is measured too, and every case reports its share of it (the model's multiply-adds,
counted by ``pvtv2.flops``, times images per second).

``--dry-run`` runs all of this on the CPU with a tiny model at 64x64 pixels, batch 1 and 2, ``torch.compile`` with
the ``eager`` backend: for CI, so that the script on a GPU machine does not fail on its first call.

Writes ``results.json`` and ``results.png`` into ``--output`` (a folder).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # the CPU comparison script beside this one: model building, table, chart

# pvtv2_ref: pvtv2's model with its fast path off (the reference path, the same weights), in eager inference cases.
IMPLS = ("pvtv2", "pvtv2_ref", "transformers", "timm")
BUDGET_S = 420  # of the 8 minutes: no case starts after this (model building and the peak measurement included)
COMPILE_RESERVE_S = 150  # what a compiled case may take (three compilations): none starts later than this before the end
# A tiny architecture for the dry run: every feature of the real ones (several heads, spatial reduction, two blocks).
DRY_CONFIG = dict(depths=[1, 2, 1, 1], hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4],
                  mlp_ratios=[2, 2, 2, 2], num_labels=10)


# ---------------------------------------------------------------------------------------------- plan
def plan(args: argparse.Namespace) -> list[dict]:
    """Every case, in the order of priority in which the time budget takes them."""
    if args.dry_run:
        models, b2, batches, big, size, highres, train_batch = ["tiny"], "tiny", [1, 2], [2], 64, [96, 128], 2
    else:
        models, b2, batches, big, size, highres, train_batch = (
            ["pvt_v2_b0", "pvt_v2_b2", "pvt_v2_b5"], "pvt_v2_b2", [1, 64, 256], [64, 256], 224, [512, 1024], 64
        )

    def case(model, batch, dtype, compile_=False, size=size, backbone=False, train=False) -> dict:
        return dict(model=model, batch=batch, size=size, dtype=dtype, train=train, compile=compile_, backbone=backbone)

    cases = [case(m, b, "bf16") for m in models for b in batches]
    cases += [case(b2, b, "bf16", "default") for b in big]
    if not args.dry_run:  # the same code path as the line above, with inductor's CUDA graphs
        cases += [case(b2, 1, "bf16", "reduce-overhead")]
    cases += [case(b2, train_batch, "bf16", train=True)]
    cases += [case(m, b, dtype) for dtype in ("fp32", "tf32") for m in models for b in batches]
    cases += [case(b2, 1, dtype, size=s, backbone=True) for s in highres for dtype in ("bf16", "fp32")]
    cases += [case(m, b, "bf16", "default") for m in models if m != b2 for b in big]
    # The training step of a compiled model (forward and backward graphs through AOTAutograd), last: three
    # compilations of a forward and a backward graph each.
    cases += [case(b2, train_batch, "bf16", "default", train=True)]
    if not args.dry_run:  # with inductor's CUDA graphs (cudagraph trees record the backward too)
        cases += [case(b2, train_batch, "bf16", "reduce-overhead", train=True)]
    return cases


# ---------------------------------------------------------------------------------------------- device
class Device:
    """What differs between the GPU and the CPU of a dry run: timing, synchronisation, memory, compilation."""

    def __init__(self, dry_run: bool) -> None:
        if not dry_run and not torch.cuda.is_available():
            raise SystemExit("bench_gpu.py: error: no CUDA device here (use --dry-run to run the script on the CPU)")
        self.type = "cpu" if dry_run else "cuda"
        self.device = torch.device(self.type)
        self.dry_run = dry_run

    def sync(self) -> None:
        if self.type == "cuda":
            torch.cuda.synchronize()

    def time_call(self, fn: Callable[[], None]) -> float:
        """Seconds one call takes, from its first launch to the end of its last kernel."""
        if self.type != "cuda":
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def extra_memory_mb(self, fn: Callable[[], None]) -> float | None:
        """The peak memory one call allocates beyond what was allocated before it (GPU only)."""
        if self.type != "cuda":
            return None
        self.sync()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        self.sync()
        return (torch.cuda.max_memory_allocated() - before) / 2**20

    def compile(self, model: nn.Module, mode: str) -> Callable:
        if self.dry_run:  # dynamo's graph capture without inductor's code generation: seconds, not minutes
            return torch.compile(model, backend="eager")
        return torch.compile(model, mode=None if mode == "default" else mode)


@contextlib.contextmanager
def precision(dtype: str, device: Device | torch.device) -> Iterator[None]:
    """fp32: IEEE matmuls and convolutions (cuDNN would use TF32 for convolutions by default); tf32: TF32 in both;
    bf16: autocast over fp32 weights, IEEE for what stays in fp32. Of ``device`` only its ``type`` is read."""
    mode = "tf32" if dtype == "tf32" else "ieee"
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (matmul.fp32_precision, conv.fp32_precision)
    matmul.fp32_precision, conv.fp32_precision = mode, mode
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    try:
        with cast:
            yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


# ---------------------------------------------------------------------------------------------- one case
class ReferencePath(nn.Module):
    """A pvtv2 model run with its fast path off: what the fused kernels are measured against."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        from pvtv2 import fast

        with fast.fast_path(False):
            return self.model(x)


def _outputs(run: Callable, x: torch.Tensor) -> torch.Tensor:
    return bench._output(run(x)).float().clone()  # a clone: CUDA graphs overwrite their outputs on the next replay


def make_step(model: nn.Module, run: Callable, x: torch.Tensor, case: dict, device: Device,
              labels: torch.Tensor | None) -> Callable[[], None]:
    if not case["train"]:
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), precision(case["dtype"], device):
                bench._output(run(x))

        return infer
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with precision(case["dtype"], device):
            loss = nn.functional.cross_entropy(bench._output(run(x)).float(), labels)
        loss.backward()
        optimizer.step()

    return train_step


def run_case(case: dict, models: dict[str, nn.Module], device: Device, args: argparse.Namespace,
             reference: dict) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case["batch"], 3, case["size"], case["size"], generator=gen).to(device.device)
    picked = {}
    for name, m in models.items():
        if name == "pvtv2_ref" and (case["train"] or case["compile"]):
            continue  # the fast path is for eager inference: elsewhere both are the reference path
        if case["compile"] and args.compile_impls and name not in args.compile_impls:
            continue
        if case["backbone"] and name == "timm":
            m = bench._TimmFeatures(m)
        elif case["backbone"]:
            m = ReferencePath(m.model.pvt_v2) if name == "pvtv2_ref" else m.pvt_v2
        picked[name] = m
    runs = {name: device.compile(m, case["compile"]) if case["compile"] else m for name, m in picked.items()}
    labels = torch.randint(0, 10 if args.dry_run else 1000, (case["batch"],), generator=gen).to(device.device)
    row: dict = {"case": case}
    # A training case changes the weights, differently in each implementation: the later cases get them back.
    saved = {name: copy.deepcopy(models[name].state_dict()) for name in picked} if case["train"] else {}
    if case["train"]:
        with torch.no_grad(), precision(case["dtype"], device):  # the first loss, before any step
            row["check"] = {f"first_loss_{name}": nn.functional.cross_entropy(_outputs(run, x), labels).item()
                            for name, run in runs.items()}
    else:
        key = (case["model"], case["backbone"], case["batch"], case["size"])
        if key not in reference:  # transformers in fp32 (IEEE), eager: the reference of every precision
            with torch.inference_mode(), precision("fp32", device):
                hf = models["transformers"].pvt_v2 if case["backbone"] else models["transformers"]
                reference[key] = _outputs(hf.eval(), x)
        want = reference[key]
        row["check"] = {}
        for name, run in runs.items():
            picked[name].eval()
            with torch.inference_mode(), precision(case["dtype"], device):
                got = _outputs(run, x)
            row["check"][f"rel_error_{name}"] = ((got - want).abs().max() / want.abs().max()).item()
    steps = {name: make_step(picked[name], run, x, case, device, labels) for name, run in runs.items()}
    for _ in range(args.warmup):  # compilation, cuDNN's algorithm search, the allocator's growth
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            times[name].append(device.time_call(step))
    row["speed"] = summarise(times, case["batch"])
    row["memory"] = {name: {"forward_mb": mb} for name, step in steps.items()
                     if (mb := device.extra_memory_mb(step)) is not None}
    for name, m in models.items():
        m.zero_grad(set_to_none=True)
        m.eval()
        if name in saved:
            m.load_state_dict(saved[name])
    return row


def summarise(times: dict[str, list[float]], batch: int) -> dict:
    """Images per second from the best and the median call, and pvtv2's ratios to the others."""
    out: dict = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        out[name] = {"images_per_s": batch / min(ts), "latency_ms": min(ts) * 1e3,
                     "median_images_per_s": batch / median, "median_latency_ms": median * 1e3, "times_s": ts}
    if "pvtv2" in times:
        ours = times["pvtv2"]
        for name, ts in times.items():
            if name != "pvtv2":
                out["pvtv2"][f"paired_ratio_{name}"] = statistics.median(t / o for t, o in zip(ts, ours))
                out["pvtv2"][f"median_ratio_{name}"] = statistics.median(ts) / statistics.median(ours)
    return out


# ---------------------------------------------------------------------------------------------- peak
def matmul_peak(device: Device, size: int) -> dict[str, float]:
    """TFLOP/s of a square matmul in fp32 (IEEE), TF32 and bf16: the ceiling the model's shares are taken of."""
    out = {}
    for dtype in ("fp32", "tf32", "bf16"):
        a = torch.randn(size, size, device=device.device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
        with precision("tf32" if dtype == "tf32" else "fp32", device):
            for _ in range(2):
                a @ a
            best = min(device.time_call(lambda a=a: a @ a) for _ in range(5))
        out[dtype] = 2 * size**3 / best / 1e12
    return out


def model_macs(models: dict[str, nn.Module], case: dict) -> int:
    from pvtv2.flops import count_macs

    model = models["pvtv2"].pvt_v2 if case["backbone"] else models["pvtv2"]
    return count_macs(model, case["size"], batch_size=1)["macs"]


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path(__file__).with_name("gpu"), help="folder for JSON and PNG")
    p.add_argument("--dry-run", action="store_true", help="run everything on the CPU with a tiny model, in seconds")
    p.add_argument("--budget-s", type=float, default=None, help=f"stop starting cases after this (default {BUDGET_S})")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 10; dry run 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 3; dry run 1)")
    p.add_argument("--compile-reserve-s", type=float, default=None,
                   help=f"no compiled case starts later than this before the budget's end (default {COMPILE_RESERVE_S})")
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile cases")
    p.add_argument("--match", action="append", default=[],
                   help="run only the cases whose name contains this text (repeatable), e.g. 'b2 cls b64 224 bf16'")
    p.add_argument("--compile-impls", type=lambda v: v.split(","), default=None,
                   help="compile only these implementations, e.g. pvtv2,timm (default: all)")
    p.add_argument("--only-compile", action="store_true", help="run only the torch.compile cases")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (2 if args.dry_run else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 3)
    budget = args.budget_s if args.budget_s is not None else (120.0 if args.dry_run else BUDGET_S)
    reserve = args.compile_reserve_s if args.compile_reserve_s is not None else (0.0 if args.dry_run else COMPILE_RESERVE_S)
    device = Device(args.dry_run)
    start = time.perf_counter()
    if args.dry_run:
        torch.set_num_threads(1)  # a shared CI machine: one thread never waits for a descheduled other
    args.output.mkdir(parents=True, exist_ok=True)

    from pvtv2 import PvtV2Config

    cases = plan(args)
    if args.match:  # e.g. --match "b2 cls b256" --match "bf16 infer compile"
        cases = [c for c in cases if any(m in bench._case_name(c) for m in args.match)]
    if args.skip_compile or args.only_compile:
        cases = [c for c in cases if bool(c["compile"]) == args.only_compile]
    built: dict[str, dict[str, nn.Module]] = {}
    reference: dict = {}
    macs: dict = {}
    rows, skipped = [], []
    peak = matmul_peak(device, 256 if args.dry_run else 8192)
    for case in cases:
        elapsed = time.perf_counter() - start
        if elapsed > budget or (case["compile"] and elapsed > budget - reserve):
            skipped.append(case)
            continue
        if case["model"] not in built:
            preset = PvtV2Config(**DRY_CONFIG) if case["model"] == "tiny" else case["model"]
            models = {k: v.to(device.device) for k, v in bench.build_models(preset, bench.IMPLS, freeze=False).items()}
            models["pvtv2_ref"] = ReferencePath(models["pvtv2"])
            built[case["model"]] = models
        models = built[case["model"]]
        mkey = (case["model"], case["backbone"], case["size"])
        if mkey not in macs:
            macs[mkey] = model_macs(models, case)
        row = run_case(case, models, device, args, reference)
        flops = 2 * macs[mkey] * (3 if case["train"] else 1)  # a training step: about three forward passes
        ceiling = peak["bf16" if case["dtype"] == "bf16" else case["dtype"]]
        for speed in row["speed"].values():
            speed["share_of_peak"] = flops * speed["images_per_s"] / (ceiling * 1e12)
        row["elapsed_s"] = time.perf_counter() - start
        rows.append(row)
        print(bench.format_table([row], IMPLS).splitlines()[-1], file=sys.stderr, flush=True)
        if case["compile"]:
            torch._dynamo.reset()  # frees the compiled graphs (and CUDA graph pools) of this case
    meta = environment(device, args, time.perf_counter() - start)
    meta["matmul_peak_tflops"] = peak
    result = {"meta": meta, "rows": rows, "skipped": skipped}
    (args.output / "results.json").write_text(json.dumps(result, indent=1))
    bench.draw_chart(rows, IMPLS, args.output / "results.png")
    print(json.dumps(meta))
    print(bench.format_table(rows, IMPLS))
    for row in rows:
        print(bench._case_name(row["case"]), json.dumps(row["check"]))
    for case in skipped:
        print("skipped (time budget):", bench._case_name(case))
    return 0


def environment(device: Device, args: argparse.Namespace, seconds: float) -> dict:
    import timm
    import transformers

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({bench._cpu_name()}), dry run",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seconds": seconds,
        "command": "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:]),
    }
    return meta


if __name__ == "__main__":
    raise SystemExit(main())
