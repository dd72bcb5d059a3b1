"""Embedded model versions compared on one family of synthetic test images: the v4 publish decision (issue 18).

    python benchmarks/embedded_model.py --clips v3,v4 --family validation [--store model_store] [--seed 4242]

For each CLIP version: the default FNN recipe (10,000 random-word prompt pairs, seed 0, the shipped model's test-time
views) is trained into a *temporary copy* of the store, calibrated on clean seen-kind renders (seed 777), and
`zsad evaluate` runs on a test set rendered at that CLIP's own render size from the same scenes (same seeds):

- `validation`: the validation family, random kinds widget/pattern/weave/label with reserved looks (never drawn in
  CLIP or FNN training), wide-world photometric jitter, all defects of the wide world. Publish choices are made here.
- `held_out`: hex_nut/pill/leather in the named world (the README's setting). Report only; a fixed test seed.
- `robust`: the held-out kinds in the wide world's evaluation-only photometric setting (brighter, noisier).
- `seen`: the seven training kinds in the named world, so a candidate's forgetting of what it was trained on shows.

Several window-scale sets per CLIP (`--scales "1,2,3;2,4,6"`) are evaluated as FNN versions sharing one set of
weights, each in its own `zsad evaluate` run (its windows need their own CLIP pass). Ends with one
`RESULT name=embedded_model ...` line per CLIP.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from service.cli import main as zsad
from service.clip_backend import ClipSpec, load_clip
from service.constants import SCORE_ALIASES
from service.fnn import FNNConfig
from service.prompts import RandomWordConfig
from service.settings import Settings
from service.store import ModelStore
from service.synthetic.dataset import DatasetSpec, write_mvtec, write_wide_family
from service.synthetic.world import DEFECTS, HELD_OUT_KINDS, TRAIN_KINDS, WIDE_DEFECTS, WIDE_RANDOM_KINDS
from service.train import TrainConfig, train_fnn_model

FAMILY_SEEDS = {"validation": 4242, "held_out": 20261201, "robust": 20261201, "seen": 4242}


def write_family(family: str, out: Path, seed: int, size: int, n_good: int, n_defect: int) -> tuple[str, ...]:
    if family == "validation":
        write_wide_family(out, WIDE_RANDOM_KINDS, seed, n_good, n_defect, size, WIDE_DEFECTS)
        return WIDE_RANDOM_KINDS
    if family == "held_out":
        write_mvtec(out, DatasetSpec(kinds=HELD_OUT_KINDS, seed=seed, n_train=0, n_good=n_good, n_defect=n_defect,
                                     size=size))
        return HELD_OUT_KINDS
    if family == "seen":
        write_mvtec(out, DatasetSpec(kinds=TRAIN_KINDS, seed=seed, n_train=0, n_good=n_good, n_defect=n_defect,
                                     size=size))
        return TRAIN_KINDS
    if family == "robust":
        write_wide_family(out, HELD_OUT_KINDS, seed, n_good, n_defect, size, DEFECTS, setting="robust")
        return HELD_OUT_KINDS
    raise SystemExit(f"unknown family {family!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="model_store")
    ap.add_argument("--clip", default="tiny-factory-clip")
    ap.add_argument("--clips", default="v3,v4", help="versions of --clip to compare")
    ap.add_argument("--family", default="validation", choices=tuple(FAMILY_SEEDS))
    ap.add_argument("--seed", type=int, default=None, help="test-set seed (default: the family's)")
    ap.add_argument("--n-good", type=int, default=16)
    ap.add_argument("--n-defect", type=int, default=4)
    ap.add_argument("--scales", default="1,2,3",
                    help="window-scale sets to evaluate, ';'-separated, each with optional '/VIEWS' (test-time views); "
                         "'v4=2,4,6/1' limits a set to one version")
    ap.add_argument("--tta-views", type=int, default=None, help="default: the shipped default model's")
    ap.add_argument("--out", default="runs/embedded_model")
    args = ap.parse_args()

    t0 = time.perf_counter()
    seed = args.seed if args.seed is not None else FAMILY_SEEDS[args.family]
    tmp = Path(tempfile.mkdtemp(prefix="zsad-emb-"))
    store_root = tmp / "store"
    shutil.copytree(args.store, store_root, ignore=shutil.ignore_patterns("_hub"))
    store = ModelStore(store_root)
    if args.tta_views is None:
        args.tta_views = int(store.manifest("default").get("tta", {}).get("views", 1)) if store.current("default") else 1
    col = SCORE_ALIASES[Settings().default_score]
    summary: dict[str, dict] = {}
    for clip_version in args.clips.split(","):
        manifest = store.manifest(args.clip, clip_version)
        size = int(manifest.get("synthetic_world", {}).get("render_size", 64))
        data = tmp / f"data-{size}"
        if not data.exists():
            kinds = write_family(args.family, data, seed, size, args.n_good, args.n_defect)
        cal = tmp / f"cal-{size}"
        if not cal.exists():
            write_mvtec(cal, DatasetSpec(kinds=TRAIN_KINDS, seed=777, n_train=30, n_good=0, n_defect=0, size=size))
        spec = ClipSpec("store", name=args.clip, version=clip_version,
                        sha256=manifest["files"][manifest.get("weights", "open_clip_model.safetensors")])
        backend = load_clip(spec, store_root, device="cpu")
        versions = []
        for scales in args.scales.split(";"):
            only, _, scales = scales.rpartition("=")
            if only and only != clip_version:
                continue
            scales, _, views = scales.partition("/")
            views = int(views or args.tta_views)
            version = f"{clip_version}-s{scales.replace(',', '')}-v{views}"
            window_scales = [int(x) for x in scales.split(",")]
            if versions:  # the same FNN (fixed seeds) with other window scales: a copy with another manifest
                first = store.manifest("cmp", versions[0])
                folder = store.path("cmp", versions[0])
                manifest = {k: v for k, v in first.items() if k not in ("files", "version", "name", "created_at")}
                manifest["windows"] = {"scales": window_scales}
                manifest["tta"] = {**manifest.get("tta", {}), "views": views}
                store.publish("cmp", {f: folder / f for f in first["files"]}, manifest, version=version)
            else:
                cfg = TrainConfig(prompts=RandomWordConfig(n_pairs=10000, seed=0), fnn=FNNConfig(seed=0),
                                  random_words=True, window_scales=tuple(window_scales), tta_views=views)
                train_fnn_model(backend, cfg, store, "cmp", version=version, make_current=True,
                                calibration_images=sorted(cal.rglob("*.png")),
                                calibration_reference="seen kinds, seed 777")
            versions.append(version)
        for version in versions:  # one evaluate per scale set: its windows come from its own CLIP pass
            store.set_current("cmp", version)
            run_dir = Path(args.out) / args.family / clip_version / version
            argv = ["--store", str(store_root), "evaluate", str(data), "--layout", "mvtec", "--model", "cmp",
                    "--categories", ",".join(kinds), "--out", str(run_dir), "--cache", str(tmp / f"cache-{clip_version}"),
                    "--quiet"]
            if zsad(argv) != 0:
                raise SystemExit(f"evaluate failed for {version}")
            metrics = json.loads((run_dir / "metrics.json").read_text())
            m = metrics[col]
            mean = m["mean"]
            row = {k: mean.get(k) for k in ("image_auroc", "pixel_auroc", "pro", "hit_at_1", "hit_at_1_shuffled")}
            row["per_kind_image"] = {c: round(x["image_auroc"], 3) for c, x in m.items()
                                     if c != "mean" and isinstance(x, dict) and x.get("image_auroc") is not None}
            summary[version] = row
            print(f"{args.family} {version} ({col}): {json.dumps(row)}", file=sys.stderr)
    print(f"\nfamily {args.family} | seed {seed} | {args.n_good} good + {args.n_defect} per defect per kind "
          f"| views {args.tta_views} | score {col}")
    print("| version | image AUROC | pixel AUROC | PRO | hit@1 | hit@1 shuffled |")
    print("|---|---|---|---|---|---|")
    fmt = lambda x: "-" if x is None else f"{x:.3f}"
    for v, r in summary.items():
        print(f"| {v} | {fmt(r['image_auroc'])} | {fmt(r['pixel_auroc'])} | {fmt(r['pro'])} | {fmt(r['hit_at_1'])} "
              f"| {fmt(r['hit_at_1_shuffled'])} |")
    (Path(args.out) / args.family).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / args.family / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for v, r in summary.items():
        print(f"RESULT name=embedded_model family={args.family} seed={seed} version={v} "
              + " ".join(f"{k}={fmt(r[k])}" for k in ("image_auroc", "pixel_auroc", "pro", "hit_at_1", "hit_at_1_shuffled"))
              + f" seconds={time.perf_counter() - t0:.0f}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
