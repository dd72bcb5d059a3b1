"""Alembic environment: runs on the connection `service.db.migrate` hands over (config.attributes["connection"]),
or, for the `alembic` command, on the database the `ZSAD_*` settings name."""
from __future__ import annotations

from alembic import context

config = context.config


def _run(connection) -> None:
    context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:  # the alembic command line
    from service.db.engine import database_url, make_engine
    from service.settings import Settings

    engine = make_engine(database_url(Settings()))
    with engine.begin() as conn:
        _run(conn)
    engine.dispose()
