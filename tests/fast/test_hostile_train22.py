"""Hostile checks of the training GEMMs through oneDNN (pvtv2.fast.train) and of the fast inference path's
operands: strided biases, backward hooks, forward-mode AD, tensor subclasses, sparse weights and bad shapes. Each is
held to transformers' numbers, F.linear's, or a closed form in float64."""

from __future__ import annotations

import io

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast

from conftest import TINY, hf_twin as _hf, random_weights_, relative_error

pytestmark = pytest.mark.skipif(not fast.fast_path_available(), reason="oneDNN's operators unavailable here")


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t`` in a non-contiguous tensor (every other element of a buffer twice as long)."""
    buffer = torch.stack([t.detach(), torch.full_like(t, 1e3)], dim=-1)
    return buffer[..., 0]


def _model_with_strided_operands(seed: int) -> nn.Module:
    """A model whose Linear and Conv2d biases are strided views and whose Linear weights are transposed views, as
    ``load_state_dict(assign=True)`` from sliced or transposed tensors gives: same values, other memory layout."""
    config = PvtV2Config(**TINY, num_labels=5, drop_path_rate=0.0)
    model = random_weights_(PvtV2ForImageClassification(config), seed=seed)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
            module.bias = nn.Parameter(_strided(module.bias))
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(module.weight.detach().t().contiguous().t())
    assert not model.pvt_v2.encoder.layers[0].blocks[0].mlp.dense1.bias.is_contiguous()
    return model


@pytest.mark.parametrize("choice", ["onednn", "aten"])
def test_training_with_strided_biases_matches_transformers(choice):
    ours = _model_with_strided_operands(seed=1).train()
    theirs = _hf(ours).double().train()
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 4])
    theirs(x.double(), labels=labels).loss.backward()
    with fast.train_gemm(choice):
        loss = ours(x, labels=labels).loss
        loss.backward()
    want = dict(theirs.named_parameters())
    assert relative_error(theirs(x.double(), labels=labels).loss, loss) < 1e-5
    scale = max(p.grad.abs().max().item() for p in want.values())
    for name, p in ours.named_parameters():
        # Every gradient within 1e-5 of the largest one (a few are attention rounding noise of their own).
        assert (want[name].grad - p.grad.double()).abs().max().item() < 1e-5 * scale, name


@pytest.mark.parametrize("frozen", [False, True], ids=["unfrozen", "frozen"])
def test_inference_with_strided_biases_matches_transformers(frozen):
    ours = _model_with_strided_operands(seed=2).eval()
    theirs = _hf(ours).eval()
    if frozen:
        fast.freeze(ours)
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(x).logits
        assert relative_error(want, ours(x).logits) < 1e-4
        if fast.fast_path_available(torch.bfloat16):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                theirs_low = theirs(x).logits
                low = ours(x).logits
            assert relative_error(want, low.float()) < 2 * relative_error(want, theirs_low.float()) + 2e-3


def test_linear_with_strided_bias_and_weight_closed_form():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 24, generator=gen, dtype=torch.float64)
    w = torch.randn(40, 24, generator=gen, dtype=torch.float64)
    b = torch.randn(40, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 5, 40, generator=gen, dtype=torch.float64)
    for bias in (_strided(b.float()), b.float()[:1].expand(40) + 0 * b.float(), b.float()[:1].expand(40)):
        xi = x.float().requires_grad_(True)
        wi = w.float().t().contiguous().t().requires_grad_(True)
        bi = bias.detach().clone() if bias.is_contiguous() else bias.detach()
        bi.requires_grad_(True)
        with fast.train_gemm("onednn"):
            out = fast.linear(xi, wi, bi)
        assert type(out.grad_fn).__name__ == "OneDnnLinearBackward"
        out.backward(g.float())
        b64 = bi.detach().double()
        assert relative_error(x @ w.T + b64, out) < 1e-5
        assert relative_error(g @ w, xi.grad) < 1e-5
        assert relative_error(g.reshape(-1, 40).T @ x.reshape(-1, 24), wi.grad) < 1e-5
        assert relative_error(g.sum((0, 1)), bi.grad) < 1e-5


@pytest.mark.parametrize("choice", ["onednn", "aten"])
@pytest.mark.parametrize("where", ["attention.query", "attention.key", "attention.proj", "mlp.dense1", "mlp.dense2"])
def test_backward_hooks_on_a_linear_layer_run(choice, where):
    """A full backward hook (and a backward pre-hook) on one of the blocks' Linear layers runs once per backward
    pass and sees the gradient transformers' layer receives."""
    config = PvtV2Config(**TINY, num_labels=5, drop_path_rate=0.0)
    ours = random_weights_(PvtV2ForImageClassification(config), seed=3).train()
    theirs = _hf(ours).train()
    path = f"pvt_v2.encoder.layers.1.blocks.0.{where}"
    seen = {"ours": [], "theirs": [], "pre": []}
    ours.get_submodule(path).register_full_backward_hook(lambda m, gi, go: seen["ours"].append(go[0].detach()))
    ours.get_submodule(path).register_full_backward_pre_hook(lambda m, go: seen["pre"].append(go[0].detach()))
    theirs.get_submodule(path).register_full_backward_hook(lambda m, gi, go: seen["theirs"].append(go[0].detach()))
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))  # 6 keys in stage 2 (one: no
    labels = torch.tensor([0, 3])  # gradient to the queries at all)
    theirs(x, labels=labels).loss.backward()
    with fast.train_gemm(choice):
        ours(x, labels=labels).loss.backward()
    assert len(seen["ours"]) == len(seen["pre"]) == len(seen["theirs"]) == 1
    assert seen["theirs"][0].abs().max() > 0
    assert relative_error(seen["theirs"][0], seen["ours"][0]) < 1e-4
    assert relative_error(seen["theirs"][0], seen["pre"][0]) < 1e-4


