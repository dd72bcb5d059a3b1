"""Thresholds per product and line, and calibration records, in the shared database.

`ThresholdStore` keeps the interface the JSON file store had (`all`, `get`, `resolve`, `put`, `delete`, same entry
shapes), so the service, the command line and tests read the same thing whichever replica wrote it:

    {"threshold": 0.61, "score": "combined", "source": "calibration", "updated_at": "...", "version": 3,
     "calibration": {...}, "lines": {"line-3": {"threshold": 0.7, "score": "combined", "source": "manual",
                                                 "updated_at": "...", "version": 1}}}

Every write is one transaction. Each row (the product's own threshold, or one line's) carries a `version` that a
write increments. A write that names the version it read (`expected_version`, the API's `If-Match`) is refused with
`VersionConflict` when another write came first; a write that names none replaces the row (last writer wins) and
returns the new version, so no write is ever lost without its writer being told what it replaced. Keyword arguments
of `put` beyond the known ones (a pixel threshold, ...) are kept in the row's JSON `extra` column and come back as
fields of the entry, so a new field needs no migration.

An existing `thresholds.json` (the previous release's store) is imported once by `import_file`: rows the database
does not have yet are inserted, then the file is renamed so it is not read again.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from ..constants import DEFAULT_SCORE
from ..thresholds import Resolved, resolve_entry
from .schema import calibrations_table, thresholds_table

log = logging.getLogger("zsad.db")

PRODUCT = ""  # the `line` key of a product's own threshold
CORE = ("threshold", "score", "source", "updated_at", "updated_by", "version")
WRITE_ATTEMPTS = 8
ExpectedVersion = int | Literal["*"] | None  # None: any; "*": the row must exist; N: the row must be at version N


class ThresholdFileError(Exception):
    """The thresholds file exists but cannot be read."""


class VersionConflict(Exception):
    """A write named a version that is no longer the row's (another write came first), or a row that is gone."""

    def __init__(self, product: str, line: str | None, expected: Any, actual: int | None):
        where = f"product {product!r}" + (f" line {line!r}" if line else "")
        now = "no longer exists" if actual is None else f"is at version {actual}"
        super().__init__(f"the threshold of {where} {now}, the request expected version {expected}: read it again "
                         "and retry")
        self.actual = actual


def iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="seconds")


def _epoch(value: Any) -> float:
    try:
        t = _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        return (t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)).timestamp()
    except ValueError:
        return time.time()


