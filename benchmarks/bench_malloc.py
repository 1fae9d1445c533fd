"""The allocator settings compared on whole workloads: glibc's default, ``tune_malloc(large_blocks=False)`` (small
blocks kept in the heap, trimmed above 256 MiB: the setting before large blocks were served from the heap) and
``tune_malloc()``. Each setting runs in its own fresh process (the setting is process-wide), the settings in turn,
``--rounds`` times, and each process times pvtv2 and timm alternately on the same weights.

    python benchmarks/bench_malloc.py --model pvt_v2_b2 --batch 16 --train            # a training step (AdamW)
    python benchmarks/bench_malloc.py --model pvt_v2_b2 --batch 64                     # inference (pvtv2 frozen)

Reports images/s (best step of each process, then the median over processes), minor page faults per step and the
process's peak resident memory, and writes them as JSON (``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench  # the comparison script beside this one: its CPU name

SETTINGS = ("default", "small blocks only", "tuned")

WORKER = r"""
import json, resource, sys, time
import torch
import torch.nn.functional as F
setting, model_name, batch, steps, train, threads = sys.argv[1:7]
batch, steps, train, threads = int(batch), int(steps), train == "1", int(threads)
from pvtv2.runtime import tune_malloc
if setting == "tuned":
    assert tune_malloc()
elif setting == "small blocks only":
    assert tune_malloc(large_blocks=False, trim_threshold=256 << 20)
torch.set_num_threads(threads)
import timm
from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast
from pvtv2.weights.layouts import convert_state_dict
torch.manual_seed(0)
ours = PvtV2ForImageClassification(PvtV2Config.from_preset(model_name, drop_path_rate=0.0)).train(train)
theirs = timm.create_model(model_name, num_classes=1000).train(train)
theirs.load_state_dict(convert_state_dict(ours.state_dict(), "timm"))
x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
if train:
    optims = {"pvtv2": torch.optim.AdamW(ours.parameters()), "timm": torch.optim.AdamW(theirs.parameters())}
else:
    fast.freeze(ours)
def logits(impl):
    return ours(x).logits if impl == "pvtv2" else theirs(x)
def step(impl):
    if train:
        F.cross_entropy(logits(impl), y).backward()
        optims[impl].step()
        optims[impl].zero_grad()
    else:
        with torch.inference_mode():
            logits(impl)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
out = {"pvtv2": [], "timm": []}
for impl in out:
    step(impl)
for _ in range(steps):
    for impl in out:
        f0, t0 = faults(), time.perf_counter()
        step(impl)
        out[impl].append((time.perf_counter() - t0, faults() - f0))
print(json.dumps({"steps": out, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "timm", "pvtv2"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pvt_v2_b2")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train", action="store_true", help="a training step (forward, loss, backward, AdamW)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per implementation and process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per setting")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("results_malloc.json"))
    args = parser.parse_args()
    runs: dict[str, list] = {s: [] for s in SETTINGS}
    for _ in range(args.rounds):
        for setting in SETTINGS:
            proc = subprocess.run(
                [sys.executable, "-c", WORKER, setting, args.model, str(args.batch), str(args.steps),
                 "1" if args.train else "0", str(args.threads)],
                capture_output=True, text=True, check=False, env={**os.environ, "PVTV2_TUNE_MALLOC": "0"},
            )
            if proc.returncode:
                sys.exit(f"worker failed ({setting}):\n{proc.stderr[-2000:]}")
            runs[setting].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    case = f"{args.model} batch {args.batch} {'training step' if args.train else 'inference'}, {args.threads} thread(s)"
    print(case)
    summary = {}
    for setting, procs in runs.items():
        row = {}
        for impl in ("pvtv2", "timm"):
            best = [args.batch / min(t for t, _ in p["steps"][impl]) for p in procs]
            row[impl] = {
                "images_per_s": statistics.median(best), "per_process": best,
                "faults_per_step": statistics.median(f for p in procs for _, f in p["steps"][impl]),
            }
        row["peak_rss_mib"] = max(p["peak_rss_mib"] for p in procs)
        summary[setting] = row
        print(f"  {setting:17s} pvtv2 {row['pvtv2']['images_per_s']:7.2f} img/s ({row['pvtv2']['faults_per_step']:8.0f}"
              f" faults/step)  timm {row['timm']['images_per_s']:7.2f} img/s ({row['timm']['faults_per_step']:8.0f}"
              f" faults/step)  peak RSS {row['peak_rss_mib']:.0f} MiB")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": bench._cpu_name(), "python": platform.python_version(),
            "versions": _versions(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    args.output.write_text(json.dumps({"meta": meta, "case": case, "summary": summary, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
