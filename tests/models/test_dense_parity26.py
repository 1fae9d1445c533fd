"""Dense prediction against the references in float64 (SegFormer / GLPN: transformers; Semantic FPN: a functional
computation of mmsegmentation's head), with weights and BatchNorm statistics far from their initial values, in eval
and training mode, on odd sizes and batches of 1 and 3; transformers' configs with fewer than four stages; the frozen
fast path after weights are written in place."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import pvtv2.fast
from pvtv2.models.depth import PvtV2ForDepthEstimation
from pvtv2.models.segmentation import PvtV2ForSemanticSegmentation, SemanticFPNHead

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
    for name, b in sorted(model.named_buffers()):
        if name.endswith("running_mean"):
            b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float64) * 2)
        elif name.endswith("running_var"):
            b.copy_(torch.rand(b.shape, generator=gen, dtype=torch.float64) * 5 + 0.1)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max() / a.abs().max())


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
        assert _rel(reference(x)[0], model(x)[0]) < TIGHT


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
        assert _rel(reference(x).logits, model(x).logits) < TIGHT
