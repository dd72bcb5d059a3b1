"""CPU latency of one request without heatmap for two default-model versions, interleaved in one run.

    python benchmarks/embedded_latency.py --versions v3,v4 [--store model_store] [--threads 2] [--reps 40]

In process (`Detector.detect([image], heatmap=False)`, no HTTP), one 640x480 render of a held-out kind per call,
the versions taking turns so load drifts hit both alike. The issue-18 budget is p50 <= 30 ms on 2 cores. Each
version runs with its manifest's test-time views, and also with `--views` (default 1) for comparison.
Ends with `RESULT name=embedded_latency ...`.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from service.detector import load_detector
from service.settings import Settings
from service.synthetic.world import KINDS, render, sample_scene, seeded_rng


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="model_store")
    ap.add_argument("--name", default="default")
    ap.add_argument("--versions", default="v3,v4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--views", type=int, default=1, help="a second setting per version (ZSAD_TTA_VIEWS)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    img = render(sample_scene(seeded_rng(7, 99, KINDS.index("pill")), kind="pill"), 96)[0]
    image = Image.fromarray(img).resize((640, 480))
    detectors = {}
    for v in args.versions.split(","):
        detectors[f"{v}"] = load_detector(Settings(model_store=args.store, device="cpu"), args.name, v)
        detectors[f"{v}_views{args.views}"] = load_detector(
            Settings(model_store=args.store, device="cpu", tta_views=args.views), args.name, v)
    times: dict[str, list[float]] = {k: [] for k in detectors}
    for det in detectors.values():
        for _ in range(3):
            det.detect([image], heatmap=False)
    for _ in range(args.reps):
        for k, det in detectors.items():
            t = time.perf_counter()
            det.detect([image], heatmap=False)
            times[k].append((time.perf_counter() - t) * 1000)
    p50 = {k: float(np.median(v)) for k, v in times.items()}
    for k, det in detectors.items():
        print(f"{k:14s} p50 {p50[k]:6.1f} ms  p90 {np.quantile(times[k], 0.9):6.1f} ms  "
              f"(input {det.backend.image_size} px)")
    print("RESULT name=embedded_latency " + " ".join(f"{k}_p50_ms={v:.1f}" for k, v in p50.items())
          + f" threads={args.threads} reps={args.reps}")


if __name__ == "__main__":
    main()
