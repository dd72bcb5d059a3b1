"""Does pinning glibc's mmap threshold (`service/heap.py`, done at the service's start-up) cost request latency?

    PYTHONPATH=. python benchmarks/heap_pin.py [--store model_store] [--rounds 4] [--reps 20] [--threads 2]

Pinned, every block of the threshold's size or more is a fresh mmap (page faults on first touch) instead of a heap block reused
from the previous request. Each round runs two fresh child processes, one pinned and one not (glibc's default),
each timing `Detector.detect` on one 640x480 image of the shipped model: p50 over `--reps` calls without a heatmap
and with one. Rounds alternate the order, so load from other processes hits both alike. Ends with
`RESULT name=heap_pin ... none_ratio=<pinned/default p50> heatmap_ratio=...` (≈ 1: no cost).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(store: str, pinned: bool, reps: int, threads: int, threshold: int) -> dict[str, float]:
    import numpy as np
    import torch
    from PIL import Image

    from service.detector import load_detector
    from service.heap import pin_mmap_threshold
    from service.settings import Settings

    if pinned:
        assert pin_mmap_threshold(threshold), "glibc did not take the threshold"
    torch.set_num_threads(threads)
    det = load_detector(Settings(model_store=Path(store), device="cpu"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    out = {}
    for name, heatmap in (("none", False), ("heatmap", True)):
        for _ in range(3):
            det.detect([image], heatmap=heatmap)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            found = det.detect([image], heatmap=heatmap)[0]
            if heatmap:
                found.heat["combined"]  # the answer's map at the image's size
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times) * 1000
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="model_store")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--threshold", type=int, default=None, help="bytes (default: service.heap.LARGE_MODEL_MMAP_THRESHOLD)")
    ap.add_argument("--child", choices=["pinned", "default"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    from service.heap import LARGE_MODEL_MMAP_THRESHOLD

    threshold = args.threshold or LARGE_MODEL_MMAP_THRESHOLD
    if args.child:
        print(json.dumps(child(args.store, args.child == "pinned", args.reps, args.threads, threshold)))
        return
    runs: dict[str, list[dict[str, float]]] = {"pinned": [], "default": []}
    for r in range(args.rounds):
        for mode in (("pinned", "default") if r % 2 == 0 else ("default", "pinned")):
            cmd = [sys.executable, __file__, "--store", args.store, "--reps", str(args.reps), "--threads",
                   str(args.threads), "--threshold", str(threshold), "--child", mode]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r} {mode}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in runs[mode][-1].items()), flush=True)
    p50 = {m: {k: statistics.median(x[k] for x in v) for k in ("none", "heatmap")} for m, v in runs.items()}
    print(f"RESULT name=heap_pin threshold={threshold} "
          + " ".join(f"{m}_{k}_ms={v:.1f}" for m, d in p50.items() for k, v in d.items())
          + f" none_ratio={p50['pinned']['none'] / p50['default']['none']:.2f}"
          + f" heatmap_ratio={p50['pinned']['heatmap'] / p50['default']['heatmap']:.2f}")


if __name__ == "__main__":
    main()
