"""glibc heap settings for a long-running server (both are no-ops on other C libraries).

Why: glibc serves large allocations with mmap and returns them to the OS on free, but after a large mmapped block is
freed it raises its mmap threshold (up to 32 MB), and from then on blocks below it come from the heap, which keeps
what is freed. Releasing the text tower (hundreds of MB) after computing the prompt anchors did exactly that: every
later batch's activations were heap blocks, and a first start's serving peak RSS stayed about 200 MB above that of a
restart with cached anchors (`benchmarks/memory.py`). Pinning the threshold (`ZSAD_MMAP_THRESHOLD`) keeps large
blocks mmapped, at the price of page faults on every large block (`benchmarks/heap_pin.py`): worth it for a large
CLIP, not for the embedded one, so by default (`auto`) it is pinned only when the served CLIP's weights are large.
Trimming after the release is always done (one call).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LARGE_MODEL_MMAP_THRESHOLD = 4 << 20  # what docs/service.md measures and advises for large CLIPs (ZSAD_MMAP_THRESHOLD)
# A CLIP from this weights-file size up gets the pin under `auto`: the embedded model (11 MB) stays below, every
# open_clip architecture (RN50 and up, >= 100 M parameters) lies far above.
LARGE_CLIP_BYTES = 64 << 20

__all__ = ["pin_mmap_threshold", "trim_heap", "mmap_threshold_for", "LARGE_MODEL_MMAP_THRESHOLD", "LARGE_CLIP_BYTES"]


def mmap_threshold_for(setting: int | str, clip_bytes: int | None) -> int:
    """The threshold to pin (0: leave glibc's default) for `ZSAD_MMAP_THRESHOLD` and the CLIP's weights size.

    `auto` pins for a large CLIP; `clip_bytes` None means an open_clip pretrained CLIP, not yet on disk: large.
    """
    if setting != "auto":
        return int(setting)
    large = clip_bytes is None or clip_bytes >= LARGE_CLIP_BYTES
    return LARGE_MODEL_MMAP_THRESHOLD if large else 0


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def pin_mmap_threshold(nbytes: int = LARGE_MODEL_MMAP_THRESHOLD) -> bool:
    """Serve blocks of `nbytes` or more with mmap for the rest of the process. True when glibc took it."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)) == 1)


def trim_heap() -> None:
    """Collect garbage and hand the heap's free pages back to the OS (after a large release)."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
