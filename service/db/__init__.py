"""The shared database: one SQLAlchemy schema for results, thresholds, calibrations, reference memories and the fleet, its Alembic
migrations, and plain stores over it. SQLite (WAL) on one machine, PostgreSQL (`ZSAD_RESULTS_URL`) for a fleet.

Plain Python, no HTTP: the service (`service.api`), the CLI (`zsad db upgrade`, thresholds for `zsad score`) and
the tests use the same modules. Nothing here imports torch or the API package.

| module | what |
|---|---|
| `engine.py` | the URL from the settings, an engine with SQLite's pragmas |
| `schema.py` | the tables (SQLAlchemy Core); the migrations must produce exactly these |
| `migrate.py` | `upgrade` (Alembic, under a lock so replicas starting together migrate once) and `check` |
| `thresholds.py` | `ThresholdStore`: thresholds per product/line with a version per row, calibration records |
| `fleet.py` | `FleetStore`: the fleet's desired model and the replicas' heartbeats |
| `memories.py` | `DbMemoryStore`: few-shot reference memories per product/line (bytes + JSON header), next to the thresholds |
"""
