"""Fleet behaviour in process: two apps sharing one database (SQLite file), fake detectors per version.

Reload through A becomes the desired model and B follows within its poll; a version that fails on A is never
rolled out; a broken desired version set directly leaves both serving the old one and GET /v1/fleet says why;
thresholds written through A apply on B's next request; If-Match gives 409 on a stale version; the schema check
keeps a replica not ready when its database is behind."""
from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.db.fleet import FleetStore

from .helpers import FakeDetector, image_bytes, make_settings, wait_ready

PNG = {"content-type": "image/png"}
POLL_S = 0.05


def _loader(broken: set[str]):
    from service.detector import ModelLoadError

    def load(settings, name=None, version=None):
        version = version or settings.model_version or "v1"
        if version in broken:
            raise ModelLoadError(f"cannot load model 'default'@{version}: checksum mismatch for fnn.safetensors")
        return FakeDetector(version=version)

    return load


@pytest.fixture
def pair(tmp_path):
    broken = {"v9"}
    common = dict(results_path=tmp_path / "shared.sqlite", fleet_poll_s=POLL_S)
    apps = [create_app(make_settings(tmp_path / r, tmp_path / "no-store", replica_id=r, **common), loader=_loader(broken))
            for r in ("A", "B")]
    with TestClient(apps[0]) as a, TestClient(apps[1]) as b:
        wait_ready(a)
        wait_ready(b)
        yield a, b, broken


def _until(fn, timeout: float = 10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout} s: {fn()}")


def _version(c) -> str:
    return c.post("/v1/detect", content=image_bytes(), headers=PNG).json()["model"]["version"]


def _replicas(c) -> dict:
    return {r["id"]: r for r in c.get("/v1/fleet").json()["replicas"]}


def test_reload_through_one_replica_moves_the_fleet(pair):
    a, b, _ = pair
    # both rows appear at start-up ("loading") and each turns "ready" once its model is loaded: wait for that
    fleet = _until(lambda: (f := a.get("/v1/fleet").json())["converged"] and len(f["replicas"]) == 2 and f)
    assert fleet["desired"] is None and fleet["this_replica"] == "A"
    r = a.post("/v1/models/reload", json={"version": "v2"})
    assert r.status_code == 200 and r.json()["desired"]["version"] == "v2" and r.json()["desired"]["generation"] == 1
    assert r.json()["desired"]["set_by"] == "anonymous"
    assert _version(a) == "v2"
    _until(lambda: _version(b) == "v2", 5.0)
    fleet = _until(lambda: (f := b.get("/v1/fleet").json())["converged"] and f)
    assert {k: (v["model"]["version"], v["in_sync"], v["ready"]) for k, v in _replicas(b).items()} == {
        "A": ("v2", True, True), "B": ("v2", True, True)}
    assert fleet["desired"]["version"] == "v2"
    metrics = b.get("/metrics").text
    assert 'zsad_model_desired_info{model="default",version="v2"} 1.0' in metrics
    assert "zsad_model_in_sync 1.0" in metrics and 'replica="B",version="v2"} 1.0' in metrics


def test_a_version_that_fails_on_the_receiving_replica_is_not_rolled_out(pair):
    a, b, _ = pair
    r = a.post("/v1/models/reload", json={"version": "v9"})
    assert r.status_code == 422 and "still serving default@v1" in r.json()["error"]["message"]
    assert a.get("/v1/fleet").json()["desired"] is None
    assert "checksum" in _until(lambda: _replicas(b)["A"]["error"])
    time.sleep(POLL_S * 5)
    assert _version(a) == "v1" and _version(b) == "v1"


def test_a_broken_desired_version_leaves_both_on_the_old_one_and_the_fleet_says_why(pair, tmp_path):
    a, b, _ = pair
    state = a.app.state.zsad
    FleetStore(state.engine).set_desired("default", "v9", "test")  # set behind the API's back (or broken later)
    rows = _until(lambda: (r := _replicas(a)) and all(x["error"] for x in r.values()) and r)
    for row in rows.values():
        assert "v9" in row["error"] and "checksum" in row["error"] and row["model"]["version"] == "v1"
        assert row["ready"] and not row["in_sync"]
    assert not a.get("/v1/fleet").json()["converged"]
    assert _version(a) == "v1" and _version(b) == "v1"
    assert "zsad_model_in_sync 0.0" in b.get("/metrics").text
    reloads = b.get("/metrics").text.count('zsad_model_reloads_total{outcome="failed"} 1.0')
    time.sleep(POLL_S * 6)  # a failed generation is not retried every poll
    assert b.get("/metrics").text.count('zsad_model_reloads_total{outcome="failed"} 1.0') == reloads == 1
    # the next rollout moves both again, and clears the errors
    assert a.post("/v1/models/reload", json={"version": "v3"}).status_code == 200
    _until(lambda: _version(b) == "v3")
    _until(lambda: all(x["error"] is None for x in _replicas(a).values()))
    assert a.delete("/v1/fleet/desired").status_code == 204 and a.delete("/v1/fleet/desired").status_code == 404


