"""The fast CPU training path: a PVTv2 stage whose Mix-FFNs run in cache-sized pieces and recompute their wide
hidden activation in the backward pass.

The Mix-FFN's hidden activation is ``mlp_ratio`` (4 to 8) times wider than the tokens. Autograd on the reference
layers keeps three copies of it for the backward pass (the depthwise convolution's input, the activation's input,
dense2's input) and streams each through main memory several times. Here one autograd node computes the whole
Mix-FFN:

- forward, per group of whole images (``pvtv2.fast.cpu.FFN_PIECE_BYTES`` of hidden activation): dense1, the
  depthwise convolution with its GELU fused (oneDNN, where the probe passed), dense2; it keeps only dense1's output;
- backward, per group: the convolution and the GELU again from dense1's output, then the gradients of dense2, the
  GELU, the convolution and dense1 while the group is in cache. Weight gradients are summed over the groups.

So training keeps one hidden activation per Mix-FFN instead of three, and the backward pass recomputes one
depthwise convolution and one GELU per Mix-FFN (measured in docs/benchmarks.md). Attention, the norms, drop path and
the patch embeddings run the reference modules.

**The contract** (tests/fast holds this module to it): the reference stage's outputs to 1e-5 and its gradients (for
the input and every parameter) to 1e-4, for the weights the modules hold at call time; nothing kept anywhere but in
the autograd graph of the call. It applies in training mode with autograd on, on CPU, in fp32 without autocast,
outside ``torch.compile``, without gradient checkpointing or attention maps; a block whose Mix-FFN has dropout, an
activation other than GELU or no biases runs its reference Mix-FFN. Its backward cannot be differentiated again:
``backward(create_graph=True)`` raises, naming ``with pvtv2.fast.fast_path(False):``, which runs the reference path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu

__all__ = ["mix_ffn", "train_applies", "train_stage_forward"]


def train_applies(stage: nn.Module, x: torch.Tensor) -> bool:
    """Whether a stage in training mode hands over to :func:`train_stage_forward` for ``x``."""
    return (
        cpu.fast_path_enabled()
        and stage.training
        and not getattr(stage, "gradient_checkpointing", False)
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def _pieceable(mlp: nn.Module) -> bool:
    """Whether ``mlp`` is a Mix-FFN this module computes: GELU, biases, no dropout (else the reference one runs)."""
    conv = mlp.dwconv.dwconv
    return (
        type(mlp.act) is nn.GELU
        and type(mlp.relu) in (nn.ReLU, nn.Identity)
        and not (mlp.training and mlp.dropout.p > 0)
        and mlp.dense1.bias is not None
        and mlp.dense2.bias is not None
        and conv.bias is not None
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == conv.in_channels == conv.out_channels
    )


def _conv_gelu(image: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    """GELU(depthwise 3x3 convolution) of a channels-last image, fused by oneDNN where the probe passed."""
    if cpu.fast_path_available(torch.float32):
        return torch.ops.mkldnn._convolution_pointwise(
            image, weight, bias, [1, 1], [1, 1], [1, 1], image.shape[1], "gelu", [], approximate
        )
    return F.gelu(F.conv2d(image, weight, bias, 1, 1, 1, image.shape[1]), approximate=approximate)


class _PiecewiseMixFFN(torch.autograd.Function):
    """``dense2(GELU(dwconv(relu?(dense1(x)))))`` on tokens ``(B, H * W, C)``, by groups of images, keeping only
    dense1's output for the backward pass."""

    @staticmethod
    def forward(ctx, x, w1, b1, wc, bc, w2, b2, height: int, width: int, relu: bool, approximate: str, per_piece: int):
        batch, tokens, channels = x.shape
        hidden, out_features = w1.shape[0], w2.shape[0]
        x = x.contiguous()
        kept = x.new_empty(batch, tokens, hidden)  # dense1's output (after the ReLU of linear SRA): all that is kept
        out = x.new_empty(batch, tokens, out_features)
        for i in range(0, batch, per_piece):
            n = min(per_piece, batch - i)
            h1 = torch.addmm(b1, x[i : i + n].view(-1, channels), w1.t(), out=kept[i : i + n].view(-1, hidden))
            if relu:
                h1.relu_()
            image = h1.view(n, height, width, hidden).permute(0, 3, 1, 2)  # (n, hidden, H, W), channels-last view
            h = _conv_gelu(image, wc, bc, approximate).permute(0, 2, 3, 1).reshape(-1, hidden)  # (n * N, hidden)
            torch.addmm(b2, h, w2.t(), out=out[i : i + n].view(-1, out_features))
        ctx.save_for_backward(x, kept, w1, wc, bc, w2)
        ctx.shape = (height, width, relu, approximate, per_piece)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # backward(create_graph=True): this backward is not itself differentiable
            raise RuntimeError(
                "pvtv2's fast training path computes first-order gradients only; for double backward "
                "(create_graph=True) run the model under `with pvtv2.fast.fast_path(False):` or with PVTV2_FAST_PATH=0"
            )
        x, kept, w1, wc, bc, w2 = ctx.saved_tensors
        height, width, relu, approximate, per_piece = ctx.shape
        need = ctx.needs_input_grad
        batch, tokens, channels = x.shape
        hidden, out_features = w1.shape[0], w2.shape[0]
        grad_out = grad_out.contiguous()
        grads = {
            "x": torch.empty_like(x) if need[0] else None,
            "w1": torch.zeros_like(w1) if need[1] else None,
            "b1": w1.new_zeros(hidden) if need[2] else None,
            "wc": torch.zeros_like(wc) if need[3] else None,
            "bc": torch.zeros_like(bc) if need[4] else None,
            "w2": torch.zeros_like(w2) if need[5] else None,
            "b2": w2.new_zeros(out_features) if need[6] else None,
        }
        for i in range(0, batch, per_piece):
            n = min(per_piece, batch - i)
            x_p = x[i : i + n].view(-1, channels)  # (n * N, C)
            g = grad_out[i : i + n].view(-1, out_features)  # (n * N, C_out)
            h1 = kept[i : i + n].view(-1, hidden)
            image = h1.view(n, height, width, hidden).permute(0, 3, 1, 2)  # channels-last view
            pre = F.conv2d(image, wc, bc, 1, 1, 1, hidden)  # the GELU's input, recomputed: (n, hidden, H, W)
            if grads["w2"] is not None or grads["b2"] is not None:
                if grads["w2"] is not None:
                    h = F.gelu(pre, approximate=approximate).permute(0, 2, 3, 1).reshape(-1, hidden)
                    grads["w2"].addmm_(g.t(), h)
                if grads["b2"] is not None:
                    grads["b2"] += g.sum(0)
            if not any(need[k] for k in (0, 1, 2, 3, 4)):
                continue
            g_h = torch.mm(g, w2).view(n, height, width, hidden).permute(0, 3, 1, 2)  # channels-last
            g_pre = torch.ops.aten.gelu_backward(g_h, pre, approximate=approximate)
            g_image, g_wc, g_bc = torch.ops.aten.convolution_backward(
                g_pre, image, wc, [hidden], [1, 1], [1, 1], [1, 1], False, [0, 0], hidden,
                [True, grads["wc"] is not None, grads["bc"] is not None],
            )
            if grads["wc"] is not None:
                grads["wc"] += g_wc
            if grads["bc"] is not None:
                grads["bc"] += g_bc
            g_h1 = g_image.permute(0, 2, 3, 1).reshape(-1, hidden)  # (n * N, hidden)
            if relu:
                g_h1 = torch.ops.aten.threshold_backward(g_h1, h1, 0)
            if grads["w1"] is not None:
                grads["w1"].addmm_(g_h1.t(), x_p)
            if grads["b1"] is not None:
                grads["b1"] += g_h1.sum(0)
            if grads["x"] is not None:
                torch.mm(g_h1, w1, out=grads["x"][i : i + n].view(-1, channels))
        return (grads["x"], grads["w1"], grads["b1"], grads["wc"], grads["bc"], grads["w2"], grads["b2"],
                None, None, None, None, None)


