"""Result history: every detection appended to a SQL table (SQLite in WAL mode by default, PostgreSQL by URL).

Durability: each request's results are inserted and committed before the HTTP response is sent. SQLite runs with
`journal_mode=WAL` and `synchronous=FULL`, so a committed row survives a killed process (and a power cut).

Paging is keyset pagination on the autoincrement id, newest first: a page is `id < cursor ORDER BY id DESC`, and
the next cursor is the last id of the page. New rows get larger ids, so rows arriving while a client pages never
shift later pages (no duplicates, no skips). SQLite's AUTOINCREMENT keeps ids from being reused after deletions.

Heatmap PNGs live in their own table and are pruned to the newest `heatmap_retention` on every insert.
Concurrent requests share commits (group commit, see `add_many`), so the fsync per commit does not cap throughput.
The requests of one micro-batch share one transaction: the inference worker marks each of them `expected` (a
`CommitSlot`) when the batch's results are ready, before any of them is handed back, and the committing thread waits
(at most `GROUP_COMMIT_WAIT_S`) until every expected request has handed its rows in or given up. A lone request has
no one to wait for and commits at once.
"""
from __future__ import annotations

import datetime as _dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Integer, delete, func, insert, select
from sqlalchemy.engine import Engine

from ..constants import GROUP_COMMIT_WAIT_S
from ..db.engine import make_engine, sqlite_url
from ..db.schema import heatmaps_table, metadata, results_table  # noqa: F401 - the tables live in service/db/schema.py
from ..private_files import private_sqlite

STATS_SAMPLE = 100_000  # percentiles over at most this many newest rows of the window
UNCALIBRATED_PRODUCTS = 50  # products listed by /v1/stats as scored without a calibrated threshold (most images first)


@dataclass
class NewResult:
    """A row to insert: exactly the `results` table's columns but `id` (tests/api check that they agree)."""

    line: str | None
    product: str | None
    model_name: str
    model_version: str
    score_name: str
    score: float
    label: str
    threshold: float
    threshold_source: str
    scores: dict[str, float]
    latency_ms: float
    object_name: str | None = None
    filename: str | None = None
    width: int | None = None
    height: int | None = None
    calibrated: bool | None = None
    mode: str | None = None  # 'zero_shot' or 'few_shot'
    shots: int | None = None
    heatmap_png: bytes | None = field(default=None, repr=False)
    created_at: float = field(default_factory=time.time)


class _Ticket:
    """One caller's rows waiting for a group commit."""

    __slots__ = ("items", "ids", "error", "done")

    def __init__(self, items: list[NewResult]):
        self.items = items
        self.ids: list[int] = []
        self.error: BaseException | None = None
        self.done = threading.Event()


class CommitSlot:
    """A request's place in the group commit of its micro-batch.

    `expect()` (the inference thread, when the request's images are scored, before its answer is handed back) makes
    the next commit wait for this request; `settle()` (when its rows join a commit, or the request ends without
    rows: an error, a timeout) stops that wait. Both are idempotent, and `expect()` after `settle()` does nothing, so
    a request that gave up before its batch finished is never waited for."""

    __slots__ = ("_store", "_state")

    def __init__(self, store: ResultsStore):
        self._store = store
        self._state = "idle"  # idle -> expected -> settled, or idle -> settled

    def expect(self) -> None:
        with self._store._pending_cond:
            if self._state == "idle":
                self._state = "expected"
                self._store._expected += 1

    def settle(self) -> None:
        with self._store._pending_cond:
            self._settle_locked()

    def _settle_locked(self) -> None:
        if self._state == "expected":
            self._store._expected -= 1
            self._store._pending_cond.notify_all()
        self._state = "settled"


def heatmap_url(result_id: int) -> str:
    return f"/v1/results/{result_id}/heatmap.png"


def record(row: dict[str, Any]) -> dict[str, Any]:
    """A stored row (a `results` table mapping, plus `has_heatmap`) in the API's `ResultRecord` shape: the one
    place where the table's columns become the answer's fields, for GET /v1/results and the detect answers alike."""
    return {
        "id": row["id"], "created_at": iso(row["created_at"]), "line": row["line"], "product": row["product"],
        "model": {"name": row["model_name"], "version": row["model_version"]}, "score_name": row["score_name"],
        "score": row["score"], "label": row["label"], "threshold": row["threshold"],
        "threshold_source": row["threshold_source"], "scores": row["scores"], "latency_ms": row["latency_ms"],
        "object": row["object_name"], "filename": row["filename"], "width": row["width"], "height": row["height"],
        "calibrated": None if row.get("calibrated") is None else bool(row["calibrated"]),
        "mode": row.get("mode"), "shots": row.get("shots"),
        "heatmap_url": heatmap_url(row["id"]) if row.get("has_heatmap") else None,
    }


def iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_since(value: str) -> float:
    """ISO-8601 time (naive = UTC) or Unix seconds -> Unix seconds. Raises ValueError."""
    try:
        return float(value)
    except ValueError:
        pass
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    t = _dt.datetime.fromisoformat(text)
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return t.timestamp()


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_window(value: str) -> float:
    """'90s', '15m', '24h', '7d', '2w' or plain seconds -> seconds. Raises ValueError."""
    v = value.strip().lower()
    if v and v[-1] in _UNITS:
        seconds = float(v[:-1]) * _UNITS[v[-1]]
    else:
        seconds = float(v)
    if not (seconds > 0) or seconds == float("inf"):
        raise ValueError(f"window must be positive, got {value!r}")
    return seconds


class ResultsStore:
    def __init__(self, url: str | None, path: Path, keep_heatmaps: bool = True, heatmap_retention: int = 1000,
                 engine: Engine | None = None):
        self.is_sqlite = url is None or url.startswith("sqlite")
        self.path = Path(path) if url is None else None
        if url is None:
            url = sqlite_url(path)
        self.url = url
        self.keep_heatmaps = keep_heatmaps and heatmap_retention > 0
        self.heatmap_retention = heatmap_retention
        self._write_lock = threading.Lock()
        self._pending_cond = threading.Condition()  # guards _pending and _expected
        self._pending: list[_Ticket] = []
        self._expected = 0  # requests of finished micro-batches whose rows have not joined a commit yet
        self.group_wait_s = GROUP_COMMIT_WAIT_S
        self.commits = 0  # transactions committed by add_many
        self.on_commit: Callable[[], None] | None = None  # the service counts them (zsad_result_commits_total)
        self.engine = engine if engine is not None else make_engine(url)  # the app shares one engine (AppState)

    def open(self) -> None:
        """Bring the schema to the newest revision (`service.db.migrate.upgrade`); the service's start-up does this
        itself, behind ZSAD_DB_UPGRADE (`AppState.open_database`)."""
        from ..db.migrate import upgrade

        if self.path is not None:  # results and heatmap overlays of camera images: readable by this user only
            private_sqlite(self.path)
        upgrade(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def describe(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    # --- writing ----------------------------------------------------------------------------------------------------
    def commit_slot(self) -> CommitSlot:
        """A slot for one request's rows: see `CommitSlot` (the pipeline passes `slot.expect` to the worker)."""
        return CommitSlot(self)

    def add_many(self, items: list[NewResult], slot: CommitSlot | None = None) -> list[int]:
        """Insert and commit; returns the new ids in order. Nothing is acknowledged before the commit.

        Group commit: while one thread commits (an fsync), the rows of other requests queue up, and the next thread
        to get the write lock commits all of them in one transaction. Before committing, that thread waits (at most
        `group_wait_s`) for the requests its micro-batch announced (`CommitSlot.expect`) that are still encoding, so
        one batch makes one transaction. Each caller still returns only after the transaction holding its rows has
        committed, and one failed transaction fails exactly the callers in it.
        """
        ticket = _Ticket(items)
        with self._pending_cond:
            self._pending.append(ticket)
            if slot is not None:
                slot._settle_locked()
        with self._write_lock:
            if not ticket.done.is_set():
                deadline = time.perf_counter() + self.group_wait_s
                with self._pending_cond:
                    while self._expected > 0:
                        remaining = deadline - time.perf_counter()
                        if remaining <= 0:
                            break
                        self._pending_cond.wait(remaining)
                    group, self._pending = self._pending, []
                self._commit_group(group)
        if ticket.error is not None:
            raise ticket.error
        return ticket.ids

    def _commit_group(self, group: list[_Ticket]) -> None:
        try:
            with self.engine.begin() as conn:
                stored_heatmap = False
                for ticket in group:
                    ticket.ids = []
                    for item in ticket.items:
                        row = {k: v for k, v in item.__dict__.items() if k != "heatmap_png"}
                        new_id = int(conn.execute(insert(results_table).values(**row)).inserted_primary_key[0])
                        ticket.ids.append(new_id)
                        if self.keep_heatmaps and item.heatmap_png:
                            conn.execute(insert(heatmaps_table).values(result_id=new_id, png=item.heatmap_png))
                            stored_heatmap = True
                if stored_heatmap:
                    cutoff = conn.execute(
                        select(heatmaps_table.c.result_id).order_by(heatmaps_table.c.result_id.desc())
                        .offset(self.heatmap_retention).limit(1)
                    ).scalar()
                    if cutoff is not None:
                        conn.execute(delete(heatmaps_table).where(heatmaps_table.c.result_id <= cutoff))
            self.commits += 1
            if self.on_commit is not None:
                self.on_commit()
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
            for ticket in group:
                ticket.ids, ticket.error = [], exc
        finally:
            for ticket in group:
                ticket.done.set()

    # --- reading ----------------------------------------------------------------------------------------------------
    def _filters(self, line: str | None, product: str | None, label: str | None, since: float | None) -> list:
        c = results_table.c
        where = []
        if line is not None:
            where.append(c.line == line)
        if product is not None:
            where.append(c.product == product)
        if label is not None:
            where.append(c.label == label)
        if since is not None:
            where.append(c.created_at >= since)
        return where

    def page(
        self,
        line: str | None = None,
        product: str | None = None,
        label: str | None = None,
        since: float | None = None,
        cursor: int | None = None,
        limit: int = 50,
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Newest first; (rows, next_cursor), next_cursor None on the last page."""
        c = results_table.c
        where = self._filters(line, product, label, since)
        if cursor is not None:
            where.append(c.id < cursor)
        hm = select(heatmaps_table.c.result_id).where(heatmaps_table.c.result_id == c.id).exists()
        query = select(results_table, hm.label("has_heatmap")).where(*where).order_by(c.id.desc()).limit(limit + 1)
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(query)]
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (rows[-1]["id"] if more and rows else None)

    def get(self, result_id: int) -> dict[str, Any] | None:
        c = results_table.c
        hm = select(heatmaps_table.c.result_id).where(heatmaps_table.c.result_id == c.id).exists()
        with self.engine.connect() as conn:
            row = conn.execute(select(results_table, hm.label("has_heatmap")).where(c.id == result_id)).first()
        return dict(row._mapping) if row is not None else None

    def heatmap(self, result_id: int) -> bytes | None:
        with self.engine.connect() as conn:
            return conn.execute(
                select(heatmaps_table.c.png).where(heatmaps_table.c.result_id == result_id)
            ).scalar()

    def stats(self, line: str | None, product: str | None, since: float | None) -> dict[str, Any]:
        c = results_table.c
        where = self._filters(line, product, None, since)
        uncal = c.calibrated.is_not(None) & (c.calibrated == False)  # noqa: E712 - SQL comparison, not Python
        with self.engine.connect() as conn:
            total, anomalous, review, uncalibrated = conn.execute(
                select(func.count(), func.coalesce(func.sum((c.label == "anomalous").cast(Integer)), 0),
                       func.coalesce(func.sum((c.label == "review").cast(Integer)), 0),
                       func.coalesce(func.sum(uncal.cast(Integer)), 0)).where(*where)
            ).one()
            sample = conn.execute(
                select(c.score, c.latency_ms).where(*where).order_by(c.id.desc()).limit(STATS_SAMPLE)
            ).all()
            products = conn.execute(
                select(c.product, func.count()).where(*where, uncal).group_by(c.product)
                .order_by(func.count().desc(), c.product).limit(UNCALIBRATED_PRODUCTS)
            ).all()
        out: dict[str, Any] = {
            "count": int(total),
            "anomalous": int(anomalous),
            "anomaly_rate": (int(anomalous) / int(total)) if total else None,
            "review": int(review),
            "uncalibrated": int(uncalibrated),
            "uncalibrated_products": [{"product": prod, "count": int(n)} for prod, n in products],
            "score": None,
            "latency_ms": None,
            "sampled": len(sample),
        }
        if sample:
            arr = np.asarray(sample, dtype=np.float64)
            s, lat = arr[:, 0], arr[:, 1]
            out["score"] = {"min": float(s.min()), "mean": float(s.mean()), "max": float(s.max()),
                            **{f"p{q}": float(np.percentile(s, q)) for q in (50, 90, 95, 99)}}
            out["latency_ms"] = {"mean": float(lat.mean()),
                                 **{f"p{q}": float(np.percentile(lat, q)) for q in (50, 95, 99)}}
        return out
