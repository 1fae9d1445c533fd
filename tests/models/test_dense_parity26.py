"""Dense prediction against the references in float64 (SegFormer / GLPN: transformers; Semantic FPN: a functional
computation of mmsegmentation's head), with weights and BatchNorm statistics far from their initial values, in eval
and training mode, on odd sizes and batches of 1 and 3; transformers' configs with fewer than four stages; the frozen
fast path after weights are written in place."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import pvtv2.fast
from pvtv2.models.depth import PvtV2ForDepthEstimation
from pvtv2.models.segmentation import PvtV2ForSemanticSegmentation, SemanticFPNHead

from conftest import relative_error, scramble_batch_norm_statistics_

transformers = pytest.importorskip("transformers")

SMALL = dict(depths=[1, 2, 1, 1], hidden_sizes=[16, 32, 40, 48], num_attention_heads=[1, 2, 5, 8],
             mlp_ratios=[4, 3, 2, 4], decoder_hidden_size=16)
TIGHT = 1e-10  # float64


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved off its initial value; BatchNorm means far from 0 and variances far from 1."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * 0.1)
    return scramble_batch_norm_statistics_(model, gen)


def _pair(reference_cls, config, ours_cls, folder, dtype=torch.float64):
    torch.manual_seed(0)
    reference = _perturb(reference_cls(config).to(dtype)).eval()
    reference.save_pretrained(folder)
    return reference, ours_cls.from_pretrained(folder, dtype="auto").eval()


# ---------------------------------------------------------------------------------------------- transformers' configs
@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("task", ["segformer", "glpn"])
def test_fewer_stages_with_transformers_default_per_stage_lists(tmp_path, task, stages):
    """transformers writes its four-entry defaults (mlp_ratios, sr_ratios, patch_sizes, strides, heads) into every
    config.json and reads only the first num_encoder_blocks of them: such a checkpoint was refused ("mlp_ratios has 4
    entries but num_encoder_blocks is 3")."""
    kw = dict(num_encoder_blocks=stages, depths=[1] * stages, hidden_sizes=[16, 32, 40][:stages], decoder_hidden_size=16)
    if task == "segformer":
        pair = (transformers.SegformerForSemanticSegmentation, transformers.SegformerConfig(**kw, num_labels=3),
                PvtV2ForSemanticSegmentation)
    else:
        pair = (transformers.GLPNForDepthEstimation, transformers.GLPNConfig(**kw), PvtV2ForDepthEstimation)
    assert len(pair[1].mlp_ratios) == len(pair[1].sr_ratios) == 4
    reference, model = _pair(pair[0], pair[1], pair[2], tmp_path)
    assert model.config.sr_ratios == [8, 4, 2, 1][:stages] and model.config.num_attention_heads == [1, 2, 5][:stages]
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(reference(x)[0], model(x)[0]) < TIGHT


@pytest.mark.parametrize("dtype", ["auto", torch.float64])
def test_float64_checkpoints_load_without_a_float32_round_trip(tmp_path, dtype):
    """A float64 file loaded as float64 holds the file's numbers: it was built in float32, the tensors copied into
    it (rounded) and then cast, so every weight was off by up to 6e-8 relative."""
    from safetensors.torch import load_file

    reference, _ = _pair(transformers.SegformerForSemanticSegmentation,
                         transformers.SegformerConfig(**SMALL, num_labels=3), PvtV2ForSemanticSegmentation, tmp_path)
    model = PvtV2ForSemanticSegmentation.from_pretrained(tmp_path, dtype=dtype)
    stored = load_file(tmp_path / "model.safetensors")
    assert torch.equal(model.decode_head.linear_fuse.weight, stored["decode_head.linear_fuse.weight"])
    assert torch.equal(model.decode_head.batch_norm.running_var, stored["decode_head.batch_norm.running_var"])
    assert torch.equal(model.pvt_v2.encoder.layers[1].blocks[1].mlp.dense1.weight,
                       stored["segformer.encoder.block.1.1.mlp.dense1.weight"])
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(reference(x).logits, model(x).logits) < TIGHT


# ---------------------------------------------------------------------------------------------- float64 parity
def test_segformer_float64_eval_and_train_match_transformers(tmp_path):
    """Batch of 3 at 97x131 (no multiple of 32): logits, the loss with ignored pixels and every hidden state in eval
    (transformers' sdpa path: its eager one takes the softmax in float32); in training (dropout 0) the logits, the loss, the BatchNorm running
    statistics after the step and the gradients."""
    config = transformers.SegformerConfig(**SMALL, num_labels=4, classifier_dropout_prob=0.0, drop_path_rate=0.0)
    reference, model = _pair(transformers.SegformerForSemanticSegmentation, config, PvtV2ForSemanticSegmentation,
                             tmp_path)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, 97, 131, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (3, 97, 131), generator=gen)
    labels[0, :40] = 255
    labels[2] = 255  # an image without a labelled pixel
    with torch.no_grad():
        expected = reference(x, labels=labels, output_hidden_states=True)
        got = model(x, labels=labels, output_hidden_states=True)
    assert got.logits.shape == (3, 4, 25, 33)
    assert relative_error(expected.logits, got.logits) < TIGHT
    assert abs(float(expected.loss) - float(got.loss)) < TIGHT * float(expected.loss)
    assert len(expected.hidden_states) == len(got.hidden_states) == 4
    for e, g in zip(expected.hidden_states, got.hidden_states):
        assert relative_error(e, g) < TIGHT

    reference.train(), model.train()
    expected, got = reference(x[:2], labels=labels[:2]), model(x[:2], labels=labels[:2])
    assert relative_error(expected.logits, got.logits) < TIGHT
    assert abs(float(expected.loss) - float(got.loss)) < TIGHT * float(expected.loss)
    expected.loss.backward(), got.loss.backward()
    theirs, ours = reference.decode_head.batch_norm, model.decode_head.batch_norm
    assert relative_error(theirs.running_var, ours.running_var) < TIGHT
    assert relative_error(theirs.running_mean, ours.running_mean) < TIGHT
    for theirs, ours in ((reference.decode_head.linear_fuse, model.decode_head.linear_fuse),
                         (reference.segformer.stages[0].patch_embeddings.proj,
                          model.pvt_v2.encoder.layers[0].patch_embedding.proj)):
        assert relative_error(theirs.weight.grad, ours.weight.grad) < 1e-9


