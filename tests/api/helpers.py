"""Test helpers for the API: settings in a temp dir, a controllable fake detector, image bytes, a uvicorn runner."""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def make_settings(tmp: Path, store: Path, **overrides: Any) -> Settings:
    base = dict(
        model_store=store, device="cpu", precision="fp32", results_path=tmp / "results.sqlite",
        thresholds_path=tmp / "thresholds.json", max_batch_wait_ms=2.0, request_timeout_s=30.0,
    )
    base.update(overrides)
    return Settings(**base)


def wait_ready(client, timeout: float = 60.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = client.get("/readyz")
        body = r.json()
        if r.status_code == 200 or body.get("status") == "failed":
            return body
        time.sleep(0.02)
    raise TimeoutError("service did not become ready")


# --- images -------------------------------------------------------------------------------------------------------------
def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (64, 48), mode: str = "RGB", seed: int = 0, **save: Any) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 4096, (h, w)).astype(np.uint16))  # 16-bit grey ("I;16")
    else:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        im = Image.fromarray(arr, "RGB")
        if mode != "RGB":
            im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return buf.getvalue()


# --- a fake detector ---------------------------------------------------------------------------------------------------------
@dataclass
class _Spec:
    name: str = "fake-clip"

    def label(self) -> str:
        return self.name


@dataclass
class _Backend:
    device: Any = "cpu"
    image_size: int = 32
    spec: _Spec = field(default_factory=_Spec)


class FakeDetector:
    """Same surface as `service.detector.Detector`; score = mean brightness. `gate` (an Event) blocks `detect`."""

    def __init__(self, version: str = "v1", gate: threading.Event | None = None, manifest: dict | None = None):
        from service.detector import Detection

        self._Detection = Detection
        self.manifest = {"name": "default", "version": version, "kind": "fnn", **(manifest or {})}
        self.backend = _Backend()
        self.gate = gate
        self.calls: list[int] = []
        self.entered = threading.Event()

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def tta_views(self) -> int:
        return int(self.manifest.get("tta", {}).get("views", 1))

    @property
    def window_scales(self) -> tuple[int, ...]:
        return tuple(self.manifest.get("windows", {}).get("scales", (2, 3)))

    def detect(self, images, object_name=None, heatmap=True, timings=None):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        self.calls.append(len(images))
        t = timings if timings is not None else {}
        t["preprocess"] = t.get("preprocess", 0.0) + 0.0001
        t["embed"] = t.get("embed", 0.0) + 0.0002
        out = []
        for im in images:
            arr = np.asarray(im, dtype=np.float32) / 255.0
            s = float(arr.mean())
            det = self._Detection({"fnn": s, "prompt": 1 - s, "combined": 0.5}, im.size)
            if heatmap:
                heat = arr.mean(axis=2).astype(np.float32)
                for k in ("fnn", "prompt", "combined"):
                    det.heat[k] = heat
                    det.grid[k] = heat[::8, ::8].copy()
            out.append(det)
        return out


# --- a real server in a subprocess ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m service.cli serve` (or `command`) on 127.0.0.1 and a free port, environment from `env`."""

    def __init__(self, env: dict[str, str], log_path: Path, command: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.log_path = log_path
        self.command = command or [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1",
                                   "--port", str(self.port), "--log-level", "warning"]
        self.proc: subprocess.Popen | None = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def start(self, timeout: float = 90.0) -> Server:
        import httpx

        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command, cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
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

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else None
