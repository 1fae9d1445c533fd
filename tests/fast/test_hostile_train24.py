"""Hostile checks of the training GEMMs through oneDNN (pvtv2.fast.train) after the weight-gradient change of
2026-11-27 (expanding layers' weight gradients as ``(x.T @ grad).T``, the transposed weight read in place by the
input-gradient product): overlapping weights, second derivatives through the weight gradient, gradient strides of
one-input layers, tied weights (a whole model against transformers), hooks and accumulation, each held to float64
F.linear, transformers or a closed form. And the benchmark tools changed with it: the GPU checks' shell script
(benchmarks/gpu_check.sh) without a GPU and with odd ``STEPS``, op_profile's counts, the GPU plan's case names."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast

from conftest import TINY, hf_config, random_weights_, relative_error

needs_onednn = pytest.mark.skipif(not fast.fast_path_available(), reason="oneDNN's operators unavailable here")
ROOT = Path(__file__).resolve().parents[2]


def _onednn(x, w, b=None):
    with fast.train_gemm("onednn"):
        out = fast.linear(x, w, b)
    assert type(out.grad_fn).__name__ == "OneDnnLinearBackward"
    return out


@needs_onednn
@pytest.mark.parametrize("cin,cout,strides", [(4, 9, (2, 1)), (9, 4, (3, 1)), (4, 9, (1, 1)), (5, 5, (2, 1))])
def test_overlapping_weight_closed_form(cin, cout, strides):
    """A weight whose rows overlap in memory (``as_strided``): oneDNN has no memory descriptor for it, so the
    input-gradient product must not hand it the transposed view as it is (it raised "could not construct a memory
    descriptor using strides" there, where F.linear trains)."""
    gen = torch.Generator().manual_seed(cin * 10 + cout)
    base = torch.randn(cout * cin, generator=gen, requires_grad=True)
    w = base.as_strided((cout, cin), strides)
    x = torch.randn(6, cin, generator=gen, requires_grad=True)
    g = torch.randn(6, cout, generator=gen)
    _onednn(x, w).backward(g)
    w64, x64, g64 = w.detach().double(), x.detach().double(), g.double()
    assert relative_error(g64 @ w64, x.grad) < 1e-5
    # The base's gradient: each weight element's gradient summed into the base element it reads.
    index = torch.arange(cout * cin).as_strided((cout, cin), strides)
    want_base = torch.zeros(cout * cin, dtype=torch.float64).index_add_(0, index.reshape(-1), (g64.T @ x64).reshape(-1))
    assert relative_error(want_base, base.grad) < 1e-5


@needs_onednn
@pytest.mark.parametrize("shape,cout,layout", [((6, 4), 9, "contiguous"), ((6, 9), 4, "contiguous"),
                                               ((2, 3, 4), 9, "contiguous"), ((4, 6), 9, "transposed")])
def test_second_derivative_through_the_weight_gradient(shape, cout, layout):
    """d/dx of a function of the weight gradient (``create_graph=True``), as a gradient penalty on the weights
    computes: the weight gradient depends on the input, so the second backward reaches the input through it. It
    lost that term (the input was saved as a copy made without autograd): a silently wrong input gradient."""
    gen = torch.Generator().manual_seed(cout)
    x0 = torch.randn(shape if layout == "contiguous" else shape[::-1], generator=gen)
    x0 = x0 if layout == "contiguous" else x0.t()
    w0 = torch.randn(cout, shape[-1], generator=gen)
    b0 = torch.randn(cout, generator=gen)
    results = {}
    for dtype in (torch.float32, torch.float64):  # float64: F.linear (the path takes float32 only)
        x = x0.detach().to(dtype).requires_grad_(True)
        w = w0.detach().to(dtype).requires_grad_(True)
        b = b0.detach().to(dtype).requires_grad_(True)
        with fast.train_gemm("onednn"):
            out = fast.linear(x, w, b)
            assert (type(out.grad_fn).__name__ == "OneDnnLinearBackward") == (dtype == torch.float32)
            gx, gw = torch.autograd.grad(out.tanh().sum(), (x, w), create_graph=True)
            (gw.square().sum() + gx.square().sum()).backward()
        results[dtype] = (x.grad, w.grad, b.grad)
    for want, got in zip(results[torch.float64], results[torch.float32]):
        assert relative_error(want, got) < 1e-5


@needs_onednn
def test_second_derivative_closed_form():
    """The same against a closed form: for out = x @ w.T and L = |d(sum(out * c))/dw|^2 = |c.T @ x|^2,
    dL/dx = 2 c (c.T @ x)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 3, generator=gen, requires_grad=True)
    w = torch.randn(8, 3, generator=gen, requires_grad=True)
    c = torch.randn(7, 8, generator=gen)
    (gw,) = torch.autograd.grad((_onednn(x, w) * c).sum(), w, create_graph=True)
    gw.square().sum().backward()
    c64 = c.double()
    assert relative_error(2 * c64 @ (c64.T @ x.detach().double()), x.grad) < 1e-5


@needs_onednn
@pytest.mark.parametrize("cin,cout", [(1, 9), (1, 1), (9, 1), (1, 300), (4, 9), (9, 4)])
def test_weight_gradient_strides_equal_the_parameters(cin, cout):
    """``param.grad.stride() == param.stride()``, size-one dimensions included, as F.linear gives: DDP compares
    the whole stride tuples with its bucket views' and warns of a slow copy otherwise. A one-input expanding layer
    (``nn.Linear(1, n)``) got strides (1, n) for its (n, 1) weight of strides (1, 1)."""
    gen = torch.Generator().manual_seed(cin + cout)
    layer = nn.Linear(cin, cout)
    x = torch.randn(5, cin, generator=gen, requires_grad=True)
    g = torch.randn(5, cout, generator=gen)
    with fast.train_gemm("onednn"):
        out = fast.module_linear(layer, x)
    assert type(out.grad_fn).__name__ == "OneDnnLinearBackward"
    out.backward(g)
    assert layer.weight.grad.stride() == layer.weight.stride()
    assert relative_error(g.double().T @ x.detach().double(), layer.weight.grad) < 1e-5


@needs_onednn
def test_tied_weight_used_expanding_and_contracting_closed_form():
    """One weight used as (9, 4) and, transposed, as (4, 9) in the same graph: both orientations of the weight
    gradient add up in one ``.grad``."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(9, 4, generator=gen, requires_grad=True)
    x = torch.randn(6, 4, generator=gen, requires_grad=True)
    y = torch.randn(5, 9, generator=gen, requires_grad=True)
    a, c = _onednn(x, w), _onednn(y, w.t())
    (a.square().sum() + c.square().sum()).backward()
    w64, x64, y64 = w.detach().double(), x.detach().double(), y.detach().double()
    a64, c64 = x64 @ w64.T, y64 @ w64
    assert relative_error((2 * a64).T @ x64 + ((2 * c64).T @ y64).T, w.grad) < 1e-5
    assert relative_error(2 * a64 @ w64, x.grad) < 1e-5
    assert relative_error(2 * c64 @ w64.T, y.grad) < 1e-5


@needs_onednn
def test_hooks_retained_graph_and_accumulation_into_a_strided_grad():
    """A weight hook sees the gradient and scales it; the graph is run twice (``retain_graph``); the gradient adds
    into an existing ``.grad`` of other strides, in place, as AccumulateGrad does for F.linear."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(9, 4, generator=gen, requires_grad=True)
    x = torch.randn(6, 4, generator=gen)
    seen = []
    w.register_hook(lambda grad: seen.append(grad.clone()) or grad * 2)
    existing = torch.ones(4, 9).t()  # strides (1, 9)
    w.grad = existing
    loss = _onednn(x, w).square().sum()
    loss.backward(retain_graph=True)
    loss.backward()
    want = 2 * (x.double() @ w.detach().double().T).T @ x.double()
    assert len(seen) == 2 and all(relative_error(want, s) < 1e-5 for s in seen)
    assert w.grad is existing and w.grad.stride() == (1, 9)
    assert relative_error(1 + 4 * want, w.grad) < 1e-5


@needs_onednn
def test_float64_gradcheck_goes_to_f_linear():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, generator=gen, requires_grad=True)
    with fast.train_gemm("onednn"):
        assert type(fast.linear(x, w, b).grad_fn).__name__ == "AddmmBackward0"
        assert torch.autograd.gradcheck(fast.linear, (x, w, b))
        assert torch.autograd.gradgradcheck(fast.linear, (x, w, b))
    assert relative_error(F.linear(x, w, b), x @ w.T + b) < 1e-12


def _fake_bin(tmp_path: Path, cuda: bool, fail: str | None = None) -> Path:
    """A folder of stand-ins: ``nvidia-smi`` that prints a name, and ``python3`` that writes its arguments to a log
    (and answers the CUDA probe with ``cuda``; exits 5 where its arguments contain ``fail``), so the script's choice
    of steps shows without a GPU."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'name, driver_version, memory.total'\n")
    failing = f"*{fail}*) exit 5;; " if fail else ""
    (fake / "python3").write_text(
        "#!/bin/sh\necho \"$*\" >> \"$FAKE_LOG\"\n"
        f"case \"$*\" in *cuda.is_available*) exit {0 if cuda else 1};; {failing}esac\nexit 0\n")
    for tool in fake.iterdir():
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return fake


