"""Test-time views (service/tta.py): image AUROC and time per image for 1, 2, 4 and 8 views, and the pick.

    python benchmarks/tta_views.py [--store model_store] [--model default]

The number of views is chosen on *validation* kinds only: the random-shape `widget` and `pattern` kinds, rendered with a
seed no training used (31337). Every widget scene has a silhouette of its own, so they stand in for objects the CLIP
never saw; the seen kinds are printed too, but at ~0.98 they cannot rank anything. Rule: the fewest views whose
validation AUROC is within 0.002 of the best. Held-out kinds are scored and printed, but play no part in the pick. AUROC is
the mean over kinds of each kind's image AUROC (the MVTec convention), for the service's default score; the FNN and its
calibration are the model's own. The calibration
is fitted for the model's recommended views; `combined` mixes two calibrated scores, so another calibration moves
its AUROC a little (about 0.002 between default@v2's and default@v3's).
Baselines in the same run: 1 view for the AUROC and the time per image; for the CPU grouping of views
(`tta.CPU_IMAGES_PER_FORWARD`), all views of a batch of 32 in one forward against the grouped forwards.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from service import tta
from service.constants import VIEW_COUNTS
from service.detector import load_detector
from service.settings import Settings
from service.synthetic.dataset import DatasetSpec, write_mvtec
from service.synthetic.world import HELD_OUT_KINDS, RANDOM_KINDS, TRAIN_KINDS

GROUPS = {"validation": (31337, tuple(RANDOM_KINDS)), "seen": (31337, tuple(TRAIN_KINDS)),
          "held_out": (20261126, tuple(HELD_OUT_KINDS))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="model_store")
    ap.add_argument("--model", default="default")
    ap.add_argument("--n-good", type=int, default=30)
    ap.add_argument("--n-defect", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tolerance", type=float, default=0.002)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    base = load_detector(Settings(model_store=Path(args.store), model_name=args.model, device="cpu"))
    dets = {n: replace(base, settings=base.settings.model_copy(update={"tta_views": n})) for n in VIEW_COUNTS}
    score = dets[1].settings.default_score
    size = 64
    auroc: dict[str, dict[int, float]] = {}
    ms_per_image: dict[int, float] = {n: 0.0 for n in VIEW_COUNTS}
    n_images = 0
    with tempfile.TemporaryDirectory(prefix="zsad-tta-") as tmp:
        for group, (seed, kinds) in GROUPS.items():
            root = Path(tmp) / group
            write_mvtec(root, DatasetSpec(kinds=kinds, seed=seed, n_train=0, n_good=args.n_good,
                                          n_defect=args.n_defect, size=size))
            per_kind: dict[int, list[float]] = {n: [] for n in VIEW_COUNTS}
            for kind in kinds:
                paths = sorted((root / kind / "test").rglob("*.png"))
                labels = [p.parent.name != "good" for p in paths]
                images = [Image.open(p).convert("RGB") for p in paths]
                n_images += len(images)
                for n, det in dets.items():
                    t = time.perf_counter()
                    scores = [d.scores[score] for i in range(0, len(images), 32)
                              for d in det.detect(images[i:i + 32], heatmap=False)]
                    ms_per_image[n] += (time.perf_counter() - t) * 1000
                    per_kind[n].append(roc_auc_score(labels, scores))
            auroc[group] = {n: float(np.mean(v)) for n, v in per_kind.items()}
            print(f"{group} ({', '.join(kinds)}; seed {seed}): "
                  + ", ".join(f"{n} views {a:.3f}" for n, a in auroc[group].items()))
    best = max(auroc["validation"].values())
    pick = min(n for n in VIEW_COUNTS if auroc["validation"][n] >= best - args.tolerance)
    ms = {n: t / n_images for n, t in ms_per_image.items()}
    grouped, one_forward = grouping_ms(base)
    print(f"4 views of 32 images on the CPU: {one_forward:.0f} ms in one forward, {grouped:.0f} ms grouped "
          f"(forwards of at most max(B, {tta.CPU_IMAGES_PER_FORWARD}) images)")
    print("ms per image (detect without heatmap: preprocessing, views, scores; batches of 32, CPU): "
          + ", ".join(f"{n}: {v:.1f}" for n, v in ms.items()))
    print(f"pick (fewest views within {args.tolerance} of the best validation AUROC): {pick}")
    print(f"RESULT name=tta_views model={args.model} pick={pick} "
          + " ".join(f"val_v{n}={auroc['validation'][n]:.3f}" for n in VIEW_COUNTS) + " "
          + " ".join(f"seen_v{n}={auroc['seen'][n]:.3f}" for n in VIEW_COUNTS) + " "
          + " ".join(f"heldout_v{n}={auroc['held_out'][n]:.3f}" for n in VIEW_COUNTS) + " "
          + f"cost_ratio_v{pick}={ms[pick] / ms[1]:.2f} ms_v1={ms[1]:.2f} grouping_speedup={one_forward / grouped:.2f}")


def grouping_ms(det, batch: int = 32, views: int = 4, reps: int = 3) -> tuple[float, float]:
    """Best-of-`reps` ms of `tta.encode_global` for `batch` images: grouped as shipped, then all views in one forward."""
    size = det.backend.image_size
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    shipped = tta.CPU_IMAGES_PER_FORWARD
    out = []
    for per_forward in (shipped, batch * views):
        tta.CPU_IMAGES_PER_FORWARD = per_forward
        times = []
        with torch.inference_mode():
            tta.encode_global(det.backend, pixels, views)  # warm-up
            for _ in range(reps):
                t = time.perf_counter()
                tta.encode_global(det.backend, pixels, views)
                times.append((time.perf_counter() - t) * 1000)
        out.append(min(times))
    tta.CPU_IMAGES_PER_FORWARD = shipped
    return out[0], out[1]


if __name__ == "__main__":
    main()
