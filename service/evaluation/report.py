"""Evaluation outputs: metrics.json, thresholds.json, scores.csv, report.md, ROC / PR curves, score histograms and
the image panels (image | ground truth | heat with a colour bar | predicted mask).

Inputs are plain per-image records (path, category, label, {variant: score}) and, per variant and category, the
`PixelMetrics` of a streaming accumulator (or None where a category has no masks). Variants are free-form strings
(`s_pr`, `s_fnn`, `combined`, `combined@v3`, ...); they only become file names after sanitising.

metrics.json: {variant: {category: {image_auroc, image_aupr, image_f1max, pixel_auroc, pixel_aupr, pixel_f1max,
pro, hit_at_1, hit_at_1_shuffled, region_precision, region_recall}, "mean": {...}}}; a metric is null where it is
undefined (no masks, one class only, no thresholds for the regions). The mean is over the categories where the metric
is defined, as in the MVTec-AD / VisA literature. per_defect.json: {category: {defect: {image_auroc, pixel_auroc, pro,
n}}} of the label variant (see `run.evaluate`), each defect folder against the category's good images.
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
LOCALISATION_KEYS = ("hit_at_1", "hit_at_1_shuffled", "region_precision", "region_recall")
MEAN = "mean"
ALL = "all"
PixelResults = dict[str, dict[str, PixelMetrics | None]]  # variant -> category -> metrics


@dataclass(frozen=True)
class ImageRecord:
    path: str
    category: str
    label: int
    scores: dict[str, float]  # variant -> image score
    defect: str = ""  # the defect folder ("good" for normal images; "" when the reader gives none)


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
                    pixel: PixelResults | None = None, localisation: dict | None = None) -> dict:
    """The metrics.json structure (without "per_defect"); NaN (undefined) becomes None."""
    out: dict = {}
    keys = METRIC_KEYS + LOCALISATION_KEYS
    for v in variants:
        per_cat: dict = {}
        for cat, recs in _by_category(records).items():
            im = image_metrics(*_arrays(recs, v))
            px = (pixel or {}).get(v, {}).get(cat)
            loc = (localisation or {}).get(v, {}).get(cat) or {}
            row = {"image_auroc": im.auroc, "image_aupr": im.aupr, "image_f1max": im.f1max,
                   "pixel_auroc": px.auroc if px else None, "pixel_aupr": px.aupr if px else None,
                   "pixel_f1max": px.f1max if px else None, "pro": px.pro if px else None,
                   **{k: loc.get(k) for k in LOCALISATION_KEYS}}
            per_cat[cat] = {k: _none_if_nan(row[k]) for k in keys}
        mean = {}
        for k in keys:
            vals = [m[k] for m in per_cat.values() if m[k] is not None]
            mean[k] = float(np.mean(vals)) if vals else None
        out[v] = {**per_cat, MEAN: mean}
    return out


def compute_per_defect(records: Sequence[ImageRecord], variant: str,
                       defect_pixel: dict[str, dict[str, PixelMetrics]] | None = None) -> dict:
    """{category: {defect: {image_auroc, pixel_auroc, pro, n}}}: each defect folder against the category's good
    images (image AUROC from the scores; pixel AUROC and PRO from the per-defect accumulators where masks exist)."""
    out: dict = {}
    for cat, recs in _by_category(records).items():
        good = [r for r in recs if r.label == 0]
        rows = {}
        for defect in sorted({r.defect or "anomalous" for r in recs if r.label == 1}):
            bad = [r for r in recs if r.label == 1 and (r.defect or "anomalous") == defect]
            px = (defect_pixel or {}).get(cat, {}).get(defect)
            rows[defect] = {"image_auroc": _none_if_nan(image_metrics(*_arrays(good + bad, variant)).auroc),
                            "pixel_auroc": _none_if_nan(px.auroc) if px else None,
                            "pro": _none_if_nan(px.pro) if px else None, "n": len(bad)}
        if rows:
            out[cat] = rows
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
        w.writerow(["path", "category", "label", "defect", *variants])
        for r in records:
            w.writerow([r.path, r.category, r.label, r.defect, *(repr(float(r.scores[v])) for v in variants)])


def read_scores_csv(path: Path) -> list[ImageRecord]:
    """Inverse of `write_scores_csv`, so a report can be rebuilt from scores alone."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return []
    variants = [k for k in rows[0] if k not in ("path", "category", "label", "defect")]
    return [ImageRecord(r["path"], r["category"], int(r["label"]), {v: float(r[v]) for v in variants},
                        r.get("defect") or "") for r in rows]


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
                    records: Sequence[ImageRecord], false_reject_rate: float, per_defect: dict | None = None,
                    label_variant: str | None = None, thresholds_used: dict | None = None,
                    figures: dict[str, list[Path]] | None = None) -> str:
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
        lines += ["", f"Threshold advice for `{v}` (anomalous if score > threshold, as the service decides; with n normal "
                  "images the observed false-reject rate cannot go below 1/n):", "",
                  f"| category | F1-optimal threshold | F1 | threshold at {100 * false_reject_rate:g}% false rejects "
                  "| observed false rejects | anomalies caught |",
                  "|---|---|---|---|---|---|"]
        for cat, a in adv.items():
            lines.append(f"| {cat} | {_num(a.f1_threshold)} | {_pct(_none_if_nan(a.f1))} | {_num(a.fr_threshold)} | "
                         f"{_pct(_none_if_nan(a.fr_observed))} | {_pct(_none_if_nan(a.recall_at_fr))} |")
    lines += _localisation_md(metrics, label_variant, thresholds_used)
    lines += _per_defect_md(per_defect, label_variant)
    lines += _figures_md(figures or {})
    return "\n".join(lines) + "\n"


