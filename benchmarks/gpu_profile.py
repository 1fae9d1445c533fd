"""Where a GPU forward pass or training step spends its time: the kernels of pvtv2 and timm side by side.

    python benchmarks/gpu_profile.py --output benchmarks/gpu_h100           # on a CUDA machine: about a minute
    python benchmarks/gpu_profile.py --dry-run --output /tmp/gpu_profile    # on the CPU with a tiny model
    python benchmarks/gpu_profile.py --compile --output benchmarks/gpu_h100/compiled   # each model torch.compile'd

For each case (B2 at 224: inference at batch 1 and 64 under bf16 autocast, a bf16 training step at batch 64;
``--cases 64,64t`` picks some) and each
implementation (same weights, built by ``bench.build_models``), ``torch.profiler`` records a few calls after a warm-up
and the script writes ``profile.txt``: the kernels (or, in a dry run, operators) by total device time, the number of
kernel launches per call, and the host time per call, which at small batches is the floor a launch-bound model cannot
go below. ``profile.json`` holds the same figures.

``--compile`` profiles each implementation under ``torch.compile`` (inductor's default mode; in a dry run the
"eager" backend, which needs no compiler): the generated kernels side by side (``--graphs`` prints the ATen
operator counts that differ; ``benchmarks/gpu_compile_check.py`` counts graphs and breaks). The profiler starts once,
untimed, before the first case: its first start (CUPTI's set-up) had been charged to whichever implementation came
first, several times its host time.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
from bench_gpu import DRY_CONFIG, precision  # noqa: E402

IMPLS = ("pvtv2", "timm")


def _step(model: nn.Module, x: torch.Tensor, train: bool, device_type: str):
    labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6) if train else None
    model.train(train)

    def step() -> None:
        if train:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type, dtype=torch.bfloat16):
                out = bench._output(model(x))
            nn.functional.cross_entropy(out.float(), labels).backward()
            optimizer.step()
        else:
            with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16):
                bench._output(model(x))

    return step


def _compiled(model: nn.Module, dry_run: bool) -> nn.Module:
    return torch.compile(model, backend="eager") if dry_run else torch.compile(model)


def aten_graph_counts(model: nn.Module, x: torch.Tensor) -> collections.Counter:
    """How often each ATen operator appears in the inference graph that ``torch.compile`` hands its backend (the same
    on every device, before any device code is generated)."""
    from torch._functorch.aot_autograd import aot_module_simplified

    counts: collections.Counter = collections.Counter()

    def count(gm, inputs):
        counts.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=lambda gm, inputs: aot_module_simplified(gm, inputs, fw_compiler=count))
    with torch.no_grad():
        compiled(x)
    torch._dynamo.reset()
    return counts


def profile_case(models: dict[str, nn.Module], batch: int, size: int, train: bool, device: torch.device,
                 calls: int, top: int, compile_: bool = False, dry_run: bool = False) -> dict:
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    cuda = device.type == "cuda"
    result = {}
    for name, model in models.items():
        step = _step(_compiled(model, dry_run) if compile_ else model, x, train, device.type)
        for _ in range(3):
            step()
        if cuda:
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        host_start = time.perf_counter()
        with profile(activities=activities) as prof, precision("fp32", device):
            for _ in range(calls):
                step()
            if cuda:
                torch.cuda.synchronize()
        host = (time.perf_counter() - host_start) / calls
        events = prof.key_averages()
        if cuda:  # kernels: the events that ran on the device
            rows = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
            total_us = lambda e: e.device_time_total  # noqa: E731
        else:
            rows = [e for e in events if e.cpu_parent is None] or list(events)
            total_us = lambda e: e.self_cpu_time_total  # noqa: E731
        rows.sort(key=total_us, reverse=True)
        device_total = sum(total_us(e) for e in rows) / calls
        result[name] = {
            "device_ms_per_call": device_total / 1e3,
            "wall_ms_per_call_profiled": host * 1e3,
            "launches_per_call": sum(e.count for e in rows) / calls,
            "top": [{"name": e.key[:90], "ms_per_call": total_us(e) / calls / 1e3, "count_per_call": e.count / calls}
                    for e in rows[:top]],
        }
        if train:
            model.zero_grad(set_to_none=True)
        model.eval()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, required=True, help="folder for profile.txt and profile.json")
    p.add_argument("--dry-run", action="store_true", help="on the CPU with a tiny model")
    p.add_argument("--calls", type=int, default=5, help="profiled calls per case (default 5)")
    p.add_argument("--top", type=int, default=18, help="kernels listed per case (default 18)")
    p.add_argument("--compile", action="store_true", help="profile each implementation under torch.compile")
    p.add_argument("--cases", default="1,64,64t",
                   help="comma-separated cases: a batch size for inference, with 't' for a training step (default 1,64,64t)")
    p.add_argument("--graphs", action="store_true",
                   help="also list the ATen operators whose counts differ between the implementations' graphs")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_profile.py: error: no CUDA device here (use --dry-run)")
    device = torch.device("cpu" if args.dry_run else "cuda")
    from pvtv2 import PvtV2Config

    preset = PvtV2Config(**DRY_CONFIG) if args.dry_run else "pvt_v2_b2"
    size = 64 if args.dry_run else 224
    cases = [(int(c.rstrip("t")), c.endswith("t")) for c in args.cases.split(",")]
    if args.dry_run:  # tiny batches on the CPU
        cases = [(min(batch, 2), train) for batch, train in cases]
    if args.dry_run and args.compile:  # a compiled training step takes minutes on a CPU and checks nothing more
        cases = [c for c in cases if not c[1]]
    models = {k: v.to(device) for k, v in bench.build_models(preset, IMPLS, freeze=False).items()}
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])):
        torch.ones(1, device=device).add_(1)  # the profiler's one-time set-up, outside every measurement
    report, lines = {}, []
    if args.graphs:
        x = torch.randn(2, 3, size, size, device=device)
        graphs = {name: aten_graph_counts(model.eval(), x) for name, model in models.items()}
        ops = sorted(set().union(*graphs.values()))
        report["aten graph"] = {name: dict(counts) for name, counts in graphs.items()}
        lines.append("== ATen operators whose counts differ (inference graph): " + ", ".join(graphs))
        lines.extend(f"   {op:45s} " + "  ".join(f"{graphs[n][op]:4d}" for n in graphs)
                     for op in ops if len({graphs[n][op] for n in graphs}) > 1)
    for batch, train in cases:
        label = f"B2 {size}px batch {batch} bf16 {'training step' if train else 'inference'}"
        if args.compile:
            torch._dynamo.reset()
            label += ", torch.compile"
        report[label] = out = profile_case(models, batch, size, train, device, args.calls, args.top,
                                           compile_=args.compile, dry_run=args.dry_run)
        lines.append(f"== {label}")
        for name, r in out.items():
            lines.append(f"-- {name}: device {r['device_ms_per_call']:.3f} ms/call, profiled wall "
                         f"{r['wall_ms_per_call_profiled']:.3f} ms/call, {r['launches_per_call']:.0f} launches/call")
            lines.extend(f"   {t['ms_per_call']:9.4f} ms  x{t['count_per_call']:5.1f}  {t['name']}" for t in r["top"])
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "profile.txt").write_text("\n".join(lines) + "\n")
    (args.output / "profile.json").write_text(json.dumps(report, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
