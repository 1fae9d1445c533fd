"""A hostile user's pass over timm hub repositories loaded by pvtv2 and over ONNX export's output file.

timm's repositories are written here by timm's own ``save_for_hf`` (its config.json with ``architecture``,
``num_classes``, ``label_names``, ``pretrained_cfg``, ``model_args``), and read back by timm itself
(``pretrained_cfg_overlay=dict(file=...)``) and by transformers' ``TimmWrapperForImageClassification``; pvtv2 must
compute what they compute and name the classes as they do."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, PvtV2Model
from pvtv2.weights.files import CheckpointError

timm = pytest.importorskip("timm")
from timm.models._hub import save_for_hf  # noqa: E402

SMALL = dict(depths=(1, 2), embed_dims=(16, 32), num_heads=(1, 2), mlp_ratios=(2, 2), sr_ratios=(2, 1))
NAMES = ["cat", "dog", "bird"]


def _timm_repo(folder, arch: str = "pvt_v2_b0", num_classes: int = 3, model_config: dict | None = None):
    """A timm model of random weights saved as timm pushes it to the hub; returns the model (float64, eval)."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **SMALL)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_for_hf(model, folder, model_config=model_config, safe_serialization=True)
    return model.double().eval()


def _edit_config(folder, edit) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("arch", ["pvt_v2_b0", "pvt_v2_b2_li"])
def test_a_timm_repository_computes_timms_logits_and_keeps_its_class_names(tmp_path, arch):
    """timm's own reading of the folder and pvtv2's agree to float64 rounding (the linear variant included); the class
    names timm records (label_names) are the model's id2label, as transformers' TimmWrapperConfig makes them."""
    _timm_repo(tmp_path, arch, model_config={"label_names": NAMES})
    assert json.loads((tmp_path / "config.json").read_text())["label_names"] == NAMES  # what timm writes
    reference = timm.create_model(arch, pretrained=True, num_classes=3, **SMALL,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors"), num_classes=3))
    ours = PvtV2ForImageClassification.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert ours.config.linear_attention == arch.endswith("_li") and not ours.newly_initialized_keys
    x = torch.randn(2, 3, 64, 56, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = reference.double().eval()(x), ours(x).logits
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()
    assert ours.config.id2label == dict(enumerate(NAMES)) and ours.config.label2id == {n: i for i, n in enumerate(NAMES)}
    assert PvtV2Model.from_pretrained(tmp_path).config.id2label == dict(enumerate(NAMES))
    # labels the caller gives are theirs
    given = PvtV2ForImageClassification.from_pretrained(tmp_path, id2label={0: "x", 1: "y", 2: "z"})
    assert given.config.id2label == {0: "x", 1: "y", 2: "z"}


def test_a_new_head_asked_for_takes_no_names_and_no_warning_about_them(tmp_path, caplog):
    """num_labels=5 (a new head to fine-tune): the five classes are the caller's, as transformers' TimmWrapperConfig
    leaves label_names alone for a custom num_labels; the warning said the file's names did not fit "the checkpoint's
    5 classes" (the checkpoint has 3)."""
    _timm_repo(tmp_path, model_config={"label_names": NAMES})
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        model = PvtV2ForImageClassification.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    assert model.config.id2label == {i: f"LABEL_{i}" for i in range(5)} and "label_names" not in caplog.text


@pytest.mark.parametrize("where, names, expected", [
    ("pretrained_cfg", NAMES, dict(enumerate(NAMES))),  # timm's own place for them once loaded
    ("labels", NAMES, dict(enumerate(NAMES))),  # timm's older files: renamed to label_names by timm
    ("label_names", {"0": "cat", "2": "bird"}, {0: "cat", 1: "LABEL_1", 2: "bird"}),  # timm: a dict where ids have gaps
    ("label_names", ["cat", "dog"], None),  # two names for three classes: not this head's
    ("label_names", ["cat", 7, "bird"], None),
    ("label_names", {"zero": "cat"}, None),
])
def test_timm_label_names_in_each_form(tmp_path, caplog, where, names, expected):
    _timm_repo(tmp_path)

    def edit(data):
        data.pop("label_names", None)
        (data["pretrained_cfg"] if where == "pretrained_cfg" else data)[where if where != "pretrained_cfg" else
                                                                        "label_names"] = names
    _edit_config(tmp_path, edit)
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        model = PvtV2ForImageClassification.from_pretrained(tmp_path)
    assert model.config.num_labels == 3 and not model.newly_initialized_keys
    if expected is None:  # names that do not fit are left out, saying so and naming the file
        assert model.config.id2label == {i: f"LABEL_{i}" for i in range(3)}
        assert "config.json: its label_names" in caplog.text
    else:
        assert model.config.id2label == expected


def test_transformers_timm_wrapper_folder_loads(tmp_path):
    """transformers' TimmWrapperForImageClassification (how transformers loads timm/... repositories) saves timm's
    keys with a config.json of model_type "timm_wrapper": it was refused as "model_type='timm_wrapper', expected
    'pvt_v2'"."""
    transformers = pytest.importorskip("transformers")
    _timm_repo(tmp_path / "timm", model_config={"label_names": NAMES})
    _edit_config(tmp_path / "timm", lambda d: d["model_args"].pop("num_classes"))  # transformers passes it twice
    wrapper = transformers.TimmWrapperForImageClassification.from_pretrained(tmp_path / "timm").eval()
    wrapper.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model_type"] == "timm_wrapper"
    ours = PvtV2ForImageClassification.from_pretrained(tmp_path / "saved").eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = wrapper(x).logits, ours(x).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert ours.config.id2label == wrapper.config.id2label == dict(enumerate(NAMES))
    with pytest.raises(ValueError, match=r"timm's config\.json \(architecture 'pvt_v2_b0'\), not a PVTv2 config"):
        PvtV2Config.from_pretrained(tmp_path / "saved")


def test_a_timm_repository_of_another_architecture_is_named(tmp_path):
    """timm/resnet18.a1_in1k: the refusal names the architecture the config.json gives, not only the keys."""
    save_file({"conv1.weight": torch.zeros(4, 3, 7, 7), "fc.weight": torch.zeros(5, 4)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 5,
                                                      "pretrained_cfg": {"num_classes": 5}}))
    with pytest.raises(CheckpointError, match=r"config\.json.*'resnet18'.*not a PVTv2.*conv1\.weight"):
        PvtV2ForImageClassification.from_pretrained(tmp_path)


def test_a_headless_timm_repository_loads_as_a_headless_file(tmp_path):
    """num_classes 0 (timm's feature extractor): the encoder loads, and a classifier gets the new head it would get
    from the same file without config.json (said with a warning)."""
    reference = _timm_repo(tmp_path, num_classes=0)
    encoder = PvtV2Model.from_pretrained(tmp_path, dtype=torch.float64).eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = reference.forward_features(x)
        got = encoder(x).last_hidden_state
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()


def _tiny_classifier(seed: int) -> PvtV2ForImageClassification:
    torch.manual_seed(seed)
    config = PvtV2Config(num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 2],
                         mlp_ratios=[2, 2], sr_ratios=[2, 1], patch_sizes=[7, 3], strides=[4, 2], image_size=32,
                         num_labels=3)
    return PvtV2ForImageClassification(config).eval()


