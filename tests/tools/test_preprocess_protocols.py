"""`--preprocess` in `pvtv2 predict / eval` and the choice of evaluation preprocessing in `load_processor`.

The reference is the authors' eval transform (`classification/datasets.py`, `build_transform(is_train=False)`) and
timm's (`crop_pct=0.9`), written here with torchvision's transforms, not with pvtv2's processor.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

from pvtv2 import PvtV2Config, PvtV2ForImageClassification
from pvtv2.data.processing import IMAGENET_MEAN, IMAGENET_STD, PvtV2ImageProcessor
from pvtv2.inference import load_classifier, load_processor
from pvtv2.weights.layouts import convert_state_dict
from conftest import TINY_SHALLOW

SIZE = 224  # what a bare timm / original file infers (its shapes do not say)


def _reference_transform(crop_pct: float):
    from torchvision import transforms

    # As build_transform: Resize(int(size / crop_pct), bicubic) on the shorter side, CenterCrop(size), normalise.
    return transforms.Compose([
        transforms.Resize(math.floor(SIZE / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(SIZE),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def _write_model(root, layout: str, seed: int = 0) -> tuple[PvtV2ForImageClassification, str]:
    """A tiny trained-looking classifier written as a bare file in ``layout`` (as timm / the authors publish)."""
    torch.manual_seed(seed)
    model = PvtV2ForImageClassification(PvtV2Config(**TINY_SHALLOW, num_labels=3, image_size=SIZE))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.2)
    state = {k: v.contiguous() for k, v in convert_state_dict(model.state_dict(), to=layout).items()}
    path = root / f"{layout}_model.safetensors"
    save_file(state, path)
    return model.eval(), str(path)


def _photos(folder, count: int = 3):
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        # Smooth, photo-like content at an odd, non-square size so that resize and crop both matter.
        y, x = np.mgrid[0:83, 0:117]
        image = np.stack([np.sin(x / (7 + i)) + np.cos(y / 5), np.cos((x + y) / 9), np.sin(y / (4 + i))], -1)
        image = (image - image.min()) / (image.max() - image.min()) * 200 + rng.uniform(0, 55, image.shape)
        path = folder / f"{i}.png"
        PIL.Image.fromarray(image.astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def _run_here(capsys, *args: str) -> subprocess.CompletedProcess:
    from pvtv2.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


@pytest.mark.parametrize("layout", ["timm", "original"])
def test_a_timm_or_original_file_defaults_to_its_origins_protocol(tmp_path, caplog, layout):
    _, path = _write_model(tmp_path, layout)
    model = load_classifier(path)
    assert model.checkpoint_layout == layout
    with caplog.at_level(logging.INFO, logger="pvtv2"):
        processor = load_processor(path, model.config.image_size, origin=model.checkpoint_layout)
    assert processor.protocol == layout
    assert processor.crop_pct == {"timm": 0.9, "original": 0.875}[layout]
    article = "an" if layout == "original" else "a"
    assert f"the {layout} protocol, as the checkpoint is {article} {layout} file" in caplog.text


def test_a_transformers_file_keeps_the_plain_resize(tmp_path):
    _, path = _write_model(tmp_path, "transformers")
    model = load_classifier(path)
    assert model.checkpoint_layout == "transformers"
    processor = load_processor(path, model.config.image_size, origin=model.checkpoint_layout)
    assert processor.protocol == "transformers"
    assert processor.size == {"height": SIZE, "width": SIZE} and not processor.do_center_crop


def test_the_checkpoints_own_config_wins_over_its_origin_and_the_flag_over_both(tmp_path):
    own = PvtV2ImageProcessor(size={"height": SIZE, "width": SIZE}, resample="nearest")
    own.save_pretrained(tmp_path)
    processor = load_processor(tmp_path, (SIZE, SIZE), origin="original")
    assert processor == own and processor.protocol is None
    chosen = load_processor(tmp_path, (SIZE, SIZE), protocol="timm", origin="original")
    assert chosen == PvtV2ImageProcessor.from_protocol("timm", SIZE)


def test_bad_protocols_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown preprocessing protocol 'deit'"):
        load_processor(tmp_path, (SIZE, SIZE), protocol="deit")
    with pytest.raises(ValueError, match="crops a square .* 224x96"):
        load_processor(tmp_path, (SIZE, 96), protocol="original")
    # A plain resize works at any shape.
    assert load_processor(tmp_path, (SIZE, 96), protocol="transformers").size == {"height": SIZE, "width": 96}


@pytest.mark.parametrize(("flag", "crop_pct"), [((), 0.875), (("--preprocess", "timm"), 0.9)])
def test_predict_follows_the_reference_transform(tmp_path, capsys, flag, crop_pct):
    reference, path = _write_model(tmp_path, "original")
    images = _photos(tmp_path / "images")
    result = _run_here(capsys, "predict", "--model", path, str(tmp_path / "images"), "--json", "--top-k", "3", *flag)
    assert result.returncode == 0, result.stderr
    transform = _reference_transform(crop_pct)
    pixels = torch.stack([transform(PIL.Image.open(p).convert("RGB")) for p in images])
    with torch.no_grad():
        expected = reference(pixels).logits.softmax(-1)
    for row, probabilities in zip(json.loads(result.stdout), expected):
        top = probabilities.topk(3)
        assert [p["index"] for p in row["predictions"]] == top.indices.tolist()
        assert [p["score"] for p in row["predictions"]] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_eval_reports_the_protocol_and_its_loss(tmp_path, capsys):
    reference, path = _write_model(tmp_path, "transformers")
    images = {label: _photos(tmp_path / "data" / label, 2) for label in ("LABEL_0", "LABEL_1", "LABEL_2")}
    result = _run_here(capsys, "eval", "--model", path, "--data", str(tmp_path / "data"), "--json",
                       "--preprocess", "original")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["preprocess"] == "original"
    transform = _reference_transform(0.875)
    pixels = torch.stack([transform(PIL.Image.open(p).convert("RGB")) for paths in images.values() for p in paths])
    targets = torch.tensor([i for i, paths in enumerate(images.values()) for _ in paths])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(reference(pixels).logits, targets).item()
    assert got["loss"] == pytest.approx(loss, rel=1e-5)


def test_a_bad_preprocess_value_is_a_one_line_error(tmp_path, capsys):
    from pvtv2.cli import main

    with pytest.raises(SystemExit) as exit_info:  # argparse's own exit, before any model is read
        main(["predict", "--model", str(tmp_path / "absent.safetensors"), str(tmp_path), "--preprocess", "bicubic"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.splitlines()[-1] == (
        "pvtv2 predict: error: argument --preprocess: invalid choice: 'bicubic' (choose from 'transformers', 'timm', "
        "'original')"
    )
    assert "Traceback" not in err