def _gpu_check(tmp_path: Path, path: str, steps: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "STEPS"}
    env.update(PATH=path, FAKE_LOG=str(tmp_path / "calls.log"))
    if steps is not None:
        env["STEPS"] = steps
    return subprocess.run([shutil.which("bash"), "benchmarks/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_gpu_check_without_a_gpu_fails_at_once_and_writes_nothing(tmp_path):
    """No nvidia-smi: exit 3 with a message naming it, before any step (it ran every step, each failing, and
    exited 0). nvidia-smi but no CUDA device for PyTorch: the same."""
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _gpu_check(tmp_path, str(empty), None)
    assert result.returncode == 3 and "no nvidia-smi" in result.stderr
    assert not (tmp_path / "out").exists()
    fake = _fake_bin(tmp_path, cuda=False)
    result = _gpu_check(tmp_path, f"{fake}:{os.environ['PATH']}", "tests train")
    assert result.returncode == 3 and "no CUDA device" in result.stderr
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "calls.log").read_text().count("\n") == 1  # the probe only


@pytest.mark.parametrize("steps,want", [
    (None, ["tests", "train", "eager", "profile", "compile"]),
    ("", ["tests", "train", "eager", "profile", "compile"]),
    ("compile\ntrain", ["train", "compile"]),  # newline-separated: both ran nothing before
    ("\ttrain_compile  tests\t", ["tests", "train_compile"]),
    ("train_compile train_compile", ["train_compile"]),
])
def test_gpu_check_runs_the_steps_named_whatever_the_whitespace(tmp_path, steps, want):
    fake = _fake_bin(tmp_path, cuda=True)
    result = _gpu_check(tmp_path, f"{fake}:{os.environ['PATH']}", steps)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    signature = {"tests": "tests/test_cuda.py", "train": f"--output {out}/train --match",
                 "eager": f"--output {out}/eager", "profile": "benchmarks/gpu_profile.py",
                 "compile": "benchmarks/gpu_compile_check.py", "train_compile": f"--output {out}/train_compile"}
    calls = (tmp_path / "calls.log").read_text().splitlines()
    ran = [step for step, text in signature.items() if any(text in c for c in calls)]
    assert ran == want
    assert sum(any(text in c for text in signature.values()) for c in calls) == len(want)  # each step once


def test_gpu_check_records_each_steps_status_and_fails_when_one_failed(tmp_path):
    """A step that fails behind a pipe (``| tail``) counts: its own exit status goes into gpu.txt, the script exits 1
    naming it, and the steps after it still run."""
    fake = _fake_bin(tmp_path, cuda=True, fail="gpu_profile.py")
    result = _gpu_check(tmp_path, f"{fake}:{os.environ['PATH']}", "train profile compile")
    assert result.returncode == 1 and "failed: profile" in result.stderr
    lines = (tmp_path / "out" / "gpu.txt").read_text().splitlines()
    assert [line for line in lines if line.startswith("step ")] == [
        "step train: exit 0", "step profile: exit 5", "step compile: exit 0"]


@pytest.mark.parametrize("steps,message", [("*", "unknown step '*'"), ("tests,train", "unknown step 'tests,train'"),
                                           (" \n\t", "STEPS names no step")])
def test_gpu_check_refuses_bad_steps_by_name(tmp_path, steps, message):
    """STEPS="*" was expanded to the file names of the folder (the error named README.md); whitespace alone ran
    nothing and exited 0."""
    fake = _fake_bin(tmp_path, cuda=True)
    result = _gpu_check(tmp_path, f"{fake}:{os.environ['PATH']}", steps)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "calls.log").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,message", [(["--threads", "0"], "--threads must be at least 1"),
                                          (["--threads", "-2"], "--threads must be at least 1"),
                                          (["--threads", "two"], "invalid int value: 'two'"),
                                          (["--rounds", "0"], "--rounds must be at least 1"),
                                          (["--warmup", "-1"], "--warmup must be at least 0"),
                                          (["--batch", "0"], "--batch must be at least 1")])
