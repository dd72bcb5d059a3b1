"""Every metric (and label) the Grafana dashboard queries is one the service really exports (the `exported` fixture in
conftest.py: a real `/metrics` scrape), and the panels show what operators need: traffic without health checks,
scrapes and dashboard polling, and detect latency apart from batch latency.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from .conftest import REPO, which

DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "zsad.json"
PROMETHEUS_LABELS = {"instance", "job", "le", "__name__"}  # added by Prometheus, or the histogram bucket label
METRIC = re.compile(r"\bzsad_[a-zA-Z0-9_]+")


def _queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for p in dashboard["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    for var in dashboard["templating"]["list"]:
        q = var["query"]
        out.append((f"${var['name']}", q["query"] if isinstance(q, dict) else q))
    return out


def test_dashboard_covers_the_required_views():
    used = {m for _, q in _queries() for m in METRIC.findall(q)}
    required = {
        "zsad_requests_total",                      # request rate
        "zsad_request_duration_seconds_bucket",     # p95 latency
        "zsad_predictions_total",                   # anomaly rate per line
        "zsad_image_score_bucket",                  # score distribution
        "zsad_queue_wait_seconds_bucket",           # queue wait
        "zsad_model_info",                          # model version
    }
    assert required <= used, required - used
    titles = " ".join(t for t, _ in _queries()).lower()
    for word in ("request rate", "latency", "anomaly rate per line", "score distribution", "queue wait",
                 "model version"):
        assert word in titles, word


def test_promtool_check_metrics_is_clean_on_a_real_scrape(scrape):
    """promtool's linter (naming, units, help texts) on what the service really exports; no `_created` twins."""
    binary = which("promtool")
    if binary is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; .ci/run installs it)")
    r = subprocess.run([binary, "check", "metrics"], input=scrape, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
    assert "_created" not in scrape and "process_resident_memory_bytes" in scrape


def test_every_metric_in_the_dashboard_is_exported(exported):
    missing = sorted({(title, m) for title, q in _queries() for m in METRIC.findall(q) if m not in exported})
    assert not missing, f"queried but not exported: {missing}; exported: {sorted(exported)}"


def test_every_label_in_the_dashboard_exists_on_its_metric(exported):
    problems = []
    for title, q in _queries():
        for metric, matchers in re.findall(r"(zsad_[a-zA-Z0-9_]+)\{([^}]*)\}", q):
            for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers):
                if label not in PROMETHEUS_LABELS and label not in exported.get(metric, set()):
                    problems.append((title, metric, label))
        metrics = set(METRIC.findall(q))
        for group in re.findall(r"\bby\s*\(([^)]*)\)", q):
            for label in (x.strip() for x in group.split(",") if x.strip()):
                if label not in PROMETHEUS_LABELS and not any(label in exported.get(m, set()) for m in metrics):
                    problems.append((title, "by", label))
        for fn, arg in re.findall(r"label_values\((zsad_[a-zA-Z0-9_]+),\s*(\w+)\)", q):
            if arg not in PROMETHEUS_LABELS and arg not in exported.get(fn, set()):
                problems.append((title, fn, arg))
    assert not problems, problems


def test_the_checks_above_would_catch_a_typo(exported):
    """Guard: the patterns find names and labels in this dashboard's query style."""
    q = 'sum by (lines) (rate(zsad_prediction_total{line=~"$line"}[5m]))'
    assert METRIC.findall(q) == ["zsad_prediction_total"] and "zsad_prediction_total" not in exported
    assert "lines" not in exported["zsad_predictions_total"] and "line" in exported["zsad_predictions_total"]


# --- what the traffic and latency panels show -------------------------------------------------------------------------
# Not client traffic: health checks, scrapes, the built-in dashboard's page and its polling (GET-only route templates).
NOT_TRAFFIC = {"/metrics", "/healthz", "/readyz", "/v1/results", "/v1/stats", "/v1/models", "/v1/thresholds"}
NOT_TRAFFIC_PREFIXES = ("/v2/health/", "/dashboard")


