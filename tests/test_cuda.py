"""The GPU path, where a CUDA device is present (skipped elsewhere): the same numbers as transformers' model on the
same device (outputs and gradients in fp32, outputs under bf16 autocast), the dense and detection heads equal to
their CPU results, and training with ``--amp fp16`` / ``--amp bf16`` on the GPU through the command."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY_SHALLOW, TINY_SMALL_IMAGES, random_weights_, relative_error

from pvtv2 import (
    PvtV2Backbone,
    PvtV2Config,
    PvtV2ForDepthEstimation,
    PvtV2ForImageClassification,
    PvtV2ForSemanticSegmentation,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
transformers = pytest.importorskip("transformers")

CUDA = torch.device("cuda")


@contextlib.contextmanager
def ieee_fp32():
    """fp32 matmuls and convolutions without TF32 (cuDNN would use TF32 for convolutions by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _pair(preset: str, linear: bool = False, seed: int = 0):
    """transformers' classifier with random weights, and ours holding the same, both on the GPU."""
    config = PvtV2Config.from_preset(preset, linear_attention=linear, num_labels=10)
    data = config.to_dict()
    data.pop("stage_names", None)
    reference = random_weights_(transformers.PvtV2ForImageClassification(transformers.PvtV2Config(**data)), seed)
    ours = PvtV2ForImageClassification(config)
    ours.load_state_dict(reference.state_dict())
    return reference.to(CUDA).eval(), ours.to(CUDA).eval()


@pytest.mark.parametrize("linear", [False, True], ids=["sra", "linear"])
def test_logits_and_gradients_match_transformers_on_the_gpu(linear):
    reference, ours = _pair("pvt_v2_b0", linear)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 224, 160, generator=gen).to(CUDA)
    labels = torch.tensor([1, 7, 3, 0], device=CUDA)
    with ieee_fp32():
        with torch.no_grad():
            assert relative_error(reference(x).logits, ours(x).logits) < 1e-5
        ref_out, our_out = reference(x, labels=labels), ours(x, labels=labels)
        ref_out.loss.backward()
        our_out.loss.backward()
    assert relative_error(ref_out.loss, our_out.loss) < 1e-5
    ours_grads = dict(ours.named_parameters())
    largest = max(p.grad.abs().max().item() for p in reference.parameters())
    for name, p in reference.named_parameters():
        if name.endswith("key.bias"):  # exactly zero in exact arithmetic (softmax ignores a shift of all logits)
            assert ours_grads[name].grad.abs().max() < 1e-6 * largest, name
            continue
        # Measured: at most 2.2e-4 (the patch embedding of stage 1, at the end of the backward pass), with the two
        # models' attention backward in different kernels (fused SDPA here, softmax and matmuls in transformers).
        assert relative_error(p.grad, ours_grads[name].grad) < 1e-3, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_logits_are_as_close_to_fp32_as_transformers(dtype):
    """Under autocast both models round differently from fp32; ours may not be further off than the reference."""
    reference, ours = _pair("pvt_v2_b1")
    x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(2)).to(CUDA)
    with torch.no_grad():
        with ieee_fp32():
            exact = reference(x).logits
        with torch.autocast("cuda", dtype=dtype):
            ref_low, our_low = reference(x).logits, ours(x).logits
    ref_err, our_err = relative_error(exact, ref_low), relative_error(exact, our_low)
    assert our_err < 3e-2, our_err
    assert our_err <= 2 * ref_err + 1e-3, (our_err, ref_err)
    assert (our_low.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.75


def test_backbone_and_dense_heads_equal_their_cpu_results():
    torch.manual_seed(0)
    config = PvtV2Config(**TINY_SHALLOW, num_labels=4, decoder_hidden_size=32, out_features=["stage1", "stage4"])
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(3))
    for cls in (PvtV2Backbone, PvtV2ForSemanticSegmentation, PvtV2ForDepthEstimation):
        model = random_weights_(cls(config), seed=4).eval()
        with torch.no_grad(), ieee_fp32():
            on_cpu = model(x)[0]
            on_gpu = model.to(CUDA)(x.to(CUDA))[0]
        for a, b in zip(on_cpu if isinstance(on_cpu, tuple) else [on_cpu], on_gpu if isinstance(on_gpu, tuple) else [on_gpu]):
            assert relative_error(a, b.cpu()) < 1e-5, cls.__name__


