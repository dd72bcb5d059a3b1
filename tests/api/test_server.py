"""A real uvicorn process (`zsad serve` on 127.0.0.1): crash durability and graceful shutdown."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from .helpers import Server, image_bytes

BODY = image_bytes("PNG", (48, 48))


def _env(store, tmp) -> dict[str, str]:
    return {"ZSAD_MODEL_STORE": str(store), "ZSAD_DEVICE": "cpu", "ZSAD_RESULTS_PATH": str(tmp / "results.sqlite"),
            "ZSAD_THRESHOLDS_PATH": str(tmp / "thresholds.json"), "ZSAD_MAX_BATCH_WAIT_MS": "2"}


def _burst(url: str, acked: list[int], stop: threading.Event, errors: list[str]) -> None:
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            try:
                r = client.post("/v1/detect", content=BODY, headers={"content-type": "image/png"},
                                params={"line": "crash", "product": "p"})
            except httpx.TransportError:
                return  # the server is gone
            if r.status_code == 200:
                acked.append(r.json()["id"])
            else:
                errors.append(f"{r.status_code} {r.text[:200]}")


def test_sigkill_during_writes_loses_no_acknowledged_result(api_store, tmp_path):
    env = _env(api_store, tmp_path)
    server = Server(env, tmp_path / "server.log").start()
    acked: list[int] = []
    errors: list[str] = []
    stop = threading.Event()
    try:
        threads = [threading.Thread(target=_burst, args=(server.url, acked, stop, errors)) for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while len(acked) < 25 and time.time() < deadline:
            time.sleep(0.01)
        server.kill()  # SIGKILL in the middle of the burst
        stop.set()
        for t in threads:
            t.join(15)
    finally:
        server.kill()
    assert len(acked) >= 25 and not errors, errors

    restarted = Server(env, tmp_path / "server2.log").start()
    try:
        with httpx.Client(base_url=restarted.url, timeout=10) as client:
            for rid in acked:
                r = client.get(f"/v1/results/{rid}")
                assert r.status_code == 200, (rid, r.text)
                assert r.json()["line"] == "crash"
            stats = client.get("/v1/stats", params={"line": "crash"}).json()
            assert stats["count"] >= len(acked)
            # ... and it keeps writing after the crash
            r = client.post("/v1/detect", content=BODY, headers={"content-type": "image/png"})
            assert r.status_code == 200 and r.json()["id"] > max(acked)

            # SIGTERM while a slow request is in flight: it finishes with 200, then the process exits.
            files = [("files", (f"{i}.jpg", image_bytes("JPEG", (800, 600), seed=i, quality=85), "image/jpeg"))
                     for i in range(16)]
            with ThreadPoolExecutor(1) as pool:
                for _attempt in range(3):  # on a fast machine the batch may finish before we see it in flight
                    slow = pool.submit(httpx.post, restarted.url + "/v1/detect/batch", files=files,
                                       params={"heatmap": "png"}, timeout=60)
                    while not slow.done():
                        inflight = [line for line in client.get("/metrics").text.splitlines()
                                    if line.startswith("zsad_inflight_requests ")]
                        if inflight and float(inflight[0].split()[1]) >= 1:  # the batch (scrapes are not counted)
                            break
                    if not slow.done():
                        break
                    slow.result()
                assert not slow.done(), "could not catch the batch request in flight"
                code = restarted.stop(30)
                response = slow.result(30)
        assert response.status_code == 200 and response.json()["count"] == 16
        # uvicorn re-raises the captured SIGTERM after its graceful shutdown, hence -15; the lifespan exit ran.
        assert code in (0, -15)
        assert "stopped" in (tmp_path / "server2.log").read_text()
    finally:
        restarted.kill()

