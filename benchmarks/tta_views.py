"""Test-time views (service/tta.py): image AUROC and time per image for 1, 2, 4 and 8 views, and the pick.

    python benchmarks/tta_views.py [--store model_store] [--model default]

The number of views is chosen on *validation* kinds only: the random-shape `widget` and `pattern` kinds, rendered with a
seed no training used (31337). Every widget scene has a silhouette of its own, so they stand in for objects the CLIP
never saw; the seen kinds are printed too, but at ~0.98 they cannot rank anything. Rule: the fewest views whose
validation AUROC is within 0.002 of the best. Held-out kinds are scored and printed, but play no part in the pick. AUROC is the mean over
kinds of each kind's image AUROC (the MVTec convention), for the service's default score; the FNN is the model's own
(its calibration does not change the AUROC, which only depends on the order of the scores).
Baseline in the same run: 1 view.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from service.detector import load_detector
from service.settings import Settings
from service.synthetic.dataset import DatasetSpec, write_mvtec
from service.synthetic.world import HELD_OUT_KINDS, RANDOM_KINDS, TRAIN_KINDS
from service.tta import VIEW_COUNTS

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

    dets = {n: load_detector(Settings(model_store=Path(args.store), model_name=args.model, tta_views=n, device="cpu"))
            for n in VIEW_COUNTS}
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
    print("ms per image (global embedding, batches of 32, CPU): " + ", ".join(f"{n}: {v:.1f}" for n, v in ms.items()))
    print(f"pick (fewest views within {args.tolerance} of the best validation AUROC): {pick}")
    print(f"RESULT name=tta_views model={args.model} pick={pick} "
          + " ".join(f"val_v{n}={auroc['validation'][n]:.3f}" for n in VIEW_COUNTS) + " "
          + " ".join(f"seen_v{n}={auroc['seen'][n]:.3f}" for n in VIEW_COUNTS) + " "
          + " ".join(f"heldout_v{n}={auroc['held_out'][n]:.3f}" for n in VIEW_COUNTS) + " "
          + f"cost_ratio_v{pick}={ms[pick] / ms[1]:.2f} ms_v1={ms[1]:.2f}")


if __name__ == "__main__":
    main()
