"""Hostile checks of the frozen paths' kept weights (``pvtv2.fast.freeze``): the GPU's frozen path for small inputs
(``pvtv2.fast.cuda.frozen_stage_forward``, run here on CPU tensors as tests/fast/test_cuda_frozen.py does) must give
the reference path's numbers bit for bit, and the CPU's frozen path to 1e-5, whatever was written to the weights
after a first call.

Found and held here:

- a new Parameter that is another view of the same memory (a square weight's transpose, a kernel's transposed
  view, a negative view) has the old one's address and version: the kept weights were reused, the old numbers;
- a weight that is not an ``nn.Parameter`` (a Parameter subclass, a plain tensor or a buffer put in the weight's
  place) is never watched, so a write through its ``.data`` was missed;
- with a backward hook on the key or value layer the reference calls the two layers (two products), while the GPU's
  frozen path concatenated them (one product): another operator than the reference's.
"""

from __future__ import annotations

import collections
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pvtv2.fast.cpu as cpu
from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast
from pvtv2.fast import cuda

from conftest import TINY, perturb_, relative_error


def _model(seed: int = 7) -> PvtV2ForImageClassification:
    torch.manual_seed(seed)
    return perturb_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5)), seed=seed).eval()


def _gpu_frozen_path(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The logits with every stage on ``cuda.frozen_stage_forward`` (the route a small CUDA input takes)."""
    with mock.patch.object(fast, "applies", lambda h, stage=None: cpu.fusable(stage)), \
            mock.patch.object(fast, "stage_forward", cuda.frozen_stage_forward):
        return model(x).logits


def _cpu_path(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    assert all(cpu.applies(x, stage) for stage in model.pvt_v2.encoder.layers)
    return model(x).logits


def _reference(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with fast.fast_path(False):
        return model(x).logits


def _attention(model, stage: int = 1):
    return model.pvt_v2.encoder.layers[stage].blocks[0].attention


def _transposed_key(model):
    key = _attention(model, 0).key  # (16, 16): its transpose is another view of the same memory, same address
    key.weight = torch.nn.Parameter(key.weight.detach().t())


def _transposed_query(model):
    query = _attention(model).query
    query.weight = torch.nn.Parameter(query.weight.detach().t())


def _transposed_kernel(model):
    proj = model.pvt_v2.encoder.layers[0].patch_embedding.proj  # a 7x7 kernel
    proj.weight = torch.nn.Parameter(proj.weight.detach().transpose(2, 3))


def _negative_value(model):
    value = _attention(model).value
    value.weight = torch.nn.Parameter(torch._neg_view(value.weight.detach()))


VIEWS = {
    "key weight transposed": _transposed_key,
    "query weight transposed": _transposed_query,
    "patch kernel transposed": _transposed_kernel,
    "value weight as a negative view": _negative_value,
}


class _Subclass(torch.nn.Parameter):
    """A Parameter subclass, as libraries define them (its ``.data`` is not watched)."""


def _as_subclass(layer):
    layer.weight = _Subclass(layer.weight.detach().clone())


def _as_plain_tensor(layer):
    weight = layer.weight.detach().clone()
    del layer.weight
    layer.weight = weight


def _as_buffer(layer):
    weight = layer.weight.detach().clone()
    del layer.weight
    layer.register_buffer("weight", weight)


NOT_PARAMETERS = {"Parameter subclass": _as_subclass, "plain tensor": _as_plain_tensor, "buffer": _as_buffer}

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16 autocast"])
@pytest.mark.parametrize("write", list(VIEWS))
def test_gpu_frozen_path_reads_a_new_parameter_viewing_the_same_memory(write, autocast):
    model = fast.freeze(_model())
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        before = _gpu_frozen_path(model, X)
    VIEWS[write](model)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):  # (a fresh autocast weight cache)
        want = _reference(model, X)
        got = _gpu_frozen_path(model, X)
    assert not torch.equal(want, before)  # the new view changed the model's numbers
    assert torch.equal(got, want)


@pytest.mark.parametrize("write", list(VIEWS))
def test_cpu_frozen_path_reads_a_new_parameter_viewing_the_same_memory(write):
    model = fast.freeze(_model())
    with torch.no_grad():
        _cpu_path(model, X)
        VIEWS[write](model)
        want = _reference(model, X)
        got = _cpu_path(model, X)
    assert relative_error(want, got) < 1e-5


@pytest.mark.parametrize("kind", list(NOT_PARAMETERS))
@pytest.mark.parametrize("path", ["gpu frozen", "cpu frozen"])
def test_a_weight_that_is_not_a_parameter_is_read_after_a_data_write(kind, path):
    model = fast.freeze(_model())
    layer = _attention(model).value
    NOT_PARAMETERS[kind](layer)
    run = _gpu_frozen_path if path == "gpu frozen" else _cpu_path
    with torch.no_grad():
        before = run(model, X)
        layer.weight.data.mul_(-1)  # a write its version counter does not see
        want = _reference(model, X)
        got = run(model, X)
    assert relative_error(want, before) > 1e-3  # the write changed the model's numbers
    if path == "gpu frozen":
        assert torch.equal(got, want)
    else:
        assert relative_error(want, got) < 1e-5


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.filterwarnings("ignore:For backward hooks to be called")
@pytest.mark.parametrize("hook", ["key layer's", "global"])
def test_gpu_frozen_path_calls_keys_and_values_apart_where_the_reference_does(hook):
    """A backward hook (inert without autograd) makes the reference call the key and value layers one by one: two
    products, which a GPU's GEMM library may round otherwise than one product of the concatenated weights."""
    model = fast.freeze(_model())
    handles = []
    if hook == "global":
        handles.append(torch.nn.modules.module.register_module_full_backward_hook(lambda *args: None))
    else:
        for stage in model.pvt_v2.encoder.layers:
            for block in stage.blocks:
                handles.append(block.attention.key.register_full_backward_hook(lambda *args: None))
    try:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            _gpu_frozen_path(model, X)
            with _Ops() as frozen:
                got = _gpu_frozen_path(model, X)
            with _Ops() as reference:
                want = _reference(model, X)
    finally:
        for handle in handles:
            handle.remove()
    blocks = sum(len(stage.blocks) for stage in model.pvt_v2.encoder.layers)
    # Six products per block (query, key, value, output, the Mix-FFN's two layers) and the classifier's.
    assert reference.counts["aten.addmm"] == 6 * blocks + 1
    assert frozen.counts["aten.addmm"] == reference.counts["aten.addmm"]
    assert torch.equal(got, want)


class _ParamReads(TorchDispatchMode):
    """Counts the concatenations and casts that read a parameter's memory."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__()
        self.reads: collections.Counter = collections.Counter()
        self.addresses = {p.data_ptr() for p in params}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in ("aten._to_copy", "aten.cat"):
            inputs = args[0] if name == "aten.cat" else [args[0]]
            if any(t.data_ptr() in self.addresses for t in inputs):
                self.reads[name] += 1
        return func(*args, **(kwargs or {}))


def test_gpu_frozen_path_under_cuda_graph_capture_reads_the_parameters_themselves():
    """A CUDA graph replays the kernels its capture recorded, on the same memory: the reference's graph concatenates
    and casts the parameters at every replay (so an in-place write to them, an EMA's ``copy_``, shows), where kept
    copies would be read as they were at capture. While capturing, the frozen path must read the parameters as the
    reference does (here on CPU tensors, with the capture check answering yes)."""
    model = fast.freeze(_model())
    params = list(model.parameters())
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        _gpu_frozen_path(model, X)  # the warm-up call before a capture keeps the weights
        with mock.patch.object(cuda, "_capturing", lambda: True, create=True), _ParamReads(params) as captured:
            got = _gpu_frozen_path(model, X)
        with _ParamReads(params) as reference:
            want = _reference(model, X)
    assert reference.reads["aten.cat"] > 0 and reference.reads["aten._to_copy"] > 0
    assert captured.reads == reference.reads
    assert torch.equal(got, want)
