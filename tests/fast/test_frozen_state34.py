"""A frozen stage's packed weights are checked at every call against what they were packed from
(``pvtv2.fast.cpu._param_state``): the parameter object itself, its type, its counter of ``.data`` uses (the list and
its count), its version counter and its address; a parameter's dtype, shape, strides and negative bit are no longer
read at every call, on the ground that the same object changes them only with one of those. Each way of writing a
weight after a first call has packed it (in place, metadata changed in place, through ``.data``, optimizer steps
fused or not, ``load_state_dict``, new Parameter objects, swaps, a class changed back) must change the frozen paths'
numbers as it changes the reference's: the CPU's to 1e-5, the GPU's frozen path for small inputs (run on CPU
tensors, as tests/fast/test_cuda_frozen.py does) bit for bit. And without a write the packed weights are reused.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

import pvtv2.fast.cpu as cpu
from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast
from pvtv2.fast import cuda

from conftest import TINY, perturb_, relative_error


def _model(seed: int = 7) -> PvtV2ForImageClassification:
    torch.manual_seed(seed)
    return perturb_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5)), seed=seed).eval()


def _key(model) -> nn.Linear:
    """Stage 1's key layer: (16, 16), so that its transpose is another view of the same memory, same shape."""
    return model.pvt_v2.encoder.layers[0].blocks[0].attention.key


def _kernel(model) -> nn.Conv2d:
    """Stage 2's patch embedding (32, 16, 3, 3): packed per input shape."""
    return model.pvt_v2.encoder.layers[1].patch_embedding.proj


def _cpu_path(model, x: torch.Tensor) -> torch.Tensor:
    assert all(cpu.applies(x, stage) for stage in model.pvt_v2.encoder.layers)
    return model(x).logits


def _gpu_frozen_path(model, x: torch.Tensor) -> torch.Tensor:
    """The logits with every stage on ``cuda.frozen_stage_forward`` (the route a small CUDA input takes)."""
    with mock.patch.object(fast, "applies", lambda h, stage=None: cpu.fusable(stage)), \
            mock.patch.object(fast, "stage_forward", cuda.frozen_stage_forward):
        return model(x).logits


def _reference(model, x: torch.Tensor) -> torch.Tensor:
    with fast.fast_path(False):
        return model(x).logits


def _moved(w: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-2.0, 2.0, w.numel()).view(w.shape)


def _with_grad(w: nn.Parameter) -> nn.Parameter:
    w.grad = _moved(w) + 0.25
    return w


def _watched_twin(w: nn.Parameter, fn) -> nn.Parameter:
    """``nn.Parameter(fn(w.detach()))`` (another view of ``w``'s memory, the same version counter), watched by
    another frozen model: a Parameter of the same type, with a ``.data`` counter of its own at the same count."""
    twin = nn.Parameter(fn(w.detach()))
    holder = _model(seed=3)
    if w.dim() == 2:
        _key(holder).weight = twin
    else:
        _kernel(holder).weight = twin
    fast.freeze(holder)
    assert type(twin) is type(w)
    return twin


def _set_same_storage_transposed(w):
    n = w.shape[0]
    w.set_(w.untyped_storage(), w.storage_offset(), w.shape, (1, n))


def _load_state_dict(model, layer):
    state = {name: p.detach().clone() for name, p in layer.named_parameters()}
    state["weight"] += 0.3
    layer.load_state_dict(state)


def _class_changed_back(w):
    w.__class__ = nn.Parameter  # as unfreeze does, for one parameter: its .data is no longer watched
    w.data.mul_(1.5)


