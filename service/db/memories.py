"""Few-shot reference memories in the shared database, next to the thresholds they were fitted with.

`MemoryStore` (`service/memory_store.py`) over the `reference_memories` table (revision 0004): one row per product
(`line` = '') and per product line that has its own memory, holding the serialised memory (`fewshot.ReferenceMemory
.to_bytes`: safetensors with a JSON header), that header as JSON (listing and staleness checks read no tensors), its
size and a `stamp` that changes on every write (the service re-reads a cached memory when it changes). Every replica
of a fleet reads the same rows, so a calibration through one replica applies on all of them, as its threshold does.

A memory above `max_bytes` is refused on write and on read. Nothing here imports torch.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from ..memory_store import MemoryStoreError, StoredMemory, check_names, read_header
from .schema import reference_memories_table
from .thresholds import PRODUCT

__all__ = ["DbMemoryStore"]


class DbMemoryStore:
    def __init__(self, engine: Engine, max_bytes: int):
        self.engine = engine
        self.max_bytes = int(max_bytes)

    def _keys(self, line: str | None) -> list[str]:
        return [line, PRODUCT] if line else [PRODUCT]

    def _find(self, conn: Any, product: str, line: str | None, columns: list[Any]) -> Any:
        m = reference_memories_table.c
        keys = self._keys(line)
        rows = {r.line: r for r in conn.execute(select(m.line, *columns).where(m.product == product,
                                                                               m.line.in_(keys)))}
        return next((rows[k] for k in keys if k in rows), None)

    def stamp(self, product: str, line: str | None = None) -> tuple[str | None, str] | None:
        check_names(product, line)
        m = reference_memories_table.c
        with self.engine.connect() as conn:
            row = self._find(conn, product, line, [m.stamp])
        return None if row is None else (row.line or None, row.stamp)

    def get(self, product: str, line: str | None = None) -> StoredMemory | None:
        check_names(product, line)
        m = reference_memories_table.c
        with self.engine.connect() as conn:
            row = self._find(conn, product, line, [m.stamp, m.bytes, m.data])
        if row is None:
            return None
        if row.bytes > self.max_bytes:
            raise MemoryStoreError(f"stored memory of product {product!r} is {row.bytes} bytes, above the limit "
                                   f"{self.max_bytes} (ZSAD_REFERENCE_MAX_BYTES)")
        return StoredMemory(product, row.line or None, bytes(row.data), row.stamp)

    def put(self, product: str, line: str | None, data: bytes) -> None:
        check_names(product, line)
        if len(data) > self.max_bytes:
            raise MemoryStoreError(f"reference memory of {len(data)} bytes is above the limit of {self.max_bytes} "
                                   "(ZSAD_REFERENCE_MAX_BYTES; fewer shots or ZSAD_REFERENCE_MAX_ROWS make it smaller)")
        header = read_header(data)
        if header is None:
            raise MemoryStoreError("not a zsad reference memory (no readable header)")
        m = reference_memories_table.c
        values = {"data": data, "header": header, "bytes": len(data), "stamp": uuid.uuid4().hex,
                  "updated_at": time.time()}
        key = line or PRODUCT
        for attempt in range(2):  # update, else insert; an insert that lost a race to another writer updates
            try:
                with self.engine.begin() as conn:
                    done = conn.execute(update(reference_memories_table).where(m.product == product, m.line == key)
                                        .values(**values))
                    if done.rowcount == 0:
                        conn.execute(insert(reference_memories_table).values(product=product, line=key, **values))
                return
            except IntegrityError:
                if attempt:
                    raise

    def delete(self, product: str, line: str | None = None) -> bool:
        check_names(product, line)
        m = reference_memories_table.c
        with self.engine.begin() as conn:
            return conn.execute(delete(reference_memories_table).where(
                m.product == product, m.line == (line or PRODUCT))).rowcount > 0

    def delete_all(self, product: str) -> bool:
        check_names(product, None)
        m = reference_memories_table.c
        with self.engine.begin() as conn:
            return conn.execute(delete(reference_memories_table).where(m.product == product)).rowcount > 0

    def header(self, product: str, line: str | None = None) -> dict | None:
        check_names(product, line)
        m = reference_memories_table.c
        with self.engine.connect() as conn:
            row = conn.execute(select(m.header).where(m.product == product, m.line == (line or PRODUCT))).first()
        return row.header if row is not None and isinstance(row.header, dict) else None

    def list(self) -> list[tuple[str, str | None]]:
        m = reference_memories_table.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(m.product, m.line).order_by(m.product, m.line))
            return [(r.product, r.line or None) for r in rows]
