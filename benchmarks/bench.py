"""Compare pvtv2 with transformers and timm on this machine: same weights, interleaved repeats, ratios.

    python benchmarks/bench.py                                  # B0 and B2, batch 1 and 16, 224, fp32 eager inference
    python benchmarks/bench.py --train                          # + a training step (forward, backward, AdamW), B2 batch 16
    python benchmarks/bench.py --highres 512 1024               # + backbone at high resolution, batch 1 (speed and memory)
    python benchmarks/bench.py --dtype fp32 bf16 --compile      # + bf16 autocast and torch.compile variants

Speed: in one process the three implementations get the same weights (transformers' random weights loaded into
ours; timm's through ``pvtv2.weights.layouts.convert_state_dict(sd, "timm")``) and are timed in turn, repeat after repeat,
so that a slow moment of a shared machine hits all three alike; the median per implementation gives images/s and the
ratios. Memory: each (implementation, configuration) runs once more in a fresh subprocess, which reports its peak
resident set size (``ru_maxrss``, whole run) and, for a second forward pass after a first one has loaded libraries,
JIT kernels and packed weights, its high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the
resident size just before it: what the forward pass itself needs (activations, workspaces). Linux only.
The first pass runs on a 64x64 image, so that its freed memory does not linger in the heap for the measured one.

Throughput: "x timm" / "x hf" divide each implementation's best repeat (on a shared machine the best is the least
disturbed); the "paired" columns are the median over rounds of the ratio within a round (timm, then transformers),
which a slow period of a shared machine moves least. The JSON also keeps every time and the medians.
"% peak" is pvtv2's share of the machine's GEMM peak (a square matmul up to 2048^3 at the same thread count,
measured first, in fp32 or bf16 as the case, the faster of ATen's ``@`` and oneDNN): the model's multiply-adds (``pvtv2.flops``) times two times images/s over that peak.

On a shared, busy machine, ``--threads 1 --clock thread`` times each call by this thread's CPU time, which other jobs
disturb far less than the wall time (and with two threads, an OpenMP region waits whenever the other thread is
descheduled: a 256^3 matmul was measured 25x slower with two threads than with one on a loaded 2-core VM).

fp16: ``--dtype fp16`` casts the models' weights and the input to float16 (``model.half()``, no autocast; inference
only): on a CPU without AVX512-FP16 all three run ATen's own float16 kernels, for those who serve half weights.

bf16: ``--dtype bf16`` times all three under the same ``torch.autocast("cpu", dtype=torch.bfloat16)``, reports
pvtv2 against the faster of the other two, and checks every implementation against its own fp32 output (relative
error, top-1 agreement). ``meta.cpu_features`` says whether the CPU has native bf16 (AVX512-BF16 or AMX); without
it, bf16 runs through slow fallbacks in all three and the figures say nothing about bf16 hardware.

Writes ``benchmarks/results.json`` and ``benchmarks/results.png`` (override with ``--output``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

IMPLS = ("pvtv2", "transformers", "timm")


# ---------------------------------------------------------------------------------------------- models
def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def build_models(
    preset, impls=IMPLS, backbone: bool = False, seed: int = 0, train: bool = False, freeze: bool | None = None
) -> dict[str, nn.Module]:
    """The requested implementations of ``preset`` (a preset name or a ``PvtV2Config``), all with the same random
    weights. pvtv2's weights are packed for the fast CPU path (``freeze``) unless ``train`` or ``freeze=False``."""
    import transformers

    from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast
    from pvtv2.weights.layouts import convert_state_dict

    config = PvtV2Config.from_preset(preset) if isinstance(preset, str) else preset
    data = config.to_dict()
    data.pop("stage_names", None)
    torch.manual_seed(seed)
    hf = transformers.PvtV2ForImageClassification(transformers.PvtV2Config(**data)).eval()
    with torch.no_grad():  # away from the init so that a mis-loaded parameter would show
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    sd = hf.state_dict()
    models: dict[str, nn.Module] = {}
    if "pvtv2" in impls:
        ours = PvtV2ForImageClassification(config)
        ours.load_state_dict(sd, strict=True)
        if (not train) if freeze is None else freeze:
            fast.freeze(ours)  # weights packed once, as the pvtv2 command serves a model
        models["pvtv2"] = ours.pvt_v2 if backbone else ours
    if "transformers" in impls:
        models["transformers"] = hf.pvt_v2 if backbone else hf
    if "timm" in impls:
        import timm

        if isinstance(preset, str):
            # The same stochastic depth as ours and transformers' (the preset's), or timm's training step would skip it.
            tm = timm.create_model(preset, pretrained=False, drop_path_rate=config.drop_path_rate)
        else:  # the same architecture built from the config (a tiny one in dry runs)
            from timm.models.pvt_v2 import PyramidVisionTransformerV2

            tm = PyramidVisionTransformerV2(
                depths=tuple(config.depths), embed_dims=tuple(config.hidden_sizes),
                num_heads=tuple(config.num_attention_heads), sr_ratios=tuple(config.sr_ratios),
                mlp_ratios=tuple(config.mlp_ratios), qkv_bias=config.qkv_bias, linear=config.linear_attention,
                num_classes=config.num_labels, drop_path_rate=config.drop_path_rate,
            )
        tm.load_state_dict(convert_state_dict(sd, "timm"), strict=True)
        models["timm"] = _TimmFeatures(tm) if backbone else tm
    else:
        del hf
    return {k: v.eval() for k, v in models.items()}


