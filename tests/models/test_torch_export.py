"""``torch.export.export`` of every model as users call it (``return_dict`` left at its default): the output classes
are registered with torch.export's pytree as transformers registers its own; without that, export refused them.
The exported program gives the eager model's outputs, every field, with another batch than the example's too."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_KINDS, TINY_SHALLOW, perturb_, relative_error

from pvtv2 import PvtV2Config


def _tensors(out) -> dict[str, torch.Tensor]:
    """Every tensor of an output, by field name (tuples of maps numbered)."""
    found = {}
    for key in out.keys():
        value = out[key]
        for i, t in enumerate(value if isinstance(value, tuple) else (value,)):
            found[f"{key}.{i}"] = t
    return found


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_exported_model_returns_its_output_class_with_eager_values(kind):
    config = PvtV2Config(**TINY_SHALLOW, num_labels=3, out_features=["stage2", "stage4"])
    torch.manual_seed(0)
    model = perturb_(MODEL_KINDS[kind](config), scale=0.1).eval()
    example = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        program = torch.export.export(model, (example,), kwargs={"output_hidden_states": True})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x, output_hidden_states=True)
        got = program.module()(x, output_hidden_states=True)
    assert type(got) is type(want)
    want_t, got_t = _tensors(want), _tensors(got)
    assert set(got_t) == set(want_t) and len(want_t) >= 2
    for name, t in want_t.items():
        assert relative_error(t, got_t[name]) < 1e-5, name
