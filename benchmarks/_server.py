"""A real `zsad serve` subprocess for the benchmarks that measure the server (service_load, hostile_load,
fleet_rollout): a free port, start, wait until /readyz, stop.

Why one place: each benchmark had its own copy, and they had drifted (only one gave up at once when the model
failed to load; the others waited out their whole timeout).
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, env: dict[str, str], log: Path, log_level: str = "warning",
                 append: bool = False) -> subprocess.Popen:
    """`python -m service.cli serve` on 127.0.0.1:`port` with exactly `env`, its output in `log`."""
    out = open(log, "ab" if append else "wb")
    return subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", log_level], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 300.0) -> None:
    """Poll `url`/readyz until 200; raise at once when the process exits or reports its model `failed`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server {url} exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            r = httpx.get(url + "/readyz", timeout=2)
            if r.status_code == 200:
                return
            if r.json().get("status") == "failed":
                raise RuntimeError(f"server {url} not ready: {r.text}")
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server {url} not ready after {timeout} s")


def stop_server(proc: subprocess.Popen | None, timeout: float = 60.0) -> None:
    """SIGTERM (the service drains and exits), then SIGKILL after `timeout` s."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
