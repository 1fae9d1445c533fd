"""The command as a hostile user runs it, end to end: an interrupt that lands while an optional extension initialises,
outputs that are symbolic links, and what the user reads (predict's classes on real photographs, eval's accuracy)
against an independent computation."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import signal
import subprocess
import sys
import time

import PIL.Image
import pytest
import torch
from conftest import perturb_, save_tiny_classifier

from pvtv2 import PvtV2ForImageClassification
from pvtv2.cli import main
from pvtv2.runtime import MissingDependencyError, import_optional


class _InterruptedInit(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of ``names`` fail as a pybind11 extension (onnxruntime's, onnx's) fails when a Ctrl-C or SIGTERM lands
    while it initialises: ``ImportError("initialization failed")`` raised from the interrupt (seen on onnxruntime
    1 time in 3 with SIGINT sent 0-80 ms into ``import onnxruntime``)."""

    def __init__(self, names, interrupt):
        self.names, self.interrupt = set(names), interrupt

    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name.split(".")[0] in self.names else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):  # the import itself, not a probe (torch._dynamo looks for onnxruntime)
        try:
            raise self.interrupt
        except BaseException as err:
            raise ImportError("initialization failed") from err


@pytest.fixture
def interrupted_import(monkeypatch):
    def install(*names, interrupt=None):
        for name in list(sys.modules):
            if name.split(".")[0] in names:
                monkeypatch.delitem(sys.modules, name)
        monkeypatch.setattr(sys, "meta_path", [_InterruptedInit(names, interrupt or KeyboardInterrupt()), *sys.meta_path])

    return install


@pytest.mark.parametrize("package", ["onnxruntime", "onnx"])
def test_a_ctrl_c_while_an_onnx_package_initialises_is_an_interrupt_not_a_missing_package(tmp_path, interrupted_import,
                                                                                         capsys, package):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    save_tiny_classifier(tmp_path / "m")
    out = tmp_path / "out" / "m.onnx"
    interrupted_import(package)
    # onnx is optional to the export (its opset read-back and output declarations): the interrupt was swallowed there.
    assert main(["export", "--model", str(tmp_path / "m"), "--output", str(out), "--check-sizes", "1x32x32"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "pip install" not in err
    assert not (tmp_path / "out").exists()  # no file, no temporary file, no folder it created
    if package == "onnxruntime":
        image = tmp_path / "a.png"
        PIL.Image.new("RGB", (32, 32), (200, 10, 30)).save(image)
        assert main(["predict", "--model", str(tmp_path / "m"), str(image), "--runtime", "onnxruntime"]) == 130
        err = capsys.readouterr().err
        assert "interrupted" in err and "pip install" not in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "m"]


def test_a_sigterm_while_an_optional_package_initialises_stays_a_sigterm(interrupted_import):
    interrupted_import("onnxruntime", interrupt=SystemExit(143))
    with pytest.raises(SystemExit) as stop:
        import_optional("onnxruntime", "onnx", "the check")
    assert stop.value.code == 143
    # A package that is really missing is still said to be missing.
    with pytest.raises(MissingDependencyError, match=r"pip install 'pvtv2\[onnx\]'"):
        import_optional("pvtv2_no_such_package_35", "onnx", "the check")


def test_convert_to_a_link_to_a_checkpoint_folder_replaces_the_link_and_leaves_its_folder(tmp_path, capsys):
    source = save_tiny_classifier(tmp_path / "src")
    other = perturb_(save_tiny_classifier(tmp_path / "other"), seed=3)
    other.save_pretrained(tmp_path / "other")
    before = {p.name: p.read_bytes() for p in (tmp_path / "other").iterdir()}
    (tmp_path / "link").symlink_to(tmp_path / "other", target_is_directory=True)
    # The swap put the new folder in place, then called rmtree on the link it had moved aside: "cannot write 'link':
    # Cannot call rmtree on a symbolic link", status 2, for an output that was in fact written.
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "link")]) == 0, capsys.readouterr().err
    assert (tmp_path / "link").is_dir() and not (tmp_path / "link").is_symlink()
    assert {p.name: p.read_bytes() for p in (tmp_path / "other").iterdir()} == before  # the link's folder untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "other", "src"]  # no .link.old, no .link.tmp
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    converted = PvtV2ForImageClassification.from_pretrained(tmp_path / "link").eval()
    with torch.no_grad():
        assert torch.equal(converted(x).logits, source(x).logits)


def test_sigterm_during_an_export_stops_it_as_ctrl_c_does_leaving_no_temporary_file(tmp_path):
    pytest.importorskip("onnxruntime")
    save_tiny_classifier(tmp_path / "m")
    out = tmp_path / "out.onnx"
    out.write_bytes(b"the previous export")
    command = [sys.executable, "-m", "pvtv2", "export", "--model", str(tmp_path / "m"), "--output", str(out),
               "--exporter", "torchscript", "--check-sizes", *["2x64x96"] * 8]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            if any(p.name.startswith(".out.onnx.") for p in tmp_path.iterdir()):
                break
            time.sleep(0.002)
        assert process.poll() is None, process.stderr.read()  # the export was still under way
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    # The default action ended the process at once: status -15 and the hidden `.out.onnx.<pid>-<hex>.tmp` left.
    assert process.returncode == 143, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out.onnx"]
    assert out.read_bytes() == b"the previous export"
