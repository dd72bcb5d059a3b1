"""Schema migrations with Alembic (`service/migrations/`): `upgrade` brings a database to the newest revision,
`check` says whether it is there.

- **Fresh database**: every revision runs, from `0001` (the first release's tables) on.
- **A database the first release made** (`metadata.create_all`, no `alembic_version` table): it is stamped at
  `0001`, whose tables it has, and upgraded from there; no row is touched.
- **Replicas starting together** migrate once: on PostgreSQL the upgrade runs under a session advisory lock
  (`pg_advisory_lock`), on SQLite under an exclusive lock on a file next to the database. Whoever gets the lock
  second finds the schema at head and does nothing.
- **A database newer than this code** (a later release migrated it during a rolling update): `check` accepts it
  with a warning, because revisions only add tables and columns an older release does not read.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

from ..constants import DB_MIGRATION_LOCK
from ..private_files import private_dir
from .engine import sqlite_path

log = logging.getLogger("zsad.db")

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
BASELINE = "0001"  # the first release's schema (results, heatmaps), made by create_all without a version table


class SchemaError(Exception):
    """The database's schema is not one this code can use (not migrated, or behind)."""


@dataclass(frozen=True)
class SchemaState:
    current: str | None  # the database's revision (None: no alembic_version table, or an empty one)
    head: str  # the newest revision this code knows
    legacy: bool  # tables of the first release without a revision
    known: bool  # `current` is one of this code's revisions (or None)

    @property
    def at_head(self) -> bool:
        return self.current == self.head

    @property
    def newer(self) -> bool:
        return self.current is not None and not self.known


def _config(connection: Connection | None = None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _script():
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config())


def head_revision() -> str:
    return _script().get_current_head()


def _state(conn: Connection) -> SchemaState:
    from alembic.runtime.migration import MigrationContext

    script = _script()
    current = MigrationContext.configure(conn).get_current_revision()
    known = current is None or any(r.revision == current for r in script.walk_revisions())
    legacy = current is None and inspect(conn).has_table("results")
    return SchemaState(current, script.get_current_head(), legacy, known)


def state(engine: Engine) -> SchemaState:
    with engine.connect() as conn:
        return _state(conn)


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """A connection held under the migration lock (advisory lock on PostgreSQL, a file lock on SQLite)."""
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": DB_MIGRATION_LOCK})
            conn.commit()
            try:
                yield conn
            finally:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": DB_MIGRATION_LOCK})
                conn.commit()
            return
        path = sqlite_path(str(engine.url)) if conn.dialect.name == "sqlite" else None
        if path is None:
            yield conn
            return
        import fcntl

        private_dir(path.parent)
        with open(path.with_name(path.name + ".migrate-lock"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield conn
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Migrate to `revision` (default the newest); returns the revisions (before, after). Idempotent."""
    from alembic import command

    if revision == "head":
        before = state(engine)
        if before.at_head or before.newer:
            return before.current, before.current
    with _migration_lock(engine) as conn:
        st = _state(conn)  # again, under the lock: another replica may have migrated meanwhile
        cfg = _config(conn)
        if st.legacy:
            log.info("database created by the first release (no schema revision): stamping it at %s", BASELINE)
            command.stamp(cfg, BASELINE)
            conn.commit()
        if not st.newer:
            command.upgrade(cfg, revision)
        conn.commit()
        after = _state(conn).current
    if after != st.current:
        log.info("database schema upgraded from %s to %s", st.current or "nothing", after)
    return st.current, after


def check(engine: Engine) -> SchemaState:
    """Raise SchemaError unless the schema is at this code's head (or newer, with a warning)."""
    st = state(engine)
    if st.at_head:
        return st
    if st.newer:
        log.warning("database schema %s is newer than this release's %s (a later release migrated it); carrying on: "
                    "revisions only add what older releases do not read", st.current, st.head)
        return st
    what = ("holds the previous release's tables without a schema revision" if st.legacy
            else "has no zsad schema" if st.current is None else f"is at schema revision {st.current}")
    raise SchemaError(f"the database {what}, this release needs {st.head}: run `zsad db upgrade` "
                      "(the container entrypoint does), or set ZSAD_DB_UPGRADE=true")


def ensure(engine: Engine, run_upgrade: bool) -> SchemaState:
    """Start-up: upgrade (when asked) or only check. Raises SchemaError."""
    if run_upgrade:
        upgrade(engine)
    return check(engine)
