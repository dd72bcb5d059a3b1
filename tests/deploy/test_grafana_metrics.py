"""Every metric (and label) the Grafana dashboard queries is one the service really exports.

The exported names come from a real `/metrics` scrape of an app serving a tiny real model after a detection with a
`line` and a model reload (labelled series only appear once observed), plus the GPU-memory gauges, which the service exports only on a
CUDA device: those are collected through the same collector with torch.cuda's memory counters stubbed.
"""
from __future__ import annotations

import json
import re
import time
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import REPO, png_bytes

DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "zsad.json"
PROMETHEUS_LABELS = {"instance", "job", "le", "__name__"}  # added by Prometheus, or the histogram bucket label
METRIC = re.compile(r"\bzsad_[a-zA-Z0-9_]+")


def _samples(text: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


@pytest.fixture(scope="module")
def exported(deploy_store, tmp_path_factory) -> dict[str, set[str]]:
    """sample name -> label names, as scraped from the service."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.api.metrics import Metrics
    from service.settings import Settings

    tmp = tmp_path_factory.mktemp("metrics-app")
    settings = Settings(model_store=deploy_store, device="cpu", precision="fp32", results_path=tmp / "r.sqlite",
                        thresholds_path=tmp / "t.json", max_batch_wait_ms=2.0)
    with TestClient(create_app(settings)) as client:
        deadline = time.time() + 120
        while client.get("/readyz").status_code != 200:
            assert time.time() < deadline, client.get("/readyz").text
            time.sleep(0.05)
        r = client.post("/v1/detect", files={"file": ("a.png", png_bytes(0), "image/png")},
                        data={"line": "line-1", "product": "widget", "heatmap": "png"})
        assert r.status_code == 200, r.text
        r = client.post("/v1/models/reload", json={})  # zsad_model_reloads_total{outcome} appears with a reload
        assert r.status_code == 200, r.text
        scrape = client.get("/metrics")
        assert scrape.status_code == 200
        names = _samples(scrape.text)

    import torch

    fake_cuda = SimpleNamespace(type="cuda", __str__=lambda self: "cuda:0")
    gpu = Metrics(device_fn=lambda: fake_cuda)
    mp = pytest.MonkeyPatch()
    try:
        for fn in ("memory_allocated", "memory_reserved", "max_memory_allocated"):
            mp.setattr(torch.cuda, fn, lambda device=None: 1024)
        gpu_names = {k: v for k, v in _samples(generate_latest(gpu.registry).decode()).items()
                     if k.startswith("zsad_gpu_")}
    finally:
        mp.undo()
    assert gpu_names, "the GPU collector exported nothing"
    names.update(gpu_names)
    return names


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
