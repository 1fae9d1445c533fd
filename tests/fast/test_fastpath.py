"""The fast inference path (oneDNN prepacked linears, fused kv / GELU / residual adds, channels-last views) against
transformers, against the model's own public-op path, under bf16 autocast, and its weight cache's invalidation."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import pvtv2.models.layers as layers
from pvtv2 import PvtV2Config, PvtV2ForImageClassification
from pvtv2.benchmark import benchmark_model

from conftest import TINY, random_weights_, relative_error

TOL = 1e-5
FAST = layers.fast_path_available(torch.float32)


def hf_pair(config: PvtV2Config, seed: int = 0):
    data = config.to_dict()
    data.pop("stage_names")
    with torch.device("meta"):
        theirs = transformers.PvtV2ForImageClassification(transformers.PvtV2Config(**data))
        ours = PvtV2ForImageClassification(config)
    random_weights_(theirs, seed=seed).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    return ours.eval(), theirs


@pytest.fixture
def public_ops_only():
    previous = layers.set_fast_path(False)
    yield
    layers.set_fast_path(previous)


def packed_entries(model: torch.nn.Module) -> int:
    return sum(len(m.__dict__["_fast_cache"].entries) for m in model.modules() if "_fast_cache" in m.__dict__)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("linear,act", [(False, "gelu"), (True, "gelu"), (False, "gelu_pytorch_tanh"), (False, "relu")])
def test_both_paths_match_transformers_and_attentions_path(fast, linear, act):
    if fast and not FAST:
        pytest.skip("oneDNN prepacked linear not available in this build")
    config = PvtV2Config(**TINY, linear_attention=linear, hidden_act=act, num_labels=7)
    ours, theirs = hf_pair(config, seed=3)
    x = torch.randn(3, 3, 75, 61)
    previous = layers.set_fast_path(fast)
    try:
        with torch.no_grad():
            expected = theirs(x, output_hidden_states=True).logits
            default = ours(x, output_hidden_states=True)
            with_probs = ours(x, output_attentions=True).logits
    finally:
        layers.set_fast_path(previous)
    assert relative_error(expected, default.logits) < TOL
    assert relative_error(with_probs, default.logits) < TOL
    # The private ops ran (prepacked weights cached) exactly when asked for.
    assert (packed_entries(ours) > 0) == fast


def test_fast_path_state_dict_unchanged():
    config = PvtV2Config(**TINY, num_labels=4)
    ours, theirs = hf_pair(config)
    before = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    with torch.no_grad():
        ours(torch.randn(1, 3, 64, 64))
    after = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert after == before == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


@pytest.mark.skipif(not FAST, reason="oneDNN prepacked linear not available in this build")
def test_cache_follows_weight_changes():
    config = PvtV2Config(**TINY, num_labels=4)
    ours, _ = hf_pair(config, seed=0)
    _, other = hf_pair(config, seed=1)
    x = torch.randn(2, 3, 64, 64)

    def reference(model):
        previous = layers.set_fast_path(False)
        try:
            with torch.no_grad():
                return model(x).logits
        finally:
            layers.set_fast_path(previous)

    with torch.no_grad():
        ours(x)  # fills the cache
    # load_state_dict copies in place.
    ours.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert relative_error(other(x).logits, ours(x).logits) < TOL
    # An optimizer step changes the weights in place.
    ours.train()
    assert packed_entries(ours) == 0  # .train() drops the packed weights
    opt = torch.optim.SGD(ours.parameters(), lr=0.5)
    ours(x).logits.square().mean().backward()
    opt.step()
    ours.eval()
    with torch.no_grad():
        ours(x)
    ref = reference(ours)
    with torch.no_grad():
        got = ours(x).logits
    assert relative_error(other(x).logits.detach(), got) > 1e-3  # the step did change the model
    assert relative_error(ref, got) < TOL
    # An in-place edit of one weight, outside any optimizer.
    with torch.no_grad():
        ours.pvt_v2.encoder.layers[1].blocks[0].attention.value.weight.mul_(-1)
        assert relative_error(reference(ours), ours(x).logits) < TOL


def test_training_gradients_match_transformers():
    config = PvtV2Config(**TINY, num_labels=5)
    ours, theirs = hf_pair(config, seed=2)
    ours.train(), theirs.train()
    x = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([1, 4])
    ours(x, labels=labels).loss.backward()
    theirs(x, labels=labels).loss.backward()
    grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        if name.endswith("attention.key.bias"):  # softmax ignores a shift shared by all keys: gradient zero
            assert p.grad.abs().max() < 1e-6
            continue
        assert relative_error(grads[name].grad, p.grad) < 1e-4, name


def test_eval_with_autograd_uses_public_ops_and_gives_gradients():
    config = PvtV2Config(**TINY, num_labels=3)
    ours, theirs = hf_pair(config, seed=4)
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    ours(x).logits.sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    theirs(x_ref).logits.sum().backward()
    assert relative_error(x_ref.grad, x.grad) < 1e-4
    assert packed_entries(ours) == 0


def test_bf16_autocast_close_to_fp32_reference():
    config = PvtV2Config(**TINY, num_labels=10)
    ours, theirs = hf_pair(config, seed=5)
    # Logits with a clear winner per image, so top-1 is a fair test at bf16 precision.
    with torch.no_grad():
        ours.classifier.weight.mul_(8.0)
        theirs.classifier.weight.mul_(8.0)
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = ours(x).logits
    assert low.dtype == torch.bfloat16  # the linear layers did run in bf16
    assert relative_error(expected, low.float()) < 0.05
    margin = expected.topk(2).values
    clear = (margin[:, 0] - margin[:, 1]) > 0.1 * expected.abs().max()
    assert torch.equal(low.float().argmax(-1)[clear], expected.argmax(-1)[clear])


def test_channels_last_hidden_states_have_transformers_values_and_usual_ops():
    config = PvtV2Config(**TINY)
    ours, theirs = hf_pair(config, seed=6)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a = ours(x, output_hidden_states=True).hidden_states
        b = theirs(x, output_hidden_states=True).hidden_states
    for mine, ref in zip(a, b):
        assert mine.shape == ref.shape
        assert relative_error(ref.flatten(2), mine.flatten(2)) < TOL
        assert relative_error(ref.contiguous().view(-1), mine.reshape(-1)) < TOL


def test_benchmark_model_figures_are_consistent():
    model = PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=3))
    result = benchmark_model(model, batch_size=2, image_size=64, repeats=3, warmup=1)
    assert result.images_per_s == pytest.approx(2 / (result.latency_ms / 1e3))
    assert result.best_latency_ms <= result.latency_ms
    rss_kib = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
    assert result.peak_rss_mb == pytest.approx(rss_kib / 1024, rel=0.05)  # what the kernel reports as the peak
    train = benchmark_model(model, batch_size=2, image_size=64, repeats=1, warmup=0, train=True, num_labels=3)
    assert train.mode == "train" and not model.training
    json.dumps(train.to_dict())
    with pytest.raises(ValueError, match="dtype"):
        benchmark_model(model, dtype="fp8")


@pytest.mark.skipif(not FAST, reason="oneDNN prepacked linear not available in this build")
@pytest.mark.parametrize("linear,act", [(False, "gelu"), (True, "gelu"), (False, "relu")])
@pytest.mark.parametrize("piece_rows", [None, 3, 5])
def test_ffn_pieces_match_transformers(monkeypatch, linear, act, piece_rows):
    """The Mix-FFN in groups of images (piece_rows None: a piece holds one or two images) or in bands of rows
    (piece_rows: a piece is that many rows of one image), against transformers and against one piece."""
    config = PvtV2Config(**TINY, linear_attention=linear, hidden_act=act, num_labels=6)
    ours, theirs = hf_pair(config, seed=7)
    x = torch.randn(5, 3, 75, 61)  # stage 1 is 19 x 16 tokens: bands end with a short one
    with torch.no_grad():
        expected = theirs(x, output_hidden_states=True)
        whole = ours(x).logits
        first = ours.pvt_v2.encoder.layers[0].blocks[0].mlp
        row_bytes = 16 * first.dense1.out_features * 4
        image_bytes = 19 * row_bytes
        pieces = row_bytes * (piece_rows + 2) if piece_rows else 2 * image_bytes
        calls = []
        original = layers.MixFFN._fast_hidden

        def counting(self, h, height, width):
            calls.append((h.shape[0], height))
            return original(self, h, height, width)

        monkeypatch.setattr(layers, "_FFN_PIECE_BYTES", pieces)
        monkeypatch.setattr(layers.MixFFN, "_fast_hidden", counting)
        got = ours(x, output_hidden_states=True)
    for ref, mine in zip(expected.hidden_states, got.hidden_states):
        assert relative_error(ref, mine) < TOL
    assert relative_error(expected.logits, got.logits) < TOL
    assert relative_error(whole, got.logits) < 1e-6
    if piece_rows:  # bands: one image, piece_rows rows plus the rows above and below
        assert (1, piece_rows + 1) in calls and (1, piece_rows + 2) in calls
    else:  # groups of two images, then the fifth alone
        assert (2, 19) in calls and (1, 19) in calls


@pytest.mark.skipif(not FAST, reason="oneDNN prepacked linear not available in this build")
def test_ffn_pieces_without_residual_and_under_autocast(monkeypatch):
    """The Mix-FFN called on its own (no residual to fuse), in bands, in fp32 and under bf16 autocast."""
    torch.manual_seed(0)
    ffn = layers.MixFFN(8, 32, torch.nn.GELU()).eval()
    x = torch.randn(2, 13 * 11, 8)
    with torch.no_grad():
        monkeypatch.setattr(layers, "_FFN_PIECE_BYTES", 0)
        whole = ffn(x, 13, 11)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            whole_bf16 = ffn(x, 13, 11)
        previous = layers.set_fast_path(False)
        reference = ffn(x, 13, 11)
        layers.set_fast_path(previous)
        monkeypatch.setattr(layers, "_FFN_PIECE_BYTES", 11 * 32 * 4 * 6)  # bands of 4 rows
        banded = ffn(x, 13, 11)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            banded_bf16 = ffn(x, 13, 11)
    assert relative_error(reference, whole) < TOL
    assert relative_error(reference, banded) < TOL
    assert banded_bf16.dtype == whole_bf16.dtype
    assert relative_error(whole_bf16.float(), banded_bf16.float()) < 1e-2
    assert relative_error(reference, banded_bf16.float()) < 5e-2


@pytest.mark.skipif(not FAST, reason="oneDNN prepacked linear not available in this build")
def test_prepacked_convolutions_follow_weight_edits():
    """Patch embeddings and spatial reductions run with prepacked weights; editing a weight in place rebuilds them."""
    config = PvtV2Config(**TINY, num_labels=4)
    ours, theirs = hf_pair(config, seed=8)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        ours(x)
        stage = ours.pvt_v2.encoder.layers[0]
        assert ("proj", (2, 3, 64, 80)) in stage.patch_embedding.__dict__["_fast_cache"].entries
        assert ("reduction", (2, 16, 16, 20)) in stage.blocks[0].attention.__dict__["_fast_cache"].entries
        for model in (ours, theirs):  # the same module names (the published layout)
            model.get_submodule("pvt_v2.encoder.layers.0.patch_embedding.proj").weight.mul_(-0.5)
            model.get_submodule("pvt_v2.encoder.layers.1.blocks.0.attention.spatial_reduction").weight.mul_(2.0)
        assert relative_error(theirs(x).logits, ours(x).logits) < TOL


@pytest.mark.skipif(not FAST, reason="oneDNN prepacked linear not available in this build")
def test_convolutions_packed_per_input_shape():
    """oneDNN picks a convolution weight layout for the input size; one packed for another size is 10-100x slower. So
    each input shape has its own packing (the last four are kept), and every size gives transformers' numbers."""
    config = PvtV2Config(**TINY, num_labels=4)
    ours, theirs = hf_pair(config, seed=9)
    shapes = [(1, 3, 64, 64), (2, 3, 32, 48), (1, 3, 96, 64), (3, 3, 64, 64), (1, 3, 40, 40), (1, 3, 64, 64)]
    with torch.no_grad():
        for shape in shapes:
            x = torch.randn(shape)
            assert relative_error(theirs(x).logits, ours(x).logits) < TOL, shape
    entries = ours.pvt_v2.encoder.layers[0].patch_embedding.__dict__["_fast_cache"].entries
    # The four most recently used shapes, oldest first: (1, 3, 64, 64) was dropped as the oldest when (1, 3, 40, 40)
    # came, then packed again on its return, which dropped (2, 3, 32, 48).
    assert [k[1] for k in entries] == [(1, 3, 96, 64), (3, 3, 64, 64), (1, 3, 40, 40), (1, 3, 64, 64)]