@pytest.mark.parametrize("detector", ["retinanet", "mask_rcnn"])
def test_detector_on_the_gpu_finds_what_it_finds_on_the_cpu(detector):
    pytest.importorskip("torchvision")
    from pvtv2.models.detection import PvtV2ForObjectDetection

    torch.manual_seed(0)
    config = PvtV2Config(**TINY_SHALLOW, id2label={0: "a", 1: "b"}, detector=detector, min_size=96, max_size=128,
                         patch_embed_layer_norm_eps=1e-5, reduction_layer_norm_eps=1e-5,
                         score_threshold=0.0)  # an untrained detector's scores sit below the default 0.05
    model = PvtV2ForObjectDetection(config).eval()
    gen = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 80, 100, generator=gen), torch.rand(3, 96, 72, generator=gen)]
    with torch.no_grad(), ieee_fp32():
        on_cpu = model(images)
        on_gpu = model.to(CUDA)([im.to(CUDA) for im in images])
    for a, b in zip(on_cpu, on_gpu):
        # The top boxes agree; the long tail near the score threshold and NMS ties may differ in order.
        top = min(10, len(a["scores"]), len(b["scores"]))
        assert top > 0
        assert torch.allclose(a["scores"][:top], b["scores"][:top].cpu(), atol=1e-4)
        assert torch.allclose(a["boxes"][:top], b["boxes"][:top].cpu(), atol=1e-2)
    # A training step's losses on the GPU.
    model.train()
    targets = [dict(boxes=torch.tensor([[10.0, 12.0, 45.0, 60.0]], device=CUDA), labels=torch.tensor([1], device=CUDA))]
    if detector == "mask_rcnn":
        masks = torch.zeros(1, 80, 100, dtype=torch.uint8, device=CUDA)
        masks[0, 12:60, 10:45] = 1
        targets[0]["masks"] = masks
    losses = model([images[0].to(CUDA)], targets)
    total = sum(losses.values())
    total.backward()
    assert math.isfinite(total.item())


# ---------------------------------------------------------------------------------------------- the fast GPU path
@pytest.mark.parametrize("linear", [False, True], ids=["sra", "linear"])
def test_fast_path_equals_the_reference_path_on_the_gpu(linear, monkeypatch):
    """The fused Triton path (pvtv2.fast.cuda) against the reference path of the same model: fp32 to rounding;
    under bf16 and fp16 autocast no further from the fp32 result than the reference path under the same autocast."""
    pytest.importorskip("triton")
    from pvtv2 import fast
    from pvtv2.fast import cuda

    _, ours = _pair("pvt_v2_b0", linear, seed=3)
    x = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(6)).to(CUDA)
    stage = ours.pvt_v2.encoder.layers[0]
    with torch.no_grad():
        assert not cuda.applies(x[:1], stage)  # small inputs: launch-bound, the reference path
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert not cuda.applies(x, stage)
        assert cuda.applies(torch.cat([x, x]), stage)
    assert not cuda.applies(torch.cat([x, x]), stage)  # autograd on
    ours.train()
    with torch.no_grad():
        assert not fast.applies(torch.cat([x, x]), ours.pvt_v2.encoder.layers[0])  # training mode
    ours.eval()
    monkeypatch.setattr(cuda, "MIN_ELEMENTS", dict.fromkeys(cuda.MIN_ELEMENTS, 0))  # every size, to compare
    calls = []
    real = cuda.stage_forward
    with torch.no_grad(), ieee_fp32():
        with fast.fast_path(False):
            exact = ours(x).logits
        try:
            cuda.stage_forward = lambda stage, h: calls.append(1) or real(stage, h)
            fused = ours(x).logits
        finally:
            cuda.stage_forward = real
        assert len(calls) == 4  # every stage took the fused path
        assert relative_error(exact, fused) < 1e-5
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cuda", dtype=dtype):
                fused_low = ours(x).logits
                with fast.fast_path(False):
                    reference_low = ours(x).logits
            assert relative_error(exact, fused_low) <= 1.5 * relative_error(exact, reference_low) + 1e-3, dtype