@pytest.mark.parametrize("head_in_index", [-1, 1])
def test_glpn_float64_eval_and_train_match_transformers(tmp_path, head_in_index):
    """max_depth 7 (the sigmoid's scale), BatchNorm statistics far from 0 / 1, batches of 1 and 3, a tall and a wide
    input; in training the depth, the loss and the fusion's BatchNorm statistics after the step."""
    config = transformers.GLPNConfig(**SMALL, max_depth=7, head_in_index=head_in_index, drop_path_rate=0.0)
    reference, model = _pair(transformers.GLPNForDepthEstimation, config, PvtV2ForDepthEstimation, tmp_path)
    assert model.config.max_depth == 7.0 and model.config.head_in_index == head_in_index
    gen = torch.Generator().manual_seed(3)
    for batch, size in ((1, (128, 32)), (3, (64, 96))):
        x = torch.randn(batch, 3, *size, generator=gen, dtype=torch.float64)
        labels = torch.rand(batch, *size, generator=gen, dtype=torch.float64) * 7
        labels[0, :9] = 0  # no depth measured
        with torch.no_grad():
            # transformers' loss needs the depth at the labels' size: the last decoder output (head_in_index -1)
            labelled = labels if head_in_index == -1 else None
            expected = reference(x, labels=labelled, output_hidden_states=True)
            got = model(x, labels=labelled, output_hidden_states=True)
        assert got.predicted_depth.shape == expected.predicted_depth.shape
        assert 0 < float(got.predicted_depth.min()) and float(got.predicted_depth.max()) < 7
        assert relative_error(expected.predicted_depth, got.predicted_depth) < TIGHT
        if labelled is not None:
            assert abs(float(expected.loss) - float(got.loss)) < TIGHT * float(expected.loss)
        for e, g in zip(expected.hidden_states, got.hidden_states):
            assert relative_error(e, g) < TIGHT
    reference.train(), model.train()
    expected, got = reference(x, labels=labelled), model(x, labels=labelled)
    assert relative_error(expected.predicted_depth, got.predicted_depth) < TIGHT
    if labelled is not None:
        assert abs(float(expected.loss) - float(got.loss)) < TIGHT * float(expected.loss)
    theirs = reference.decoder.stages[2].fusion.convolutional_layer2[1]
    ours = model.decoder.stages[2].fusion.convolutional_layer2[1]
    assert relative_error(theirs.running_var, ours.running_var) < TIGHT
    assert relative_error(theirs.running_mean, ours.running_mean) < TIGHT


