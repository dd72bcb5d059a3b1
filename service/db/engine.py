"""The database URL from the settings, and an engine for it.

`ZSAD_RESULTS_URL` (any SQLAlchemy URL, e.g. `postgresql+psycopg://user:pass@db/zsad`) or, when unset, SQLite at
`ZSAD_RESULTS_PATH`. SQLite connections run in WAL mode with `synchronous=FULL` (a committed row survives a killed
process and a power cut), foreign keys on and a 30 s busy timeout.
"""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine

from ..private_files import private_sqlite
from ..settings import Settings


def database_url(settings: Settings) -> str:
    if settings.results_url:
        return settings.results_url
    return sqlite_url(settings.results_path)


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def sqlite_path(url: str) -> Path | None:
    """The file of a `sqlite:///FILE` URL (None for in-memory databases and other dialects)."""
    if not is_sqlite(url):
        return None
    rest = url.split("///", 1)[1] if "///" in url else ""
    rest = rest.split("?", 1)[0]
    return Path(rest) if rest and rest != ":memory:" else None


def make_engine(url: str) -> Engine:
    if is_sqlite(url):
        path = sqlite_path(url)
        if path is not None:  # results, overlays of camera images, thresholds: 0600 (its -wal/-shm inherit it)
            private_sqlite(path)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)