def test_a_threshold_set_through_one_replica_applies_on_the_others_next_request(pair):
    a, b, _ = pair
    before = b.post("/v1/detect", content=image_bytes(), headers=PNG, params={"product": "widget"}).json()
    assert before["threshold_source"] != "product"
    r = a.put("/v1/thresholds/widget", json={"threshold": 0.01, "score": "fnn"})
    assert r.status_code == 200 and r.headers["etag"] == '"1"'
    after = b.post("/v1/detect", content=image_bytes(), headers=PNG, params={"product": "widget"}).json()
    assert (after["threshold"], after["threshold_source"], after["label"]) == (0.01, "product", "anomalous")
    # optimistic concurrency across replicas: both read version 1, the second writer is told
    assert b.put("/v1/thresholds/widget", json={"threshold": 0.2}, headers={"If-Match": '"1"'}).status_code == 200
    r = a.put("/v1/thresholds/widget", json={"threshold": 0.3}, headers={"If-Match": '"1"'})
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict" and "version 2" in r.json()["error"]["message"]
    assert a.get("/v1/thresholds/widget").headers["etag"] == '"2"'
    assert a.get("/v1/thresholds/widget").json()["entry"]["threshold"] == 0.2
    r = a.put("/v1/thresholds/widget", json={"threshold": 0.3}, headers={"If-Match": "yesterday"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
    assert a.delete("/v1/thresholds/widget", headers={"If-Match": '"1"'}).status_code == 409
    assert a.delete("/v1/thresholds/widget", headers={"If-Match": '"2"'}).status_code == 204


def test_calibrations_are_recorded_with_who_and_how_many(tmp_path):
    settings = make_settings(tmp_path, tmp_path / "no-store", api_keys_admin=["admin-key"])
    with TestClient(create_app(settings, loader=_loader(set()))) as c:
        wait_ready(c)
        key = {"X-API-Key": "admin-key"}
        files = [("files", (f"n{i}.png", image_bytes(seed=i), "image/png")) for i in range(5)]
        r = c.post("/v1/calibrate/widget", files=files, params={"target_frr": 0.2, "score": "fnn"}, headers=key)
        assert r.status_code == 200, r.text
        recs = c.get("/v1/thresholds/widget/calibrations", headers=key).json()
        assert len(recs) == 1 and recs[0]["n_images"] == 5 and recs[0]["created_by"].startswith("key:")
        assert "admin-key" not in str(recs) and recs[0]["threshold"] == r.json()["threshold"]
        entry = c.get("/v1/thresholds/widget", headers=key).json()["entry"]
        assert entry["source"] == "calibration" and entry["updated_by"] == recs[0]["created_by"]


def test_a_database_behind_the_code_keeps_the_replica_not_ready(tmp_path):
    from service.db.engine import make_engine, sqlite_url
    from service.db.migrate import upgrade

    db = tmp_path / "r.sqlite"
    engine = make_engine(sqlite_url(db))
    upgrade(engine, "0001")
    engine.dispose()
    settings = make_settings(tmp_path, tmp_path / "no-store", results_path=db, db_upgrade=False)
    with TestClient(create_app(settings, loader=_loader(set()))) as c:
        body = wait_ready(c)
        assert body["status"] == "failed" and "zsad db upgrade" in body["error"]["message"]
        assert c.get("/readyz").status_code == 503 and c.get("/healthz").status_code == 200
    with TestClient(create_app(make_settings(tmp_path, tmp_path / "no-store", results_path=db),
                               loader=_loader(set()))) as c:  # SQLite default: migrate at start
        assert wait_ready(c)["status"] == "ready"


def test_the_others_load_a_rollouts_candidate_ahead_and_swap_only_once_it_is_verified(tmp_path):
    import threading

    from service.detector import ModelLoadError

    gate = threading.Event()
    calls: list[tuple[str, str]] = []

    def loader_for(replica: str):
        def load(settings, name=None, version=None):
            version = version or "v1"
            calls.append((replica, version))
            if replica == "A" and version in ("v2", "v8"):
                gate.wait(10)  # A verifies slowly
                if version == "v8":
                    raise ModelLoadError("cannot load model 'default'@v8: dimension mismatch")
            return FakeDetector(version=version)

        return load

    common = dict(results_path=tmp_path / "shared.sqlite", fleet_poll_s=POLL_S)
    apps = [create_app(make_settings(tmp_path / r, tmp_path / "no-store", replica_id=r, **common), loader=loader_for(r))
            for r in ("A", "B")]
    with TestClient(apps[0]) as a, TestClient(apps[1]) as b:
        wait_ready(a)
        wait_ready(b)
        for version, ok in (("v2", True), ("v8", False)):
            gate.clear()
            before = _version(b)
            answer: list = []
            t = threading.Thread(target=lambda v=version, out=answer: out.append(
                a.post("/v1/models/reload", json={"version": v})))
            t.start()
            _until(lambda v=version: ("B", v) in calls)  # B loads the candidate while A still verifies it
            time.sleep(POLL_S * 4)
            assert _version(b) == before  # ... but does not serve it before A did
            gate.set()
            t.join(10)
            assert answer[0].status_code == (200 if ok else 422)
            if ok:
                _until(lambda v=version: _version(b) == v)
            else:
                time.sleep(POLL_S * 4)
                assert _version(b) == before and a.get("/v1/fleet").json()["desired"]["version"] == "v2"
                assert b.app.state.zsad._prepared is None  # the copy loaded ahead was dropped
            assert calls.count(("B", version)) == 1  # the swap used the copy loaded ahead: no second load
