"""The fast GPU path's Triton kernels and fused stage, checked on this CPU through Triton's interpreter
(``TRITON_INTERPRET=1``, set in a subprocess before Triton is imported): the same numbers as PyTorch's LayerNorm,
depthwise convolution and GELU, and as the reference stage, for spatial-reduction and linear attention, in fp32 and
in bf16. tests/test_cuda.py runs the same comparisons on a GPU where there is one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import copy, json, sys
    import torch, torch.nn.functional as F
    sys.path.insert(0, sys.argv[1])
    from conftest import TINY, perturb_, relative_error
    from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast
    from pvtv2.fast import cuda, kernels

    torch.manual_seed(0)
    out = {}
    # Kernels against PyTorch, on odd sizes (rows and channels not multiples of the blocks).
    for c in (48, 64, 320):
        x, r = torch.randn(3, 37, c), torch.randn(3, 37, c).bfloat16()
        w, b = 1 + 0.1 * torch.randn(c), torch.randn(c)
        out[f"ln{c}"] = relative_error(F.layer_norm(x, (c,), w, b, 1e-6), kernels.layer_norm(x, w, b, 1e-6))
        total, y = kernels.layer_norm(x, w, b, 1e-5, torch.bfloat16, residual=r)
        out[f"ln{c}_sum"] = relative_error(x + r, total)
        out[f"ln{c}_sum_dtype"] = str(total.dtype) + " " + str(y.dtype)
        out[f"ln{c}_res"] = relative_error(F.layer_norm(x + r, (c,), w, b, 1e-5), y.float())
    for c, h, w_ in ((64, 7, 5), (96, 4, 9), (200, 3, 3)):
        x = torch.randn(2, h * w_, c)
        conv = torch.nn.Conv2d(c, c, 3, 1, 1, groups=c)
        want = F.gelu(conv(x.view(2, h, w_, c).permute(0, 3, 1, 2))).permute(0, 2, 3, 1).reshape(2, h * w_, c)
        got = kernels.depthwise_conv_gelu(x, h, w_, conv.weight.detach(), conv.bias.detach())
        out[f"dw{c}"] = relative_error(want, got)
    # The fused stage against the reference stage, whole models.
    for linear in (False, True):
        model = perturb_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5, linear_attention=linear))).eval()
        x = torch.randn(2, 3, 64, 48)
        low = copy.deepcopy(model).bfloat16()  # a bf16 model (CPU autocast keeps other dtypes than CUDA's)
        with torch.no_grad():
            with fast.fast_path(False):
                want = model.pvt_v2(x).last_hidden_state
                want_bf16 = low.pvt_v2(x.bfloat16()).last_hidden_state
            got, got_bf16 = x, x.bfloat16()
            for stage, low_stage in zip(model.pvt_v2.encoder.layers, low.pvt_v2.encoder.layers):
                got, got_bf16 = cuda.fused_stage_forward(stage, got), cuda.fused_stage_forward(low_stage, got_bf16)
        name = "linear" if linear else "sra"
        out[name] = relative_error(want, got)
        out[name + "_bf16"] = relative_error(want, got_bf16)
        out[name + "_bf16_reference"] = relative_error(want, want_bf16)
        out[name + "_bf16_vs_reference"] = relative_error(want_bf16, got_bf16)
        out[name + "_dtype"] = str(got.dtype) + " " + str(got_bf16.dtype) + " " + str(want_bf16.dtype)
    # Models the fused code must not assume away: norms without affine weights, depthwise convolutions without
    # bias, a bf16 model whose norms were kept in fp32 (PyTorch's LayerNorm returns its input's dtype then).
    base = perturb_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5))).eval()
    variants = {"no_affine": copy.deepcopy(base), "no_conv_bias": copy.deepcopy(base),
                "fp32_norms": copy.deepcopy(base).bfloat16()}
    for m in variants["no_affine"].modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.weight = m.bias = None
    for m in variants["no_conv_bias"].modules():
        if isinstance(m, torch.nn.Conv2d) and m.groups > 1:
            m.bias = None
    for m in variants["fp32_norms"].modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.float()
    for name, model in variants.items():
        x = torch.randn(2, 3, 64, 48).to(next(model.parameters()).dtype)
        with torch.no_grad():
            with fast.fast_path(False):
                want = model.pvt_v2(x).last_hidden_state
            got = x
            try:
                for stage in model.pvt_v2.encoder.layers:
                    got = cuda.fused_stage_forward(stage, got)
                out[name] = [relative_error(want.float(), got.float()), str(want.dtype), str(got.dtype)]
            except Exception as exc:
                out[name] = [repr(exc)[:300], str(want.dtype), ""]
    # A frozen stage keeps the weights autocast casts (and the keys' and values' concatenated): the same numbers as
    # an unfrozen one, bit for bit, on the call that keeps them and on the next.
    frozen = fast.freeze(copy.deepcopy(base))
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        results = []
        for model in (base, frozen, frozen):
            got = x
            for stage in model.pvt_v2.encoder.layers:
                got = cuda.fused_stage_forward(stage, got)
            results.append(got)
    out["frozen_equal"] = [bool(torch.equal(results[0], r)) for r in results[1:]]
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
def test_layer_norm_kernel_equals_pytorchs(results):
    for c in (48, 64, 320):
        assert results[f"ln{c}"] < 1e-6, results
        assert results[f"ln{c}_sum"] == 0.0, results  # fp32 + bf16 in fp32: exactly PyTorch's sum
        assert results[f"ln{c}_sum_dtype"] == "torch.float32 torch.bfloat16"
        assert results[f"ln{c}_res"] < 1e-2, results  # one bf16 rounding of the normalised values


@pytest.mark.slow
def test_depthwise_conv_gelu_kernel_equals_pytorchs(results):
    for c in (64, 96, 200):
        assert results[f"dw{c}"] < 1e-6, results


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sra", "linear"])
def test_fused_stage_equals_the_reference_stage(results, variant):
    assert results[variant] < 1e-5, results
    assert results[variant + "_dtype"] == "torch.float32 torch.bfloat16 torch.bfloat16"
    # A bf16 model: no further from the fp32 result than the reference path in bf16.
    assert results[variant + "_bf16"] < 2e-2, results
    assert results[variant + "_bf16"] <= 1.5 * results[variant + "_bf16_reference"] + 1e-3, results


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["no_affine", "no_conv_bias", "fp32_norms"])
def test_fused_stage_on_unusual_modules(results, variant):
    error, want_dtype, got_dtype = results[variant]
    assert got_dtype == want_dtype, results[variant]
    # fp32 models: fp32 rounding; the bf16 one: within bf16 rounding of the reference path's own bf16 result.
    assert error < (3e-2 if want_dtype == "torch.bfloat16" else 1e-5), results[variant]


@pytest.mark.slow
def test_fused_stage_of_a_frozen_model_equals_the_unfrozen_one(results):
    assert results["frozen_equal"] == [True, True], results["frozen_equal"]


def test_compute_dtype_keeps_float64_under_autocast():
    """Autocast leaves float64 alone, so a float64 model under autocast computes in float64 (the fused path, sized
    and cast by this dtype, must not take it for a bf16 one)."""
    import torch

    from pvtv2.fast import cuda as cuda_path

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cuda_path._compute_dtype(torch.zeros(2, dtype=torch.float64)) == torch.float64
        assert cuda_path._compute_dtype(torch.zeros(2)) == torch.bfloat16
    assert cuda_path._compute_dtype(torch.zeros(2, dtype=torch.float16)) == torch.float16
