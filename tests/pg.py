"""A private PostgreSQL schema per test, on the server `ZSAD_TEST_POSTGRES_URL` names (CI starts one; tests that
need it skip without it). Each schema is its own namespace in the shared database (search_path in the URL), so
tests, and engineers running them at the same time, never see each other's tables."""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

ENV = "ZSAD_TEST_POSTGRES_URL"


def server_url() -> str:
    url = os.environ.get(ENV)
    if not url:
        pytest.skip(f"{ENV} is not set (no PostgreSQL server for this run)")
    return url


@contextmanager
def private_schema(prefix: str = "t") -> Iterator[str]:
    """Yield a URL whose connections live in a fresh schema; the schema is dropped afterwards."""
    from sqlalchemy import create_engine, text

    base = server_url()
    schema = f"zsad_{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()
