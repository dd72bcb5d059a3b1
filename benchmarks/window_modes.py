"""Window settings for the CNN tower, compared on a *seen-kind* tuning set (never the held-out kinds).

    python benchmarks/window_modes.py [--store model_store] [--seed 555] [--n-good 20] [--n-defect 6] [--no-crop]

Rows: attention-pool windows at several scale sets, and crop windows (each window's pixels resized and encoded as
an image) at the default scales. Prints pixel and image AUROC of the combined score and the time per image; ends with
one `RESULT` line. This is the run behind the default `cnn_window_mode=attnpool` and the model's scales (1, 2, 3).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _synthetic_detection import detect_auroc, synthetic_set

from service.synthetic.world import TRAIN_KINDS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="model_store")
    ap.add_argument("--seed", type=int, default=555, help="tuning-set seed (not the test seed of method_claims)")
    ap.add_argument("--n-good", type=int, default=20)
    ap.add_argument("--n-defect", type=int, default=6)
    ap.add_argument("--no-crop", action="store_true", help="skip the (slow) crop baseline")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        samples, images = synthetic_set(tmp, TRAIN_KINDS, args.seed, args.n_good, args.n_defect)
        rows = {f"attnpool{list(sc)}": dict(window_scales=sc) for sc in [(2, 3), (1, 2), (1, 2, 3), (2, 3, 4)]}
        if not args.no_crop:
            rows["crop[1, 2, 3]"] = dict(window_scales=(1, 2, 3), cnn_window_mode="crop")
        results = {name: detect_auroc(Path(args.store), samples, images, batch=16, **kw) for name, kw in rows.items()}
    print(f"seen kinds, seed {args.seed}, {len(samples)} images; combined score")
    for name, r in results.items():
        print(f"{name:>18}: pixel AUROC {r['pixel_auroc']:.3f}  image AUROC {r['image_auroc']:.3f}  "
              f"{r['ms_per_image']:.0f} ms/image")
    key = {"attnpool[2, 3]": "attn23", "attnpool[1, 2]": "attn12", "attnpool[1, 2, 3]": "attn123",
           "attnpool[2, 3, 4]": "attn234", "crop[1, 2, 3]": "crop123"}
    print(f"RESULT name=window_modes n={len(samples)} " + " ".join(
        f"{key[n]}_pixel={r['pixel_auroc']:.3f} {key[n]}_ms={r['ms_per_image']:.0f}" for n, r in results.items()))


if __name__ == "__main__":
    main()
