"""The shared database: migrations (fresh, from the previous release's database with data, concurrent), the schema
the migrations make equals service/db/schema.py, thresholds with row versions, the one-time import of the
thresholds file, and the fleet tables. SQLite always; PostgreSQL too when ZSAD_TEST_POSTGRES_URL is set (CI)."""
from __future__ import annotations

import json
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select, text

from service.db import migrate
from service.db.engine import make_engine, sqlite_url
from service.db.fleet import FleetStore
from service.db.schema import heatmaps_table, metadata, results_table, thresholds_table
from service.db.thresholds import ThresholdFileError, ThresholdStore, VersionConflict, import_file
from tests.pg import private_schema

FIXTURE = Path(__file__).parent / "fixtures" / "release_7657705"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "db.sqlite")
    else:
        with private_schema("db") as url:
            yield url


@pytest.fixture
def engine(db_url):
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


def _all_rows(conn, results_t=results_table, heatmaps_t=heatmaps_table) -> tuple[list[dict], list[dict]]:
    results = [dict(r._mapping) for r in conn.execute(select(results_t).order_by(results_t.c.id))]
    heatmaps = [dict(r._mapping) for r in conn.execute(select(heatmaps_t).order_by(heatmaps_t.c.result_id))]
    return results, heatmaps


def _fixture_rows() -> tuple[list[dict], list[dict]]:
    from tests.fixtures.release_7657705 import schema as old

    legacy = make_engine(sqlite_url(FIXTURE / "results.sqlite"))
    try:
        with legacy.connect() as conn:
            return _all_rows(conn, old.results_table, old.heatmaps_table)
    finally:
        legacy.dispose()


# --- migrations ---------------------------------------------------------------------------------------------------------
def test_upgrade_keeps_every_row_of_the_previous_releases_sqlite_database(tmp_path):
    db = tmp_path / "results.sqlite"
    shutil.copy(FIXTURE / "results.sqlite", db)  # made by that release's own code: tests/fixtures/.../make.py
    before = _fixture_rows()
    assert len(before[0]) == 40 and len(before[1]) == 12
    engine = make_engine(sqlite_url(db))
    st = migrate.state(engine)
    assert st.legacy and st.current is None
    with pytest.raises(migrate.SchemaError, match="previous release"):
        migrate.check(engine)
    assert migrate.upgrade(engine) == (None, migrate.head_revision())
    with engine.connect() as conn:
        results, heatmaps = _all_rows(conn)
        assert all(r.pop("calibrated") is None for r in results)  # added in 0003: unknown for older rows
        assert all(r.pop("mode") is None and r.pop("shots") is None for r in results)  # added in 0005
        assert (results, heatmaps) == before  # every column of every row, heatmap bytes included
        assert conn.execute(select(func.count()).select_from(thresholds_table)).scalar() == 0
    # the autoincrement sequence carried over: the next result gets id 41, never a reused id
    from service.api.results import NewResult, ResultsStore

    store = ResultsStore(None, db, engine=engine)
    new = store.add_many([NewResult("L", "p", "default", "v3", "combined", 0.4, "normal", 0.5, "fallback",
                                    {"fnn": 0.1, "prompt": 0.2, "combined": 0.4}, 3.0)])
    assert new == [41]
    seen, cursor = [], None
    while True:
        rows, cursor = store.page(cursor=cursor, limit=7)
        seen += [r["id"] for r in rows]
        if cursor is None:
            break
    assert seen == list(range(41, 0, -1))
    assert migrate.upgrade(engine)[0] == migrate.head_revision()  # idempotent
    engine.dispose()


def test_upgrade_keeps_every_row_of_the_previous_releases_postgresql_database():
    from tests.fixtures.release_7657705 import schema as old

    results, heatmaps = _fixture_rows()
    with private_schema("legacy") as url:
        engine = make_engine(url)
        old.metadata.create_all(engine)  # what that release did on PostgreSQL
        with engine.begin() as conn:
            conn.execute(insert(old.results_table), results)
            conn.execute(insert(old.heatmaps_table), heatmaps)
            conn.execute(text("SELECT setval(pg_get_serial_sequence('results', 'id'), 40)"))
        assert migrate.state(engine).legacy
        migrate.upgrade(engine)
        assert migrate.check(engine).at_head
        with engine.connect() as conn:
            after, after_heat = _all_rows(conn)
            assert all(r.pop("calibrated") is None for r in after)  # added in 0003
            assert all(r.pop("mode") is None and r.pop("shots") is None for r in after)  # added in 0005
            assert (after, after_heat) == (results, heatmaps)
        with engine.begin() as conn:
            row = {k: v for k, v in results[0].items() if k != "id"}
            new_id = conn.execute(insert(results_table).values(**row).returning(results_table.c.id)).scalar()
        assert new_id == 41
        engine.dispose()


