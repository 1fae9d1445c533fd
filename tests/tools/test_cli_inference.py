"""End-to-end tests of `pvtv2 predict / eval / info / convert / visualize`, run as real subprocesses on tiny models.

Each result is compared with a value computed independently: the library called directly, transformers' PvtV2 with
the same weights, timm's PVTv2, torch's FlopCounterMode, or the paper's recorded figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from pvtv2 import PvtV2Config, PvtV2ForImageClassification
from pvtv2.flops import PAPER_GMACS, count_macs
from pvtv2.fast import fast_path
from pvtv2.data.processing import PvtV2ImageProcessor
from conftest import TINY_SHALLOW

LABELS = {0: "cat", 1: "dog", 2: "fish"}


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "pvtv2", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def run_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """The command in this process (faster than a subprocess for error paths): same parser, same error handling."""
    from pvtv2.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


def tiny_model(folder: Path, linear: bool = False, id2label=LABELS, image_size: int = 64, seed: int = 0) -> PvtV2ForImageClassification:
    torch.manual_seed(seed)
    model = PvtV2ForImageClassification(PvtV2Config(**TINY_SHALLOW, linear_attention=linear, id2label=id2label, image_size=image_size))
    with torch.no_grad():  # move every weight off its initial value so that no parameter can be ignored unnoticed
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.2)
    model.eval().save_pretrained(folder)
    return model


def write_images(folder: Path, count: int, seed: int, size=(40, 52)) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    model = tiny_model(root / "model")
    images = write_images(root / "images" / "nested", 3, seed=1) + write_images(root / "images", 2, seed=2)
    return root, model, sorted(images)


@pytest.mark.slow
def test_predict_json_matches_library_and_transformers(workspace):
    import transformers

    root, model, images = workspace
    result = run("predict", "--model", str(root / "model"), str(root / "images"), "--json", "--top-k", "3", "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert [Path(r["image"]) for r in out] == images  # the folder is searched recursively, in sorted order

    processor = PvtV2ImageProcessor(size={"height": 64, "width": 64})
    pixel_values = processor([PIL.Image.open(p).convert("RGB") for p in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ours = model(pixel_values).logits.softmax(-1)
    hf = transformers.PvtV2ForImageClassification.from_pretrained(root / "model").eval()
    with torch.no_grad():
        theirs = hf(pixel_values).logits.softmax(-1)
    for r, p_ours, p_hf in zip(out, ours, theirs):
        indices = [e["index"] for e in r["predictions"]]
        scores = torch.tensor([e["score"] for e in r["predictions"]], dtype=torch.float64)
        assert indices == p_ours.argsort(descending=True)[:3].tolist()
        assert [e["label"] for e in r["predictions"]] == [LABELS[i] for i in indices]
        torch.testing.assert_close(scores, p_ours[indices].double(), rtol=0, atol=1e-6)
        torch.testing.assert_close(scores, p_hf[indices].double(), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_predict_uses_the_folders_preprocessor_config(workspace, tmp_path):
    root, model, images = workspace
    folder = tmp_path / "with_processor"
    model.save_pretrained(folder)
    processor = PvtV2ImageProcessor(size={"height": 48, "width": 80}, image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])
    processor.save_pretrained(folder)
    result = run("predict", "--model", str(folder), str(images[0]), "--json", "--top-k", "1")
    assert result.returncode == 0, result.stderr
    score = json.loads(result.stdout)[0]["predictions"][0]["score"]
    with torch.no_grad():
        expected = model(processor(PIL.Image.open(images[0]).convert("RGB"))["pixel_values"]).logits.softmax(-1).max()
    assert abs(score - float(expected)) < 1e-6


@pytest.mark.slow
def test_predict_bad_inputs_exit_2(workspace, tmp_path, capsys):
    root, _, images = workspace
    missing = run_here(capsys, "predict", "--model", str(root / "model"), str(tmp_path / "nope.jpg"))
    assert missing.returncode == 2 and "not found" in missing.stderr and "nope.jpg" in missing.stderr

    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff not really a jpeg")
    mixed = run("predict", "--model", str(root / "model"), str(images[0]), str(corrupt), "--json")
    assert mixed.returncode == 2
    assert "corrupt.jpg" in mixed.stderr and "cannot read image" in mixed.stderr
    out = json.loads(mixed.stdout)  # the readable image is still predicted
    assert [("error" in r) for r in out] == [False, True]

    preset = run_here(capsys, "predict", "--model", "pvt_v2_b0", str(images[0]))
    assert preset.returncode == 2 and "preset" in preset.stderr and "random" in preset.stderr
    assert "Traceback" not in preset.stderr + mixed.stderr + missing.stderr


def make_dataset(root: Path) -> dict[str, list[Path]]:
    return {name: write_images(root / "val" / name, 3 + i, seed=10 + i) for i, name in enumerate(["dog", "cat"])}


@pytest.mark.slow
def test_eval_matches_independent_computation(workspace, tmp_path):
    root, model, _ = workspace
    data = make_dataset(tmp_path / "ds")
    result = run("eval", "--model", str(root / "model"), "--data", str(tmp_path / "ds"), "--json", "--batch-size", "3")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)

    processor = PvtV2ImageProcessor(size=64)
    logits, labels = [], []
    for name, paths in data.items():
        for p in paths:
            with torch.no_grad():
                logits.append(model(processor(PIL.Image.open(p).convert("RGB"))["pixel_values"]).logits[0])
            labels.append({"cat": 0, "dog": 1}[name])
    logits, labels = torch.stack(logits), torch.tensor(labels)
    top1 = (logits.argmax(-1) == labels).double().mean().item()
    top3 = (logits.topk(3, -1).indices == labels[:, None]).any(-1).double().mean().item()
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert got["images"] == 7 and got["classes"] == 2 and got["top5_k"] == 3
    assert got["top1"] == pytest.approx(top1, abs=1e-9)
    assert got["top5"] == pytest.approx(top3, abs=1e-9)  # only three classes: top-5 is top-3
    assert got["loss"] == pytest.approx(loss, rel=1e-5)
    assert got["images_per_second"] > 0


def test_predict_bf16_autocast_against_fp32_reference(workspace, capsys):
    """--bf16: the torch runtime under bfloat16 autocast. Its probabilities stay within bf16's precision of the fp32
    model's, and the top class agrees wherever fp32 has a clear winner."""
    root, model, images = workspace
    got = run_here(capsys, "predict", *map(str, images), "--model", str(root / "model"), "--json", "-k", "3", "--bf16")
    assert got.returncode == 0, got.stderr
    processor = PvtV2ImageProcessor(size=64)
    largest = 0.0
    for item, path in zip(json.loads(got.stdout), images):
        with torch.no_grad():
            probs = model(processor(PIL.Image.open(path).convert("RGB"))["pixel_values"]).logits[0].softmax(-1)
        scores = {p["index"]: p["score"] for p in item["predictions"]}
        for index, score in scores.items():
            largest = max(largest, abs(score - probs[index].item()))
            assert abs(score - probs[index].item()) < 0.03, (path, index)
        best, second = probs.topk(2).values.tolist()
        if best - second > 0.05:
            assert item["predictions"][0]["index"] == probs.argmax().item()
    assert largest > 1e-5  # bf16 did run: fp32 would match to about 1e-7
    wrong = run_here(capsys, "predict", str(images[0]), "--model", str(root / "model"), "--bf16",
                     "--runtime", "onnxruntime")
    assert wrong.returncode == 2 and "--runtime torch" in wrong.stderr


