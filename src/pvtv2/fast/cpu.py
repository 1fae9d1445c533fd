"""The fast CPU inference path: a PVTv2 stage computed with oneDNN's fused operations.

What it does differently from the reference stage (``pvtv2.models.layers.PvtV2Stage``), never what it computes:

- the linear layers run as oneDNN GEMMs with their activation (ReLU) or the block's residual add fused in, keys and
  values as one GEMM;
- the depthwise 3x3 convolution of the Mix-FFN runs with its GELU fused;
- the Mix-FFN runs in cache-sized pieces (groups of images, or bands of rows with one halo row above and below),
  so its wide hidden activation stays in the CPU cache between its three steps instead of streaming through memory;
- activations stay in one channels-last layout, so the token and image views never copy;
- in fp32 at batch 1, where the queries far outnumber the keys (stages 1 and 2), the attention runs as two GEMMs
  around the softmax, with the query and output projections folded into its few keys and values (the same products,
  summed in another order).

These are private oneDNN operators, so a capability probe runs each of them once on small tensors against the
public operators it replaces; where the probe fails (another CPU, another build), the reference path runs.

**The contract** (tests/fast holds this module to it):

1. Same numbers as the reference stage, to 1e-5 relative, for the weights the modules hold at call time. The fused
   code reads weights and replaces module forwards, so it runs only where that is what calling the modules computes:
   :func:`applies` checks, at every call, that every module of the stage is in eval mode, of exactly the type the
   fused code assumes in its slot (no subclass such as a LoRA-style Linear, no ``torch.nn.utils.parametrize``, no
   quantized stand-in, no ReLU where a dropout is skipped, convolutions padding with zeros), without forward hooks
   or pre-hooks (``torch.nn.utils.prune`` adds one) or a forward set on the instance (nor a submodule set over
   its slot as an instance attribute), that no global module hooks exist, and that every linear layer's and
   convolution's weight and bias is of a dtype the module takes with the input (the input's; under autocast any
   but float64) and every bias one element per output (not one that F.linear broadcasts). Otherwise the stage runs
   the reference path, which calls them (and raises where they do).
2. Without :func:`freeze` there is no state at all: every call reads the modules' current weights, however they were
   written. Nothing is ever added to ``state_dict()`` or to anything a module references, so a model deep-copies,
   pickles and saves at any time.
3. :func:`freeze` (an explicit step, like ``torch.jit.freeze``; the ``pvtv2`` command takes it) packs the weights
   once into oneDNN's blocked layout, which saves the per-call reordering of every weight (measured in
   docs/benchmarks.md). The packed copies live in a side table keyed weakly by module, invisible to ``deepcopy``,
   ``pickle`` and ``state_dict`` (a copy of a frozen model is an unfrozen model). Every weight change PyTorch can see
   repacks before the next call: in-place writes on a parameter or its ``.detach()`` (optimizer steps,
   ``load_state_dict``, swa_utils; the steps of any ``torch.optim`` optimizer are counted too, as fused optimizers
   bump no version counter), new Parameter objects, and any use of a parameter's ``.data`` (read or assigned: the
   frozen parameters report it; ``nn.Parameter(p)`` of a frozen ``p``, as tying or a parametrization makes it,
   reports to the same count). Writes that PyTorch cannot see are not: through a NumPy view, a storage
   (``untyped_storage().copy_``), a tensor taken from ``.data`` before freezing, or another tensor's ``.data`` that
   shares a weight's memory (after ``load_state_dict(other.state_dict(), assign=True)``, ``other``'s parameters';
   after ``weight = nn.Parameter(other_weight)``, ``other_weight``'s, where ``other_weight`` is not frozen).
   Call :func:`freeze` again after those, or :func:`unfreeze`. Inference tensors (weights made or loaded inside
   ``torch.inference_mode()``) have no version counter, so they are never packed: ``freeze`` leaves such stages
   unfrozen (with a warning) and a frozen stage reads such a weight as it is; so it does a weight in shared memory
   (``share_memory()``, before or after freezing: another process may write it, as Hogwild training's workers do,
   unseen by this one's version counters), every weight while a ``torch.distributed`` process group is up (its
   collectives write parameters without bumping their version counters; weights packed before the group came up are
   dropped at its first call, and packed again after ``destroy_process_group``: where no call comes between a
   collective and ``destroy_process_group``, call :func:`freeze` again), and a weight that is not exactly
   an ``nn.Parameter`` (a Parameter subclass, a plain tensor or a buffer put in its place, an instance attribute
   set over it), whose ``.data`` is not watched. A new Parameter viewing a packed weight's memory otherwise (a
   transpose, a negative view) repacks too: the packing is keyed by the parameter objects as well.
4. Thread-safe: several threads may run one model, frozen or not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import weakref
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_mod
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = [
    "FAST_PATH_ENV",
    "one_kernel_wide_bf16",
    "FFN_PIECE_BYTES",
    "PLAIN_TENSOR_TYPES",
    "BF16_MATMUL_KEYS",
    "fast_path",
    "fast_path_enabled",
    "fast_path_available",
    "forward_ad_active",
    "applies",
    "plain_modules",
    "fusable",
    "fusable_dwconv",
    "stage_forward",
    "freeze",
    "unfreeze",
    "is_frozen",
]

logger = logging.getLogger(__name__)

# PVTV2_FAST_PATH=0 turns the fast path off for a whole program (read once, at import).
FAST_PATH_ENV = "PVTV2_FAST_PATH"
_ENABLED: ContextVar[bool] = ContextVar(
    "pvtv2_fast_path", default=os.environ.get(FAST_PATH_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
)
# The Mix-FFN's hidden activation per piece, near the best measured on a CPU with 1 MiB of L2 per core and a shared
# L3; 0 runs the whole batch at once.
FFN_PIECE_BYTES = 8 << 20
# Input shapes per frozen convolution whose packed weights are kept (an evaluation loop sees one or two: its batch
# size and a smaller last batch).
CONV_SHAPES = 4

# Under bf16 autocast, attention with at most this many keys runs as two bf16 GEMMs around an fp32 softmax (the
# 7x7 reduced maps of 224-px inputs, linear attention); with more (higher resolutions, sr_ratio 1), SDPA. Measured
# on a 2-core AMD EPYC (Zen 5) for a B0 backbone, 1 image at 1024 px (1,024 keys): 1,972 ms against 639 ms with SDPA
# on one thread, 1,228 against 318 on two, and 640 MB more peak memory (the fp32 scores: 256 MiB per image and head
# in stage 1); at 512 px (256 keys) 99 against 82 ms.
BF16_MATMUL_KEYS = 64
# In fp32, the attention of one image runs as two oneDNN GEMMs around ATen's softmax (projections folded in) where its
# queries are at least GEMM_ATTENTION_RATIO times its keys over all heads and its score matrix has at most
# GEMM_ATTENTION_SCORES elements (1 MiB); otherwise SDPA. With fewer queries per key the folded GEMMs cost more than
# the products they replace (B0 at 224 px, 5 and 8 heads: 1.16x and 1.8x slower than SDPA and the projections).
GEMM_ATTENTION_RATIO = 4
GEMM_ATTENTION_SCORES = 1 << 18

_CAPABILITY: dict[torch.dtype, bool] = {}


# ---------------------------------------------------------------------------------------------- switch and probe
@contextlib.contextmanager
def fast_path(enabled: bool = True) -> Iterator[None]:
    """Within the block, use (or, with ``enabled=False``, do not use) the fast path; for this thread only."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def fast_path_enabled() -> bool:
    """Whether the fast path may run here (the context's setting, by default from ``PVTV2_FAST_PATH``)."""
    return _ENABLED.get()


