"""The comparison scripts in benchmarks/ run here as they will on a quiet machine or a GPU, at tiny sizes: the GPU
script's dry run covers every kind of case, and the figures it writes agree with the times it recorded and with
transformers' outputs (the same weights in all three implementations)."""

from __future__ import annotations

import importlib.util
import json
import statistics
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
                     ("fp32", False, False, False), ("tf32", False, False, False), ("bf16", False, False, True),
                     ("fp32", False, False, True)}
    assert set(result["meta"]["matmul_peak_tflops"]) == {"fp32", "tf32", "bf16"}
    for row in rows:
        case, speed, check = row["case"], row["speed"], row["check"]
        assert set(speed) == {"pvtv2", "transformers", "timm"}
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
        for name in ("pvtv2", "transformers", "timm"):
            assert check[f"rel_error_{name}"] < tol, (case, name, check)
    # Sanity of the reference itself: bf16 really ran in lower precision than fp32.
    assert max(r["check"]["rel_error_pvtv2"] for r in rows if r["case"]["dtype"] == "bf16" and not r["case"]["train"]) > 1e-4


def test_gpu_script_refuses_to_run_without_a_gpu_unless_dry(monkeypatch):
    script = load_script("bench_gpu")
    monkeypatch.setattr(script.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device here"):
        script.main(["--output", "unused"])


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
    assert train == [dict(model="pvt_v2_b2", batch=64, size=224, dtype="bf16", train=True, compile=False, backbone=False)]
    first_fp32 = next(i for i, c in enumerate(cases) if c["dtype"] == "fp32")
    assert all(c["dtype"] == "bf16" for c in cases[:first_fp32])
    assert cases.index(train[0]) < first_fp32
