"""Two live replicas on a real PostgreSQL: `zsad serve` subprocesses on loopback ports sharing one database (a
private schema on the server ZSAD_TEST_POSTGRES_URL names; CI starts one) and a copy of the tiny test model store.

One test, the five scenarios of issue 15 in order (each builds on the last; the whole runs in well under 2 minutes):
  1. a threshold set through replica A is used by replica B on its next request;
  2. a reload through A moves both to the new version within the poll interval (default ZSAD_FLEET_POLL_S), with
     requests flowing to both during the switch and 0 errors;
  3. a corrupt version set as desired leaves both serving the old one, and /v1/fleet says why;
  4. results written through both page consistently through either (no gaps, no duplicates);
  5. kill -9 of one replica under load: every acknowledged result is in the database, the other keeps answering.
Both replicas start together on the empty schema with ZSAD_DB_UPGRADE=true: the advisory lock lets one migrate.
"""
from __future__ import annotations

import shutil
import threading
import time
from collections import Counter

import httpx
import pytest
from sqlalchemy import select

from service.constants import FLEET_POLL_S
from service.db.engine import make_engine
from service.db.fleet import FleetStore
from service.db.schema import results_table
from service.store import ModelStore
from tests.pg import private_schema, server_url

from .helpers import Server, image_bytes

BODY = image_bytes("PNG", (48, 48))
PNG = {"content-type": "image/png"}


