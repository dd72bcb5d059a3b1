"""The fleet in the shared database: the model every replica should serve, and one heartbeat row per replica.

- `fleet_desired` holds one row: a model name and version, who set it and when, and a `generation` that grows by
  one on every change. A replica compares the generation with the last one it applied or tried, so it loads a new
  desired model once, and does not retry one that failed on it until someone sets a model again. While a reload is
  being verified on the replica that received it, the row also names that version as the `candidate`: the others
  load it ahead and swap the moment it becomes desired (or drop it when the candidate is withdrawn), so a rollout
  takes about one replica's load time, not two.
- `replicas` holds what each replica last reported: id, host, pid, status, the model it serves, the generation it
  applied, its last rollout error, when it was last seen. Rows not updated for `FLEET_FORGET_S` are deleted.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from ..constants import FLEET_FORGET_S
from .schema import fleet_desired_table, replicas_table

DESIRED_ID = 1


@dataclass(frozen=True)
class Desired:
    name: str
    version: str
    generation: int
    set_at: float
    set_by: str | None

    def ref(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "generation": self.generation, "set_at": self.set_at,
                "set_by": self.set_by}


@dataclass(frozen=True)
class Candidate:
    """A rollout in progress: the receiving replica is loading and verifying it; the others may load it ahead."""

    name: str
    version: str
    since: float


class FleetStore:
    def __init__(self, engine: Engine):
        self.engine = engine

    # --- the desired model -------------------------------------------------------------------------------------------
    def read(self) -> tuple[Desired | None, Candidate | None]:
        with self.engine.connect() as conn:
            row = conn.execute(select(fleet_desired_table).where(fleet_desired_table.c.id == DESIRED_ID)).first()
        if row is None:
            return None, None
        desired = (Desired(row.model_name, row.model_version, row.generation, row.set_at, row.set_by)
                   if row.model_name and row.model_version else None)
        candidate = (Candidate(row.candidate_name, row.candidate_version, row.candidate_at or 0.0)
                     if row.candidate_name and row.candidate_version else None)
        return desired, candidate

    def desired(self) -> Desired | None:
        return self.read()[0]

    def _upsert(self, values: dict[str, Any], bump: bool) -> int:
        """Write the row (creating it at generation 0); `bump`: a new generation. Returns the generation."""
        d = fleet_desired_table.c
        for _ in range(8):
            try:
                with self.engine.begin() as conn:
                    row = conn.execute(select(d.generation).where(d.id == DESIRED_ID).with_for_update()).first()
                    if row is None:
                        generation = 1 if bump else 0
                        conn.execute(insert(fleet_desired_table).values(id=DESIRED_ID, generation=generation, **values))
                        return generation
                    generation = row.generation + (1 if bump else 0)
                    done = conn.execute(update(fleet_desired_table)
                                        .where(d.id == DESIRED_ID, d.generation == row.generation)
                                        .values(generation=generation, **values))
                    if done.rowcount == 1:
                        return generation
            except IntegrityError:  # two first writers: the loser retries as an update
                continue
        raise RuntimeError("could not write the fleet's desired model under concurrent writes")

    def set_desired(self, name: str, version: str, set_by: str | None = None) -> Desired:
        """Set the fleet's model (and end the rollout's candidate); every call is a new generation, even for the same
        version (a retry)."""
        now = time.time()
        generation = self._upsert({"model_name": name, "model_version": version, "set_at": now, "set_by": set_by,
                                   "candidate_name": None, "candidate_version": None, "candidate_at": None}, bump=True)
        return Desired(name, version, generation, now, set_by)

    def stage(self, name: str, version: str) -> None:
        """Announce a rollout in progress: the other replicas may load `name@version` ahead, not serve it yet."""
        self._upsert({"candidate_name": name, "candidate_version": version, "candidate_at": time.time()}, bump=False)

    def unstage(self, name: str, version: str) -> None:
        """The rollout of `name@version` failed: withdraw the candidate (unless another rollout replaced it)."""
        d = fleet_desired_table.c
        with self.engine.begin() as conn:
            conn.execute(update(fleet_desired_table)
                         .where(d.id == DESIRED_ID, d.candidate_name == name, d.candidate_version == version)
                         .values(candidate_name=None, candidate_version=None, candidate_at=None))

    def clear_desired(self) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(delete(fleet_desired_table)).rowcount > 0

    # --- heartbeats --------------------------------------------------------------------------------------------------
    def heartbeat(self, replica_id: str, **fields: Any) -> None:
        """Insert or update this replica's row (`last_seen` now; one upsert, SQLite or PostgreSQL), and forget
        replicas silent for FLEET_FORGET_S."""
        r = replicas_table.c
        now = time.time()
        values = {**fields, "last_seen": now}
        dialect = self.engine.dialect.name
        with self.engine.begin() as conn:
            if dialect in ("postgresql", "sqlite"):
                if dialect == "postgresql":
                    from sqlalchemy.dialects.postgresql import insert as upsert
                else:
                    from sqlalchemy.dialects.sqlite import insert as upsert
                stmt = upsert(replicas_table).values(replica_id=replica_id, **values)
                conn.execute(stmt.on_conflict_do_update(index_elements=[r.replica_id], set_=values))
            elif conn.execute(update(replicas_table).where(r.replica_id == replica_id).values(**values)).rowcount == 0:
                conn.execute(insert(replicas_table).values(replica_id=replica_id, **values))
            conn.execute(delete(replicas_table).where(r.last_seen < now - FLEET_FORGET_S))

    def replicas(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(replicas_table).order_by(replicas_table.c.replica_id))
            return [dict(row._mapping) for row in rows]