def test_op_profile_refuses_bad_counts_before_measuring(argv, message, capsys, monkeypatch):
    """Each refused by name, at once: nothing is measured (the GEMM peak's measurement would raise) nor built."""
    spec = importlib.util.spec_from_file_location("_hostile24_op_profile", ROOT / "benchmarks" / "op_profile.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script.bench, "gemm_peak", lambda *a, **k: pytest.fail("measured before refusing"))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exit_:
            script.main(argv)
    finally:
        torch.set_num_threads(threads)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@needs_onednn
def test_model_with_tied_layers_trains_as_transformers_with_the_same_tie():
    """Stage two's blocks share their Mix-FFN weights (dense1, expanding 32 -> 64, and dense2, contracting): each
    shared weight's gradient is the sum over both blocks, through both orientations of the weight-gradient product,
    accumulated over two steps with ``zero_grad(set_to_none=False)`` and clipped, as transformers' in float64."""
    config = PvtV2Config(num_labels=5, drop_path_rate=0.0, **TINY)
    ours = random_weights_(PvtV2ForImageClassification(config), seed=11).train()
    theirs = transformers.PvtV2ForImageClassification(hf_config(config))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.double().train()
    for model in (ours, theirs):
        first, second = model.pvt_v2.encoder.layers[1].blocks
        second.mlp.dense1.weight = first.mlp.dense1.weight
        second.mlp.dense2.weight = first.mlp.dense2.weight
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 3, 48, 40, generator=gen) for _ in range(2)]
    labels = [torch.tensor([1, 4]), torch.tensor([0, 3])]
    for model in (ours, theirs):
        model.zero_grad(set_to_none=False)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    with fast.train_gemm("onednn"):
        for x, y in zip(xs, labels):
            loss = ours(x, labels=y).loss
            todo, seen, nodes = [loss.grad_fn], set(), 0
            while todo:
                node = todo.pop()
                if node is not None and node not in seen:
                    seen.add(node)
                    nodes += type(node).__name__ == "OneDnnLinearBackward"
                    todo.extend(n for n, _ in node.next_functions)
            assert nodes == 5 * sum(config.depths)
            loss.backward()
    for x, y in zip(xs, labels):
        theirs(x.double(), labels=y).loss.backward()
    norm_theirs = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5)
    norm_ours = torch.nn.utils.clip_grad_norm_(ours.parameters(), 0.5)
    assert abs(norm_ours.item() - norm_theirs.item()) < 1e-5 * norm_theirs.item()
    want = dict(theirs.named_parameters())
    got = dict(ours.named_parameters())
    assert set(want) == set(got)
    scale = max(p.grad.abs().max().item() for p in want.values())
    tied = "pvt_v2.encoder.layers.1.blocks.0.mlp.dense1.weight"
    assert want[tied].grad.abs().max().item() > 1e-2 * scale  # a gradient of weight, not noise
    for name, p in got.items():
        assert p.grad.stride() == p.stride(), name
        assert (want[name].grad - p.grad).abs().max().item() < 1e-5 * scale, name


def test_gpu_plan_names_every_case_once():
    """Every case of the GPU plan has its own name (the table's rows, ``--match``, "skipped" lines): the B2
    training step compiled in the default mode and with "reduce-overhead" were both "b2 cls b64 224 bf16 train
    compile"."""
    spec = importlib.util.spec_from_file_location("_hostile24_bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for dry_run in (False, True):
        names = [script.bench._case_name(c) for c in script.plan(argparse.Namespace(dry_run=dry_run))]
        assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
    names = [script.bench._case_name(c) for c in script.plan(argparse.Namespace(dry_run=False))]
    assert names[-2:] == ["b2 cls b64 224 bf16 train compile", "b2 cls b64 224 bf16 train compile reduce-overhead"]
    assert "b2 cls b1 224 bf16 infer compile reduce-overhead" in names
    cpu_case = {"model": "pvt_v2_b0", "backbone": False, "batch": 1, "size": 224, "dtype": "fp32", "train": False,
                "compile": True}  # bench.py's CPU cases: compile is True or False
    assert script.bench._case_name(cpu_case) == "b0 cls b1 224 fp32 infer compile"
