"""Hostile checks of the round-28 cut of per-stage lists (fewer stages than four): transformers writes every field of
its config, so a two-stage transformers ``config.json`` carries the four-stage defaults ``sr_ratios=[8, 4, 2, 1]``
... beside ``num_encoder_blocks=2``; transformers reads their first entries. That file (and ``replace`` of a
four-stage config down to fewer stages, which goes through the same dict) must load as transformers builds it."""

import json

import pytest
import torch

from pvtv2 import PvtV2Config, PvtV2ForImageClassification

transformers = pytest.importorskip("transformers")

TWO = dict(num_encoder_blocks=2, depths=[1, 2], hidden_sizes=[16, 40], num_attention_heads=[1, 2], num_labels=3)


def test_a_two_stage_transformers_folder_loads_as_transformers_builds_it(tmp_path):
    torch.manual_seed(0)
    reference = transformers.PvtV2ForImageClassification(transformers.PvtV2Config(**TWO)).eval()
    with torch.no_grad():  # away from the initialisation, so that a stage built differently shows
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reference.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["sr_ratios"] == [8, 4, 2, 1] and written["num_encoder_blocks"] == 2  # what transformers writes
    ours = PvtV2ForImageClassification.from_pretrained(tmp_path).eval()
    assert ours.config.sr_ratios == [8, 4] and ours.config.patch_sizes == [7, 3] and ours.config.mlp_ratios == [8, 8]
    assert ours.newly_initialized_keys == ()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = reference(x).logits
        got = ours(x).logits
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    # and back: our save of it reads in transformers to the same numbers
    ours.save_pretrained(tmp_path / "again")
    again = transformers.PvtV2ForImageClassification.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert (again(x).logits - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_from_dict_and_replace_cut_the_default_valued_lists():
    data = transformers.PvtV2Config(**TWO).to_dict()
    config = PvtV2Config.from_dict(data)
    assert (config.sr_ratios, config.strides, config.num_attention_heads) == ([8, 4], [4, 2], [1, 2])
    four = PvtV2Config(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4])
    two = four.replace(num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2])
    assert (two.sr_ratios, two.patch_sizes, two.mlp_ratios) == ([8, 4], [7, 3], [8, 8])
    assert PvtV2Config.from_dict(two.to_dict()) == two


def test_a_list_not_at_its_default_is_still_refused_from_a_file():
    data = transformers.PvtV2Config(**TWO, sr_ratios=[4, 2, 1, 1]).to_dict()
    with pytest.raises(ValueError, match=r"sr_ratios has 4 entries but num_encoder_blocks is 2"):
        PvtV2Config.from_dict(data)


@pytest.mark.parametrize("stages", [2, 3])
def test_a_stage_count_set_after_the_config_was_built_is_refused_by_the_model(stages, tmp_path):
    """``config.num_encoder_blocks = 2`` on a four-stage config (no check runs on setattr, as in transformers) built a
    four-stage model that disagreed with its own config: transformers builds two stages from that config.json, and
    pvtv2 refused the folder it had saved. The model names the contradiction when it is built."""
    config = PvtV2Config(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4])
    config.num_encoder_blocks = stages
    with pytest.raises(ValueError, match=rf"num_encoder_blocks is {stages}.*depths has 4 entries.*replace"):
        PvtV2ForImageClassification(config)
