"""The fleet in the shared database: the model every replica should serve, and one heartbeat row per replica.

- `fleet_desired` holds one row: a model name and version, who set it and when, and a `generation` that grows by
  one on every change. A replica compares the generation with the last one it applied or tried, so it loads a new
  desired model once, and does not retry one that failed on it until someone sets a model again.
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


class FleetStore:
    def __init__(self, engine: Engine):
        self.engine = engine

    # --- the desired model -------------------------------------------------------------------------------------------
    def desired(self) -> Desired | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(fleet_desired_table).where(fleet_desired_table.c.id == DESIRED_ID)).first()
        if row is None:
            return None
        return Desired(row.model_name, row.model_version, row.generation, row.set_at, row.set_by)

    def set_desired(self, name: str, version: str, set_by: str | None = None) -> Desired:
        """Set the fleet's model; every call is a new generation, even for the same version (a retry)."""
        d = fleet_desired_table.c
        for _ in range(8):
            try:
                with self.engine.begin() as conn:
                    row = conn.execute(select(d.generation).where(d.id == DESIRED_ID).with_for_update()).first()
                    now = time.time()
                    values = {"model_name": name, "model_version": version, "set_at": now, "set_by": set_by}
                    if row is None:
                        conn.execute(insert(fleet_desired_table).values(id=DESIRED_ID, generation=1, **values))
                        generation = 1
                    else:
                        generation = row.generation + 1
                        done = conn.execute(update(fleet_desired_table)
                                            .where(d.id == DESIRED_ID, d.generation == row.generation)
                                            .values(generation=generation, **values))
                        if done.rowcount != 1:
                            continue
                return Desired(name, version, generation, now, set_by)
            except IntegrityError:  # two first writers: the loser retries as an update
                continue
        raise RuntimeError("could not set the desired model under concurrent writes")

    def clear_desired(self) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(delete(fleet_desired_table)).rowcount > 0

    # --- heartbeats --------------------------------------------------------------------------------------------------
    def heartbeat(self, replica_id: str, **fields: Any) -> None:
        """Insert or update this replica's row (`last_seen` now), and forget replicas silent for FLEET_FORGET_S."""
        r = replicas_table.c
        now = time.time()
        values = {**fields, "last_seen": now}
        with self.engine.begin() as conn:
            if conn.execute(update(replicas_table).where(r.replica_id == replica_id).values(**values)).rowcount == 0:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(replicas_table).values(replica_id=replica_id, **values))
                except IntegrityError:  # inserted by a previous life of this replica id meanwhile
                    conn.execute(update(replicas_table).where(r.replica_id == replica_id).values(**values))
            conn.execute(delete(replicas_table).where(r.last_seen < now - FLEET_FORGET_S))

    def replicas(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(replicas_table).order_by(replicas_table.c.replica_id))
            return [dict(row._mapping) for row in rows]
