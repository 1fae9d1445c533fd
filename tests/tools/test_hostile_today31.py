"""Hostile pass 31 on the day's changes: per-image preprocessing in predict / eval, and convert keeping the stored
precision. No defect was found; these hold what was checked against independent references (transformers' and timm's
models, a batched processor call, a hand-computed loss), so that a later change cannot quietly break them."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, TINY_SHALLOW, random_weights_

from pvtv2.data.processing import PvtV2ImageProcessor, load_image
from pvtv2.export import convert_checkpoint
from pvtv2.inference import evaluate, predict
from pvtv2.models.config import PvtV2Config
from pvtv2.models.modeling import PvtV2ForImageClassification
from pvtv2.weights.files import read_state_dict

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")


def _images(folder, sizes, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for n, (h, w) in enumerate(sizes):
        path = folder / f"{n:02d}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("protocol", ["transformers", "timm", "original"])
def test_predict_one_image_at_a_time_gives_the_batched_processor_call_bit_for_bit(tmp_path, protocol):
    # the per-image preprocessing must not change a number: the same logits as one batched call of the processor
    # (what predict did before) and the model, for an odd batch size that splits the files unevenly
    model = random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY_SHALLOW, num_labels=9)), seed=1).eval()
    paths = _images(tmp_path, [(70, 90), (90, 70), (64, 64), (33, 120), (120, 33)])
    processor = PvtV2ImageProcessor.from_protocol(protocol, 64)
    results = predict(model, processor, paths, top_k=3, batch_size=3)
    with torch.no_grad():
        pixels = processor([load_image(p) for p in paths], return_tensors="pt")["pixel_values"]
        scores, indices = model(pixels).logits.softmax(-1).topk(3, dim=-1)
    assert [r.image for r in results] == [str(p) for p in paths]
    assert [r.indices for r in results] == indices.tolist()
    assert [r.scores for r in results] == scores.tolist()


def test_eval_of_mixed_sizes_without_a_resize_equals_the_hand_computed_loss_and_accuracy(tmp_path):
    model = random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY_SHALLOW, num_labels=3)), seed=2).eval()
    processor = PvtV2ImageProcessor(do_resize=False)
    sizes = [(64, 64), (96, 64), (64, 96), (80, 72)]
    for c in range(3):
        (tmp_path / f"LABEL_{c}").mkdir()
        for j in range(3):
            _images(tmp_path / f"LABEL_{c}", [sizes[(c + j) % 4]], seed=10 * c + j)[0].rename(
                tmp_path / f"LABEL_{c}" / f"{j}.png")
    loss, top1 = 0.0, 0
    with torch.no_grad():
        for c in range(3):
            for j in range(3):
                pixels = processor(load_image(tmp_path / f"LABEL_{c}" / f"{j}.png"), return_tensors="pt")["pixel_values"]
                logits = model(pixels).logits
                loss += float(F.cross_entropy(logits, torch.tensor([c])))
                top1 += int(logits.argmax()) == c
    for batch_size in (1, 2, 5):
        result = evaluate(model, processor, tmp_path, batch_size=batch_size)
        assert result["images"] == 9 and result["top1"] == top1 / 9
        assert result["loss"] == pytest.approx(loss / 9, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_folder_converted_to_timm_and_back_loads_in_timm_and_transformers(tmp_path, dtype):
    # the files convert writes in the stored precision must still load where they are meant to: the timm file in
    # timm's model, the folder in transformers' from_pretrained, each giving its library's logits on the source weights
    reference = transformers.PvtV2ForImageClassification(transformers.PvtV2Config(**TINY, num_labels=7))
    random_weights_(reference, seed=4).eval().to(dtype)
    reference.save_pretrained(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "timm.safetensors", "timm")
    convert_checkpoint(tmp_path / "timm.safetensors", tmp_path / "back")
    assert {t.dtype for t in read_state_dict(tmp_path / "timm.safetensors").values()} == {dtype}
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.float()(pixels).logits
        back = transformers.PvtV2ForImageClassification.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
        assert torch.equal(back(pixels).logits, expected)  # the same weights, bit for bit, through two layouts
        assert transformers.PvtV2ForImageClassification.from_pretrained(tmp_path / "back").dtype == dtype
        timm_model = timm.models.pvt_v2.PyramidVisionTransformerV2(
            depths=TINY["depths"], embed_dims=TINY["hidden_sizes"], num_heads=TINY["num_attention_heads"],
            mlp_ratios=TINY["mlp_ratios"], num_classes=7).eval()
        timm_model.load_state_dict(read_state_dict(tmp_path / "timm.safetensors"))
        ours = PvtV2ForImageClassification.from_pretrained(tmp_path / "back").eval()
        # timm's LayerNorm epsilon (1e-5 in the patch embeddings and reductions) is read back by pvtv2, not by
        # transformers: timm and pvtv2 agree, transformers differs slightly
        assert torch.allclose(ours(pixels).logits, timm_model(pixels), atol=1e-5)


def test_an_mmdet_style_file_whose_meta_and_optimizer_hold_non_tensors_under_weight_names_loads(tmp_path):
    # the new refusal of a parameter name holding no tensor must look at the state dict only, not at the metadata
    # sections beside it
    model = random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY_SHALLOW, num_labels=4)), seed=5)
    model.save_pretrained(tmp_path / "src")
    state = read_state_dict(tmp_path / "src" / "model.safetensors")
    torch.save({"meta": {"classifier.weight": "a note", "CLASSES": ("a", "b")},
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": []}], "head.bias": 3},
                "state_dict": state}, tmp_path / "src" / "pytorch_model.bin")
    (tmp_path / "src" / "model.safetensors").unlink()
    loaded = PvtV2ForImageClassification.from_pretrained(tmp_path / "src").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
