"""Calibrated verdicts and localisation of the shipped model: the pixel-threshold rule and the minimum region area,
chosen on validation kinds, then measured on held-out kinds.

    python benchmarks/localisation.py [--store model_store] [--model default]

Per kind, a product is calibrated as `POST /v1/calibrate/{product}?target_frr=0.05` does, from 30 good parts
(`train/good` of a synthetic set): the image threshold on their scores, the pixel threshold on their heat peaks
(`service.calibration.NormalHeat`: the 0.98 quantile of their heat). Then on the kind's test images:

- false rejects (good parts scored above the threshold) and the catch rate (defective parts above it), per defect;
  false rejects also averaged over 500 random 30-part calibrations drawn from all the kind's good parts (one split is
  too noisy to check a 5% rate);
- hit@1: defective images whose hottest pixel lies in the defect mask dilated by one feature-grid cell, against the
  same with another defective image's mask (shuffled control), as `zsad evaluate` computes them;
- region precision / recall of the service's regions (`heatmap.localise`, gated by the label) at the pixel threshold;
- the region invariants on every test image: anomalous => >= 1 region and the hottest holds the heat's maximum;
  normal => none; no region below the minimum area; the mask is exactly the union of the regions.

The pixel rule (a quantile of the heat of all normal pixels; or the heat peak that at most a share of the normal
parts exceed, thresholded like the image scores) and the minimum region area are chosen on the validation kinds only
(`widget` / `pattern`, seed 31337): the pair with the best region F1 (harmonic mean of precision and recall), the
smallest area on ties. Held-out kinds (`hex_nut`, `pill`, `leather`, test seed 20261126) are measured, never tuned on.
Baseline in the same run: the uncalibrated service (the model's threshold advice and ZSAD_MASK_THRESHOLD's old 0.5
for the regions, no minimum area, regions not gated by the label), on the same images.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from service.calibration import NormalHeat
from service.constants import MIN_REGION_AREA, PIXEL_QUANTILE
from service.detector import load_detector
from service.evaluation.metrics import derangement, hit_at_1, patch_pixels, region_matches
from service.evaluation.readers import load_mask, read_mvtec
from service.heatmap import localise, min_area_pixels, regions
from service.preprocess import load_image
from service.settings import Settings
from service.synthetic.dataset import DatasetSpec, write_mvtec
from service.synthetic.world import HELD_OUT_KINDS, RANDOM_KINDS
from service.thresholds import calibrate

TARGET_FRR = 0.05
PEAK_FRRS = (0.01, 0.05, 0.1, 0.2)  # pixel threshold: the heat peak at most this share of normal parts exceed
PIXEL_QUANTILES = (0.95, 0.98, 0.99, 0.999)  # or: this quantile of all normal pixels (the service's rule)
AREAS = (0.001, 0.0025, 0.005, 0.01, 0.02)


def run_kind(det, root: Path, kind: str, n_cal: int, batch: int) -> dict:
    """Everything a kind needs, computed once: calibration scores/peaks/pixels, and the test images' outputs."""
    score_name = det.settings.default_score
    cal_paths = sorted((root / kind / "train" / "good").glob("*.png"))[:n_cal]
    cal_scores, cal_peaks, normal_heat = [], [], NormalHeat()
    for i in range(0, len(cal_paths), batch):
        ims = [load_image(p) for p in cal_paths[i:i + batch]]
        cal_scores += [d.scores[score_name] for d in det.detect(ims, heatmap=False)]
        for d in det.detect(ims, heatmap=True):
            cal_peaks.append(float(d.heat[score_name].max()))
            normal_heat.add(d.heat[score_name])
    samples = [s for s in read_mvtec(root).samples if s.category == kind]
    tests = []
    for i in range(0, len(samples), batch):
        part = samples[i:i + batch]
        for s, d in zip(part, det.detect([load_image(s.path) for s in part], heatmap=True)):
            heat = d.heat[score_name]
            grid = d.grid[score_name].shape
            tests.append({"sample": s, "score": d.scores[score_name], "heat": heat,
                          "patch": patch_pixels(heat.shape, grid),
                          "mask": load_mask(s.mask_path) if s.label else np.zeros(heat.shape, bool)})
    return {"cal_scores": cal_scores, "cal_peaks": cal_peaks, "normal_heat": normal_heat, "tests": tests}


def pixel_threshold(run: dict, rule: tuple[str, float]) -> float:
    kind, value = rule
    if kind == "peak":
        return calibrate(run["cal_peaks"], value)[0]
    return run["normal_heat"].threshold(value)