def _probe(dtype: torch.dtype) -> bool:
    """Run each private oneDNN operator once, with plain and with packed weights, against the public ops. The
    tensors are float32 whatever ``torch.set_default_dtype`` says: under a float16 default the float32 references
    came out in float16 and the float32 check failed, cached for the whole process."""
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(37, 24, generator=gen, dtype=torch.float32)
        w = torch.randn(40, 24, generator=gen, dtype=torch.float32) * 0.2
        b = torch.randn(40, generator=gen, dtype=torch.float32)
        r = torch.randn(37, 40, generator=gen, dtype=torch.float32)
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        xd, bd, rd = x.to(dtype), b.to(dtype), r.to(dtype)
        ref = F.linear(x, w, b)
        checks = []
        for weight in (w.to(dtype), torch.ops.mkldnn._reorder_linear_weight(w.to(dtype))):
            checks += [
                (torch.ops.mkldnn._linear_pointwise(xd, weight, bd, "none", [], ""), ref),
                (torch.ops.mkldnn._linear_pointwise(xd, weight, bd, "relu", [], ""), ref.relu()),
                (torch.ops.mkldnn._linear_pointwise.binary(xd, rd, weight, bd, "add"), ref + r),
            ]
        img = torch.randn(2, 5, 6, 8, generator=gen, dtype=torch.float32).permute(0, 3, 1, 2)  # (2, 8, 5, 6), NHWC
        cw = torch.randn(8, 1, 3, 3, generator=gen, dtype=torch.float32)
        cb = torch.randn(8, generator=gen, dtype=torch.float32)
        conv = torch.ops.mkldnn._convolution_pointwise(
            img.to(dtype), cw.to(dtype), cb.to(dtype), [1, 1], [1, 1], [1, 1], 8, "gelu", [], "none"
        )
        checks.append((conv, F.gelu(F.conv2d(img, cw, cb, 1, 1, 1, 8))))
        sw = torch.randn(6, 8, 2, 2, generator=gen, dtype=torch.float32)
        packed = torch.ops.mkldnn._reorder_convolution_weight(sw.to(dtype), [0, 0], [2, 2], [1, 1], 1, [2, 8, 5, 6])
        for weight in (sw.to(dtype), packed):
            strided = torch.ops.mkldnn._convolution_pointwise(
                img.to(dtype), weight, cb[:6].to(dtype), [0, 0], [2, 2], [1, 1], 1, "none", [], ""
            )
            checks.append((strided, F.conv2d(img, sw, cb[:6], stride=2)))
        for got, want in checks:
            if got.shape != want.shape or ((got.float() - want).abs().max() / want.abs().max()).item() > tol:
                return False
        return True
    except (RuntimeError, AttributeError, NotImplementedError) as err:
        logger.debug("oneDNN fast path unavailable for %s: %s", dtype, err)
        return False


