"""A detector for images of other than three channels (``num_channels``), as ``from_pretrained(...,
num_channels=1, ignore_mismatched_sizes=True)`` builds one from a three-channel checkpoint.

Found and held here: the detector normalises with ``image_mean`` / ``image_std``, by default ImageNet's three
values, whatever ``num_channels`` says. Built and loaded without a word, a one-channel detector broadcast its image
into three channels and the encoder refused it at the first call ("pixel_values has 3 channels ... but the model
expects 1", for the image the caller had given with one channel); a four-channel one failed inside torchvision. Now
the model is refused where it is built, naming the setting to give; with it, the loaded parts are the checkpoint's and
the encoder computes what transformers' encoder loaded the same way computes.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from pvtv2 import PvtV2Config, PvtV2ForObjectDetection

from conftest import TINY, random_weights_

PATCH = "pvt_v2.encoder.layers.0.patch_embedding.proj.weight"


@pytest.mark.parametrize("channels", [1, 4])
def test_a_detector_of_other_channels_needs_their_statistics(channels):
    config = PvtV2Config(**TINY, detector="retinanet", num_labels=3, num_channels=channels)
    with pytest.raises(ValueError, match=f"num_channels={channels}: the detector's default image_mean is ImageNet's"):
        PvtV2ForObjectDetection(config)
    with pytest.raises(ValueError, match="image_std"):
        PvtV2ForObjectDetection(config.replace(image_mean=[0.5] * channels))
    model = PvtV2ForObjectDetection(config.replace(image_mean=[0.5] * channels, image_std=[0.25] * channels)).eval()
    with torch.no_grad():
        (found,) = model([torch.rand(channels, 64, 64, generator=torch.Generator().manual_seed(0))])
    assert set(found) == {"boxes", "labels", "scores"}


def test_a_three_channel_checkpoint_loads_into_a_one_channel_detector(tmp_path):
    saved = random_weights_(PvtV2ForObjectDetection(PvtV2Config(**TINY, detector="retinanet", num_labels=3)), seed=1)
    saved.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_channels=1: the detector's default image_mean"):
        PvtV2ForObjectDetection.from_pretrained(tmp_path, num_channels=1, ignore_mismatched_sizes=True)
    model, info = PvtV2ForObjectDetection.from_pretrained(
        tmp_path, num_channels=1, image_mean=[0.45], image_std=[0.226], ignore_mismatched_sizes=True,
        output_loading_info=True)
    assert info["mismatched_keys"] == {(PATCH, torch.Size([16, 3, 7, 7]), torch.Size([16, 1, 7, 7]))}
    assert model.newly_initialized_keys == (PATCH,)
    state, before = model.state_dict(), saved.state_dict()
    for key in state:
        if key != PATCH:
            torch.testing.assert_close(state[key], before[key], rtol=0, atol=0, msg=key)
    # The encoder: transformers' PvtV2Model loaded from the same folder the same way, given the new patch weight
    theirs = transformers.PvtV2Model.from_pretrained(tmp_path, num_channels=1, ignore_mismatched_sizes=True).eval()
    theirs.encoder.layers[0].patch_embedding.proj.weight.data.copy_(state[PATCH])
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = theirs(x).last_hidden_state
        got = model.pvt_v2(x).last_hidden_state
        (found,) = model([x[0]])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert set(found) == {"boxes", "labels", "scores"}
