"""Benchmark: latency of Open Inference Protocol (v2) inference with the real Triton client, JSON and binary, against
POST /v1/detect, on one client, the same image, in one run.

What it does:
1. Picks the model store (`--store`, default the repo's `model_store/`, i.e. the shipped `default@v3`); when it holds
   no servable model it builds the tiny test model into a temp store and says so (then the numbers are service
   overhead on a tiny model).
2. Starts the real server (`python -m service.cli serve`, uvicorn on 127.0.0.1) with its own results and thresholds
   files, and waits for /readyz.
3. One client, sequential requests, the same 640x480 JPEG, `heatmap` off: `/v1/detect` with httpx (raw image
   body), `tritonclient.http.InferenceServerClient.infer` with the image as base64 in JSON (outputs requested as
   JSON) and as raw bytes with the binary tensor extension (binary outputs). The three are interleaved, one request
   each per round in a rotating order, so drifting load on a shared machine hits them alike. Warm-up rounds first.
4. Checks that the three give the same score (to 1e-6), and reads the server-side mean request duration per
   endpoint from /metrics (what the server spends, without the client libraries).
5. Prints p50/p95 per mode and the ratios of the OIP p50s to /v1/detect's (target: <= 1.1), ending with one
   `RESULT name=oip_latency ...` line.

Usage: .venv/bin/python benchmarks/oip_latency.py [--store DIR] [--rounds 200] [--warmup 20] [--torch-threads 1]
"""
from __future__ import annotations

import argparse
import base64
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.service_load import build_tiny_store, pct, servable, test_image
from tests.api.helpers import Server

TARGET = 1.1
MODES = ("v1", "json", "binary")


def server_means(text: str) -> dict[str, float]:
    """Mean server-side request duration (ms) per endpoint template, from the /metrics histogram."""
    out = {}
    for endpoint in ("/v1/detect", "/v2/models/{model_name}/infer"):
        pat = 'zsad_request_duration_seconds_{}{{endpoint="{}",method="POST"}} (\\S+)'
        s = re.search(pat.format("sum", re.escape(endpoint)), text)
        c = re.search(pat.format("count", re.escape(endpoint)), text)
        out[endpoint] = 1000 * float(s.group(1)) / float(c.group(1)) if s and c else float("nan")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=REPO / "model_store")
    ap.add_argument("--model", default="default")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--image", default="640x480")
    args = ap.parse_args()

    import httpx
    import tritonclient.http as triton

    work = Path(tempfile.mkdtemp(prefix="oip-latency-"))
    store = args.store
    if not servable(store, args.model):
        print(f"no servable model {args.model!r} in {store}: building the tiny test model (service overhead only)")
        store, args.model = build_tiny_store(work / "store"), "default"
    width, height = (int(v) for v in args.image.split("x"))
    jpeg, _ = test_image(width, height)
    env = {"ZSAD_MODEL_STORE": str(store), "ZSAD_MODEL_NAME": args.model, "ZSAD_DEVICE": args.device,
           "ZSAD_RESULTS_PATH": str(work / "results.sqlite"), "ZSAD_THRESHOLDS_PATH": str(work / "thresholds.json"),
           "ZSAD_KEEP_HEATMAPS": "false", "ZSAD_TORCH_THREADS": str(args.torch_threads)}
    server = Server(env, work / "server.log").start(timeout=300)
    try:
        http = httpx.Client(base_url=server.url, timeout=60)
        client = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
        model = client.get_model_metadata("zsad")
        b64 = np.array([base64.b64encode(jpeg).decode()], dtype=object)
        raw = np.array([jpeg], dtype=object)
        json_out = [triton.InferRequestedOutput(n, binary_data=False) for n in ("score", "label", "threshold")]

        def v1() -> float:
            r = http.post("/v1/detect", content=jpeg, headers={"content-type": "image/jpeg"})
            r.raise_for_status()
            return float(r.json()["score"])

        def oip_json() -> float:
            tensor = triton.InferInput("image", [1], "BYTES")
            tensor.set_data_from_numpy(b64, binary_data=False)
            return float(client.infer("zsad", [tensor], outputs=json_out).as_numpy("score")[0])

        def oip_binary() -> float:
            tensor = triton.InferInput("image", [1], "BYTES")
            tensor.set_data_from_numpy(raw, binary_data=True)
            return float(client.infer("zsad", [tensor]).as_numpy("score")[0])

        calls = {"v1": v1, "json": oip_json, "binary": oip_binary}
        times: dict[str, list[float]] = {m: [] for m in MODES}
        scores: dict[str, set[float]] = {m: set() for m in MODES}
        for i in range(args.warmup + args.rounds):
            order = MODES[i % 3:] + MODES[: i % 3]
            for mode in order:
                t = time.perf_counter()
                score = calls[mode]()
                elapsed = time.perf_counter() - t
                if i >= args.warmup:
                    times[mode].append(elapsed)
                    scores[mode].add(score)
        means = server_means(http.get("/metrics").text)
        client.close()
        http.close()
    finally:
        server.stop()

    every = [s for m in MODES for s in scores[m]]
    spread = max(every) - min(every)
    p50 = {m: 1000 * pct(times[m], 50) for m in MODES}
    p95 = {m: 1000 * pct(times[m], 95) for m in MODES}
    print(f"model {args.model}@{model['versions'][0]} from {store}, {width}x{height} JPEG ({len(jpeg)} bytes), "
          f"{args.rounds} rounds after {args.warmup} warm-up, torch threads {args.torch_threads}")
    for m in MODES:
        print(f"  {m:7s} p50 {p50[m]:7.2f} ms  p95 {p95[m]:7.2f} ms")
    ratio_json, ratio_binary = p50["json"] / p50["v1"], p50["binary"] / p50["v1"]
    print(f"  p50 ratio to /v1/detect: json {ratio_json:.3f}, binary {ratio_binary:.3f} (target <= {TARGET})")
    print(f"  server-side mean: /v1/detect {means['/v1/detect']:.2f} ms, "
          f"/v2 infer {means['/v2/models/{model_name}/infer']:.2f} ms (json and binary together)")
    print(f"  score spread across all calls: {spread:.2e} (must be <= 1e-6)")
    ok = ratio_json <= TARGET and ratio_binary <= TARGET and spread <= 1e-6
    print(f"RESULT name=oip_latency v1_p50_ms={p50['v1']:.2f} json_p50_ms={p50['json']:.2f} "
          f"binary_p50_ms={p50['binary']:.2f} json_ratio={ratio_json:.3f} binary_ratio={ratio_binary:.3f} "
          f"server_v1_mean_ms={means['/v1/detect']:.2f} server_v2_mean_ms={means['/v2/models/{model_name}/infer']:.2f} "
          f"score_spread={spread:.1e} target={TARGET} pass={str(ok).lower()}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
