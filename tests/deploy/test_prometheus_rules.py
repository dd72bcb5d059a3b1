"""Prometheus alert and recording rules (docker/prometheus/rules.yml) and their `promtool test rules` unit tests
(docker/prometheus/tests/*.yml).

promtool (Debian package `prometheus`, installed by .ci/run) checks the rules, runs the unit tests and checks the
compose stack's Prometheus config, which loads the rules; without it those tests skip. The structural checks need only
PyYAML: every alert has a severity and a summary and description, and a unit test that sees it fire and one that sees
it quiet; every metric and label the rules query is one the service exports.
"""
from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from .conftest import REPO, which

RULES = REPO / "docker" / "prometheus" / "rules.yml"
RULE_TESTS = sorted((REPO / "docker" / "prometheus" / "tests").glob("*.yml"))
PROMETHEUS_CONFIG = REPO / "docker" / "prometheus.yml"
SEVERITIES = {"critical", "warning", "info"}
PROMETHEUS_LABELS = {"instance", "job", "le", "__name__"}  # added by Prometheus, or the histogram bucket label
METRIC = re.compile(r"\bzsad_[a-zA-Z0-9_]+")
# Metrics and labels the rules use before the service exports them (none now: the SLO gauge of ZSAD_SLO_DETECT_P95_S
# and zsad_predictions_total's `calibrated` and `product` are exported and checked against the real scrape).
PENDING: dict[str, set[str]] = {}


def _promtool(*args: str) -> subprocess.CompletedProcess:
    binary = which("promtool")
    if binary is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; .ci/run installs it)")
    return subprocess.run([binary, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _alerts() -> dict[str, dict]:
    return {r["alert"]: r for r in _rules() if "alert" in r}


# --- promtool ---------------------------------------------------------------------------------------------------------
def test_rules_file_is_valid():
    r = _promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("path", RULE_TESTS, ids=lambda p: p.name)
def test_rule_unit_tests_pass(path):
    r = _promtool("test", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_prometheus_config_is_valid_and_loads_the_rules():
    r = _promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"\b1 rule files? found", r.stdout) and f"{len(_rules())} rules found" in r.stdout, r.stdout


def test_promtool_unit_tests_really_test(tmp_path):
    """Guard: a unit test with a wrong expectation fails, so a silent promtool cannot pass the tests above."""
    bad = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": 'zsad_model_ready{job="zsad", instance="a:8000"}', "values": "1x30"}],
            "alert_rule_test": [{"eval_time": "20m", "alertname": "ZsadModelNotReady",
                                 "exp_alerts": [{"exp_labels": {"severity": "critical", "job": "zsad",
                                                                "instance": "a:8000"}}]}],
        }],
    }
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(bad))
    r = _promtool("test", "rules", str(path))
    assert r.returncode != 0 and "ZsadModelNotReady" in r.stdout + r.stderr, r.stdout + r.stderr


# --- structure --------------------------------------------------------------------------------------------------------
def test_the_required_alerts_exist_with_severity_and_annotations():
    alerts = _alerts()
    required = {"ZsadModelNotReady", "ZsadMixedModelVersions", "ZsadQueueRejections", "ZsadDetectLatencyHigh",
                "ZsadAnomalyRateHigh", "ZsadUncalibratedProducts"}
    assert required <= set(alerts), required - set(alerts)
    for name, rule in alerts.items():
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary", "").strip() and annotations.get("description", "").strip(), name


def test_every_alert_is_tested_firing_and_quiet():
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text())
        assert "../rules.yml" in doc["rule_files"], f"{path.name} does not test docker/prometheus/rules.yml"
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    alerts = set(_alerts())
    assert not alerts - firing, f"no promtool test sees these alerts fire: {sorted(alerts - firing)}"
    assert not alerts - quiet, f"no promtool test sees these alerts stay quiet: {sorted(alerts - quiet)}"
    assert not (firing | quiet) - alerts, f"tests name alerts that do not exist: {sorted((firing | quiet) - alerts)}"


def test_the_latency_threshold_is_the_service_setting():
    expr = _alerts()["ZsadDetectLatencyHigh"]["expr"]
    assert "zsad_slo_detect_p95_seconds" in expr
    assert 'endpoint="/v1/detect"' in expr
    assert not re.search(r"[<>]=?\s*[0-9.]+\s*$", expr.strip()), "the threshold must not be a number in the rule"


def test_recording_rules_are_used():
    rules = _rules()
    recorded = {r["record"] for r in rules if "record" in r}
    used = " ".join(r["expr"] for r in rules if "alert" in r)
    tested = " ".join(case["expr"] for p in RULE_TESTS for t in yaml.safe_load(p.read_text())["tests"]
                      for case in t.get("promql_expr_test", []))
    for name in recorded:
        assert re.search(rf"{re.escape(name)}\b(?!:)", used + " " + tested), f"{name} is recorded but never used"


def test_every_metric_and_label_in_the_rules_is_exported(exported):
    problems = []
    for rule in _rules():
        name = rule.get("alert") or rule["record"]
        expr = rule["expr"]
        metrics = set(METRIC.findall(expr))
        for metric in metrics:
            if metric not in exported and metric not in PENDING:
                problems.append((name, metric))
        for metric, matchers in re.findall(r"(zsad_[a-zA-Z0-9_]+)\{([^}]*)\}", expr):
            known = exported.get(metric, set()) | PENDING.get(metric, set())
            for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers):
                if label not in PROMETHEUS_LABELS and label not in known:
                    problems.append((name, metric, label))
        known = set().union(*(exported.get(m, set()) | PENDING.get(m, set()) for m in metrics)) if metrics else set()
        for group in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr):
            for label in (x.strip() for x in group.split(",") if x.strip()):
                if label not in PROMETHEUS_LABELS and label not in known:
                    problems.append((name, "by/on", label))
    assert not problems, problems


def test_the_label_check_would_catch_a_typo(exported):
    """Guard: the patterns above find metric and label names in the rules' query style."""
    expr = 'sum by (lines) (rate(zsad_prediction_total{label="anomalous"}[1h]))'
    assert METRIC.findall(expr) == ["zsad_prediction_total"] and "zsad_prediction_total" not in exported
    assert re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr) == ["lines"]
    assert "lines" not in exported["zsad_predictions_total"] and "line" in exported["zsad_predictions_total"]
