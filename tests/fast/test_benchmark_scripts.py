"""The comparison scripts in benchmarks/ run here as they will on a quiet machine or a GPU, at tiny sizes: the GPU
script's dry run covers every kind of case, and the figures it writes agree with the times it recorded and with
transformers' outputs (the same weights in all three implementations)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import time
from pathlib import Path

import pytest
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_script_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_script_dry_run_covers_every_case_with_consistent_figures(tmp_path):
    script = load_script("bench_gpu")
    out = tmp_path / "gpu"
    assert script.main(["--dry-run", "--output", str(out), "--budget-s", "900"]) == 0
    result = json.loads((out / "results.json").read_text())
    with Image.open(out / "results.png") as chart:
        assert chart.width > 300 and chart.height > 100
    rows = result["rows"]
    assert not result["skipped"]
    kinds = {(r["case"]["dtype"], bool(r["case"]["compile"]), r["case"]["train"], r["case"]["backbone"]) for r in rows}
    assert kinds >= {("bf16", False, False, False), ("bf16", True, False, False), ("bf16", False, True, False),
                     ("bf16", True, True, False),
                     ("fp32", False, False, False), ("tf32", False, False, False), ("bf16", False, False, True),
                     ("fp32", False, False, True)}
    assert set(result["meta"]["matmul_peak_tflops"]) == {"fp32", "tf32", "bf16"}
    for row in rows:
        case, speed, check = row["case"], row["speed"], row["check"]
        # pvtv2_ref (fast path off) in eager inference only: elsewhere both paths are the reference one.
        plain = case["train"] or case["compile"]
        assert set(speed) == {"pvtv2", "transformers", "timm"} | (set() if plain else {"pvtv2_ref"})
        for name, s in speed.items():
            assert len(s["times_s"]) == 2
            assert s["images_per_s"] == pytest.approx(case["batch"] / min(s["times_s"]))
            assert s["share_of_peak"] > 0
        for other in ("timm", "transformers"):  # pvtv2's ratios, from the times themselves
            paired = statistics.median(o / t for t, o in zip(speed["pvtv2"]["times_s"], speed[other]["times_s"]))
            assert speed["pvtv2"][f"paired_ratio_{other}"] == pytest.approx(paired)
        if case["train"]:  # same weights, same images and labels: the same first loss
            losses = [check[f"first_loss_{n}"] for n in ("pvtv2", "transformers", "timm")]
            assert max(losses) - min(losses) < 0.02 * abs(losses[0])
            continue
        # Against transformers in fp32: the three implementations give its numbers (bf16: to bf16's precision).
        tol = 5e-2 if case["dtype"] == "bf16" else 1e-4
        for name in ("pvtv2", "transformers", "timm") + (() if plain else ("pvtv2_ref",)):
            assert check[f"rel_error_{name}"] < tol, (case, name, check)
    # Sanity of the reference itself: bf16 really ran in lower precision than fp32.
    assert max(r["check"]["rel_error_pvtv2"] for r in rows if r["case"]["dtype"] == "bf16" and not r["case"]["train"]) > 1e-4


def test_gpu_script_refuses_to_run_without_a_gpu_unless_dry(monkeypatch):
    script = load_script("bench_gpu")
    monkeypatch.setattr(script.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device here"):
        script.main(["--output", "unused"])


def test_precision_takes_a_torch_device_as_gpu_profile_passes_it():
    """gpu_profile.py hands ``bench_gpu.precision`` a plain ``torch.device``: bf16 turns on autocast for its type,
    fp32 leaves it off, and both set IEEE matmuls inside and restore the settings after."""
    import torch

    script = load_script("bench_gpu")
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    for dtype, autocast in (("bf16", True), ("fp32", False)):
        with script.precision(dtype, torch.device("cpu")):
            assert torch.is_autocast_enabled("cpu") is autocast
            assert not autocast or torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert matmul.fp32_precision == "ieee"
        assert not torch.is_autocast_enabled("cpu") and matmul.fp32_precision == saved


def test_gpu_script_plan_fits_the_budget_order():
    """The real plan: the figures asked for first (bf16 inference, compile, the training step) come first."""
    script = load_script("bench_gpu")
    cases = script.plan(script.argparse.Namespace(dry_run=False))
    names = [(c["model"], c["batch"], c["size"], c["dtype"], c["compile"], c["train"], c["backbone"]) for c in cases]
    assert len(names) == len(set(names))
    assert {c["model"] for c in cases} == {"pvt_v2_b0", "pvt_v2_b2", "pvt_v2_b5"}
    assert {c["batch"] for c in cases if not c["train"] and not c["backbone"]} == {1, 64, 256}
    assert {c["size"] for c in cases if c["backbone"]} == {512, 1024}
    train = [c for c in cases if c["train"]]
    step = dict(model="pvt_v2_b2", batch=64, size=224, dtype="bf16", train=True, backbone=False)
    assert train == [dict(step, compile=False), dict(step, compile="default"), dict(step, compile="reduce-overhead")]
    first_fp32 = next(i for i, c in enumerate(cases) if c["dtype"] == "fp32")
    assert all(c["dtype"] == "bf16" for c in cases[:first_fp32])
    assert cases.index(train[0]) < first_fp32
    assert cases[-2:] == train[1:]  # the compiled training steps last: six compilations


def test_cpu_script_refuses_thread_clock_with_two_threads(capsys):
    script = load_script("bench")
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--clock", "thread", "--threads", "2", "--output", "unused.json"])
    assert exit_info.value.code == 2
    assert "--threads 1" in capsys.readouterr().err


@pytest.mark.slow
def test_cpu_script_thread_clock_peak_share_and_bf16_checks(tmp_path):
    """A tiny run of benchmarks/bench.py with the options for a busy machine: every figure it writes follows from
    the times it recorded, the multiply-adds pvtv2.flops counts and the GEMM peak it measured."""
    import torch

    from pvtv2 import PvtV2Config, PvtV2ForImageClassification
    from pvtv2.flops import count_macs

    script = load_script("bench")
    out = tmp_path / "cpu.json"
    threads = torch.get_num_threads()  # the script sets its own count
    try:
        assert script.main(["--models", "pvt_v2_b0", "--batch-sizes", "1", "--image-size", "64", "--dtype", "fp32",
                            "bf16", "--repeats", "2", "--warmup", "0", "--threads", "1", "--clock", "thread",
                            "--no-memory", "--output", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    meta = result["meta"]
    assert meta["clock"] == "thread" and meta["threads"] == 1
    assert meta["cpu_features"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(meta["gemm_peak_gflops"]) == {"fp32", "bf16"} and min(meta["gemm_peak_gflops"].values()) > 0
    for dtype, rates in meta["gemm_peak_gflops_by_library"].items():  # the peak is the faster library's
        assert meta["gemm_peak_gflops"][dtype] == max(rates.values()) and "aten" in rates
    macs = count_macs(PvtV2ForImageClassification(PvtV2Config.from_preset("pvt_v2_b0")), 64)["macs"]
    for row in result["rows"]:
        case, speed = row["case"], row["speed"]
        peak = meta["gemm_peak_gflops"][case["dtype"]] * 1e9
        for s in speed.values():
            assert s["images_per_s"] == pytest.approx(case["batch"] / min(s["times_s"]))
            assert s["share_of_peak"] == pytest.approx(2 * macs * s["images_per_s"] / peak)
        if case["dtype"] == "bf16":
            fastest = max(speed[n]["images_per_s"] for n in ("timm", "transformers"))
            assert speed["pvtv2"]["ratio_fastest_other"] == pytest.approx(speed["pvtv2"]["images_per_s"] / fastest)
            for suffix in ("", "_timm", "_transformers"):  # each implementation against its own fp32 output
                assert 0 < row["check"][f"bf16_rel_error{suffix}"] < 5e-2
        assert row["check"]["rel_error_vs_transformers"] < 1e-4


@pytest.mark.slow
def test_cpu_script_fp16_runs_half_weights_and_checks_each_against_its_fp32_output(tmp_path):
    """``--dtype fp16``: the models' weights and the input in float16 (no autocast), inference only: no GEMM peak
    (ATen's float16 fallback), each implementation's output within float16 rounding of its own fp32 output."""
    import torch

    script = load_script("bench")
    out = tmp_path / "fp16.json"
    threads = torch.get_num_threads()
    try:
        assert script.main(["--models", "pvt_v2_b0", "--batch-sizes", "1", "--image-size", "64", "--dtype", "fp16",
                            "--train", "--train-models", "pvt_v2_b0", "--repeats", "1", "--warmup", "0",
                            "--threads", "1", "--no-memory", "--output", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert result["meta"]["gemm_peak_gflops"] == {}
    (row,) = result["rows"]  # the training step is not run in float16
    assert row["case"]["dtype"] == "fp16" and not row["case"]["train"]
    for name, speed in row["speed"].items():
        assert "share_of_peak" not in speed
        assert speed["images_per_s"] == pytest.approx(1 / min(speed["times_s"]))
    for suffix in ("", "_timm", "_transformers"):
        assert 1e-5 < row["check"][f"fp16_rel_error{suffix}"] < 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_op_profile_accounts_for_the_step_and_counts_gemm_flops_from_shapes(threads):
    """benchmarks/op_profile.py: the categories (operators and what lies outside them) add up to the step's time, and
    a GEMM's floating-point operations are 2 m k n from its operands (the closed form)."""
    import argparse

    import torch

    script = load_script("op_profile")
    a, b = torch.randn(6, 5), torch.randn(5, 7)
    assert script._gemm_flops("mm", (a, b)) == 2 * 6 * 5 * 7
    assert script._gemm_flops("addmm", (torch.randn(7), a, b)) == 2 * 6 * 5 * 7
    assert script._gemm_flops("linear", (torch.randn(3, 4, 5), torch.randn(7, 5))) == 2 * 12 * 5 * 7
    assert script._gemm_flops("gelu", (a,)) == 0
    saved = torch.get_num_threads()  # the script sets its own count (not `threads`: that is the case's)
    try:
        args = argparse.Namespace(model="pvt_v2_b0", batch=1, size=64, train=False, impls=["pvtv2", "timm"],
                                  by="op", rounds=2, warmup=1, dtype="fp32", threads=threads)
        result = script.profile(args)
        assert script.CLOCK is (time.thread_time_ns if threads == 1 else time.perf_counter_ns)
        assert torch.get_num_threads() == threads and result["case"]["threads"] == threads
    finally:
        torch.set_num_threads(saved)
    for name, info in result["impls"].items():
        assert sum(info["categories_ms"].values()) == pytest.approx(info["step_ms"])
        assert info["operators_ms"] == pytest.approx(sum(o["ms"] for o in info["operators"]))
        assert info["operator_calls"] > 0 and info["categories_ms"]["gemm"] > 0, name
        gemms = [o for o in info["operators"] if script.category(o["op"]) == "gemm" and o["gflops"]]
        assert gemms, name


@pytest.mark.slow
def test_gpu_profile_dry_run_lists_each_implementations_operators(tmp_path):
    script = load_script("gpu_profile")
    assert script.main(["--dry-run", "--graphs", "--output", str(tmp_path), "--calls", "1", "--top", "5"]) == 0
    report = json.loads((tmp_path / "profile.json").read_text())
    # --graphs: the ATen operators that torch.compile sees. For the dry-run model (5 blocks) our keys and values are
    # one GEMM over weights and biases concatenated per call (10 cat), its output unbound as timm unbinds its kv (5).
    graph = report.pop("aten graph")
    blocks = sum(script.DRY_CONFIG["depths"])
    assert graph["pvtv2"]["aten.cat.default"] == 2 * blocks and "aten.slice.Tensor" not in graph["pvtv2"]
    assert graph["pvtv2"]["aten.unbind.int"] == graph["timm"]["aten.unbind.int"] == blocks
    assert "aten.cat.default" not in graph["timm"]
    # the same matrix products: query, keys+values, projection, dense1, dense2 per block, and the head
    assert graph["pvtv2"]["aten.addmm.default"] == graph["timm"]["aten.addmm.default"] == 5 * blocks + 1
    assert len(report) == 3  # batch 1 and 2 inference, a training step
    for case in report.values():
        assert set(case) == {"pvtv2", "timm"}
        for r in case.values():
            assert len(r["top"]) == 5
            # The listed operators' times are a part of the total, in order.
            times = [t["ms_per_call"] for t in r["top"]]
            assert times == sorted(times, reverse=True) and sum(times) <= r["device_ms_per_call"] * 1.0001
            assert r["launches_per_call"] >= sum(t["count_per_call"] for t in r["top"]) > 0
    text = (tmp_path / "profile.txt").read_text()
    assert text.count("== B2") == 3 and text.count("-- pvtv2") == 3
    assert "aten.cat.default" in text


def test_gpu_profile_profiles_compiled_models():
    """``--compile``: each implementation is profiled under torch.compile (the eager backend in a dry run), its
    compiled region in the rows."""
    import torch

    from pvtv2 import PvtV2Config

    script = load_script("gpu_profile")
    models = script.bench.build_models(PvtV2Config(**script.DRY_CONFIG), script.IMPLS, freeze=False)
    out = script.profile_case(models, 1, 64, False, torch.device("cpu"), calls=1, top=3, compile_=True, dry_run=True)
    assert set(out) == {"pvtv2", "timm"}
    for r in out.values():
        assert any(t["name"].startswith("Torch-Compiled Region") for t in r["top"]), r["top"]


def test_cpu_script_gives_every_implementation_the_same_stochastic_depth():
    # A training step with drop path in two implementations and not in the third would not compare like with like:
    # each block's drop probability, in order, is the same in all three (the config's linear ramp, a closed form).
    from pvtv2 import PvtV2Config

    bench = load_script("bench")
    config = PvtV2Config.from_preset("pvt_v2_b0", drop_path_rate=0.2)
    models = bench.build_models(config, train=True)
    depth = sum(config.depths)
    expected = [0.2 * i / (depth - 1) for i in range(depth)]

    def probs(model):
        return [float(m.drop_prob) for m in model.modules() if type(m).__name__.endswith("DropPath")]

    # Each keeps an Identity where the rate is 0 (the first block); timm has one module per residual branch.
    assert probs(models["pvtv2"]) == pytest.approx(expected[1:])
    assert probs(models["transformers"]) == pytest.approx(expected[1:])
    assert probs(models["timm"]) == pytest.approx([p for p in expected[1:] for _ in range(2)])



def test_gpu_compile_check_dry_run_counts_graphs_and_breaks(tmp_path):
    """The compile check on the CPU: both implementations one graph without breaks (a break was what made pvtv2
    compiled trail timm on a GPU), a time and the operators of each."""
    script = load_script("gpu_compile_check")
    assert script.main(["--dry-run", "--output", str(tmp_path), "--calls", "2", "--top", "4"]) == 0
    results = json.loads((tmp_path / "compile_check.json").read_text())
    assert [r["variant"] for r in results] == ["pvtv2", "timm"]
    for r in results:
        assert (r["graphs"], r["graph_breaks"], r["break_reasons"]) == (1, 0, [])
        assert r["counters_after_warmup"]["stats"]["unique_graphs"] == 1
        assert r["median_ms_per_call"] > 0 and len(r["kernels"]) == 4
    assert (tmp_path / "compile_check.txt").read_text().count("== ") == 2