def test_eval_generic_labels_map_sorted_folders(tmp_path, capsys):
    model = tiny_model(tmp_path / "generic", id2label={0: "LABEL_0", 1: "LABEL_1"}, seed=3)
    data = make_dataset(tmp_path / "ds")
    result = run_here(capsys, "eval", "--no-progress", "--model", str(tmp_path / "generic"), "--data", str(tmp_path / "ds" / "val"), "--json")
    assert result.returncode == 0, result.stderr
    processor = PvtV2ImageProcessor(size=64)
    correct = 0
    for name, paths in data.items():
        for p in paths:
            with torch.no_grad():
                pred = model(processor(PIL.Image.open(p).convert("RGB"))["pixel_values"]).logits.argmax().item()
            correct += pred == sorted(data).index(name)  # cat -> 0, dog -> 1
    assert json.loads(result.stdout)["top1"] == pytest.approx(correct / 7)


def test_eval_mismatched_classes_exit_2(workspace, tmp_path, capsys):
    root, _, _ = workspace
    write_images(tmp_path / "ds" / "cat", 1, seed=0)
    write_images(tmp_path / "ds" / "zebra", 1, seed=1)
    result = run_here(capsys, "eval", "--model", str(root / "model"), "--data", str(tmp_path / "ds"))
    assert result.returncode == 2
    assert "zebra" in result.stderr and "not labels of the model" in result.stderr and "'fish'" in result.stderr


