"""Benchmark: a CNN tower's global embedding with the attention pool run for its one output token, against the
module's forward, on the shipped CLIP.

open_clip's `AttentionPool2d` queries every token of the final map and projects every token's output, then keeps the
first; `ClipBackend.encode_image` runs `cnn_tower.resnet_global` instead (only that token's query and output).
Measured: CPU time per image of the tower (`time.process_time`, one torch thread, channels-last input as served,
the two alternating within each repetition) at 4 images (a request's test-time views) and 16; the largest
difference of the embeddings (fp32); and a zero-shot request without heatmap (`Detector.detect`, `--threads` torch
threads, wall p50, the two interleaved), the baseline being the same detector with the module's forward.

Usage: .venv/bin/python benchmarks/global_pool.py [--store model_store] [--batches 4,16] [--reps 5] [--requests 40]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from cnn_layout import cpu_ms_per_image

from service.clip_backend import ClipBackend
from service.detector import load_detector
from service.preprocess import cnn_layout
from service.settings import Settings


class ModuleForward:
    """The baseline: open_clip's own forward (every token through the pool), then the same finish."""

    def __init__(self, backend: ClipBackend):
        self.backend = backend

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.backend.finish_image(self.backend.model.encode_image(pixels))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", default=str(REPO / "model_store"))
    p.add_argument("--batches", default="4,16", help="images per forward (a request's 4 test-time views: 4)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seconds", type=float, default=0.5, help="CPU seconds per measurement")
    p.add_argument("--requests", type=int, default=40, help="zero-shot requests per variant (interleaved)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the request timing")
    args = p.parse_args()
    load0 = os.getloadavg()[0]
    det = load_detector(Settings(model_store=Path(args.store), device="cpu", precision="fp32"))
    backend = det.backend
    visual = backend.model.visual
    if not hasattr(visual, "attnpool"):
        raise SystemExit("the model's image tower is not a CNN tower (no attention pool)")
    baseline = ModuleForward(backend)
    fields: dict[str, float] = {}
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    for b in (int(v) for v in args.batches.split(",")):
        x = cnn_layout(torch.randn(b, 3, backend.image_size, backend.image_size, generator=gen), visual)
        diff = float((backend.encode_image(x) - baseline.encode_image(x)).abs().max())
        before, after = [], []
        for _ in range(args.reps):
            before.append(cpu_ms_per_image(baseline, x, args.seconds))
            after.append(cpu_ms_per_image(backend, x, args.seconds))
        a, c = float(np.median(before)), float(np.median(after))
        print(f"batch {b:>3}: module pool {a:.2f} ms/image, one-token pool {c:.2f} ms/image (CPU), speed-up "
              f"{a / c:.3f}, max difference {diff:.1e}")
        fields.update({f"b{b}_module_ms": a, f"b{b}_one_token_ms": c, f"b{b}_speedup": a / c, f"b{b}_maxdiff": diff})

    torch.set_num_threads(args.threads)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    shipped = type(backend).encode_image
    times: dict[str, list[float]] = {"module": [], "one_token": []}

    def request(variant: str) -> None:
        backend.encode_image = baseline.encode_image if variant == "module" else shipped.__get__(backend)
        t = time.perf_counter()
        det.detect([image], heatmap=False)
        times[variant].append(time.perf_counter() - t)

    for _ in range(5):  # warm-up: anchors, packed weights
        request("module"), request("one_token")
    times = {"module": [], "one_token": []}
    for _ in range(args.requests):
        request("module")
        request("one_token")
    del backend.encode_image
    m, o = (statistics.median(times[k]) * 1000 for k in ("module", "one_token"))
    print(f"zero-shot request without heatmap, {args.threads} threads: module pool p50 {m:.1f} ms, one-token pool "
          f"{o:.1f} ms, speed-up {m / o:.3f}")
    fields.update({"request_module_p50_ms": m, "request_one_token_p50_ms": o, "request_speedup": m / o})
    fields["load_avg_start"], fields["load_avg_end"] = load0, os.getloadavg()[0]
    print("RESULT name=global_pool " + " ".join(f"{k}={v:.3g}" for k, v in fields.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
