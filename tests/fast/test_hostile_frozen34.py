"""A frozen model (``pvtv2.fast.freeze``) written to, copied, reparametrized, hooked or shared between threads after a
first call has packed its weights, as a hostile user would: every output equals the reference path's
(``fast.fast_path(False)``) for the weights the modules hold at call time, to 1e-5, after checking that the write
moved the reference's numbers (so that a stale packed weight would show). Under bf16 autocast, where the reference
differs by bf16's rounding, the frozen output equals that of a freshly frozen copy bit for bit instead.

Two faults found this way: a frozen model's parameter deep-copied (``copy.deepcopy`` of the model, or of a block's
attention put back into it) is a watched parameter without a counter of ``.data`` uses, and its second call raised a
TypeError; and a parameter made from a frozen one (``nn.Parameter(p)``, sharing its memory, version counter and
counter), transposed in place and swapped with ``p`` (``torch.utils.swap_tensors``), left the packed weight
untransposed (1e-3 off the reference). And a Linear subclass set over a key layer as an instance attribute
(``object.__setattr__``: what attribute lookup reads, not what the module walk checked) was fused as a plain Linear.
"""

from __future__ import annotations

import copy
import pickle
import threading
from unittest import mock

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn
from torch.func import functional_call

import pvtv2.fast.cpu as cpu
from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast
from pvtv2.fast import cuda

from conftest import TINY, perturb_, relative_error

pytestmark = pytest.mark.skipif(
    not fast.fast_path_available(torch.float32), reason="the oneDNN operators of the fast path are not available here"
)

X = {1: torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(8)),
     2: torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))}


def _model(seed: int = 7) -> PvtV2ForImageClassification:
    torch.manual_seed(seed)
    return perturb_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5)), seed=seed).eval()


def _stage(model, i: int = 0):
    return model.pvt_v2.encoder.layers[i]


def _key(model) -> nn.Linear:
    """Stage 1's key layer (16, 16): square, so its transpose has its shape."""
    return _stage(model).blocks[0].attention.key


def _moved(w: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-2.0, 2.0, w.numel()).view(w.shape)


def _reference(model, x):
    with fast.fast_path(False), torch.no_grad():
        return model(x).logits


def _cpu_path(model, x):
    with torch.no_grad():
        assert all(stage in cpu._FROZEN and cpu.applies(x, stage) for stage in model.pvt_v2.encoder.layers)
        return model(x).logits


def _unchecked(model, x):
    with torch.no_grad():
        return model(x).logits


def _gpu_frozen_path(model, x):
    """The logits with every stage on ``cuda.frozen_stage_forward`` (a small CUDA input's route), on CPU tensors."""
    with torch.no_grad(), mock.patch.object(fast, "applies", lambda h, stage=None: cpu.fusable(stage)), \
            mock.patch.object(fast, "stage_forward", cuda.frozen_stage_forward):
        return model(x).logits


def _check(model, write, batch: int = 2, path=_cpu_path, exact: bool = False, unfused: bool = False) -> None:
    """Freeze ``model``, pack its weights with two calls, ``write`` (which may return the model to run from then
    on), then compare two calls with the reference; ``unfused``: the write turns the first stage's fused code off
    (the other stages stay fused)."""
    x = X[batch]
    fast.freeze(model)
    before = path(model, x)
    assert torch.equal(path(model, x), before)
    written = write(model)
    model = written if isinstance(written, nn.Module) else model
    want = _reference(model, x)
    assert relative_error(want, before) > 1e-4  # the write moved the numbers: a stale weight would show
    if unfused:
        with torch.no_grad():
            assert [cpu.applies(x, stage) for stage in model.pvt_v2.encoder.layers] == [False, True, True, True]
        path = _unchecked
    for _ in range(2):
        got = path(model, x)
        if exact:
            assert torch.equal(got, want)
        else:
            assert relative_error(want, got) < 1e-5


# ---------------------------------------------------------------------------------------------- the two faults
def _deepcopy_then_write(model):
    copied = fast.freeze(copy.deepcopy(model))
    _cpu_path(copied, X[2])  # packs the copy's parameters (watched, made by type(p)(...), without a counter)
    _cpu_path(copied, X[2])
    _key(copied).weight.data.mul_(1.5)
    return copied


def _attention_copied_in(model):
    block = _stage(model).blocks[0]
    block.attention = copy.deepcopy(block.attention)
    _cpu_path(model, X[2])
    _cpu_path(model, X[2])
    with torch.no_grad():
        block.attention.key.weight.add_(_moved(block.attention.key.weight))


