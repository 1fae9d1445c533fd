"""Training under CPU bf16 autocast (pvtv2.fast.train: Bf16Linear, Bf16DepthwiseConv, patch_conv): the same outputs
and gradients as the reference path (fast path off) to bf16 rounding, as close to transformers' under the same
autocast as the reference is, each piece against float64, and the reference operators wherever a piece does not
apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import TINY, hf_config, random_weights_, relative_error
from torch import nn

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast
from pvtv2.fast import train as train_mod

pytestmark = pytest.mark.skipif(
    not fast.fast_path_available(torch.bfloat16), reason="no oneDNN bf16 operators on this CPU"
)

NODES = ("Bf16LinearBackward", "Bf16DepthwiseConvBackward")


def _nodes(out: torch.Tensor) -> dict[str, int]:
    seen, todo, counts = set(), [out.grad_fn], dict.fromkeys(NODES, 0)
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = type(node).__name__
        if name in counts:
            counts[name] += 1
        todo.extend(n for n, _ in node.next_functions)
    return counts


def _pair(seed: int, **kwargs):
    config = PvtV2Config(num_labels=5, drop_path_rate=0.0, **dict(TINY, **kwargs))
    ours = random_weights_(PvtV2ForImageClassification(config), seed=seed).train()
    theirs = transformers.PvtV2ForImageClassification(hf_config(config)).train()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def _step(model, x, labels, fast_on: bool = True, choice: str = "onednn"):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with fast.fast_path(fast_on), fast.train_gemm(choice), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=labels)
        counts = _nodes(out.loss)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads["input"] = x.grad.clone()
    return out.logits.float().detach(), grads, counts


def _worst(want: dict, got: dict) -> float:
    """The largest gradient difference over the largest gradient (a gradient that is itself rounding noise, as the
    keys' bias, is held to the scale of the others)."""
    scale = max(g.abs().max().item() for g in want.values())
    return max((want[n] - got[n]).abs().max().item() for n in want) / scale


@pytest.mark.parametrize(
    "size, sr_patches",
    # 64 x 64: stages of 16, 8, 4 and 2 px, every reduction (8, 4, 2) divides its grid: three patch GEMMs (stages 1-3,
    # one block each in stages 1 and 3, two in stage 2: 4 of them). 72 x 64: stage 1 is 18 x 16, which 8 does not
    # divide, stage 2 9 x 8 (4 does not divide), stage 3 5 x 4: the patch GEMMs over the grids cropped as the
    # convolution crops them (tests/fast/test_hostile_bf16_train29.py).
    [((64, 64), 4), ((72, 64), 4)],
    ids=["divisible", "not-divisible"],
)
def test_outputs_and_gradients_equal_the_reference_path_and_transformers(size, sr_patches):
    ours, theirs = _pair(seed=3)
    gen = torch.Generator().manual_seed(4)
    # Batch 4 at 64 px: 1,024 rows in stage 1, where the expanding layers' weight gradients take the [x, 1].T @ grad
    # form (FLIP_MIN_ROWS).
    x = torch.randn(4, 3, *size, generator=gen)
    labels = torch.tensor([4, 1, 0, 2])
    assert x.shape[0] * (size[0] // 4) * (size[1] // 4) >= train_mod.FLIP_MIN_ROWS

    logits, grads, counts = _step(ours, x, labels)
    ref_logits, ref_grads, ref_counts = _step(ours, x, labels, fast_on=False)
    hf_logits, hf_grads, _ = _step(theirs, x, labels)
    blocks = sum(ours.config.depths)
    assert counts == {"Bf16LinearBackward": 5 * blocks + sr_patches, "Bf16DepthwiseConvBackward": blocks}
    assert ref_counts == dict.fromkeys(NODES, 0)
    assert set(grads) == set(ref_grads) == set(hf_grads)

    # The reference path under autocast is transformers' computation, bit for bit or nearly.
    assert relative_error(hf_logits, ref_logits) < 1e-6
    # Ours: the same to bf16 rounding (2^-8 relative per rounding, a few roundings deep).
    assert relative_error(ref_logits, logits) < 1e-2
    worst_ours = _worst(ref_grads, grads)
    assert worst_ours < 2e-2, worst_ours
    # Against an fp32 step, ours is as close as the reference (= transformers) under the same autocast.
    ours.zero_grad(set_to_none=True)
    x32 = x.clone().requires_grad_(True)
    ours(x32, labels=labels).loss.backward()
    exact = {n: p.grad.clone() for n, p in ours.named_parameters()}
    exact["input"] = x32.grad.clone()
    assert _worst(exact, grads) < 2 * _worst(exact, hf_grads) + 1e-3


def _rel64(want: torch.Tensor, got: torch.Tensor) -> float:
    return ((want - got.double()).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("rows, fin, fout", [(1500, 24, 56), (1500, 56, 24), (40, 24, 56)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_against_float64(rows, fin, fout, bias):
    """Bf16Linear's three gradients against float64 products of the same bf16 operands: the flipped GEMM with the
    ones column (expanding, >= FLIP_MIN_ROWS rows), and the direct products otherwise."""
    gen = torch.Generator().manual_seed(rows + fin)
    x = torch.randn(3, rows // 3, fin, generator=gen).requires_grad_(True)
    w = (torch.randn(fout, fin, generator=gen) * 0.2).requires_grad_(True)
    b = torch.randn(fout, generator=gen).requires_grad_(True) if bias else None
    g = torch.randn(3, rows // 3, fout, generator=gen)
    with fast.train_gemm("onednn"), torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast.linear(x, w, b)
    assert type(out.grad_fn).__name__ == "Bf16LinearBackward" and out.dtype == torch.bfloat16
    out.backward(g)
    x64, w64, g64 = (t.detach().bfloat16().double() for t in (x, w, g.bfloat16()))
    g2 = g64.reshape(-1, fout)
    want = x64 @ w64.T + (b.detach().bfloat16().double() if bias else 0)
    assert _rel64(want, out) < 1e-2
    assert _rel64(g64 @ w64, x.grad) < 1e-2
    assert _rel64(g2.T @ x64.reshape(-1, fin), w.grad) < 1e-2
    assert w.grad.dtype == torch.float32 and w.grad.stride() == (fin, 1)
    if bias:
        assert _rel64(g2.sum(0), b.grad) < 1e-2 and b.grad.dtype == torch.float32


def test_depthwise_conv_and_patch_conv_against_float64():
    gen = torch.Generator().manual_seed(5)
    dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
    sr = nn.Conv2d(16, 24, 4, 4)
    x = torch.randn(2, 16, 12, 8, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    g = torch.randn(2, 16, 12, 8, generator=gen)
    with fast.train_gemm("onednn"), torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast.depthwise_conv(dw, x)
    assert type(out.grad_fn).__name__ == "Bf16DepthwiseConvBackward"
    out.backward(g)
    x64, w64 = x.detach().bfloat16().double().requires_grad_(True), dw.weight.detach().bfloat16().double()
    w64.requires_grad_(True)
    b64 = dw.bias.detach().bfloat16().double().requires_grad_(True)
    want = F.conv2d(x64, w64, b64, 1, 1, 1, 16)
    want.backward(g.bfloat16().double())
    assert _rel64(want.detach(), out) < 1e-2
    for mine, exact in ((x.grad, x64.grad), (dw.weight.grad, w64.grad), (dw.bias.grad, b64.grad)):
        assert _rel64(exact, mine) < 1e-2

    tokens = torch.randn(2, 12, 8, 16, generator=gen).requires_grad_(True)  # (B, H, W, C)
    with fast.train_gemm("onednn"), torch.autocast("cpu", dtype=torch.bfloat16):
        reduced = fast.patch_conv(sr, tokens)
    assert reduced.shape == (2, 3 * 2, 24)
    gr = torch.randn(2, 6, 24, generator=gen)
    reduced.backward(gr)
    t64 = tokens.detach().bfloat16().double().requires_grad_(True)
    sw64 = sr.weight.detach().bfloat16().double().requires_grad_(True)
    sb64 = sr.bias.detach().bfloat16().double().requires_grad_(True)
    want = F.conv2d(t64.permute(0, 3, 1, 2), sw64, sb64, stride=4)  # (2, 24, 3, 2)
    want = want.permute(0, 2, 3, 1).reshape(2, 6, 24)
    want.backward(gr.bfloat16().double())
    assert _rel64(want.detach(), reduced) < 1e-2
    for mine, exact in ((tokens.grad, t64.grad), (sr.weight.grad, sw64.grad), (sr.bias.grad, sb64.grad)):
        assert _rel64(exact, mine) < 1e-2


def test_pieces_apply_only_where_measured_and_exact():
    """The reference operators everywhere else: fast path off, train_gemm('aten'), no autocast, fp16 autocast,
    float64 tensors, no gradient, hooks, and shapes other than the pieces'."""
    gen = torch.Generator().manual_seed(6)
    dw = nn.Conv2d(8, 8, 3, 1, 1, groups=8)
    sr = nn.Conv2d(8, 8, 2, 2)
    lin = nn.Linear(8, 16)
    x = torch.randn(2, 8, 6, 6, generator=gen).contiguous(memory_format=torch.channels_last)
    tokens = x.permute(0, 2, 3, 1)

    def kinds(choice="onednn", dtype=torch.bfloat16, enabled=True, fast_on=True, grad=True):
        with (
            fast.fast_path(fast_on),
            fast.train_gemm(choice),
            torch.set_grad_enabled(grad),
            torch.autocast("cpu", dtype=dtype, enabled=enabled),
        ):
            d = fast.depthwise_conv(dw, x)
            s = fast.patch_conv(sr, tokens)
            li = fast.linear(tokens, lin.weight, lin.bias)
        return (
            type(d.grad_fn).__name__ if d.grad_fn else None,
            s is not None,
            type(li.grad_fn).__name__ if li.grad_fn else None,
        )

    assert kinds() == ("Bf16DepthwiseConvBackward", True, "Bf16LinearBackward")
    assert kinds(fast_on=False) == ("ConvolutionBackward0", False, "ViewBackward0")
    assert kinds(choice="aten") == ("ConvolutionBackward0", False, "ViewBackward0")
    assert kinds(enabled=False)[:2] == ("ConvolutionBackward0", False)
    assert kinds(dtype=torch.float16)[:2] == ("ConvolutionBackward0", False)
    assert kinds(grad=False) == (None, False, None)
    with torch.autocast("cpu", dtype=torch.bfloat16), fast.train_gemm("onednn"):
        # float64 weights: autocast leaves them, and so does the path.
        assert fast.patch_conv(nn.Conv2d(8, 8, 2, 2).double(), tokens.double()) is None
        # Smaller than one patch, padding, overlapping windows, groups: the convolution.
        assert fast.patch_conv(sr, tokens[:, :1]) is None
        assert fast.patch_conv(nn.Conv2d(8, 8, 2, 2, padding=1), tokens) is None
        assert fast.patch_conv(nn.Conv2d(8, 8, 3, 2), tokens) is None
        assert fast.patch_conv(nn.Conv2d(8, 8, 2, 2, groups=2), tokens) is None
        assert fast.depthwise_conv(nn.Conv2d(8, 8, 3, 2, 1, groups=8), x).grad_fn.name() == "ConvolutionBackward0"
        assert fast.depthwise_conv(nn.Conv2d(8, 8, 3, 1, 1, groups=4), x).grad_fn.name() == "ConvolutionBackward0"
        hooked = nn.Conv2d(8, 8, 3, 1, 1, groups=8)
        hooked.register_forward_hook(lambda m, i, o: o * 2)
        assert relative_error(2 * F.conv2d(x, hooked.weight, hooked.bias, 1, 1, 1, 8).float(),
                              fast.depthwise_conv(hooked, x).float()) < 1e-2  # the hook ran
        # No output features: F.linear's empty result (oneDNN's inner product is not asked).
        empty = fast.linear(tokens, torch.randn(0, 8, requires_grad=True))
        assert empty.shape == (2, 6, 6, 0) and type(empty.grad_fn).__name__ != "Bf16LinearBackward"
        hooked_sr = nn.Conv2d(8, 8, 2, 2)
        hooked_sr.register_forward_hook(lambda m, i, o: o)
        assert fast.patch_conv(hooked_sr, tokens) is None


def test_double_backward_equals_the_reference_path():
    """A gradient penalty (create_graph=True) through the three pieces: the reference path's second-order
    gradients to bf16 rounding."""
    ours, _ = _pair(seed=7)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(8))

    def penalty(fast_on):
        ours.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with fast.fast_path(fast_on), fast.train_gemm("onednn"), torch.autocast("cpu", dtype=torch.bfloat16):
            out = ours(xi).logits.float().square().mean()
            counts = _nodes(out)
            (gx,) = torch.autograd.grad(out, xi, create_graph=True)
        gx.square().sum().backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}, counts

    got, counts = penalty(True)
    want, ref_counts = penalty(False)
    assert counts["Bf16LinearBackward"] > 0 and counts["Bf16DepthwiseConvBackward"] > 0
    assert ref_counts == dict.fromkeys(NODES, 0)
    assert set(got) == set(want)
    assert _worst(want, got) < 5e-2


def test_capability_probe_outside_autocast():
    """The first use of the fast paths may come under bf16 autocast (a bf16 training step): the fp32 probe then
    compared oneDNN's fp32 products with bf16 references, failed, and the failure was cached for the process."""
    import subprocess
    import sys

    code = (
        "import torch\nfrom pvtv2 import fast\n"
        "with torch.autocast('cpu', dtype=torch.bfloat16):\n    inside = fast.fast_path_available(torch.float32)\n"
        "print(inside, fast.fast_path_available(torch.float32))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    with torch.autocast("cpu", enabled=False):
        expected = str(fast.fast_path_available(torch.float32))
    assert out.stdout.split() == [expected, expected]


def test_gradient_checkpointing_recomputes_the_same_pieces():
    """Blocks recomputed in the backward pass (gradient checkpointing) take the same pieces as their first forward:
    the gradients of the model without checkpointing, bit for bit (the same kernels on the same operands)."""
    ours, _ = _pair(seed=9)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(10))
    labels = torch.tensor([0, 1, 2, 3])
    _, plain, counts = _step(ours, x, labels)
    ours.gradient_checkpointing_enable()
    _, checkpointed, _ = _step(ours, x, labels)
    assert counts["Bf16DepthwiseConvBackward"] > 0
    assert set(plain) == set(checkpointed)
    for name, g in plain.items():
        assert torch.equal(g, checkpointed[name]), name
