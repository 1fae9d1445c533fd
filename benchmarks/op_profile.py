"""Where the time goes: per-operator CPU time of pvtv2, timm and transformers on the same weights and input.

    python benchmarks/op_profile.py --model pvt_v2_b0 --batch 1                 # inference, batch 1
    python benchmarks/op_profile.py --model pvt_v2_b2 --batch 16 --train        # a training step
    python benchmarks/op_profile.py --model pvt_v2_b0 --batch 1 --by shape      # each operator and input shape

One thread by default. Each ATen or oneDNN operator call is timed by this thread's CPU time (``time.thread_time_ns``)
from a ``TorchDispatchMode``, so the figures are what the operator itself costs, little disturbed by other jobs on a
shared machine (unlike the wall time, or the profiler's, which counts the time a busy machine keeps the thread
waiting). With ``--threads N`` (N > 1) operators run on N threads and are timed by the wall clock
(``time.perf_counter_ns``): the calling thread's CPU time would miss the other threads' work. Compare such a profile
with a one-thread one to see which operators gain little from more threads.
The implementations run in turn, round after round; each operator's figure is its median over the rounds.

Besides the operators: "step" is the CPU time of a whole call without the dispatch mode, and "outside operators"
the difference between it and the sum of the operators (Python, module calls, views, the dispatcher: what a batch-1
call pays per operator; views are counted, not timed). GEMM-like operators also get GFLOP/s from their shapes; the GEMM peak of the machine (a 2048^3
matmul, one thread) is measured first, so every share can be read against it.

Writes a JSON (``--output``) and prints a table: categories first, then the most expensive operators.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # the comparison script beside this one: same weights in all three, the same step functions

CATEGORIES = {
    "gemm": ("mm", "addmm", "bmm", "linear", "_linear_pointwise", "_mkl_linear", "matmul", "addmm_", "baddbmm"),
    "convolution": ("convolution", "conv2d", "_convolution_pointwise", "convolution_backward", "mkldnn_convolution"),
    "attention": ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                  "_scaled_dot_product_flash_attention_for_cpu_backward", "softmax", "_softmax", "_softmax_backward_data"),
    "layer norm": ("layer_norm", "native_layer_norm", "native_layer_norm_backward"),
    "activation": ("gelu", "gelu_", "gelu_backward", "relu", "relu_", "threshold_backward"),
    "copies and allocation": ("copy_", "clone", "contiguous", "cat", "to", "_to_copy", "empty", "empty_like",
                              "new_empty", "empty_strided", "new_empty_strided", "slice_backward", "stack", "zeros",
                              "zeros_like", "new_zeros", "fill_", "zero_"),
}
CATEGORY_OF = {op: cat for cat, ops in CATEGORIES.items() for op in ops}
# Views cost a microsecond or two each, less than timing them from Python would: they are counted, not timed, and
# their cost stays in "outside operators" with the Python code around the operators.
VIEWS = frozenset(("view", "reshape", "_unsafe_view", "permute", "transpose", "t", "slice", "select", "unbind",
                   "split", "flatten", "expand", "as_strided", "detach", "alias", "unsqueeze", "squeeze"))


# The clock of every figure: this thread's CPU time (one thread) or the wall clock (``--threads`` above 1).
CLOCK = time.thread_time_ns


class OperatorTimer(TorchDispatchMode):
    """This thread's CPU time (or, with several threads, the wall time) per operator (and per input shapes with ``shapes=True``), and call counts."""

    def __init__(self, shapes: bool = False) -> None:
        super().__init__()
        self.shapes = shapes
        self.ns: dict = defaultdict(int)
        self.calls: dict = defaultdict(int)
        self.flops: dict = defaultdict(int)
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in VIEWS:
            self.views += 1
            return func(*args, **(kwargs or {}))
        start = CLOCK()
        out = func(*args, **(kwargs or {}))
        elapsed = CLOCK() - start
        key = (name, _shapes(args)) if self.shapes else name
        self.ns[key] += elapsed
        self.calls[key] += 1
        self.flops[key] += _gemm_flops(name, args)
        return out


def _shapes(args) -> str:
    """Each tensor argument's shape, with its strides where it is not contiguous (a transposed or channels-last
    operand can cost a kernel a copy or a slower loop)."""
    return " ".join(str(tuple(a.shape)) + ("" if a.is_contiguous() else f"s{tuple(a.stride())}")
                    for a in args if isinstance(a, torch.Tensor))


