"""Folders and files that cannot be read are named, never skipped in silence; files that are not regular files (a
FIFO would block the first read) are refused by name.

Permissions do not stop root, which these tests may run as: there the operating system's answer to an unprivileged
reader (EACCES) is given by replacing the one call that would get it.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from pvtv2.data.folders import find_image_files, scan_split
from pvtv2.data.processing import load_image


def _image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)
    return path


def _deny_listing(folder: Path, monkeypatch) -> None:
    os.chmod(folder, 0)
    if os.geteuid() == 0:
        real = os.scandir

        def scandir(path="."):
            if Path(path) == folder:
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
            return real(path)

        monkeypatch.setattr(os, "scandir", scandir)


def _deny_reading(file: Path, monkeypatch) -> None:
    os.chmod(file, 0)
    if os.geteuid() == 0:
        real = PIL.Image.open

        def open_(fp, *args, **kwargs):
            if Path(fp) == file:
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(fp))
            return real(fp, *args, **kwargs)

        monkeypatch.setattr(PIL.Image, "open", open_)


@pytest.fixture
def alarm():
    """Turn a hang (a FIFO opened for reading) into a failure."""
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("blocked on a FIFO"))
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)  # the worker process's own handling, for the tests after this one


@pytest.fixture
def dataset(tmp_path):
    for name, count in (("cat", 2), ("dog", 2)):
        for i in range(count):
            _image(tmp_path / "train" / name / f"{i}.png", seed=i)
    yield tmp_path
    for path in [tmp_path, *tmp_path.rglob("*")]:  # let pytest remove what the test locked
        os.chmod(path, 0o755)


def test_an_unlistable_sub_folder_is_named_in_a_warning(dataset, monkeypatch, caplog):
    hidden = dataset / "train" / "cat" / "more"
    _image(hidden / "2.png", seed=5)
    _image(hidden / "3.png", seed=6)
    _deny_listing(hidden, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        classes, samples = scan_split(dataset, "train", verify=False)
    assert classes == ["cat", "dog"]
    assert sorted(Path(p).relative_to(dataset).as_posix() for p, _ in samples) == [
        "train/cat/0.png", "train/cat/1.png", "train/dog/0.png", "train/dog/1.png"
    ]
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(hidden) in warning and "Permission denied" in warning and "cannot be listed" in warning


def test_an_unlistable_class_folder_is_named_then_refused_as_empty(dataset, monkeypatch, caplog):
    _deny_listing(dataset / "train" / "dog", monkeypatch)
    with caplog.at_level(logging.WARNING, logger="pvtv2"), pytest.raises(ValueError, match=r"\['dog'\]"):
        scan_split(dataset, "train")
    assert str(dataset / "train" / "dog") in caplog.text


def test_an_unreadable_image_is_named_as_unreadable_with_the_reason(dataset, monkeypatch, caplog):
    locked = dataset / "train" / "dog" / "1.png"
    _deny_reading(locked, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="pvtv2"):
        _, samples = scan_split(dataset, "train")
    assert str(locked) not in [p for p, _ in samples] and len(samples) == 3
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"{locked} (Permission denied)" in warning and "1 unreadable" in warning


def test_find_image_files_lists_regular_image_files_and_the_folders_it_could_not(tmp_path, monkeypatch, alarm):
    images = [_image(tmp_path / "a.png"), _image(tmp_path / "deep" / "er" / "b.JPG")]
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "loop").symlink_to(tmp_path)  # followed, this would recurse forever
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.png")
    locked = tmp_path / "locked"
    _image(locked / "c.png")
    _deny_listing(locked, monkeypatch)
    files, unlisted = find_image_files(tmp_path)
    assert files == sorted(images)
    assert unlisted == [f"{locked} (Permission denied)"]
    os.chmod(locked, 0o755)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_load_image_refuses_a_fifo_without_opening_it(tmp_path, alarm):
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)  # opened for reading, it would block until a writer came
    with pytest.raises(ValueError, match=r"image\.png.*FIFO \(named pipe\), not an image file"):
        load_image(fifo)


def test_load_image_names_symlink_loops_and_dangling_links(tmp_path):
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    with pytest.raises(FileNotFoundError, match="symlink loop"):
        load_image(tmp_path / "a.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nothing.png")
    with pytest.raises(FileNotFoundError, match="dangling symlink"):
        load_image(tmp_path / "gone.png")