def test_global_backward_hook_sees_the_blocks_linear_layers():
    config = PvtV2Config(**TINY, num_labels=5, drop_path_rate=0.0)
    ours = random_weights_(PvtV2ForImageClassification(config), seed=4).train()
    linears = sum(isinstance(m, nn.Linear) for m in ours.modules())
    calls = []

    def hook(module, grad_input, grad_output):
        if isinstance(module, nn.Linear):
            calls.append(module)

    handle = nn.modules.module.register_module_full_backward_hook(hook)
    try:
        with fast.train_gemm("onednn"):
            ours(torch.randn(1, 3, 32, 32)).logits.sum().backward()
    finally:
        handle.remove()
    assert len(calls) == linears  # every Linear (keys and values too, and the classifier) once


def test_forward_mode_ad_through_a_trainable_linear():
    """Dual tensors (torch.autograd.forward_ad) while the weights need gradients: F.linear's tangent, which for a
    linear layer is the layer applied to the tangent without its bias."""
    layer = nn.Linear(24, 40)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 24, generator=gen)
    t = torch.randn(4, 24, generator=gen)
    for choice in ("onednn", "aten"):
        with fast.train_gemm(choice), fwAD.dual_level():
            out = fast.module_linear(layer, fwAD.make_dual(x, t))
            primal, tangent = fwAD.unpack_dual(out)
        w = layer.weight.detach().double()
        assert relative_error(x.double() @ w.T + layer.bias.detach().double(), primal) < 1e-5
        assert relative_error(t.double() @ w.T, tangent) < 1e-5


