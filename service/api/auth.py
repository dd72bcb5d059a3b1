"""API keys with two scopes: `read` (detect, results, stats, models) and `admin` (thresholds, calibration, reload).

A key arrives as `X-API-Key: <key>` or `Authorization: Bearer <key>`. Keys are compared with `hmac.compare_digest`
against every configured key (no early exit), so timing does not reveal how much of a key matched or which list it
is in. With no keys configured at all the service is open and logs a warning at start-up. The FastAPI
dependencies that check a request's scope are in `deps.py`.
"""
from __future__ import annotations

import hmac
import logging
from typing import Literal

from fastapi.security import HTTPAuthorizationCredentials

log = logging.getLogger("zsad.api")

Scope = Literal["read", "admin"]


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
