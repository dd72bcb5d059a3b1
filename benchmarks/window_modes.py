"""Window settings for the CNN tower, compared on a *seen-kind* tuning set (never the held-out kinds).

    python benchmarks/window_modes.py [--store model_store] [--seed 555] [--n-good 20] [--n-defect 6] [--no-crop]

Rows: attention-pool windows at several scale sets, and crop windows (each window's pixels resized and encoded as
an image) at the default scales. Prints pixel and image AUROC of the combined score and the time per image; ends with
one `RESULT` line. This is the run behind the default `cnn_window_mode=attnpool` and the model's scales (1, 2, 3).
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
from service.synthetic.world import TRAIN_KINDS


def run(store: Path, samples, images, **overrides) -> dict[str, float]:
    det = load_detector(Settings(model_store=store, device="cpu", precision="fp32", **overrides))
    det.detect(images[:1])  # warm-up
    labels, scores, masks, heats = [], [], [], []
    t0 = time.perf_counter()
    for i in range(0, len(images), 16):
        for s, d in zip(samples[i : i + 16], det.detect(images[i : i + 16])):
            labels.append(s.label)
            scores.append(d.scores["combined"])
            heat = d.heat["combined"]
            masks.append((load_mask(s.mask_path) if s.label else np.zeros(heat.shape, bool)).ravel())
            heats.append(heat.ravel())
    return {"ms": (time.perf_counter() - t0) / len(images) * 1000, "image": roc_auc_score(labels, scores),
            "pixel": roc_auc_score(np.concatenate(masks), np.concatenate(heats))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="model_store")
    ap.add_argument("--seed", type=int, default=555, help="tuning-set seed (not the test seed of method_claims)")
    ap.add_argument("--n-good", type=int, default=20)
    ap.add_argument("--n-defect", type=int, default=6)
    ap.add_argument("--no-crop", action="store_true", help="skip the (slow) crop baseline")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_mvtec(tmp, DatasetSpec(kinds=TRAIN_KINDS, seed=args.seed, n_train=0, n_good=args.n_good,
                                     n_defect=args.n_defect))
        samples = read_mvtec(tmp).samples
        images = [load_image(s.path) for s in samples]
        rows = {f"attnpool{list(sc)}": dict(window_scales=sc) for sc in [(2, 3), (1, 2), (1, 2, 3), (2, 3, 4)]}
        if not args.no_crop:
            rows["crop[1, 2, 3]"] = dict(window_scales=(1, 2, 3), cnn_window_mode="crop")
        results = {name: run(Path(args.store), samples, images, **kw) for name, kw in rows.items()}
    print(f"seen kinds, seed {args.seed}, {len(samples)} images; combined score")
    for name, r in results.items():
        print(f"{name:>18}: pixel AUROC {r['pixel']:.3f}  image AUROC {r['image']:.3f}  {r['ms']:.0f} ms/image")
    key = {"attnpool[2, 3]": "attn23", "attnpool[1, 2]": "attn12", "attnpool[1, 2, 3]": "attn123",
           "attnpool[2, 3, 4]": "attn234", "crop[1, 2, 3]": "crop123"}
    print("RESULT name=window_modes n=%d " % len(samples) + " ".join(
        f"{key[n]}_pixel={r['pixel']:.3f} {key[n]}_ms={r['ms']:.0f}" for n, r in results.items()))


if __name__ == "__main__":
    main()
