"""Few-shot mode (WinCLIP+) on the embedded model: quality with 0 / 1 / 4 (...) shots on the held-out kinds, per kind,
and the CPU cost per image with 1, 4, 16, 64 shots against the zero-shot request it replaces.

    python benchmarks/fewshot.py [--store model_store] [--seed 20261126] [--shots 0,1,4] [--world product,product_wide,random]
                                 [--cost-shots 1,4,16,64] [--kinds hex_nut,pill,leather]

What it measures. Quality: for each world (`benchmarks/_product_sets.py`) a synthetic MVTec-layout set of the held-out
kinds (never seen by the CLIP, never used for a choice) with the test seed; for each kind the first K images of
`train/good` (a seeded permutation, nested: the 1-shot image is among the 4) become its memory, and the test images
are scored exactly as the service does (`Detector.score(..., memory=...)`). Per kind and K: image AUROC, pixel AUROC
and the deformation image AUROC (good vs deformed parts), and hit@1 against its shuffled-mask control (as `zsad
evaluate` counts them), with the default score.

* `product` (the default, the realistic one): each kind is ONE product variant (fixed colour, background, size,
  parts, lighting; pose jitter only), as on a production line, where few-shot mode is meant to be used.
* `random`: the generator's own sets, where every image of a kind is a new scene (its own colour, background, size,
  tooth count...): a kind is a category of products, which a handful of shots cannot describe (what the first
  measurement of this benchmark used).

Cost: one image per call (a quiet line), `Detector.detect(heatmap=False)`, in process on the CPU with
`--threads` torch threads, p50 over `--repeats` calls, zero-shot and few-shot calls interleaved so load from other
processes hits both alike. Ends with one `RESULT name=fewshot ...` line (`<world>_image_k1=...`, `k16_ratio=...`).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from service.detector import load_detector
from service.evaluation.metrics import derangement, fit_mask, hit_at_1, patch_pixels
from service.evaluation.readers import list_images, load_mask, read_mvtec
from service.fewshot import build_memory, model_ref
from service.preprocess import load_image
from service.settings import Settings
from service.synthetic.dataset import DatasetSpec, write_mvtec
from service.synthetic.world import HELD_OUT_KINDS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _product_sets import WORLDS, write_set


def pick(paths: list[Path], k: int, seed: int) -> list[Path]:
    order = np.random.default_rng(seed).permutation(len(paths))
    return [paths[i] for i in order[:k]]


def quality(det, root: Path, kinds, shots, score: str, shot_seed: int, world: str) -> dict:
    samples = read_mvtec(root).samples
    out = {}
    for kind in kinds:
        ks = [s for s in samples if s.category == kind]
        images = [load_image(s.path) for s in ks]
        embs = []
        for i in range(0, len(images), 16):
            embs += det.embed(images[i:i + 16], heatmap=True)
        train = list_images(root / kind / "train" / "good")
        labels = np.array([s.label for s in ks])
        deform = np.array([s.defect in ("good", "deformation") for s in ks])
        masks = [load_mask(s.mask_path) if s.label else None for s in ks]
        for k in shots:
            memory = None
            if k:
                ref = det.embed([load_image(p) for p in pick(train, k, shot_seed)], heatmap=True)
                memory = build_memory(ref, model_ref(det), det.settings.window_stride,
                                      det.settings.reference_max_rows, dense=det.settings.reference_dense)
            dets = det.score(embs, memory=memory)
            sc = np.array([d.scores[score] for d in dets])
            heat = np.concatenate([d.heat[score].ravel() for d in dets])
            gt = np.concatenate([(m if m is not None else np.zeros(d.heat[score].shape, bool)).ravel()
                                 for m, d in zip(masks, dets)])
            out[(kind, k)] = {"image": roc_auc_score(labels, sc), "pixel": roc_auc_score(gt, heat),
                              "deformation": roc_auc_score(labels[deform], sc[deform]),
                              **localisation([d.heat[score] for d in dets], masks, embs[0].grid)}
            r = out[(kind, k)]
            print(f"{world:7s} {kind:8s} {k:2d} shots: image {100 * r['image']:.1f}  pixel {100 * r['pixel']:.1f}  "
                  f"deformation {100 * r['deformation']:.1f}  hit@1 {r['hit']:.3f} (shuffled {r['hit_shuffled']:.3f})",
                  flush=True)
    return out


def localisation(heats: list[np.ndarray], masks: list, grid: tuple[int, int]) -> dict[str, float]:
    """hit@1 as `zsad evaluate` counts it (hottest pixel in the mask dilated by one grid cell) over the defective
    images, and the same with another defective image's mask (the shuffled control, `metrics.derangement`)."""
    defective = [(h, m) for h, m in zip(heats, masks) if m is not None]
    partner = derangement(len(defective))
    hits = [hit_at_1(h, m, patch_pixels(h.shape, grid)) for h, m in defective]
    shuffled = ([hit_at_1(h, fit_mask(defective[partner[i]][1], h.shape), patch_pixels(h.shape, grid))
                 for i, (h, _) in enumerate(defective)] if partner is not None else [])
    return {"hit": float(np.mean(hits)) if hits else float("nan"),
            "hit_shuffled": float(np.mean(shuffled)) if shuffled else float("nan")}


