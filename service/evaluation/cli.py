"""`zsad evaluate`: score a dataset with the detector and write metrics, tables, plots and threshold advice.

Variants: `s_pr` (prompt score), `s_fnn` and `combined` for one FNN version; with `--versions v1,v2,...` the FNN
variants are suffixed `@vN` (an N_p ablation is a loop over store versions, and the CLIP pass runs once thanks to the
embedding cache). `--known-object` gives s_pr the category name ("known-object" setting); the default uses no names.
`--shots 0,1,4` evaluates the few-shot mode (WinCLIP+) too: K normal images per category (from train/good, the VisA
train split or `--reference-dir`, picked by `--shot-seed`, the same first K for every K) become that category's
reference memory; each K gets its own report in `<out>/shots-K/`.

Thresholds of the label variant (the `ZSAD_DEFAULT_SCORE` score of the last version), per category: fitted on up to
`--calibrate N` of the category's train/good images (MVTec layout) at `--target-frr`, by the rules of
`POST /v1/calibrate` (image threshold on their scores, pixel threshold a quantile of their heat); without such images, the
model's advice, as an uncalibrated product gets. They decide the regions of the localisation metrics and the labels in
the panels' captions (`--worst K`, `--best K`). In few-shot mode (K > 0) they are fitted on few-shot scores and
maps of the train/good images that are not among the shots, as `POST /v1/calibrate?reference=true` does.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..constants import SCORES
from ..settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("evaluate", help="evaluate on an MVTec-AD / VisA / folder / CSV dataset",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("dataset", metavar="DATASET", help="dataset root (or CSV file for --layout csv)")
    e.add_argument("--layout", choices=["mvtec", "visa", "folder", "csv"], help="default: detected from the folder")
    e.add_argument("--out", default="runs/eval", help="output folder (default: %(default)s)")
    e.add_argument("--model", help="FNN model name in the store (default: settings / 'default')")
    e.add_argument("--versions", help="comma-separated FNN versions to compare (default: current)")
    e.add_argument("--known-object", action="store_true", help="give s_pr the category name (known-object setting)")
    e.add_argument("--categories", help="comma-separated categories to keep")
    e.add_argument("--limit", type=int, help="evaluate only this many images, spread over the set (quick run)")
    e.add_argument("--no-pixel", action="store_true", help="image metrics only (no windows: much faster)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--cache", default=".cache/embeddings", help="embedding cache folder ('' disables)")
    e.add_argument("--worst", type=int, default=0, metavar="K",
                   help="panels of the K worst misses (highest-scoring good, lowest-scoring defective) into worst/")
    e.add_argument("--best", type=int, default=0, metavar="K",
                   help="panels of the K clearest calls (lowest-scoring good, highest-scoring defective) into best/")
    e.add_argument("--calibrate", type=int, default=30, metavar="N",
                   help="fit each category's thresholds on up to N of its train/good images (MVTec layout), as POST "
                        "/v1/calibrate does; 0: the model's advice (default: %(default)s)")
    e.add_argument("--target-frr", type=float, default=0.05,
                   help="false-reject rate of those thresholds on the train/good images (default: %(default)s)")
    e.add_argument("--normal-dir", default="normal", help="folder layout: name of the normal folder")
    e.add_argument("--anomalous-dir", default="anomalous", help="folder layout: name of the anomalous folder")
    e.add_argument("--label-columns", help="csv layout: comma-separated defect label columns")
    e.add_argument("--shots", default=[0], type=_parse_shots,
                   help="comma-separated numbers of normal reference images per category (few-shot mode; 0 = "
                        "zero-shot), e.g. 0,1,4 (default: 0)")
    e.add_argument("--reference-dir", help="normal reference images: <dir>/<category>/* or images for every category "
                   "(default: <category>/train/good, or the VisA train split)")
    e.add_argument("--shot-seed", type=int, default=0, help="which reference images are the shots (default: %(default)s)")
    e.add_argument("--device", help="cpu, cuda or auto")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_evaluate)


def _parse_shots(text: str) -> list[int]:
    try:
        shots = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated whole numbers, got {text!r}") from None
    if not shots or any(k < 0 for k in shots):
        raise argparse.ArgumentTypeError(f"must be numbers >= 0, got {text!r}")
    return list(dict.fromkeys(shots))


def pick_shots(paths: list[Path], k: int, seed: int) -> list[Path]:
    """The first `k` of a seeded permutation of `paths`: nested (the 1-shot image is among the 4 shots)."""
    import numpy as np

    if k > len(paths):
        raise ValueError(f"{k} shots asked, only {len(paths)} reference images in {paths[0].parent if paths else '?'}")
    order = np.random.default_rng(seed).permutation(len(paths))
    return [paths[i] for i in order[:k]]


def _reader_options(args: argparse.Namespace, layout: str | None) -> dict:
    if layout == "folder":
        return {"normal_dir": args.normal_dir, "anomalous_dir": args.anomalous_dir}
    if layout == "csv" and args.label_columns:
        return {"label_columns": args.label_columns.split(",")}
    if layout in ("mvtec", "visa") and args.categories:
        return {"categories": args.categories.split(",")}
    return {}


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..clip_backend import ClipSpec
    from ..detector import load_detector
    from ..fewshot import build_memory, model_ref
    from ..fnn import load_fnn
    from ..preprocess import load_image
    from ..store import ModelStore
    from .cache import EmbeddingCache, cached_embed, model_key
    from .readers import detect_layout, read_dataset, reference_images
    from .run import evaluate

    overrides = {}
    if getattr(args, "store", None):
        overrides["model_store"] = Path(args.store)
    if args.device:
        overrides["device"] = args.device
    settings = Settings(**overrides)
    shots = args.shots
    layout = args.layout or (detect_layout(args.dataset) if Path(args.dataset).is_dir() else "csv")
    dataset = read_dataset(args.dataset, layout, **_reader_options(args, layout))
    samples = dataset.samples
    if args.categories and layout not in ("mvtec", "visa"):
        keep = set(args.categories.split(","))
        samples = [s for s in samples if s.category in keep]
    print(dataset.describe(), file=sys.stderr)

    asked = args.versions.split(",") if args.versions else None
    base = load_detector(settings, args.model, asked[0] if asked else None)  # the first version's own CLIP
    store = ModelStore(settings.model_store)
    versions = asked or [base.version]
    detectors = {}
    for version in versions:
        fnn, manifest = load_fnn(store, base.name, version, base.backend.embed_dim)
        if manifest.get("clip") != base.manifest.get("clip"):  # an FNN only means something on its own CLIP
            raise ValueError(f"{base.name}@{version} was trained on another CLIP "
                             f"({ClipSpec.from_manifest(manifest.get('clip') or {}).label()}) than {base.name}@"
                             f"{versions[0]} ({base.backend.spec.label()}); evaluate them separately")
        detectors[version] = base.with_fnn(fnn, manifest)
    views = {v: d.tta_views for v, d in detectors.items()}
    if len(set(views.values()) | {base.tta_views}) > 1:  # one CLIP pass serves every version: it must be the same
        raise ValueError(f"the versions recommend different test-time views {views} (base {base.tta_views}); "
                       "set ZSAD_TTA_VIEWS to compare them on the same embeddings")
    suffix = len(versions) > 1

    def variant(spec, version: str) -> str:
        return spec.alias + (f"@{version}" if suffix and spec.uses_fnn else "")

    # Scores that do not depend on the FNN once, then each version's FNN scores (the last is the reference variant).
    variants = [s.alias for s in SCORES if not s.uses_fnn] + [variant(s, v) for v in versions for s in SCORES
                                                               if s.uses_fnn]

    heatmap = not args.no_pixel
    few = any(k > 0 for k in shots)  # the few-shot image score needs the windows even without pixel metrics
    scales = {v: d.window_scales for v, d in detectors.items()}
    if (heatmap or few) and len(set(scales.values()) | {base.window_scales}) > 1:  # the windows come from that pass too
        raise ValueError(f"the versions recommend different window scales {scales} (base {base.window_scales}); "
                         "set ZSAD_WINDOW_SCALES, or evaluate them separately")
    cache = EmbeddingCache(args.cache, model_key(base, heatmap or few)) if args.cache else None
    category_of = {str(s.path): s.category for s in samples}
    categories = sorted(set(category_of.values()))
    references = reference_images(args.dataset, layout, categories, args.reference_dir) if few else {}
    label_spec = next(spec for spec in SCORES if spec.name == settings.default_score)
    label_variant = variant(label_spec, versions[-1])

    def load(source: Path | bytes):
        return load_image(source, settings.max_pixels)

    def memories_for(k: int) -> dict[tuple[str, str], object]:
        """(version, category) -> the k-shot memory (embeddings through the cache, like the test images)."""
        out: dict[tuple[str, str], object] = {}
        for cat in categories:
            ref_paths = pick_shots(references[cat], k, args.shot_seed)
            embs = cached_embed(base, ref_paths, load, cache, True)
            for version, det in detectors.items():
                out[(version, cat)] = build_memory(embs, model_ref(det), settings.window_stride,
                                                   settings.reference_max_rows, {"category": cat},
                                                   settings.reference_dense)
        return out

    def score_fn_for(memories: dict):
        def score_fn(paths: list[Path]) -> list[dict]:
            embs = cached_embed(base, paths, load, cache, heatmap or bool(memories))
            outputs: list[dict] = [{"scores": {}, "maps": {}, "grid": e.grid, "patch": _patch(e)} for e in embs]
            for version, det in detectors.items():
                # Known-object: group by category so each batch uses one object word (and, few-shot, one memory).
                cats = [category_of[str(p)] for p in paths]
                objects = [c.replace("_", " ") if args.known_object else None for c in cats]
                for obj, cat in dict.fromkeys(zip(objects, cats)):
                    idx = [i for i, (o, c) in enumerate(zip(objects, cats)) if (o, c) == (obj, cat)]
                    memory = memories.get((version, cat))
                    for i, d in zip(idx, det.score([embs[i] for i in idx], obj, memory=memory, maps=heatmap)):
                        for spec in SCORES:
                            outputs[i]["scores"][variant(spec, version)] = d.scores[spec.name]
                            if heatmap:
                                outputs[i]["maps"][variant(spec, version)] = d.heat[spec.name]
            return outputs

        return score_fn

    if not 0.0 < args.target_frr < 1.0:
        raise ValueError(f"--target-frr must be in (0, 1), got {args.target_frr}")
    det = detectors[versions[-1]]
    setting = "known-object" if args.known_object else "unknown-object"
    per_k: dict[str, dict] = {}
    for k in shots:
        out = Path(args.out) if shots == [0] else Path(args.out) / f"shots-{k}"
        memories = memories_for(k) if k else {}
        shot_paths = {c: pick_shots(references[c], k, args.shot_seed) for c in categories} if k else {}
        thresholds = {cat: _category_thresholds(det, base, label_spec.name, settings, args, Path(args.dataset), layout,
                                                cat, load, cache, heatmap, memories.get((versions[-1], cat)),
                                                set(shot_paths.get(cat, [])))
                      for cat in categories}
        metrics = evaluate(samples, score_fn_for(memories), out, variants, limit=args.limit, progress=not args.quiet,
                           pixel=heatmap, batch_size=args.batch_size, thresholds=thresholds,
                           label_variant=label_variant, min_region_area=settings.min_region_area)
        (out / "run.json").write_text(json.dumps({
            "dataset": str(args.dataset), "layout": layout, "setting": setting, "model": base.name,
            "versions": versions, "clip": base.backend.spec.to_manifest(), "n_images": len(samples) if not args.limit
            else min(args.limit, len(samples)),
            "mode": "few_shot" if k else "zero_shot", "shots": k, "shot_seed": args.shot_seed if k else None,
            "reference": {c: [str(p) for p in ps] for c, ps in shot_paths.items()} if k else None,
            "cache": {"hits": cache.hits, "misses": cache.misses} if cache else None,
        }, indent=2) + "\n")
        panels = []
        for kind, n in (("worst", args.worst), ("best", args.best)):
            if n:
                panels += _write_panels(samples, out, kind, label_variant, label_spec.name, n, base, det, load, cache,
                                        thresholds, settings, {c: memories.get((versions[-1], c)) for c in categories})
        if panels:
            from .report import append_panels

            append_panels(out, panels)
        per_k[str(k)] = {v: metrics[v]["mean"] for v in variants}
    if shots == [0]:
        print(json.dumps({"out": str(args.out), "setting": setting, "mean": per_k["0"]}, default=float))
    else:
        print(json.dumps({"out": str(args.out), "setting": setting, "shots": per_k}, default=float))
    return 0


def _patch(emb) -> tuple[int, int] | None:
    """One feature-grid cell in original image pixels (rows, cols), from the embedding's grid and geometry."""
    if not emb.grid or not emb.grid[0]:
        return None
    g = emb.geometry
    cx0, cy0, cx1, cy1 = g.content
    sx0, sy0, sx1, sy1 = g.source
    per_y = g.size / emb.grid[0] * (sy1 - sy0) / max(1e-9, cy1 - cy0)
    per_x = g.size / emb.grid[1] * (sx1 - sx0) / max(1e-9, cx1 - cx0)
    return math.ceil(per_y - 1e-9), math.ceil(per_x - 1e-9)