def _record(row: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {k: v for k, v in (row.extra or {}).items() if k not in CORE and k != "lines"}
    rec.update(threshold=row.threshold, score=row.score, source=row.source, updated_at=iso(row.updated_at),
               version=row.version)
    if row.updated_by:
        rec["updated_by"] = row.updated_by
    return rec


def _entries(rows: list[Any]) -> dict[str, dict[str, Any]]:
    products: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = products.setdefault(row.product, {"threshold": None, "lines": {}})
        if row.line == PRODUCT:
            lines = entry["lines"]
            entry.clear()
            entry.update(_record(row), lines=lines)
        else:
            entry["lines"][row.line] = _record(row)
    return products


def _check(product: str, line: str | None, expected: ExpectedVersion, row: Any) -> None:
    if expected is None:
        return
    actual = row.version if row is not None else None
    if actual is None or (expected != "*" and actual != expected):
        raise VersionConflict(product, line, expected, actual)


class _Retry(Exception):
    pass


class ThresholdStore:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._sqlite_write = threading.Lock()  # SQLite: one writer per process (lock upgrades never deadlock)

    def load(self) -> None:
        """Nothing to read ahead: every call reads the database (kept for the file store's interface)."""

    # --- reading ----------------------------------------------------------------------------------------------------
    def _rows(self, conn: Connection, product: str | None = None, line: str | None = None) -> list[Any]:
        t = thresholds_table.c
        query = select(thresholds_table).order_by(t.product, t.line)
        if product is not None:
            query = query.where(t.product == product)
            if line is not None:
                query = query.where(t.line.in_((PRODUCT, line)))
        return list(conn.execute(query))

    def all(self) -> dict[str, Any]:
        with self.engine.connect() as conn:
            return {"version": 1, "products": _entries(self._rows(conn))}

    def get(self, product: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            return _entries(self._rows(conn, product)).get(product)

    def resolve(
        self,
        product: str | None,
        line: str | None,
        score: str | None,
        default_score: str,
        settings_default: float | None,
        manifest: dict[str, Any] | None,
        settings_pixel: float | None = None,
        mode: str | None = None,
    ) -> Resolved:
        """Read on every request (no cache), so a threshold written through any replica applies at once. `mode`
        (zero_shot / few_shot): entries fitted in the other mode do not apply (see `resolve_entry`)."""
        entry = None
        if product:
            with self.engine.connect() as conn:
                entry = _entries(self._rows(conn, product, line or PRODUCT)).get(product)
        return resolve_entry(entry, line, score, default_score, settings_default, manifest, settings_pixel, mode)

    # --- writing ----------------------------------------------------------------------------------------------------
    def _write(self, fn) -> Any:
        """Run `fn(conn)` in a transaction; retried when a concurrent writer got in between (never past a version
        check: that is a VersionConflict for the caller)."""
        for _ in range(WRITE_ATTEMPTS):
            try:
                if self.engine.dialect.name == "sqlite":
                    with self._sqlite_write, self.engine.begin() as conn:
                        return fn(conn)
                with self.engine.begin() as conn:
                    return fn(conn)
            except (_Retry, IntegrityError):
                continue
        raise RuntimeError(f"threshold write did not settle after {WRITE_ATTEMPTS} attempts under concurrent writes")

    def put(
        self,
        product: str,
        threshold: float,
        score: str,
        line: str | None = None,
        source: str = "manual",
        calibration: dict[str, Any] | None = None,
        *,
        expected_version: ExpectedVersion = None,
        updated_by: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Set the product's (or one line's) threshold. Returns the product entry as it is after the write.

        `pixel_threshold` None (or not given) keeps the one stored for the same row and score: an admin adjusting the
        image threshold does not drop the calibrated pixel threshold."""
        if calibration is not None:
            extra["calibration"] = calibration
        if extra.get("pixel_threshold") is None:
            extra.pop("pixel_threshold", None)
        else:
            extra["pixel_threshold"] = float(extra["pixel_threshold"])
        t = thresholds_table.c
        key = line or PRODUCT
        values = {"threshold": float(threshold), "score": score, "source": source, "updated_by": updated_by,
                  "extra": json.loads(json.dumps(extra))}

        def write(conn: Connection) -> dict[str, Any]:
            where = (t.product == product, t.line == key)
            row = conn.execute(select(t.version, t.score, t.extra).where(*where).with_for_update()).first()
            _check(product, line, expected_version, row)
            now = time.time()
            old_pixel = (row.extra or {}).get("pixel_threshold") if row is not None else None
            same_mode = values["extra"].get("mode") in (None, (row.extra or {}).get("mode")) if row is not None else False
            if "pixel_threshold" not in values["extra"] and row is not None and row.score == score \
                    and old_pixel is not None and same_mode:  # a few-shot pixel threshold never rides into zero-shot
                values["extra"] = {**values["extra"], "pixel_threshold": old_pixel}
            if row is None:
                conn.execute(insert(thresholds_table).values(product=product, line=key, version=1, updated_at=now,
                                                             **values))
            else:
                done = conn.execute(update(thresholds_table).where(*where, t.version == row.version)
                                    .values(version=row.version + 1, updated_at=now, **values))
                if done.rowcount != 1:
                    raise _Retry
            return _entries(self._rows(conn, product))[product]

        return self._write(write)

    def delete(self, product: str, line: str | None = None, *, expected_version: ExpectedVersion = None) -> bool:
        """Remove one line's threshold, or the product with all its lines. False when there was nothing."""
        t = thresholds_table.c

        def write(conn: Connection) -> bool:
            rows = list(conn.execute(select(thresholds_table).where(t.product == product).with_for_update()))
            target = next((r for r in rows if r.line == (line or PRODUCT)), None)
            if not (target if line else rows):
                return False
            _check(product, line, expected_version, target)
            where = [t.product == product] + ([t.line == line] if line else [])
            if target is not None and line:
                where.append(t.version == target.version)
            if conn.execute(delete(thresholds_table).where(*where)).rowcount == 0:
                raise _Retry
            return True

        return self._write(write)

    # --- calibration records --------------------------------------------------------------------------------------
    def record_calibration(self, product: str, line: str | None, score: str, threshold: float, target_frr: float,
                           n_images: int, model: dict[str, Any] | None, created_by: str | None, stored: bool,
                           details: dict[str, Any]) -> int:
        row = {"product": product, "line": line or PRODUCT, "score": score, "threshold": float(threshold),
               "target_frr": float(target_frr), "n_images": int(n_images), "created_at": time.time(),
               "created_by": created_by, "model_name": (model or {}).get("name"),
               "model_version": (model or {}).get("version"), "stored": bool(stored),
               "details": json.loads(json.dumps(details))}
        with self.engine.begin() as conn:
            return int(conn.execute(insert(calibrations_table).values(**row)).inserted_primary_key[0])

    def calibrations(self, product: str, limit: int = 50) -> list[dict[str, Any]]:
        c = calibrations_table.c
        query = select(calibrations_table).where(c.product == product).order_by(c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            rows = list(conn.execute(query))
        return [{"id": r.id, "product": r.product, "line": r.line or None, "score": r.score, "threshold": r.threshold,
                 "target_frr": r.target_frr, "n_images": r.n_images, "created_at": iso(r.created_at),
                 "created_by": r.created_by, "model": {"name": r.model_name, "version": r.model_version},
                 "stored": r.stored, "details": r.details} for r in rows]

    # --- importing the previous release's file ----------------------------------------------------------------------
    def import_entries(self, products: dict[str, Any]) -> int:
        """Insert the file's thresholds the database does not have yet (the database wins); returns how many."""
        rows = []
        for product, entry in products.items():
            if not isinstance(entry, dict):
                continue
            if entry.get("threshold") is not None:
                rows.append((product, PRODUCT, entry))
            for line, rec in (entry.get("lines") or {}).items():
                if isinstance(rec, dict) and rec.get("threshold") is not None:
                    rows.append((product, line, rec))
        t = thresholds_table.c

        def write(conn: Connection) -> int:
            have = {(r.product, r.line) for r in conn.execute(select(t.product, t.line))}
            added = 0
            for product, line, rec in rows:
                value = rec.get("threshold")
                if (product, line) in have or not isinstance(value, (int, float)) or not math.isfinite(value):
                    continue
                extra = {k: v for k, v in rec.items() if k not in CORE and k != "lines"}
                conn.execute(insert(thresholds_table).values(
                    product=product, line=line, threshold=float(value), score=str(rec.get("score") or DEFAULT_SCORE),
                    source=str(rec.get("source") or "manual"), updated_at=_epoch(rec.get("updated_at")),
                    updated_by="import:thresholds.json", version=1, extra=json.loads(json.dumps(extra))))
                added += 1
            return added

        return self._write(write)


def read_file(path: Path) -> dict[str, Any]:
    """The previous release's thresholds file: `{"version": 1, "products": {...}}`. Raises ThresholdFileError."""
    try:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or not isinstance(data.get("products", {}), dict):
            raise ValueError("top level must be an object with a 'products' object")
    except (OSError, ValueError) as exc:
        raise ThresholdFileError(f"cannot read thresholds file {path}: {exc}") from exc
    return data.get("products", {})


def import_file(path: Path, store: ThresholdStore) -> dict[str, Any] | None:
    """Import `path` once, if it exists, and rename it to `<name>.imported-<UTC time>`. None when there is no file.

    The database wins over the file (only missing rows are inserted), so importing the same file twice (two replicas
    sharing it start together, or the rename failed) never overwrites a newer threshold."""
    path = Path(path)
    if not path.is_file():
        return None
    products = read_file(path)
    added = store.import_entries(products)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.imported-{stamp}")
    try:
        path.rename(target)
    except FileNotFoundError:  # another replica sharing the file renamed it first
        target = None
    except OSError as exc:
        log.warning("imported %s but could not rename it (%s): it will be read again at the next start, which "
                    "adds only thresholds the database lacks; remove it by hand", path, exc)
        target = None
    log.info("imported %d threshold(s) from %s into the database%s", added, path,
             f"; the file is now {target.name}" if target else "")
    return {"path": str(path), "imported": added, "renamed_to": str(target) if target else None}