def test_fast_path_of_a_bf16_model_under_autocast_keeps_the_references_fp32_stream(monkeypatch):
    """CUDA autocast runs LayerNorm in fp32 whatever the weights' dtype: a bf16 model's stages return fp32 on the
    reference path, and so must the fused path (not a bf16 stream rounded at every residual add)."""
    pytest.importorskip("triton")
    from pvtv2 import fast
    from pvtv2.fast import cuda

    monkeypatch.setattr(cuda, "MIN_ELEMENTS", dict.fromkeys(cuda.MIN_ELEMENTS, 0))
    _, ours = _pair("pvt_v2_b0", seed=5)
    ours = ours.bfloat16()
    x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(8)).to(CUDA)
    stage = ours.pvt_v2.encoder.layers[0]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert cuda.applies(x, stage)
        fused = cuda.stage_forward(stage, x)
        with fast.fast_path(False):
            reference = stage(x)[0]
    assert fused.dtype == reference.dtype == torch.float32
    assert relative_error(reference, fused) < 1e-2


def test_fast_path_reads_the_weights_of_each_call_on_the_gpu(monkeypatch):
    from pvtv2 import fast
    from pvtv2.fast import cuda

    monkeypatch.setattr(cuda, "MIN_ELEMENTS", dict.fromkeys(cuda.MIN_ELEMENTS, 0))

    _, ours = _pair("pvt_v2_b0", seed=4)
    x = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(7)).to(CUDA)
    with torch.no_grad(), ieee_fp32():
        before = ours(x).logits
        for module in ours.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.mul_(1.5)
            elif isinstance(module, torch.nn.Conv2d) and module.groups > 1:
                module.bias.add_(0.1)
        after = ours(x).logits
        with fast.fast_path(False):
            want = ours(x).logits
    assert relative_error(want, after) < 1e-5
    assert relative_error(before, after) > 1e-2


