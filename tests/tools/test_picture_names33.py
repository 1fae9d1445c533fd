"""The picture commands write PNG data: an --output named for another format (`-o out.jpg`) is refused before any
work, instead of PNG bytes under a JPEG name that a viewer or a later pipeline reads by its extension."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
from conftest import save_tiny_classifier

from pvtv2.cli import main


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "in.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("command", ["visualize", "segment", "depth", "detect"])
@pytest.mark.parametrize("name", ["out.jpg", "out.JPEG", "out.webp", "out.tif"])
def test_a_picture_named_for_another_format_is_refused_before_the_model_loads(tmp_path, image, capsys, command, name):
    out = tmp_path / name
    # the model does not exist: the name is refused first, so no loading is spent on a run that cannot write
    assert main([command, str(image), "--model", str(tmp_path / "absent"), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    suffix = name.rsplit(".", 1)[1].upper()
    assert err.endswith(f"names a {suffix} file, but the picture is written as PNG: give a name ending in .png"), err
    assert str(out) in err and not out.exists()


@pytest.mark.parametrize("name", ["out.png", "out.PNG", "out"])
def test_a_png_name_or_one_without_a_suffix_still_gets_the_picture(tmp_path, image, name):
    save_tiny_classifier(tmp_path / "model")
    out = tmp_path / name
    assert main(["visualize", str(image), "--model", str(tmp_path / "model"), "--output", str(out)]) == 0
    with PIL.Image.open(out) as picture:
        assert picture.format == "PNG" and picture.size[0] > 0