# ---------------------------------------------------------------------------------------------- Semantic FPN
def test_semantic_fpn_head_in_training_mode_is_mmsegmentations_computation():
    """BatchNorm on batch statistics (and its running statistics updated with momentum 0.1 and the unbiased
    variance), dropout 0: the head against mmsegmentation's FPNHead written out with functional ops, at an input
    size that is no multiple of 32."""
    torch.manual_seed(0)
    head = _perturb(SemanticFPNHead((16, 32, 40, 48), 24, 12, 5, dropout=0.0).double()).train()
    gen = torch.Generator().manual_seed(4)
    feats = [torch.randn(3, c, *s, generator=gen, dtype=torch.float64)
             for c, s in zip((16, 32, 40, 48), ((18, 25), (9, 13), (5, 7), (3, 4)))]
    before = copy.deepcopy(head)
    logits = head(feats)
    pyramid = before.neck(feats)
    total = None
    for level, x in enumerate(pyramid):
        convs = [m for m in before.scale_heads[level].modules() if isinstance(m, torch.nn.Conv2d)]
        norms = [m for m in before.scale_heads[level].modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for conv, norm in zip(convs, norms):
            x = F.conv2d(x, conv.weight, None, padding=1)
            mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
            n = x.numel() / x.shape[1]
            expected_mean = 0.9 * norm.running_mean + 0.1 * mean
            expected_var = 0.9 * norm.running_var + 0.1 * var * n / (n - 1)
            x = (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + norm.eps)
            x = F.relu(x * norm.weight[:, None, None] + norm.bias[:, None, None])
            if level > 0:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            trained = head.get_submodule(next(k for k, m in before.named_modules() if m is norm))
            assert relative_error(expected_mean, trained.running_mean) < TIGHT
            assert relative_error(expected_var, trained.running_var) < TIGHT
        total = x if total is None else total + F.interpolate(x, size=total.shape[2:], mode="bilinear", align_corners=False)
    expected = F.conv2d(total, before.classifier.weight, before.classifier.bias)
    assert logits.shape == (3, 5, 18, 25)
    assert relative_error(expected, logits) < TIGHT


# ---------------------------------------------------------------------------------------------- frozen fast path
@pytest.mark.parametrize("task", ["segformer", "glpn"])
def test_frozen_model_equals_transformers_after_weights_are_written_in_place(tmp_path, task):
    """pvtv2.fast.freeze, a first call, then every weight written in place (the encoder's and the head's, as a
    load_state_dict does): the next call follows the new weights, as transformers does."""
    if task == "segformer":
        pair = (transformers.SegformerForSemanticSegmentation, transformers.SegformerConfig(**SMALL, num_labels=3),
                PvtV2ForSemanticSegmentation)
    else:
        pair = (transformers.GLPNForDepthEstimation, transformers.GLPNConfig(**SMALL), PvtV2ForDepthEstimation)
    reference, model = _pair(*pair, tmp_path, dtype=torch.float32)
    x = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    pvtv2.fast.freeze(model)
    with torch.no_grad():
        assert relative_error(reference(x)[0], model(x)[0]) < 1e-5
        for net in (reference, model):
            for name, p in sorted(net.named_parameters()):
                p.mul_(1.1).add_(0.01)
        changed = reference(x)[0]
        with mock.patch.object(pvtv2.fast, "stage_forward", wraps=pvtv2.fast.stage_forward) as stage_forward:
            assert relative_error(changed, model(x)[0]) < 1e-5
    if pvtv2.fast.fast_path_available(torch.float32):  # ... and the fast path ran: the reference path would pass too
        assert stage_forward.call_count == 4
