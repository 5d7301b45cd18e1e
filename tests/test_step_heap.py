"""bench/step.py --steady-heap: glibc told to keep and reuse freed memory, in a process of its own."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import resource, sys
sys.path.insert(0, {bench!r})
import numpy as np
import step

def faults(n=4, blocks=4, mb=24):
    # an iteration's pattern: several large blocks live at once, then all freed
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(n):
        live = [np.ones(mb << 18, np.float32) for _ in range(blocks)]  # mb MB each, every page touched
        del live
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

if sys.argv[1] == "steady":
    print(step.steady_heap())
faults(1)
print(faults())
"""


def probe(mode: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(bench=str(ROOT / "bench")), mode],
                         capture_output=True, text=True, check=True, timeout=120)
    return out.stdout.split("\n")


def test_steady_heap_reuses_freed_blocks_where_glibc_would_fault_them_in_again():
    steady = probe("steady")
    assert steady[0].startswith("steady (glibc keeps freed memory: blocks up to 32 MB reused")
    pages = 4 * 24 << 8  # one round's four 24 MB blocks, in 4 KB pages
    assert int(steady[1]) < pages / 100  # four more rounds, all from memory the heap kept
    # glibc's defaults hand part of it back and fault it in again each round (8,199 pages here)
    assert int(probe("default")[0]) > pages / 4
