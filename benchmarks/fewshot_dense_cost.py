"""A cheaper few-shot dense bank, judged on validation and seen kinds only (tuning seed 1919, both worlds).

    PYTHONPATH=. python benchmarks/fewshot_dense_cost.py

The dense bank's nearest-neighbour search (queries x rows x width) was most of few-shot mode's extra cost with 256
channels and 4096 rows. For (width D, rows R) in VARIANTS: the features' channel groups averaged to D, the bank
reduced to R rows by the greedy coreset (scale re-fitted), and the default score's image / pixel / deformation AUROC
with 4 and 16 shots, averaged over the kinds. The shipped constants (`windows.DENSE_DIM`, `fewshot.DENSE_MAX_ROWS`)
are the cheapest variant within noise of the full one. Prints one line per (world, shots, D, R) and a RESULT line.
"""
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _product_sets import write_set
from fewshot import pick

import service.fewshot  # the study undoes the shipped caps below: full-width, 4096-row features
import service.windows
from service.detector import load_detector
from service.evaluation.readers import list_images, load_mask, read_mvtec
from service.fewshot import association, build_memory, dense_near, greedy_coreset, model_ref
from service.preprocess import load_image
from service.settings import Settings
from service.synthetic.world import RANDOM_KINDS, TRAIN_KINDS

service.windows.DENSE_DIM, service.fewshot.DENSE_MAX_ROWS = 1 << 16, 1 << 16
torch.set_num_threads(2)
det = load_detector(Settings(model_store=Path("model_store"), device="cpu", precision="fp32"))
KINDS = RANDOM_KINDS + TRAIN_KINDS
VARIANTS = [(256, 4096), (64, 4096), (128, 4096), (256, 1024), (128, 2048), (64, 2048)]
def pooled(embs, d):
    if d == embs[0].dense.shape[-1]:
        return embs
    return [replace(e, dense=F.normalize(F.adaptive_avg_pool1d(e.dense[None], d)[0], dim=-1)) for e in embs]
def capped(mem, refs, r):
    if mem.dense.shape[0] <= r:
        return mem
    keep = greedy_coreset(mem.dense, r)
    mem.dense, mem.dense_src, mem.dense_pos = mem.dense[keep], mem.dense_src[keep], mem.dense_pos[keep]
    own = association(torch.stack([e.dense for e in refs]), mem.dense, mem.dense_src, torch.arange(len(refs)),
                      near=dense_near(mem))
    mem.dense_scale = max(float(torch.quantile(own.flatten(), 0.99)), 1e-6)
    return mem
res = {}
with tempfile.TemporaryDirectory() as tmp:
    for world in ("product", "random"):
        root = Path(tmp) / world
        write_set(root, world, KINDS, 1919, 16, 20, 6)
        samples = read_mvtec(root).samples
        for kind in KINDS:
            ks = [s for s in samples if s.category == kind]
            embs = sum((det.embed([load_image(s.path) for s in ks[i:i + 16]], heatmap=True, dense=True)
                        for i in range(0, len(ks), 16)), [])
            labels = np.array([s.label for s in ks])
            deform = np.array([s.defect in ("good", "deformation") for s in ks])
            masks = [load_mask(s.mask_path) if s.label else None for s in ks]
            train = list_images(root / kind / "train" / "good")
            for k in (4, 16):
                ref = det.embed([load_image(p) for p in pick(train, k, 0)], heatmap=True, dense=True)
                for d, r in VARIANTS:
                    pe, pr = pooled(embs, d), pooled(ref, d)
                    mem = capped(build_memory(pr, model_ref(det), 1, 4096, dense=True), pr, r)
                    dets = det.score(pe, memory=mem)
                    sc = np.array([x.scores["combined"] for x in dets])
                    heat = [np.asarray(x.heat["combined"]) for x in dets]
                    gt = np.concatenate([(m if m is not None else np.zeros(h.shape, bool)).ravel()
                                         for m, h in zip(masks, heat)])
                    res.setdefault((world, k, d, r), []).append((
                        roc_auc_score(labels, sc), roc_auc_score(gt, np.concatenate([h.ravel() for h in heat])),
                        roc_auc_score(labels[deform], sc[deform])))
            print(world, kind, flush=True)
result = []
for (world, k, d, r), v in res.items():
    m = 100 * np.mean(v, axis=0)
    print(f"{world} {k:2d} shots, width {d:3d}, rows {r:4d}: image {m[0]:.1f} pixel {m[1]:.1f} deformation {m[2]:.1f} "
          f"(sum {m.sum():.1f})")
    result.append(f"{world}_k{k}_d{d}_r{r}={m[0]:.1f}/{m[1]:.1f}/{m[2]:.1f}")
print("RESULT name=fewshot_dense_cost " + " ".join(result))