def fast_path_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this PyTorch build and CPU run the fast path's oneDNN operators correctly for ``dtype``; never while
    oneDNN is switched off (``torch.backends.mkldnn.flags(enabled=False)``, which sends ATen to its own kernels: the
    fast path, all oneDNN, ran on regardless)."""
    if not torch.backends.mkldnn.enabled:
        return False
    if dtype not in _CAPABILITY:
        if torch.jit.is_tracing():
            # The probe's operations would be recorded into the trace (the first export of a process, before any
            # forward pass, failed in the TorchScript exporter): not known yet, not probed now.
            return False
        if torch._C._functorch.peek_interpreter_stack() is not None:
            # Nor inside torch.func's transforms, where nothing fused runs anyway: under vmap the probe's random
            # tensors fail (randomness "error", vmap's default), and that failure, kept, turned the fast path off for
            # the whole process (a training call under vmap asks first, through the training GEMMs).
            return False
        # Outside autocast: under it the probe's fp32 references came out in bf16 and the fp32 check failed, which
        # was cached for the whole process (the first training step under bf16 autocast turned the fp32 paths off).
        # On the CPU whatever the default device (torch.set_default_device("cuda") put the probe's tensors there).
        with torch.autocast("cpu", enabled=False), torch.device("cpu"):
            ok = torch.backends.mkldnn.is_available() and dtype in (torch.float32, torch.bfloat16) and _probe(dtype)
        _CAPABILITY[dtype] = ok
        logger.debug("oneDNN fast path for %s: %s", dtype, ok)
    return _CAPABILITY[dtype]


def forward_ad_active() -> bool:
    """Whether forward-mode AD (``torch.autograd.forward_ad.dual_level``) is on: oneDNN's and SDPA's CPU operators
    have no tangent rule (the fused stage dropped the tangent without a word, SDPA raises)."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def _autocasts(x: torch.Tensor) -> bool:
    """Whether CPU autocast casts the GEMMs and convolutions on ``x`` (on, and ``x`` not float64, which it leaves)."""
    return torch.is_autocast_enabled("cpu") and x.dtype != torch.float64


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the reference's GEMMs and convolutions compute ``x`` in: autocast's, except for float64, which
    autocast leaves alone (a float64 model under autocast computes in float64; the fast path then does not apply)."""
    if _autocasts(x):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


# The modules the fused stage reads weights from, replaces the forward of or calls, by exact type: a subclass
# (a LoRA-style Linear, a ``torch.nn.utils.parametrize``d module, a quantized Linear) may compute something else.
_TORCH_TYPES = frozenset({
    nn.Linear, nn.Conv2d, nn.LayerNorm, nn.Dropout, nn.Identity, nn.AdaptiveAvgPool2d, nn.ModuleList,
    nn.ReLU, nn.GELU, nn.SELU, nn.SiLU,
})
# pvtv2's own layers, by name: this package may not import the models (they import it). A renamed class only turns
# the fast path off, which tests/fast notices.
_OWN_TYPES = frozenset({
    ("pvtv2.models.layers", "PvtV2Stage"), ("pvtv2.models.layers", "OverlapPatchEmbed"),
    ("pvtv2.models.layers", "PvtV2Block"), ("pvtv2.models.layers", "SpatialReductionAttention"),
    ("pvtv2.models.layers", "MixFFN"), ("pvtv2.models.layers", "DepthwiseConv"), ("pvtv2.models.layers", "DropPath"),
    ("pvtv2.models.activations", "_Formula"),
})
_KNOWN_TYPES: dict[type, bool] = {}


def _known(cls: type) -> bool:
    known = _KNOWN_TYPES.get(cls)
    if known is None:
        known = cls in _TORCH_TYPES or (cls.__module__, cls.__qualname__) in _OWN_TYPES
        _KNOWN_TYPES[cls] = known
    return known


def _global_hooks() -> bool:
    """Whether module hooks registered for every module (``register_module_forward_hook`` ...) exist."""
    return bool(_module_mod._global_forward_hooks or _module_mod._global_forward_pre_hooks)


def _plain(module: nn.Module) -> bool:
    """Whether calling ``module`` runs exactly its class's forward: no forward hooks or pre-hooks (which
    ``torch.nn.utils.prune`` also uses), no forward set on the instance."""
    return not (module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)


def _backward_hooks(*modules: nn.Module) -> bool:
    """Whether backward hooks (``register_full_backward_hook``, ``register_full_backward_pre_hook``, or the global
    ``register_module_full_backward_hook``) would run for ``modules``: only calling the module installs them."""
    return bool(
        _module_mod._global_backward_hooks
        or _module_mod._global_backward_pre_hooks
        or any(m._backward_hooks or m._backward_pre_hooks for m in modules)
    )


def plain_modules(cls: type[nn.Module], *modules: nn.Module) -> bool:
    """Whether each of ``modules`` is exactly a ``cls`` (no subclass, parametrization or quantized stand-in) that
    runs only its class's forward (no hooks of its own or global ones, forward or backward): then code that uses
    their weights directly computes what calling them would, gradients included."""
    return (
        not _global_hooks()
        and not _backward_hooks(*modules)
        and all(type(m) is cls and _plain(m) for m in modules)
    )


# What each slot of pvtv2's layers may hold for the fused code (by class name; every module is also of a known type):
# the fused code skips the dropouts and drop path (identities in eval mode), fuses only a ReLU into the Mix-FFN's
# first GEMM, reads the LayerNorms', Linears' and convolutions' weights, and calls the rest. A known module in another
# slot (a ReLU as drop path, a SiLU in the ReLU's slot) would compute something else than calling it does.
_CALLED = frozenset({"Identity", "AdaptiveAvgPool2d", "ReLU", "GELU", "SELU", "SiLU", "_Formula"})
_SKIPPED = frozenset({"Dropout", "Identity"})
_SLOTS: dict[str, dict[str, frozenset[str]]] = {
    "PvtV2Stage": {
        "patch_embedding": frozenset({"OverlapPatchEmbed"}), "blocks": frozenset({"ModuleList"}),
        "layer_norm": frozenset({"LayerNorm"}),
    },
    "OverlapPatchEmbed": {"proj": frozenset({"Conv2d"}), "layer_norm": frozenset({"LayerNorm"})},
    "PvtV2Block": {
        "layer_norm_1": frozenset({"LayerNorm"}), "attention": frozenset({"SpatialReductionAttention"}),
        "drop_path": frozenset({"DropPath", "Identity"}), "layer_norm_2": frozenset({"LayerNorm"}),
        "mlp": frozenset({"MixFFN"}),
    },
    "SpatialReductionAttention": {
        "query": frozenset({"Linear"}), "key": frozenset({"Linear"}), "value": frozenset({"Linear"}),
        "proj": frozenset({"Linear"}), "proj_drop": _SKIPPED, "pool": _CALLED, "act": _CALLED,
        "spatial_reduction": frozenset({"Conv2d"}), "layer_norm": frozenset({"LayerNorm"}),
    },
    "MixFFN": {
        "dense1": frozenset({"Linear"}), "dense2": frozenset({"Linear"}), "relu": frozenset({"ReLU", "Identity"}),
        "dwconv": frozenset({"DepthwiseConv"}), "act": _CALLED, "dropout": _SKIPPED,
    },
    "DepthwiseConv": {"dwconv": frozenset({"Conv2d"})},
}


# Per class, what the walk checks (read once per class): None for a type the fused code does not know (_known), else
# (its slots, or None where it has none: _SLOTS; and which extra check it takes: _CONV, _LINEAR, _BLOCKS, _ATTENTION).
_CONV, _LINEAR, _BLOCKS, _ATTENTION = "conv", "linear", "blocks", "attention"
_RULES: dict[type, tuple | None] = {}


def _rule(cls: type) -> tuple | None:
    rule = _RULES.get(cls, False)
    if rule is False:
        rule = None
        if _known(cls):
            kind = {nn.Conv2d: _CONV, nn.Linear: _LINEAR, nn.ModuleList: _BLOCKS}.get(cls)
            if cls.__qualname__ == "SpatialReductionAttention":
                kind = _ATTENTION
            rule = (_SLOTS.get(cls.__qualname__), kind)
        _RULES[cls] = rule
    return rule


def _fits(m: nn.Module, rule: tuple) -> bool:
    """Whether ``m``'s submodules are of the types the fused code assumes in their slots, and a convolution pads
    as the fused convolutions do (zeros, given as numbers); ``rule`` is its class's (:func:`_rule`)."""
    slots, kind = rule
    if kind is _CONV:
        return m.padding_mode == "zeros" and not isinstance(m.padding, str)
    if kind is _BLOCKS:
        return all(child is None or type(child).__qualname__ == "PvtV2Block" for child in m._modules.values())
    if slots is not None:
        for name, child in m._modules.items():
            allowed = slots.get(name)
            if child is not None and allowed is not None and type(child).__qualname__ not in allowed:
                return False
        # A module set as an instance attribute over a slot (``object.__setattr__``, ``m.__dict__[...]``) is what
        # attribute lookup, and so the module and the fused code, read, but not what this walk checks (a Linear
        # subclass put over a key layer so was fused as a plain Linear).
        instance = m.__dict__
        for name in slots:
            if name in instance:
                return False
    if kind is _ATTENTION:
        # The fused code splits one key-value product into heads: a key or value layer of another width (replaced by
        # hand) would be split silently at the wrong place, where the modules themselves fail.
        width = m.num_heads * m.head_dim
        return getattr(m.key, "out_features", None) == getattr(m.value, "out_features", None) == width
    return True


