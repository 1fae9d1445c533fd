"""Hostile checks of the fast path's promise after the 27th's API changes: every fast path equals the reference path
for the weights the module holds at call time, however they were written, and a model stays copyable and saveable.

Found and held here:

- PyTorch's fused optimizers (``torch.optim.AdamW(fused=True)``, ``Adam``, ``SGD``, ``Adagrad``) write the parameters
  without bumping their version counters (PyTorch 2.14 on the CPU): a frozen model kept its packed weights after
  such a step and returned the old model's logits;
- a parameter swapped in place (``torch.utils.swap_tensors``, as ``torch.__future__``'s swap mode does) becomes a
  plain ``nn.Parameter`` with the old one's memory and version: a later write through its ``.data`` was not counted
  and the old packed weights were used;
- ``config.out_features`` / ``out_indices`` returned the config's own list: appending to it renamed the backbone's
  outputs without changing the stages it returned (three names, two maps);
- the patch embedding's small-input convolution (PyTorch's bf16 CPU convolution writes garbage weight gradients
  there) ran in bf16 for a model cast to bf16, and only for one-pixel inputs: a 2 or 3 px side under the first
  stage's 7x7 kernel gave the same garbage (1e32, NaN) under autocast.

And held as they are: a frozen backbone whose outputs are changed after inference, its deep copy, pickle and saved
copy return the reference's maps for the new stages; a frozen model with a one-pixel stage under bf16 autocast, as
a bf16 model, and compiled, against the reference path.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from pvtv2 import PvtV2Backbone, PvtV2Config, PvtV2ForImageClassification, fast

from conftest import TINY_SHALLOW, perturb_, relative_error

TOL = 1e-5
BF16_TOL = 3e-2  # bf16 rounding of two paths under the same autocast (each ~1e-2 of fp32: docs/benchmarks.md)
needs_fast = pytest.mark.skipif(
    not fast.fast_path_available(torch.float32), reason="the oneDNN operators of the fast path are not available here"
)


def _classifier(seed: int = 3, **changes) -> PvtV2ForImageClassification:
    torch.manual_seed(seed)
    model = PvtV2ForImageClassification(PvtV2Config(**{**TINY_SHALLOW, **changes}, num_labels=5))
    return perturb_(model, seed=seed).eval()


def _backbone(seed: int = 4, **changes) -> PvtV2Backbone:
    torch.manual_seed(seed)
    return perturb_(PvtV2Backbone(PvtV2Config(**{**TINY_SHALLOW, **changes})), seed=seed).eval()


def _logits(model, x, reference: bool = False, autocast: bool = False) -> torch.Tensor:
    with torch.no_grad(), fast.fast_path(not reference), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        return model(x).logits


def _maps(model, x, reference: bool = False) -> tuple[torch.Tensor, ...]:
    with torch.no_grad(), fast.fast_path(not reference):
        return model(x).feature_maps


def _fresh(model: PvtV2ForImageClassification) -> PvtV2ForImageClassification:
    """A model that never ran, with ``model``'s weights: independent of any packed copy."""
    fresh = PvtV2ForImageClassification(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    return fresh


OPTIMIZERS = {
    "AdamW fused": lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True),
    "Adam fused": lambda params: torch.optim.Adam(params, lr=1e-2, fused=True),
    "SGD fused": lambda params: torch.optim.SGD(params, lr=1e-1, momentum=0.9, fused=True),
    "Adagrad fused": lambda params: torch.optim.Adagrad(params, lr=1e-1, fused=True),
}


@needs_fast
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_frozen_model_follows_a_fused_optimizer_step(optimizer, autocast):
    model = fast.freeze(_classifier())
    x = torch.randn(2, 3, 64, 64)
    before = _logits(model, x, autocast=autocast)  # packs the weights
    opt = OPTIMIZERS[optimizer](model.parameters())
    model.train()
    model(x, labels=torch.tensor([1, 3])).loss.backward()
    opt.step()
    model.eval()
    after = _logits(model, x, autocast=autocast)
    expected = _logits(model, x, reference=True, autocast=autocast)
    assert relative_error(before.float(), expected.float()) > 0.1, "the step did not change the model"
    tol = BF16_TOL if autocast else TOL
    assert relative_error(expected.float(), after.float()) < tol
    assert relative_error(_logits(_fresh(model), x, autocast=autocast).float(), after.float()) < tol


