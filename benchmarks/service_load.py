"""Benchmark: the REST service under concurrent load, with dynamic micro-batching on and off, in one run.

What it does:
1. Picks the model store (`--store`, default the repo's `model_store/`). When that holds no servable FNN model
   (`--model`, default `default`), it builds the tiny test model (tiny seeded CLIP + 3-epoch FNN) into a temp store
   and says so: numbers on the tiny model measure the service overhead, not a real model.
2. In-process baseline: `load_detector` + `Detector.detect([image])` called directly on the decoded test image,
   `--inproc-reps` times after warm-up (no server running, so nothing competes for the cores); p50 is the baseline.
3. For batching on, then off: starts the real server (`python -m service.cli serve`, uvicorn, 127.0.0.1, free
   port) with its own results/threshold files, waits for /readyz, warms up, records the server's RSS, runs
   `--clients` concurrent clients (threads, one httpx connection each) for `--duration` seconds, each posting the
   same JPEG to /v1/detect as fast as answers come back, then records RSS again, the mean micro-batch size from
   /metrics, and stops the server with SIGTERM.
4. Prints throughput, p50/p95/p99 latency, errors, RSS growth and the ratio of HTTP p50 to in-process p50, and ends
   with one `RESULT name=service_load ...` line.

The client threads run on the same machine as the server: on a small shared machine they take CPU from it, which
this benchmark does not hide (it reports what a client on the same host sees).

Usage: .venv/bin/python benchmarks/service_load.py [--store DIR] [--clients 8] [--duration 15] [--heatmap none]
       [--image 640x480] [--device auto]
"""
from __future__ import annotations

import argparse
import io
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.settings import Settings
from service.store import ModelStore, StoreError


# --- model store ----------------------------------------------------------------------------------------------------
def servable(store: Path, name: str) -> bool:
    try:
        return ModelStore(store).manifest(name).get("kind") == "fnn"
    except (StoreError, OSError, ValueError):
        return False


def build_tiny_store(root: Path) -> Path:
    """The test suite's tiny model: a seeded tiny CLIP and a 3-epoch FNN on 200 random-word pairs."""
    from service.clip_backend import load_clip
    from service.fnn import FNNConfig
    from service.prompts import RandomWordConfig
    from service.train import TrainConfig, train_fnn_model
    from tests.conftest import publish_tiny_clip

    spec = publish_tiny_clip(root, "tiny-clip", "rn")
    backend = load_clip(spec, root, device="cpu", precision="fp32")
    cfg = TrainConfig(prompts=RandomWordConfig(n_pairs=200), fnn=FNNConfig(max_epochs=3))
    train_fnn_model(backend, cfg, ModelStore(root), name="default")
    return root


