"""Issue 14's regressions (D1-D8), with the exact requests where they are fast enough, on the fake detector:
pixel budget, hostile images, query bounds, disconnects and slow bodies, readiness, auth before body, private files."""
from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import re
import socket
import stat
import threading
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.api.limits import PixelBudget, PixelBudgetTimeout, UploadGuardMiddleware

from ..hostile_images import corpus, png_by_hand
from .helpers import FakeDetector, free_port, image_bytes, make_settings, wait_ready

PNG = {"content-type": "image/png"}


def _app(tmp_path, detector=None, **overrides):
    det = detector or FakeDetector()
    settings = make_settings(tmp_path, tmp_path / "no-store", **overrides)
    return create_app(settings, loader=lambda s, name=None, version=None: det)


@pytest.fixture
def client(tmp_path):
    with TestClient(_app(tmp_path)) as c:
        wait_ready(c)
        yield c


@pytest.fixture
def zsad_logs(caplog):
    """caplog for the service's own loggers too ("zsad" does not propagate to the root logger)."""
    logger = logging.getLogger("zsad")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO):
            yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def _metric(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def _server_errors(text: str, endpoint: str) -> float:
    """zsad_requests_total with a 5xx status for `endpoint`, whatever other labels the series has."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("zsad_requests_total{") and f'endpoint="{endpoint}"' in line
               and re.search(r'status="5\d\d"', line))


def _requests(text: str, endpoint: str, status: int) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("zsad_requests_total{") and f'endpoint="{endpoint}"' in line
               and f'status="{status}"' in line)


# --- D1: pixel budget --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def png_7000():
    return png_by_hand(7000, 7000)  # the 7000 x 7000 grey PNG of zeros, ~48 KB


def test_d1_huge_png_with_heatmap_png_is_decoded_reduced_and_its_overlay_capped(client, png_7000):
    assert len(png_7000) < 60_000
    r = client.post("/v1/detect", params={"heatmap": "png"}, content=png_7000, headers=PNG)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image"] == {"width": 7000, "height": 7000, "format": "PNG"}  # sizes of the upload, not the decode
    assert (body["width"], body["height"]) == (7000, 7000)
    overlay = Image.open(io.BytesIO(base64.b64decode(body["heatmap"]["png_base64"])))
    assert overlay.size == (1750, 1750) and overlay.width * overlay.height <= 4_000_000  # ZSAD_MAX_HEATMAP_PIXELS
    stored = client.get(body["heatmap_url"])
    assert Image.open(io.BytesIO(stored.content)).size == (1750, 1750)


def test_d1_batch_of_three_huge_pngs_with_heatmap_json(client, png_7000):
    files = [("files", (f"big{i}.png", png_7000, "image/png")) for i in range(3)]
    r = client.post("/v1/detect/batch", params={"heatmap": "json"}, files=files)
    assert r.status_code == 200, r.text
    assert [x["image"]["width"] for x in r.json()["results"]] == [7000] * 3


def test_d1_regions_are_in_original_coordinates(tmp_path):
    im = Image.new("L", (6000, 4000), 0)
    im.paste(255, (3000, 1000, 3600, 1400))  # the fake detector's heat is the brightness
    data = io.BytesIO()
    im.save(data, "PNG")
    # threshold 0: the image is anomalous, so it has regions (#13: a normal image has none)
    with TestClient(_app(tmp_path, max_heatmap_pixels=1_000_000, default_threshold=0.0)) as c:
        wait_ready(c)
        body = c.post("/v1/detect", params={"heatmap": "png"}, content=data.getvalue(), headers=PNG).json()
    assert body["label"] == "anomalous"
    (region,) = body["regions"]
    f = 5  # 24 MP reduced to at most 1 MP: factor 5
    assert Image.open(io.BytesIO(base64.b64decode(body["heatmap"]["png_base64"]))).size == (1200, 800)
    for got, want in zip(region["bbox"], (3000, 1000, 3600, 1400)):
        assert abs(got - want) <= f, region
    assert abs(region["area_px"] - 600 * 400) <= 0.05 * 600 * 400


def test_pixel_budget_reserves_clamps_queues_and_times_out():
    async def scenario():
        budget = PixelBudget(100, overtake_s=10.0)
        big = await budget.reserve(10**9, timeout=1)  # more than the capacity: cut to it, runs alone
        assert big.held == 100 and budget.in_use == 100
        with pytest.raises(PixelBudgetTimeout):
            await budget.reserve(1, timeout=0.05)
        assert budget.in_use == 100 and not [w for w in budget._waiters if not w[1].done()]
        waiting = asyncio.ensure_future(budget.reserve(60, timeout=5))
        small = asyncio.ensure_future(budget.reserve(30, timeout=5))
        await asyncio.sleep(0.01)
        big.shrink_to(40)  # 60 free: the first waiter fits, the second (30) waits behind it
        first = await waiting
        await asyncio.sleep(0.01)
        assert budget.in_use == 100 and not small.done()
        big.release()
        assert (await small).held == 30 and budget.in_use == 90
        async with first:
            pass
        assert budget.in_use == 30

    asyncio.run(scenario())


def test_pixel_budget_lets_small_requests_overtake_a_big_one_only_for_a_while():
    async def scenario():
        budget = PixelBudget(100, overtake_s=0.2)
        held = await budget.reserve(50, timeout=1)
        big = asyncio.ensure_future(budget.reserve(80, timeout=5))
        await asyncio.sleep(0.01)
        small = await budget.reserve(10, timeout=1)  # fits beside what is held: goes ahead of the big one
        assert small.held == 10 and not big.done()
        await asyncio.sleep(0.3)
        late = asyncio.ensure_future(budget.reserve(10, timeout=1))  # the big one has waited long enough
        await asyncio.sleep(0.01)
        assert not late.done()
        held.release()
        small.release()
        assert (await big).held == 80 and (await late).held == 10

    asyncio.run(scenario())


def test_a_full_pixel_budget_answers_503_busy_at_the_deadline(tmp_path):
    with TestClient(_app(tmp_path, request_timeout_s=0.3)) as c:
        wait_ready(c)
        budget = c.app.state.zsad.pixel_budget
        budget.in_use = budget.capacity  # someone else holds every pixel
        r = c.post("/v1/detect", content=image_bytes(), headers=PNG)
        assert r.status_code == 503 and r.json()["error"]["code"] == "busy" and r.headers["Retry-After"]
        budget.in_use = 0
        assert c.post("/v1/detect", content=image_bytes(), headers=PNG).status_code == 200
        assert budget.in_use == 0  # every reservation was given back


# --- hostile images ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("item", corpus(), ids=lambda h: h.name)
def test_hostile_images_get_their_status_never_500(client, item):
    r = client.post("/v1/detect", params={"heatmap": "png"}, content=item.data, headers=PNG)
    assert r.status_code == item.expect, r.text[:300]
    if item.expect != 200:
        assert set(r.json()) == {"error"} and r.json()["error"]["message"]


# --- D2: query values are bounded by their schema ----------------------------------------------------------------------
@pytest.mark.parametrize("query", ["/v1/results?cursor=9223372036854775808", "/v1/results?cursor=%C2%B2",
                                   "/v1/results?cursor=0", "/v1/results?cursor=-1", "/v1/results?since=1e300",
                                   "/v1/results?since=nan", "/v1/results?since=0001-01-01T00:00:00%2B14:00",
                                   "/v1/stats?window=100000000000", "/v1/stats?window=9999999d",
                                   "/v1/stats?window=1e300h", "/v1/stats?window=-5m", "/v1/stats?window=0h",
                                   "/v1/results?line=%00", "/v1/stats?product=..%2F..%2Fetc"])
def test_d2_out_of_range_query_values_are_422(client, query):
    r = client.get(query)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "validation_error"


@pytest.mark.parametrize("query", ["/v1/results?cursor=999999999999999999", "/v1/stats?window=999w",
                                   "/v1/stats?window=999999999", "/v1/stats?window=all", "/v1/stats?window=15m",
                                   "/v1/results?since=2025-01-01T00:00:00Z"])
def test_d2_largest_accepted_values_work(client, query):
    assert client.get(query).status_code == 200


def test_d2b_calibration_target_frr_denormal_is_422(tmp_path):
    with TestClient(_app(tmp_path)) as c:
        wait_ready(c)
        r = c.post("/v1/calibrate/x", params={"target_frr": "5e-324"},
                   files=[("files", ("a.png", image_bytes(), "image/png"))])
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"


# --- D3: disconnects and slow bodies -------------------------------------------------------------------------------------
async def _asgi(app, path: str, messages: list, headers: list[tuple[bytes, bytes]], stall: bool = False) -> list:
    """Call the app directly; `messages` are what `receive` returns in order, then a disconnect (or a stall)."""
    queue = list(messages)
    sent: list = []

    async def receive():
        if queue:
            return queue.pop(0)
        if stall:
            await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "app": app}
    await app(scope, receive, send)
    return sent


CHUNKED = [(b"content-type", b"image/png"), (b"transfer-encoding", b"chunked")]


def test_d3_client_gone_mid_upload_is_not_a_server_error(tmp_path, zsad_logs):
    with TestClient(_app(tmp_path)) as c:
        wait_ready(c)
        zsad_logs.clear()
        sent = c.portal.call(_asgi, c.app, "/v1/detect",
                             [{"type": "http.request", "body": image_bytes()[:1024], "more_body": True}], CHUNKED)
        assert sent[0]["status"] == 499
        assert not [r for r in zsad_logs.records if r.levelno >= logging.WARNING], zsad_logs.text
        assert len([r for r in zsad_logs.records if "disconnected" in r.getMessage()]) == 1
        metrics = c.get("/metrics").text
        assert _metric(metrics, "zsad_client_disconnects_total") == 1
        assert _server_errors(metrics, "/v1/detect") == 0 and _requests(metrics, "/v1/detect", 499) >= 1


def test_d3_stalled_body_gets_408_and_the_connection_closed(tmp_path):
    with TestClient(_app(tmp_path, body_timeout_s=0.3)) as c:
        wait_ready(c)
        t = time.perf_counter()
        sent = c.portal.call(_asgi, c.app, "/v1/detect",
                             [{"type": "http.request", "body": b"\x89PNG\r\n\x1a\n", "more_body": True}], CHUNKED,
                             True)
        assert time.perf_counter() - t < 10
        assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]


async def _slow_app(scope, receive, send):
    await asyncio.sleep(0.5)  # never reads its body: keeps its upload slot until it ends
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_upload_cap_makes_extra_uploads_wait_then_503(tmp_path):
    guard = UploadGuardMiddleware(_slow_app, timeout_s=0.2, max_uploads=1)
    headers = [(b"content-length", b"3")]

    async def scenario():
        body = [{"type": "http.request", "body": b"abc", "more_body": False}]
        first = asyncio.ensure_future(_asgi(guard, "/x", list(body), headers))
        await asyncio.sleep(0.02)
        second = await _asgi(guard, "/x", list(body), headers)
        assert second[0]["status"] == 503 and (b"retry-after", b"5") in second[0]["headers"]
        assert (await first)[0]["status"] == 200
        assert guard.reading == 0
        assert (await _asgi(guard, "/x", list(body), headers))[0]["status"] == 200  # the slot came back

    asyncio.run(scenario())


@pytest.mark.parametrize("headers", [[(b"content-length", b"4"), (b"transfer-encoding", b"chunked")],
                                     [(b"content-length", b"4"), (b"content-length", b"5")]])
def test_conflicting_framing_headers_get_400_and_close(headers):
    guard = UploadGuardMiddleware(_slow_app, timeout_s=1, max_uploads=1)
    sent = asyncio.run(_asgi(guard, "/x", [], headers))
    assert sent[0]["status"] == 400 and (b"connection", b"close") in sent[0]["headers"]


def _serve_in_thread(app):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    return server, thread, port


def _exchange(port: int, raw: bytes, wait: float = 3.0) -> tuple[bytes, bool]:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(raw)
        data, closed = b"", False
        end = time.time() + wait
        while time.time() < end:
            try:
                got = s.recv(65536)
            except TimeoutError:
                break
            if not got:
                closed = True
                break
            data += got
        return data, closed


def test_d3_on_a_real_server_aborts_are_quiet_and_smuggling_closes(tmp_path, zsad_logs):
    """uvicorn in this process: the issue's chunked upload closed after one chunk, and CL + TE together."""
    import httpx

    app = _app(tmp_path)
    server, thread, port = _serve_in_thread(app)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(httpx.Client(base_url=url, timeout=10))
        zsad_logs.clear()
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n400\r\n" + b"\0" * 1024 + b"\r\n")
        deadline = time.time() + 10
        while time.time() < deadline and _metric(httpx.get(url + "/metrics").text,
                                                  "zsad_client_disconnects_total") < 20:
            time.sleep(0.05)
        metrics = httpx.get(url + "/metrics").text
        # uvicorn may drop a connection that closed before its request started: those never reach the app
        assert 1 <= _metric(metrics, "zsad_client_disconnects_total") <= 20
        assert _server_errors(metrics, "/v1/detect") == 0 and _requests(metrics, "/v1/detect", 499) >= 1
        assert not [r for r in zsad_logs.records if r.levelno >= logging.ERROR], zsad_logs.text[-2000:]
        assert 1 <= len([r for r in zsad_logs.records if "disconnected" in r.getMessage()]) <= 20
        assert httpx.get(url + "/readyz").status_code == 200

        data, closed = _exchange(port, b"PUT /v1/thresholds/x HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                                       b"\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                                       b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 400") and data.count(b"HTTP/1.1") == 1 and closed, data[:300]
    finally:
        server.should_exit = True
        thread.join(30)


# --- D6: readiness keeps the error shape and shows no paths --------------------------------------------------------------
def test_d6_readyz_503_bodies_have_the_error_shape_and_no_paths(tmp_path):
    from service.detector import ModelLoadError

    gate = threading.Event()

    def loader(settings, name=None, version=None):
        gate.wait(10)
        raise ModelLoadError(f"cannot load model 'default': checksum mismatch for {tmp_path}/store/default/v3/fnn.bin")

    with TestClient(create_app(make_settings(tmp_path, tmp_path / "store"), loader=loader)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"] == {"code": "not_ready", "message": "not ready: loading"}
        gate.set()
        body = wait_ready(c)
        assert body["status"] == "failed" and body["error"]["code"] == "not_ready"
        message = body["error"]["message"]
        assert "fnn.bin" in message and str(tmp_path) not in message and "/store/" not in message
        assert str(tmp_path) not in c.get("/v1/models").text


# --- D7: authentication before the body ----------------------------------------------------------------------------------
def test_d7_malformed_body_without_a_key_is_401_on_every_protected_route(tmp_path):
    app = _app(tmp_path, api_keys_read=["r"], api_keys_admin=["a"])
    with TestClient(app) as c:
        wait_ready(c)
        r = c.put("/v1/thresholds/x", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 401, r.text
        r = c.put("/v1/thresholds/x", content=b"{not json", headers={"content-type": "application/json",
                                                                       "X-API-Key": "r"})
        assert r.status_code == 403, r.text
        r = c.put("/v1/thresholds/x", content=b"{not json", headers={"content-type": "application/json",
                                                                       "X-API-Key": "a"})
        assert r.status_code == 422, r.text
        checked = 0
        for path, ops in c.get("/openapi.json").json()["paths"].items():
            for method, op in ops.items():
                if not op.get("security"):
                    continue
                url = path.replace("{product}", "x").replace("{result_id}", "1")
                r = c.request(method.upper(), url, content=b"{not json",
                              headers={"content-type": "application/json"})
                assert r.status_code == 401, (method, path, r.status_code, r.text)
                checked += 1
        assert checked >= 12


# --- D8: private files ---------------------------------------------------------------------------------------------------------
def test_d8_the_database_with_results_overlays_and_thresholds_is_private(tmp_path):
    old = os.umask(0o022)
    try:
        data = tmp_path / "data"
        app = _app(tmp_path, results_path=data / "db" / "results.sqlite")
        with TestClient(app) as c:
            wait_ready(c)
            r = c.post("/v1/detect", params={"heatmap": "png"}, content=image_bytes(), headers=PNG)
            assert r.status_code == 200 and r.json()["heatmap_url"]  # an overlay of the image is stored
            assert c.put("/v1/thresholds/x", json={"threshold": 0.5}).status_code == 200  # thresholds live there too
            files = [data / "db" / "results.sqlite", data / "db" / "results.sqlite-wal",
                     data / "db" / "results.sqlite-shm"]
            modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
            assert set(modes.values()) == {"0o600"}, modes
            for folder in (data, data / "db"):
                assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    finally:
        os.umask(old)


def test_private_files_helpers(tmp_path):
    from service.private_files import open_private, private_dir, private_file, private_sqlite

    old = os.umask(0)
    try:
        shared = tmp_path / "shared"
        shared.mkdir(mode=0o777)
        os.chmod(shared, 0o777)
        assert private_dir(shared / "a" / "b") == shared / "a" / "b"
        assert stat.S_IMODE(shared.stat().st_mode) == 0o777  # an existing folder is not ours to change
        assert stat.S_IMODE((shared / "a").stat().st_mode) == 0o700
        loose = shared / "loose.sqlite"
        loose.write_bytes(b"")
        (shared / "loose.sqlite-wal").write_bytes(b"")
        os.chmod(loose, 0o644)
        private_sqlite(loose)
        assert stat.S_IMODE(loose.stat().st_mode) == 0o600
        assert stat.S_IMODE((shared / "loose.sqlite-wal").stat().st_mode) == 0o600
        assert stat.S_IMODE(private_file(shared / "new" / "f").stat().st_mode) == 0o600
        with open_private(shared / "tmp.json") as fh:
            fh.write("{}")
        assert stat.S_IMODE((shared / "tmp.json").stat().st_mode) == 0o600
        with pytest.raises(FileExistsError):
            open_private(shared / "tmp.json")
    finally:
        os.umask(old)
