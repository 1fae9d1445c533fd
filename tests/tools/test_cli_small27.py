"""Small command-line fixes: an alias's own argparse errors name the alias; `benchmark --model arch.json`."""

from __future__ import annotations

import json

import pytest

from pvtv2 import PvtV2Backbone, PvtV2Config, PvtV2ForImageClassification
from pvtv2.benchmark import build_model
from pvtv2.cli import main


@pytest.mark.parametrize("typed, main_name", [("finetune", "train"), ("fine-tune", "train"), ("evaluate", "eval"),
                                              ("train", "train"), ("eval", "eval")])
def test_argparse_errors_name_the_command_as_typed(capsys, typed, main_name):
    with pytest.raises(SystemExit) as exit_:
        main(["-v", typed]) if typed.startswith("fine") else main([typed])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"pvtv2 {typed}: error: the following arguments are required" in err
    assert f"usage: pvtv2 {typed} " in err
    if typed != main_name:
        assert f"pvtv2 {main_name}:" not in err and f"usage: pvtv2 {main_name} " not in err


def test_benchmark_builds_a_config_json(tmp_path, capsys):
    fields = dict(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4], num_labels=7)
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(fields))
    for cls, backbone in ((PvtV2ForImageClassification, False), (PvtV2Backbone, True)):
        model = build_model(str(path), backbone=backbone)
        assert type(model) is cls
        expected = sum(p.numel() for p in cls(PvtV2Config(**fields)).parameters())
        assert sum(p.numel() for p in model.parameters()) == expected
    assert main(["benchmark", "--model", str(path), "--image-size", "32", "--repeats", "1", "--warmup", "0",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["batch_size"] == 1
    path.write_text(json.dumps({"depth": [1, 1, 1, 1]}))  # misspelt: refused, not the default architecture timed
    with pytest.raises(ValueError, match="depth"):
        build_model(str(path))


def test_info_shows_the_task_model_a_checkpoint_holds(tmp_path, capsys):
    from pvtv2 import PvtV2ForDepthEstimation, PvtV2ForSemanticSegmentation
    from pvtv2.flops import count_macs

    tiny = dict(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4])
    seg = PvtV2ForSemanticSegmentation(PvtV2Config(**tiny, num_labels=150), head="fpn")
    depth = PvtV2ForDepthEstimation(PvtV2Config(**tiny))
    for name, model in (("seg", seg), ("depth", depth)):
        model.save_pretrained(tmp_path / name)
        assert main(["info", str(tmp_path / name), "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        # It was a PvtV2ForImageClassification with a new 150-class classifier: the head's parameters and compute
        # left out, a random classifier counted.
        assert summary["class"] == type(model).__name__
        assert summary["parameters"] == sum(p.numel() for p in model.parameters())
        assert summary["gmacs"] == pytest.approx(count_macs(model, 224)["macs"] / 1e9)
        assert summary["num_labels"] == (150 if name == "seg" else None)


def test_benchmark_times_a_dense_checkpoint_with_its_head(tmp_path, capsys):
    from pvtv2 import PvtV2ForDepthEstimation, PvtV2ForSemanticSegmentation

    tiny = dict(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4])
    for name, model in (("seg", PvtV2ForSemanticSegmentation(PvtV2Config(**tiny, num_labels=3), head="fpn")),
                        ("depth", PvtV2ForDepthEstimation(PvtV2Config(**tiny)))):
        model.save_pretrained(tmp_path / name)
        built = build_model(str(tmp_path / name))
        assert type(built) is type(model)  # was a PvtV2ForImageClassification with a new head
        assert sum(p.numel() for p in built.parameters()) == sum(p.numel() for p in model.parameters())
        for extra in ([], ["--train"]):
            assert main(["benchmark", "--model", str(tmp_path / name), "--image-size", "64", "--repeats", "1",
                         "--warmup", "0", "--json", *extra]) == 0
            assert json.loads(capsys.readouterr().out)["images_per_s"] > 0