@pytest.mark.slow
def test_info_parameters_and_macs_against_flop_counter(workspace):
    from torch.utils.flop_counter import FlopCounterMode

    root, model, _ = workspace
    result = run("info", str(root / "model"), "--image-size", "97x131", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    # FlopCounterMode counts 2 FLOPs per multiply-add; with output_attentions the attention runs as counted matmuls.
    # It sees ATen's matmuls and convolutions, not the oneDNN ops of the fast path: count the reference path.
    with FlopCounterMode(display=False) as counter, torch.no_grad(), fast_path(False):
        model(torch.zeros(1, 3, 97, 131), output_attentions=True)
    assert counter.get_total_flops() > 5e6  # the whole model was counted (B0-like widths at 97x131)
    assert info["gmacs"] * 1e9 == pytest.approx(counter.get_total_flops() / 2, rel=1e-9)
    assert info["gflops"] == pytest.approx(2 * info["gmacs"])
    # output sizes of overlapping patch embeddings: floor((n + 2*(k//2) - k) / s) + 1
    assert [s["output"] for s in info["stages"]] == [[25, 33], [13, 17], [7, 9], [4, 5]]


@pytest.mark.parametrize("name", sorted(PAPER_GMACS))
def test_preset_macs_match_paper(name):
    with torch.device("meta"):
        model = PvtV2ForImageClassification(PvtV2Config.from_preset(name))
    gmacs = count_macs(model, 224)["macs"] / 1e9
    if name == "pvt_v2_b0":  # a real model on the CPU (where inference takes the packed path) counts the same
        real = PvtV2ForImageClassification(PvtV2Config.from_preset(name))
        assert count_macs(real, 224)["macs"] == count_macs(model, 224)["macs"]
    # The paper rounds to one decimal (B0's 0.566 prints as 0.6, a 6% gap); the larger models land within 1%.
    paper = PAPER_GMACS[name]
    assert abs(gmacs - paper) <= max(0.05, 0.01 * paper), (name, gmacs)


def test_info_preset_text_and_json(capsys):
    result = run_here(capsys, "info", "pvt_v2_b2_li", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["parameters"] == 22_553_512  # timm's pvt_v2_b2_li, recorded
    assert info["paper_gmacs"] == 3.9 and abs(info["gmacs"] - 3.9) < 0.05
    assert [s["output"] for s in info["stages"]] == [[56, 56], [28, 28], [14, 14], [7, 7]]
    text = run_here(capsys, "info", "pvt_v2_b0").stdout
    assert "multiply-adds" in text and "3,666,760" in text


@pytest.mark.slow
def test_convert_timm_file_to_folder_loads_in_transformers(tmp_path):
    import timm
    import transformers

    torch.manual_seed(0)
    ref = timm.models.pvt_v2.PyramidVisionTransformerV2(
        depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), mlp_ratios=(2, 2, 2, 2), num_classes=4
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    result = run("convert", str(tmp_path / "timm.pth"), str(tmp_path / "folder"))
    assert result.returncode == 0, result.stderr
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected = ref(x)
        ours = PvtV2ForImageClassification.from_pretrained(tmp_path / "folder")(x).logits
        hf = transformers.PvtV2ForImageClassification.from_pretrained(tmp_path / "folder").eval()(x).logits
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # transformers uses layer_norm_eps (1e-6) where timm uses 1e-5: a small, bounded difference
    torch.testing.assert_close(hf, expected, rtol=1e-3, atol=1e-3)

    # and back to a single timm-layout file that timm loads strictly, with the same logits
    back = run("convert", str(tmp_path / "folder"), str(tmp_path / "back.safetensors"), "--layout", "timm")
    assert back.returncode == 0, back.stderr
    from safetensors.torch import load_file

    ref.load_state_dict(load_file(tmp_path / "back.safetensors"), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), expected, rtol=0, atol=0)


def test_convert_to_timm_names_each_setting_the_weights_do_not_carry(tmp_path, caplog):
    """Heads, the block epsilon and the activation travel in no timm or original state dict: converting a model whose
    values differ from the published variants' warns about each, and timm's model computes the same logits only when
    built with what the warnings say."""
    import timm
    from safetensors.torch import load_file

    from pvtv2.export import convert_checkpoint

    kwargs = dict(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], mlp_ratios=[2, 2, 2, 2], num_labels=3)
    torch.manual_seed(0)
    model = PvtV2ForImageClassification(PvtV2Config(**kwargs, num_attention_heads=[2, 4, 3, 2],
                                                    layer_norm_eps=1e-5)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.2)
    model.save_pretrained(tmp_path / "model")
    with caplog.at_level("WARNING", logger="pvtv2"):
        convert_checkpoint(tmp_path / "model", tmp_path / "timm.safetensors", "timm")
    text = caplog.text
    assert "num_attention_heads=[2, 4, 3, 2]" in text and "num_heads=(2, 4, 3, 2)" in text
    assert "layer_norm_eps=1e-05" in text and "patch embeddings" not in text  # those are 1e-5 here, as timm's
    state = load_file(tmp_path / "timm.safetensors")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model(x).logits

        def timm_logits(**settings):
            ref = timm.models.pvt_v2.PyramidVisionTransformerV2(
                depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), mlp_ratios=(2, 2, 2, 2), num_classes=3, **settings)
            ref.load_state_dict(state, strict=True)
            return ref.eval()(x)

        published = timm_logits(num_heads=(1, 2, 3, 4))  # timm's defaults for these widths' variants
        as_told = timm_logits(num_heads=(2, 4, 3, 2),
                              norm_layer=lambda dim, **kw: timm.layers.LayerNorm(dim, eps=1e-5, **kw))
    assert (published - ours).abs().max() > 1e-3
    torch.testing.assert_close(as_told, ours, rtol=1e-5, atol=1e-5)
    # a model with the published settings converts without a word about them
    plain = PvtV2ForImageClassification(PvtV2Config(**dict(kwargs, hidden_sizes=[8, 16, 40, 64]),
                                                    patch_embed_layer_norm_eps=1e-5, reduction_layer_norm_eps=1e-5))
    plain.save_pretrained(tmp_path / "plain")  # (warns that transformers would read the epsilons otherwise)
    caplog.clear()
    with caplog.at_level("WARNING", logger="pvtv2"):
        convert_checkpoint(tmp_path / "plain", tmp_path / "plain.safetensors", "original")
    assert caplog.text == ""


