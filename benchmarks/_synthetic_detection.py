"""Not a benchmark: a helper shared by the benchmarks that score a generated synthetic set with the real detector.

    from _synthetic_detection import synthetic_set, detect_auroc
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from service.detector import load_detector
from service.evaluation.readers import Sample, load_mask, read_mvtec
from service.preprocess import load_image
from service.settings import Settings
from service.synthetic.dataset import DatasetSpec, write_mvtec


def synthetic_set(folder: str | Path, kinds: Sequence[str], seed: int, n_good: int, n_defect: int
                  ) -> tuple[list[Sample], list[Image.Image]]:
    """Write an MVTec-layout test set of `kinds` into `folder` and read it back: (samples, decoded images)."""
    write_mvtec(folder, DatasetSpec(kinds=tuple(kinds), seed=seed, n_train=0, n_good=n_good, n_defect=n_defect))
    samples = read_mvtec(folder).samples
    return samples, [load_image(s.path) for s in samples]


def detect_auroc(store: Path, samples: list[Sample], images: list[Image.Image], score: str = "combined",
                 batch: int = 32, **settings: Any) -> dict[str, Any]:
    """Detect every image with the store's current model on the CPU (settings overridable); time, image and pixel
    AUROC over the whole set, and the image scores."""
    det = load_detector(Settings(model_store=store, **{"device": "cpu", "precision": "fp32", **settings}))
    det.detect(images[:2])  # warm-up (prompt anchors, packed weights)
    labels, scores, masks, heats = [], [], [], []
    t0 = time.perf_counter()
    for i in range(0, len(images), batch):
        for s, d in zip(samples[i : i + batch], det.detect(images[i : i + batch])):
            labels.append(s.label)
            scores.append(d.scores[score])
            heat = d.heat[score]
            masks.append((load_mask(s.mask_path) if s.label else np.zeros(heat.shape, bool)).ravel())
            heats.append(heat.ravel())
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "ms_per_image": seconds / len(images) * 1000, "scores": np.array(scores),
            "image_auroc": roc_auc_score(labels, scores),
            "pixel_auroc": roc_auc_score(np.concatenate(masks), np.concatenate(heats))}
