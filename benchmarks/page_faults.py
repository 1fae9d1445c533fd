"""Minor page faults per round of allocating and freeing tensors, with glibc's default malloc settings and with
``pvtv2.runtime.tune_malloc()``, each in fresh processes (the setting is process-wide).

    python benchmarks/page_faults.py [--processes 8]

Two sizes of block: six 8 MiB tensors per round (48 MiB, 12,288 fresh pages of 4 KiB: a layer's activations at
batch 1) and two 64 MiB tensors (128 MiB, 32,768 pages: a Mix-FFN's hidden activation in a training step at batch
16). Untuned glibc gives most of the small blocks back to the kernel and faults them in again; it adapts its
thresholds to what was freed, so some processes keep the pages anyway (about one in eight on the 2-core machine of
docs/benchmarks.md). Blocks above 32 MiB it always maps fresh, and ``tune_malloc(large_blocks=False)`` (the setting
before large blocks were served from the heap) does too. Tuned, the pages stay in the heap and are reused.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

SCRIPT = """
import resource, sys, torch
from pvtv2.runtime import tune_malloc
mode, mib, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if mode == "tuned":
    assert tune_malloc()
elif mode == "small blocks only":
    assert tune_malloc(large_blocks=False, trim_threshold=256 << 20)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def round_():
    blocks = [torch.ones(mib << 18) for _ in range(count)]
    del blocks
for _ in range(3):
    round_()
start = faults()
for _ in range(20):
    round_()
print((faults() - start) / 20)
"""

MODES = ("default", "small blocks only", "tuned")
SIZES = ((8, 6), (64, 2))  # (MiB per block, blocks per round)


def faults(mode: str, mib: int = 8, count: int = 6) -> float:
    """Minor page faults per round in a fresh process: ``count`` blocks of ``mib`` MiB allocated, filled and freed."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(mib), str(count)], capture_output=True, text=True,
                         check=True, env=dict(os.environ))
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=8, help="fresh processes per setting (default: 8)")
    args = parser.parse_args()
    for mib, count in SIZES:
        pages = mib * count * 256
        for mode in MODES:
            counts = [faults(mode, mib, count) for _ in range(args.processes)]
            print(f"{count} x {mib} MiB, {mode:17s} faults per round: " + ", ".join(f"{c:.0f}" for c in counts)
                  + f" (of {pages} fresh pages)")


if __name__ == "__main__":
    main()