def _routes() -> list[tuple[str, set[str]]]:
    """(route template, methods) of every route of the app (its `endpoint` label values)."""
    from fastapi.routing import APIRoute
    from starlette.routing import Route

    from service.api.app import create_app
    from service.settings import Settings

    tmp = Path(tempfile.mkdtemp())
    try:
        app = create_app(Settings(model_store=tmp / "empty", device="cpu", results_path=tmp / "r.sqlite",
                                  thresholds_path=tmp / "t.json"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out: list[tuple[str, set[str]]] = []

    def walk(routes):
        for r in routes:
            if isinstance(r, (APIRoute, Route)):
                out.append((r.path, set(r.methods or ())))
            for inner in (getattr(r, "routes", None), getattr(getattr(r, "original_router", None), "routes", None)):
                if inner:
                    walk(inner)

    walk(app.routes)
    assert {"/v1/detect", "/v1/detect/batch", "/metrics", "/dashboard"} <= {p for p, _ in out}, out
    return out


def _endpoint_exclusion(expr: str) -> re.Pattern:
    found = re.findall(r'endpoint!~"([^"]+)"', expr)
    assert len(found) == 1, f"no single endpoint!~ exclusion in {expr}"
    return re.compile(found[0])  # PromQL regex matchers are anchored: use fullmatch


def _traffic_queries() -> list[tuple[str, str]]:
    return [(t, q) for t, q in _queries() if "request rate" in t.lower() and "zsad_requests_total" in q]


def test_traffic_panels_exclude_health_checks_scrapes_and_dashboard_polling():
    queries = _traffic_queries()
    assert len(queries) >= 2, "the request-rate stat and the per-endpoint panel"
    polled = set(re.findall(r"""\bapi\(\s*'(/[^'?]+)""", (REPO / "service/api/static/dashboard.js").read_text()))
    assert {"/v1/results", "/v1/stats", "/v1/models", "/v1/thresholds"} <= polled, polled
    routes = _routes()
    for title, q in queries:
        exclusion = _endpoint_exclusion(q)
        for path, methods in routes:
            expected = path in NOT_TRAFFIC or path.startswith(NOT_TRAFFIC_PREFIXES)
            assert bool(exclusion.fullmatch(path)) == expected, (title, path)
            if methods - {"GET", "HEAD"}:
                assert not exclusion.fullmatch(path), f"{title}: excludes {path}, which clients call with {methods}"
        for path in polled:
            assert exclusion.fullmatch(path), f"{title}: counts the built-in dashboard's polling of {path}"
        assert not exclusion.fullmatch("unmatched"), "requests to unknown paths are client traffic"


def test_detect_and_batch_latency_have_their_own_panels():
    dashboard = json.loads(DASHBOARD.read_text())
    by_endpoint: dict[str, list[str]] = {}
    for p in dashboard["panels"]:
        exprs = [t["expr"] for t in p.get("targets", []) if "zsad_request_duration_seconds_bucket" in t["expr"]]
        for expr in exprs:
            endpoints = re.findall(r'endpoint\s*(=~|!~|!=|=)\s*"([^"]*)"', expr)
            assert [op for op, _ in endpoints] == ["="], f"{p['title']}: one endpoint per latency query: {expr}"
        panel_endpoints = {re.search(r'endpoint="([^"]*)"', e).group(1) for e in exprs}
        assert len(panel_endpoints) <= 1, f"{p['title']} mixes {panel_endpoints}"
        if panel_endpoints and p["type"] == "timeseries":
            by_endpoint.setdefault(panel_endpoints.pop(), []).append(p["title"])
    assert set(by_endpoint) == {"/v1/detect", "/v1/detect/batch"}, by_endpoint
    for endpoint, titles in by_endpoint.items():
        assert len(titles) == 1 and endpoint in titles[0] and "latency" in titles[0].lower(), titles
