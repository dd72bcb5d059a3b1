"""Where the few-shot reference memories live: one per product, optionally one per (product, line).

A store keeps opaque bytes (what `fewshot.ReferenceMemory.to_bytes` makes: safetensors with a JSON header) and the
header itself, so it never needs torch. `MemoryStore` is the interface the service and the CLI use; the database
implements it (`service/db/memories.py`, the `reference_memories` table next to the thresholds), so every replica of
a fleet scores a product against the same memory. Names are checked against the API's name pattern.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Protocol

from .constants import NAME_PATTERN

NAME_RE = re.compile(NAME_PATTERN)
FORMAT = "zsad-reference-memory"  # `fewshot.FORMAT`: the header's `format`

__all__ = ["MemoryStore", "StoredMemory", "MemoryStoreError", "check_names", "read_header"]


class MemoryStoreError(ValueError):
    """A bad product/line name, a memory over the size limit, or a store that cannot be read."""


@dataclass(frozen=True)
class StoredMemory:
    product: str
    line: str | None  # None: the product's own memory
    data: bytes
    stamp: str  # changes whenever the memory is replaced (a cache key)


class MemoryStore(Protocol):
    """get/put/delete by (product, line); `get` with a line falls back to the product's memory."""

    def get(self, product: str, line: str | None = None) -> StoredMemory | None: ...

    def stamp(self, product: str, line: str | None = None) -> tuple[str | None, str] | None:
        """(line or None, stamp) of the memory `get` would return, without reading it; None when there is none."""
        ...

    def put(self, product: str, line: str | None, data: bytes) -> None: ...

    def delete(self, product: str, line: str | None = None) -> bool:
        """Remove exactly this memory (line None: the product's own; its lines keep theirs). True if it existed."""
        ...

    def delete_all(self, product: str) -> bool:
        """Remove the product's memory and all its lines'. True if any existed."""
        ...

    def list(self) -> list[tuple[str, str | None]]: ...

    def header(self, product: str, line: str | None = None) -> dict | None:
        """The JSON header of exactly this memory (no line fallback), without reading its tensors; None if none."""
        ...


def check_names(product: str, line: str | None) -> None:
    for what, name in (("product", product), ("line", line)):
        if name is not None and not NAME_RE.match(name):
            raise MemoryStoreError(f"invalid {what} name {name!r}")


def read_header(data: bytes) -> dict[str, Any] | None:
    """The JSON header of serialised memory bytes (safetensors' `__metadata__["zsad"]`) without loading the tensors;
    None when the bytes are not a zsad reference memory."""
    try:
        n = int.from_bytes(data[:8], "little")
        if n <= 0 or n > len(data) - 8 or n > 100_000_000:
            return None
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
        header = json.loads(meta.get("zsad", "null"))
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return header if isinstance(header, dict) and header.get("format") == FORMAT else None