def _gemm_flops(name: str, args) -> int:
    """Floating-point operations of a GEMM-like call, from its operands' shapes (0 for anything else)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if name in ("mm", "addmm", "addmm_"):
        a, b = tensors[-2], tensors[-1]
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    if name == "_linear_pointwise":  # (x, w, b) or, fused with a binary op, (x, other, w, b)
        x = tensors[0]
        w = tensors[2] if len(tensors) >= 4 else tensors[1]
        return 2 * x.numel() // x.shape[-1] * w.shape[0] * x.shape[-1]
    if name == "linear":
        x, w = tensors[0], tensors[1]
        return 2 * x.numel() // x.shape[-1] * w.shape[0] * x.shape[-1]
    return 0


def category(key) -> str:
    return CATEGORY_OF.get(key[0] if isinstance(key, tuple) else key, "other")


def profile(args: argparse.Namespace) -> dict:
    global CLOCK
    CLOCK = time.thread_time_ns if args.threads == 1 else time.perf_counter_ns
    torch.set_num_threads(args.threads)
    case = {"model": args.model, "batch": args.batch, "size": args.size, "dtype": args.dtype, "train": args.train,
            "compile": False, "backbone": False, "threads": args.threads}
    models = bench.build_models(args.model, tuple(args.impls), train=args.train)
    x = torch.randn(args.batch, 3, args.size, args.size)
    steps = {name: bench._step_fn(m, x, args.dtype, args.train, False) for name, m in models.items()}
    for step in steps.values():  # packing, allocator growth, lazy initialisation
        for _ in range(args.warmup):
            step()
    step_ns: dict[str, list[int]] = {name: [] for name in steps}
    rounds: dict[str, list[OperatorTimer]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = CLOCK()
            step()
            step_ns[name].append(CLOCK() - start)
            timer = OperatorTimer(shapes=args.by == "shape")
            with timer:
                step()
            rounds[name].append(timer)
    result: dict = {"case": case, "impls": {}}
    for name, timers in rounds.items():
        keys = set().union(*(t.ns for t in timers))
        ops = {}
        for key in keys:
            ms = statistics.median(t.ns.get(key, 0) for t in timers) / 1e6
            calls = timers[0].calls.get(key, 0)
            flops = timers[0].flops.get(key, 0)
            ops[key] = {"ms": ms, "calls": calls, "gflops": flops / ms / 1e6 if flops and ms else None}
        step_ms = statistics.median(step_ns[name]) / 1e6
        total = sum(o["ms"] for o in ops.values())
        cats: dict[str, float] = defaultdict(float)
        for key, o in ops.items():
            cats[category(key)] += o["ms"]
        cats["outside operators (Python, views, dispatch)"] = step_ms - total
        result["impls"][name] = {
            "step_ms": step_ms,
            "operators_ms": total,
            "operator_calls": sum(o["calls"] for o in ops.values()),
            "view_calls": timers[0].views,
            "categories_ms": dict(cats),
            "operators": [{"op": k if isinstance(k, str) else k[0], "shapes": None if isinstance(k, str) else k[1], **v}
                          for k, v in sorted(ops.items(), key=lambda kv: -kv[1]["ms"])],
        }
    return result


def format_profile(result: dict, top: int) -> str:
    impls = list(result["impls"])
    lines = [f"{'':44s}" + "".join(f"{n:>16s}" for n in impls)]
    clock = "CPU time of one thread" if result["case"].get("threads", 1) == 1 else f"wall, {result['case']['threads']} threads"
    lines.append(f"{'step (ms, ' + clock + ')':44s}" + "".join(f"{result['impls'][n]['step_ms']:16.2f}" for n in impls))
    lines.append(f"{'operator calls (views)':44s}" + "".join(
        f"{result['impls'][n]['operator_calls']:9d} ({result['impls'][n]['view_calls']:4d})" for n in impls))
    cats = sorted({c for n in impls for c in result["impls"][n]["categories_ms"]},
                  key=lambda c: -result["impls"][impls[0]]["categories_ms"].get(c, 0))
    for c in cats:
        cells = ""
        for n in impls:
            info = result["impls"][n]
            ms = info["categories_ms"].get(c, 0.0)
            cells += f"{ms:9.2f} ({100 * ms / info['step_ms']:3.0f}%)"
        lines.append(f"  {c:42s}" + cells)
    lines.append("")
    for n in impls:
        lines.append(f"{n}: the {top} most expensive operators")
        for o in result["impls"][n]["operators"][:top]:
            rate = f"{o['gflops']:6.1f} GFLOP/s" if o["gflops"] else " " * 14
            label = o["op"] + (f" {o['shapes']}" if o["shapes"] else "")
            lines.append(f"  {o['ms']:9.3f} ms {o['calls']:4d}x {rate}  {label[:110]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pvt_v2_b0")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--train", action="store_true", help="a training step (forward, backward, AdamW) instead of inference")
    p.add_argument("--tune-malloc", action="store_true",
                   help="run with pvtv2.runtime.tune_malloc() in effect (no fresh pages per allocation; see docs)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: every implementation under torch.autocast('cpu', dtype=torch.bfloat16)")
    p.add_argument("--impls", nargs="+", choices=bench.IMPLS, default=["pvtv2", "timm"])
    p.add_argument("--by", choices=["op", "shape"], default="op")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads; above 1, every figure is wall time (default: 1, thread CPU time)")
    p.add_argument("--output", type=Path, default=None, help="JSON file (default: print only)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be at least 1")
    # Checked here, before the GEMM peak and the models are measured and built: --rounds 0 ended there in
    # statistics' "no median for empty data".
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be at least 0")
    if args.batch < 1:
        p.error("--batch must be at least 1")
    torch.set_num_threads(args.threads)
    if args.tune_malloc:
        from pvtv2.runtime import tune_malloc

        if not tune_malloc():
            p.error("--tune-malloc needs glibc (Linux)")
    peak_clock = time.thread_time if args.threads == 1 else time.perf_counter
    peak = bench.gemm_peak(peak_clock, (args.dtype,))[args.dtype]
    result = profile(args)
    result["gemm_peak_gflops_one_thread" if args.threads == 1 else "gemm_peak_gflops"] = peak
    result["meta"] = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": bench._cpu_name(), "torch": torch.__version__,
                      "tune_malloc": args.tune_malloc,
                      "command": "python benchmarks/op_profile.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    threads = "one thread" if args.threads == 1 else f"{args.threads} threads"
    print(f"GEMM peak ({args.dtype}, {threads}, the faster of ATen and oneDNN): {peak:.1f} GFLOP/s")
    print(format_profile(result, args.top))
    if args.output:
        args.output.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
