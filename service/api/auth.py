"""API keys with two scopes: `read` (detect, results, stats, models) and `admin` (thresholds, calibration, reload).

A key arrives as `X-API-Key: <key>` or `Authorization: Bearer <key>`. Keys are compared with `hmac.compare_digest`
against every configured key (no early exit), so timing does not reveal how much of a key matched or which list it
is in. With no keys configured at all the service is open and logs a warning at start-up.
"""
from __future__ import annotations

import hmac
import logging
from typing import Literal

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from .errors import ApiError

log = logging.getLogger("zsad.api")

Scope = Literal["read", "admin"]

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key (read or admin scope).")
_bearer = HTTPBearer(auto_error=False, description="Same API key as `Authorization: Bearer <key>`.")


class KeyChecker:
    def __init__(self, read_keys: list[str], admin_keys: list[str]):
        self._read = [k.encode() for k in read_keys if k]
        self._admin = [k.encode() for k in admin_keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._read or self._admin)

    def scope_of(self, key: str) -> Scope | None:
        """The scope a presented key grants (admin implies read), or None when it matches no configured key."""
        given = key.encode()
        is_admin = False
        is_read = False
        for k in self._admin:  # no early exit: the loop always visits every key
            is_admin |= hmac.compare_digest(given, k)
        for k in self._read:
            is_read |= hmac.compare_digest(given, k)
        if is_admin:
            return "admin"
        return "read" if is_read else None


def presented_key(api_key: str | None, bearer: HTTPAuthorizationCredentials | None) -> str | None:
    if api_key:
        return api_key
    if bearer is not None and bearer.credentials:
        return bearer.credentials
    return None


def _check(request: Request, needed: Scope, api_key: str | None, bearer: HTTPAuthorizationCredentials | None) -> None:
    checker: KeyChecker = request.app.state.zsad.auth
    if not checker.enabled:
        return
    key = presented_key(api_key, bearer)
    if key is None:
        raise ApiError(401, "unauthorized", "missing API key: send X-API-Key or Authorization: Bearer <key>",
                       {"WWW-Authenticate": "Bearer"})
    scope = checker.scope_of(key)
    if scope is None:
        raise ApiError(401, "unauthorized", "invalid API key", {"WWW-Authenticate": "Bearer"})
    if needed == "admin" and scope != "admin":
        raise ApiError(403, "forbidden", "this API key lacks the admin scope")


async def require_read(
    request: Request,
    api_key: str | None = Security(_api_key_header),
    bearer: HTTPAuthorizationCredentials | None = Security(_bearer),
) -> None:
    _check(request, "read", api_key, bearer)


async def require_admin(
    request: Request,
    api_key: str | None = Security(_api_key_header),
    bearer: HTTPAuthorizationCredentials | None = Security(_bearer),
) -> None:
    _check(request, "admin", api_key, bearer)


READ = [Depends(require_read)]
ADMIN = [Depends(require_admin)]
