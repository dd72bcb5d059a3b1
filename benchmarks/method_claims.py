"""The paper's claims, measured on the synthetic world: random-word FNN at several N_p, FNN without random words,
the prompt score s_pr and the combination, on held-out kinds (never seen by the CLIP) and on seen kinds.

    python benchmarks/method_claims.py [--store model_store] [--clip tiny-factory-clip] [--n-pairs 1000,10000,50000]

1. Writes a synthetic MVTec-layout test set with a seed the CLIP training never used (`zsad synth dataset`).
2. Trains one FNN per setting with the normal trainer into a *temporary copy* of the store (the real store is not
   touched): `rw-<N>` (random words, N pairs) and `norw-10000` (plain object word).
3. Runs `zsad evaluate --versions ...` once per kind group (the embedding cache makes the extra versions cheap).
4. Prints image / pixel AUROC per variant and the per-defect image AUROC of the service's default score, and ends
   with one `RESULT name=method_claims ...` line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from sklearn.metrics import roc_auc_score

from service.cli import main as zsad
from service.clip_backend import ClipSpec, load_clip
from service.constants import SCORE_ALIASES
from service.evaluation.report import read_scores_csv
from service.fnn import FNNConfig
from service.prompts import RandomWordConfig
from service.settings import Settings
from service.store import ModelStore
from service.synthetic.dataset import DatasetSpec, write_mvtec
from service.synthetic.world import HELD_OUT_KINDS, TRAIN_KINDS
from service.train import TrainConfig, train_fnn_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="model_store")
    ap.add_argument("--clip", default="tiny-factory-clip")
    ap.add_argument("--n-pairs", default="1000,10000,50000")
    ap.add_argument("--seed", type=int, default=20261126, help="test-set seed (never used by training)")
    ap.add_argument("--n-good", type=int, default=30)
    ap.add_argument("--n-defect", type=int, default=10)
    ap.add_argument("--size", type=int, default=0, help="image size (default: the CLIP's render size or 64)")
    ap.add_argument("--out", default="runs/method_claims")
    ap.add_argument("--cnn-window-mode", default=None, help="attnpool or crop (default: settings)")
    ap.add_argument("--window-scales", default="1,2,3", help="recorded in each FNN manifest (as for the shipped model)")
    ap.add_argument("--tta-views", type=int, default=None,
                    help="test-time views recorded in each FNN manifest (default: the shipped default model's)")
    args = ap.parse_args()

    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="zsad-claims-"))
    store_root = tmp / "store"
    shutil.copytree(args.store, store_root, ignore=shutil.ignore_patterns("_hub"))
    store = ModelStore(store_root)
    clip_manifest = store.manifest(args.clip)
    size = args.size or int(clip_manifest.get("training", {}).get("render_size", 64))
    if args.tta_views is None:
        args.tta_views = int(store.manifest("default").get("tta", {}).get("views", 1)) if store.current("default") else 1
    data = tmp / "data"
    for kinds in (HELD_OUT_KINDS, TRAIN_KINDS):
        write_mvtec(data, DatasetSpec(kinds=tuple(kinds), seed=args.seed, n_train=0, n_good=args.n_good,
                                      n_defect=args.n_defect, size=size))
    # Score calibration images, as for the shipped model: clean renders of training kinds, their own seed.
    cal_dir = tmp / "calibration"
    write_mvtec(cal_dir, DatasetSpec(kinds=tuple(TRAIN_KINDS), seed=777, n_train=30, n_good=0, n_defect=0, size=size))
    calibration = sorted(cal_dir.rglob("*.png"))

    spec = ClipSpec("store", name=args.clip, version=clip_manifest["version"],
                    sha256=clip_manifest["files"][clip_manifest.get("weights", "open_clip_model.safetensors")])
    backend = load_clip(spec, store_root, device="cpu")
    versions = []
    train_info = {}
    settings = [(f"rw-{n}", int(n), True) for n in args.n_pairs.split(",")] + [("norw-10000", 10000, False)]
    for version, n, random_words in settings:
        cfg = TrainConfig(prompts=RandomWordConfig(n_pairs=n, seed=0), fnn=FNNConfig(seed=0), random_words=random_words,
                          window_scales=tuple(int(x) for x in args.window_scales.split(",")),
                          tta_views=args.tta_views)
        res = train_fnn_model(backend, cfg, store, "claims", version=version, make_current=True,
                              calibration_images=calibration, calibration_reference="seen kinds, seed 777")
        versions.append(version)
        train_info[version] = {"val_auroc_random_word": round(res.report.val_auroc, 4),
                               "val_auroc_clean": round(res.clean_auroc, 4), "seconds": round(res.seconds, 1)}
        print(f"trained {version}: {train_info[version]}", file=sys.stderr)

    default_score = Settings().default_score
    default_col = SCORE_ALIASES[default_score]
    main_version = "rw-10000" if "rw-10000" in versions else versions[0]
    col = f"{default_col}@{main_version}" if default_col != "s_pr" else "s_pr"
    results: dict[str, dict] = {}
    for group, kinds in (("held_out", HELD_OUT_KINDS), ("seen", TRAIN_KINDS)):
        run_dir = out / group
        argv = ["--store", str(store_root), "evaluate", str(data), "--layout", "mvtec", "--model", "claims",
                "--versions", ",".join(versions), "--categories", ",".join(kinds), "--out", str(run_dir),
                "--cache", str(tmp / "cache"), "--quiet"]
        if args.cnn_window_mode:
            import os

            os.environ["ZSAD_CNN_WINDOW_MODE"] = args.cnn_window_mode
        if zsad(argv) != 0:
            raise SystemExit(f"evaluate failed for {group}")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        results[group] = {v: {"image_auroc": m["mean"]["image_auroc"], "pixel_auroc": m["mean"]["pixel_auroc"],
                              "pro": m["mean"]["pro"]} for v, m in metrics.items()}
        records = read_scores_csv(run_dir / "scores.csv")
        per_defect = {}
        for defect in DatasetSpec(kinds=("screw",)).defects:
            rows = [r for r in records if r.label == 0 or f"/test/{defect}/" in r.path]
            labels = [r.label for r in rows]
            per_defect[defect] = round(float(roc_auc_score(labels, [r.scores[col] for r in rows])), 3)
        results[group]["per_defect_" + col] = per_defect

    print(f"\nCLIP {spec.label()} | test seed {args.seed} | {args.n_good} good + {args.n_defect} per defect per kind"
          f" | test-time views {args.tta_views}")
    print("| variant | held-out image AUROC | held-out pixel AUROC | held-out PRO | seen image AUROC | seen pixel AUROC |")
    print("|---|---|---|---|---|---|")
    for v in results["held_out"]:
        if v.startswith("per_defect"):
            continue
        h, s = results["held_out"][v], results["seen"][v]
        cells = [h["image_auroc"], h["pixel_auroc"], h["pro"], s["image_auroc"], s["pixel_auroc"]]
        print(f"| {v} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    for group in ("held_out", "seen"):
        key = next(k for k in results[group] if k.startswith("per_defect"))
        print(f"per-defect image AUROC ({group}, {key[len('per_defect_'):]}): {results[group][key]}")
    (out / "claims.json").write_text(json.dumps({"train": train_info, "results": results}, indent=2) + "\n")
    h = results["held_out"]
    worst = min(results["held_out"][next(k for k in h if k.startswith("per_defect"))].values())
    print(
        f"RESULT name=method_claims default={col} heldout_image_auroc={h[col]['image_auroc']:.3f} "
        f"heldout_pixel_auroc={h[col]['pixel_auroc']:.3f} heldout_s_pr_image={h['s_pr']['image_auroc']:.3f} "
        + " ".join(f"heldout_fnn_{v}={h['s_fnn@' + v]['image_auroc']:.3f}" for v in versions)
        + f" heldout_worst_defect={worst:.3f} tta_views={args.tta_views} seconds={time.perf_counter() - t_start:.0f}"
    )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
