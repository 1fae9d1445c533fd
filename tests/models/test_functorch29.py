"""The models under torch.func's transforms: vmap over images, per-sample gradients (vmap of grad) and ensembles over
stacked weights (``stack_module_state``), as transformers' PvtV2 runs them.

Before, any vmap failed in the patch embedding (vmap cannot ask whether a tensor is channels-last), and vmap over
stacked weights failed in the fast path (batched weights have no storage for oneDNN). Inside a transform the stages
take the reference path and the attention its explicit form (SDPA's CPU kernels have no batching rule: vmap ran them
one sample at a time, with a warning).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import TINY, hf_config
from torch.func import functional_call, grad, jvp, stack_module_state, vmap

from pvtv2 import PvtV2Backbone, PvtV2Config, PvtV2ForImageClassification, fast

CONFIGS = {
    "sra": {},
    "linear": {"linear_attention": True},
    "no-reduction": {"sr_ratios": [1, 1, 1, 1]},
}


def pair(extra: dict | None = None, seed: int = 0):
    torch.manual_seed(seed)
    config = PvtV2Config(**{**TINY, **(extra or {})})
    ours = PvtV2ForImageClassification(config).eval()
    theirs = transformers.PvtV2ForImageClassification(hf_config(config)).eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def images(n: int = 3, batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_vmap_over_images_matches_transformers_and_a_loop(name):
    ours, theirs = pair(CONFIGS[name])
    x = images()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no "performance drop ... batching rule" fallback
        got = vmap(lambda xi: ours(xi).logits)(x)
    with torch.no_grad():
        want = vmap(lambda xi: theirs(xi).logits)(x)
        loop = torch.stack([ours(xi).logits for xi in x])  # the fast path, outside the transform
    assert got.shape == (3, 2, ours.config.num_labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, loop, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_per_sample_gradients_match_transformers_and_autograd(name):
    ours, theirs = pair(CONFIGS[name])
    ours.train()
    theirs.train()
    x = images(n=1, batch=3)[0]
    labels = torch.tensor([0, 1, 1])

    def per_sample(model):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, xi, yi):
            return F.cross_entropy(functional_call(model, p, (xi[None],)).logits, yi[None])

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, labels)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = per_sample(ours)
    want = per_sample(theirs)
    assert set(got) == set(want)
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)
    # Independent of torch.func: one autograd backward per sample (the training fast path included).
    for i in (0, 2):
        ours.zero_grad()
        F.cross_entropy(ours(x[i : i + 1]).logits, labels[i : i + 1]).backward()
        for key, p in ours.named_parameters():
            torch.testing.assert_close(got[key][i], p.grad, rtol=1e-4, atol=1e-6, msg=key)


def test_ensemble_over_stacked_weights():
    models = [PvtV2ForImageClassification(PvtV2Config(**TINY)).eval() for _ in range(3)]
    for seed, model in enumerate(models):  # three different models
        torch.manual_seed(seed)
        for p in model.parameters():
            p.data.normal_(0, 0.2)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = images(n=1)[0]
    with torch.no_grad():
        got = vmap(lambda p, b: functional_call(base, (p, b), (x,)).logits)(params, buffers)
        want = torch.stack([model(x).logits for model in models])  # the fast path, model by model
    assert not torch.allclose(want[0], want[1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_backbone_feature_maps_under_vmap():
    config = PvtV2Config(**TINY, out_features=["stage2", "stage4"])
    backbone = PvtV2Backbone(config).eval()
    x = images(n=2, batch=1, size=64)
    with torch.no_grad():
        got = vmap(lambda xi: backbone(xi).feature_maps)(x)
        loop = [backbone(xi).feature_maps for xi in x]
    for level, maps in enumerate(got):
        torch.testing.assert_close(maps, torch.stack([out[level] for out in loop]), rtol=1e-5, atol=1e-5)


def test_forward_mode_jvp_matches_transformers():
    ours, theirs = pair({})
    x = images(n=1, batch=1)[0]
    tangent = torch.randn_like(x)
    with torch.no_grad():
        _, got = jvp(lambda xi: ours(xi).logits, (x,), (tangent,))
        _, want = jvp(lambda xi: theirs(xi).logits, (x,), (tangent,))
        # Independent: the directional derivative by central differences, in float64.
        ours64 = copy.deepcopy(ours).double()
        h = 1e-6
        fd = (ours64(x.double() + h * tangent.double()).logits - ours64(x.double() - h * tangent.double()).logits) / (2 * h)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.double(), fd, rtol=1e-3, atol=1e-4)


def test_fast_path_resumes_after_a_transform():
    ours, _ = pair({})
    x = images(n=2)
    stage = ours.pvt_v2.encoder.layers[0]
    with torch.no_grad():
        vmap(lambda xi: ours(xi).logits)(x)
        assert fast.applies(x[0], stage)  # outside the transform, the fused stage runs again


@pytest.mark.parametrize("cls_name", ["PvtV2ForSemanticSegmentation", "PvtV2ForDepthEstimation"])
def test_dense_models_under_vmap(cls_name):
    import pvtv2

    model = getattr(pvtv2, cls_name)(PvtV2Config(**TINY, num_labels=3)).eval()
    x = images(n=2, batch=1, size=64)
    with torch.no_grad():
        got = vmap(lambda xi: model(xi)[0])(x)
        loop = torch.stack([model(xi)[0] for xi in x])
    torch.testing.assert_close(got, loop, rtol=1e-5, atol=1e-5)
