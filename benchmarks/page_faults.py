"""Minor page faults per round of allocating and freeing six 8 MiB tensors, with glibc's default malloc settings and
with ``pvtv2.runtime.tune_malloc()``, each in fresh processes (the setting is process-wide).

    python benchmarks/page_faults.py [--processes 8]

48 MiB of fresh pages per round is 12,288 faults of 4 KiB. Untuned glibc gives most of them back to the kernel and
faults them in again; it adapts its thresholds to what was freed, so some processes keep the pages anyway (about one
in eight on the 2-core machine of docs/benchmarks.md). Tuned, the pages stay in the heap and are reused.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

SCRIPT = """
import resource, sys, torch
from pvtv2.runtime import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    blocks = [torch.ones(2 << 20) for _ in range(6)]
    del blocks
start = faults()
for _ in range(20):
    blocks = [torch.ones(2 << 20) for _ in range(6)]
    del blocks
print((faults() - start) / 20)
"""


def faults(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                         env=dict(os.environ))
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=8, help="fresh processes per setting (default: 8)")
    args = parser.parse_args()
    for mode in ("default", "tuned"):
        counts = [faults(mode) for _ in range(args.processes)]
        print(f"{mode:8s} faults per round: " + ", ".join(f"{c:.0f}" for c in counts) + " (of 12288 fresh pages)")


if __name__ == "__main__":
    main()