def mix_ffn(mlp: nn.Module, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``mlp(x, height, width)`` of a ``MixFFN`` in training, with the reference's outputs and gradients."""
    if not _pieceable(mlp):
        return mlp(x, height, width)
    hidden = mlp.dense1.out_features
    per_piece = max(1, cpu.FFN_PIECE_BYTES // (height * width * hidden * x.element_size()))
    out = _PiecewiseMixFFN.apply(
        x, mlp.dense1.weight, mlp.dense1.bias, mlp.dwconv.dwconv.weight, mlp.dwconv.dwconv.bias,
        mlp.dense2.weight, mlp.dense2.bias, height, width, isinstance(mlp.relu, nn.ReLU), mlp.act.approximate,
        per_piece,
    )
    return out


def train_stage_forward(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A ``PvtV2Stage`` in training mode on ``x`` (B, C_in, H, W): its (B, C, H', W') output, channels-last. The
    reference modules, but each Mix-FFN through :func:`mix_ffn`."""
    x, height, width = stage.patch_embedding(x)  # (B, N, C)
    for block in stage.blocks:
        attn, _ = block.attention(block.layer_norm_1(x), height, width)
        x = x + block.drop_path(attn)
        x = x + block.drop_path(mix_ffn(block.mlp, block.layer_norm_2(x), height, width))
    x = stage.layer_norm(x)
    batch, _, channels = x.shape
    return x.view(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, C, H, W), a channels-last view
