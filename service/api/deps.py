"""Typed FastAPI dependencies: the app state, the settings and the API-key scopes.

Routes declare what they need as parameters (`state: StateDep`) or route dependencies (`dependencies=READ`), so no
route reaches into `request.app.state` itself, and tests can override any of them with
`app.dependency_overrides`.
"""
from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from ..settings import Settings
from .auth import Scope, presented_key
from .errors import ApiError
from .state import AppState

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key (read or admin scope).")
_bearer = HTTPBearer(auto_error=False, description="Same API key as `Authorization: Bearer <key>`.")


def get_state(request: Request) -> AppState:
    return request.app.state.zsad


StateDep = Annotated[AppState, Depends(get_state)]


def get_settings(state: StateDep) -> Settings:
    return state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]
ApiKey = Annotated[str | None, Security(_api_key_header)]
Bearer = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]


def _check(state: AppState, needed: Scope, api_key: str | None, bearer: HTTPAuthorizationCredentials | None) -> None:
    if not state.auth.enabled:
        return
    key = presented_key(api_key, bearer)
    if key is None:
        raise ApiError(401, "unauthorized", "missing API key: send X-API-Key or Authorization: Bearer <key>",
                       {"WWW-Authenticate": "Bearer"})
    scope = state.auth.scope_of(key)
    if scope is None:
        raise ApiError(401, "unauthorized", "invalid API key", {"WWW-Authenticate": "Bearer"})
    if needed == "admin" and scope != "admin":
        raise ApiError(403, "forbidden", "this API key lacks the admin scope")


async def require_read(state: StateDep, api_key: ApiKey = None, bearer: Bearer = None) -> None:
    _check(state, "read", api_key, bearer)


async def require_admin(state: StateDep, api_key: ApiKey = None, bearer: Bearer = None) -> None:
    _check(state, "admin", api_key, bearer)


READ = [Depends(require_read)]
ADMIN = [Depends(require_admin)]


def get_caller(state: StateDep, api_key: ApiKey = None, bearer: Bearer = None) -> str:
    """Who makes this request, for the records (threshold rows, calibrations, the fleet's desired model): a short
    fingerprint of the API key (never the key), or `anonymous` on an open API."""
    key = presented_key(api_key, bearer)
    if not state.auth.enabled or key is None:
        return "anonymous"
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:12]


CallerDep = Annotated[str, Depends(get_caller)]