def test_an_export_keeps_to_its_own_temporary_file(tmp_path):
    """Two exports to one output at once shared the temporary file ".m.onnx.tmp": one truncated and wrote over the
    other's between its check and its rename (a check passed on one graph, another renamed into place), and each
    deleted the other's on finishing. An export now leaves another's temporary file as it found it."""
    ort = pytest.importorskip("onnxruntime")
    from pvtv2.export import export_onnx

    output = tmp_path / "m.onnx"
    other = tmp_path / ".m.onnx.tmp"  # where another export of m.onnx, under way, writes
    other.write_bytes(b"another export's graph")
    model = _tiny_classifier(0)
    export_onnx(model, output, exporter="torchscript", check_sizes=[(1, 32, 32)])
    assert other.read_bytes() == b"another export's graph"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.onnx.tmp", "m.onnx"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    (got,) = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        want = model(x).logits
    assert (torch.from_numpy(got) - want).abs().max() <= 1e-5 * want.abs().max()


def test_export_refuses_to_write_over_its_own_checkpoint(tmp_path, capsys):
    """`pvtv2 export -m ck.onnx -o ck.onnx` (a checkpoint under an .onnx name): the export replaced the weights it was
    made from. Refused before loading, the checkpoint left as it was; another output name still exports."""
    from pvtv2.cli import main

    checkpoint = tmp_path / "weights.onnx"
    _tiny_classifier(0).save_pretrained(tmp_path / "folder")
    checkpoint.write_bytes((tmp_path / "folder" / "model.safetensors").read_bytes())
    before = checkpoint.read_bytes()
    link = tmp_path / "link.onnx"
    link.symlink_to(checkpoint.name)
    for output in (checkpoint, link):
        assert main(["export", "-m", str(checkpoint), "-o", str(output), "--no-check"]) == 2
        assert "is the --model checkpoint itself" in capsys.readouterr().err
        assert checkpoint.read_bytes() == before


def test_the_cli_names_a_timm_repository_of_another_architecture(tmp_path, capsys):
    """`pvtv2 info` and `pvtv2 export` read the keys before loading: their refusal named neither the file nor the
    architecture."""
    from pvtv2.cli import main

    save_file({"conv1.weight": torch.zeros(4, 3, 7, 7), "fc.weight": torch.zeros(5, 4)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 5}))
    for command in (["info", str(tmp_path)], ["export", "-m", str(tmp_path), "-o", str(tmp_path / "m.onnx")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "model.safetensors (" in err and "names the timm architecture 'resnet18', not PVTv2" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
