"""Few-shot reference memories in the database (revision 0004, `service/db/memories.py`): round trip, line fallback,
stamps that change on every write, the size limit, name checks, header-only reads, deletes. SQLite always; PostgreSQL
too when ZSAD_TEST_POSTGRES_URL is set."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from service.db import migrate
from service.db.engine import make_engine, sqlite_url
from service.db.memories import DbMemoryStore
from service.fewshot import ReferenceMemory, build_memory, load_memory
from service.memory_store import MemoryStoreError
from tests.pg import private_schema

MODEL = {"name": "m", "version": "v1", "clip": "tiny"}


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        eng = make_engine(sqlite_url(tmp_path / "db.sqlite"))
        migrate.upgrade(eng)
        yield eng
        eng.dispose()
    else:
        with private_schema("mem") as url:
            eng = make_engine(url)
            migrate.upgrade(eng)
            yield eng
            eng.dispose()


def _memory_bytes(shots: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    embs = [SimpleNamespace(global_emb=torch.randn(8, generator=g), windows={2: torch.randn(9, 8, generator=g)},
                            patches=torch.randn(16, 6, generator=g), grid=(4, 4)) for _ in range(shots)]
    return build_memory(embs, MODEL, 1, 1000, {"product": "nut"}).to_bytes()


def test_round_trip_line_fallback_stamps_and_deletes(engine):
    a, b = _memory_bytes(2, 0), _memory_bytes(3, 1)
    store = DbMemoryStore(engine, max_bytes=max(len(a), len(b)) + 10)
    assert store.get("nut") is None and store.stamp("nut") is None and store.list() == []
    store.put("nut", None, a)
    got = store.get("nut", "L1")  # a line without its own memory uses the product's
    assert got.line is None and got.data == a and store.stamp("nut", "L1") == (None, got.stamp)
    memory = load_memory(store, "nut", "L1")
    assert isinstance(memory, ReferenceMemory) and memory.shots == 2 and memory.meta["stored_line"] is None

    store.put("nut", "L1", b)
    assert store.get("nut", "L1").line == "L1" and store.get("nut", "L1").data == b
    assert store.get("nut").data == a  # the product's own is unchanged
    assert store.list() == [("nut", None), ("nut", "L1")]
    assert store.header("nut", "L1")["shots"] == 3 and store.header("nut")["shots"] == 2
    assert store.header("nut", "L2") is None  # header reads no fallback

    before = store.stamp("nut")[1]
    store.put("nut", None, b)  # a replacement changes the stamp (the service's cache key)
    assert store.stamp("nut")[1] != before and store.get("nut").data == b

    assert store.delete("nut", "L1") and not store.delete("nut", "L1")
    assert store.get("nut", "L1").line is None
    store.put("nut", "L1", a)
    assert store.delete_all("nut") and store.get("nut", "L1") is None and store.list() == []
    assert not store.delete_all("nut")


def test_size_limit_names_and_foreign_bytes(engine):
    data = _memory_bytes(2, 0)
    store = DbMemoryStore(engine, max_bytes=len(data))
    store.put("nut", None, data)
    with pytest.raises(MemoryStoreError, match="above the limit"):
        store.put("nut", None, data + b"x")
    assert store.get("nut").data == data  # a refused write leaves the old memory
    with pytest.raises(MemoryStoreError, match="above the limit"):
        DbMemoryStore(engine, max_bytes=len(data) - 1).get("nut")  # nor is an oversized one read
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(MemoryStoreError):
            store.put(bad, None, data)
    with pytest.raises(MemoryStoreError, match="not a zsad reference memory"):
        store.put("nut", None, b"\x00" * 64)
