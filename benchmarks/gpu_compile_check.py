"""Why pvtv2 under ``torch.compile`` trails timm under ``torch.compile`` on a GPU: graphs, breaks, recompilations,
and device time per call, for pvtv2 and timm compiled as users compile them (``--static``: also pvtv2 with ``dynamic=False``).

    python benchmarks/gpu_compile_check.py --output /tmp/compile_check       # on a CUDA machine: 2-3 minutes
    python benchmarks/gpu_compile_check.py --dry-run --output /tmp/cc         # on the CPU, tiny model, eager backend

B2 at 224 px, batch 64, bf16 autocast, inference mode (``--batch``, ``--model`` to change). For each variant:
``torch._dynamo.explain`` (graphs and graph breaks with their reasons), dynamo's counters after warm-up (frames
compiled, recompilations), the device time per call (CUDA events, median of ``--calls``) and the inductor kernels
by device time (``torch.profiler``). Writes ``compile_check.json`` and ``compile_check.txt``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
from bench_gpu import DRY_CONFIG  # noqa: E402


def _counters() -> dict:
    from torch._dynamo.utils import counters

    return {group: dict(values) for group, values in counters.items() if group in ("stats", "graph_break", "recompiles")}


def check(name: str, model: torch.nn.Module, x: torch.Tensor, dynamic, dry_run: bool, calls: int, top: int) -> dict:
    cuda = x.device.type == "cuda"
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16)
    torch._dynamo.reset()
    with torch.inference_mode(), autocast:
        explained = torch._dynamo.explain(model)(x)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = torch.compile(model, dynamic=dynamic, backend="eager" if dry_run else "inductor")
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
        for _ in range(3):
            compiled(x)
    if cuda:
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    times = []
    with torch.inference_mode(), autocast:
        for _ in range(calls):
            if cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                compiled(x)
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
            else:
                t = time.perf_counter()
                compiled(x)
                times.append((time.perf_counter() - t) * 1e3)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(3):
                compiled(x)
            if cuda:
                torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if (e.device_type == torch.autograd.DeviceType.CUDA) == cuda]
    key = (lambda e: e.device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events.sort(key=key, reverse=True)
    return {
        "variant": name,
        "graphs": explained.graph_count,
        "graph_breaks": explained.graph_break_count,
        "break_reasons": [str(b.reason)[:300] for b in explained.break_reasons[:8]],
        "counters_after_warmup": _counters(),
        "warmup_s": compile_s,
        "median_ms_per_call": statistics.median(times),
        "kernels": [{"name": e.key[:100], "ms_per_call": key(e) / 3e3, "count_per_call": e.count / 3}
                    for e in events[:top]],
        "launches_per_call": sum(e.count for e in events) / 3,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--model", default="pvt_v2_b2")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--top", type=int, default=45)
    p.add_argument("--static", action="store_true", help="also pvtv2 compiled with dynamic=False")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_compile_check.py: error: no CUDA device here (use --dry-run)")
    from pvtv2 import PvtV2Config

    device = torch.device("cpu" if args.dry_run else "cuda")
    preset = PvtV2Config(**DRY_CONFIG) if args.dry_run else args.model
    size, batch = (64, 2) if args.dry_run else (224, args.batch)
    models = {k: v.to(device) for k, v in bench.build_models(preset, ("pvtv2", "timm"), freeze=False).items()}
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    results = []
    args.output.mkdir(parents=True, exist_ok=True)
    variants = [("pvtv2", models["pvtv2"], None), ("timm", models["timm"], None)]
    if args.static:
        variants.append(("pvtv2 dynamic=False", models["pvtv2"], False))
    for name, model, dynamic in variants:
        results.append(check(name, model, x, dynamic, args.dry_run, args.calls, args.top))
        r = results[-1]
        print(f"{name}: {r['median_ms_per_call']:.3f} ms/call, graphs {r['graphs']}, breaks {r['graph_breaks']}, "
              f"warm-up {r['warmup_s']:.0f} s, {r['launches_per_call']:.0f} launches, counters {r['counters_after_warmup']}",
              flush=True)
        for reason in r["break_reasons"]:
            print("   break:", reason.replace("\n", " ")[:200], flush=True)
        # After each variant: a run cut short by a time limit keeps what it measured.
        (args.output / "compile_check.json").write_text(json.dumps(results, indent=1))
        lines = []
        for r in results:
            lines.append(f"== {r['variant']}: {r['median_ms_per_call']:.3f} ms/call, {r['launches_per_call']:.0f} launches")
            lines.extend(f"   {k['ms_per_call']:8.4f} ms x{k['count_per_call']:5.1f}  {k['name']}" for k in r["kernels"])
        (args.output / "compile_check.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