@pytest.mark.parametrize("write", [_deepcopy_then_write, _attention_copied_in], ids=["model", "attention"])
def test_a_deepcopied_frozen_parameter_is_packed_and_followed(write):
    _check(_model(), write)


def _tied_twin_transposed_and_swapped(model, path, batch):
    weight = _key(model).weight
    twin = nn.Parameter(weight)  # the same memory, version counter and counter of .data uses
    assert twin.__dict__["_pvtv2_uses"] is weight.__dict__["_pvtv2_uses"]
    with torch.no_grad():
        twin.t_()  # bumps the version counter the two share: the next call repacks weight (unchanged)
    path(model, X[batch])
    torch.utils.swap_tensors(weight, twin)  # weight is now the transposed view; no counter or address moved
    assert _key(model).weight is weight and weight.stride() == (1, 16)


@pytest.mark.parametrize("path,batch", [(_cpu_path, 1), (_cpu_path, 2), (_gpu_frozen_path, 2)],
                         ids=["cpu-1", "cpu-2", "gpu-frozen"])
def test_a_tied_twin_transposed_and_swapped_in_is_read(path, batch):
    _check(_model(), lambda model: _tied_twin_transposed_and_swapped(model, path, batch), batch, path,
           exact=path is _gpu_frozen_path)


# ---------------------------------------------------------------------------------------------- what holds
def _bf16_round_trip(model):
    _cpu_path(model.to(torch.bfloat16), X[2].to(torch.bfloat16))  # packs bf16 weights
    model.float()


def _in_place(model, layer=None):
    layer = layer or _key(model)
    with torch.no_grad():
        layer.weight.add_(_moved(layer.weight))


def _parametrized(kind):
    def write(model):
        if kind == "weight_norm":
            nn.utils.parametrizations.weight_norm(_key(model))
            with torch.no_grad():
                _key(model).parametrizations.weight.original0.mul_(2.0)
        else:
            getattr(nn.utils.parametrizations, kind)(_key(model))
    return write


def _inference_mode(how):
    def write(model):
        with torch.inference_mode():
            if how == "in place":
                _key(model).weight.mul_(1.5)
            elif how == ".data":
                _key(model).weight.data = _key(model).weight * 1.5
            else:
                model.load_state_dict({k: v * 1.1 for k, v in model.state_dict().items()})
    return write


def _pickled_copy_written(model):
    copied = fast.freeze(pickle.loads(pickle.dumps(model)))
    _cpu_path(copied, X[2])
    _key(copied).weight.data.mul_(1.5)
    return copied


def _init(module):
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.1)


WRITES = {
    "half().float()": lambda m: m.half().float(),
    "bf16 packed, then float()": _bf16_round_trip,
    "channels_last, then in place": lambda m: (m.to(memory_format=torch.channels_last), _in_place(m)),
    "weight_norm": _parametrized("weight_norm"),
    "orthogonal": _parametrized("orthogonal"),
    "spectral_norm": _parametrized("spectral_norm"),
    "prune": lambda m: (prune.l1_unstructured(_key(m), "weight", amount=0.5),),
    "register_parameter": lambda m: _key(m).register_parameter("weight", nn.Parameter(_key(m).weight * 1.5)),
    "requires_grad_ off, in place, on": lambda m: (
        _key(m).weight.requires_grad_(False), _in_place(m), _key(m).weight.requires_grad_(True)),
    "inference_mode in place": _inference_mode("in place"),
    "inference_mode .data": _inference_mode(".data"),
    "inference_mode load_state_dict": _inference_mode("load_state_dict"),
    "load_state_dict(assign=True)": lambda m: m.load_state_dict(
        {k: v * 1.1 for k, v in m.state_dict().items()}, assign=True),
    "apply(init)": lambda m: m.apply(_init),
    "reset_parameters of a kernel": lambda m: _stage(m, 1).patch_embedding.proj.reset_parameters(),
    "share_memory, then in place": lambda m: (m.share_memory(), _in_place(m)),
    "pickled copy, frozen, .data": _pickled_copy_written,
    "tied across blocks, then in place": lambda m: (
        setattr(_stage(m, 1).blocks[1].attention, "query", _stage(m, 1).blocks[0].attention.query),
        _in_place(m, _stage(m, 1).blocks[0].attention.query)),
    # These turn stage 1's fused code off (a module it would not call as it is).
    "forward hook after the first call": lambda m: _key(m).register_forward_hook(lambda mod, args, out: out * 2),
    "forward pre-hook after the first call": lambda m: _key(m).register_forward_pre_hook(
        lambda mod, args: (args[0] * 2,)),
    "a LayerNorm's eps": lambda m: setattr(_stage(m, 1).blocks[0].layer_norm_1, "eps", 10.0),
    "a Linear subclass in the key's place": lambda m: setattr(_key(m), "__class__", _Doubled),
    "a Linear subclass set over the key as an instance attribute": lambda m: object.__setattr__(
        _stage(m).blocks[0].attention, "key", _doubled_copy(_key(m))),
    "a packed reduction's stride": lambda m: setattr(_stage(m).blocks[0].attention.spatial_reduction, "stride",
                                                     (4, 4)),
}


