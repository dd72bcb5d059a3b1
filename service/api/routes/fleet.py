"""The fleet: every replica that shares this database, from their heartbeats, and the model they should serve."""
from __future__ import annotations

import time
from typing import Any

from anyio import to_thread
from fastapi import APIRouter
from fastapi.responses import Response

from ..deps import ADMIN, READ, AuthFirstRoute, StateDep
from ..errors import ApiError, error_responses
from ..results import iso
from ..schemas import FleetInfo
from ..state import AppState

router = APIRouter(tags=["fleet"], route_class=AuthFirstRoute)


def fleet_view(state: AppState) -> dict[str, Any]:
    desired = state.fleet.desired()
    now = time.time()
    stale_after = state.stale_after_s()
    replicas = []
    for row in state.fleet.replicas():
        stale = now - row["last_seen"] > stale_after
        model = ({"name": row["model_name"], "version": row["model_version"]} if row["model_name"] else None)
        in_sync = desired is None or (model is not None and (model["name"], model["version"]) ==
                                      (desired.name, desired.version))
        replicas.append({
            "id": row["replica_id"], "host": row["host"], "pid": row["pid"], "status": row["status"],
            "ready": row["status"] == "ready" and not stale, "stale": stale, "model": model, "in_sync": in_sync,
            "applied_generation": row["applied_generation"], "error": row["error"],
            "started_at": iso(row["started_at"]), "last_seen": iso(row["last_seen"]),
            "last_seen_s": round(now - row["last_seen"], 3), "package_version": row["package_version"],
        })
    live = [r for r in replicas if not r["stale"] and r["status"] not in ("stopped",)]
    return {
        "desired": {**desired.ref(), "set_at": iso(desired.set_at)} if desired else None,
        "converged": bool(live) and all(r["ready"] and r["in_sync"] for r in live),
        "this_replica": state.replica_id, "poll_s": state.settings.fleet_poll_s, "replicas": replicas,
    }


@router.get("/v1/fleet", response_model=FleetInfo, dependencies=READ,
            summary="Every replica sharing this database (from heartbeats) and the fleet's desired model",
            responses=error_responses(401, 403))
async def fleet(state: StateDep):
    return await to_thread.run_sync(fleet_view, state)


@router.delete("/v1/fleet/desired", status_code=204, dependencies=ADMIN,
               summary="Forget the fleet's desired model: replicas keep what they serve, new ones load their "
                       "configured model", responses=error_responses(401, 403, 404))
async def clear_desired(state: StateDep):
    if not await to_thread.run_sync(state.fleet.clear_desired):
        raise ApiError(404, "not_found", "no desired model is set")
    return Response(status_code=204)
