from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from service.evaluation.metrics import PixelMetrics
from service.evaluation.report import ImageRecord, read_scores_csv, write_report

VARIANTS = ["s_pr", "s_fnn", "combined@v2"]


def make_records(seed: int = 0) -> list[ImageRecord]:
    rng = np.random.default_rng(seed)
    records = []
    for cat, n in (("bottle", 30), ("cable", 25)):
        for i in range(n):
            label = int(i % 3 == 0)
            scores = {v: float(rng.normal(label * (k + 1) * 0.4, 1.0)) for k, v in enumerate(VARIANTS)}
            records.append(ImageRecord(f"/data/{cat}/{i:03d}.png", cat, label, scores))
    records.append(ImageRecord("/data/only_normal/000.png", "only_normal", 0, {v: 0.5 for v in VARIANTS}))
    return records


def pixel_results() -> dict:
    pm = PixelMetrics(auroc=0.9, aupr=0.4, f1max=0.45, f1_threshold=0.6, pro=0.7, n_pixels=100,
                      n_anomalous_pixels=10, n_regions=2)
    return {v: {"bottle": pm, "cable": None} for v in VARIANTS}


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    write_report(make_records(), out, pixel_results(), VARIANTS)
    return out


def test_writes_all_files(report_dir):
    for name in ("metrics.json", "thresholds.json", "scores.csv", "report.md"):
        assert (report_dir / name).stat().st_size > 0
    for v in ("s_pr", "s_fnn", "combined_v2"):  # '@' is sanitised out of file names
        for cat in ("bottle", "cable"):
            for kind in ("roc", "pr"):
                with Image.open(report_dir / "curves" / v / f"{cat}_{kind}.png") as im:
                    assert im.format == "PNG" and im.size[0] > 100
    assert not (report_dir / "curves" / "s_pr" / "only_normal_roc.png").exists()  # one class: no curve


def test_metrics_json_equals_sklearn_from_scores_csv(report_dir):
    with open(report_dir / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "category", "label", "defect", *VARIANTS]
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert list(metrics) == VARIANTS
    for v in VARIANTS:
        for cat in ("bottle", "cable"):
            y = np.array([int(r["label"]) for r in rows if r["category"] == cat])
            s = np.array([float(r[v]) for r in rows if r["category"] == cat])
            p, rc, _ = precision_recall_curve(y, s)
            m = metrics[v][cat]
            assert m["image_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
            assert m["image_aupr"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
            assert m["image_f1max"] == pytest.approx(np.nanmax(2 * p * rc / np.maximum(p + rc, 1e-300)), abs=1e-12)
        assert metrics[v]["bottle"]["pro"] == 0.7 and metrics[v]["cable"]["pro"] is None  # null without masks
        assert metrics[v]["only_normal"]["image_auroc"] is None  # one class: undefined, not 0.5
        mean = metrics[v]["mean"]
        assert mean["image_auroc"] == pytest.approx(np.mean([metrics[v][c]["image_auroc"] for c in ("bottle", "cable")]))
        assert mean["pixel_auroc"] == 0.9  # only bottle has masks


def test_scores_csv_round_trips_exactly(report_dir):
    records = make_records()
    assert read_scores_csv(report_dir / "scores.csv") == records


def test_report_md_and_thresholds(report_dir):
    md = (report_dir / "report.md").read_text()
    for v in VARIANTS:
        assert f"## Variant `{v}`" in md
    assert md.count("| **mean** |") == len(VARIANTS) and "| bottle | 20 | 10 |" in md
    assert "1% false rejects" in md
    th = json.loads((report_dir / "thresholds.json").read_text())
    normal = [r.scores["s_fnn"] for r in make_records() if r.category == "cable" and r.label == 0]
    assert th["s_fnn"]["cable"]["fr_threshold"] == pytest.approx(np.quantile(normal, 0.99))
    assert set(th["s_fnn"]) == {"bottle", "cable", "only_normal", "all"}


def test_category_named_mean_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mean"):
        write_report([ImageRecord("x.png", "mean", 0, {"s": 0.1})], tmp_path, curves=False)
