"""The GPU's frozen path for inputs below the fused kernels' size (``pvtv2.fast.cuda.frozen_stage_forward``), run here
on CPU tensors: the reference computation with the weights it recomputes at every call (the keys' and values'
concatenation, autocast's weight casts) kept while the model is frozen. Checked: the same logits as the reference
path bit for bit (fp32, float64, bf16 autocast; spatial-reduction and linear attention, a key layer without bias),
no parameter concatenated or cast at a frozen call, and every kind of weight write seen. tests/test_cuda.py runs the
route itself on a GPU."""

from __future__ import annotations

import collections
import copy
import pickle
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pvtv2.fast.cpu as cpu
from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast
from pvtv2.fast import cuda

from conftest import TINY, perturb_


class _Ops(TorchDispatchMode):
    """Counts ATen calls, and which of them read a parameter's memory as a cast or concatenation input."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.param_reads: collections.Counter = collections.Counter()
        self.addresses = {p.data_ptr() for p in params}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] += 1
        if name in ("aten._to_copy", "aten.cat"):
            inputs = args[0] if name == "aten.cat" else [args[0]]
            if any(t.data_ptr() in self.addresses for t in inputs):
                self.param_reads[name] += 1
        return func(*args, **(kwargs or {}))


def _model(seed: int = 0, **changes) -> PvtV2ForImageClassification:
    torch.manual_seed(seed)
    return perturb_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5, **changes)), seed=seed).eval()


def _frozen_path(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's logits with every stage on ``cuda.frozen_stage_forward`` (the route a CUDA tensor takes)."""
    with mock.patch.object(fast, "applies", lambda h, stage=None: cpu.fusable(stage)), \
            mock.patch.object(fast, "stage_forward", cuda.frozen_stage_forward):
        return model(x).logits


def _reference(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with fast.fast_path(False):
        return model(x).logits


PRECISIONS = {
    "fp32": (torch.float32, False),
    "float64": (torch.float64, False),
    "bf16 autocast": (torch.float32, True),
}


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("changes", [{}, {"linear_attention": True}], ids=["sra", "linear"])
@pytest.mark.parametrize("frozen", [False, True], ids=["unfrozen", "frozen"])
def test_equals_the_reference_path_bit_for_bit(precision, changes, frozen):
    dtype, autocast = PRECISIONS[precision]
    model = _model(1, **changes).to(dtype)
    if frozen:
        fast.freeze(model)
    x = torch.randn(2, 3, 64, 48, dtype=dtype, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        want = _reference(model, x)
        for _ in range(2):  # the call that keeps the weights, then one that reads them
            got = _frozen_path(model, x)
            assert got.dtype == want.dtype
            assert torch.equal(got, want)


def test_a_key_layer_without_bias_is_computed_as_the_reference_computes_it():
    """The reference concatenates keys and values only where both have a bias or neither has; otherwise it calls the
    two layers (and so does this path: no zeros put in for the missing bias)."""
    model = _model(3)
    for stage in model.pvt_v2.encoder.layers:
        for block in stage.blocks:
            block.attention.key.bias = None
    fast.freeze(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        want = _reference(model, x)
        _frozen_path(model, x)
        assert torch.equal(_frozen_path(model, x), want)


def test_a_frozen_call_concatenates_and_casts_no_parameter():
    model = fast.freeze(_model(5))
    params = list(model.parameters())
    blocks = sum(len(stage.blocks) for stage in model.pvt_v2.encoder.layers)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        _frozen_path(model, x)
        with _Ops(params) as frozen:
            _frozen_path(model, x)
        with _Ops(params) as reference:
            _reference(model, x)
    assert reference.param_reads["aten.cat"] == 2 * blocks  # keys' and values' weights and biases, every call
    assert reference.param_reads["aten._to_copy"] > 0
    assert frozen.param_reads["aten.cat"] == frozen.param_reads["aten._to_copy"] == 0
    assert frozen.counts["aten.cat"] == 0
    # Every other operator is the reference's: the same GEMMs, convolutions, norms and attention.
    for op in ("aten.addmm", "aten.convolution", "aten.native_layer_norm", "aten.add"):
        assert frozen.counts[op] == reference.counts[op], op
    # What the kept weights saved: every cast of a weight or bias, and of the two concatenations' results per block.
    saved = reference.param_reads["aten._to_copy"] + 2 * blocks
    assert reference.counts["aten._to_copy"] - frozen.counts["aten._to_copy"] == saved


def _optimizer_step(model):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.randn(2, 3, 32, 32)).logits.square().mean().backward()
    opt.step()
    model.eval()


def _data_copy(model):  # writes through .data bypass the version counter
    for p in model.parameters():
        p.data.copy_(p.detach() * 0.9 + 0.01)


def _value_detach_write(model):
    model.pvt_v2.encoder.layers[1].blocks[0].attention.value.weight.detach().mul_(-1)


def _new_key_weight(model):  # (a key bias would not do: softmax ignores what it adds to every score of a query)
    attn = model.pvt_v2.encoder.layers[0].blocks[0].attention
    attn.key.weight = torch.nn.Parameter(torch.randn_like(attn.key.weight))


def _load_state_dict(model):
    model.load_state_dict({k: v * 1.1 if v.is_floating_point() else v for k, v in model.state_dict().items()})


WRITES = {
    "optimizer step": _optimizer_step,
    "p.data.copy_": _data_copy,
    "value weight .detach().mul_": _value_detach_write,
    "a new key weight Parameter": _new_key_weight,
    "load_state_dict": _load_state_dict,
}


@pytest.mark.parametrize("write", list(WRITES))
def test_outputs_follow_weight_writes(write):
    model = fast.freeze(_model(7))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))  # 4 keys in stage 1 (1 at 32 px)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        before = _frozen_path(model, x)
    WRITES[write](model)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        want = _reference(model, x)
        got = _frozen_path(model, x)
    assert not torch.equal(want, before)  # the write changed the model's numbers
    assert torch.equal(got, want)


def test_kept_weights_follow_the_autocast_dtype_and_stay_out_of_copies():
    model = fast.freeze(_model(9))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        with torch.autocast("cpu", torch.bfloat16):
            _frozen_path(model, x)
        with torch.autocast("cpu", torch.float16):
            assert torch.equal(_frozen_path(model, x), _reference(model, x))
        assert torch.equal(_frozen_path(model, x), _reference(model, x))  # no autocast: the fp32 weights
    clone = copy.deepcopy(model)
    assert not fast.is_frozen(clone)
    assert set(clone.state_dict()) == set(model.state_dict())
    assert pickle.loads(pickle.dumps(model)).state_dict().keys() == model.state_dict().keys()