def _train_good(root: Path, layout: str, category: str, limit: int) -> list[Path]:
    if layout != "mvtec" or limit <= 0:
        return []
    from .readers import list_images

    folder = root / category / "train" / "good"
    return list_images(folder)[:limit] if folder.is_dir() else []


def _category_thresholds(det, base, score_name: str, settings: Settings, args, root: Path, layout: str, category: str,
                         load, cache, heatmap: bool, memory=None, shots: set[Path] | None = None) -> dict:
    """The category's image and pixel thresholds: POST /v1/calibrate's rules on its train/good images, else the
    model's advice (what an uncalibrated product gets). With a few-shot `memory`, the train/good images that are
    among its `shots` are left out (never scored against themselves) and the rest are scored against it."""
    from ..calibration import NormalHeat
    from ..thresholds import calibrate, default_pixel_threshold, default_threshold
    from .cache import cached_embed

    paths = [p for p in _train_good(root, layout, category, args.calibrate + len(shots or ())) if p not in (shots or ())]
    paths = paths[:args.calibrate]
    if not paths:
        d = default_threshold(score_name, settings.default_threshold, det.manifest)
        px = default_pixel_threshold(score_name, settings.mask_threshold, det.manifest)
        return {"threshold": d.threshold, "pixel_threshold": px.pixel_threshold,
                "source": f"{d.source} / {px.pixel_source} (no train/good images)"}
    scores, normal_heat = [], NormalHeat()
    for start in range(0, len(paths), args.batch_size):
        embs = cached_embed(base, paths[start:start + args.batch_size], load, cache, heatmap or memory is not None)
        for d in det.score(embs, memory=memory, maps=heatmap):
            scores.append(float(d.scores[score_name]))
            if heatmap:
                normal_heat.add(d.heat[score_name])
    threshold, _ = calibrate(scores, args.target_frr)
    if normal_heat.n_images:
        pixel = normal_heat.threshold()
    else:
        pixel = default_pixel_threshold(score_name, settings.mask_threshold, det.manifest).pixel_threshold
    few = f" (few-shot, {memory.shots} shots left out)" if memory is not None else ""
    return {"threshold": threshold, "pixel_threshold": pixel,
            "source": f"calibrated on {len(paths)} train/good images{few} at {args.target_frr:g} false rejects"}