# --- test image -------------------------------------------------------------------------------------------------------
def test_image(width: int, height: int) -> tuple[bytes, Image.Image]:
    """A smooth, camera-like JPEG (gradients + blobs + mild noise) and its decoded RGB image."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 0.5 + 0.25 * np.sin(x / width * 6.0) * np.cos(y / height * 4.0)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(10, min(width, height) / 4)
        base += 0.2 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
    rgb = np.stack([base, base * 0.9, base * 0.8], axis=-1) + rng.normal(0, 0.02, (height, width, 3))
    arr = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    from service.preprocess import load_image

    return data, load_image(data)


# --- helpers ---------------------------------------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def rss_mb(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    m = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(m.group(1)) / 1024 if m else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inprocess_p50(store: Path, name: str, device: str, image: Image.Image, heatmap: bool, reps: int) -> tuple[float, str]:
    from service.detector import load_detector

    det = load_detector(Settings(model_store=store, model_name=name, device=device))
    for _ in range(3):
        det.detect([image], heatmap=heatmap)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        det.detect([image], heatmap=heatmap)
        if det.backend.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    label = f"{det.name}@{det.version} ({det.backend.spec.label()}) on {det.backend.device}"
    return pct(times, 50), label


# --- one server run ----------------------------------------------------------------------------------------------------------
class Run:
    def __init__(self, store: Path, name: str, device: str, batching: bool, workdir: Path, args: argparse.Namespace):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        tag = "on" if batching else "off"
        self.log = workdir / f"server-batching-{tag}.log"
        self.env = {
            **os.environ, "PYTHONUNBUFFERED": "1", "ZSAD_MODEL_STORE": str(store), "ZSAD_MODEL_NAME": name,
            "ZSAD_DEVICE": device, "ZSAD_BATCHING": "true" if batching else "false",
            "ZSAD_MAX_BATCH_SIZE": str(args.max_batch), "ZSAD_MAX_BATCH_WAIT_MS": str(args.max_wait_ms),
            "ZSAD_QUEUE_SIZE": str(max(64, 4 * args.clients)),
            "ZSAD_RESULTS_PATH": str(workdir / f"results-{tag}.sqlite"),
            "ZSAD_THRESHOLDS_PATH": str(workdir / "thresholds.json"), "ZSAD_KEEP_HEATMAPS": "false",
            "ZSAD_TORCH_THREADS": str(args.torch_threads),
        }
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> None:
        import httpx

        logf = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "warning"], cwd=REPO, env=self.env, stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                r = httpx.get(self.url + "/readyz", timeout=2)
                if r.status_code == 200:
                    return
                if r.json().get("status") == "failed":
                    raise RuntimeError(f"server not ready: {r.text}")
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def scrape(self) -> tuple[float, float]:
        """(mean micro-batch size, GPU memory reserved in MB or nan) from /metrics."""
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=10).text
        s = re.search(r"^zsad_batch_size_sum (\S+)$", text, re.M)
        c = re.search(r"^zsad_batch_size_count (\S+)$", text, re.M)
        g = re.search(r"^zsad_gpu_memory_reserved_bytes\{[^}]*\} (\S+)$", text, re.M)
        mean = float(s.group(1)) / float(c.group(1)) if s and c and float(c.group(1)) else float("nan")
        return mean, (float(g.group(1)) / 2**20 if g else float("nan"))


def load(url: str, body: bytes, params: dict, clients: int, seconds: float) -> tuple[list[float], int, float, dict]:
    import httpx

    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    stages: list[dict[str, list[float]]] = [{} for _ in range(clients)]  # server-side timings_ms per response
    start_evt = threading.Event()
    stop_at = [0.0]

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            start_evt.wait()
            while time.perf_counter() < stop_at[0]:
                t = time.perf_counter()
                try:
                    r = c.post("/v1/detect", content=body, headers={"content-type": "image/jpeg"}, params=params)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies[i].append(time.perf_counter() - t)
                    for stage, ms in r.json()["timings_ms"].items():
                        if ms is not None:
                            stages[i].setdefault(stage, []).append(ms)
                else:
                    errors[i] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    start_evt.set()
    for t in threads:
        t.join(seconds + 120)
    elapsed = time.perf_counter() - t0
    merged: dict[str, list[float]] = {}
    for d in stages:
        for stage, values in d.items():
            merged.setdefault(stage, []).extend(values)
    return [x for lat in latencies for x in lat], sum(errors), elapsed, {k: pct(v, 50) for k, v in merged.items()}


def run_mode(store: Path, name: str, device: str, batching: bool, workdir: Path, body: bytes, params: dict,
             args: argparse.Namespace) -> dict:
    run = Run(store, name, device, batching, workdir, args)
    t = time.perf_counter()
    run.start()
    startup = time.perf_counter() - t
    try:
        load(run.url, body, params, args.clients, args.warmup)
        rss0 = rss_mb(run.proc.pid)
        lat, errors, elapsed, stages = load(run.url, body, params, args.clients, args.duration)
        rss1 = rss_mb(run.proc.pid)
        mean_batch, gpu_mb = run.scrape()
    finally:
        run.stop()
    return {
        "rps": len(lat) / elapsed, "p50": pct(lat, 50), "p95": pct(lat, 95), "p99": pct(lat, 99), "errors": errors,
        "n": len(lat), "rss0": rss0, "rss_growth": rss1 - rss0, "mean_batch": mean_batch, "startup": startup,
        "gpu_mb": gpu_mb, "stages": stages,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", default=str(REPO / "model_store"), help="model store (default: the repo's model_store/)")
    p.add_argument("--model", default="default", help="FNN model name in the store")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=15.0, help="seconds of load per mode")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring, per mode")
    p.add_argument("--heatmap", choices=["none", "png", "json"], default="none")
    p.add_argument("--image", default="640x480", help="test image WIDTHxHEIGHT")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--inproc-reps", type=int, default=50)
    p.add_argument("--torch-threads", type=int, default=0,
                   help="ZSAD_TORCH_THREADS for the server and the in-process baseline (0: torch's default)")
    args = p.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="zsad-service-load-"))
    store = Path(args.store)
    model_note = "store"
    if not servable(store, args.model):
        print(f"no servable model {args.model!r} in {store}: building the tiny test model into {workdir / 'store'}"
              " (numbers measure service overhead, not a real model)", flush=True)
        store = build_tiny_store(workdir / "store")
        args.model, model_note = "default", "tiny-test-model"
    width, height = (int(v) for v in args.image.lower().split("x"))
    body, image = test_image(width, height)
    heat = args.heatmap != "none"
    params = {"heatmap": args.heatmap, "line": "bench"}

    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    inproc, label = inprocess_p50(store, args.model, args.device, image, heat, args.inproc_reps)
    print(f"model {label}; image {width}x{height} JPEG ({len(body)} bytes); heatmap={args.heatmap}")
    print(f"in-process Detector.detect p50: {inproc * 1000:.2f} ms ({args.inproc_reps} calls, batch of 1)")
    import gc

    gc.collect()

    results = {}
    for batching in (True, False):
        tag = "batched" if batching else "unbatched"
        r = run_mode(store, args.model, args.device, batching, workdir, body, params, args)
        results[tag] = r
        print(f"{tag:>9}: {r['rps']:7.1f} req/s  p50 {r['p50'] * 1000:7.1f} ms  p95 {r['p95'] * 1000:7.1f} ms  "
              f"p99 {r['p99'] * 1000:7.1f} ms  errors {r['errors']}  ok {r['n']}  mean batch {r['mean_batch']:.2f}  "
              f"RSS {r['rss0']:.0f} MB (+{r['rss_growth']:.1f} MB during load)  start-up {r['startup']:.1f} s  "
              f"HTTP p50 / in-process p50 = {r['p50'] / inproc:.2f}"
              + (f"  GPU reserved {r['gpu_mb']:.0f} MB" if r["gpu_mb"] == r["gpu_mb"] else ""), flush=True)
        print(f"{'':>9}  server-side p50 ms by stage: "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items()), flush=True)

    device = label.rsplit(" on ", 1)[1]
    fields = {
        "model": model_note, "device": device, "clients": args.clients, "duration_s": args.duration,
        "heatmap": args.heatmap, "image": args.image, "torch_threads": args.torch_threads or "default",
        "inproc_p50_ms": inproc * 1000,
    }
    for tag, r in results.items():
        fields.update({
            f"{tag}_rps": r["rps"], f"{tag}_p50_ms": r["p50"] * 1000, f"{tag}_p95_ms": r["p95"] * 1000,
            f"{tag}_p99_ms": r["p99"] * 1000, f"{tag}_errors": r["errors"], f"{tag}_mean_batch": r["mean_batch"],
            f"{tag}_rss_growth_mb": r["rss_growth"], f"{tag}_http_over_inproc_p50": r["p50"] / inproc,
        })
    if results["batched"]["gpu_mb"] == results["batched"]["gpu_mb"]:
        fields["gpu_reserved_mb"] = results["batched"]["gpu_mb"]
    fields["batching_speedup"] = results["batched"]["rps"] / results["unbatched"]["rps"]
    text = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
    print(f"RESULT name=service_load {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
