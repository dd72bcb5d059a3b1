"""Heatmap resize to the original image: torch matmuls (current) vs the numpy matmuls they replaced, in one run.

    python benchmarks/map_resize.py [--reps 5]

Why it exists: `Geometry.to_original` did its two tiny matmuls in numpy. Right after a forward pass torch's OpenMP
threads still spin, and numpy's OpenBLAS threads fighting them for the cores made each map cost milliseconds.
This times `Detector.score` (scores + maps at the original size), each time right after `embed`, on ViT-B-16-plus-240 with random
weights, 240x280 inputs, fp32, with the current `to_original` and with the numpy one patched in, alternating, and
ends with one `RESULT` line (medians in ms; `x` = numpy / torch).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _random_clip import random_clip_spec
from PIL import Image

from service.clip_backend import load_clip
from service.detector import Detector
from service.fnn import FNN
from service.preprocess import Geometry
from service.prompts import Vocabulary
from service.settings import Settings


def numpy_to_original(self: Geometry, heat, fill: float = 0.0) -> np.ndarray:
    """The replaced implementation: the same bilinear matrices, multiplied in numpy."""
    arr = heat.detach().float().cpu().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat, np.float32)
    my, inside_y = self._axis_matrix(arr.shape[0], self.height, 1)
    mx, inside_x = self._axis_matrix(arr.shape[1], self.width, 0)
    out = (my @ arr) @ mx.T
    if not (inside_y.all() and inside_x.all()):
        out[~inside_y, :] = fill
        out[:, ~inside_x] = fill
    return out.astype(np.float32, copy=False)


def timed_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        backend = load_clip(random_clip_spec(tmp), tmp, device="cpu", precision="fp32")
        det = Detector(backend, FNN(backend.embed_dim), {"name": "random", "version": "v0"}, Vocabulary.load(),
                       Settings(model_store=Path(tmp), device="cpu"))
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 255, (240, 280, 3), dtype=np.uint8)) for _ in range(8)]
        current = Geometry.to_original
        out: dict[str, float] = {}
        for batch in (1, 8):
            embs = det.embed(images[:batch])
            ref = det.score(embs)
            Geometry.to_original = numpy_to_original
            try:
                old = det.score(embs)
            finally:
                Geometry.to_original = current
            diff = max(float(np.abs(a.heat[k] - b.heat[k]).max()) for a, b in zip(ref, old) for k in a.heat)
            t_torch, t_numpy = [], []
            for _ in range(args.reps):  # alternate; each score runs right after a forward pass, as in `detect`
                embs = det.embed(images[:batch])
                t_torch.append(timed_ms(lambda embs=embs: det.score(embs)))
                embs = det.embed(images[:batch])
                Geometry.to_original = numpy_to_original
                try:
                    t_numpy.append(timed_ms(lambda embs=embs: det.score(embs)))
                finally:
                    Geometry.to_original = current
            out[f"b{batch}_torch_ms"], out[f"b{batch}_numpy_ms"] = float(np.median(t_torch)), float(np.median(t_numpy))
            print(f"batch {batch}: Detector.score torch {out[f'b{batch}_torch_ms']:.1f} ms, numpy "
                  f"{out[f'b{batch}_numpy_ms']:.1f} ms (max map diff {diff:.1e})")
    print("RESULT name=map_resize " + " ".join(f"{k}={v:.1f}" for k, v in out.items())
          + f" x_b1={out['b1_numpy_ms'] / out['b1_torch_ms']:.1f} x_b8={out['b8_numpy_ms'] / out['b8_torch_ms']:.1f}")


if __name__ == "__main__":
    main()
