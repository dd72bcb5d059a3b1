"""Benchmark: peak resident memory of a process serving ViT-B-16-plus-240 heatmaps at batch 8, fp32 and bf16.

Each case runs in a fresh subprocess (peak RSS is per process and never goes down) and reports the kernel's VmHWM
(= ru_maxrss) at three points: after the model is loaded, after the prompt anchors, and after serving. Serving is
what the service does per batch: `Detector.detect` of 8 images (640 x 480) with heatmaps on a detector with
`full_maps=False`, then for each image its default score's map, `localise` (mask + regions) and the overlay PNG.

Cases, in one run (seeded random weights, written once as safetensors, as `_random_clip.py` does):
* `before`: main's behaviour before #17: the model built on the CPU with random fp32 init, weights loaded by
  `open_clip.load_checkpoint`, then cast to the serving precision; the text tower kept; oneDNN weights pre-packed.
* `after`: this code, with glibc's mmap threshold chosen as the service's start-up chooses it from
  `ZSAD_MMAP_THRESHOLD` (`--mmap-threshold`, default `auto`: pinned at 4 MB for a CLIP this large; `0`: glibc's
  default; `service/heap.py`): `load_clip(text_tower=False)` (weights read tensor by tensor
  into the serving precision), anchors computed with the text tower loaded on demand, cached next to the model, and
  the tower released.
* `after_cached`: `after` restarted with the anchors already cached: the text tower is never loaded.

Usage: PYTHONPATH=. .venv/bin/python benchmarks/memory.py [--batch 8] [--threads 2] [--cases before,after,...]
Ends with `RESULT name=memory ...` (MB = 2^20 bytes; targets: bf16 <= 1.5 GB, fp32 <= 2.0 GB for `after`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

ARCH = "ViT-B-16-plus-240"
TARGET_MB = {"bf16": 1500.0, "fp32": 2000.0}  # the 1.5 / 2.0 GB, in the MB (2^20 bytes) printed here


def vm_status() -> dict[str, float]:
    """VmHWM (peak) and VmRSS (now) of this process in MB, from /proc (the same peak as ru_maxrss)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) / 1024
    return out


def _before_backend(weights: Path, precision: str):
    """The CLIP exactly as main's `load_clip` built it before #17 (random fp32 init on the CPU, load_checkpoint,
    cast), text tower included."""
    import logging

    import open_clip
    import torch

    from service.clip_backend import ClipBackend, ClipSpec
    from service.constants import CLIP_MEAN, CLIP_STD
    from service.tokenizer import build_tokenizer

    logging.getLogger().setLevel(logging.ERROR)
    model = open_clip.create_model(ARCH, pretrained=None, load_weights=False, precision="fp32", device="cpu").eval()
    open_clip.load_checkpoint(model, str(weights), strict=True, weights_only=True)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    if dtype != torch.float32:
        model = model.to(dtype)
    return ClipBackend(model=model, tokenizer=build_tokenizer(None, ARCH), spec=ClipSpec("file", ARCH, path=str(weights)),
                       device=torch.device("cpu"), dtype=dtype, image_size=240, mean=CLIP_MEAN, std=CLIP_STD,
                       embed_dim=int(model.text_projection.shape[1]))


