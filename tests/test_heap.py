"""service/heap.py: glibc's mmap threshold pinned, so a large block freed after a release goes back to the OS."""
from __future__ import annotations

import subprocess
import sys

import pytest

from service.heap import _glibc

SCRIPT = r"""
import ctypes, sys
from pathlib import Path
from service.heap import pin_mmap_threshold, trim_heap

def rss_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

if sys.argv[1] == "pin":
    assert pin_mmap_threshold()
big = bytearray(16 << 20)  # a large (< 32 MB) block freed: glibc raises its threshold to its size unless pinned
del big
blocks = [bytearray(4 << 20) for _ in range(16)]  # 64 MB of 4 MB blocks: heap blocks once the threshold rose
for b in blocks:
    b[::4096] = b"x" * len(b[::4096])
base = rss_mb()
keep = blocks.pop()  # a live block at the heap's end: freed heap blocks below it cannot be returned by shrinking
del blocks
print(base - rss_mb())
"""


@pytest.mark.skipif(_glibc() is None or not sys.platform.startswith("linux"), reason="glibc only")
def test_pinned_threshold_returns_freed_blocks_that_the_raised_threshold_keeps():
    def freed(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    assert freed("pin") > 50  # mmapped: 60 MB back to the OS on free
    assert freed("raised") < 20  # heap blocks below a live one: kept
