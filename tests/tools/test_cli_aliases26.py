"""The command names the project's own description uses ("predict, evaluate, fine-tune, export, inspect") are
commands: ``inspect`` is ``info``, ``evaluate`` is ``eval``, ``finetune`` / ``fine-tune`` are ``train``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm

from pvtv2.cli import build_parser, main


def test_inspect_counts_the_parameters_timm_builds(capsys):
    assert main(["inspect", "pvt_v2_b0", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    model = timm.create_model("pvt_v2_b0", pretrained=False)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert main(["info", "pvt_v2_b0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == info


@pytest.mark.parametrize("alias, command, flags", [
    ("evaluate", "eval", ["--model", "pvt_v2_b0", "--data", "somewhere", "--batch-size", "3"]),
    ("finetune", "train", ["--model", "pvt_v2_b0", "--data", "somewhere", "--output", "run", "--epochs", "2"]),
    ("fine-tune", "train", ["--model", "pvt_v2_b0", "--data", "somewhere", "--output", "run", "--lr", "0.01"]),
])
def test_aliases_parse_as_their_command(alias, command, flags):
    parser = build_parser()
    via_alias, via_command = parser.parse_args([alias, *flags]), parser.parse_args([command, *flags])
    assert via_alias.func is via_command.func
    assert {k: v for k, v in vars(via_alias).items() if k != "command"} == {
        k: v for k, v in vars(via_command).items() if k != "command"}


def test_a_misspelt_flag_under_an_alias_names_the_alias_and_the_flag(capsys):
    assert main(["inspect", "pvt_v2_b0", "--imagesize", "64"]) == 2
    err = capsys.readouterr().err
    assert "pvtv2 inspect: error: unrecognized arguments: --imagesize (did you mean --image-size?)" in err


def test_output_piped_into_a_closed_reader_exits_quietly():
    # `pvtv2 inspect MODEL | head -1` closes the pipe early: no "error: Broken pipe" line and no traceback.
    script = "import sys; from pvtv2.cli import main; sys.exit(main(['inspect', 'pvt_v2_b5']))"
    proc = subprocess.run(f"{sys.executable} -c \"{script}\" | head -c 1", shell=True, capture_output=True, text=True)
    assert len(proc.stdout) == 1
    assert proc.stderr == ""