class _RoundedWeight(torch.Tensor):
    """A weight subclass that F.linear sees rounded to steps of 1/2 (fake quantization, as tensor-subclass
    quantization libraries do while the module stays exactly an ``nn.Linear``)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            w = torch.Tensor._make_subclass(torch.Tensor, w).mul(2).round().div(2)
            with torch._C.DisableTorchFunctionSubclass():
                return F.linear(x, w, *args[2:], **kwargs)
        return super().__torch_function__(func, types, args, kwargs)


def test_weight_subclass_keeps_its_own_linear():
    layer = nn.Linear(24, 40)
    raw = torch.randn(40, 24, generator=torch.Generator().manual_seed(6))
    layer.weight = nn.Parameter(_RoundedWeight(raw.clone()), requires_grad=False)
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(7), requires_grad=True)
    with fast.train_gemm("onednn"):
        out = fast.module_linear(layer, x)
    want = x.detach().double() @ (raw.double() * 2).round().div(2).T + layer.bias.detach().double()
    assert relative_error(want, out) < 1e-5


def test_sparse_weight_is_left_to_f_linear():
    gen = torch.Generator().manual_seed(8)
    dense = torch.randn(40, 24, generator=gen) * (torch.rand(40, 24, generator=gen) < 0.3)
    x = torch.randn(5, 24, generator=gen, requires_grad=True)
    with fast.train_gemm("onednn"):
        out = fast.linear(x, dense.to_sparse().requires_grad_(True))
    assert relative_error(x.detach().double() @ dense.double().T, out) < 1e-5


def test_bad_and_degenerate_shapes_behave_as_f_linear():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 7, 24, generator=gen, requires_grad=True)
    with fast.train_gemm("onednn"):
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            fast.linear(torch.randn(3, 7, 23, requires_grad=True), torch.randn(40, 24), torch.randn(40))
        with pytest.raises(RuntimeError, match="size"):
            fast.linear(x, torch.randn(40, 24, requires_grad=True), torch.randn(39))
        v = torch.randn(24, generator=gen, requires_grad=True)  # a 1-D weight: F.linear gives (3, 7)
        out = fast.linear(x, v)
        assert relative_error(x.detach().double() @ v.detach().double(), out) < 1e-5
        empty = fast.linear(x, torch.randn(0, 24, requires_grad=True), torch.randn(0, requires_grad=True))
        assert empty.shape == (3, 7, 0)
        empty.sum().backward()
        assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("layout", ["overlapping", "expanded_rows", "expanded_cols", "transposed", "every_other_row"])
def test_linear_with_strided_inputs_and_gradients_closed_form(layout):
    """Inputs whose rows overlap in memory (``as_strided``), are broadcast (stride 0) or transposed, and output
    gradients of the same kinds: the float64 products."""
    gen = torch.Generator().manual_seed(10)
    make = {
        "overlapping": lambda rows, cols: torch.randn(rows * 3 + cols, generator=gen).as_strided((rows, cols), (3, 1)),
        "expanded_rows": lambda rows, cols: torch.randn(cols, generator=gen).expand(rows, cols),
        "expanded_cols": lambda rows, cols: torch.randn(rows, 1, generator=gen).expand(rows, cols),
        "transposed": lambda rows, cols: torch.randn(cols, rows, generator=gen).t(),
        "every_other_row": lambda rows, cols: torch.randn(2 * rows, cols, generator=gen)[::2],
    }[layout]
    x = make(21, 24)
    g = make(21, 40)
    w = torch.randn(40, 24, generator=gen, requires_grad=True)
    b = torch.randn(40, generator=gen, requires_grad=True)
    with fast.train_gemm("onednn"):
        out = fast.linear(x, w, b)
        assert type(out.grad_fn).__name__ == "OneDnnLinearBackward"
        grad_w, grad_b = torch.autograd.grad(out, [w, b], g)
    x64, g64 = x.double(), g.double()
    assert relative_error(x64 @ w.detach().double().T + b.detach().double(), out) < 1e-5
    assert relative_error(g64.T @ x64, grad_w) < 1e-5
    assert relative_error(g64.sum(0), grad_b) < 1e-5
    xr = x.clone().requires_grad_(True)  # the input's gradient, with a strided output gradient
    with fast.train_gemm("onednn"):
        (grad_x,) = torch.autograd.grad(fast.linear(xr, w, b), [xr], g)
    assert relative_error(g64 @ w.detach().double(), grad_x) < 1e-5


def test_jit_trace_with_autograd_on_records_f_linear():
    """``torch.jit.trace`` (deprecated, still what older ONNX and mobile exports run) traces with autograd on by
    default, so the blocks' linear layers took the training path, whose oneDNN call the tracer cannot record."""
    config = PvtV2Config(**dict(TINY, depths=[1, 1, 1, 1]), num_labels=3)
    ours = random_weights_(PvtV2ForImageClassification(config), seed=11).eval()
    theirs = _hf(ours).eval()

    class Logits(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x).logits

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    with fast.train_gemm("onednn"):
        traced = torch.jit.trace(Logits(ours), x, check_trace=False)
    with torch.no_grad():  # and without autograd: the reference stage, not the fused one (which crashed the tracer)
        traced_no_grad = torch.jit.trace(Logits(ours), x)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.no_grad():
        assert relative_error(theirs(x).logits, loaded(x)) < 1e-4
        assert relative_error(theirs(x).logits, traced_no_grad(x)) < 1e-4


@pytest.mark.skipif(not fast.fast_path_available(torch.bfloat16), reason="no bf16 fast path on this CPU")
def test_bf16_attention_with_many_keys_runs_sdpa_and_matches_transformers():
    """Under bf16 autocast the fast path's attention is bf16 GEMMs around an fp32 softmax where the keys are few;
    with many keys (sr_ratio 1, high resolution) that materialises the whole fp32 score matrix, measured 2-4x slower
    than SDPA's tiled kernel at 1024 px with 640 MB more memory, so SDPA runs there. Both as close to the fp32
    reference as transformers' own attention under the same autocast."""
    from test_fastpath import bf16_stages_as_close_as_transformers, hf_pair

    config = PvtV2Config(**dict(TINY, sr_ratios=[1, 1, 1, 1]), num_labels=4)
    ours, theirs = hf_pair(config, seed=13)
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(14))
    # Keys per stage: 16x20 = 320 and 8x10 = 80 (many: SDPA), 4x5 = 20 and 2x3 = 6 (few: two matmuls each).
    many = config.depths[0] + config.depths[1]
    few = config.depths[2] + config.depths[3]
    counts = bf16_stages_as_close_as_transformers(ours, theirs, x)
    assert counts.get("aten::scaled_dot_product_attention", 0) == many
    assert counts.get("aten::matmul", 0) == 2 * few


@pytest.mark.parametrize("frozen", [False, True], ids=["unfrozen", "frozen"])
def test_layers_without_biases_in_the_fast_path(frozen):
    """Every Linear and Conv2d without a bias (the Mix-FFN's depthwise convolution included, whose bias the fused
    GELU convolution read unconditionally): the reference stage's numbers, which are public operators only."""
    config = PvtV2Config(**TINY, num_labels=3)
    model = random_weights_(PvtV2ForImageClassification(config), seed=15).eval()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.register_parameter("bias", None)
    if frozen:
        fast.freeze(model)
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        with fast.fast_path(False):
            want = model(x).logits
        assert relative_error(want, model(x).logits) < 1e-5
