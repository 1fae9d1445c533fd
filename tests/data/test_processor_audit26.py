"""A model folder's preprocessor_config.json that is not a file (a folder, a dangling symlink): it used to count as
absent, so the default preprocessing (224x224 bilinear) was used without a word in place of the one the folder
records. Refused by name, as config.json and the weights are. A real file there is still read: its pixels are those
of transformers' processor built from the same file."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import transformers

from pvtv2 import PvtV2Config, PvtV2ForImageClassification, PvtV2ImageProcessor
from pvtv2.inference import load_processor

from conftest import TINY, random_weights_


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A save_pretrained folder with its own preprocessing (80x96 nearest, scalar statistics)."""
    folder = tmp_path_factory.mktemp("saved") / "tiny"
    random_weights_(PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=3))).save_pretrained(folder)
    PvtV2ImageProcessor(size={"height": 80, "width": 96}, resample=0, image_mean=0.5, image_std=0.25).save_pretrained(
        folder)
    return folder


def test_the_folders_preprocessing_is_transformers_own(saved):
    image = np.random.default_rng(0).integers(0, 256, (61, 47, 3), dtype=np.uint8)
    reference = transformers.PvtImageProcessorPil.from_pretrained(saved, do_convert_rgb=True)
    ours = load_processor(saved, 224)
    assert ours.to_dict()["size"] == {"height": 80, "width": 96}
    np.testing.assert_array_equal(ours(image, return_tensors="np")["pixel_values"],
                                  reference(image, return_tensors="np")["pixel_values"])


def _broken(saved, tmp_path, how):
    folder = tmp_path / "copy"
    shutil.copytree(saved, folder)
    (folder / "preprocessor_config.json").unlink()
    if how == "folder":
        (folder / "preprocessor_config.json").mkdir()
    else:
        (folder / "preprocessor_config.json").symlink_to(tmp_path / "gone.json")
    return folder


SAYS = {
    "folder": (ValueError, r"preprocessor_config\.json' is a folder, not a file"),
    "dangling symlink": (FileNotFoundError, r"preprocessor_config\.json' is a symlink to .*gone\.json.*which does not exist"),
}


@pytest.mark.parametrize("how", list(SAYS))
def test_a_preprocessor_config_that_is_not_a_file_is_named(saved, tmp_path, how):
    folder = _broken(saved, tmp_path, how)
    error, says = SAYS[how]
    with pytest.raises(error, match=says):
        PvtV2ImageProcessor.from_pretrained(folder)
    with pytest.raises(error, match=says):  # what `pvtv2 predict` calls for a folder
        load_processor(folder, 224)
    with pytest.raises(error, match=says):  # and for the weights file of a save_pretrained folder
        load_processor(folder / "model.safetensors", 224)


def test_a_folder_without_the_file_still_takes_the_defaults(saved, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(saved, folder)
    (folder / "preprocessor_config.json").unlink()
    assert PvtV2ImageProcessor.from_pretrained(folder) == PvtV2ImageProcessor()
    assert load_processor(folder / "model.safetensors", 224) == PvtV2ImageProcessor()


def test_a_config_json_that_is_a_folder_is_named_by_the_config_too(saved, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(saved, folder)
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    # It used to say "'config.json' not found in folder", with the name right there.
    with pytest.raises(ValueError, match=re.escape(f"{str(folder / 'config.json')!r} is a folder, not a file")):
        PvtV2Config.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------- hostile config files
def test_a_preprocessor_config_nested_too_deeply_is_named(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text("[" * 100_000 + "]" * 100_000)
    # It used to be Python's own RecursionError, "maximum recursion depth exceeded while decoding a JSON array".
    with pytest.raises(ValueError, match=r"cannot read preprocessor config .*nested too deeply"):
        PvtV2ImageProcessor.from_pretrained(tmp_path)


# Each just over the bound (should the check go, a failing run takes a few GB, not the machine).
@pytest.mark.parametrize("size", [{"height": 10**400, "width": 5}, {"height": 14_000, "width": 13_000},
                                  {"shortest_edge": 11_600}])
def test_a_size_no_image_can_have_is_refused_before_memory_is_taken(tmp_path, size):
    """A hostile file asked for 100,000 x 100,000 images (a 120 GB float array for each: the machine out of memory
    at the first image), or 10**400 (PIL's "Python int too large to convert to C int"); transformers reads both too.
    The bound is where PIL refuses to open an image, twice Image.MAX_IMAGE_PIXELS, far above any model input."""
    config = {"size": size, "resample": 2}
    if "shortest_edge" in size:
        config.update(do_center_crop=True, crop_size={"height": 224, "width": 224})
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    processor = PvtV2ImageProcessor.from_pretrained(tmp_path)
    image = np.zeros((40, 30, 3), np.uint8)
    with pytest.raises(ValueError, match=r"cannot resize to .* more pixels than twice PIL\.Image\.MAX_IMAGE_PIXELS"):
        processor(image)


def test_large_sizes_below_the_bound_are_transformers_numbers(tmp_path):
    config = {"size": {"height": 4000, "width": 3000}, "resample": 2}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    image = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    reference = transformers.PvtImageProcessorPil.from_pretrained(tmp_path, do_convert_rgb=True)
    np.testing.assert_array_equal(PvtV2ImageProcessor.from_pretrained(tmp_path)(image, return_tensors="np")["pixel_values"],
                                  reference(image, return_tensors="np")["pixel_values"])
