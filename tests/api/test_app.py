"""Service behaviour with a controllable fake detector: auth, queue limits, timeouts, paging, errors, metrics."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app

from .helpers import FakeDetector, image_bytes, make_settings, wait_ready

PNG = {"content-type": "image/png"}


def _app(tmp_path, detector=None, **overrides):
    det = detector or FakeDetector()
    settings = make_settings(tmp_path, tmp_path / "no-store", **overrides)
    return create_app(settings, loader=lambda s, name=None, version=None: det), det


@pytest.fixture
def client(tmp_path):
    app, _ = _app(tmp_path)
    with TestClient(app) as c:
        wait_ready(c)
        yield c


def _detect(c, **params):
    return c.post("/v1/detect", content=image_bytes(), headers=PNG, params=params)


def test_auth_scopes(tmp_path):
    app, _ = _app(tmp_path, api_keys_read=["read-key"], api_keys_admin=["admin-key"])
    with TestClient(app) as c:
        wait_ready(c)
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        r = _detect(c)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert _detect_with(c, {"X-API-Key": "wrong"}).status_code == 401
        assert _detect_with(c, {"X-API-Key": "read-key"}).status_code == 200
        assert _detect_with(c, {"Authorization": "Bearer admin-key"}).status_code == 200
        r = c.put("/v1/thresholds/widget", json={"threshold": 0.4}, headers={"X-API-Key": "read-key"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = c.post("/v1/models/reload", headers={"Authorization": "Bearer read-key"})
        assert r.status_code == 403
        r = c.put("/v1/thresholds/widget", json={"threshold": 0.4}, headers={"X-API-Key": "admin-key"})
        assert r.status_code == 200
        assert c.get("/v1/results", headers={"X-API-Key": "read-key"}).status_code == 200
        assert c.get("/v1/results").status_code == 401
        assert c.get("/metrics").status_code == 200  # scraping needs no key


def _detect_with(c, headers):
    return c.post("/v1/detect", content=image_bytes(), headers={**PNG, **headers})


def test_full_queue_gives_503_with_retry_after(tmp_path):
    gate = threading.Event()
    app, det = _app(tmp_path, FakeDetector(gate=gate), queue_size=2, batching=False)
    with TestClient(app) as c:
        gate.set()
        wait_ready(c)  # warm-up passed the gate
        gate.clear()
        det.entered.clear()
        worker = app.state.zsad.worker
        with ThreadPoolExecutor(4) as pool:
            busy = pool.submit(_detect, c)
            assert det.entered.wait(10)  # the worker is blocked on the first image
            queued = [pool.submit(_detect, c) for _ in range(2)]
            deadline = time.time() + 10
            while worker.queue.qsize() < 2 and time.time() < deadline:
                time.sleep(0.01)
            r = _detect(c)
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "queue_full" and int(r.headers["Retry-After"]) >= 1
            gate.set()
            assert busy.result(10).status_code == 200
            assert [f.result(10).status_code for f in queued] == [200, 200]
        assert _detect(c).status_code == 200
        assert 'zsad_queue_rejections_total 1.0' in c.get("/metrics").text


def test_request_timeout_gives_504_and_worker_recovers(tmp_path):
    gate = threading.Event()
    app, det = _app(tmp_path, FakeDetector(gate=gate), request_timeout_s=0.3)
    with TestClient(app) as c:
        gate.set()
        wait_ready(c)
        gate.clear()
        r = _detect(c)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        gate.set()
        assert _detect(c).status_code == 200


def test_concurrent_requests_are_micro_batched(tmp_path):
    gate = threading.Event()
    app, det = _app(tmp_path, FakeDetector(gate=gate), max_batch_size=8, max_batch_wait_ms=20)
    with TestClient(app) as c:
        gate.set()
        wait_ready(c)
        gate.clear()
        det.entered.clear()
        with ThreadPoolExecutor(6) as pool:
            first = pool.submit(_detect, c)
            assert det.entered.wait(10)
            rest = [pool.submit(_detect, c) for _ in range(5)]
            deadline = time.time() + 10
            while app.state.zsad.worker.queue.qsize() < 5 and time.time() < deadline:
                time.sleep(0.01)
            gate.set()
            sizes = [f.result(10).json()["batch_size"] for f in rest]
        assert first.result().json()["batch_size"] == 1 and max(sizes) == 5


def test_paging_returns_each_result_once_while_new_ones_arrive(client):
    ids = [_detect(client, product="p").json()["id"] for _ in range(23)]
    seen, cursor = [], None
    while True:
        params = {"limit": 4, "product": "p"} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/results", params=params).json()
        seen += [item["id"] for item in page["items"]]
        assert _detect(client, product="p").status_code == 200  # a new result arrives between pages
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)
    assert len(set(seen)) == len(seen)


def test_thresholds_put_changes_label_and_persists(tmp_path):
    app, _ = _app(tmp_path)
    with TestClient(app) as c:
        wait_ready(c)
        r = _detect(c, product="widget")
        assert (r.json()["threshold"], r.json()["threshold_source"], r.json()["calibrated"]) == (0.5, "fallback", False)
        assert c.put("/v1/thresholds/widget", json={"threshold": 0.2, "score": "fnn"}).status_code == 200
        assert c.put("/v1/thresholds/widget", params={"line": "L7"}, json={"threshold": 0.9, "score": "fnn"}).status_code == 200
        r = _detect(c, product="widget").json()
        assert (r["threshold"], r["threshold_source"], r["score_name"], r["label"]) == (0.2, "product", "fnn", "anomalous")
        assert r["calibrated"] is True  # an admin's explicit threshold for the product counts as calibrated
        r = _detect(c, product="widget", line="L7").json()
        assert (r["threshold"], r["threshold_source"], r["label"]) == (0.9, "line", "normal")
        assert c.put("/v1/thresholds/widget", json={"threshold": 1.5}).status_code == 422
        assert c.put("/v1/thresholds/bad%20name", json={"threshold": 0.5}).status_code == 422
    app2, _ = _app(tmp_path)  # a restart reads the file
    with TestClient(app2) as c:
        wait_ready(c)
        assert c.get("/v1/thresholds/widget").json()["entry"]["lines"]["L7"]["threshold"] == 0.9
        assert c.delete("/v1/thresholds/widget", params={"line": "L7"}).status_code == 204
        assert c.get("/v1/thresholds").json()["default"] == {"threshold": 0.5, "source": "fallback", "score": "combined",
                                                             "calibrated": False, "pixel_threshold": 0.5,
                                                             "pixel_threshold_source": "fallback"}


def test_error_shape_everywhere(tmp_path):
    class Broken(FakeDetector):
        def detect(self, images, object_name=None, heatmap=True, timings=None):
            if len(images) == 1 and images[0].size == (7, 7):
                raise RuntimeError("secret internals")
            return super().detect(images, object_name, heatmap, timings)

    app, _ = _app(tmp_path, Broken())
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c)
        cases = [
            c.get("/nope"),
            c.delete("/v1/results"),
            c.get("/v1/results", params={"limit": 0}),
            c.get("/v1/results/0"),
            c.get("/v1/results/999"),
            c.get("/v1/results/999/heatmap.png"),
            c.get("/v1/stats", params={"window": "forever"}),
            c.get("/v1/results", params={"since": "yesterday"}),
            _detect(c, heatmap="svg"),
            c.post("/v1/detect", data={"product": "p"}),
            c.post("/v1/detect", files={"image": ("a.png", image_bytes(), "image/png")}),
            c.post("/v1/detect", files={"file": ("a.png", image_bytes(), "image/png")}, data={"heatmap": "bogus"}),
            c.post("/v1/detect", content=image_bytes(size=(7, 7)), headers=PNG),
            c.post("/v1/models/reload", json={"version": "../../etc"}),
        ]
        codes = [r.status_code for r in cases]
        assert codes == [404, 405, 422, 422, 404, 404, 422, 422, 422, 415, 400, 422, 500, 422]
        for r in cases:
            body = r.json()
            assert set(body) >= {"error"} and set(body["error"]) == {"code", "message"}, body
            assert "Traceback" not in r.text and "secret internals" not in r.text
        assert c.get("/healthz").status_code == 200 and _detect(c).status_code == 200


def test_missing_model_is_not_ready_then_reload_recovers(tmp_path):
    from service.detector import ModelLoadError

    state = {"ok": False}

    def loader(settings, name=None, version=None):
        if not state["ok"]:
            raise ModelLoadError("cannot load model 'default': model 'default' has no current version in store")
        return FakeDetector(version=version or "v2")

    settings = make_settings(tmp_path, tmp_path / "empty")
    app = create_app(settings, loader=loader)
    with TestClient(app) as c:
        body = wait_ready(c)
        assert body["status"] == "failed" and "no current version" in body["error"]["message"]
        assert c.get("/readyz").status_code == 503 and c.get("/v2/health/ready").status_code == 503
        assert c.get("/healthz").status_code == 200 and c.get("/v2/health/live").json() == {"live": True}
        r = _detect(c)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        assert "zsad_model_ready 0.0" in c.get("/metrics").text
        r = c.post("/v1/models/reload", json={})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        state["ok"] = True
        r = c.post("/v1/models/reload", json={"version": "v2"})
        assert r.status_code == 200 and r.json()["current"]["version"] == "v2" and r.json()["previous"] is None
        assert c.get("/readyz").status_code == 200 and _detect(c).json()["model"]["version"] == "v2"
        assert "zsad_model_ready 1.0" in c.get("/metrics").text


def test_each_app_has_its_own_metrics_and_bounded_line_labels(tmp_path):
    app1, _ = _app(tmp_path / "a", metrics_max_lines=2)
    app2, _ = _app(tmp_path / "b")
    with TestClient(app1) as c1, TestClient(app2) as c2:
        wait_ready(c1)
        wait_ready(c2)
        for line in ("L1", "L2", "L3", "L4"):
            assert _detect(c1, line=line).status_code == 200
        text1, text2 = c1.get("/metrics").text, c2.get("/metrics").text
        assert 'zsad_predictions_total{calibrated="false",label="normal",line="other",product="none"} 2.0' in text1
        assert 'line="L3"' not in text1 and "zsad_predictions_total{" not in text2
        for name in ("zsad_request_duration_seconds_bucket", "zsad_inference_stage_duration_seconds_bucket",
                     "zsad_queue_wait_seconds_bucket", "zsad_batch_size_bucket", "zsad_inflight_requests",
                     "zsad_image_score_bucket", 'zsad_model_info{clip="fake-clip",model="default",replica="'):
            assert name in text1, name


def test_openapi_documents_every_endpoint_with_examples(client):
    spec = client.get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert "example" in str(op["responses"]) or "$ref" in str(op["responses"]), (method, path)
    for name in ("DetectResult", "ResultsPage", "Stats", "ThresholdIn", "CalibrationResult", "ReloadOut"):
        assert "examples" in spec["components"]["schemas"][name], name
    assert set(spec["paths"]["/v1/detect"]["post"]["requestBody"]["content"]) >= {"multipart/form-data", "image/png"}


@pytest.mark.parametrize(("setting", "clip_bytes", "pinned"), [
    ("auto", 600 << 20, 4 << 20),  # a ViT-B-sized CLIP: pinned before it loads
    ("auto", 12 << 20, None),  # the embedded model: glibc's default
    (0, 600 << 20, None),  # explicitly off
    (131072, 12 << 20, 131072),  # explicit bytes win
])
def test_start_up_pins_the_heap_for_a_large_clip(tmp_path, monkeypatch, setting, clip_bytes, pinned):
    import service.api.app as app_module

    calls = []
    monkeypatch.setattr(app_module, "clip_weights_bytes", lambda settings: clip_bytes)
    monkeypatch.setattr(app_module, "pin_mmap_threshold", lambda n: calls.append(n) or True)
    app, _ = _app(tmp_path, mmap_threshold=setting)
    with TestClient(app) as c:
        wait_ready(c)
    assert calls == ([pinned] if pinned else [])
