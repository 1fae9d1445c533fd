"""The Triton LayerNorm of CUDA training (pvtv2.fast.cuda_train: the residual add and the norm, forward and
backward), checked on this CPU through Triton's interpreter (``TRITON_INTERPRET=1`` in a subprocess, and
``cuda_train.DEVICE_TYPE = "cpu"`` so that the functions take CPU tensors): outputs and gradients against PyTorch's
autograd through ``x + branch`` and ``F.layer_norm``, and a whole tiny model's loss and gradients against the
reference path. tests/test_cuda.py runs the model comparison on a GPU where there is one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import TINY

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import copy, json, sys
    import torch, torch.nn.functional as F
    sys.path.insert(0, sys.argv[1])
    from conftest import TINY, perturb_, relative_error
    from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast
    from pvtv2.fast import cuda_train

    cuda_train.DEVICE_TYPE = "cpu"
    torch.manual_seed(0)
    out = {}

    def grads(fn, *tensors):
        tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
        outs = fn(*tensors)
        outs = outs if isinstance(outs, tuple) else (outs,)
        gen = torch.Generator().manual_seed(1)
        loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outs)
        loss.backward()
        return [o.detach() for o in outs], [t.grad for t in tensors]

    # add_norm / norm against autograd through PyTorch's ops, odd sizes (rows and channels off the blocks).
    for c, rows in ((48, 37), (64, 301), (320, 9)):
        ln = torch.nn.LayerNorm(c, eps=1e-6)
        with torch.no_grad():
            ln.weight.copy_(1 + 0.3 * torch.randn(c))
            ln.bias.copy_(0.2 * torch.randn(c))
        for branch_dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, rows, c) * 2 + 0.5
            b = torch.randn(2, rows, c).to(branch_dtype)
            def reference(x, b, w, bias):
                total = x + b
                return total, F.layer_norm(total, (c,), w, bias, 1e-6)
            def fused(x, b, w, bias):
                return cuda_train.LayerNormFunction.apply(x, b, w, bias, 1e-6, torch.float32)
            w0, b0 = ln.weight.detach(), ln.bias.detach()
            want_out, want_grad = grads(reference, x, b, w0, b0)
            got_out, got_grad = grads(fused, x, b, w0, b0)
            key = f"add{c}_{str(branch_dtype)[6:]}"
            out[key] = [relative_error(w_, g_) for w_, g_ in zip(want_out + want_grad, got_out + got_grad)]
            out[key + "_dtypes"] = [str(t.dtype) for t in got_out + got_grad]
        x = torch.randn(3, rows, c)
        want_out, want_grad = grads(lambda x, w, b: F.layer_norm(x, (c,), w, b, 1e-6), x, ln.weight.detach(), ln.bias.detach())
        got_out, got_grad = grads(lambda x, w, b: cuda_train.LayerNormFunction.apply(x, None, w, b, 1e-6, x.dtype),
                                  x, ln.weight.detach(), ln.bias.detach())
        out[f"norm{c}"] = [relative_error(w_, g_) for w_, g_ in zip(want_out + want_grad, got_out + got_grad)]
        # bf16 input, fp32 output (what CUDA autocast's layer_norm gives): the norm of the bf16 values, in fp32.
        xb = torch.randn(3, rows, c).bfloat16()
        got = cuda_train.LayerNormFunction.apply(xb, None, ln.weight.detach(), ln.bias.detach(), 1e-6, torch.float32)
        out[f"norm{c}_bf16_in"] = [relative_error(F.layer_norm(xb.float(), (c,), ln.weight, ln.bias, 1e-6), got),
                                   str(got.dtype)]
        # bf16 weights (a model cast with .bfloat16()): gradients come back in bf16, as the reference's.
        # Against float64 (PyTorch's own bf16 backward on the CPU rounds along the way): one bf16 rounding.
        lnb = copy.deepcopy(ln).bfloat16()
        _, want_grad = grads(lambda x, w, b: F.layer_norm(x, (c,), w, b, 1e-6), xb.double(),
                             lnb.weight.detach().double(), lnb.bias.detach().double())
        _, got_grad = grads(lambda x, w, b: cuda_train.LayerNormFunction.apply(x, None, w, b, 1e-6, x.dtype),
                            xb, lnb.weight.detach(), lnb.bias.detach())
        out[f"norm{c}_bf16_grads"] = [[relative_error(w_, g_), str(g_.dtype)] for w_, g_ in zip(want_grad, got_grad)]

    def grad_error(ref, model):
        # Per parameter, relative to its gradient's size, but not below a thousandth of the largest gradient: the
        # keys' biases get gradients of zero up to rounding (softmax ignores a shift shared by all keys).
        scale = max(p.grad.abs().max().item() for p in ref.parameters())
        return max((p.grad - q.grad).abs().max().item() / max(p.grad.abs().max().item(), 1e-3 * scale)
                   for p, q in zip(ref.parameters(), model.parameters()))

    # Whole models, training mode (no dropout): loss and every gradient against the reference path, counting the
    # kernel calls (two norms per block, one backward each).
    from pvtv2.fast import kernels
    calls = {"forward": 0, "backward": 0}
    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper
    kernels.layer_norm_forward = counted("forward", kernels.layer_norm_forward)
    kernels.layer_norm_backward = counted("backward", kernels.layer_norm_backward)
    for linear in (False, True):
        model = perturb_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5, linear_attention=linear)))
        model.train()
        ref = copy.deepcopy(model)
        x = torch.randn(2, 3, 64, 48)
        labels = torch.tensor([1, 3])
        calls.update(forward=0, backward=0)
        with fast.train_gemm("aten"):
            loss = model(x, labels=labels).loss
            loss.backward()
            with fast.fast_path(False):
                want = ref(x, labels=labels).loss
                want.backward()
        name = "linear" if linear else "sra"
        out[name + "_calls"] = dict(calls)
        pairs = [(p.grad, q.grad) for p, q in zip(ref.parameters(), model.parameters())]
        out[name] = [relative_error(want.detach(), loss.detach()), grad_error(ref, model),
                     sum(a is None for a, _ in pairs), sum(b is None for _, b in pairs)]
        # Gradient checkpointing recomputes the blocks (and these functions) in the backward pass.
        ckpt = copy.deepcopy(ref)
        ckpt.zero_grad()
        for stage in ckpt.pvt_v2.encoder.layers:
            stage.gradient_checkpointing = True
        with fast.train_gemm("aten"):
            ckpt(x, labels=labels).loss.backward()
        out[name + "_ckpt"] = grad_error(ref, ckpt)
    # A hook on a norm: the module is called (the hook runs and what it returns is used).
    model = perturb_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5))).train()
    ln = model.pvt_v2.encoder.layers[0].blocks[0].layer_norm_2
    hook_calls = []
    ln.register_forward_hook(lambda m, i, o: hook_calls.append(1) or o * 2)
    with fast.train_gemm("aten"):
        hooked = model(torch.randn(2, 3, 64, 48)).logits
        with fast.fast_path(False):
            plain = model(torch.randn(2, 3, 64, 48)).logits
    out["hook_calls"] = len(hook_calls)
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    script = tmp_path_factory.mktemp("interp") / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    tests = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(script), str(tests)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("c", [48, 64, 320])
def test_add_norm_equals_add_then_layer_norm(results, c):
    # outputs (sum, norm) then gradients (x, branch, weight, bias): fp32 rounding of the same formulas
    for dtype in ("float32", "bfloat16"):
        errors = results[f"add{c}_{dtype}"]
        assert len(errors) == 6
        assert errors[0] == 0.0, errors  # the sum: PyTorch's own add in fp32
        assert max(errors[1:]) < 2e-6 if dtype == "float32" else max(errors[1:3]) < 2e-6, errors
        if dtype == "bfloat16":
            assert errors[3] < 1e-2, errors  # the branch's gradient, rounded to bf16 as the reference's
            assert max(errors[4:]) < 2e-6, errors
        assert results[f"add{c}_{dtype}_dtypes"] == ["torch.float32", "torch.float32", "torch.float32",
                                                      f"torch.{dtype}", "torch.float32", "torch.float32"]


@pytest.mark.slow
@pytest.mark.parametrize("c", [48, 64, 320])
def test_norm_equals_layer_norm(results, c):
    assert max(results[f"norm{c}"]) < 2e-6, results[f"norm{c}"]
    error, dtype = results[f"norm{c}_bf16_in"]
    assert error < 2e-6 and dtype == "torch.float32"
    for error, dtype in results[f"norm{c}_bf16_grads"]:
        assert dtype == "torch.bfloat16"
        assert error < 8e-3  # one bf16 rounding of the exact values


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sra", "linear"])
def test_training_gradients_equal_the_reference_path(results, variant):
    loss_error, grad_error, ref_missing, missing = results[variant]
    assert loss_error < 1e-6
    assert grad_error < 1e-4
    assert ref_missing == missing == 0
    assert results[variant + "_ckpt"] < 1e-4
    blocks = sum(TINY["depths"])
    assert results[variant + "_calls"] == {"forward": 2 * blocks, "backward": 2 * blocks}


@pytest.mark.slow
def test_a_hooked_norm_is_called(results):
    assert results["hook_calls"] == 2  # once with the fast path on, once off