class Load:
    """Clients posting /v1/detect to each replica until stopped; records every answer."""

    def __init__(self, urls: dict[str, str], per_replica: int = 2):
        self.stop = threading.Event()
        self.answers: list[tuple[str, float, int, str | None, int | None]] = []  # replica, t, status, version, id
        self.transport_errors: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(name, url), daemon=True)
                        for name, url in urls.items() for _ in range(per_replica)]

    def _run(self, name: str, url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not self.stop.is_set():
                try:
                    r = client.post("/v1/detect", content=BODY, headers=PNG, params={"product": "gear", "line": name})
                except httpx.TransportError:
                    with self._lock:
                        self.transport_errors[name] += 1
                    time.sleep(0.05)
                    continue
                body = r.json() if r.status_code == 200 else {}
                with self._lock:
                    self.answers.append((name, time.perf_counter(), r.status_code,
                                         body.get("model", {}).get("version"), body.get("id")))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def _start_together(servers: list[Server]) -> None:
    errors: list[BaseException] = []

    def start(s: Server) -> None:
        try:
            s.start(timeout=120)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    if errors:
        raise errors[0]


def _fleet(url: str) -> dict:
    return httpx.get(url + "/v1/fleet", timeout=10).json()


def _wait(fn, timeout: float, what: str):
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


def _page_ids(url: str) -> list[int]:
    ids, cursor = [], None
    with httpx.Client(base_url=url, timeout=10) as client:
        while True:
            params = {"limit": 37, **({"cursor": cursor} if cursor else {})}
            body = client.get("/v1/results", params=params).json()
            ids += [r["id"] for r in body["items"]]
            cursor = body["next_cursor"]
            if cursor is None:
                return ids


@pytest.mark.slow
def test_two_replicas_on_postgresql(api_store, tmp_path):
    server_url()  # skips without a PostgreSQL server
    store = tmp_path / "store"
    shutil.copytree(api_store, store)
    ms = ModelStore(store)
    v1 = ms.current("default")
    manifest = ms.manifest("default", v1)
    fnn_bytes = (store / "default" / v1 / "fnn.safetensors").read_bytes()
    clean = {k: v for k, v in manifest.items() if k not in ("name", "version", "files", "created_at")}
    v2 = ms.publish("default", {"fnn.safetensors": fnn_bytes}, clean, make_current=False)
    corrupt = ms.publish("default", {"fnn.safetensors": fnn_bytes}, clean, make_current=False)
    (store / "default" / corrupt / "fnn.safetensors").write_bytes(fnn_bytes[:-8] + b"corrupt!")

    with private_schema("live") as url:
        env = {"ZSAD_MODEL_STORE": str(store), "ZSAD_DEVICE": "cpu", "ZSAD_PRECISION": "fp32", "ZSAD_RESULTS_URL": url,
               "ZSAD_DB_UPGRADE": "true", "ZSAD_THRESHOLDS_PATH": str(tmp_path / "none.json"),
               "ZSAD_TORCH_THREADS": "1", "ZSAD_MAX_BATCH_WAIT_MS": "2"}  # ZSAD_FLEET_POLL_S: the default
        a = Server({**env, "ZSAD_REPLICA_ID": "A"}, tmp_path / "a.log")
        b = Server({**env, "ZSAD_REPLICA_ID": "B"}, tmp_path / "b.log")
        engine = make_engine(url)
        phases = [("start", time.perf_counter())]
        try:
            _start_together([a, b])
            fleet = _wait(lambda: (f := _fleet(a.url)) and len(f["replicas"]) == 2 and f["converged"] and f, 10,
                          "both heartbeats")
            assert {r["id"]: r["model"]["version"] for r in fleet["replicas"]} == {"A": v1, "B": v1}

            phases.append(('0', time.perf_counter()))
            # 1. a threshold set through A is used by B on its next request
            r = httpx.put(a.url + "/v1/thresholds/gear", json={"threshold": 0.001, "score": "fnn"}, timeout=10)
            assert r.status_code == 200
            det = httpx.post(b.url + "/v1/detect", content=BODY, headers=PNG, params={"product": "gear"}, timeout=10)
            assert det.status_code == 200, det.text
            assert (det.json()["threshold"], det.json()["threshold_source"], det.json()["score_name"]) == (
                0.001, "product", "fnn")

            phases.append(('1', time.perf_counter()))
            # 2. reload through A moves both, under load, with 0 errors
            with Load({"A": a.url, "B": b.url}) as load:
                _wait(lambda: len(load.answers) >= 20, 30, "load running")
                t0 = time.perf_counter()
                r = httpx.post(a.url + "/v1/models/reload", json={"version": v2}, timeout=60)
                t_a = time.perf_counter()
                assert r.status_code == 200 and r.json()["desired"]["version"] == v2, r.text
                _wait(lambda: _fleet(b.url)["converged"], FLEET_POLL_S + 30, "fleet converged on the new version")
                t_both = time.perf_counter()
                time.sleep(0.5)  # requests keep flowing after the switch
            answers = load.answers
            assert answers and all(status == 200 for _, _, status, _, _ in answers), Counter(s for *_, s, _, _ in answers)
            assert not load.transport_errors
            for name in ("A", "B"):
                versions = [v for n, _, _, v, _ in answers if n == name]
                assert versions[0] == v1 and versions[-1] == v2, (name, Counter(versions))
                switched = [t for n, t, _, v, _ in answers if n == name and v == v2]
                assert switched and min(switched) <= t_both + 0.5
            print(f"\nRESULT name=fleet_rollout_live reload_on_A_s={t_a - t0:.2f} convergence_s={t_both - t0:.2f} "
                  f"poll_s={FLEET_POLL_S} requests={len(answers)} errors=0")
            acked_before = {rid for *_, rid in answers}

            phases.append(('2', time.perf_counter()))
            # 3. a corrupt version: refused by the receiving replica, and set as desired behind the API's back
            r = httpx.post(a.url + "/v1/models/reload", json={"version": corrupt}, timeout=60)
            assert r.status_code == 422 and f"still serving default@{v2}" in r.json()["error"]["message"]
            assert _fleet(b.url)["desired"]["version"] == v2  # not rolled out
            FleetStore(engine).set_desired("default", corrupt, "test")
            rows = _wait(lambda: (f := _fleet(b.url)) and all(
                corrupt in (x["error"] or "") and x["applied_generation"] != f["desired"]["generation"]
                for x in f["replicas"]) and f["replicas"], FLEET_POLL_S * 3 + 30, "both replicas report the failure")
            for row in rows:
                assert "checksum" in row["error"] and row["model"]["version"] == v2 and row["ready"]
                assert not row["in_sync"]
            for s in (a, b):
                det = httpx.post(s.url + "/v1/detect", content=BODY, headers=PNG, timeout=10)
                assert det.status_code == 200 and det.json()["model"]["version"] == v2
            assert httpx.post(b.url + "/v1/models/reload", json={"version": v2}, timeout=60).status_code == 200

            phases.append(('3', time.perf_counter()))
            # 4. results written through both page the same through either: no gaps, no duplicates
            with engine.connect() as conn:
                in_db = [row.id for row in conn.execute(select(results_table.c.id).order_by(results_table.c.id.desc()))]
            through_a, through_b = _page_ids(a.url), _page_ids(b.url)
            assert through_a == through_b == in_db
            assert len(set(in_db)) == len(in_db) and acked_before <= set(in_db)
            lines = Counter(r["line"] for r in httpx.get(a.url + "/v1/results", params={"limit": 500}).json()["items"])
            assert lines["A"] > 0 and lines["B"] > 0

            phases.append(('4', time.perf_counter()))
            # 5. kill -9 of B under load: every acknowledged result is stored, A keeps answering
            with Load({"A": a.url, "B": b.url}) as load:
                _wait(lambda: sum(1 for n, *_ in load.answers if n == "B") >= 10, 30, "load on B")
                b.kill()
                t_kill = time.perf_counter()
                _wait(lambda: sum(1 for n, t, *_ in load.answers if n == "A" and t > t_kill + 1.0) >= 10, 30,
                      "A answering after the kill")
            answers = load.answers
            acked = {rid for _, _, status, _, rid in answers if status == 200}
            after_kill = [status for n, t, status, _, _ in answers if n == "A" and t > t_kill]
            assert after_kill and all(s == 200 for s in after_kill)
            assert all(status == 200 for _, _, status, _, _ in answers)  # B's were refused connections, never errors
            with engine.connect() as conn:
                stored = {row.id for row in conn.execute(select(results_table.c.id))}
            assert acked <= stored, sorted(acked - stored)[:10]
            phases.append(("5", time.perf_counter()))
            print("phases: " + " ".join(f"{n}={t - phases[i][1]:.1f}s" for i, (n, t) in enumerate(phases[1:])))
        except BaseException:
            print("--- A ---\n" + a.log() + "\n--- B ---\n" + b.log())
            raise
        finally:
            a.stop()
            b.kill()
            engine.dispose()