def _write_panels(samples, out: Path, kind: str, variant: str, score_name: str, k: int, base, det, load, cache,
                  thresholds: dict, settings: Settings, memories: dict | None = None) -> list[tuple[str, Path, str]]:
    """Panels (image | ground truth | heat with a colour bar | predicted mask, captioned) of the k worst misses or
    the k clearest calls of `variant`; returns (section, path, caption) for report.md."""
    import numpy as np

    from ..heatmap import localise, min_area_pixels
    from .cache import cached_embed
    from .readers import load_mask
    from .report import read_scores_csv, render_panel, safe_name

    records = read_scores_csv(out / "scores.csv")
    by_path = {str(s.path): s for s in samples}
    if kind == "worst":
        ranked = sorted(records, key=lambda r: -r.scores[variant] if r.label == 0 else r.scores[variant] - 1.0)
    else:
        ranked = sorted(records, key=lambda r: r.scores[variant] if r.label == 0 else -r.scores[variant] - 1.0)
    folder = out / kind
    folder.mkdir(exist_ok=True)
    title = {"worst": f"Worst misses (`{variant}`)", "best": f"Clearest calls (`{variant}`)"}[kind]
    written = []
    for rank, rec in enumerate(ranked[:k]):
        path = Path(rec.path)
        sample = by_path[rec.path]
        image = load(path)
        d = det.score(cached_embed(base, [path], load, cache, True), memory=(memories or {}).get(sample.category))[0]
        heat = d.heat[score_name]
        score = float(d.scores[score_name])
        t = thresholds[sample.category]
        anomalous = score > float(t["threshold"])
        _, predicted = localise(heat, float(t["pixel_threshold"]), min_area_pixels(heat.shape, settings.min_region_area),
                                anomalous)
        truth = load_mask(sample.mask_path) if sample.mask_path is not None else None
        caption = (f"{path.name} ({sample.category}/{sample.defect}): score {score:.3f} "
                   f"{'>' if anomalous else '<='} threshold {float(t['threshold']):.3f} -> "
                   f"{'anomalous' if anomalous else 'normal'}; pixel threshold {float(t['pixel_threshold']):.3f}")
        name = f"{rank:02d}_{'normal' if rec.label == 0 else 'anomalous'}_{safe_name(sample.category)}_{path.stem}.png"
        render_panel(np.asarray(image.convert("RGB")), truth, heat, predicted, caption, folder / name)
        written.append((title, folder / name, caption))
    return written
