"""bf16 vs fp32 for the default model on the synthetic held-out kinds: time, image AUROC and pixel AUROC, one run.

    python benchmarks/precision_auroc.py [--store model_store] [--n-good 40] [--n-defect 10]

The issue's gate for a bf16 mode: image and pixel AUROC move by less than 0.005. Ends with one `RESULT` line.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from service.detector import load_detector
from service.evaluation.readers import load_mask, read_mvtec
from service.preprocess import load_image
from service.settings import Settings
from service.synthetic.dataset import DatasetSpec, write_mvtec
from service.synthetic.world import HELD_OUT_KINDS


def measure(store: Path, precision: str, samples, images) -> dict[str, float]:
    det = load_detector(Settings(model_store=store, device="cpu", precision=precision))
    det.detect(images[:2])  # warm-up (prompt anchors, packed weights)
    t0 = time.perf_counter()
    labels, scores, masks, heats = [], [], [], []
    for i in range(0, len(images), 32):
        for s, d in zip(samples[i : i + 32], det.detect(images[i : i + 32])):
            labels.append(s.label)
            scores.append(d.scores["combined"])
            heat = d.heat["combined"]
            masks.append((load_mask(s.mask_path) if s.label else np.zeros(heat.shape, bool)).ravel())
            heats.append(heat.ravel())
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "image_auroc": roc_auc_score(labels, scores),
            "pixel_auroc": roc_auc_score(np.concatenate(masks), np.concatenate(heats)), "scores": np.array(scores)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="model_store")
    ap.add_argument("--seed", type=int, default=20261126)
    ap.add_argument("--n-good", type=int, default=40)
    ap.add_argument("--n-defect", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_mvtec(tmp, DatasetSpec(kinds=HELD_OUT_KINDS, seed=args.seed, n_train=0, n_good=args.n_good,
                                     n_defect=args.n_defect))
        samples = read_mvtec(tmp).samples
        images = [load_image(s.path) for s in samples]
        fp32 = measure(Path(args.store), "fp32", samples, images)
        bf16 = measure(Path(args.store), "bf16", samples, images)
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