def test_convert_to_a_transformers_file_names_each_setting_the_weights_do_not_carry(tmp_path, caplog):
    """A single transformers-layout file has no config.json: heads, epsilons and activation are lost as in timm's
    layout, and both transformers (a default PvtV2Config) and pvtv2 (reading the file) build the published settings.
    Converting a model with other values warns about each; transformers' model gives its logits only when built with
    what the warnings say, and pvtv2 reads the file back with other logits. Published settings convert silently."""
    import transformers
    from safetensors.torch import load_file

    from pvtv2.export import convert_checkpoint

    kwargs = dict(depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 160, 256], mlp_ratios=[2, 2, 2, 2], num_labels=3)
    torch.manual_seed(0)
    model = PvtV2ForImageClassification(PvtV2Config(**kwargs, num_attention_heads=[2, 4, 10, 16], layer_norm_eps=1e-3,
                                                    hidden_act="relu", patch_embed_layer_norm_eps=1e-5)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.2)
    model.save_pretrained(tmp_path / "model")
    caplog.clear()
    with caplog.at_level("WARNING", logger="pvtv2"):
        convert_checkpoint(tmp_path / "model", tmp_path / "model.safetensors", "transformers")
    text = caplog.text
    assert "num_attention_heads=[2, 4, 10, 16]" in text and "num_attention_heads=(2, 4, 10, 16)" in text
    assert "layer_norm_eps=0.001" in text and "'relu'" in text and "this model uses 1e-05 / 0.001 there" in text
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model(x).logits

        def transformers_logits(**settings):
            config = transformers.PvtV2Config(depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 160, 256],
                                              mlp_ratios=[2, 2, 2, 2], num_labels=3, **settings)
            ref = transformers.PvtV2ForImageClassification(config).eval()
            ref.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
            return ref(x).logits

        as_told = transformers_logits(num_attention_heads=[2, 4, 10, 16], layer_norm_eps=1e-3, hidden_act="relu")
        reread = PvtV2ForImageClassification.from_pretrained(tmp_path / "model.safetensors").eval()(x).logits
        published = transformers_logits()
    assert (published - ours).abs().max() > 1e-2 and (reread - ours).abs().max() > 1e-2
    # the patch epsilon (1e-5, where transformers uses layer_norm_eps) is the only difference left, as warned
    assert 0 < (as_told - ours).abs().max() < 1e-3
    # published settings (transformers' own: one epsilon everywhere) convert without a word
    plain = PvtV2ForImageClassification(PvtV2Config(**kwargs))
    plain.save_pretrained(tmp_path / "plain")
    caplog.clear()
    with caplog.at_level("WARNING", logger="pvtv2"):
        convert_checkpoint(tmp_path / "plain", tmp_path / "plain.safetensors", "transformers")
    assert caplog.text == ""


