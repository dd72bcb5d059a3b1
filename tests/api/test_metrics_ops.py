"""What operators need from /metrics: the method label, process metrics, no `_created` twins, scrapes and probes left
out of the in-flight gauge, bounded `product` labels (allow-list or first seen) and the latency objective."""
from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.api.app import create_app

from .helpers import FakeDetector, image_bytes, make_settings, wait_ready

PNG = {"content-type": "image/png"}


def _client(tmp_path, **overrides) -> TestClient:
    settings = make_settings(tmp_path, tmp_path / "no-store", **overrides)
    det = FakeDetector()
    return TestClient(create_app(settings, loader=lambda s, name=None, version=None: det))


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(text: str, name: str, **labels: str) -> float | None:
    return _samples(text).get((name, tuple(sorted(labels.items()))))


def test_method_label_process_metrics_and_no_created_series(tmp_path):
    with _client(tmp_path) as c:
        wait_ready(c)
        assert c.put("/v1/thresholds/widget", json={"threshold": 0.4}).status_code == 200
        assert c.get("/v1/thresholds/widget").status_code == 200
        assert c.get("/v1/thresholds/widget").status_code == 200
        assert c.delete("/v1/thresholds/widget").status_code == 204
        assert c.request("FOO", "/nowhere").status_code in (404, 405)
        text = c.get("/metrics").text
    ep = "/v1/thresholds/{product}"
    assert _value(text, "zsad_requests_total", endpoint=ep, method="GET", status="200") == 2
    assert _value(text, "zsad_requests_total", endpoint=ep, method="PUT", status="200") == 1
    assert _value(text, "zsad_requests_total", endpoint=ep, method="DELETE", status="204") == 1
    assert _value(text, "zsad_request_duration_seconds_count", endpoint=ep, method="GET") == 2
    # a client's made-up method does not become a label value
    assert {dict(k[1]).get("method") for k in _samples(text) if k[0] == "zsad_requests_total"} <= {
        "GET", "PUT", "DELETE", "POST", "other"}
    names = {k[0] for k in _samples(text)}
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds", "python_info"} <= names
    assert not [n for n in names if n.endswith("_created")], sorted(n for n in names if n.endswith("_created"))
    assert "_created" not in text


def test_scrapes_and_probes_are_not_in_flight_but_are_counted(tmp_path):
    with _client(tmp_path) as c:
        wait_ready(c)
        for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
            assert c.get(path).status_code == 200, path
        text = c.get("/metrics").text
        assert _value(text, "zsad_inflight_requests") == 0.0  # the scrape itself is not in flight
        text = c.get("/metrics").text
    assert _value(text, "zsad_requests_total", endpoint="/metrics", method="GET", status="200") == 1
    assert _value(text, "zsad_requests_total", endpoint="/v2/health/ready", method="GET", status="200") == 1


def _predictions(text: str) -> dict[tuple[str, str, str, str], float]:
    out = {}
    for (name, labels), v in _samples(text).items():
        if name == "zsad_predictions_total":
            d = dict(labels)
            out[(d["line"], d["product"], d["label"], d["calibrated"])] = v
    return out


def test_product_label_is_bounded_first_seen(tmp_path):
    with _client(tmp_path, metrics_max_products=2, slo_detect_p95_s=0.25) as c:
        wait_ready(c)
        for product in ("a", "b", "c", "d", "a", None):
            params = {"line": "L1", **({"product": product} if product else {})}
            assert c.post("/v1/detect", content=image_bytes(), headers=PNG, params=params).status_code == 200
        text = c.get("/metrics").text
    assert _predictions(text) == {("L1", "a", "normal", "false"): 2, ("L1", "b", "normal", "false"): 1,
                                  ("L1", "other", "normal", "false"): 2, ("L1", "none", "normal", "false"): 1}
    assert _value(text, "zsad_slo_detect_p95_seconds") == 0.25


def test_allow_lists_make_the_label_sets_independent_of_traffic_order(tmp_path):
    seen = []
    for i, order in enumerate((("x", "b"), ("b", "x"))):
        with _client(tmp_path / str(i), metrics_products=["b", "c"], metrics_lines=["L2"], metrics_max_products=1) as c:
            wait_ready(c)
            for product in order:
                for line in ("L1", "L2"):
                    r = c.post("/v1/detect", content=image_bytes(), headers=PNG, params={"product": product, "line": line})
                    assert r.status_code == 200
            seen.append(_predictions(c.get("/metrics").text))
    assert seen[0] == seen[1] == {("other", "b", "normal", "false"): 1, ("L2", "b", "normal", "false"): 1,
                                  ("other", "other", "normal", "false"): 1, ("L2", "other", "normal", "false"): 1}
