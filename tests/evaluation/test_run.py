from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from service.evaluation.readers import load_mask, read_mvtec
from service.evaluation.run import evaluate, pixel_categories, subsample

from .reference import slow_pro, write_png

SIZES = {"bottle": (20, 24), "cable": (18, 30)}  # (h, w): categories differ in resolution


def make_dataset(root: Path) -> Path:
    """Tiny MVTec layout with random rectangular defects, so maps and masks are non-trivial."""
    rng = np.random.default_rng(0)
    for cat, (h, w) in SIZES.items():
        for i in range(4):
            write_png(root / cat / "test" / "good" / f"{i:03d}.png", size=(w, h))
        for i in range(5):
            mask = np.zeros((h, w), bool)
            for _ in range(1 + i % 2):
                y, x = rng.integers(0, h - 5), rng.integers(0, w - 5)
                mask[y:y + rng.integers(2, 5), x:x + rng.integers(2, 5)] = True
            write_png(root / cat / "test" / "scratch" / f"{i:03d}.png", size=(w, h))
            write_png(root / cat / "ground_truth" / "scratch" / f"{i:03d}_mask.png", mask)
    return root


def stub_heat(path: Path, variant: str) -> np.ndarray:
    """Deterministic per image: the blurred ground truth plus noise ('blur'), or pure noise ('noise')."""
    cat, defect = path.parts[-4], path.parts[-2]
    h, w = SIZES[cat]
    mask = np.zeros((h, w), bool)
    if defect != "good":
        mask = load_mask(path.parents[2] / "ground_truth" / defect / f"{path.stem}_mask.png")
    rng = np.random.default_rng(zlib.crc32(f"{path}{variant}".encode()))
    signal = ndimage.gaussian_filter(mask.astype(float), 1.0) if variant == "blur" else 0.0
    return np.clip(signal + rng.normal(0.2, 0.1, (h, w)), 0, 1).astype(np.float32)


def stub_score_fn(paths: list[Path]) -> list[dict]:
    out = []
    for p in paths:
        maps = {v: stub_heat(p, v) for v in ("blur", "noise")}
        out.append({"scores": {v: float(m.max()) for v, m in maps.items()}, "maps": maps})
    return out


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("mvtec"))
    out = tmp_path_factory.mktemp("out")
    samples = read_mvtec(root).samples
    metrics = evaluate(samples, stub_score_fn, out, ["blur", "noise"], progress=False, batch_size=3, curves=False)
    return samples, out, metrics


def test_image_metrics_match_sklearn_on_scores_csv(result):
    samples, out, metrics = result
    assert json.loads((out / "metrics.json").read_text()) == metrics
    rows = list(csv.DictReader(open(out / "scores.csv", newline="")))
    assert len(rows) == len(samples) == 18
    for cat in SIZES:
        y = [int(r["label"]) for r in rows if r["category"] == cat]
        for v in ("blur", "noise"):
            s = [float(r[v]) for r in rows if r["category"] == cat]
            assert metrics[v][cat]["image_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
            assert metrics[v][cat]["image_aupr"] == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_pixel_metrics_match_a_direct_computation(result):
    samples, _, metrics = result
    for cat in SIZES:
        cat_samples = [s for s in samples if s.category == cat]
        masks = [load_mask(s.mask_path) if s.label else np.zeros(SIZES[cat], bool) for s in cat_samples]
        for v in ("blur", "noise"):
            heats = [stub_heat(s.path, v) for s in cat_samples]
            y = np.concatenate([m.ravel() for m in masks])
            h = np.concatenate([x.ravel() for x in heats]).astype(np.float64)
            m = metrics[v][cat]
            assert m["pixel_auroc"] == pytest.approx(roc_auc_score(y, h), abs=1e-3)
            assert m["pixel_aupr"] == pytest.approx(average_precision_score(y, h), abs=1e-3)
            assert m["pro"] == pytest.approx(slow_pro(heats, masks), abs=1e-3)
    # the informative stub is clearly better than noise: guards against a mix-up of variants or masks
    assert metrics["blur"]["mean"]["pixel_auroc"] > 0.9 > 0.7 > metrics["noise"]["mean"]["pixel_auroc"]


def test_limit_spreads_over_categories_and_labels(tmp_path):
    samples = read_mvtec(make_dataset(tmp_path / "data")).samples
    picked = subsample(samples, 6)
    assert len(picked) == 6 and {s.category for s in picked} == set(SIZES) and {s.label for s in picked} == {0, 1}
    metrics = evaluate(samples, stub_score_fn, tmp_path / "out", ["blur"], limit=6, progress=False, pixel=False,
                       curves=False)
    assert metrics["blur"]["mean"]["pixel_auroc"] is None
    assert len(list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))) == 6


def test_pixel_categories_need_every_anomaly_masked(tmp_path):
    samples = read_mvtec(make_dataset(tmp_path)).samples
    unmasked = [s if not (s.category == "cable" and s.label) else s.__class__(s.path, s.category, 1, s.defect, None)
                for s in samples]
    assert pixel_categories(unmasked) == {"bottle"}


def test_bad_map_shape_names_the_image(tmp_path):
    samples = read_mvtec(make_dataset(tmp_path / "data")).samples

    def wrong_shape(paths):
        return [{"scores": {"v": 0.5}, "maps": {"v": np.zeros((3, 3), np.float32)}} for _ in paths]

    with pytest.raises(ValueError, match="shape") as e:
        evaluate(samples, wrong_shape, tmp_path / "out", ["v"], progress=False)
    assert str(samples[0].path) in str(e.value)
