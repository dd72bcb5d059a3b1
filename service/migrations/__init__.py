"""Alembic migrations of the shared database (`service/db/schema.py`); run them with `zsad db upgrade`.

Revisions are frozen: each creates or changes the tables with explicit `op` calls and never imports the live schema,
so an old revision keeps meaning what it meant. Add one with
`alembic -c service/migrations/alembic.ini revision -m "..."` (or copy the newest file), give it the next number,
and extend `tests/test_db.py` if it moves data.
"""
