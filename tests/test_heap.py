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


def test_auto_pins_for_a_large_clip_only():
    from service.heap import LARGE_CLIP_BYTES, LARGE_MODEL_MMAP_THRESHOLD, mmap_threshold_for

    assert mmap_threshold_for("auto", 12 << 20) == 0  # the embedded model: glibc's default is faster
    assert mmap_threshold_for("auto", LARGE_CLIP_BYTES) == LARGE_MODEL_MMAP_THRESHOLD
    assert mmap_threshold_for("auto", None) == LARGE_MODEL_MMAP_THRESHOLD  # an open_clip pretrained CLIP
    assert mmap_threshold_for(0, 1 << 30) == 0 and mmap_threshold_for(131072, 1) == 131072  # explicit wins


def test_clip_weights_size_is_read_before_loading(tmp_path, monkeypatch):
    from pathlib import Path

    from service.detector import clip_weights_bytes
    from service.settings import Settings
    from service.store import ModelStore

    root = Path(__file__).resolve().parents[1] / "model_store"
    store = ModelStore(root)
    clip = store.manifest("default")["clip"]
    folder = store.path(clip["name"], clip["version"])
    assert clip_weights_bytes(Settings(model_store=str(root))) == (folder / "open_clip_model.safetensors").stat().st_size
    assert clip_weights_bytes(Settings(model_store=str(tmp_path))) == 0  # nothing to load: no pin, the load says why
    monkeypatch.setenv("ZSAD_MMAP_THRESHOLD", "auto")
    assert Settings().mmap_threshold == "auto"
    monkeypatch.setenv("ZSAD_MMAP_THRESHOLD", "4194304")
    assert Settings().mmap_threshold == 4194304
    monkeypatch.setenv("ZSAD_MMAP_THRESHOLD", "lots")
    with pytest.raises(ValueError):
        Settings()
