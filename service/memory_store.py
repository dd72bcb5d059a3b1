"""Where the few-shot reference memories live: one per product, optionally one per (product, line).

The store keeps opaque bytes (what `fewshot.ReferenceMemory.to_bytes` makes: safetensors with a JSON header) and
the header itself, so it never needs torch and a database can hold the same thing in one table row. `MemoryStore` is
the interface the service and the CLI use; `FileMemoryStore` implements it with files next to the thresholds file:

    <root>/<product>/_product.zsadmem         the product's memory
    <root>/<product>/line.<line>.zsadmem      one line's memory (a line without one uses the product's)

Writes go to a temporary file (mode 0600) in the same folder, are fsynced and `os.replace`d, so a reader sees the
old or the new memory, never half of one. A memory above `max_bytes` is refused (and so is reading one). Names are
checked against the API's name pattern, so no name can leave the root.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")  # the API's NAME_PATTERN
SUFFIX = ".zsadmem"
PRODUCT_FILE = "_product" + SUFFIX

__all__ = ["MemoryStore", "FileMemoryStore", "StoredMemory", "MemoryStoreError"]


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


def _check(product: str, line: str | None) -> None:
    for what, name in (("product", product), ("line", line)):
        if name is not None and not NAME_RE.match(name):
            raise MemoryStoreError(f"invalid {what} name {name!r}")


class FileMemoryStore:
    def __init__(self, root: str | Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)

    def _path(self, product: str, line: str | None) -> Path:
        _check(product, line)
        return self.root / product / (PRODUCT_FILE if line is None else f"line.{line}{SUFFIX}")

    def _existing(self, product: str, line: str | None) -> tuple[str | None, Path] | None:
        for key in ([line, None] if line is not None else [None]):
            path = self._path(product, key)
            if path.is_file():
                return key, path
        return None

    def stamp(self, product: str, line: str | None = None) -> tuple[str | None, str] | None:
        found = self._existing(product, line)
        if found is None:
            return None
        try:
            st = found[1].stat()
        except OSError:
            return None
        return found[0], f"{st.st_mtime_ns}:{st.st_size}:{st.st_ino}"

    def get(self, product: str, line: str | None = None) -> StoredMemory | None:
        found = self._existing(product, line)
        if found is None:
            return None
        key, path = found
        try:
            st = path.stat()
            if st.st_size > self.max_bytes:
                raise MemoryStoreError(f"stored memory {path} is {st.st_size} bytes, above the limit {self.max_bytes}")
            data = path.read_bytes()
        except FileNotFoundError:
            return None  # deleted between the check and the read
        except OSError as exc:
            raise MemoryStoreError(f"cannot read reference memory {path}: {exc}") from exc
        return StoredMemory(product, key, data, f"{st.st_mtime_ns}:{st.st_size}:{st.st_ino}")

    def put(self, product: str, line: str | None, data: bytes) -> None:
        path = self._path(product, line)
        if len(data) > self.max_bytes:
            raise MemoryStoreError(f"reference memory of {len(data)} bytes is above the limit of {self.max_bytes} "
                                   "(ZSAD_REFERENCE_MAX_BYTES; fewer shots or ZSAD_REFERENCE_MAX_ROWS make it smaller)")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    def delete(self, product: str, line: str | None = None) -> bool:
        path = self._path(product, line)
        if not path.is_file():
            return False
        path.unlink(missing_ok=True)
        _fsync_dir(path.parent)
        return True

    def delete_all(self, product: str) -> bool:
        _check(product, None)
        folder = self.root / product
        if not folder.is_dir():
            return False
        shutil.rmtree(folder)
        return True

    def header(self, product: str, line: str | None = None) -> dict | None:
        path = self._path(product, line)
        try:
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if n <= 0 or n > min(self.max_bytes, 100_000_000):
                    return None
                meta = json.loads(fh.read(n)).get("__metadata__") or {}
            header = json.loads(meta.get("zsad", "null"))
        except (OSError, ValueError, UnicodeDecodeError, AttributeError):
            return None
        return header if isinstance(header, dict) else None

    def list(self) -> list[tuple[str, str | None]]:
        out: list[tuple[str, str | None]] = []
        if not self.root.is_dir():
            return out
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and NAME_RE.match(p.name)):
            for f in sorted(folder.glob("*" + SUFFIX)):
                if f.name == PRODUCT_FILE:
                    out.append((folder.name, None))
                elif f.name.startswith("line."):
                    out.append((folder.name, f.name[len("line."):-len(SUFFIX)]))
        return out


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def memory_dir(settings) -> Path:
    """`settings.reference_dir`, else a `memories` folder next to the thresholds file."""
    return Path(settings.reference_dir) if settings.reference_dir else Path(settings.thresholds_path).parent / "memories"


def store_from_settings(settings) -> FileMemoryStore:
    return FileMemoryStore(memory_dir(settings), settings.reference_max_bytes)