def _params_fit(m: nn.Module, dtype: torch.dtype | None, autocast: bool) -> bool:
    """Whether the weight and bias of ``m`` (a Linear or Conv2d) are what the fused operators read: a bias of one
    element per output (F.linear broadcasts a bias of one element or a (1, out) row, oneDNN's operators fail on it),
    and, given the input's ``dtype``, whether F.linear or F.conv2d would take them with it: of that dtype, or under
    ``autocast`` any dtype but float64, which autocast leaves alone (the input itself may already be in autocast's
    dtype: the stages after the first). The fused code casts them to the compute dtype, which would give numbers
    where the modules raise (a float64 bias or a bf16 weight put in a float32 model)."""
    weight, bias = _weight_and_bias(m)
    if weight is None:  # the module raises (F.linear takes no None weight): the reference path says so
        return False
    if bias is not None and bias.shape != weight.shape[:1]:
        return False
    if dtype is None:
        return True
    for p in (weight, bias):
        if p is None:
            continue
        if p.dtype == torch.float64 if autocast else p.dtype != dtype:
            return False
    return True


def fusable(stage: nn.Module, dtype: torch.dtype | None = None, autocast: bool = False) -> bool:
    """Whether every module of ``stage`` (itself included) is in eval mode, of a type the fused code knows exactly,
    in a slot where the fused code computes what calling it does, and runs only its class's forward; given the
    input's ``dtype`` and whether ``autocast`` casts it (:func:`_autocasts`), also whether every linear layer and
    convolution would take its weights with that input; and whether their biases have one element per output. Runs at every call: one walk over the modules, a few
    attribute reads each."""
    if _global_hooks():
        return False
    todo = [stage]
    while todo:
        m = todo.pop()
        if m is None:  # a submodule slot set to None
            continue
        rule = _rule(type(m))
        if (
            rule is None or m.training or m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__
            or not _fits(m, rule)
        ):
            return False
        if (rule[1] is _LINEAR or rule[1] is _CONV) and not _params_fit(m, dtype, autocast):
            return False
        todo.extend(m._modules.values())
    return True


def applies(x: torch.Tensor, stage: nn.Module | None = None) -> bool:
    """Whether a stage, called on ``x`` without attention maps, hands over to :func:`stage_forward`: on CPU, with
    autograd off, outside ``torch.compile`` and ``torch.jit.trace``, where the probe passed for the compute dtype,
    and, given ``stage``, where its computation is what the fused code assumes: every module in eval mode, of exactly
    a known type, without hooks (its own or global ones) or an instance forward, with weights of a dtype the modules
    take with ``x``. Anything else runs the reference path, which calls the modules."""
    return (
        not torch.compiler.is_compiling()  # first: PyTorch 2.11's torch.compile cannot trace the switch's ContextVar
        and _ENABLED.get()
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.jit.is_tracing()  # the tracer cannot record oneDNN's calls: the reference stage traces
        # Inside torch.func's transforms (vmap over inputs or over stacked weights, grad): no oneDNN call is batched.
        and torch._C._functorch.peek_interpreter_stack() is None
        and not forward_ad_active()  # dual tensors: the fused operators would drop their tangents
        and (stage is None or fusable(stage, x.dtype, _autocasts(x)))
        and fast_path_available(_compute_dtype(x))
    )