def _localisation_md(metrics: dict, label_variant: str | None, thresholds_used: dict | None) -> list[str]:
    rows = [(v, cat, m) for v, per_cat in metrics.items() for cat, m in per_cat.items()
            if any(m.get(k) is not None for k in LOCALISATION_KEYS)]
    if not rows:
        return []
    lines = ["", "## Localisation", "",
             "hit@1: share of defective images whose hottest pixel lies in the defect mask dilated by one feature-grid "
             "cell; shuffled: the same against another defective image's mask of the category (a control: heat that "
             "sits on the part, not on the defect, scores about as well). Regions (the service's: none on an image "
             "labelled normal, at least one holding the heat's maximum on an anomalous one) at the thresholds below: "
             "precision = regions touching a defect, recall = defects touched by a region. In %.", "",
             "| variant | category | hit@1 | shuffled | hit@1 − shuffled | region precision | region recall |",
             "|---|---|---|---|---|---|---|"]
    for v, cat, m in rows:
        gap = (m["hit_at_1"] - m["hit_at_1_shuffled"] if m.get("hit_at_1") is not None
               and m.get("hit_at_1_shuffled") is not None else None)
        name = f"**{cat}**" if cat == MEAN else cat
        lines.append(f"| `{v}` | {name} | {_pct(m.get('hit_at_1'))} | {_pct(m.get('hit_at_1_shuffled'))} | "
                     f"{_pct(gap)} | {_pct(m.get('region_precision'))} | {_pct(m.get('region_recall'))} |")
    if thresholds_used and label_variant:
        lines += ["", f"Thresholds of `{label_variant}` for the regions and the panels (anomalous if score > threshold):",
                  "", "| category | image threshold | pixel threshold | source |", "|---|---|---|---|"]
        for cat, t in sorted(thresholds_used.items()):
            lines.append(f"| {cat} | {_num(float(t['threshold']))} | {_num(float(t['pixel_threshold']))} | "
                         f"{t.get('source', '')} |")
    return lines


def _per_defect_md(per_defect: dict | None, label_variant: str | None) -> list[str]:
    if not per_defect:
        return []
    lines = ["", f"## Per defect type (`{label_variant}`)", "",
             "Each defect folder against the category's good images, in %.", "",
             "| category | defect | images | I-AUROC | P-AUROC | PRO |", "|---|---|---|---|---|---|"]
    for cat, rows in per_defect.items():
        for defect, m in rows.items():
            lines.append(f"| {cat} | {defect} | {m['n']} | {_pct(m['image_auroc'])} | {_pct(m['pixel_auroc'])} | "
                         f"{_pct(m['pro'])} |")
    return lines


def _figures_md(figures: dict[str, list[Path]]) -> list[str]:
    lines: list[str] = []
    titles = {"histograms": "Score histograms (good vs defective)", "curves": "ROC and PR curves"}
    for kind, paths in figures.items():
        if not paths:
            continue
        lines += ["", f"## {titles.get(kind, kind)}", ""]
        lines += [f"- [{path.as_posix()}]({path.as_posix()})" for path in paths]
    return lines


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