def test_the_migrations_make_exactly_the_schema_in_code(engine):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    migrate.upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_check_refuses_a_fresh_database_and_accepts_a_newer_one(engine, caplog):
    with pytest.raises(migrate.SchemaError, match="zsad db upgrade"):
        migrate.check(engine)
    migrate.ensure(engine, run_upgrade=True)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_later_release'"))
    st = migrate.check(engine)  # a later release migrated during a rolling update: carry on
    assert st.newer and "newer than this release" in caplog.text
    assert migrate.upgrade(engine) == ("9999_later_release", "9999_later_release")  # never downgrades


def test_replicas_starting_together_migrate_once(db_url):
    """The race of `create_all` (1 start in 5 crashed): N engines upgrade the same fresh database at once."""
    engines = [make_engine(db_url) for _ in range(4)]
    barrier = threading.Barrier(len(engines))
    outcomes: list = [None] * len(engines)

    def run(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = migrate.upgrade(engines[i])
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(engines))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    head = migrate.head_revision()
    assert all(isinstance(o, tuple) and o[1] == head for o in outcomes), outcomes
    assert sum(o[0] is None for o in outcomes) == 1  # exactly one of them found the database empty and migrated it
    for e in engines:
        e.dispose()


# --- thresholds ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def thresholds(engine):
    migrate.upgrade(engine)
    return ThresholdStore(engine)


def test_threshold_rows_carry_versions_and_refuse_stale_writes(thresholds, db_url):
    e = thresholds.put("widget", 0.6, "combined", updated_by="key:a")
    assert e["version"] == 1 and e["updated_by"] == "key:a" and e["lines"] == {}
    e = thresholds.put("widget", 0.62, "combined", expected_version=1)
    assert e["version"] == 2 and e["threshold"] == 0.62
    with pytest.raises(VersionConflict, match="version 2"):
        thresholds.put("widget", 0.7, "combined", expected_version=1)
    with pytest.raises(VersionConflict, match="no longer exists"):
        thresholds.put("gadget", 0.7, "combined", expected_version="*")
    assert thresholds.get("widget")["threshold"] == 0.62  # the refused writes changed nothing
    # extra fields ride along in the JSON column and come back as fields of the entry
    e = thresholds.put("widget", 0.3, "fnn", line="L1", pixel_threshold=0.55, calibration={"n": 9})
    assert e["lines"]["L1"] == {**e["lines"]["L1"], "pixel_threshold": 0.55, "calibration": {"n": 9}, "version": 1}
    # a second replica (its own engine) reads the same rows at once
    other = ThresholdStore(make_engine(db_url))
    assert other.resolve("widget", "L1", None, "combined", None, None).threshold == 0.3
    with pytest.raises(VersionConflict):
        other.delete("widget", "L1", expected_version=7)
    assert other.delete("widget", "L1", expected_version=1)
    assert not other.delete("widget", "L1")
    assert other.delete("widget") and thresholds.get("widget") is None
    other.engine.dispose()


