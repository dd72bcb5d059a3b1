"""The few-shot combination weight, judged on validation and seen kinds (never the held-out ones): image / pixel /
deformation AUROC of (1 - w) * zero-shot + w * few-shot for w in 0, 0.25, 0.5 (WinCLIP+'s), 0.75, 1 (the few-shot
map alone), for the image score (few-shot part: the map's maximum) and the map alike.

    python benchmarks/fewshot_weights.py [--seed 1919] [--shots 4] [--world product] [--kinds widget,pattern,...]

A tuning seed of its own (1919: not the test seed of benchmarks/fewshot.py); `--world` as in benchmarks/fewshot.py
(`product`: one product variant per kind, pose jitter only; `random`: every image a new scene). Ends with
`RESULT name=fewshot_weights`.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from service.aggregate import upsample_map
from service.detector import load_detector
from service.evaluation.readers import list_images, load_mask, read_mvtec
from service.fewshot import build_memory, model_ref
from service.preprocess import load_image
from service.settings import Settings
from service.synthetic.world import RANDOM_KINDS, TRAIN_KINDS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _product_sets import write_set

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="model_store")
    ap.add_argument("--seed", type=int, default=1919)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--kinds", default=",".join(RANDOM_KINDS + TRAIN_KINDS))
    ap.add_argument("--world", default="product", help="product or random (benchmarks/_product_sets.py)")
    ap.add_argument("--score", default="combined")
    args = ap.parse_args()
    torch.set_num_threads(1)
    kinds = tuple(args.kinds.split(","))
    det = load_detector(Settings(model_store=Path(args.store), device="cpu", precision="fp32"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="zsad-fsw-") as tmp:
        root = Path(tmp)
        write_set(root, args.world, kinds, args.seed, 16, 20, 6)
        samples = read_mvtec(root).samples
        for kind in kinds:
            ks = [s for s in samples if s.category == kind]
            embs = []
            for i in range(0, len(ks), 16):
                embs += det.embed([load_image(s.path) for s in ks[i:i + 16]], heatmap=True)
            ref = det.embed([load_image(p) for p in list_images(root / kind / "train" / "good")[:args.shots]], True)
            memory = build_memory(ref, model_ref(det), det.settings.window_stride, det.settings.reference_max_rows,
                                  dense=det.settings.reference_dense)
            zero = det.score(embs)
            few = det._few_shot_map(embs, memory, None)
            labels = np.array([s.label for s in ks])
            deform = np.array([s.defect in ("good", "deformation") for s in ks])
            gt = np.concatenate([(load_mask(s.mask_path) if s.label else np.zeros(z.heat[args.score].shape, bool))
                                 .ravel() for s, z in zip(ks, zero)])
            per_w = []
            for w in WEIGHTS:
                img = np.array([(1 - w) * z.scores[args.score] + w * float(f.max()) for z, f in zip(zero, few)])
                heat = np.concatenate([
                    e.geometry.to_original((1 - w) * upsample_map(torch.tensor(z.grid[args.score]), f.shape[-2:]) + w * f)
                    .ravel() for e, z, f in zip(embs, zero, few)])
                per_w.append((roc_auc_score(labels, img), roc_auc_score(gt, heat),
                              roc_auc_score(labels[deform], img[deform])))
            rows.append(per_w)
            print(kind, " | ".join(f"w={w}: " + " ".join(f"{100 * x:.1f}" for x in r) for w, r in zip(WEIGHTS, per_w)),
                  flush=True)
    mean = np.mean(np.array(rows), axis=0)
    print("mean (image pixel deformation)", " | ".join(f"w={w}: " + " ".join(f"{100 * x:.1f}" for x in r)
                                                      for w, r in zip(WEIGHTS, mean)))
    best = WEIGHTS[int(np.argmax(mean[:, 0] + mean[:, 1]))]
    print("RESULT name=fewshot_weights " + " ".join(f"w{w}_image={100 * m[0]:.1f} w{w}_pixel={100 * m[1]:.1f}"
                                                    for w, m in zip(WEIGHTS, mean)) + f" best_w={best}")


if __name__ == "__main__":
    main()
