"""Evaluation outputs: metrics.json, thresholds.json, scores.csv, report.md and ROC / PR curve PNGs.

Inputs are plain per-image records (path, category, label, {variant: score}) and, per variant and category, the
`PixelMetrics` of a streaming accumulator (or None where a category has no masks). Variants are free-form strings
(`s_pr`, `s_fnn`, `combined`, `combined@v3`, ...); they only become file names after sanitising.

metrics.json: {variant: {category: {image_auroc, image_aupr, image_f1max, pixel_auroc, pixel_aupr, pixel_f1max,
pro}, "mean": {...}}}; a metric is null where it is undefined (no masks, or only one class in the category). The
mean is over the categories where the metric is defined, as in the MVTec-AD / VisA literature.
"""
from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .metrics import PixelMetrics, ThresholdAdvice, curves_from_scores, image_metrics, threshold_advice

METRIC_KEYS = ("image_auroc", "image_aupr", "image_f1max", "pixel_auroc", "pixel_aupr", "pixel_f1max", "pro")
MEAN = "mean"
ALL = "all"
PixelResults = dict[str, dict[str, PixelMetrics | None]]  # variant -> category -> metrics


@dataclass(frozen=True)
class ImageRecord:
    path: str
    category: str
    label: int
    scores: dict[str, float]  # variant -> image score


def _none_if_nan(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _by_category(records: Sequence[ImageRecord]) -> dict[str, list[ImageRecord]]:
    groups: dict[str, list[ImageRecord]] = {}
    for r in records:
        groups.setdefault(r.category, []).append(r)
    if MEAN in groups:
        raise ValueError(f"a category may not be called {MEAN!r}: it is the name of the mean row")
    return {c: groups[c] for c in sorted(groups)}


def _arrays(records: Sequence[ImageRecord], variant: str) -> tuple[np.ndarray, np.ndarray]:
    return np.array([r.label for r in records]), np.array([r.scores[variant] for r in records], dtype=np.float64)


def variants_of(records: Sequence[ImageRecord]) -> list[str]:
    """Variants in first-seen order."""
    return list(dict.fromkeys(v for r in records for v in r.scores))


# ------------------------------------------------------------------------------------------------------------------
# Numbers
# ------------------------------------------------------------------------------------------------------------------

def compute_metrics(records: Sequence[ImageRecord], variants: Sequence[str],
                    pixel: PixelResults | None = None) -> dict:
    """The metrics.json structure; NaN (undefined) becomes None."""
    out: dict = {}
    for v in variants:
        per_cat: dict = {}
        for cat, recs in _by_category(records).items():
            im = image_metrics(*_arrays(recs, v))
            px = (pixel or {}).get(v, {}).get(cat)
            row = {"image_auroc": im.auroc, "image_aupr": im.aupr, "image_f1max": im.f1max,
                   "pixel_auroc": px.auroc if px else None, "pixel_aupr": px.aupr if px else None,
                   "pixel_f1max": px.f1max if px else None, "pro": px.pro if px else None}
            per_cat[cat] = {k: _none_if_nan(row[k]) for k in METRIC_KEYS}
        mean = {}
        for k in METRIC_KEYS:
            vals = [m[k] for m in per_cat.values() if m[k] is not None]
            mean[k] = float(np.mean(vals)) if vals else None
        out[v] = {**per_cat, MEAN: mean}
    return out


def compute_thresholds(records: Sequence[ImageRecord], variants: Sequence[str],
                       false_reject_rate: float = 0.01) -> dict[str, dict[str, ThresholdAdvice]]:
    """Threshold advice per variant, per category and over all images ("all")."""
    groups = {**_by_category(records), ALL: list(records)}
    out = {}
    for v in variants:
        out[v] = {cat: threshold_advice(*_arrays(recs, v), false_reject_rate) for cat, recs in groups.items()}
    return out


# ------------------------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------------------------

def write_scores_csv(records: Sequence[ImageRecord], variants: Sequence[str], path: Path) -> None:
    """One row per image; floats written with repr so they read back bit-exact."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "category", "label", *variants])
        for r in records:
            w.writerow([r.path, r.category, r.label, *(repr(float(r.scores[v])) for v in variants)])


def read_scores_csv(path: Path) -> list[ImageRecord]:
    """Inverse of `write_scores_csv`, so a report can be rebuilt from scores alone."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return []
    variants = [k for k in rows[0] if k not in ("path", "category", "label")]
    return [ImageRecord(r["path"], r["category"], int(r["label"]), {v: float(r[v]) for v in variants})
            for r in rows]


def _json_ready(x):
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, ThresholdAdvice):
        return _json_ready(x.to_dict())
    if isinstance(x, float):
        return _none_if_nan(x)
    return x


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100.0 * x:.1f}"


def _num(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.4g}"