def resampled_frr(run: dict, n_cal: int, rounds: int = 500, seed: int = 0) -> float:
    """False rejects on fresh good parts, averaged over random calibration / fresh splits of all the kind's good parts
    (the calibration images and the good test images): one split of 30 + 30 is too noisy to check a 5% rate (its
    standard error is about 4 points), and the promise of `calibrate` is an average over such draws."""
    pool = np.asarray(run["cal_scores"] + [t["score"] for t in run["tests"] if t["sample"].label == 0])
    rng = np.random.default_rng(seed)
    rates = []
    for _ in range(rounds):
        perm = rng.permutation(len(pool))
        threshold = calibrate(list(pool[perm[:n_cal]]), TARGET_FRR)[0]
        rates.append(float(np.mean(pool[perm[n_cal:]] > threshold)))
    return float(np.mean(rates))


def regions_of(t: dict, threshold: float, pixel: float, area: float, gated: bool = True):
    anomalous = t["score"] > threshold
    if gated:
        return localise(t["heat"], pixel, min_area_pixels(t["heat"].shape, area), anomalous)
    found = regions(t["heat"], pixel)  # the old behaviour: every area above the pixel threshold, whatever the label
    mask = np.zeros(t["heat"].shape, np.uint8)
    for r in found:
        mask[r.y0:r.y1, r.x0:r.x1] |= np.where(t["heat"][r.y0:r.y1, r.x0:r.x1] > pixel, 255, 0).astype(np.uint8)
    return found, mask