@pytest.mark.parametrize("linear", [False, True], ids=["sra", "linear"])
def test_a_frozen_model_at_small_batches_keeps_its_cast_weights_and_equals_the_reference(linear, monkeypatch):
    """Below the fused kernels' size a frozen model runs pvtv2.fast.cuda.frozen_stage_forward (the reference's
    operators with the concatenated and cast weights kept): the reference path's logits bit for bit, in fp32 and
    under bf16 autocast, and after a write to a weight."""
    from pvtv2 import fast
    from pvtv2.fast import cuda

    _, ours = _pair("pvt_v2_b0", linear, seed=9)
    fast.freeze(ours)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(10)).to(CUDA)
    calls = []
    real = cuda.frozen_stage_forward
    monkeypatch.setattr(cuda, "frozen_stage_forward", lambda stage, h: calls.append(1) or real(stage, h))
    with torch.no_grad(), ieee_fp32():
        assert cuda.applies(x, ours.pvt_v2.encoder.layers[0]) and not cuda._fuses(x)
        for autocast in (False, True):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                with fast.fast_path(False):
                    want = ours(x).logits
                calls.clear()
                first, second = ours(x).logits, ours(x).logits
            assert len(calls) == 8, autocast  # both calls, every stage
            assert torch.equal(first, want) and torch.equal(second, want), autocast
        ours.pvt_v2.encoder.layers[1].blocks[0].attention.value.weight.data.mul_(-1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with fast.fast_path(False):
                want_after = ours(x).logits
            after = ours(x).logits
    assert not torch.equal(want_after, want)
    assert torch.equal(after, want_after)


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_training_on_the_gpu_with_amp_learns_and_resumes(amp, tmp_path):
    """Digits at 16 px for three epochs: a run killed in its second epoch and resumed ends where an uninterrupted run
    ends, as far as the GPU's kernels repeat themselves (two uninterrupted runs give the bound); fp16 runs through the
    gradient scaler, whose state is saved with the run."""
    pytest.importorskip("sklearn")
    from pvtv2.data.digits import write_digits_folder
    from pvtv2.training.engine import KILL_ENV

    data = tmp_path / "digits"
    write_digits_folder(data, size=16, limit_per_class=40, seed=1)
    arch = tmp_path / "tiny.json"
    arch.write_text(json.dumps(TINY_SMALL_IMAGES))

    def train(out, *extra, kill_at=None):
        args = [sys.executable, "-m", "pvtv2", "train", "--data", str(data), "--model", str(arch), "--output", str(out),
                "--epochs", "3", "--image-size", "16", "--batch-size", "32", "--lr", "3e-3", "--warmup-epochs", "1",
                "--device", "cuda", "--amp", amp, "--no-progress", "--seed", "3", *extra]
        env = {**os.environ, **({KILL_ENV: str(kill_at)} if kill_at else {})}
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)

    for out in ("straight", "again"):
        result = train(tmp_path / out)
        assert result.returncode == 0, result.stderr[-3000:]
    killed = train(tmp_path / "resumed", kill_at=15)  # 10 batches per epoch: in the second epoch
    assert killed.returncode != 0
    result = train(tmp_path / "resumed", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(r) for r in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["train_loss"]) for r in records)
    assert records[-1]["train_loss"] < records[0]["train_loss"], records
    state = torch.load(tmp_path / "straight" / "last" / "training_state.pt", weights_only=True)
    if amp == "fp16":
        assert state.get("scaler"), sorted(state)

    def weights(name):
        return PvtV2ForImageClassification.from_pretrained(tmp_path / name / "last").state_dict()

    straight, again, resumed = weights("straight"), weights("again"), weights("resumed")
    repeat = max(relative_error(straight[k], again[k]) for k in straight)
    drift = max(relative_error(straight[k], resumed[k]) for k in straight)
    print(f"{amp}: two uninterrupted runs differ by {repeat:.3g}, the resumed one by {drift:.3g}")
    if repeat == 0.0:  # the GPU repeated itself bit for bit: so must the resumed run
        assert drift == 0.0, drift
    else:  # non-deterministic kernels (flash attention's backward): the resumed run within the GPU's own spread
        assert drift <= 10 * repeat, (drift, repeat)


@pytest.mark.parametrize("head", ["classification", "segmentation"])
def test_losses_with_labels_on_the_gpu_never_wait_for_the_device(head):
    """Labels already on the GPU: no host sync in the loss (a training step on a GPU is bound by the host, and a
    sync stalls it), and the loss equals the one from labels on the CPU, whose range is checked there."""
    config = PvtV2Config(**TINY_SHALLOW, num_labels=4, decoder_hidden_size=32)
    cls = PvtV2ForImageClassification if head == "classification" else PvtV2ForSemanticSegmentation
    model = random_weights_(cls(config), seed=6).to(CUDA)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)).to(CUDA)
    shape = (2,) if head == "classification" else (2, 64, 64)
    labels = torch.randint(0, 4, shape, generator=torch.Generator().manual_seed(7))
    if head == "segmentation":
        labels[0, :8] = 255  # ignored pixels
    with ieee_fp32():
        want = model(x, labels=labels).loss
        gpu_labels = labels.to(CUDA)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = model(x, labels=gpu_labels).loss
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert relative_error(want, got) < 1e-6
    with pytest.raises(ValueError, match="out of range"):  # CPU labels: checked, named
        model(x, labels=torch.full(shape, 9))


def test_activation_checkpointing_with_offload_on_the_gpu_keeps_the_gradients():
    """offload=True holds what the recomputation starts from in pinned host memory (save_on_cpu), as transformers 5
    does: the gradients of the model without checkpointing."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY_SHALLOW, num_labels=3))).to(CUDA).train()
    x, labels = torch.randn(2, 3, 32, 32, device=CUDA), torch.tensor([0, 2], device=CUDA)

    def grads():
        model.zero_grad()
        F.cross_entropy(model(x).logits, labels).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    with ieee_fp32():
        plain = grads()
        model.activation_checkpointing_enable(offload=True)
        got = grads()
    for key in plain:
        torch.testing.assert_close(got[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)
