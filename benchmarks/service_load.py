"""Benchmark: the REST service against the in-process detector, and micro-batching on against off, in one run.

Every ratio it reports compares variants measured interleaved in the same run (this machine is shared: the load
moves within seconds, so figures measured one after the other are not comparable).

What it does:
1. Picks the model store (`--store`, default the repo's `model_store/`). When that holds no servable FNN model
   (`--model`, default `default`), it builds the tiny test model (tiny seeded CLIP + 3-epoch FNN) into a temp store
   and says so: numbers on the tiny model measure the service overhead, not a real model.
2. Latency, one client (`--latency-reps` pairs per heatmap mode in `--latency-heatmaps`): starts the real server
   (`python -m service.cli serve`, batching on, as shipped) and loads the same detector in this process (the
   server's loader: `load_detector(...).with_full_maps(False)`, same torch threads). Then alternates, in turns
   whose order flips each pair: one **in-process request from bytes** (`preprocess.decode_image` of the same JPEG
   with the server's pixel limits, then `Detector.detect` on it, and with a heatmap the answer's one map read at
   the image's size) and one HTTP POST /v1/detect of those bytes. Reports both p50s and their ratio.
3. Throughput (`--clients` > 0): starts a server with batching on and one with it off, and alternates between
   them in `--rounds` rounds (`--duration` seconds of load per mode in all): in each round every client (threads,
   one httpx connection each) posts the JPEG as fast as answers come back to one server, then to the other (the
   idle one waits). Reports requests/s, p50/p95/p99, errors, mean micro-batch size (/metrics), commits per request
   (the results store's transactions), RSS growth, and batched/unbatched throughput.
4. Ends with one `RESULT name=service_load ...` line, with the load average before and after.

The client threads run on the same machine as the server: on a small shared machine they take CPU from it, which
this benchmark does not hide (it reports what a client on the same host sees).

Usage: .venv/bin/python benchmarks/service_load.py [--store DIR] [--clients 8] [--duration 16] [--heatmap none]
       [--latency-heatmaps none,json] [--latency-reps 40] [--image 640x480] [--device auto] [--torch-threads 2]
"""
from __future__ import annotations

import argparse
import io
import os
import re
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

from _server import free_port, start_server, stop_server, wait_ready

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


def inprocess_detector(store: Path, name: str, device: str):
    """The detector exactly as the server loads it (`state.default_loader`)."""
    from service.detector import load_detector

    return load_detector(Settings(model_store=store, model_name=name, device=device)).with_full_maps(False)


def inprocess_from_bytes(det, body: bytes, heatmap: bool, settings: Settings) -> float:
    """Seconds for what the server does to answer, minus HTTP: decode the bytes (with the server's pixel limits),
    detect, and with a heatmap read the one map an answer uses at the image's size."""
    from service.preprocess import decode_image

    t = time.perf_counter()
    image = decode_image(body, settings.max_pixels, settings.max_heatmap_pixels).image
    found = det.detect([image], heatmap=heatmap)[0]
    if heatmap:
        found.heat[settings.default_score]
    if det.backend.device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter() - t


def load_avg() -> float:
    return os.getloadavg()[0]


# --- one server run ----------------------------------------------------------------------------------------------------------
class Run:
    def __init__(self, store: Path, name: str, device: str, batching: bool, workdir: Path, args: argparse.Namespace,
                 tag: str = ""):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        tag = tag or ("on" if batching else "off")
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
        self.proc = start_server(self.port, self.env, self.log)
        wait_ready(self.proc, self.url, self.log, timeout)

    def stop(self) -> None:
        stop_server(self.proc)

    def scrape(self) -> dict[str, float]:
        """Batch-size sum and count, GPU memory reserved (MB, or nan) from /metrics."""
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=10).text
        s = re.search(r"^zsad_batch_size_sum (\S+)$", text, re.M)
        c = re.search(r"^zsad_batch_size_count (\S+)$", text, re.M)
        g = re.search(r"^zsad_gpu_memory_reserved_bytes\{[^}]*\} (\S+)$", text, re.M)
        return {"batch_sum": float(s.group(1)) if s else 0.0, "batches": float(c.group(1)) if c else 0.0,
                "gpu_mb": float(g.group(1)) / 2**20 if g else float("nan")}


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


