"""Hostile inputs to today's config, run-folder and checkpoint changes: each is refused in one line (a ValueError for
the library, exit status 2 for the command) instead of a traceback."""

from __future__ import annotations

import sys

import pytest

from pvtv2 import PvtV2Config
from pvtv2.cli import main
from pvtv2.weights.loading import read_config

_HUGE = "1" + "0" * 400  # a JSON integer no float holds (float() raises OverflowError)


@pytest.mark.parametrize("text", [
    '{"layer_norm_eps": %s}' % _HUGE,
    '{"initializer_range": %s}' % _HUGE,
    '{"patch_embed_layer_norm_eps": %s}' % _HUGE,
    '{"mlp_ratios": [%s, 8, 4, 4]}' % _HUGE,
    '{"hidden_dropout_prob": %s}' % _HUGE,
])
def test_an_integer_beyond_any_float_is_refused_by_name(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_text(text)
    field = text.split('"')[1]
    with pytest.raises(ValueError, match=f"^{field} must "):
        PvtV2Config.from_json_file(path)


def test_json_nested_too_deeply_is_refused_by_both_readers(tmp_path):
    depth = sys.getrecursionlimit() * 2  # deeper than json's decoder can recurse
    path = tmp_path / "config.json"
    path.write_text('{"a":' * depth + "1" + "}" * depth)
    for read in (PvtV2Config.from_json_file, lambda p: PvtV2Config.from_json_file(p, strict=True), read_config):
        with pytest.raises(ValueError, match="nested too deeply"):
            read(path)


def test_train_with_a_deeply_nested_architecture_file_is_one_line(tmp_path, capsys):
    depth = sys.getrecursionlimit() * 2
    arch = tmp_path / "arch.json"
    arch.write_text('{"a":' * depth + "1" + "}" * depth)
    (tmp_path / "data").mkdir()
    code = main(["train", "--data", str(tmp_path / "data"), "--model", str(arch), "--output", str(tmp_path / "out"),
                 "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("pvtv2 train: error: ") and "nested too deeply" in err[-1]
    assert not any("Traceback" in line for line in err)