def test_concurrent_writers_with_if_match_never_lose_a_write_silently(thresholds, db_url):
    """Two replicas read version N and both write with it: exactly one wins each round, the other is told."""
    thresholds.put("widget", 0.5, "combined")
    replicas = [ThresholdStore(make_engine(db_url)) for _ in range(2)]
    def write(i: int, round_: int, version: int, barrier: threading.Barrier, outcome: list) -> None:
        barrier.wait()
        try:
            outcome[i] = replicas[i].put("widget", 0.1 * (i + 1) + 0.01 * round_, "combined",
                                         expected_version=version)["version"]
        except VersionConflict as exc:
            outcome[i] = exc

    for round_ in range(5):
        version = thresholds.get("widget")["version"]
        barrier, outcome = threading.Barrier(2), [None, None]
        threads = [threading.Thread(target=write, args=(i, round_, version, barrier, outcome)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        wins = [o for o in outcome if isinstance(o, int)]
        assert len(wins) == 1 and wins[0] == version + 1, outcome
        assert sum(isinstance(o, VersionConflict) for o in outcome) == 1
        winner = outcome.index(wins[0])
        assert thresholds.get("widget")["threshold"] == pytest.approx(0.1 * (winner + 1) + 0.01 * round_)
    for r in replicas:
        r.engine.dispose()


def test_calibration_records(thresholds):
    rid = thresholds.record_calibration("widget", None, "combined", 0.58, 0.01, 200, {"name": "default", "version": "v3"},
                                        "key:abc", True, {"n": 200, "achieved_frr": 0.01})
    thresholds.record_calibration("widget", "L2", "fnn", 0.4, 0.05, 30, None, None, False, {"n": 30})
    recs = thresholds.calibrations("widget")
    assert [r["id"] for r in recs] == [rid + 1, rid] and recs[1]["n_images"] == 200
    assert recs[1]["created_by"] == "key:abc" and recs[1]["model"] == {"name": "default", "version": "v3"}
    assert recs[0]["line"] == "L2" and recs[0]["stored"] is False and thresholds.calibrations("other") == []


def test_the_thresholds_file_is_imported_once_and_the_database_wins(thresholds, tmp_path):
    path = tmp_path / "thresholds.json"
    shutil.copy(FIXTURE / "thresholds.json", path)  # written by the previous release's ThresholdStore
    data = json.loads(path.read_text())["products"]
    report = import_file(path, thresholds)
    assert report["imported"] == 4 and not path.exists() and Path(report["renamed_to"]).is_file()
    got = thresholds.all()["products"]
    assert got["widget"]["threshold"] == 0.61 and got["widget"]["lines"]["line-3"]["threshold"] == 0.7
    assert got["gadget"]["calibration"] == data["gadget"]["calibration"] and got["gadget"]["score"] == "fnn"
    assert got["Mutter-ß"]["threshold"] is None and got["Mutter-ß"]["lines"]["L1"]["score"] == "prompt"
    assert got["widget"]["updated_at"] == data["widget"]["updated_at"]
    assert import_file(path, thresholds) is None  # renamed: not read again
    # the same file again (say the rename had failed): nothing newer in the database is overwritten
    thresholds.put("widget", 0.9, "combined")
    shutil.copy(FIXTURE / "thresholds.json", path)
    assert import_file(path, thresholds)["imported"] == 0
    assert thresholds.get("widget")["threshold"] == 0.9
    path.write_text("{not json")
    with pytest.raises(ThresholdFileError, match="cannot read"):
        import_file(path, thresholds)
    assert path.exists()  # an unreadable file is left where it is


# --- fleet ------------------------------------------------------------------------------------------------------------
def test_fleet_desired_generations_and_heartbeats(engine):
    migrate.upgrade(engine)
    fleet = FleetStore(engine)
    assert fleet.desired() is None
    a = fleet.set_desired("default", "v2", "key:a")
    b = fleet.set_desired("default", "v2", "key:b")  # the same version again is a new generation (a retry)
    assert (a.generation, b.generation) == (1, 2) and fleet.desired() == b
    row = dict(host="h", pid=1, started_at=1.0, status="ready", model_name="default", model_version="v2",
               applied_generation=2, error=None, package_version="0")
    fleet.heartbeat("r1", **row)
    fleet.heartbeat("r1", **{**row, "status": "stopping"})
    fleet.heartbeat("r2", **row)
    assert [(r["replica_id"], r["status"]) for r in fleet.replicas()] == [("r1", "stopping"), ("r2", "ready")]
    with engine.begin() as conn:  # a replica silent for more than FLEET_FORGET_S is forgotten at the next heartbeat
        conn.execute(text("UPDATE replicas SET last_seen = 0 WHERE replica_id = 'r2'"))
    fleet.heartbeat("r1", **row)
    assert [r["replica_id"] for r in fleet.replicas()] == ["r1"]
    assert fleet.clear_desired() and fleet.desired() is None and not fleet.clear_desired()


def test_fixture_is_the_previous_releases_schema():
    """The committed database really has the 7657705 tables (and no revision table)."""
    con = sqlite3.connect(FIXTURE / "results.sqlite")
    try:
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        con.close()
    assert names == {"results", "heatmaps", "sqlite_sequence"}