def plot_histograms(records: Sequence[ImageRecord], variants: Sequence[str], out_dir: Path,
                    thresholds_used: dict | None = None, label_variant: str | None = None) -> list[Path]:
    """A histogram of the scores of good vs defective images per variant and category (the label variant's with its
    image threshold drawn)."""
    written = []
    for v in variants:
        vdir = out_dir / safe_name(v)
        for cat, recs in _by_category(records).items():
            labels, scores = _arrays(recs, v)
            vdir.mkdir(parents=True, exist_ok=True)
            fig = Figure(figsize=(5, 3.2), dpi=80)
            FigureCanvasAgg(fig)
            ax = fig.add_subplot()
            edges = np.linspace(min(0.0, scores.min()), max(1.0, scores.max()), 41)
            ax.hist(scores[labels == 0], bins=edges, alpha=0.6, color="#2f7fb3", label=f"good ({int((labels == 0).sum())})")
            ax.hist(scores[labels == 1], bins=edges, alpha=0.6, color="#c0362c",
                    label=f"defective ({int((labels == 1).sum())})")
            t = (thresholds_used or {}).get(cat) if v == label_variant else None
            if t is not None:
                ax.axvline(float(t["threshold"]), color="black", ls="--", lw=1, label=f"threshold {float(t['threshold']):.3f}")
            ax.set(xlabel="score", ylabel="images", title=f"{cat} · {v}")
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = vdir / f"{safe_name(cat)}_hist.png"
            fig.savefig(path)
            written.append(path)
    return written


def render_panel(image: np.ndarray, truth: np.ndarray | None, heat: np.ndarray, predicted: np.ndarray, caption: str,
                 path: Path) -> Path:
    """One row: image | ground truth | heat overlay with a colour bar | predicted mask, and a caption below."""
    fig = Figure(figsize=(10, 3.1), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4)
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(np.zeros(heat.shape) if truth is None else truth, cmap="gray", vmin=0, vmax=1)
    axes[1].set_title("ground truth" + (" (none: good)" if truth is None else ""), fontsize=9)
    axes[2].imshow(image)
    shown = axes[2].imshow(heat, cmap="jet", vmin=0.0, vmax=1.0, alpha=0.5)
    fig.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.04)
    axes[2].set_title("heat", fontsize=9)
    axes[3].imshow(predicted > 0, cmap="gray", vmin=0, vmax=1)
    axes[3].set_title("predicted mask", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.text(0.5, 0.02, caption, ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def append_panels(out_dir: str | Path, panels: Sequence[tuple[str, Path, str]]) -> None:
    """Add the panels (section title, PNG path, caption) to report.md, each linked."""
    out_dir = Path(out_dir)
    lines: list[str] = []
    section = None
    for title, path, caption in panels:
        if title != section:
            lines += ["", f"## {title}", ""]
            section = title
        rel = path.relative_to(out_dir).as_posix() if path.is_absolute() else path.as_posix()
        lines.append(f"- [{rel}]({rel}): {caption}")
    with open(out_dir / "report.md", "a") as f:
        f.write("\n".join(lines) + "\n")


def write_report(records: Sequence[ImageRecord], out_dir: str | Path, pixel: PixelResults | None = None,
                 variants: Sequence[str] | None = None, curves: bool = True,
                 false_reject_rate: float = 0.01, localisation: dict | None = None,
                 defect_pixel: dict | None = None, label_variant: str | None = None,
                 thresholds_used: dict | None = None) -> dict:
    """Write every output into `out_dir` and return the metrics.json structure."""
    if not records:
        raise ValueError("no records to report")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = list(variants) if variants is not None else variants_of(records)
    label_variant = label_variant or variants[-1]
    metrics = compute_metrics(records, variants, pixel, localisation)
    per_defect = compute_per_defect(records, label_variant, defect_pixel)
    thresholds = compute_thresholds(records, variants, false_reject_rate)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out_dir / "per_defect.json").write_text(json.dumps(per_defect, indent=2) + "\n")
    (out_dir / "thresholds.json").write_text(json.dumps(_json_ready(thresholds), indent=2) + "\n")
    write_scores_csv(records, variants, out_dir / "scores.csv")
    figures = {"histograms": plot_histograms(records, variants, out_dir / "histograms", thresholds_used, label_variant),
               "curves": plot_curves(records, variants, out_dir / "curves") if curves else []}
    figures = {k: [p.relative_to(out_dir) for p in v] for k, v in figures.items()}
    (out_dir / "report.md").write_text(render_markdown(metrics, thresholds, records, false_reject_rate, per_defect,
                                                       label_variant, thresholds_used, figures))
    return metrics
