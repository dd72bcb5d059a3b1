"""Benchmark: a CNN tower's global embedding with the attention pool run for its one output token, against the
module's forward and the previous one-token pool, on the shipped CLIP.

open_clip's `AttentionPool2d` queries every token of the final map and projects every token's output, then keeps the
first; `ClipBackend.encode_image` runs `cnn_tower.resnet_global` instead: only that token's query and output, with
the keys and values folded into the query (`attnpool_first_token`). `projected` is the one-token pool before that
fold (every token's key and value projected), kept here as the second baseline.
Measured: CPU time per image of the tower (`time.process_time`, one torch thread, channels-last input as served,
the variants alternating within each repetition) at 4 images (a request's test-time views) and 16; the largest
difference of the embeddings (fp32); and a zero-shot request without heatmap (`Detector.detect`, `--threads` torch
threads, wall p50, the variants interleaved), the baselines being the same detector with the other forwards.

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
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from cnn_layout import cpu_ms_per_image

from service.clip_backend import ClipBackend
from service.detector import load_detector
from service.preprocess import cnn_layout
from service.settings import Settings


def projected_first_token(pool, fmap: torch.Tensor) -> torch.Tensor:
    """The one-token pool before the keys and values were folded into the query (`attnpool_first_token` now): only
    the first token's query and output, but every token's key and value projected."""
    b, c, h, w = fmap.shape
    heads = pool.num_heads
    x = fmap.reshape(b, c, h * w).transpose(1, 2)
    x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + pool.positional_embedding.to(x.dtype)
    q = F.linear(x[:, :1], pool.q_proj.weight, pool.q_proj.bias)
    k = F.linear(x, pool.k_proj.weight, pool.k_proj.bias)
    v = F.linear(x, pool.v_proj.weight, pool.v_proj.bias)
    o = F.scaled_dot_product_attention(*(t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v)))
    return F.linear(o.reshape(b, c), pool.c_proj.weight, pool.c_proj.bias)


class ProjectedForward:
    """The second baseline: the tower, then `projected_first_token`, then the same finish."""

    def __init__(self, backend: ClipBackend):
        self.backend = backend

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        v = self.backend.model.visual
        with torch.inference_mode():
            x = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(pixels)))))
            return self.backend.finish_image(projected_first_token(v.attnpool, x))


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
    baseline, projected = ModuleForward(backend), ProjectedForward(backend)
    fields: dict[str, float] = {}
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    for b in (int(v) for v in args.batches.split(",")):
        x = cnn_layout(torch.randn(b, 3, backend.image_size, backend.image_size, generator=gen), visual)
        diff = float((backend.encode_image(x) - baseline.encode_image(x)).abs().max())
        ms: dict[str, list[float]] = {"module": [], "projected": [], "one_token": []}
        for _ in range(args.reps):
            for name, variant in (("module", baseline), ("projected", projected), ("one_token", backend)):
                ms[name].append(cpu_ms_per_image(variant, x, args.seconds))
        a, pr, c = (float(np.median(ms[k])) for k in ("module", "projected", "one_token"))
        print(f"batch {b:>3}: module pool {a:.2f} ms/image, projected one-token pool {pr:.2f}, one-token pool "
              f"{c:.2f} ms/image (CPU), speed-up {a / c:.3f} (over projected {pr / c:.3f}), max difference {diff:.1e}")
        fields.update({f"b{b}_module_ms": a, f"b{b}_projected_ms": pr, f"b{b}_one_token_ms": c,
                       f"b{b}_speedup": a / c, f"b{b}_speedup_over_projected": pr / c, f"b{b}_maxdiff": diff})

    torch.set_num_threads(args.threads)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    shipped = type(backend).encode_image
    forwards = {"module": baseline.encode_image, "projected": projected.encode_image,
                "one_token": shipped.__get__(backend)}
    times: dict[str, list[float]] = {k: [] for k in forwards}

    def request(variant: str) -> None:
        backend.encode_image = forwards[variant]
        t = time.perf_counter()
        det.detect([image], heatmap=False)
        times[variant].append(time.perf_counter() - t)

    for _ in range(5):  # warm-up: anchors, packed weights
        for k in forwards:
            request(k)
    times = {k: [] for k in forwards}
    for _ in range(args.requests):
        for k in forwards:
            request(k)
    del backend.encode_image
    m, pr, o = (statistics.median(times[k]) * 1000 for k in ("module", "projected", "one_token"))
    print(f"zero-shot request without heatmap, {args.threads} threads: module pool p50 {m:.1f} ms, projected one-token "
          f"pool {pr:.1f} ms, one-token pool {o:.1f} ms, speed-up {m / o:.3f} (over projected {pr / o:.3f})")
    fields.update({"request_module_p50_ms": m, "request_projected_p50_ms": pr, "request_one_token_p50_ms": o,
                   "request_speedup": m / o, "request_speedup_over_projected": pr / o})
    fields["load_avg_start"], fields["load_avg_end"] = load0, os.getloadavg()[0]
    print("RESULT name=global_pool " + " ".join(f"{k}={v:.3g}" for k, v in fields.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