def render_markdown(metrics: dict, thresholds: dict[str, dict[str, ThresholdAdvice]],
                    records: Sequence[ImageRecord], false_reject_rate: float) -> str:
    groups = _by_category(records)
    n0 = sum(r.label == 0 for r in records)
    lines = ["# Evaluation report", "",
             f"{len(records)} images ({n0} normal, {len(records) - n0} anomalous) in {len(groups)} categories. "
             "Metrics in %; — means undefined (no masks, or one class only). The mean is over the categories "
             "where a metric is defined.", "",
             "## Summary (mean over categories)", "",
             "| variant | I-AUROC | I-AUPR | I-F1max | P-AUROC | P-AUPR | P-F1max | PRO |",
             "|---|---|---|---|---|---|---|---|"]
    for v, per_cat in metrics.items():
        lines.append(f"| `{v}` | " + " | ".join(_pct(per_cat[MEAN][k]) for k in METRIC_KEYS) + " |")
    for v, per_cat in metrics.items():
        lines += ["", f"## Variant `{v}`", "",
                  "| category | normal | anomalous | I-AUROC | I-AUPR | I-F1max | P-AUROC | P-AUPR | P-F1max | PRO |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for cat, recs in groups.items():
            k1 = sum(r.label for r in recs)
            lines.append(f"| {cat} | {len(recs) - k1} | {k1} | "
                         + " | ".join(_pct(per_cat[cat][k]) for k in METRIC_KEYS) + " |")
        lines.append(f"| **{MEAN}** | {n0} | {len(records) - n0} | "
                     + " | ".join(f"**{_pct(per_cat[MEAN][k])}**" for k in METRIC_KEYS) + " |")
        adv = thresholds[v]
        lines += ["", f"Threshold advice for `{v}` (anomalous if score >= threshold, in score units; with n normal "
                  "images the observed false-reject rate cannot go below 1/n):", "",
                  f"| category | F1-optimal threshold | F1 | threshold at {100 * false_reject_rate:g}% false rejects "
                  "| observed false rejects | anomalies caught |",
                  "|---|---|---|---|---|---|"]
        for cat, a in adv.items():
            lines.append(f"| {cat} | {_num(a.f1_threshold)} | {_pct(_none_if_nan(a.f1))} | {_num(a.fr_threshold)} | "
                         f"{_pct(_none_if_nan(a.fr_observed))} | {_pct(_none_if_nan(a.recall_at_fr))} |")
    return "\n".join(lines) + "\n"


def safe_name(name: str) -> str:
    """A file-name-safe form of a variant or category name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "_"


def plot_curves(records: Sequence[ImageRecord], variants: Sequence[str], out_dir: Path) -> list[Path]:
    """ROC and PR PNGs per variant and category (Agg canvas, no pyplot state); categories with one class skipped.
    The PR curve is drawn as steps whose area is the reported AP (no interpolation)."""
    written = []
    for v in variants:
        vdir = out_dir / safe_name(v)
        for cat, recs in _by_category(records).items():
            c = curves_from_scores(*_arrays(recs, v))
            if not c.defined:
                continue
            vdir.mkdir(parents=True, exist_ok=True)
            fpr, tpr = c.roc()
            recall, precision = c.pr()
            plots = {"roc": (fpr, tpr, "false positive rate", "true positive rate", f"AUROC {c.auroc():.3f}"),
                     "pr": (np.concatenate([[0.0], recall]), np.concatenate([[1.0], precision]), "recall",
                            "precision", f"AP {c.aupr():.3f}")}
            for kind, (x, y, xlabel, ylabel, value) in plots.items():
                fig = Figure(figsize=(4, 4), dpi=80)
                FigureCanvasAgg(fig)
                ax = fig.add_subplot()
                ax.plot(x, y, drawstyle="steps-pre" if kind == "pr" else "default")
                if kind == "roc":
                    ax.plot([0, 1], [0, 1], ls=":", c="grey")
                ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=xlabel, ylabel=ylabel, title=f"{cat} · {v} · {value}")
                fig.tight_layout()
                path = vdir / f"{safe_name(cat)}_{kind}.png"
                fig.savefig(path)
                written.append(path)
    return written


def write_report(records: Sequence[ImageRecord], out_dir: str | Path, pixel: PixelResults | None = None,
                 variants: Sequence[str] | None = None, curves: bool = True,
                 false_reject_rate: float = 0.01) -> dict:
    """Write every output into `out_dir` and return the metrics.json structure."""
    if not records:
        raise ValueError("no records to report")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = list(variants) if variants is not None else variants_of(records)
    metrics = compute_metrics(records, variants, pixel)
    thresholds = compute_thresholds(records, variants, false_reject_rate)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out_dir / "thresholds.json").write_text(json.dumps(_json_ready(thresholds), indent=2) + "\n")
    write_scores_csv(records, variants, out_dir / "scores.csv")
    (out_dir / "report.md").write_text(render_markdown(metrics, thresholds, records, false_reject_rate))
    if curves:
        plot_curves(records, variants, out_dir / "curves")
    return metrics
