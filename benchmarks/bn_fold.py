"""Benchmark: CPU time per image of the shipped CNN tower with its BatchNorms folded into the convs, against unfolded.

`load_clip` folds a ModifiedResNet's eval-mode BatchNorms into the preceding convs (`cnn_tower.fold_batchnorm`);
this loads the shipped CLIP both ways and times `encode_image` on channels-last input (the service's layout) in
CPU time on one torch thread (`time.process_time`: this machine is shared, see `cnn_layout.py`), the variants
alternating within each repetition; also the largest difference of the embeddings, in fp32.

Usage: .venv/bin/python benchmarks/bn_fold.py [--store model_store] [--model default] [--batches 4,16] [--reps 5]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from cnn_layout import cpu_ms_per_image

from service.clip_backend import ClipSpec, load_clip
from service.preprocess import cnn_layout
from service.store import ModelStore


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", default=str(REPO / "model_store"))
    p.add_argument("--model", default="default")
    p.add_argument("--batches", default="4,16", help="images per forward (a request's 4 test-time views: 4)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seconds", type=float, default=0.5, help="CPU seconds per measurement")
    args = p.parse_args()
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    spec = ClipSpec.from_manifest(ModelStore(args.store).manifest(args.model)["clip"])
    folded = load_clip(spec, args.store, device="cpu", precision="fp32", text_tower=False)
    plain = load_clip(spec, args.store, device="cpu", precision="fp32", text_tower=False, fold_bn=False)
    n = folded.info.get("batchnorms_folded", 0)
    print(f"{spec.label()}: {n} BatchNorms folded, input {folded.image_size} px, one torch thread")
    if not n:
        raise SystemExit("this model's image tower has no BatchNorms to fold (not a CNN tower)")
    fields: dict[str, float] = {"batchnorms": n}
    gen = torch.Generator().manual_seed(0)
    for b in (int(v) for v in args.batches.split(",")):
        x = cnn_layout(torch.randn(b, 3, folded.image_size, folded.image_size, generator=gen), folded.model.visual)
        with torch.inference_mode():
            diff = float((folded.model.encode_image(x) - plain.model.encode_image(x)).abs().max())
        before, after = [], []
        for _ in range(args.reps):
            before.append(cpu_ms_per_image(plain.model, x, args.seconds))
            after.append(cpu_ms_per_image(folded.model, x, args.seconds))
        a, c = float(np.median(before)), float(np.median(after))
        print(f"batch {b:>3}: unfolded {a:.2f} ms/image, folded {c:.2f} ms/image (CPU), speed-up {a / c:.3f}, "
              f"max difference {diff:.1e}")
        fields.update({f"b{b}_unfolded_ms": a, f"b{b}_folded_ms": c, f"b{b}_speedup": a / c, f"b{b}_maxdiff": diff})
    fields["load_avg_start"], fields["load_avg_end"] = load0, os.getloadavg()[0]
    print("RESULT name=bn_fold " + " ".join(f"{k}={v:.3g}" for k, v in fields.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