def measure(run: dict, threshold: float, pixel: float, area: float, gated: bool = True) -> dict:
    tests = run["tests"]
    good = [t for t in tests if t["sample"].label == 0]
    bad = [t for t in tests if t["sample"].label == 1]
    counts = np.zeros(4, int)
    invariant_failures = 0
    for t in tests:
        found, mask = regions_of(t, threshold, pixel, area, gated)
        counts += region_matches(mask > 0, t["mask"])
        anomalous = t["score"] > threshold
        union = np.zeros(mask.shape, bool)
        for r in found:
            union[r.y0:r.y1, r.x0:r.x1] |= True
        peak = np.unravel_index(int(np.argmax(t["heat"])), t["heat"].shape)
        ok = (bool(found) == anomalous
              and (not found or (found[0].y0 <= peak[0] < found[0].y1 and found[0].x0 <= peak[1] < found[0].x1
                                 and found[0].max_score == float(t["heat"].max())))
              and all(r.area_px >= min_area_pixels(t["heat"].shape, area) for r in found)
              and sum(r.area_px for r in found) == int((mask > 0).sum()) and not ((mask > 0) & ~union).any())
        invariant_failures += not ok
    partner = derangement(len(bad), seed=0)
    hits = [hit_at_1(t["heat"], t["mask"], t["patch"]) for t in bad]
    shuffled = [hit_at_1(t["heat"], bad[int(partner[i])]["mask"], t["patch"]) for i, t in enumerate(bad)]
    precision = counts[1] / counts[0] if counts[0] else float("nan")
    recall = counts[3] / counts[2] if counts[2] else float("nan")
    per_defect: dict[str, list[bool]] = {}
    for t in bad:
        per_defect.setdefault(t["sample"].defect, []).append(t["score"] > threshold)
    return {"frr": float(np.mean([t["score"] > threshold for t in good])),
            "catch": float(np.mean([t["score"] > threshold for t in bad])),
            "catch_by_defect": {d: float(np.mean(v)) for d, v in sorted(per_defect.items())},
            "hit_at_1": float(np.mean(hits)), "shuffled": float(np.mean(shuffled)),
            "precision": float(precision), "recall": float(recall),
            "f1": float(2 * precision * recall / (precision + recall)) if precision + recall > 0 else 0.0,
            "invariant_failures": invariant_failures, "n": len(tests)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="model_store")
    ap.add_argument("--model", default="default")
    ap.add_argument("--n-cal", type=int, default=30)
    ap.add_argument("--n-good", type=int, default=30)
    ap.add_argument("--n-defect", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    det = load_detector(Settings(model_store=Path(args.store), model_name=args.model, device="cpu", precision="fp32"))
    score_name = det.settings.default_score
    advice = float(det.manifest.get("threshold_advice", {}).get(score_name, 0.5))
    rules = [("peak", f) for f in PEAK_FRRS] + [("pixels", q) for q in PIXEL_QUANTILES]
    with tempfile.TemporaryDirectory(prefix="zsad-loc-") as tmp:
        runs = {}
        for group, seed, kinds in (("validation", 31337, RANDOM_KINDS), ("held_out", 20261126, HELD_OUT_KINDS)):
            root = Path(tmp) / group
            write_mvtec(root, DatasetSpec(kinds=tuple(kinds), seed=seed, n_train=args.n_cal, n_good=args.n_good,
                                          n_defect=args.n_defect))
            for kind in kinds:
                runs[(group, kind)] = run_kind(det, root, kind, args.n_cal, args.batch)

    def thresholds(run: dict, rule: tuple[str, float]) -> tuple[float, float]:
        return calibrate(run["cal_scores"], TARGET_FRR)[0], pixel_threshold(run, rule)

    # choose the rule and the area on the validation kinds
    table = {}
    for rule in rules:
        for area in AREAS:
            f1 = [measure(r, *thresholds(r, rule), area)["f1"] for (g, _), r in runs.items() if g == "validation"]
            table[(rule, area)] = float(np.mean(f1))
    print("validation kinds (widget, pattern; seed 31337): region F1 by pixel rule x min area")
    print("rule            " + "".join(f"{a:>9g}" for a in AREAS))
    for rule in rules:
        print(f"{rule[0]:>6} {rule[1]:<8g} " + "".join(f"{table[(rule, a)]:9.3f}" for a in AREAS))
    best = max(table.values())
    chosen_rule, chosen_area = min((k for k, v in table.items() if v == best), key=lambda k: (k[1], k[0]))
    print(f"chosen: {chosen_rule[0]} {chosen_rule[1]:g}, min area {chosen_area:g} (region F1 {best:.4f}); "
          f"shipped: pixels {PIXEL_QUANTILE:g}, min area {MIN_REGION_AREA:g}")

    print(f"\nheld-out kinds (seed 20261126), calibrated from {args.n_cal} good parts at target_frr {TARGET_FRR}, "
          f"shipped rule (pixels {PIXEL_QUANTILE:g}, min area {MIN_REGION_AREA:g}):")
    print("kind      threshold  pixel   cal.rej  false rej  caught  hit@1  shuffled  reg.prec  reg.rec  invariants   "
          "| uncalibrated: false rej  caught  reg.prec  reg.rec  invariants")
    held = {}
    for (group, kind), r in runs.items():
        if group != "held_out":
            continue
        t, p = thresholds(r, ("pixels", PIXEL_QUANTILE))
        m = held[kind] = measure(r, t, p, MIN_REGION_AREA)
        u = measure(r, advice, 0.5, 0.0, gated=False)
        m["cal_frr"] = float(np.mean(np.asarray(r["cal_scores"]) > t))
        m["frr_resampled"] = resampled_frr(r, args.n_cal)  # <= 5% by construction (conformal rank)
        print(f"{kind:<9} {t:9.3f} {p:6.3f}  {m['cal_frr']:7.1%}  {m['frr']:9.1%} "
              f"{m['catch']:7.1%} {m['hit_at_1']:6.1%} {m['shuffled']:9.1%} "
              f"{m['precision']:9.1%} {m['recall']:8.1%}  {m['n'] - m['invariant_failures']:>4}/{m['n']:<4}   "
              f"| {u['frr']:22.1%} {u['catch']:7.1%} {u['precision']:9.1%} {u['recall']:8.1%}  "
              f"{u['n'] - u['invariant_failures']:>4}/{u['n']}")
        print(f"          false rejects on fresh good parts over 500 random {args.n_cal}-part calibrations: "
              f"{m['frr_resampled']:.1%}")
        print("          caught by defect: " + ", ".join(f"{d} {v:.0%}" for d, v in m["catch_by_defect"].items()))
    keys = ("cal_frr", "frr", "frr_resampled", "catch", "hit_at_1", "shuffled", "precision", "recall")
    mean = {k: float(np.mean([m[k] for m in held.values()])) for k in keys}
    n = sum(m["n"] for m in held.values())
    ok = n - sum(m["invariant_failures"] for m in held.values())
    print(f"RESULT name=localisation rule=pixels@{PIXEL_QUANTILE:g} min_area={MIN_REGION_AREA:g} "
          f"chosen_rule={chosen_rule[0]}@{chosen_rule[1]:g} chosen_area={chosen_area:g} "
          f"held_out_cal_frr={mean['cal_frr']:.3f} held_out_frr={mean['frr']:.3f} "
          f"held_out_frr_resampled={mean['frr_resampled']:.3f} "
          f"held_out_catch={mean['catch']:.3f} hit_at_1={mean['hit_at_1']:.3f} "
          f"hit_at_1_shuffled={mean['shuffled']:.3f} region_precision={mean['precision']:.3f} "
          f"region_recall={mean['recall']:.3f} invariants={ok}/{n}")


if __name__ == "__main__":
    main()
