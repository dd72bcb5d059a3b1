"""Typed FastAPI dependencies: the app state, the settings and the API-key scopes.

Routes declare what they need as parameters (`state: StateDep`) or route dependencies (`dependencies=READ`), so no
route reaches into `request.app.state` itself, and tests can override any of them with
`app.dependency_overrides`.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request, Response, Security
from fastapi.routing import APIRoute
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


# --- authentication before the body ------------------------------------------------------------------------------------
def _needed_scope(route: APIRoute) -> Scope | None:
    calls = {d.call for d in route.dependant.dependencies}
    return "admin" if require_admin in calls else "read" if require_read in calls else None


class AuthFirstRoute(APIRoute):
    """A route that checks the API key before FastAPI reads and parses the request body.

    FastAPI reads a JSON body (and answers 422 for a malformed one) before it runs the route's dependencies, so an
    unauthenticated caller would get the body validated (and the server would parse it) before being refused. Every
    router passes `route_class=AuthFirstRoute`; `READ` / `ADMIN` still run as dependencies (and keep the OpenAPI
    document's security entries), this only runs the same check earlier."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        needed = _needed_scope(self)
        if needed is None:
            return handler

        async def checked(request: Request) -> Response:
            headers = request.headers
            bearer = None
            scheme, _, credentials = headers.get("authorization", "").partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                bearer = HTTPAuthorizationCredentials(scheme=scheme, credentials=credentials.strip())
            _check(request.app.state.zsad, needed, headers.get("x-api-key") or None, bearer)
            return await handler(request)

        return checked
