"""`zsad evaluate`: score a dataset with the detector and write metrics, tables, plots and threshold advice.

Variants: `s_pr` (prompt score), `s_fnn` and `combined` for one FNN version; with `--versions v1,v2,...` the FNN
variants are suffixed `@vN` (an N_p ablation is a loop over store versions, and the CLIP pass runs once thanks to the
embedding cache). `--known-object` gives s_pr the category name ("known-object" setting); the default uses no names.
`--shots 0,1,4` evaluates the few-shot mode (WinCLIP+) too: K normal images per category (from train/good, the VisA
train split or `--reference-dir`, picked by `--shot-seed`, the same first K for every K) become that category's
reference memory; each K gets its own report in `<out>/shots-K/`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..constants import DEFAULT_SCORE, SCORES
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
    e.add_argument("--worst", type=int, default=0, metavar="K", help="write overlays of the K worst misses")
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

    base = load_detector(settings, args.model)
    store = ModelStore(settings.model_store)
    versions = args.versions.split(",") if args.versions else [base.version]
    detectors = {}
    for version in versions:
        fnn, manifest = load_fnn(store, base.name, version, base.backend.embed_dim)
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
    cache = EmbeddingCache(args.cache, model_key(base, heatmap or few)) if args.cache else None
    category_of = {str(s.path): s.category for s in samples}
    categories = sorted(set(category_of.values()))
    references = reference_images(args.dataset, layout, categories, args.reference_dir) if few else {}

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
                                                   settings.reference_max_rows, {"category": cat})
        return out

    def score_fn_for(k: int):
        memories = memories_for(k) if k else {}

        def score_fn(paths: list[Path]) -> list[dict]:
            embs = cached_embed(base, paths, load, cache, heatmap or k > 0)
            outputs: list[dict] = [{"scores": {}, "maps": {}} for _ in paths]
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

    setting = "known-object" if args.known_object else "unknown-object"
    per_k: dict[str, dict] = {}
    for k in shots:
        out = Path(args.out) if shots == [0] else Path(args.out) / f"shots-{k}"
        metrics = evaluate(samples, score_fn_for(k), out, variants, limit=args.limit, progress=not args.quiet,
                           pixel=heatmap, batch_size=args.batch_size)
        (out / "run.json").write_text(json.dumps({
            "dataset": str(args.dataset), "layout": layout, "setting": setting, "model": base.name,
            "versions": versions, "clip": base.backend.spec.to_manifest(), "n_images": len(samples) if not args.limit
            else min(args.limit, len(samples)),
            "mode": "few_shot" if k else "zero_shot", "shots": k, "shot_seed": args.shot_seed if k else None,
            "reference": {c: [str(p) for p in pick_shots(references[c], k, args.shot_seed)] for c in categories}
            if k else None,
            "cache": {"hits": cache.hits, "misses": cache.misses} if cache else None,
        }, indent=2) + "\n")
        if args.worst and k == 0:
            _write_worst(samples, out, variants[-1], args.worst, base, detectors[versions[-1]], load, cache)
        per_k[str(k)] = {v: metrics[v]["mean"] for v in variants}
    if shots == [0]:
        print(json.dumps({"out": str(args.out), "setting": setting, "mean": per_k["0"]}, default=float))
    else:
        print(json.dumps({"out": str(args.out), "setting": setting, "shots": per_k}, default=float))
    return 0


def _write_worst(samples, out: Path, variant: str, k: int, base, det, load, cache) -> None:
    """Overlays of the k worst misses of `variant`: highest-scoring normals and lowest-scoring anomalies."""
    from ..heatmap import overlay_png
    from .cache import cached_embed
    from .report import read_scores_csv

    records = read_scores_csv(out / "scores.csv")
    by_path = {str(s.path): s for s in samples}
    ranked = sorted(records, key=lambda r: -r.scores[variant] if r.label == 0 else r.scores[variant] - 1.0)
    folder = out / "worst"
    folder.mkdir(exist_ok=True)
    for rank, rec in enumerate(ranked[:k]):
        path = Path(rec.path)
        image = load(path)
        det_out = det.score(cached_embed(base, [path], load, cache, True))[0]
        name = f"{rank:02d}_{'normal' if rec.label == 0 else 'anomalous'}_{by_path[rec.path].category}_{path.stem}.png"
        (folder / name).write_bytes(overlay_png(image, det_out.heat[DEFAULT_SCORE]))
