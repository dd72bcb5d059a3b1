"""The loaded model, the models in the store, and reloading another version."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Body

from ..deps import ADMIN, READ, AuthFirstRoute, CallerDep, StateDep
from ..errors import error_responses, public_text
from ..schemas import ModelsInfo, ReloadIn, ReloadOut

router = APIRouter(tags=["models"], route_class=AuthFirstRoute)


def _available(store_root: Path) -> list[dict[str, Any]]:
    from ...store import ModelStore, StoreError

    store = ModelStore(store_root)
    out = []
    for name in store.names():
        try:
            versions = store.versions(name)
            if not versions or store.manifest(name, versions[-1]).get("kind") != "fnn":
                continue
            out.append({"name": name, "versions": versions, "current": store.current(name)})
        except StoreError:
            continue
    return out


@router.get("/v1/models", response_model=ModelsInfo, dependencies=READ,
            summary="The loaded model (manifest) and the FNN models in the store", responses=error_responses(401, 403))
async def models(state: StateDep):
    det = state.detector
    model = None
    if det is not None:
        model = {**state.model_ref(det), "device": str(det.backend.device),
                 "dtype": str(getattr(det.backend, "dtype", "")), "tta_views": det.tta_views,
                 "window_scales": list(det.window_scales), "manifest": det.manifest}
    available = await to_thread.run_sync(_available, state.settings.model_store)
    return {"ready": state.status == "ready", "status": state.status, "model": model, "available": available,
            "error": public_text(state.error) if state.error else None}


@router.post("/v1/models/reload", response_model=ReloadOut, dependencies=ADMIN,
             summary="Load a model version fully, then swap it in (on failure the old one keeps serving); on success "
                     "it becomes the fleet's desired model, which every replica loads",
             responses=error_responses(400, 401, 403, 404, 409, 422, 500))
async def reload_model(state: StateDep, caller: CallerDep, body: Annotated[ReloadIn | None, Body()] = None):
    body = body or ReloadIn()
    return await to_thread.run_sync(state.reload, body.name, body.version, caller)
