"""Benchmark: fleet rollout convergence. Two replicas (`zsad serve`, 127.0.0.1) share one database; a reload through
replica A sets the fleet's desired model, and B loads it at its next poll (`ZSAD_FLEET_POLL_S`, default 2 s).

What it does:
1. Starts replicas A and B on `--store` (default the repo's `model_store/`, the shipped `default` model) with a
   shared database: `--db-url`, else $ZSAD_TEST_POSTGRES_URL (a private schema is made and dropped), else a SQLite
   file in a temp folder. Both start together with ZSAD_DB_UPGRADE=true.
2. Keeps one client per replica posting /v1/detect the whole time (requests flow during every switch).
3. `--rounds` times, alternating between the `--versions`: POST /v1/models/reload to A and times it (the baseline:
   what one replica's reload costs, load + verify + warm-up), then polls both replicas' GET /v1/models every 20 ms
   until both serve the new version (convergence, measured from the moment the reload was posted). The fleet's
   own cost is convergence minus the baseline: the wait for B's next poll plus B's own load.
4. Prints each round and ends with `RESULT name=fleet_rollout ...` (medians and max, errors, the 10 s target).

Usage: .venv/bin/python benchmarks/fleet_rollout.py [--store DIR] [--model default] [--versions v2,v3]
       [--rounds 6] [--poll-s 2] [--db-url URL]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _server import free_port, start_server, stop_server, wait_ready

from service.constants import FLEET_POLL_S

TARGET_S = 10.0  # issue 15: reload through A -> both serving the new version within 10 s at the default poll


class Replica:
    def __init__(self, name: str, env: dict[str, str], workdir: Path):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"replica-{name}.log"
        self.proc = start_server(self.port, {**os.environ, **env, "ZSAD_REPLICA_ID": name, "PYTHONUNBUFFERED": "1"},
                                 self.log)

    def wait_ready(self, timeout: float = 300.0) -> None:
        wait_ready(self.proc, self.url, self.log, timeout)

    def version(self, client: httpx.Client) -> str | None:
        model = client.get(self.url + "/v1/models").json().get("model")
        return model["version"] if model else None

    def stop(self) -> None:
        stop_server(self.proc, timeout=40)


def database(args: argparse.Namespace, workdir: Path):
    """(url, cleanup): --db-url, a private schema on $ZSAD_TEST_POSTGRES_URL, or a SQLite file."""
    if args.db_url:
        return args.db_url, lambda: None
    base = os.environ.get("ZSAD_TEST_POSTGRES_URL")
    if not base:
        return f"sqlite:///{workdir / 'fleet.sqlite'}", lambda: None
    from sqlalchemy import create_engine, text

    schema = f"zsad_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))

    def cleanup() -> None:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()

    return f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}", cleanup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", default=str(REPO / "model_store"))
    p.add_argument("--model", default="default")
    p.add_argument("--versions", default="v2,v3", help="versions to alternate between (the first is reloaded first)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--poll-s", type=float, default=FLEET_POLL_S)
    p.add_argument("--db-url")
    p.add_argument("--torch-threads", type=int, default=1)
    args = p.parse_args()
    versions = args.versions.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="zsad-fleet-"))
    url, cleanup = database(args, workdir)
    env = {"ZSAD_MODEL_STORE": args.store, "ZSAD_MODEL_NAME": args.model, "ZSAD_MODEL_VERSION": versions[-1],
           "ZSAD_DEVICE": "cpu", "ZSAD_RESULTS_URL": url, "ZSAD_DB_UPGRADE": "true",
           "ZSAD_THRESHOLDS_PATH": str(workdir / "none.json"), "ZSAD_FLEET_POLL_S": str(args.poll_s),
           "ZSAD_TORCH_THREADS": str(args.torch_threads)}
    print(f"database: {url.split('@')[-1]}; store {args.store}; model {args.model} {versions}; poll {args.poll_s} s; "
          f"logs in {workdir}", file=sys.stderr)
    replicas = [Replica(n, env, workdir) for n in ("A", "B")]
    stop = threading.Event()
    answers = {"ok": 0, "errors": 0}

    def load(r: Replica) -> None:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (320, 240), (120, 130, 140)).save(buf, "PNG")
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                try:
                    ok = c.post(r.url + "/v1/detect", content=buf.getvalue(),
                                headers={"content-type": "image/png"}).status_code == 200
                except httpx.TransportError:
                    ok = False
                answers["ok" if ok else "errors"] += 1

    rows = []
    try:
        for r in replicas:
            r.wait_ready()
        threads = [threading.Thread(target=load, args=(r,), daemon=True) for r in replicas]
        for t in threads:
            t.start()
        with httpx.Client(timeout=120) as c:
            for i in range(args.rounds):
                target = versions[i % len(versions)]
                time.sleep(1.0)
                t0 = time.perf_counter()
                resp = c.post(replicas[0].url + "/v1/models/reload", json={"version": target})
                t_a = time.perf_counter()
                if resp.status_code != 200:
                    raise SystemExit(f"reload failed: {resp.status_code} {resp.text}")
                while any(r.version(c) != target for r in replicas):
                    if time.perf_counter() - t0 > 120:
                        raise SystemExit("no convergence in 120 s")
                    time.sleep(0.02)
                t_both = time.perf_counter()
                rows.append((t_a - t0, t_both - t0))
                print(f"round {i + 1}: -> {target}: reload on A {t_a - t0:.2f} s, both serving it {t_both - t0:.2f} s "
                      f"(fleet overhead {t_both - t_a:.2f} s)", file=sys.stderr)
        stop.set()
        for t in threads:
            t.join(60)
    finally:
        stop.set()
        for r in replicas:
            r.stop()
        cleanup()
    reload_s = [a for a, _ in rows]
    conv = [b for _, b in rows]
    over = [b - a for a, b in rows]
    print(f"RESULT name=fleet_rollout rounds={len(rows)} poll_s={args.poll_s:g} "
          f"reload_on_A_p50_s={statistics.median(reload_s):.2f} convergence_p50_s={statistics.median(conv):.2f} "
          f"convergence_max_s={max(conv):.2f} fleet_overhead_p50_s={statistics.median(over):.2f} "
          f"requests={answers['ok']} errors={answers['errors']} target_s={TARGET_S:g} "
          f"met={'yes' if max(conv) <= TARGET_S and answers['errors'] == 0 else 'no'}")


if __name__ == "__main__":
    main()
