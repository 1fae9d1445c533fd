"""Fewer stages than the four-stage defaults: the per-stage lists left at their defaults are read as transformers
reads them (their first entries); a list given explicitly with the wrong length stays an error."""

import pytest
import torch

from pvtv2 import PvtV2Config, PvtV2ForImageClassification

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_defaulted_lists_are_read_as_transformers_reads_them(stages):
    kwargs = dict(num_encoder_blocks=stages, depths=[1] * stages, hidden_sizes=[16, 24, 40][:stages], num_labels=5)
    torch.manual_seed(stages)
    reference = transformers.PvtV2ForImageClassification(transformers.PvtV2Config(**kwargs)).eval().double()
    with torch.no_grad():  # weights away from the initialisation, so that a stage built differently shows
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = PvtV2ForImageClassification(PvtV2Config(**kwargs)).eval().double()
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert ours.config.sr_ratios == [8, 4, 2][:stages]
    assert ours.config.num_attention_heads == [1, 2, 5][:stages]
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        expected = reference(x).logits
        got = ours(x).logits
    assert (got - expected).abs().max().item() <= 1e-10 * expected.abs().max().item()


def test_an_explicit_list_of_the_wrong_length_is_still_refused():
    with pytest.raises(ValueError, match="sr_ratios has 4 entries but num_encoder_blocks is 2"):
        PvtV2Config(num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[16, 32], sr_ratios=[8, 4, 2, 1])
    # depths and hidden_sizes are read whole by transformers (drop-path schedule, classifier width): never cut
    with pytest.raises(ValueError, match="depths has 4 entries"):
        PvtV2Config(num_encoder_blocks=3)


def test_the_cut_config_round_trips(tmp_path):
    config = PvtV2Config(num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[16, 32])
    config.save_pretrained(tmp_path)
    back = PvtV2Config.from_pretrained(tmp_path)
    assert back == config and back.strides == [4, 2] and back.mlp_ratios == [8, 8]