class _TimmFeatures(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


def _output(out):
    from pvtv2.benchmark import _first_tensor

    return _first_tensor(out)


# Cases run with the weights and the input in this dtype (no autocast).
WEIGHT_DTYPES = {"fp16": torch.float16}


def _step_fn(model: nn.Module, x: torch.Tensor, dtype: str, train: bool, compile: bool):
    if dtype in WEIGHT_DTYPES:
        model.to(WEIGHT_DTYPES[dtype])
        x = x.to(WEIGHT_DTYPES[dtype])
    run = torch.compile(model) if compile else model
    cast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else contextlib.nullcontext
    if not train:
        model.eval()

        def step():
            with torch.inference_mode(), cast():
                _output(run(x))

        return step
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    labels = torch.randint(0, 1000, (x.shape[0],))

    def step():
        opt.zero_grad(set_to_none=True)
        with cast():
            loss = nn.functional.cross_entropy(_output(run(x)).float(), labels)
        loss.backward()
        opt.step()

    return step


# ---------------------------------------------------------------------------------------------- speed
def measure_speed(case: dict, impls, repeats: int, warmup: int, clock=time.perf_counter) -> dict:
    """Images/s of each implementation, timed in turn repeat after repeat with ``clock`` (wall time by default;
    ``time.thread_time`` with one thread: the CPU time of this thread, which other jobs on a shared machine disturb
    far less than the wall time)."""
    models = build_models(case["model"], impls, backbone=case["backbone"], train=case["train"])
    x = torch.randn(case["batch"], 3, case["size"], case["size"])
    steps = {k: _step_fn(m, x, case["dtype"], case["train"], case["compile"]) for k, m in models.items()}
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = clock()
            step()
            times[name].append(clock() - start)
    result = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        result[name] = {
            "images_per_s": case["batch"] / min(ts),
            "latency_ms": min(ts) * 1e3,
            "median_images_per_s": case["batch"] / median,
            "median_latency_ms": median * 1e3,
            "times_s": ts,
        }
    # Paired ratios: in each round the implementations ran back to back, so their ratio in that round is untouched by
    # a slow period of the machine that spans the round; the median over rounds is the steadiest figure we have.
    if "pvtv2" in times:
        for name, ts in times.items():
            if name != "pvtv2":
                result["pvtv2"][f"paired_ratio_{name}"] = statistics.median(t / o for t, o in zip(ts, times["pvtv2"]))
    return result


def _agreement(case: dict, impls=IMPLS) -> dict:
    """Ours against transformers in fp32, and under bf16 autocast every implementation against its own fp32 output
    (the relative error and, for classifiers, top-1 agreement): the numbers behind the speed."""
    models = build_models(case["model"], tuple(set(impls) | {"pvtv2", "transformers"}), backbone=case["backbone"])
    x = torch.randn(max(case["batch"], 8), 3, case["size"], case["size"])
    out = {}
    with torch.inference_mode():
        full = {name: _output(m(x)).float() for name, m in models.items()}
        theirs = full["transformers"]
        out["rel_error_vs_transformers"] = ((full["pvtv2"] - theirs).abs().max() / theirs.abs().max()).item()
        if case["dtype"] in WEIGHT_DTYPES:
            low_dtype = WEIGHT_DTYPES[case["dtype"]]
            for name, model in models.items():
                low = _output(model.to(low_dtype)(x.to(low_dtype))).float()
                ref = full[name]
                suffix = "" if name == "pvtv2" else f"_{name}"
                out[f"{case['dtype']}_rel_error{suffix}"] = ((low - ref).abs().max() / ref.abs().max()).item()
        if case["dtype"] == "bf16":
            for name, model in models.items():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    low = _output(model(x)).float()
                ref = full[name]
                suffix = "" if name == "pvtv2" else f"_{name}"
                out[f"bf16_rel_error{suffix}"] = ((low - ref).abs().max() / ref.abs().max()).item()
                if ref.ndim == 2:
                    out[f"bf16_top1_agreement{suffix}"] = (low.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return out


def cpu_features() -> dict:
    """What decides whether bf16 runs natively here: PyTorch's CPU capability and the CPU's bf16 instructions."""
    flags: set[str] = set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    native = {"avx512_bf16", "amx_bf16"} & flags
    return {"capability": torch.backends.cpu.get_cpu_capability(), "bf16_instructions": sorted(native),
            "native_bf16": bool(native)}


def gemm_peak(clock=time.perf_counter, dtypes=("fp32",), repeats: int = 5, detail: dict | None = None) -> dict[str, float]:
    """GFLOP/s of a square matrix product at the current thread count, per dtype: the ceiling each case's share is
    taken of. Two libraries are timed and the faster counts: ATen's ``a @ a`` (MKL for fp32; on AMD CPUs MKL runs
    its AVX2 code even where the CPU has AVX-512) and oneDNN with a packed weight (what pvtv2's fast path calls).
    The size doubles from 256 while one call takes under 0.2 s, up to 2048 (bf16 without native instructions runs
    through a fallback two orders of magnitude slower). Best of ``repeats``, as the cases' "images/s" are.
    ``detail``, if given, receives each library's figure (``{"fp32": {"aten": ..., "onednn": ...}}``)."""
    out = {}
    for name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        size = 256
        while True:
            a = torch.randn(size, size, dtype=dtype)
            a @ a
            start = clock()
            a @ a
            if size >= 2048 or clock() - start > 0.2:
                break
            size *= 2
        calls = {"aten": lambda a=a: a @ a}
        with contextlib.suppress(RuntimeError, AttributeError):
            packed = torch.ops.mkldnn._reorder_linear_weight(a)
            calls["onednn"] = lambda a=a, w=packed: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")
        rates = {}
        for lib, call in calls.items():
            call()
            best = float("inf")
            for _ in range(repeats):
                start = clock()
                call()
                best = min(best, clock() - start)
            rates[lib] = 2 * size**3 / best / 1e9
        out[name] = max(rates.values())
        if detail is not None:
            detail[name] = rates
    return out


def case_macs(case: dict) -> int:
    """Multiply-adds of one image of ``case``, counted by pvtv2.flops on the reference path."""
    from pvtv2 import PvtV2Config, PvtV2ForImageClassification
    from pvtv2.flops import count_macs

    model = PvtV2ForImageClassification(PvtV2Config.from_preset(case["model"]))
    return count_macs(model.pvt_v2 if case["backbone"] else model, case["size"])["macs"]


# ---------------------------------------------------------------------------------------------- memory
def _memory_worker(args: argparse.Namespace) -> None:
    impl, preset, batch, size, dtype, backbone = args.memory_worker
    models = build_models(preset, (impl,), backbone=backbone == "1")
    model = models[impl]
    x = torch.randn(int(batch), 3, int(size), int(size))
    if dtype in WEIGHT_DTYPES:
        model.to(WEIGHT_DTYPES[dtype])
        x = x.to(WEIGHT_DTYPES[dtype])
    import resource

    def forward():
        nonlocal x
        cast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
        with torch.inference_mode(), cast:
            _output(model(x))

    # Libraries' one-time buffers, JIT kernels, our packed weights: loaded by a small forward pass first. (A first pass
    # at full size would leave its freed memory in the heap for the second to reuse, hiding what it needs.)
    full, x = x, torch.randn(1, 3, 64, 64, dtype=x.dtype)
    forward()
    x = full
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark (VmHWM) to the current RSS
        f.write("5")
    before = _current_rss_mb()
    forward()
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": peak, "forward_mb": hwm - before}))


def measure_memory(case: dict, impl: str) -> dict:
    cmd = [sys.executable, __file__, "--memory-worker", impl, case["model"], str(case["batch"]), str(case["size"]),
           case["dtype"], "1" if case["backbone"] else "0", "--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- report
def _case_name(c: dict) -> str:
    parts = [c["model"].replace("pvt_v2_", ""), "backbone" if c["backbone"] else "cls", f"b{c['batch']}",
             str(c["size"]), c["dtype"], "train" if c["train"] else "infer"]
    if c["compile"]:
        # The mode where it is not the default one: bench_gpu.py times the same training step compiled in the
        # default mode and with "reduce-overhead", which were two rows of one name.
        parts.append("compile" if c["compile"] in (True, "default") else f"compile {c['compile']}")
    return " ".join(parts)


def format_table(rows: list[dict], impls) -> str:
    head = f"{'case':40s} " + " ".join(f"{i + ' img/s':>18s}" for i in impls)
    head += f" {'x timm':>7s} {'x hf':>7s} {'pair tm':>7s} {'pair hf':>7s} {'% peak':>6s} "
    head += " ".join(f"{i[:6] + ' MiB':>11s}" for i in impls)
    lines = [head, "-" * len(head)]
    for r in rows:
        speed = r["speed"]
        line = f"{_case_name(r['case']):40s} " + " ".join(
            f"{speed[i]['images_per_s']:18.2f}" if i in speed else f"{'-':>18s}" for i in impls
        )
        ours = speed.get("pvtv2", {}).get("images_per_s")
        for other in ("timm", "transformers"):
            line += f" {ours / speed[other]['images_per_s']:7.2f}" if ours and other in speed else f" {'-':>7s}"
        for other in ("timm", "transformers"):
            paired = speed.get("pvtv2", {}).get(f"paired_ratio_{other}")
            line += f" {paired:7.2f}" if paired else f" {'-':>7s}"
        share = speed.get("pvtv2", {}).get("share_of_peak")
        line += f" {100 * share:6.1f}" if share else f" {'-':>6s}"
        mem = r.get("memory", {})
        line += " " + " ".join(f"{mem[i]['forward_mb']:11.0f}" if i in mem else f"{'-':>11s}" for i in impls)
        lines.append(line)
    return "\n".join(lines)


def draw_chart(rows: list[dict], impls, path: Path) -> None:
    """Grouped bars: throughput relative to timm per case (Pillow only)."""
    from PIL import Image, ImageDraw

    colors = {"pvtv2": (31, 119, 180), "transformers": (255, 127, 14), "timm": (120, 120, 120)}
    bar_h, gap, left, width = 14, 12, 320, 560
    height = 60 + len(rows) * (len(impls) * bar_h + gap)
    img = Image.new("RGB", (left + width + 80, height), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), "throughput relative to timm (same weights, interleaved repeats, best of each)", fill="black")
    top = max(
        (r["speed"][i]["images_per_s"] / r["speed"]["timm"]["images_per_s"] for r in rows for i in impls
         if i in r["speed"] and "timm" in r["speed"]), default=1.0,
    )
    scale = width / max(top, 1.0)
    y = 40
    for i, name in enumerate(impls):
        d.rectangle((left + i * 130, 24, left + i * 130 + 10, 34), fill=colors.get(name, (0, 0, 0)))
        d.text((left + i * 130 + 14, 23), name, fill="black")
    for r in rows:
        d.text((10, y + bar_h // 2), _case_name(r["case"]), fill="black")
        for name in impls:
            if name in r["speed"] and "timm" in r["speed"]:
                ratio = r["speed"][name]["images_per_s"] / r["speed"]["timm"]["images_per_s"]
                d.rectangle((left, y, left + int(ratio * scale), y + bar_h - 2), fill=colors.get(name, (0, 0, 0)))
                d.text((left + int(ratio * scale) + 4, y), f"x{ratio:.2f}", fill="black")
            y += bar_h
        y += gap
    d.line((left + scale, 38, left + scale, height - 5), fill=(200, 0, 0))
    img.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["pvt_v2_b0", "pvt_v2_b2"], help="presets (default: b0 b2)")
    p.add_argument("--batch-sizes", nargs="*", type=int, default=[1, 16], help="classifier batch sizes (none: skip)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32"],
                   help="fp32; bf16: under bf16 autocast; fp16: float16 weights and input (inference only)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (all three implementations)")
    p.add_argument("--train", action="store_true", help="also time a training step at --train-batch")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--train-models", nargs="+", default=["pvt_v2_b2"])
    p.add_argument("--highres", nargs="*", type=int, default=[], help="backbone sizes at batch 1, e.g. 512 1024")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=["wall", "thread"], default="wall",
                   help="thread: this thread's CPU time (needs --threads 1), for A/B runs on a shared, busy machine")
    p.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory subprocesses")
    p.add_argument("--tune-malloc", action="store_true",
                   help="time with pvtv2.runtime.tune_malloc() in effect (all implementations; memory runs untuned)")
    p.add_argument("--output", type=Path, default=Path(__file__).with_name("results.json"))
    p.add_argument("--memory-worker", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.clock == "thread" and args.threads != 1:
        p.error("--clock thread measures one thread's CPU time: use it with --threads 1")
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    if args.tune_malloc and not args.memory_worker:
        from pvtv2.runtime import tune_malloc

        if not tune_malloc():
            p.error("--tune-malloc needs glibc (Linux)")
    if args.memory_worker:
        _memory_worker(args)
        return 0

    cases = []
    for dtype in args.dtype:
        for compile_ in [False, True] if args.compile else [False]:
            for model in args.models:
                for batch in args.batch_sizes:
                    cases.append(dict(model=model, batch=batch, size=args.image_size, dtype=dtype, train=False,
                                      compile=compile_, backbone=False))
            for size in args.highres:
                for model in args.models:
                    cases.append(dict(model=model, batch=1, size=size, dtype=dtype, train=False, compile=compile_,
                                      backbone=True))
            if args.train and dtype not in WEIGHT_DTYPES:
                for model in args.train_models:
                    cases.append(dict(model=model, batch=args.train_batch, size=args.image_size, dtype=dtype,
                                      train=True, compile=compile_, backbone=False))
    rows = []
    from tqdm import tqdm

    peak_detail: dict = {}
    # No peak for float16 weights: ATen's fallback square product (about 1 GFLOP/s) is slower than the models' own.
    peak = gemm_peak(clock, tuple(d for d in args.dtype if d not in WEIGHT_DTYPES), detail=peak_detail)
    macs: dict[tuple, int] = {}
    for case in tqdm(cases, desc="cases", file=sys.stderr, disable=not sys.stderr.isatty()):
        row = {"case": case, "speed": measure_speed(case, args.impls, args.repeats, args.warmup, clock)}
        key = (case["model"], case["backbone"], case["size"])
        macs[key] = macs.get(key) or case_macs(case)
        # Share of the machine's GEMM peak: the model's multiply-adds (a training step: about three forward passes).
        flops = 2 * macs[key] * (3 if case["train"] else 1)
        for speed in row["speed"].values():
            if case["dtype"] in peak:
                speed["share_of_peak"] = flops * speed["images_per_s"] / (peak[case["dtype"]] * 1e9)
        if case["dtype"] == "bf16" and "pvtv2" in row["speed"]:  # the bf16 goal is against the faster of the others
            others = [row["speed"][i]["images_per_s"] for i in row["speed"] if i != "pvtv2"]
            if others:
                row["speed"]["pvtv2"]["ratio_fastest_other"] = row["speed"]["pvtv2"]["images_per_s"] / max(others)
        if not case["train"]:
            row["check"] = _agreement(case, args.impls)
            if not args.no_memory and not case["compile"]:
                row["memory"] = {i: measure_memory(case, i) for i in args.impls}
        rows.append(row)
        print(format_table([row], args.impls).splitlines()[-1], file=sys.stderr, flush=True)

    import timm
    import transformers

    from pvtv2.fast.train import uses_onednn as train_gemm_uses_onednn

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": _cpu_name(),
        "threads": args.threads,
        "clock": args.clock,
        "cpu_features": cpu_features(),
        "gemm_peak_gflops": peak,
        "gemm_peak_gflops_by_library": peak_detail,
        "tune_malloc": args.tune_malloc,
        # pvtv2's training GEMMs (pvtv2.fast.train): oneDNN on AMD CPUs with AVX-512, F.linear elsewhere
        "pvtv2_train_gemm": "onednn" if train_gemm_uses_onednn() else "aten",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "command": "python benchmarks/bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    args.output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    draw_chart(rows, args.impls, args.output.with_suffix(".png"))
    print(json.dumps(meta))
    print(format_table(rows, args.impls))
    for r in rows:
        if "check" in r:
            print(_case_name(r["case"]), r["check"])
    return 0


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
