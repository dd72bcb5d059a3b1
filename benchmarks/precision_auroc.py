"""bf16 vs fp32 for the default model on the synthetic held-out kinds: time, image AUROC and pixel AUROC, one run.

    python benchmarks/precision_auroc.py [--store model_store] [--n-good 40] [--n-defect 10]

The issue's gate for a bf16 mode: image and pixel AUROC move by less than 0.005. Ends with one `RESULT` line.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from _synthetic_detection import detect_auroc, synthetic_set

from service.synthetic.world import HELD_OUT_KINDS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="model_store")
    ap.add_argument("--seed", type=int, default=20261126)
    ap.add_argument("--n-good", type=int, default=40)
    ap.add_argument("--n-defect", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        samples, images = synthetic_set(tmp, HELD_OUT_KINDS, args.seed, args.n_good, args.n_defect)
        fp32 = detect_auroc(Path(args.store), samples, images, precision="fp32")
        bf16 = detect_auroc(Path(args.store), samples, images, precision="bf16")
    diff = float(np.abs(fp32["scores"] - bf16["scores"]).max())
    for name, r in (("fp32", fp32), ("bf16", bf16)):
        print(f"{name}: {r['seconds']:.1f} s for {len(samples)} images, image AUROC {r['image_auroc']:.4f}, "
              f"pixel AUROC {r['pixel_auroc']:.4f}")
    print(
        f"RESULT name=precision_auroc n={len(samples)} fp32_s={fp32['seconds']:.1f} bf16_s={bf16['seconds']:.1f} "
        f"speedup={fp32['seconds'] / bf16['seconds']:.2f} image_auroc_delta={bf16['image_auroc'] - fp32['image_auroc']:+.4f} "
        f"pixel_auroc_delta={bf16['pixel_auroc'] - fp32['pixel_auroc']:+.4f} max_score_diff={diff:.2e}"
    )


if __name__ == "__main__":
    main()