@pytest.mark.slow
def test_visualize_writes_png_of_expected_size(workspace, tmp_path):
    root, _, images = workspace
    out = tmp_path / "attn.png"
    result = run("visualize", "--model", str(root / "model"), str(images[0]), "--output", str(out), "--panel-size", "96")
    assert result.returncode == 0, result.stderr
    with PIL.Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (5 * 96, 96 + 2 * 18)  # the input and four stages, under a two-line caption strip


def test_attention_figure_maps_are_key_distributions():
    from pvtv2.visualize import attention_maps

    for linear, keys in ((False, [(8, 8), (4, 4), (2, 2), (2, 2)]), (True, [(7, 7)] * 4)):
        torch.manual_seed(0)
        model = PvtV2ForImageClassification(PvtV2Config(**TINY_SHALLOW, linear_attention=linear, num_labels=2)).eval()
        maps = attention_maps(model, torch.randn(1, 3, 256, 256))
        # tokens 64x64, 32x32, 16x16, 8x8; sr ratios 8, 4, 2, 1 -> keys 8x8, 8x8, 8x8, 8x8 ... except as computed:
        assert [m["tokens"] for m in maps] == [(64, 64), (32, 32), (16, 16), (8, 8)]
        expected = [(8, 8), (8, 8), (8, 8), (8, 8)] if not linear else keys
        assert [m["keys"] for m in maps] == expected
        for m in maps:  # the average over heads and queries of softmax rows is a distribution over the keys
            assert m["map"].shape == m["keys"] and abs(m["map"].sum() - 1) < 1e-5 and (m["map"] >= 0).all()


# ---------------------------------------------------------------------------------------------- --runtime onnxruntime
def predict_json(capsys, model: Path, images: Path, *extra: str) -> list[dict]:
    result = run_here(capsys, "predict", "--no-progress", "--model", str(model), str(images), "--json", "--top-k", "3",
                      "--batch-size", "2", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assert_same_predictions(got: list[dict], expected: list[dict]) -> None:
    assert [r["image"] for r in got] == [r["image"] for r in expected]
    for g, e in zip(got, expected):
        assert [p["label"] for p in g["predictions"]] == [p["label"] for p in e["predictions"]]
        assert [p["index"] for p in g["predictions"]] == [p["index"] for p in e["predictions"]]
        scores_g = np.array([p["score"] for p in g["predictions"]])
        scores_e = np.array([p["score"] for p in e["predictions"]])
        np.testing.assert_allclose(scores_g, scores_e, rtol=0, atol=1e-4)


def test_predict_onnxruntime_exported_on_the_fly_matches_torch(workspace, tmp_path, capsys, monkeypatch):
    """Linear attention here (its pooling is the hard part of exporting); the spatial-reduction model of the
    workspace goes through onnxruntime from an exported file in the next test."""
    import tempfile

    pytest.importorskip("onnxruntime")
    root, _, _ = workspace
    tiny_model(tmp_path / "linear", linear=True, seed=5)
    expected = predict_json(capsys, tmp_path / "linear", root / "images")
    # The temporary export goes to a folder of this test's own: the system's is shared with other tests running at
    # the same time (pytest -n), whose exports come and go there.
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    seen = []

    def watch(path, *args, **kwargs):  # the files onnxruntime's session is made from
        seen.append(Path(path))
        return session(path, *args, **kwargs)

    import onnxruntime

    session = onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "InferenceSession", watch)
    got = predict_json(capsys, tmp_path / "linear", root / "images", "--runtime", "onnxruntime")
    assert_same_predictions(got, expected)
    assert seen and all(p.is_relative_to(tmp_path / "tmp") for p in seen), seen  # exported there ...
    assert list((tmp_path / "tmp").iterdir()) == []  # ... and gone


