"""Benchmark: CPU time per image of the shipped CNN tower's forward, channels-first against channels-last input.

Why CPU time (`time.process_time`, one torch thread): this machine is shared, and wall time under load measures
the neighbours; the CPU time a forward takes on one thread is what the service's throughput is made of. Variants
alternate within each repetition; the median of `--reps` repetitions is reported per batch size.

Usage: .venv/bin/python benchmarks/cnn_layout.py [--store model_store] [--model default] [--batches 1,4,16]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.detector import load_detector
from service.preprocess import cnn_layout
from service.settings import Settings


def cpu_ms_per_image(model: torch.nn.Module, x: torch.Tensor, seconds: float) -> float:
    with torch.inference_mode():
        model.encode_image(x)
        t, n = time.process_time(), 0
        while time.process_time() - t < seconds:
            model.encode_image(x)
            n += 1
        return (time.process_time() - t) / n / x.shape[0] * 1000.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", default=str(REPO / "model_store"))
    p.add_argument("--model", default="default")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seconds", type=float, default=0.5, help="CPU seconds per measurement")
    args = p.parse_args()
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    det = load_detector(Settings(model_store=Path(args.store), model_name=args.model, device="cpu"))
    model, size = det.backend.model, det.backend.image_size
    print(f"model {det.name}@{det.version} ({det.backend.spec.label()}), input {size} px, one torch thread")
    fields: dict[str, float] = {}
    gen = torch.Generator().manual_seed(0)
    for b in (int(v) for v in args.batches.split(",")):
        x = torch.randn(b, 3, size, size, generator=gen)
        first, last = [], []
        for _ in range(args.reps):
            first.append(cpu_ms_per_image(model, x, args.seconds))
            last.append(cpu_ms_per_image(model, cnn_layout(x, model.visual), args.seconds))
        a, c = float(np.median(first)), float(np.median(last))
        print(f"batch {b:>3}: channels-first {a:.2f} ms/image, channels-last {c:.2f} ms/image (CPU), ratio {a / c:.3f}")
        fields.update({f"b{b}_nchw_ms": a, f"b{b}_nhwc_ms": c, f"b{b}_speedup": a / c})
    fields["load_avg_start"], fields["load_avg_end"] = load0, os.getloadavg()[0]
    print("RESULT name=cnn_layout " + " ".join(f"{k}={v:.3g}" for k, v in fields.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
