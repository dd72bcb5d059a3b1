"""docker-compose.yml (+ the GPU override), Prometheus' scrape config and Grafana's provisioning.

`docker-compose config` (Debian's `docker-compose`, installed by .ci/run) validates the files against the Compose
schema without a Docker engine; without the binary that part skips. The structural checks need only PyYAML.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from .conftest import REPO, known_zsad_var, which

COMPOSE = REPO / "docker-compose.yml"
GPU = REPO / "docker-compose.gpu.yml"
PROMETHEUS = REPO / "docker" / "prometheus.yml"
GRAFANA = REPO / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "zsad.json"


def _compose(*files, args=("config",)) -> subprocess.CompletedProcess:
    binary = which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed (Debian package docker-compose; .ci/run installs it)")
    cmd = [binary]
    for f in files:
        cmd += ["-f", str(f)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZSAD_", "COMPOSE_", "DOCKER_"))}
    return subprocess.run([*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


# --- schema validation by docker-compose ----------------------------------------------------------------------------------
@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, GPU)], ids=["cpu", "gpu-override"])
def test_compose_files_validate(files):
    r = _compose(*files, args=("config", "-q"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_gpu_override_reserves_an_nvidia_gpu_and_builds_the_cuda_variant():
    r = _compose(COMPOSE, GPU)
    assert r.returncode == 0, r.stderr
    zsad = yaml.safe_load(r.stdout)["services"]["zsad"]
    assert zsad["build"]["args"]["VARIANT"] == "cuda"
    devices = zsad["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert int(devices[0]["count"]) >= 1
    # ... and the plain file stays CPU-only
    plain = yaml.safe_load(_compose(COMPOSE).stdout)["services"]["zsad"]
    assert plain["build"]["args"]["VARIANT"] == "cpu" and "deploy" not in plain


# --- structure (PyYAML only) -----------------------------------------------------------------------------------------------
def _load(path):
    return yaml.safe_load(path.read_text())


def test_compose_services_volumes_and_settings():
    doc = _load(COMPOSE)
    services = doc["services"]
    assert {"zsad", "prometheus", "grafana"} <= set(services)
    zsad = services["zsad"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in zsad["volumes"]}
    assert mounts["/models"] in doc["volumes"], "a named volume for the model store"
    assert mounts["/data"] in doc["volumes"], "a named volume for the results store"
    env = zsad["environment"]
    assert env["ZSAD_RESULTS_PATH"].startswith("/data/") and env["ZSAD_THRESHOLDS_PATH"].startswith("/data/")
    for name in env:
        if name.startswith("ZSAD_"):
            assert known_zsad_var(name), f"compose sets {name}, which nothing reads"
    assert any(p.endswith(":8000") for p in zsad["ports"])
    assert "/readyz" in (REPO / "docker" / "healthcheck.py").read_text()
    assert zsad["healthcheck"]["test"][-1] == "/usr/local/lib/zsad/healthcheck.py"
    # every bind-mounted file or folder exists in the repo
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (REPO / src).exists(), src


def test_prometheus_scrapes_every_zsad_replica():
    prom = _load(PROMETHEUS)
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "zsad")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    sd = job["dns_sd_configs"][0]
    assert sd["names"] == ["zsad"] and sd["type"] == "A"  # one A record per container of the compose service
    assert sd["port"] == 8000
    assert "zsad" in _load(COMPOSE)["services"]


def test_metrics_need_no_api_key(tmp_path):
    """Prometheus scrapes without credentials even when the API has keys."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.settings import Settings

    settings = Settings(model_store=tmp_path / "empty", device="cpu", results_path=tmp_path / "r.sqlite",
                        thresholds_path=tmp_path / "t.json", api_keys_read=["k"])
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/stats").status_code == 401
        r = client.get("/metrics")
        assert r.status_code == 200 and "zsad_model_ready" in r.text


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard():
    ds = _load(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    prom = [d for d in ds if d["type"] == "prometheus"]
    assert len(prom) == 1 and prom[0]["url"] == "http://prometheus:9090"
    uid = prom[0]["uid"]
    providers = _load(GRAFANA / "provisioning" / "dashboards" / "zsad.yml")["providers"]
    compose = _load(COMPOSE)["services"]["grafana"]["volumes"]
    dash_mount = next(v.split(":")[1] for v in compose if v.startswith("./docker/grafana/dashboards"))
    assert providers[0]["options"]["path"] == dash_mount
    assert any(v.startswith("./docker/grafana/provisioning:/etc/grafana/provisioning") for v in compose)

    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == uid and p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid and t["expr"].strip(), p["title"]
    for var in dashboard["templating"]["list"]:
        assert var["datasource"]["uid"] == uid