def latency_pairs(run: Run, det, body: bytes, heatmaps: list[str], reps: int) -> dict[str, dict[str, float]]:
    """Per heatmap mode: p50 of the in-process request from bytes and of the HTTP request, taken in alternating
    turns (the order flips each pair) so both see the same machine."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    settings = Settings()
    out: dict[str, dict[str, float]] = {}
    # The in-process requests run on one worker thread, as the server's model does (its inference thread): on this
    # machine the same call ran 2-5x slower on a process's main thread than on another thread.
    pool = ThreadPoolExecutor(1, thread_name_prefix="inproc")

    def inprocess(heat: bool) -> float:
        return pool.submit(inprocess_from_bytes, det, body, heat, settings).result()

    with pool, httpx.Client(base_url=run.url, timeout=60) as client:
        for mode in heatmaps:
            heat = mode != "none"
            params = {"heatmap": mode, "line": "bench"}

            def http(params: dict = params) -> float:
                t = time.perf_counter()
                r = client.post("/v1/detect", content=body, headers={"content-type": "image/jpeg"}, params=params)
                r.raise_for_status()
                return time.perf_counter() - t

            for _ in range(3):  # warm both sides for this mode
                http()
                inprocess(heat)
            inproc, via_http = [], []
            for i in range(reps):
                if i % 2:
                    via_http.append(http())
                    inproc.append(inprocess(heat))
                else:
                    inproc.append(inprocess(heat))
                    via_http.append(http())
            out[mode] = {"inproc_p50": pct(inproc, 50), "http_p50": pct(via_http, 50)}
    return out


def throughput(runs: dict[str, Run], body: bytes, params: dict, args: argparse.Namespace) -> dict[str, dict]:
    """Alternating rounds of load on each server; totals per server."""
    for run in runs.values():
        load(run.url, body, params, args.clients, args.warmup)
    acc = {tag: {"lat": [], "errors": 0, "elapsed": 0.0, "stages": [], "rss0": rss_mb(run.proc.pid),
                 "m0": run.scrape(), "c0": commits(run)} for tag, run in runs.items()}
    per_round = args.duration / args.rounds
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(list(runs)))
        for tag in order:
            lat, errors, elapsed, stages = load(runs[tag].url, body, params, args.clients, per_round)
            a = acc[tag]
            a["lat"] += lat
            a["errors"] += errors
            a["elapsed"] += elapsed
            a["stages"].append(stages)
    out = {}
    for tag, run in runs.items():
        a = acc[tag]
        m1 = run.scrape()
        batches = m1["batches"] - a["m0"]["batches"]
        lat = a["lat"]
        stages: dict[str, list[float]] = {}
        for d in a["stages"]:
            for k, v in d.items():
                stages.setdefault(k, []).append(v)
        out[tag] = {
            "rps": len(lat) / a["elapsed"], "p50": pct(lat, 50), "p95": pct(lat, 95), "p99": pct(lat, 99),
            "errors": a["errors"], "n": len(lat), "rss0": a["rss0"], "rss_growth": rss_mb(run.proc.pid) - a["rss0"],
            "mean_batch": (m1["batch_sum"] - a["m0"]["batch_sum"]) / batches if batches else float("nan"),
            "gpu_mb": m1["gpu_mb"], "stages": {k: float(np.median(v)) for k, v in stages.items()},
            "commits_per_request": (commits(run) - a["c0"]) / max(1, len(lat)),
        }
    return out


def commits(run: Run) -> int:
    """Transactions the server's results store has committed (`zsad_result_commits_total`)."""
    import httpx

    text = httpx.get(run.url + "/metrics", timeout=10).text
    m = re.search(r"^zsad_result_commits_total (\S+)$", text, re.M)
    return int(float(m.group(1))) if m else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", default=str(REPO / "model_store"), help="model store (default: the repo's model_store/)")
    p.add_argument("--model", default="default", help="FNN model name in the store")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--clients", type=int, default=8, help="clients of the throughput phase (0: skip it)")
    p.add_argument("--duration", type=float, default=16.0, help="seconds of load per mode (throughput phase)")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds the duration is split into")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring, per server")
    p.add_argument("--heatmap", choices=["none", "png", "json"], default="none", help="throughput phase")
    p.add_argument("--latency-heatmaps", default="none,json",
                   help="heatmap modes of the one-client latency phase, comma-separated (empty: skip it)")
    p.add_argument("--latency-reps", type=int, default=40, help="in-process/HTTP pairs per latency mode")
    p.add_argument("--image", default="640x480", help="test image WIDTHxHEIGHT")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--torch-threads", type=int, default=0,
                   help="ZSAD_TORCH_THREADS for the server and the in-process baseline (0: torch's default)")
    args = p.parse_args()

    load_start = load_avg()
    workdir = Path(tempfile.mkdtemp(prefix="zsad-service-load-"))
    store = Path(args.store)
    model_note = "store"
    if not servable(store, args.model):
        print(f"no servable model {args.model!r} in {store}: building the tiny test model into {workdir / 'store'}"
              " (numbers measure service overhead, not a real model)", flush=True)
        store = build_tiny_store(workdir / "store")
        args.model, model_note = "default", "tiny-test-model"
    width, height = (int(v) for v in args.image.lower().split("x"))
    body, _ = test_image(width, height)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    fields: dict[str, object] = {"model": model_note, "image": args.image,
                                 "torch_threads": args.torch_threads or "default"}

    modes = [m for m in args.latency_heatmaps.split(",") if m]
    if modes and args.latency_reps > 0:
        det = inprocess_detector(store, args.model, args.device)
        label = f"{det.name}@{det.version} ({det.backend.spec.label()}) on {det.backend.device}"
        fields["device"] = str(det.backend.device)
        print(f"model {label}; image {width}x{height} JPEG ({len(body)} bytes), "
              f"{det.tta_views} test-time view(s)", flush=True)
        run = Run(store, args.model, args.device, True, workdir, args, tag="latency")
        run.start()
        try:
            pairs = latency_pairs(run, det, body, modes, args.latency_reps)
        finally:
            run.stop()
        del det
        for mode, r in pairs.items():
            ratio = r["http_p50"] / r["inproc_p50"]
            print(f"one client, heatmap={mode}: in-process from bytes p50 {r['inproc_p50'] * 1000:.2f} ms, HTTP p50 "
                  f"{r['http_p50'] * 1000:.2f} ms, HTTP / in-process = {ratio:.3f} ({args.latency_reps} "
                  "interleaved pairs)", flush=True)
            fields.update({f"{mode}_inproc_p50_ms": r["inproc_p50"] * 1000, f"{mode}_http_p50_ms": r["http_p50"] * 1000,
                           f"{mode}_http_over_inproc_p50": ratio})
        import gc

        gc.collect()

    if args.clients > 0:
        params = {"heatmap": args.heatmap, "line": "bench"}
        runs = {"batched": Run(store, args.model, args.device, True, workdir, args),
                "unbatched": Run(store, args.model, args.device, False, workdir, args)}
        try:
            for run in runs.values():
                run.start()
            results = throughput(runs, body, params, args)
        finally:
            for run in runs.values():
                run.stop()
        fields.update({"clients": args.clients, "duration_s": args.duration, "rounds": args.rounds,
                       "heatmap": args.heatmap})
        for tag, r in results.items():
            print(f"{tag:>9}: {r['rps']:7.1f} req/s  p50 {r['p50'] * 1000:7.1f} ms  p95 {r['p95'] * 1000:7.1f} ms  "
                  f"p99 {r['p99'] * 1000:7.1f} ms  errors {r['errors']}  ok {r['n']}  mean batch {r['mean_batch']:.2f}  "
                  f"commits/request {r['commits_per_request']:.2f}  RSS {r['rss0']:.0f} MB "
                  f"(+{r['rss_growth']:.1f} MB during load)"
                  + (f"  GPU reserved {r['gpu_mb']:.0f} MB" if r["gpu_mb"] == r["gpu_mb"] else ""), flush=True)
            print(f"{'':>9}  server-side p50 ms by stage (median over rounds): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items()), flush=True)
            fields.update({
                f"{tag}_rps": r["rps"], f"{tag}_p50_ms": r["p50"] * 1000, f"{tag}_p95_ms": r["p95"] * 1000,
                f"{tag}_p99_ms": r["p99"] * 1000, f"{tag}_errors": r["errors"], f"{tag}_mean_batch": r["mean_batch"],
                f"{tag}_commits_per_request": r["commits_per_request"], f"{tag}_rss_growth_mb": r["rss_growth"],
            })
        if results["batched"]["gpu_mb"] == results["batched"]["gpu_mb"]:
            fields["gpu_reserved_mb"] = results["batched"]["gpu_mb"]
        fields["batching_speedup"] = results["batched"]["rps"] / results["unbatched"]["rps"]
        print(f"batched / unbatched throughput = {fields['batching_speedup']:.3f}", flush=True)
    fields["load_avg_start"] = load_start
    fields["load_avg_end"] = load_avg()
    text = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
    print(f"RESULT name=service_load {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
