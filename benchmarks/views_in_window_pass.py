"""Benchmark: a heatmap (or few-shot) request whose test-time views share the window pass's backbone forward, against
the same request with the views in a forward of their own (the baseline, as before).

`Detector.embed(heatmap=True)` on a CNN tower with 4 views runs one forward of 4 images (`_views_in_window_pass`)
instead of a forward of 1 for the windows and another of 3 for the views: batch 1 uses the convolutions least
efficiently. Measured in process on the shipped model, one image per call, wall p50 with `--threads` torch threads,
the two variants interleaved: `Detector.detect(heatmap=True)` (zero-shot, map made) and `Detector.detect(heatmap=False,
memory=...)` with a 16-shot dense memory (the few-shot request, which needs the window pass), each also against
the zero-shot request without heatmap (`Detector.detect(heatmap=False)`, unchanged), so the few-shot cost ratio of
`benchmarks/fewshot.py` can be read for both variants.

With `--batches`, also heatmap detection of B images at once (a micro-batch), the views in their own grouped
forwards against all of them in the window pass's forward regardless of `tta.CPU_WINDOW_PASS_IMAGES` (ms per image):
where the shared forward stops paying is where that cap belongs.

Usage: .venv/bin/python benchmarks/views_in_window_pass.py [--store model_store] [--repeats 40] [--threads 2]
                                                          [--batches 4,6,8] [--batch-repeats 12]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _product_sets import write_set

from service.detector import Detector, load_detector
from service.evaluation.readers import list_images
from service.fewshot import build_memory, model_ref
from service.preprocess import load_image
from service.settings import Settings
from service.tta import dihedral_views


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", default=str(REPO / "model_store"))
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--batches", default="", help="micro-batch sizes for the heatmap comparison, e.g. 4,6,8")
    p.add_argument("--batch-repeats", type=int, default=12)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    det = load_detector(Settings(model_store=Path(args.store), device="cpu", reference_dense=True))
    if det.tta_views < 2:
        raise SystemExit("the model serves one view: nothing to share")
    with tempfile.TemporaryDirectory(prefix="zsad-views-") as tmp:
        write_set(Path(tmp), "product", ("widget",), 1919, args.shots, 1, 1)
        train = [load_image(q) for q in sorted(list_images(Path(tmp) / "widget" / "train" / "good"))]
        query = [load_image(sorted(list_images(Path(tmp) / "widget" / "test" / "good"))[0])]
    memory = build_memory(det.embed(train, heatmap=True), model_ref(det), det.settings.window_stride,
                          det.settings.reference_max_rows, dense=True)
    shared = Detector._views_in_window_pass
    calls = {"zero": lambda: det.detect(query, heatmap=False),
             "heatmap": lambda: det.detect(query, heatmap=True),
             "few_shot": lambda: det.detect(query, heatmap=False, memory=memory)}
    times: dict[str, list[float]] = {f"{k}_{v}": [] for k in calls for v in ("own", "shared")}

    def run(name: str, variant: str) -> None:
        Detector._views_in_window_pass = shared if variant == "shared" else (lambda self, pixels: None)
        t = time.perf_counter()
        calls[name]()
        times[f"{name}_{variant}"].append(time.perf_counter() - t)

    for _ in range(3):  # warm-up
        for name in calls:
            run(name, "own"), run(name, "shared")
    times = {k: [] for k in times}
    for _ in range(args.repeats):
        for name in calls:
            run(name, "own")
            run(name, "shared")
    Detector._views_in_window_pass = shared
    p50 = {k: statistics.median(v) * 1000 for k, v in times.items()}
    zero = (p50["zero_own"] + p50["zero_shared"]) / 2  # the same code path in both variants
    fields = {**{f"{k}_ms": v for k, v in p50.items()},
              "heatmap_speedup": p50["heatmap_own"] / p50["heatmap_shared"],
              "few_shot_speedup": p50["few_shot_own"] / p50["few_shot_shared"],
              "few_shot_ratio_own": p50["few_shot_own"] / zero, "few_shot_ratio_shared": p50["few_shot_shared"] / zero}
    for name in calls:
        print(f"{name:>8}: views in their own forward {p50[name + '_own']:.1f} ms, shared {p50[name + '_shared']:.1f} ms")
    print(f"few-shot ({args.shots} shots) over zero-shot: {fields['few_shot_ratio_own']:.2f} -> "
          f"{fields['few_shot_ratio_shared']:.2f}")
    fields["load_avg_start"], fields["load_avg_end"] = load0, os.getloadavg()[0]
    for b in (int(v) for v in args.batches.split(",") if v):
        images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (256, 256, 3), dtype=np.uint8))
                  for i in range(b)]
        per: dict[str, list[float]] = {"own": [], "all": []}
        for rep in range(args.batch_repeats + 2):  # two warm-up rounds
            for variant in ("own", "all"):
                Detector._views_in_window_pass = ((lambda self, px: None) if variant == "own" else
                                                  (lambda self, px: torch.cat(dihedral_views(px, self.tta_views)[1:])))
                t = time.perf_counter()
                det.detect(images, heatmap=True)
                if rep >= 2:
                    per[variant].append((time.perf_counter() - t) / b)
        Detector._views_in_window_pass = shared
        own, every = (statistics.median(per[k]) * 1000 for k in ("own", "all"))
        print(f"batch {b}: views in their own forwards {own:.1f} ms/image, all in the window pass ({b * det.tta_views} "
              f"images) {every:.1f} ms/image")
        fields.update({f"b{b}_own_ms": own, f"b{b}_all_ms": every})
    print("RESULT name=views_in_window_pass " + " ".join(f"{k}={v:.3g}" for k, v in fields.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