def cost(det, root: Path, kind: str, shots, repeats: int) -> dict:
    train = [load_image(p) for p in sorted(list_images(root / kind / "train" / "good"))]
    query = [load_image(sorted(list_images(root / kind / "test" / "good"))[0])]
    memories = {}
    for k in shots:
        ref = []
        for i in range(0, k, 16):
            ref += det.embed(train[i:min(k, i + 16)], heatmap=True)
        memories[k] = build_memory(ref, model_ref(det), det.settings.window_stride, det.settings.reference_max_rows,
                                   dense=det.settings.reference_dense)
    for _ in range(5):  # warm-up: anchors, packed weights
        det.detect(query, heatmap=False)
        for m in memories.values():
            det.detect(query, heatmap=False, memory=m)
    times: dict[str, list[float]] = {"zero": [], **{f"k{k}": [] for k in shots}}
    for _ in range(repeats):
        t = time.perf_counter()
        det.detect(query, heatmap=False)
        times["zero"].append(time.perf_counter() - t)
        for k, m in memories.items():
            t = time.perf_counter()
            det.detect(query, heatmap=False, memory=m)
            times[f"k{k}"].append(time.perf_counter() - t)
    return {name: statistics.median(v) * 1000 for name, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="model_store")
    ap.add_argument("--seed", type=int, default=20261126, help="test-set seed (never used for a choice)")
    ap.add_argument("--shot-seed", type=int, default=0, help="which train/good images are the shots")
    ap.add_argument("--shots", default="0,1,4")
    ap.add_argument("--cost-shots", default="1,4,16,64")
    ap.add_argument("--n-good", type=int, default=30)
    ap.add_argument("--n-defect", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--score", default="combined")
    ap.add_argument("--world", default="product,random", help="comma-separated: product, product_wide, random")
    ap.add_argument("--kinds", default=",".join(HELD_OUT_KINDS))
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shots = [int(x) for x in args.shots.split(",")]
    cost_shots = [int(x) for x in args.cost_shots.split(",")]
    det = load_detector(Settings(model_store=Path(args.store), device="cpu", precision="fp32"))
    kinds = tuple(args.kinds.split(","))
    worlds = args.world.split(",")
    if any(w not in WORLDS for w in worlds):
        raise SystemExit(f"--world must be among {WORLDS}")
    result = [f"model={det.name}@{det.version}"]
    with tempfile.TemporaryDirectory(prefix="zsad-fewshot-") as tmp:
        for world in ([] if args.skip_quality else worlds):
            root = Path(tmp) / world
            write_set(root, world, kinds, args.seed, max(16, max(shots)), args.n_good, args.n_defect)
            print(f"{world} world, kinds {', '.join(kinds)}, seed {args.seed}: {args.n_good} good + "
                  f"{7 * args.n_defect} defective test images per kind; score {args.score}", flush=True)
            q = quality(det, root, kinds, shots, args.score, args.shot_seed, world)
            print(f"| {world} | shots | image | pixel | deformation | hit@1 (shuffled) | "
                  + " | ".join(f"{kind} image / pixel" for kind in kinds) + " |")
            for k in shots:
                mean = {m: 100 * float(np.mean([q[(kind, k)][m] for kind in kinds])) for m in ("image", "pixel",
                                                                                               "deformation")}
                hit = {m: float(np.mean([q[(kind, k)][m] for kind in kinds])) for m in ("hit", "hit_shuffled")}
                print(f"| {world} | {k} | {mean['image']:.1f} | {mean['pixel']:.1f} | {mean['deformation']:.1f} | "
                      f"{hit['hit']:.3f} ({hit['hit_shuffled']:.3f}) | "
                      + " | ".join(f"{100 * q[(kind, k)]['image']:.1f} / {100 * q[(kind, k)]['pixel']:.1f}"
                                   for kind in kinds) + " |")
                result += [f"{world}_image_k{k}={mean['image']:.1f}", f"{world}_pixel_k{k}={mean['pixel']:.1f}",
                           f"{world}_deformation_k{k}={mean['deformation']:.1f}",
                           f"{world}_hit_at_1_k{k}={hit['hit']:.3f}", f"{world}_hit_shuffled_k{k}={hit['hit_shuffled']:.3f}"]
        if not args.skip_cost:
            root = Path(tmp) / "cost"
            write_mvtec(root, DatasetSpec(kinds=(kinds[0],), seed=args.seed + 1, n_train=max(cost_shots), n_good=1,
                                          n_defect=0))
            c = cost(det, root, kinds[0], cost_shots, args.repeats)
            print(f"CPU p50 per image ({args.threads} thread(s), heatmap=none): zero-shot {c['zero']:.1f} ms; "
                  + ", ".join(f"{k} shots {c[f'k{k}']:.1f} ms (x{c[f'k{k}'] / c['zero']:.2f})" for k in cost_shots))
            result += [f"zero_shot_ms={c['zero']:.1f}"] + [f"k{k}_ms={c[f'k{k}']:.1f}" for k in cost_shots]
            result += [f"k{k}_ratio={c[f'k{k}'] / c['zero']:.2f}" for k in cost_shots]
    print("RESULT name=fewshot " + " ".join(result))


if __name__ == "__main__":
    main()