@needs_fast
def test_parameter_swapped_in_place_then_written_through_data():
    model = fast.freeze(_classifier())
    x = torch.randn(2, 3, 64, 64)
    before = _logits(model, x)
    weight = model.pvt_v2.encoder.layers[1].blocks[0].attention.query.weight
    # A new plain Parameter of the same memory and version swapped into the frozen one (what swap mode does).
    torch.utils.swap_tensors(weight, torch.nn.Parameter(weight.detach()))
    weight.data.mul_(2.0)
    expected = _logits(model, x, reference=True)
    assert relative_error(before, expected) > 1e-3, "the write did not change the model"
    assert relative_error(expected, _logits(model, x)) < TOL
    assert relative_error(_logits(_fresh(model), x), _logits(model, x)) < TOL


@needs_fast
def test_torch_future_swap_mode_moves_and_loads_are_followed():
    model = fast.freeze(_classifier())
    x = torch.randn(2, 3, 64, 64)
    before = _logits(model, x)
    state = {k: v * 1.5 for k, v in model.state_dict().items()}
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.load_state_dict(state)
        before_bf16 = _logits(model, x)
        model.bfloat16().float()  # swapped twice: the values rounded to bf16
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    model.pvt_v2.encoder.layers[2].blocks[0].mlp.dense1.weight.data.mul_(-1.0)
    expected = _logits(model, x, reference=True)
    assert relative_error(before, before_bf16) > 0.1 and relative_error(before_bf16, expected) > 1e-3
    assert relative_error(expected, _logits(model, x)) < TOL


@pytest.mark.parametrize("field", ["out_features", "out_indices"])
def test_the_output_lists_read_from_a_config_or_backbone_are_copies(field):
    model = _backbone(out_features=["stage2", "stage3"])
    x = torch.randn(1, 3, 64, 64)
    for owner in (model.config, model):
        listed = getattr(owner, field)
        listed.append("stage4" if field == "out_features" else 3)
        listed[0] = "stage1" if field == "out_features" else 0
    assert model.out_features == model.config.out_features == ["stage2", "stage3"]
    assert model.out_indices == model.config.out_indices == [1, 2]
    maps = _maps(model, x)
    assert [m.shape[1] for m in maps] == [32, 48]  # the stages the names say
    for mine, ref in zip(maps, _maps(model, x, reference=True)):
        assert relative_error(ref, mine) < TOL


def _outputs_changed(model: PvtV2Backbone, how: str) -> None:
    if how == "features":
        model.out_features = ["stage1", "stage4"]
    else:
        model.config.out_indices = [0, -1]


@needs_fast
@pytest.mark.parametrize("how", ["features", "indices"])
def test_frozen_backbone_outputs_changed_after_inference_and_its_copies(how, tmp_path):
    model = fast.freeze(_backbone(out_features=["stage2"]))
    x = torch.randn(2, 3, 64, 80)
    assert [m.shape[1] for m in _maps(model, x)] == [32]  # packs stages 1 and 2
    _outputs_changed(model, how)
    with torch.no_grad():
        model.encoder.layers[3].blocks[0].mlp.dense2.weight.mul_(1.5)  # a stage not run before: packed on first use
    expected = _maps(model, x, reference=True)
    assert [m.shape[1:] for m in expected] == [(16, 16, 20), (64, 2, 3)]
    model.save_pretrained(tmp_path / "saved")
    copies = {
        "model": model,
        "deepcopy": copy.deepcopy(model),
        "pickle": pickle.loads(pickle.dumps(model)),
        "from_pretrained": PvtV2Backbone.from_pretrained(tmp_path / "saved"),
    }
    for name, other in copies.items():
        assert other.out_features == ["stage1", "stage4"] and other.out_indices == [0, 3], name
        assert fast.is_frozen(other) == (name == "model"), name
        got = _maps(fast.freeze(other) if name == "pickle" else other, x)
        for ref, mine in zip(expected, got):
            assert relative_error(ref, mine) < TOL, name
    # A copy's outputs are its own: changing them leaves the original's alone.
    copies["deepcopy"].out_indices = [2]
    copies["pickle"].config.out_features = ["stage3"]
    assert model.out_indices == [0, 3] and [m.shape[1] for m in _maps(model, x)] == [16, 64]