class _Doubled(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def _doubled_copy(layer: nn.Linear) -> _Doubled:
    doubled = _Doubled(layer.in_features, layer.out_features)
    doubled.load_state_dict(layer.state_dict())
    return doubled.eval()


UNFUSED = {"weight_norm", "orthogonal", "spectral_norm", "prune", "forward hook after the first call",
           "forward pre-hook after the first call", "a Linear subclass in the key's place",
           "a Linear subclass set over the key as an instance attribute"}


@pytest.mark.parametrize("write", list(WRITES))
def test_a_hostile_change_after_packing_is_read(write):
    _check(_model(), WRITES[write], unfused=write in UNFUSED)


@pytest.mark.parametrize("batch", [1, 2])
def test_functional_call_on_a_frozen_model_uses_the_given_weights(batch):
    model, other = fast.freeze(_model()), _model(seed=11)
    x = X[batch]
    _cpu_path(model, x)
    want = _reference(other, x)
    assert relative_error(want, _reference(model, x)) > 1e-2
    with torch.no_grad():
        for given in (dict(other.named_parameters()), {k: v.detach().clone() for k, v in other.named_parameters()}):
            assert relative_error(want, functional_call(model, given, (x,)).logits) < 1e-5
    assert relative_error(_reference(model, x), _cpu_path(model, x)) < 1e-5  # its own weights back


# ".data =" from another thread swaps the tensor's storage under a reader mid-call: a data race in PyTorch itself, not
# in the fast path (one run in 15 ended in a segmentation fault, and one CI run saw a mixed result); not run.
RACY_DATA = pytest.mark.skip(reason="assigning .data while another thread reads the tensor is a race in PyTorch")


@pytest.mark.parametrize("how", ["new Parameter", pytest.param(".data", marks=RACY_DATA)])
def test_threads_calling_a_frozen_model_while_another_writes_see_one_state(how):
    model = fast.freeze(_model())
    layer, x = _key(model), X[1]
    first = layer.weight
    second = nn.Parameter(first.detach() * -1.5)
    values = (first.detach().clone(), second.detach().clone())
    want = [_reference(model, x)]
    layer.weight = second
    want.append(_reference(model, x))
    layer.weight = first
    assert relative_error(*want) > 1e-3
    outputs, errors, done = [], [], threading.Event()

    def read():
        try:
            with torch.no_grad():
                for _ in range(30):
                    outputs.append(model(x).logits)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    def write():
        i = 0
        while not done.is_set():
            i += 1
            if how == "new Parameter":
                layer.weight = (first, second)[i % 2]
            else:
                layer.weight.data = values[i % 2].clone()

    readers = [threading.Thread(target=read) for _ in range(2)]
    writer = threading.Thread(target=write)
    for t in readers + [writer]:
        t.start()
    for t in readers:
        t.join()
    done.set()
    writer.join()
    assert not errors and len(outputs) == 60
    assert all(min(relative_error(w, out) for w in want) < 1e-5 for out in outputs)
    assert relative_error(_reference(model, x), _cpu_path(model, x)) < 1e-5


@pytest.mark.skipif(not fast.fast_path_available(torch.bfloat16), reason="no oneDNN bf16 operators on this CPU")
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("write", ["in place", "fused AdamW", "attention copied in"])
def test_bf16_autocast_frozen_output_after_a_write_is_a_fresh_freezes(write, batch):
    model, x = fast.freeze(_model()), X[batch]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = _cpu_path(model, x)
        _cpu_path(model, x)
        if write == "attention copied in":
            block = _stage(model).blocks[0]
            block.attention = copy.deepcopy(block.attention)
            _cpu_path(model, x)
            _cpu_path(model, x)
        weight = _key(model).weight
        if write == "fused AdamW":
            weight.grad = _moved(weight) + 0.25
            torch.optim.AdamW([weight], lr=1.0, fused=True).step()
        else:
            with torch.no_grad():
                weight.add_(_moved(weight))
        got = _cpu_path(model, x)
        fresh = _cpu_path(fast.freeze(fast.unfreeze(copy.deepcopy(model))), x)
    assert relative_error(fresh.float(), before.float()) > 1e-3
    assert torch.equal(got, fresh)
