"""pvtv2.runtime: tune_malloc (checked in fresh processes: the setting is process-wide) and parse_device."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pvtv2.runtime import tune_malloc

# The measuring script of benchmarks/page_faults.py: allocate and free six 8 MiB tensors, 20 times, and print the
# minor page faults per round.
_SPEC = importlib.util.spec_from_file_location(
    "page_faults", Path(__file__).resolve().parents[2] / "benchmarks" / "page_faults.py"
)
_page_faults = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_page_faults)
_SCRIPT = _page_faults.SCRIPT


def _faults(mode: str, mib: int, count: int) -> float:
    return _page_faults.faults(mode, mib, count)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
@pytest.mark.parametrize("mib,count", [(8, 6), (64, 2)], ids=["8 MiB blocks", "64 MiB blocks"])
def test_tune_malloc_keeps_freed_blocks_for_reuse(mib, count):
    # mib * count MiB of fresh pages per round would be mib * count * 256 faults of 4 KiB; kept in the heap, the pages
    # are reused and hardly fault. (Untuned glibc faults on small blocks in most processes, but not all: it adapts its
    # thresholds to what was freed. That comparison is a measurement, in benchmarks/page_faults.py.)
    pages = mib * count * 256
    tuned = _faults("tuned", mib, count)
    assert tuned < 0.01 * pages, tuned


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_blocks_above_the_mmap_limit_fault_unless_the_heap_serves_them():
    # glibc maps every block above its 32 MiB mmap limit fresh, whatever the thresholds: each round of 2 x 64 MiB
    # faults in all 32,768 pages again; large_blocks (the default) is what keeps them.
    pages = 64 * 2 * 256
    assert _faults("small blocks only", 64, 2) > 0.9 * pages
    assert _faults("tuned", 64, 2) < 0.01 * pages


def test_tune_malloc_rejects_thresholds_glibc_would_ignore():
    with pytest.raises(ValueError, match="mmap_threshold"):
        tune_malloc(mmap_threshold=64 << 20)
    with pytest.raises(ValueError, match="trim_threshold"):
        tune_malloc(trim_threshold=0)
    with pytest.raises(ValueError, match="trim_threshold"):
        tune_malloc(trim_threshold=4 << 30)  # mallopt takes an int


@pytest.mark.parametrize("kwargs, name", [
    ({"mmap_threshold": True}, "mmap_threshold"),  # a 1-byte threshold, not "on"
    ({"mmap_threshold": 1.5}, "mmap_threshold"),
    ({"mmap_threshold": "1000"}, "mmap_threshold"),
    ({"mmap_threshold": None}, "mmap_threshold"),
    ({"trim_threshold": 0.5}, "trim_threshold"),  # passed the range check, then reached mallopt as 0
    ({"trim_threshold": True}, "trim_threshold"),
    ({"large_blocks": "no"}, "large_blocks"),  # a truthy string served large blocks from the heap
])
def test_tune_malloc_rejects_arguments_of_the_wrong_type(kwargs, name):
    # Refused before mallopt is called, so this process's allocator is left alone.
    with pytest.raises(TypeError, match=name):
        tune_malloc(**kwargs)


# Whether glibc maps a 64 MiB block (mallinfo2's hblks: the blocks mapped by mmap) after the given calls.
_MAPPED = r"""
import ctypes, sys
from pvtv2.runtime import tune_malloc
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
for large in sys.argv[1:]:
    assert tune_malloc(large_blocks=large == "1")
before = libc.mallinfo2().hblks
block = libc.malloc(64 << 20)
print(libc.mallinfo2().hblks - before)
libc.free(block)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                    reason="glibc 2.33+ malloc")
@pytest.mark.parametrize("calls, mapped", [((), 1), (("1",), 0), (("0",), 1), (("1", "0"), 1), (("0", "1"), 0)])
def test_the_last_call_decides_whether_large_blocks_are_mapped(calls, mapped):
    # large_blocks=False after tune_malloc() used to leave glibc's mmap count at 0: large blocks stayed in the heap.
    out = subprocess.run([sys.executable, "-c", _MAPPED, *calls], capture_output=True, text=True, check=True)
    assert int(out.stdout) == mapped, (calls, out.stdout)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_command_tunes_malloc_unless_told_not_to():
    script = (
        "import sys, pvtv2.runtime as r\n"
        "calls = []\n"
        "r.tune_malloc = lambda *a, **k: calls.append(1) or True\n"
        "from pvtv2.cli import main\n"
        "main(['info', 'pvt_v2_b0'])\n"
        "print('calls', len(calls), file=sys.stderr)\n"
    )
    for value, expected in (("1", 1), ("0", 0)):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             env={**os.environ, "PVTV2_TUNE_MALLOC": value})
        assert f"calls {expected}" in out.stderr, out.stderr


def test_parse_device_names_the_problem(capsys):
    import torch

    from pvtv2.cli import main
    from pvtv2.runtime import parse_device

    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        parse_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            parse_device("cuda:0")
        assert main(["benchmark", "--model", "pvt_v2_b0", "--device", "cuda", "--repeats", "1"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    else:
        with pytest.raises(ValueError, match="GPU"):
            parse_device(f"cuda:{torch.cuda.device_count()}")