@needs_fast
@pytest.mark.parametrize("frozen", [False, True], ids=["unfrozen", "frozen"])
def test_one_pixel_stage_in_bf16_against_the_reference(frozen):
    """16 px with sr_ratios 1: the last stage is one pixel, where the reference convolves the patch embedding in the
    weights' dtype outside autocast; the fast path's bf16 stays within bf16 rounding of it."""
    model = _classifier(sr_ratios=[1, 1, 1, 1])
    if frozen:
        fast.freeze(model)
    x = torch.randn(2, 3, 16, 16)
    fp32 = _logits(model, x, reference=True)
    assert relative_error(fp32, _logits(model, x)) < TOL
    for autocast in (False, True):
        model.float()
        if not autocast:
            model.bfloat16()
        xx = x if autocast else x.bfloat16()
        expected = _logits(model, xx, reference=True, autocast=autocast)
        got = _logits(model, xx, autocast=autocast)
        assert got.dtype == torch.bfloat16
        assert relative_error(expected.float(), got.float()) < BF16_TOL
        assert relative_error(fp32, got.float()) < 2 * relative_error(fp32, expected.float()) + 1e-2


@pytest.mark.parametrize("size", [(2, 3), (3, 3), (2, 2), (1, 5)])
def test_bf16_patch_embedding_gradient_of_an_input_no_larger_than_its_padding(size):
    """PyTorch's bf16 CPU convolution writes garbage (1e32, NaN) into the weight gradient when its output is one
    pixel and the input is no larger than the padding in a dimension: not only a one-pixel input (the 16 px image's
    last stage) but a 2 or 3 px side under the first stage's 7x7 kernel (padding 3). The patch embedding's gradient
    under bf16 autocast is fp32's, to bf16 rounding, for every such input."""
    config = PvtV2Config(**TINY_SHALLOW, sr_ratios=[1, 1, 1, 1], num_labels=5)
    labels = torch.tensor([1, 2])
    for seed in range(4):
        torch.manual_seed(seed)
        model = PvtV2ForImageClassification(config).train()
        x = torch.randn(2, 3, *size)
        grads = []
        for autocast in (False, True):
            model.zero_grad()
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                model(x, labels=labels).loss.backward()
            grads.append(model.pvt_v2.encoder.layers[0].patch_embedding.proj.weight.grad.clone())
        assert torch.isfinite(grads[1]).all(), (size, seed)
        assert relative_error(grads[0], grads[1]) < 5e-2, (size, seed)


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "bf16-autocast"])
@pytest.mark.parametrize("size", [(16, 16), (3, 3)])
def test_bf16_model_patch_embedding_gradient_at_a_one_pixel_stage(size, autocast):
    """A model cast to bf16 (``model.to(torch.bfloat16)``), with or without autocast: the small-input convolution ran in
    the weights' dtype, bf16, which is where PyTorch writes the garbage; every gradient is now finite and the patch
    embeddings' are fp32's to bf16 rounding."""
    config = PvtV2Config(**TINY_SHALLOW, sr_ratios=[1, 1, 1, 1], num_labels=5)
    labels = torch.tensor([1, 2])
    for seed in range(4):
        torch.manual_seed(seed)
        model = PvtV2ForImageClassification(config).train()
        x = torch.randn(2, 3, *size)
        model(x, labels=labels).loss.backward()
        expected = {name: p.grad.clone() for name, p in model.named_parameters() if "patch_embedding.proj" in name}
        model.zero_grad()
        model.to(torch.bfloat16)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            model(x.bfloat16(), labels=labels).loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), (name, seed)
            if name in expected:
                assert relative_error(expected[name], p.grad.float()) < 0.1, (name, seed)
