"""Few-shot reference memories as the service uses them: looked up per (product, line), parsed once, kept on the
model's device, and checked against the model that serves (a memory made by another model is stale: the request is
scored zero-shot and the answer says why).

The bytes live in a `memory_store.MemoryStore` (database rows next to the thresholds, `service/db/memories.py`); this
module only caches parsed memories, at most `MAX_CACHED` of them, re-reading one when its stamp changes (another
replica or an admin replaced it).
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..fewshot import ReferenceMemory, ReferenceMemoryError, incompatibility, model_ref
from ..memory_store import MemoryStore, MemoryStoreError

log = logging.getLogger("zsad.api")
MAX_CACHED = 16  # parsed memories kept in RAM / on the device (a ViT-B memory at the default row limit is ~36 MB)


@dataclass
class Lookup:
    memory: ReferenceMemory | None  # None: score zero-shot
    info: dict[str, Any] | None  # what the answer says about the reference (None: the product has none)

    @property
    def mode(self) -> str:
        return "few_shot" if self.memory is not None else "zero_shot"

    @property
    def shots(self) -> int:
        return self.memory.shots if self.memory is not None else 0


def stale_note(why: str) -> str:
    return (f"reference memory is stale ({why}); scored zero-shot. Re-embed it: POST /v1/calibrate/{{product}} with "
            "good images")


def describe(memory: ReferenceMemory, line: str | None, why: str | None) -> dict[str, Any]:
    return describe_header(memory.header(), line, why)


def describe_header(h: dict[str, Any], line: str | None, why: str | None) -> dict[str, Any]:
    return {"line": line, "shots": h["shots"], "model": h["model"], "rows": h["rows"], "coreset": h.get("coreset") or {},
            "created_at": h.get("created_at"), "stale": why is not None, "note": stale_note(why) if why else None}


class References:
    def __init__(self, store: MemoryStore):
        self.store = store
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str | None], tuple[str, Any, ReferenceMemory]] = OrderedDict()

    def _load(self, product: str, line: str | None, device: Any) -> tuple[str | None, ReferenceMemory] | None:
        found = self.store.stamp(product, line)
        if found is None:
            return None
        key, stamp = (product, found[0]), found[1]
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] == stamp and hit[1] == device:
                self._cache.move_to_end(key)
                return found[0], hit[2]
        stored = self.store.get(product, line)
        if stored is None:
            return None
        memory = ReferenceMemory.from_bytes(stored.data)
        if device is not None:
            memory = memory.to(device)
        with self._lock:
            self._cache[(product, stored.line)] = (stored.stamp, device, memory)
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        return stored.line, memory

    def lookup(self, product: str | None, line: str | None, detector: Any) -> Lookup:
        """The memory to score `product` (on `line`) with, or None with the reason in `info`."""
        if not product or detector is None:
            return Lookup(None, None)
        device = getattr(getattr(detector, "backend", None), "device", None)
        try:
            found = self._load(product, line, device)
        except (ReferenceMemoryError, MemoryStoreError) as exc:
            log.error("reference memory of product %r line %r unusable: %s", product, line, exc)
            return Lookup(None, {"line": line, "stale": True, "note": f"reference memory unreadable ({exc}); scored "
                                 "zero-shot. Re-calibrate the product"})
        if found is None:
            return Lookup(None, None)
        used_line, memory = found
        why = memory.incompatibility(model_ref(detector), detector.window_scales, detector.settings.window_stride)
        return Lookup(None if why else memory, describe(memory, used_line, why))

    def forget(self, product: str, line: str | None = None) -> None:
        with self._lock:
            for key in [k for k in self._cache if k[0] == product and (line is None or k[1] == line)]:
                del self._cache[key]

    def annotate(self, products: dict[str, Any], detector: Any) -> None:
        """Add `reference` (shots, rows, model, stale) to the threshold entries of `products` (as /v1/thresholds
        returns them) that have a memory, judged against `detector` (headers only: no tensors are read)."""
        for product, line in self.store.list():
            entry = products.get(product)
            if entry is None:
                continue
            target = entry if line is None else (entry.get("lines") or {}).get(line)
            if target is None:
                continue
            header = self.store.header(product, line)
            if header is None:
                target["reference"] = {"line": line, "stale": True, "note": "reference memory unreadable"}
                continue
            why = (incompatibility(header, model_ref(detector), detector.window_scales, detector.settings.window_stride)
                   if detector is not None else "no model is serving")
            target["reference"] = describe_header(header, line, why)
