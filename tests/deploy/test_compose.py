"""docker-compose.yml (+ the GPU override), Prometheus' scrape config and rules mount, Grafana's provisioning, and the
closed-by-default promises: no Grafana default password, API keys from Docker secrets, ports on 127.0.0.1.

`docker-compose config` (Debian's `docker-compose`, installed by .ci/run) validates the files against the Compose
schema without a Docker engine; without the binary that part skips. The structural checks need only PyYAML.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import posixpath
import re
import subprocess
import tempfile

import pytest
import yaml

from .conftest import REPO, known_zsad_var, which

COMPOSE = REPO / "docker-compose.yml"
GPU = REPO / "docker-compose.gpu.yml"
PROMETHEUS = REPO / "docker" / "prometheus.yml"
GRAFANA = REPO / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "zsad.json"


SECRET_SETTINGS = ("api_keys_read", "api_keys_admin")  # Settings fields read from /run/secrets/zsad_<field>


@functools.lru_cache(maxsize=1)
def _empty_env_file() -> str:
    """An empty `--env-file`, so a developer's .env next to the compose file cannot change what is tested."""
    fd, path = tempfile.mkstemp(suffix=".env")
    os.close(fd)
    atexit.register(os.unlink, path)
    return path


def _compose(*files, args=("config",), env=None) -> subprocess.CompletedProcess:
    """`docker-compose -f ... config`, with no ZSAD_/GRAFANA_/... variables and no .env file from the caller's
    environment; GRAFANA_ADMIN_PASSWORD is set unless `env` says otherwise (None removes it)."""
    binary = which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed (Debian package docker-compose; .ci/run installs it)")
    cmd = [binary, "--env-file", _empty_env_file()]
    for f in files:
        cmd += ["-f", str(f)]
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("ZSAD_", "COMPOSE_", "DOCKER_", "GRAFANA_", "PROMETHEUS_"))}
    full["GRAFANA_ADMIN_PASSWORD"] = "test-password"
    for k, v in (env or {}).items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    return subprocess.run([*cmd, *args], cwd=REPO, env=full, capture_output=True, text=True, timeout=120)


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


def test_grafana_needs_an_admin_password():
    r = _compose(COMPOSE, args=("config", "-q"), env={"GRAFANA_ADMIN_PASSWORD": None})
    assert r.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in r.stderr, r.stdout + r.stderr
    r = _compose(COMPOSE, env={"GRAFANA_ADMIN_PASSWORD": "s3cret"})
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret"


def _published(config: dict) -> dict[str, list[tuple[str, str, str]]]:
    """service -> its published ports as (host ip, host port, container port), from `config` output: short strings
    (`127.0.0.1:8000:8000/tcp`, docker-compose 1.x) or the long syntax (Compose v2)."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    for name, svc in config["services"].items():
        ports = []
        for p in svc.get("ports", []):
            if isinstance(p, dict):
                ports.append((p.get("host_ip", ""), str(p.get("published", "")), str(p["target"])))
            else:
                parts = str(p).split("/")[0].split(":")
                ports.append(("" if len(parts) < 3 else parts[0], parts[-2] if len(parts) > 1 else "", parts[-1]))
        out[name] = ports
    return out


def test_published_ports_listen_on_localhost_unless_asked():
    closed = _published(yaml.safe_load(_compose(COMPOSE).stdout))
    assert {"zsad", "prometheus", "grafana"} <= {name for name, ports in closed.items() if ports}
    for name, ports in closed.items():
        for port in ports:
            assert port[0] == "127.0.0.1", (name, port)
    opened_env = {"ZSAD_BIND": "0.0.0.0", "ZSAD_HTTP_PORT": "8080"}
    opened = _published(yaml.safe_load(_compose(COMPOSE, env=opened_env).stdout))
    assert opened["zsad"] == [("0.0.0.0", "8080", "8000")]
    assert all(p[0] == "127.0.0.1" for p in opened["prometheus"] + opened["grafana"])


def test_api_keys_come_from_docker_secrets():
    r = _compose(COMPOSE)
    assert r.returncode == 0, r.stderr
    config = yaml.safe_load(r.stdout)
    zsad = config["services"]["zsad"]
    # a relative target is a file in /run/secrets (Compose v2 may print it absolute)
    targets = {posixpath.join("/run/secrets", s["target"]): s["source"] for s in zsad["secrets"]}
    for field in SECRET_SETTINGS:
        path = f"/run/secrets/zsad_{field}"  # pydantic-settings: a file named after the env variable, lower case
        assert path in targets, f"{path} is not mounted"
        assert config["secrets"][targets[path]]["file"] == str(REPO / "secrets" / f"zsad_{field}")
        assert f"ZSAD_{field.upper()}" not in zsad.get("environment", {}), "an environment variable would win"
    assert "/secrets/" in (REPO / ".gitignore").read_text().split(), "key files must stay out of git"


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


def test_secret_files_are_read_by_the_settings(tmp_path, monkeypatch):
    """The compose secrets' names and format (a JSON list) are what Settings reads from a secrets directory."""
    from service.settings import Settings

    for field in SECRET_SETTINGS:
        monkeypatch.delenv(f"ZSAD_{field.upper()}", raising=False)
    (tmp_path / "zsad_api_keys_read").write_text('["read-1", "read-2"]\n')
    (tmp_path / "zsad_api_keys_admin").write_text('["admin-1"]\n')
    settings = Settings(_secrets_dir=tmp_path)
    assert settings.api_keys_read == ["read-1", "read-2"] and settings.api_keys_admin == ["admin-1"]
    secrets = _load(COMPOSE)["secrets"]
    assert {v["file"] for v in secrets.values()} == {f"./secrets/zsad_{f}" for f in SECRET_SETTINGS}


def test_grafana_has_no_default_password():
    env = _load(COMPOSE)["services"]["grafana"]["environment"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", env["GF_SECURITY_ADMIN_PASSWORD"]), env


def test_prometheus_loads_the_mounted_rules():
    prom = _load(PROMETHEUS)
    volumes = _load(COMPOSE)["services"]["prometheus"]["volumes"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in volumes}
    config_in_container = mounts["./docker/prometheus.yml"]
    rules_in_container = mounts["./docker/prometheus/rules.yml"]
    assert any(v.startswith("./docker/prometheus/rules.yml:") and v.endswith(":ro") for v in volumes)
    # rule_files resolve against the config file's folder, in the container and in the repository alike
    resolved = [posixpath.normpath(posixpath.join(posixpath.dirname(config_in_container), f))
                for f in prom["rule_files"]]
    assert rules_in_container in resolved, (resolved, rules_in_container)
    assert any((PROMETHEUS.parent / f).resolve() == REPO / "docker" / "prometheus" / "rules.yml"
               for f in prom["rule_files"])


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