# ---------------------------------------------------------------------------------------------- weights
def _weight_and_bias(m: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(m.weight, m.bias)`` as attribute lookup finds them, mostly without nn.Module.__getattr__ (a microsecond a
    call, at every call): an instance attribute first (``object.__setattr__`` or ``m.__dict__[...]`` put over a
    parameter: what ``m.weight``, and so the module, reads), then the parameter, then ``__getattr__`` (a buffer).
    Reading the parameter dict alone kept a frozen stage's packed weights over such an attribute."""
    return _looked_up(m, "weight"), _looked_up(m, "bias")


def _looked_up(m: nn.Module, name: str) -> torch.Tensor | None:
    d = m.__dict__
    if name in d:
        return d[name]
    params = d["_parameters"]
    return params[name] if name in params else getattr(m, name)


def _params(modules: list[nn.Module]) -> list[torch.Tensor]:
    out = []
    for m in modules:
        weight, bias = _weight_and_bias(m)
        if weight is not None:
            out.append(weight)
        if bias is not None:
            out.append(bias)
    return out


def _dense(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bias for oneDNN's operators, which read it as a dense vector whatever its strides (a strided bias, as
    ``load_state_dict(assign=True)`` of a slice gives, read other memory)."""
    bias = _cast(bias, dtype)
    return bias if bias.is_contiguous() else bias.contiguous()


class _PlainWeights:
    """The modules' weights as they are, read at every call (no state)."""

    def linear(self, layers: list[nn.Linear], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = torch.cat([m.weight for m in layers]) if len(layers) > 1 else layers[0].weight
        bias = None
        if any(m.bias is not None for m in layers):
            # One bias for the concatenated layers: a layer without one (a key without bias, a value with) adds zeros.
            parts = [m.weight.new_zeros(m.out_features) if m.bias is None else m.bias for m in layers]
            bias = _dense(torch.cat(parts) if len(parts) > 1 else parts[0], dtype)
        # Copied where not dense and aligned: oneDNN's GEMM rounds a strided weight (every other column of a buffer,
        # as load_state_dict(assign=True) of a slice gives) otherwise than the same weight dense.
        return _aligned(_cast(weight, dtype)), bias

    def conv(self, conv: nn.Conv2d, dtype: torch.dtype, input_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _cast(conv.weight, dtype), None if conv.bias is None else _dense(conv.bias, dtype)


def _uses_counter(p: torch.Tensor) -> list[int]:
    """The one-item list counting ``p``'s ``.data`` uses and optimizer steps, made on first use. Parameters made from
    one another (``nn.Parameter(p)``: the same memory and version counter) hold the same list, so a write through
    either's ``.data`` or a fused optimizer's step on either is seen by the frozen stages holding the other."""
    counter = p.__dict__.get("_pvtv2_uses")
    if counter is None:
        counter = p._pvtv2_uses = [0]
    return counter


def _count_use(p: torch.Tensor) -> None:
    _uses_counter(p)[0] += 1


class _WatchedParameter(nn.Parameter):
    """A parameter of a frozen model: counts uses of ``.data``, through which writes bypass the version counter."""

    @property
    def data(self) -> torch.Tensor:
        _count_use(self)
        return torch._C.TensorBase.data.__get__(self)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        _count_use(self)
        torch._C.TensorBase.data.__set__(self, value)

    def detach(self) -> torch.Tensor:
        out = torch._C.TensorBase.detach(self)
        if sys._getframe(1).f_code is _PARAMETER_NEW:
            # ``nn.Parameter(p)`` of a frozen parameter (``parametrize.register_parametrization``, weight_norm, tying a
            # weight into another module) takes a subclass's detach() and refuses anything but the subclass's type.
            # The new parameter shares p's memory and version counter, and its counter of .data uses too: with one
            # of its own, a write through the new one's .data (or a fused optimizer's step on it) left the frozen
            # stages holding p computing with the old weights, and the other way round.
            tied = torch.Tensor._make_subclass(_WatchedParameter, out, False)
            tied._pvtv2_uses = _uses_counter(self)
            return tied
        return out


_PARAMETER_NEW = nn.Parameter.__new__.__code__


# Tensor types whose operators are PyTorch's own: plain tensors and parameters, a frozen model's included.
PLAIN_TENSOR_TYPES = frozenset({torch.Tensor, nn.Parameter, _WatchedParameter})


_WATCHABLE = (nn.Parameter, _WatchedParameter)


def _watch(params: list[torch.Tensor]) -> None:
    """Watch the plain Parameters among ``params``, each with its counter of ``.data`` uses: also a watched one
    without (made by ``type(p)(...)``: ``copy.deepcopy`` of a frozen model's parameter), whose packing recorded no
    counter and whose next check read it (a TypeError at the second call)."""
    for p in params:
        if type(p) is nn.Parameter:
            p.__class__ = _WatchedParameter
        if type(p) is _WatchedParameter:
            _uses_counter(p)


def _optimizer_stepped(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """After any ``torch.optim`` optimizer's step (a global step hook, registered by :func:`freeze`): the step counts
    as a use of each watched parameter it holds. PyTorch's fused optimizers (``fused=True``: AdamW, Adam, SGD,
    Adagrad, PyTorch 2.14 on the CPU) write the parameters without bumping their version counters, so their steps
    went unseen and a frozen model kept computing with the weights from before."""
    if not _FROZEN:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if type(p) is _WatchedParameter:
                _count_use(p)


_STEP_HOOK: list = []  # the handle of the optimizer step hook, once registered


def _param_state(p: torch.Tensor) -> tuple:
    """What a packed weight was made from, for one (watched) parameter: the object itself, its type, its counter of
    ``.data`` uses and optimizer steps (the list, and its count), its version counter, its memory's address and its
    C++ tensor.

    A new Parameter object repacks, even one that views the same memory with the same version (a square weight's
    transpose, a negative view). The same object changes its dtype, shape, strides or negative bit only with one of
    the others: in place (``t_``, ``as_strided_``, ``set_``, ``resize_`` bump the version counter), through
    ``.data`` (counted), or by a swap (``torch.utils.swap_tensors``, torch.__future__'s swap mode), which exchanges
    the ``__dict__`` holding the counter list and the class (a plain Parameter swapped in is no longer watched until
    it is repacked) and the tensor itself (``_cdata``, the address of its C++ tensor): a parameter made from a
    frozen one (``nn.Parameter(p)``) shares its memory, its version counter and its counter list, and once
    transposed in place (a version that ``p``'s repacking reads too) and swapped with ``p``, it changed none of the
    others (the packed weight stayed untransposed: 1e-3 off the reference). The entry keeps the parameters and their
    storages alive, so no new object or tensor can take over an id or an address while it lives. All of it is read
    without building anything: the check runs at every GEMM."""
    counter = p.__dict__.get("_pvtv2_uses")
    return (p, type(p), counter, None if counter is None else counter[0], p._version, p.data_ptr(), p._cdata)


def _unchanged(states: tuple, params: list[torch.Tensor]) -> bool:
    """Whether ``params`` are what ``states`` (:func:`_param_state`) were read from, unchanged. In the order that
    reads no version counter of another object (an inference tensor has none, and raises)."""
    if len(states) != len(params):
        return False
    for p, (q, cls, counter, uses, version, address, impl) in zip(params, states):
        if (
            p is not q or type(p) is not cls or p.__dict__.get("_pvtv2_uses") is not counter
            or counter[0] != uses or p._version != version or p.data_ptr() != address or p._cdata != impl
        ):
            return False
    return True


def _watchable(p: torch.Tensor) -> bool:
    """Whether every write to ``p`` PyTorch makes is seen: a plain Parameter (watched for ``.data`` uses), not an
    inference tensor (no version counter), not in shared CPU memory (``share_memory()``: Hogwild training's worker
    processes write it, which bumps no version counter in this process). Not a Parameter subclass, plain tensor or
    buffer in a weight's place, whose ``.data`` writes bypass the version counter unseen."""
    return (
        type(p) in _WATCHABLE and not p.is_inference()
        and not (p.device.type == "cpu" and p.untyped_storage().is_shared())
    )


def _collectives() -> bool:
    """Whether a ``torch.distributed`` process group is up: its collectives (``broadcast``, ``all_reduce``, ...) write
    tensors in place without bumping their version counters, so a weight one wrote looked unchanged (a frozen model on
    the receiving rank of a broadcast kept the weights it had packed before)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class _PackedWeights:
    """The weights of one frozen stage, packed for oneDNN, repacked when their key changes."""

    def __init__(self) -> None:
        # (module ids) or (module id, input shape) -> (dtype, the parameters' states, packed weight, bias, the
        # storages kept alive)
        self.entries: dict[tuple, tuple] = {}
        self.lock = threading.Lock()

    def _entry(self, slot: tuple, modules: list[nn.Module], dtype: torch.dtype, pack) -> tuple | None:
        """The packed weights for ``slot``, repacked if they changed; None where a weight's writes could go unseen
        (:func:`_watchable`, :func:`_collectives`: then the caller reads the weights as they are)."""
        if _collectives():
            if slot in self.entries:  # packed before the group came up: repacked once it is gone
                with self.lock:
                    self.entries.pop(slot, None)
            return None
        params = _params(modules)
        entry = self.entries.get(slot)
        if entry is None or entry[0] != dtype or not _unchanged(entry[1], params):
            # Packed parameters were watchable and are the same objects: only new ones need the check.
            if not all(_watchable(p) for p in params):
                return None
            _watch(params)  # new Parameter objects are watched from now on
            states = tuple(_param_state(p) for p in params)
            weight, bias = pack()
            entry = (dtype, states, weight, bias, tuple(p.detach() for p in params))
            with self.lock:
                self.entries[slot] = entry
        return entry

    def cached(self, slot: tuple, modules: list[nn.Module], dtype, make) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``make()`` (a weight and a bias made from ``modules``' weights), kept under ``slot`` until those weights or
        ``dtype`` change; made afresh at every call where a weight's writes could go unseen (:func:`_watchable`)."""
        entry = self._entry(slot, modules, dtype, make)
        return make() if entry is None else (entry[2], entry[3])

    def linear(self, layers: list[nn.Linear], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        def pack() -> tuple[torch.Tensor, torch.Tensor | None]:
            weight, bias = _PlainWeights().linear(layers, dtype)
            return torch.ops.mkldnn._reorder_linear_weight(weight), bias

        entry = self._entry(tuple(map(id, layers)), layers, dtype, pack)
        return _PLAIN.linear(layers, dtype) if entry is None else (entry[2], entry[3])

    def conv(self, conv: nn.Conv2d, dtype: torch.dtype, input_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight in the oneDNN layout chosen for inputs of ``input_shape``: the layout depends on the input's
        size, and a weight packed for another size gives the right numbers 10 to 100 times slower (measured: 15 ms
        instead of 0.1 ms for a 4x4 map with a weight packed for 14x14). So each input shape has its own packing,
        and the last ``CONV_SHAPES`` per convolution are kept."""

        def pack() -> tuple[torch.Tensor, torch.Tensor | None]:
            weight = torch.ops.mkldnn._reorder_convolution_weight(
                conv.weight.detach().to(dtype), list(conv.padding), list(conv.stride), list(conv.dilation),
                conv.groups, list(input_shape),
            )
            return weight, None if conv.bias is None else _dense(conv.bias, dtype)

        slot = (id(conv), input_shape)
        fresh = slot not in self.entries
        entry = self._entry(slot, [conv], dtype, pack)
        if entry is None:
            return _PLAIN.conv(conv, dtype, input_shape)
        if fresh:
            with self.lock:
                shapes = [k for k in self.entries if len(k) == 2 and k[0] == id(conv) and isinstance(k[1], tuple)]
                for old in shapes[: max(0, len(shapes) - CONV_SHAPES)]:
                    self.entries.pop(old, None)
        return entry[2], entry[3]


_PLAIN = _PlainWeights()
# Frozen stages -> their packed weights. Weak keys: the table never keeps a model alive, and a copy of a model is not
# in it.
_FROZEN: weakref.WeakKeyDictionary[nn.Module, _PackedWeights] = weakref.WeakKeyDictionary()
_FROZEN_LOCK = threading.Lock()


def _stages(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "patch_embedding") and hasattr(m, "blocks")]


def freeze(model: nn.Module) -> nn.Module:
    """Pack ``model``'s stage weights for the fast path (see the module's contract); returns ``model``.

    For a model that serves inference and whose weights change only through PyTorch. Packing happens on the first
    call of each stage (per input shape for the convolutions); calling ``freeze`` again repacks everything. On a
    GPU the same table keeps, for inputs below the fused kernels' size, the weights as autocast casts them and the
    keys' and values' concatenated (:func:`pvtv2.fast.cuda.frozen_stage_forward`): under autocast a frozen model
    holds a copy of its stages' linear and convolution weights in the autocast dtype.
    """
    skipped = 0
    with _FROZEN_LOCK:
        if not _STEP_HOOK:
            _STEP_HOOK.append(register_optimizer_step_post_hook(_optimizer_stepped))
        for stage in _stages(model):
            params = list(stage.parameters())
            if any(p.is_inference() for p in params):
                # Inference tensors have no version counter, so a write to them could not be seen: such a stage
                # stays unfrozen (it reads its weights at every call, exact and stateless).
                _FROZEN.pop(stage, None)
                skipped += 1
                continue
            _watch(params)
            _FROZEN[stage] = _PackedWeights()
    if skipped:
        logger.warning(
            "freeze: %d of %d stages left unfrozen: their weights are inference tensors (made inside "
            "torch.inference_mode()), whose changes cannot be tracked; they run unpacked, with the same results",
            skipped, len(_stages(model)),
        )
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Drop ``model``'s packed weights (its parameters become plain ``nn.Parameter`` again); returns ``model``."""
    with _FROZEN_LOCK:
        for stage in _stages(model):
            _FROZEN.pop(stage, None)
            for p in stage.parameters():
                if type(p) is _WatchedParameter:
                    p.__class__ = nn.Parameter
    return model


def is_frozen(model: nn.Module) -> bool:
    """Whether every stage of ``model`` runs with packed weights."""
    stages = _stages(model)
    return bool(stages) and all(stage in _FROZEN for stage in stages)


# ---------------------------------------------------------------------------------------------- the stage
# At batch 1 the Python around the operators is a sixth of the time: the helpers below skip what costs a dispatch
# and does nothing (a cast to the dtype a tensor has, an Identity module's call, nn.LayerNorm's forward around
# F.layer_norm). :func:`fusable` has checked that every module is exactly its type, without hooks.
def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` if it is dense and 64-byte aligned (as PyTorch allocates), else a copy that is."""
    return t if t.is_contiguous() and t.data_ptr() % 64 == 0 else t.clone(memory_format=torch.contiguous_format)


def _call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x if type(module) is nn.Identity else module(x)


def _norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _linear(
    weights, layers: list[nn.Linear], x: torch.Tensor, dtype: torch.dtype, attr: str = "none",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``layers`` (concatenated along their outputs) applied to ``x``, with a fused ReLU or residual add. Under
    autocast the weights and the result take the autocast dtype, as F.linear's would."""
    weight, bias = weights.linear(layers, dtype)
    x2d = _cast(x.reshape(-1, x.shape[-1]), dtype)  # (B * N, C), a view for the token layout
    if residual is not None and residual.dtype == dtype:
        out = torch.ops.mkldnn._linear_pointwise.binary(x2d, residual.reshape(x2d.shape[0], -1), weight, bias, "add")
        return out.view(residual.shape)
    out = torch.ops.mkldnn._linear_pointwise(x2d, weight, bias, attr, [], "")
    out = out.view(*x.shape[:-1], out.shape[-1])
    # A residual stream in higher precision than the GEMM (bf16 autocast) stays so, as with autocast's F.linear.
    return out if residual is None else residual + out


def aten_convolves(x: torch.Tensor) -> bool:
    """Whether a CPU convolution of ``x`` (in the dtype the reference computes it in: autocast's, or its own) runs
    ATen's own kernel rather than oneDNN's, as ATen's ``use_mkldnn`` decides: float64; bf16 and float16 where the
    CPU has no oneDNN kernels for them (bf16 before AVX-512, float16 before AVX512-FP16 / AMX-FP16). Never under
    torch.compile (the layouts are the compiler's there)."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    dtype = _compute_dtype(x)
    if dtype == torch.float32:
        return False
    return not ONEDNN_CONV_DTYPES.get(dtype, False)


def _onednn_dtype_kernels(name: str) -> bool:
    try:
        return bool(getattr(torch.ops.mkldnn, f"_is_mkldnn_{name}_supported")())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


# The reduced dtypes oneDNN has CPU convolution kernels for on this machine (what ATen's use_mkldnn asks), read once:
# the check is an operator call, which torch.compile cannot trace.
ONEDNN_CONV_DTYPES = {torch.bfloat16: _onednn_dtype_kernels("bf16"), torch.float16: _onednn_dtype_kernels("fp16")}


def transformers_layouts(x: torch.Tensor) -> bool:
    """Whether the reference path gives ``x``'s convolutions and products transformers' memory layouts: under CPU
    autocast where ATen's own kernels run them (:func:`aten_convolves`: bf16 on a CPU without oneDNN's bf16
    kernels), whose rounding follows the layout; transformers' outputs and dropout draws are then ours bit for bit."""
    return torch.is_autocast_enabled("cpu") and aten_convolves(x)


def reference_conv_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, H, W) for a convolution of the reference path after the first (a later stage's patch embedding,
    the spatial reduction): contiguous, as transformers gives it, where :func:`transformers_layouts` (from a
    channels-last image ATen's own bf16 kernel rounded some outputs one step away from transformers', and a bf16
    autocast model with attention dropout lost bit parity on an AVX2 CPU); elsewhere as it is (oneDNN's channels-last
    layout, also the faster one for ATen's float16 / float64 kernels: 2-5x in float16)."""
    return x.contiguous() if transformers_layouts(x) else x


def one_kernel_wide_bf16(conv: nn.Module, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x``, or ``x`` copied to the contiguous (N, C, H, W) layout where PyTorch's oneDNN convolution computes the
    wrong numbers: in bf16 (``dtype``, by default the one the reference's convolution computes ``x`` in, autocast's),
    a channels-last CPU input exactly as wide as the kernel (one output column). Measured on PyTorch 2.14.1, AMD EPYC
    Zen 5: relative errors near 1 for 8-24 channels at strides 4 and 8 (the spatial reduction of a small grid), and
    right numbers from the same operands in the (N, C, H, W) layout. The copy is one column of patches: cheap."""
    if (
        isinstance(conv, nn.Conv2d)
        and x.dim() == 4
        and x.device.type == "cpu"
        and (dtype or _compute_dtype(x)) == torch.bfloat16
        and x.shape[-1] + 2 * conv.padding[1] == conv.kernel_size[1]
        and not x.is_contiguous()
    ):
        return x.contiguous()
    return x


def _conv(weights, conv: nn.Conv2d, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``conv`` on the channels-last ``x``; returns channels-last (or, exactly one kernel wide in bf16, (N, C, H, W):
    one_kernel_wide_bf16)."""
    x = _cast(x, dtype)
    narrow = one_kernel_wide_bf16(conv, x, dtype)
    # One kernel wide in bf16: the plain weight too (a weight packed for the shape gave the same wrong numbers).
    weight, bias = (weights if narrow is x else _PLAIN).conv(conv, dtype, tuple(x.shape))
    return torch.ops.mkldnn._convolution_pointwise(
        narrow, weight, bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, "none", [], "",
    )


def _attention(weights, attn: nn.Module, x: torch.Tensor, height: int, width: int, dtype: torch.dtype,
               residual: torch.Tensor) -> torch.Tensor:
    """``residual + proj(attention(x))`` of a ``SpatialReductionAttention``."""
    batch, tokens, channels = x.shape
    kv_in = x
    if attn.reduces:
        kv_in = x.view(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last view
        kv_in = _conv(weights, attn.spatial_reduction, _call(attn.pool, kv_in), dtype)  # (B, C, H', W')
        kv_in = kv_in.permute(0, 2, 3, 1).reshape(batch, -1, channels)  # (B, N', C), a view
        kv_in = _call(attn.act, _norm(attn.layer_norm, kv_in))
    heads, head_dim = attn.num_heads, attn.head_dim
    kv = _linear(weights, [attn.key, attn.value], kv_in, dtype)  # (B, N', 2C): one GEMM
    keys = kv.shape[1]
    if (
        dtype == torch.float32 and batch == 1 and tokens >= GEMM_ATTENTION_RATIO * heads * keys
        and tokens * heads * keys <= GEMM_ATTENTION_SCORES
    ):
        # One image whose queries far outnumber its keys (stages 1 and 2 at 224 px: 3,136 and 784 queries against 49
        # keys per head): two oneDNN GEMMs around ATen's softmax, all heads at once, with the query and output
        # projections folded into the few keys and values. Per head h, with s the scale:
        #   scores_h = x (s K_h Wq_h)^T + s K_h bq_h,   out = sum_h softmax(scores_h) (V_h Wp_h^T) + bp + residual,
        # the sum over heads being one GEMM over their concatenated keys. The same products summed in another order
        # (fp32 rounding); measured in docs/benchmarks.md.
        # The modules' weights copied where they are not dense and 64-byte aligned: the GEMMs' rounding depends on
        # the alignment of their operands, and a model read from a file (safetensors' offsets) gave other last bits
        # than the same weights in fresh memory.
        query_weight, proj_weight = _aligned(_cast(attn.query.weight, dtype)), _aligned(_cast(attn.proj.weight, dtype))
        query_bias = None if attn.query.bias is None else _aligned(_cast(attn.query.bias, dtype))
        inner = heads * head_dim  # keys and values side by side in each row of kv
        k = kv[0, :, :inner].view(keys, heads, head_dim).transpose(0, 1) * attn.scale  # (h, N', d)
        v = kv[0, :, inner:].view(keys, heads, head_dim).transpose(0, 1)  # (h, N', d)
        score_weight = torch.bmm(k, query_weight.view(heads, head_dim, channels))  # (h, N', C)
        score_bias = None
        if query_bias is not None:
            score_bias = torch.bmm(k, query_bias.view(heads, head_dim, 1)).view(heads * keys)
        scores = torch.ops.mkldnn._linear_pointwise(
            _cast(x.reshape(tokens, channels), dtype), score_weight.view(heads * keys, channels), score_bias,
            "none", [], "",
        )  # (N, h * N')
        probs = scores.view(tokens, heads, keys).softmax(-1).view(tokens, heads * keys)
        proj_weight = proj_weight.view(channels, heads, head_dim).transpose(0, 1)  # (h, C, d)
        out_weight = torch.bmm(proj_weight, v.transpose(1, 2)).transpose(0, 1).reshape(channels, heads * keys)
        out_bias = None if attn.proj.bias is None else _aligned(_cast(attn.proj.bias, dtype))
        out = torch.ops.mkldnn._linear_pointwise.binary(
            probs, residual.reshape(tokens, channels), out_weight, out_bias, "add"
        )
        return out.view(residual.shape)
    q = _linear(weights, [attn.query], x, dtype).view(batch, tokens, heads, head_dim).transpose(1, 2)  # (B, h, N, d)
    kv = kv.view(batch, -1, 2, heads, head_dim)  # keys and values side by side in each row
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, heads, N', head_dim)
    if dtype == torch.bfloat16 and k.shape[-2] <= BF16_MATMUL_KEYS:
        # bf16 GEMMs (oneDNN) around a softmax in fp32, as transformers' eager attention computes under autocast:
        # twice as fast as SDPA's bf16 CPU kernel on these shapes (few keys), measured in docs/benchmarks.md.
        # With many keys this materialises the whole fp32 score matrix, and SDPA's tiled kernel runs instead.
        scores = torch.matmul(q, k.transpose(-2, -1)).float().mul_(attn.scale)  # (B, heads, N, N')
        out = torch.matmul(scores.softmax(-1).to(dtype), v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    out = out.transpose(1, 2).reshape(batch, tokens, channels)  # (B, N, C)
    return _linear(weights, [attn.proj], out, dtype, residual=residual)


def _fusable_gelu(act: nn.Module) -> str | None:
    """The oneDNN algorithm of a GELU that can be fused into the depthwise convolution, else None."""
    return {"none": "none", "tanh": "tanh"}.get(act.approximate) if type(act) is nn.GELU else None


def fusable_dwconv(conv: nn.Conv2d, channels: int) -> bool:
    """Whether ``conv`` is the 3x3 depthwise convolution (stride, padding and dilation 1) the fused call assumes."""
    return (
        conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.dilation == (1, 1)
        and conv.groups == conv.in_channels == conv.out_channels == channels
    )


def _ffn_hidden(weights, mlp: nn.Module, x: torch.Tensor, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """dense1, (ReLU), depthwise conv and activation of a piece ``(B, height * width, C)``."""
    x = _linear(weights, [mlp.dense1], x, dtype, attr="relu" if isinstance(mlp.relu, nn.ReLU) else "none")
    batch, _, channels = x.shape
    image = x.view(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, hidden, H, W), channels-last view
    conv = mlp.dwconv.dwconv
    gelu = _fusable_gelu(mlp.act)
    if gelu is not None and fusable_dwconv(conv, channels):
        bias = None if conv.bias is None else _dense(conv.bias, dtype)
        image = torch.ops.mkldnn._convolution_pointwise(
            _cast(image, dtype), _cast(conv.weight, dtype), bias, [1, 1], [1, 1], [1, 1], channels, "gelu", [], gelu,
        )
    else:
        image = mlp.act(conv(image))
    return image.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # (B, N, hidden), a view


def _mix_ffn(weights, mlp: nn.Module, x: torch.Tensor, height: int, width: int, dtype: torch.dtype,
             residual: torch.Tensor) -> torch.Tensor:
    """``residual + mlp(x)`` in cache-sized pieces.

    The hidden activation is ``mlp_ratio`` times wider than the tokens. Over a whole batch it is far larger than the
    CPU caches, and the expanding GEMM, the depthwise convolution and the contracting GEMM would each stream it through
    main memory. Run in pieces whose hidden activation is about ``FFN_PIECE_BYTES``, it stays in cache from one step
    to the next: groups of whole images or, where one image is larger, bands of rows. A band computes one extra row
    above and below for the 3x3 convolution and drops them. Each token's result is the same as in one piece.
    """
    batch, tokens, channels = x.shape
    row_bytes = width * mlp.dense1.out_features * 4
    image_bytes = row_bytes * height

    def piece(x_piece: torch.Tensor, h: int, res: torch.Tensor) -> torch.Tensor:
        return _linear(weights, [mlp.dense2], _ffn_hidden(weights, mlp, x_piece, h, width, dtype), dtype, residual=res)

    if FFN_PIECE_BYTES <= 0 or batch * image_bytes <= FFN_PIECE_BYTES:
        return piece(x, height, residual)
    if image_bytes <= FFN_PIECE_BYTES or height <= 8:  # groups of whole images
        step = max(1, FFN_PIECE_BYTES // image_bytes)
        return torch.cat([piece(x[i : i + step], height, residual[i : i + step]) for i in range(0, batch, step)])
    band = max(4, FFN_PIECE_BYTES // row_bytes - 2)  # rows per band, one image at a time
    grid = x.view(batch, height, width, channels)
    res_grid = residual.view(batch, height, width, channels)
    out = None
    for i in range(batch):
        for top in range(0, height, band):
            bottom = min(height, top + band)
            lo, hi = max(0, top - 1), min(height, bottom + 1)  # with the rows the convolution reads
            hidden = _ffn_hidden(weights, mlp, grid[i, lo:hi].reshape(1, -1, channels), hi - lo, width, dtype)
            hidden = hidden.view(hi - lo, width, -1)[top - lo : bottom - lo].reshape(1, -1, hidden.shape[-1])
            res = res_grid[i, top:bottom].reshape(1, -1, channels)
            result = _linear(weights, [mlp.dense2], hidden, dtype, residual=res)
            if out is None:
                out = result.new_empty(batch, height, width, channels)
            out[i, top:bottom] = result.view(bottom - top, width, channels)
    return out.view(batch, tokens, channels)


def stage_forward(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A ``PvtV2Stage`` on ``x`` (B, C_in, H, W) in eval mode: its (B, C, H', W') output, channels-last."""
    weights = _FROZEN.get(stage, _PLAIN)
    dtype = _compute_dtype(x)
    embed = stage.patch_embedding
    if min(x.shape[-2:]) <= embed.proj.padding[0]:
        # An input no larger than the padding: the patch embedding computes its convolution in fp32 there under
        # autocast or with bf16 / float16 weights, and returns the weights' dtype (OverlapPatchEmbed); so the module
        # itself (a grid this small costs nothing). The fused bf16 convolution gave a bf16 stream where the reference
        # has an fp32 one (a stage's output in another dtype) and 10-40 times its error.
        x, height, width = embed(x)  # (B, N, C)
        batch, _, channels = x.shape
    else:
        x = _conv(weights, embed.proj, x.contiguous(memory_format=torch.channels_last), dtype)  # (B, C, H, W)
        batch, channels, height, width = x.shape
        x = _norm(embed.layer_norm, x.permute(0, 2, 3, 1).reshape(batch, height * width, channels))  # (B, N, C)
    for block in stage.blocks:
        x = _attention(weights, block.attention, _norm(block.layer_norm_1, x), height, width, dtype, residual=x)
        x = _mix_ffn(weights, block.mlp, _norm(block.layer_norm_2, x), height, width, dtype, residual=x)
    x = _norm(stage.layer_norm, x)
    return x.view(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, C, H, W), a channels-last view