def run_case(case: str, precision: str, weights: Path, cache_dir: Path, batch: int, threads: int,
             mmap_threshold: int | str = "auto") -> dict:
    """One case in this (fresh) process; returns its figures."""
    import numpy as np
    import torch
    from PIL import Image

    torch.set_num_threads(threads)
    with contextlib.suppress(PermissionError):
        os.nice(-10)  # the machine is shared: as root, keep this case's share of the CPU (memory is not timed)
    from service import fast_transformer
    from service.anchor_cache import AnchorCache
    from service.clip_backend import ClipSpec, load_clip
    from service.detector import Detector
    from service.fnn import FNN
    from service.heatmap import localise, min_area_pixels, overlay_png
    from service.prompts import Vocabulary
    from service.settings import Settings

    t0 = time.perf_counter()
    threshold = 0  # glibc's mmap threshold pinned in this case (0: glibc's adaptive default)
    if case == "before":
        fast_transformer.PREPACK_WEIGHTS = True  # main's setting
        backend = _before_backend(weights, precision)
        settings = Settings(text_tower="keep", precision=precision)
        cache = None
    else:
        from service.heap import mmap_threshold_for, pin_mmap_threshold

        threshold = mmap_threshold_for(mmap_threshold, weights.stat().st_size)  # as the service's start-up decides
        if threshold and not pin_mmap_threshold(threshold):
            threshold = 0  # glibc did not take it (another C library)
        settings = Settings(text_tower="release", precision=precision, mmap_threshold=mmap_threshold)
        backend = load_clip(ClipSpec("file", ARCH, path=str(weights)), cache_dir, device="cpu", precision=precision,
                            text_tower=False)
        cache = AnchorCache(cache_dir / "anchors")
    torch.manual_seed(0)
    fnn = FNN(backend.embed_dim).eval()
    det = Detector(backend, fnn, {"name": "bench", "version": "v0"}, Vocabulary.load(), settings, anchor_cache=cache)
    load_s = time.perf_counter() - t0
    loaded = vm_status()
    det.anchors()
    det.anchors("screw")
    anchored = vm_status()
    det = det.with_full_maps(False)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(batch)]
    t1 = time.perf_counter()
    for d in det.detect(images, "screw", heatmap=True):
        heat = d.heat["combined"]
        localise(heat, 0.5, min_area_pixels(heat.shape, 0.001), True, 10)
        overlay_png(images[0], heat)
    serve_s = time.perf_counter() - t1
    served = vm_status()
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in backend.model.visual.parameters()})
    return {"case": case, "precision": precision, "peak_load_mb": loaded["VmHWM"], "peak_anchors_mb": anchored["VmHWM"],
            "peak_mb": served["VmHWM"], "rss_end_mb": served["VmRSS"], "text_loaded": backend.text_loaded,
            "visual_dtypes": dtypes, "load_s": load_s, "batch_s": serve_s, "pinned_bytes": threshold}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="before,after,after_cached", help="comma-separated subset")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--mmap-threshold", default="auto", type=lambda v: v if v == "auto" else int(v),
                    help="ZSAD_MMAP_THRESHOLD for the `after` cases: auto (the service's default), 0 (glibc's "
                         "default) or bytes to pin")
    ap.add_argument("--child", nargs=4, metavar=("CASE", "PRECISION", "WEIGHTS", "CACHE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        case, precision, weights, cache = args.child
        print(json.dumps(run_case(case, precision, Path(weights), Path(cache), args.batch, args.threads,
                                  args.mmap_threshold)))
        return

    from _random_clip import random_clip_spec

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(random_clip_spec(tmp, ARCH).path)  # written in this process; the children only read it
        cases = args.cases.split(",")
        # Each case is its own process (peak RSS is per process); cases run concurrently, as the CPU is shared
        # anyway, except that `after_cached` starts once `after` has written the anchors it reuses.
        for wave in ([c for c in cases if c != "after_cached"], [c for c in cases if c == "after_cached"]):
            procs = []
            for precision in args.precisions.split(","):
                cache = Path(tmp) / f"cache-{precision}"
                for case in wave:
                    cmd = [sys.executable, __file__, "--batch", str(args.batch), "--threads", str(args.threads),
                           "--mmap-threshold", str(args.mmap_threshold), "--child", case, precision, str(weights),
                           str(cache)]
                    procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
            for proc in procs:
                out, _ = proc.communicate()
                if proc.returncode:
                    raise SystemExit(f"a case failed (exit {proc.returncode}): {' '.join(proc.args[-4:-2])}")
                r = json.loads(out.strip().splitlines()[-1])
                results.append(r)
                print(f"{r['case']:>12} {r['precision']}: peak after load {r['peak_load_mb']:.0f} MB, after anchors "
                      f"{r['peak_anchors_mb']:.0f} MB, serving peak {r['peak_mb']:.0f} MB (RSS at end "
                      f"{r['rss_end_mb']:.0f} MB); text tower loaded at end: {r['text_loaded']}; visual dtypes "
                      f"{r['visual_dtypes']}; load {r['load_s']:.1f} s, batch of {args.batch} {r['batch_s']:.1f} s",
                      flush=True)
    fields = {}
    for r in results:
        fields[f"{r['case']}_{r['precision']}_peak_mb"] = f"{r['peak_mb']:.0f}"
    for precision in args.precisions.split(","):
        by = {r["case"]: r for r in results if r["precision"] == precision}
        if "before" in by and "after" in by:
            fields[f"ratio_{precision}"] = f"{by['after']['peak_mb'] / by['before']['peak_mb']:.2f}"
        if "after" in by:
            worst = max(by[c]["peak_mb"] for c in ("after", "after_cached") if c in by)
            fields[f"target_{precision}_met"] = str(int(worst <= TARGET_MB[precision]))
    fields["batch"] = str(args.batch)
    fields["mmap_threshold"] = str(args.mmap_threshold)
    fields["pinned_bytes"] = ",".join(sorted({str(r["pinned_bytes"]) for r in results}))  # what that setting did
    print("RESULT name=memory " + " ".join(f"{k}={v}" for k, v in fields.items()))


if __name__ == "__main__":
    main()
