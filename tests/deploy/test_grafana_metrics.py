"""Every metric (and label) the Grafana dashboard queries is one the service really exports (the `exported` fixture in
conftest.py: a real `/metrics` scrape), and the panels show what operators need: traffic without health checks,
scrapes and dashboard polling, and detect latency apart from batch latency.
"""
from __future__ import annotations

import json
import re

from .conftest import REPO

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