# Writes to the parameter object the frozen stage packed (the same object stays in the module).
SAME_OBJECT = {
    "add_": lambda w: w.add_(_moved(w)),
    "t_": lambda w: w.t_(),
    "transpose_": lambda w: w.transpose_(0, 1),
    "as_strided_ transposed": lambda w: w.as_strided_(w.shape, (1, w.shape[0])),
    "set_ to new memory": lambda w: w.set_(w.detach() * 1.5),
    "set_ to its storage transposed": _set_same_storage_transposed,
    ".data assigned": lambda w: setattr(w, "data", w.detach() * 1.5),
    ".data written": lambda w: w.data.mul_(1.5),
    "SGD step": lambda w: torch.optim.SGD([_with_grad(w)], lr=1.0).step(),
    "SGD fused step": lambda w: torch.optim.SGD([_with_grad(w)], lr=1.0, fused=True).step(),
    "AdamW fused step": lambda w: torch.optim.AdamW([_with_grad(w)], lr=1.0, fused=True).step(),
    "class changed back, then .data written": _class_changed_back,
    "swapped with a watched transposed view": lambda w: torch.utils.swap_tensors(
        w, _watched_twin(w, lambda t: t.t())),
    "swapped with a plain Parameter": lambda w: torch.utils.swap_tensors(w, nn.Parameter(w.detach() * 1.5)),
}
# Writes that act on the module (new Parameter objects, state dicts).
ON_MODULE = {
    "load_state_dict": _load_state_dict,
    "new Parameter, same memory transposed": lambda model, layer: setattr(
        layer, "weight", nn.Parameter(layer.weight.detach().t())),
    "new Parameter, same memory and strides, negative view": lambda model, layer: setattr(
        layer, "weight", nn.Parameter(torch._neg_view(layer.weight.detach()))),
    "new Parameter, new memory": lambda model, layer: setattr(layer, "weight", nn.Parameter(layer.weight * 1.5)),
}

X = {1: torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(8)),
     2: torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))}


def _check(model, write, path: str, batch: int) -> None:
    x = X[batch]
    run = _cpu_path if path == "cpu" else _gpu_frozen_path
    fast.freeze(model)
    with torch.no_grad():
        before = run(model, x)  # packs the weights
        assert torch.equal(run(model, x), before)
        write()
        want = _reference(model, x)
        got, again = run(model, x), run(model, x)
    assert relative_error(want, before) > 1e-4  # the write changed the model's numbers (the test can tell)
    if path == "cpu":
        assert relative_error(want, got) < 1e-5
        assert relative_error(want, again) < 1e-5
    else:
        assert torch.equal(got, want) and torch.equal(again, want)


@pytest.mark.parametrize("path,batch", [("cpu", 1), ("cpu", 2), ("gpu frozen", 2)])
@pytest.mark.parametrize("write", list(SAME_OBJECT))
def test_a_write_to_a_packed_linear_weight_is_read(write, path, batch):
    model = _model()
    w = _key(model).weight
    _check(model, lambda: SAME_OBJECT[write](w), path, batch)
    assert _key(model).weight is w


# The writes of SAME_OBJECT that keep a kernel's shape, and a swap with its transposed kernels.
KERNEL_WRITES = {
    name: SAME_OBJECT[name] for name in SAME_OBJECT
    if name not in ("t_", "transpose_", "as_strided_ transposed", "set_ to its storage transposed")
    and not name.startswith("swapped with a watched")
}
KERNEL_WRITES["swapped with a watched transposed view"] = lambda w: torch.utils.swap_tensors(
    w, _watched_twin(w, lambda t: t.transpose(2, 3)))


@pytest.mark.parametrize("write", list(KERNEL_WRITES))
def test_a_write_to_a_packed_kernel_is_read(write):
    model = _model()
    w = _kernel(model).weight
    _check(model, lambda: KERNEL_WRITES[write](w), "cpu", 2)


@pytest.mark.parametrize("path", ["cpu", "gpu frozen"])
@pytest.mark.parametrize("write", list(ON_MODULE))
def test_a_module_write_behind_the_packed_weights_is_read(write, path):
    model = _model()
    _check(model, lambda: ON_MODULE[write](model, _key(model)), path, 2)


def test_unchanged_weights_are_not_repacked_and_a_write_repacks_once():
    model = fast.freeze(_model())
    stage = model.pvt_v2.encoder.layers[0]
    with torch.no_grad():
        _cpu_path(model, X[2])
        entries = dict(cpu._FROZEN[stage].entries)
        assert entries  # packed
        _cpu_path(model, X[2])
        assert all(cpu._FROZEN[stage].entries[slot] is entry for slot, entry in entries.items())
        _key(model).weight.add_(1.0)
        _cpu_path(model, X[2])
        after = dict(cpu._FROZEN[stage].entries)
        _cpu_path(model, X[2])
    repacked = [slot for slot in entries if after[slot] is not entries[slot]]
    assert repacked == [(id(_key(model)), id(stage.blocks[0].attention.value))]  # keys and values: one GEMM
    assert all(cpu._FROZEN[stage].entries[slot] is entry for slot, entry in after.items())