def test_predict_and_eval_with_onnx_file(workspace, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    root, model, _ = workspace
    onnx_file = tmp_path / "model.onnx"
    exported = run_here(capsys, "export", "--model", str(root / "model"), "--output", str(onnx_file), "--check-sizes", "64")
    assert exported.returncode == 0, exported.stderr
    expected = predict_json(capsys, root / "model", root / "images")
    got = predict_json(capsys, root / "model", root / "images", "--runtime", "onnxruntime", "--onnx", str(onnx_file))
    assert_same_predictions(got, expected)

    make_dataset(tmp_path / "ds")
    results = {}
    for runtime in ("torch", "onnxruntime"):
        extra = ["--onnx", str(onnx_file)] if runtime == "onnxruntime" else []
        out = run_here(capsys, "eval", "--no-progress", "--model", str(root / "model"), "--data", str(tmp_path / "ds"),
                       "--json", "--batch-size", "3", "--runtime", runtime, *extra)
        assert out.returncode == 0, out.stderr
        results[runtime] = json.loads(out.stdout)
        assert results[runtime]["runtime"] == runtime
    torch_result, ort_result = results["torch"], results["onnxruntime"]
    assert ort_result["images"] == torch_result["images"] == 7
    assert ort_result["top1"] == torch_result["top1"] and ort_result["top5"] == torch_result["top5"]
    assert ort_result["loss"] == pytest.approx(torch_result["loss"], rel=1e-4)


def test_onnx_file_of_another_model_is_refused(workspace, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from pvtv2 import PvtV2Model
    from pvtv2.export import export_onnx

    root, _, images = workspace
    two_classes = tiny_model(tmp_path / "two", id2label={0: "yes", 1: "no"}, seed=7)
    export_onnx(two_classes, tmp_path / "two.onnx", check_sizes=None)
    result = run_here(capsys, "predict", "--model", str(root / "model"), str(images[0]), "--runtime", "onnxruntime",
                      "--onnx", str(tmp_path / "two.onnx"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "two.onnx" in result.stderr and str(root / "model") in result.stderr
    assert "outputs 2 classes" in result.stderr and "has 3" in result.stderr

    torch.manual_seed(0)
    encoder = PvtV2Model(PvtV2Config(**TINY_SHALLOW, image_size=64)).eval()
    export_onnx(encoder, tmp_path / "encoder.onnx", check_sizes=None)
    result = run_here(capsys, "eval", "--model", str(root / "model"), "--data", str(root / "images"), "--runtime",
                      "onnxruntime", "--onnx", str(tmp_path / "encoder.onnx"))
    assert result.returncode == 2
    assert "encoder.onnx" in result.stderr and "['last_hidden_state']" in result.stderr and "'logits'" in result.stderr

    # a segmentation export names its output 'logits' too, but (B, K, H/4, W/4): refused when loaded, not at the
    # first batch, even with as many classes as the classifier
    from pvtv2 import PvtV2ForSemanticSegmentation

    torch.manual_seed(0)
    segmenter = PvtV2ForSemanticSegmentation(PvtV2Config(**TINY_SHALLOW, image_size=64, id2label=LABELS)).eval()
    export_onnx(segmenter, tmp_path / "seg.onnx", check_sizes=None)
    result = run_here(capsys, "predict", "--model", str(root / "model"), str(images[0]), "--runtime", "onnxruntime",
                      "--onnx", str(tmp_path / "seg.onnx"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "seg.onnx" in result.stderr and "of 4 dimensions" in result.stderr and "classifier" in result.stderr


def test_onnxruntime_missing_says_how_to_install(workspace, capsys, monkeypatch):
    root, _, images = workspace
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    result = run_here(capsys, "predict", "--model", str(root / "model"), str(images[0]), "--runtime", "onnxruntime")
    assert result.returncode == 2 and "pip install 'pvtv2[onnx]'" in result.stderr and "Traceback" not in result.stderr
    wrong = run_here(capsys, "predict", "--model", str(root / "model"), str(images[0]), "--onnx", "model.onnx")
    assert wrong.returncode == 2 and "--runtime onnxruntime" in wrong.stderr
