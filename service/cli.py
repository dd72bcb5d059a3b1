"""`zsad` command line. Each sub-command is a thin shell over importable functions.

Exit codes: 0 success, 1 a runtime failure (message on stderr), 2 wrong arguments (argparse's convention).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import sys
from pathlib import Path

from .constants import IMAGE_EXTENSIONS, MAX_REGIONS, NAME_PATTERN, SCORE_ALIASES, SCORE_NAMES, VIEW_COUNTS
from .settings import Settings

NAME_RE = re.compile(NAME_PATTERN)


class CliError(Exception):
    """A failure to report as one clear line and exit code 1."""


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    if getattr(args, "store", None):
        overrides["model_store"] = Path(args.store)
    if getattr(args, "device", None):
        overrides["device"] = args.device
    return Settings(**overrides)


def _name(value: str) -> str:
    """A product or line name, as the service accepts them (1-64 letters, digits, '.', '_', ':', '-')."""
    if not NAME_RE.match(value):
        raise argparse.ArgumentTypeError(f"invalid name {value!r}: use 1-64 letters, digits, '.', '_', ':' or '-'")
    return value


def _split_ref(ref: str) -> tuple[str, str | None]:
    name, _, version = ref.partition("@")
    return name, version or None


# --- train ------------------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from .clip_backend import ClipSpec, load_clip
    from .fnn import FNNConfig
    from .prompts import RandomWordConfig
    from .store import ModelStore, StoreError
    from .train import TrainConfig, train_fnn_model

    settings = _settings(args)
    store = ModelStore(settings.model_store)
    if args.model:
        if bool(args.pretrained) == bool(args.weights):
            raise CliError("--model needs exactly one of --pretrained TAG or --weights FILE")
        spec = ClipSpec("pretrained", args.model, pretrained=args.pretrained) if args.pretrained else None
        if args.weights:
            from .store import sha256_file

            path = Path(args.weights).resolve()
            if not path.is_file():
                raise CliError(f"weights file {path} does not exist")
            spec = ClipSpec("file", args.model, path=str(path), sha256=sha256_file(path))
    else:
        clip_name, clip_version = _split_ref(args.clip)
        try:
            folder, manifest = store.verify(clip_name, clip_version)
        except StoreError as exc:
            raise CliError(str(exc)) from exc
        spec = ClipSpec("store", name=clip_name, version=manifest["version"],
                        sha256=manifest["files"][manifest.get("weights", "open_clip_model.safetensors")])
    backend = load_clip(spec, settings.model_store, settings.device, settings.precision, settings.hub_cache)
    cfg = TrainConfig(
        prompts=RandomWordConfig(args.n_pairs, args.words_min, args.words_max, args.word_len_min, args.word_len_max, args.seed),
        fnn=FNNConfig(lr=args.lr, max_epochs=args.epochs, patience=args.patience, seed=args.seed),
        random_words=not args.no_random_words,
        generic_object=settings.generic_object,
        vocabulary_path=args.vocabulary,
        window_scales=tuple(int(x) for x in args.window_scales.split(",")) if args.window_scales else None,
        tta_views=args.tta_views,
    )
    print(f"training FNN on {spec.label()} with {args.n_pairs} prompt pairs "
          f"({'random words' if cfg.random_words else 'no random words'}), seed {args.seed}", file=sys.stderr)
    calibration = _images_in(args.calibration_images) if args.calibration_images else None
    if args.calibration_images and not calibration:
        raise CliError(f"no images found in {', '.join(args.calibration_images)}")
    reference = None
    if calibration:
        reference = f"{len(calibration)} normal images" + (f": {args.calibration_note}" if args.calibration_note
                                                            else f" from {', '.join(args.calibration_images)}")
    result = train_fnn_model(backend, cfg, None if args.dry_run else store, args.name, args.version,
                             not args.no_current, progress=not args.quiet, calibration_images=calibration,
                             calibration_reference=reference, settings=settings)
    out = {
        "name": args.name,
        "version": result.version,
        "val_auroc_random_word": round(result.report.val_auroc, 4),
        "val_auroc_clean": round(result.clean_auroc, 4),
        "epochs": result.report.epochs,
        "seconds": round(result.seconds, 1),
    }
    print(json.dumps(out))
    return 0


def _images_in(folders: list[str]) -> list[Path]:
    found: list[Path] = []
    for folder in folders:
        root = Path(folder)
        if not root.exists():
            raise CliError(f"{root} does not exist")
        found += sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS)
    return found


def _open_database(args: argparse.Namespace, settings: Settings):
    """The service's database (`--db URL`, default `ZSAD_RESULTS_URL` / `ZSAD_RESULTS_PATH`) for reading, or None when
    it is a SQLite file that does not exist (no thresholds, no memories; it is not created)."""
    from sqlalchemy.exc import SQLAlchemyError

    from .db.engine import database_url, make_engine, sqlite_path

    url = args.db or database_url(settings)
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        return None
    try:
        return make_engine(url)
    except (SQLAlchemyError, ValueError) as exc:
        raise CliError(f"cannot use database URL: {type(exc).__name__}: {exc}") from None


def _read_database(args: argparse.Namespace, settings: Settings, what: str, read):
    """`read(engine)` on the service's database (None when there is none), its errors one CliError line."""
    from sqlalchemy.exc import SQLAlchemyError

    engine = _open_database(args, settings)
    if engine is None:
        return None
    try:
        return read(engine)
    except SQLAlchemyError as exc:
        where = engine.url.render_as_string(hide_password=True)
        raise CliError(f"cannot read {what} from database {where}: {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0]} (is it migrated? zsad db upgrade)") from None
    finally:
        engine.dispose()


def _threshold_entry(args: argparse.Namespace, settings: Settings) -> dict | None:
    """The product's threshold entry: from `--thresholds FILE` (a JSON thresholds file, the previous release's
    format), else from the service's database (`--db URL`, default `ZSAD_RESULTS_URL` / `ZSAD_RESULTS_PATH`), read
    only (a missing SQLite file is no thresholds, and is not created)."""
    if args.thresholds:  # read (and checked) even without --product, as the service reads its store
        from .db.thresholds import read_file

        products = read_file(Path(args.thresholds))
        return products.get(args.product) if args.product else None
    if not args.product:
        return None
    from .db.thresholds import ThresholdStore

    return _read_database(args, settings, "thresholds", lambda engine: ThresholdStore(engine).get(args.product))


def _stored_memory(args: argparse.Namespace, settings: Settings):
    """The product's (line's, else the product's) few-shot reference memory bytes from the service's database, as
    the service reads them (`service/db/memories.py`); None when there is none."""
    if not args.product:
        return None
    from .db.memories import DbMemoryStore

    return _read_database(args, settings, "reference memories", lambda engine: DbMemoryStore(
        engine, settings.reference_max_bytes).get(args.product, args.line))


# --- score ------------------------------------------------------------------------------------------------------
def cmd_score(args: argparse.Namespace) -> int:
    """Score images as the service would for `--product` / `--line`: the same thresholds (the service's database, or
    a JSON thresholds file with `--thresholds`), the same resolution (`service.thresholds`), the same label rule and
    the same regions (`heatmap.localise`)."""
    from .detector import load_detector
    from .heatmap import localise, mask_png, min_area_pixels, overlay_png
    from .preprocess import ImageError, load_image
    from .thresholds import decide, resolve_entry

    settings = _settings(args)
    entry = _threshold_entry(args, settings)  # read first: an unreadable store is an error before loading a model
    stored = _stored_memory(args, settings)
    name, version = _split_ref(args.model_ref) if args.model_ref else (None, None)
    detector = load_detector(settings, name, version)
    memory = _product_memory(detector, settings, args.product, stored) if args.product else None
    resolved = resolve_entry(entry, args.line, args.score, settings.default_score, settings.default_threshold,
                             detector.manifest, settings.mask_threshold, "few_shot" if memory else "zero_shot")
    heat_dir = Path(args.heatmap) if args.heatmap else None
    if heat_dir:
        heat_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    for path in args.images:
        try:
            image = load_image(Path(path), settings.max_pixels)
        except (ImageError, OSError) as exc:
            failures += 1
            print(json.dumps({"path": path, "error": str(exc)}))
            continue
        det = detector.detect([image], args.object, heatmap=heat_dir is not None, memory=memory)[0]
        score = float(det.scores[resolved.score])
        line = {"path": path, **{SCORE_ALIASES[k]: round(v, 6) for k, v in det.scores.items()},
                "product": args.product, "line": args.line, "score_name": resolved.score, "score": round(score, 6),
                "label": decide(score, resolved, settings.uncalibrated), "threshold": resolved.threshold,
                "threshold_source": resolved.source, "calibrated": resolved.calibrated,
                "mode": det.mode, "shots": det.shots}
        if heat_dir is not None:
            heat = det.heat[resolved.score]
            found, mask = localise(heat, resolved.pixel_threshold, min_area_pixels(heat.shape, settings.min_region_area),
                                   score > resolved.threshold, MAX_REGIONS)
            stem = Path(path).stem
            (heat_dir / f"{stem}_overlay.png").write_bytes(overlay_png(image, heat))
            (heat_dir / f"{stem}_mask.png").write_bytes(mask_png(mask))
            line["pixel_threshold"] = resolved.pixel_threshold
            line["pixel_threshold_source"] = resolved.pixel_source
            line["regions"] = [r.to_dict() for r in found]
        print(json.dumps(line), flush=True)
    if failures:
        print(f"{failures} of {len(args.images)} images could not be scored", file=sys.stderr)
        return 1
    return 0


def _product_memory(detector, settings: Settings, product: str, stored):
    """The stored few-shot reference memory parsed for `detector`, or None (zero-shot) with a note on stderr when
    there is none or it was made by another model."""
    from .fewshot import ReferenceMemory, ReferenceMemoryError, model_ref

    if stored is None:
        print(f"zsad score: no reference memory for product {product!r}; scoring zero-shot "
              "(POST /v1/calibrate/{product}?reference=true builds one)", file=sys.stderr)
        return None
    try:
        memory = ReferenceMemory.from_bytes(stored.data)
    except ReferenceMemoryError as exc:
        raise CliError(f"the reference memory of {product!r} is unreadable: {exc}") from None
    why = memory.incompatibility(model_ref(detector), detector.window_scales, settings.window_stride)
    if why:
        print(f"zsad score: the reference memory of {product!r} is stale ({why}); scoring zero-shot. Re-calibrate "
              "the product to re-embed it", file=sys.stderr)
        return None
    return memory.to(detector.backend.device)


# --- store ------------------------------------------------------------------------------------------------------
def cmd_store(args: argparse.Namespace) -> int:
    from .store import ModelStore

    store = ModelStore(_settings(args).model_store)
    if args.store_cmd == "list":
        for name in store.names():
            current = store.current(name)
            for v in store.versions(name):
                m = store.manifest(name, v)
                flag = "*" if v == current else " "
                print(f"{flag} {name}@{v}\t{m.get('kind', '?')}\t{m.get('created_at', '')}")
        return 0
    name, version = _split_ref(args.ref)
    if args.verify:
        store.verify(name, version)
    print(json.dumps(store.manifest(name, version), indent=2))
    return 0


# --- anchors ----------------------------------------------------------------------------------------------------
def cmd_anchors(args: argparse.Namespace) -> int:
    """Compute and cache prompt anchors for object words next to the model, so a service started with
    ZSAD_TEXT_TOWER=off (no text tower in memory) can score them."""
    from .detector import load_detector

    settings = _settings(args).model_copy(update={"text_tower": "release"})
    if args.precision:
        settings = settings.model_copy(update={"precision": args.precision})
    name, version = _split_ref(args.model_ref) if args.model_ref else (None, None)
    detector = load_detector(settings, name, version)
    for word in [settings.generic_object, *args.object]:
        detector.anchors(word)
    cache = detector.anchor_cache
    print(json.dumps({"model": f"{detector.name}@{detector.version}", "words": [settings.generic_object, *args.object],
                      "folder": str(cache.folder) if cache else None, "clip": detector.backend.identity()}))
    return 0


# --- fetch-weights ------------------------------------------------------------------------------------------------
def cmd_fetch_weights(args: argparse.Namespace) -> int:
    from .clip_backend import fetch_weights

    settings = _settings(args)
    cache = settings.hub_cache or settings.model_store / "_hub"
    path = fetch_weights(args.model, args.pretrained, Path(cache), timeout_s=args.timeout)
    print(json.dumps({"model": args.model, "pretrained": args.pretrained, "path": str(path)}))
    return 0


# --- serve ------------------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost); host names are not trusted."""
    if host.strip().lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = _settings(args)
    host = args.host or settings.host
    port = args.port or settings.port
    has_keys = any(settings.api_keys_read) or any(settings.api_keys_admin)
    if not is_loopback(host) and not has_keys and not (args.allow_open or settings.allow_open):
        raise CliError(f"refusing to serve an open API on {host}: with no API keys anyone who can reach it may detect, "
                       "calibrate, change thresholds and reload models. Set ZSAD_API_KEYS_READ / ZSAD_API_KEYS_ADMIN "
                       "(or their files in /run/secrets), bind 127.0.0.1, or pass --allow-open (ZSAD_ALLOW_OPEN=1)")
    os.environ["ZSAD_MODEL_STORE"] = str(settings.model_store)
    uvicorn.run("service.api.app:create_app", factory=True, host=host, port=port, log_level=args.log_level,
                timeout_graceful_shutdown=30)
    return 0


# --- db ---------------------------------------------------------------------------------------------------------
def cmd_db(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from .db import migrate
    from .db.engine import database_url, make_engine

    url = args.url or database_url(Settings())
    try:
        engine = make_engine(url)
    except (SQLAlchemyError, ValueError) as exc:
        raise CliError(f"cannot use database URL: {type(exc).__name__}: {exc}") from None
    where = engine.url.render_as_string(hide_password=True)
    try:
        if args.db_cmd == "upgrade":
            before, after = migrate.upgrade(engine)
            print(json.dumps({"database": where, "before": before, "after": after, "head": migrate.head_revision()}))
            return 0
        st = migrate.state(engine)
        print(json.dumps({"database": where, "current": st.current, "head": st.head, "at_head": st.at_head,
                          "previous_release": st.legacy, "newer": st.newer}))
        return 0 if st.at_head or st.newer else 1
    except SQLAlchemyError as exc:
        raise CliError(f"database {where}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    finally:
        engine.dispose()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zsad", description="Zero-shot visual anomaly detection (random-word CLIP + FNN).")
    p.add_argument("--store", help="model store folder (default: $ZSAD_MODEL_STORE or ./model_store)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train an FNN on random-word prompts and publish it to the store")
    src = t.add_argument_group("CLIP (default: the in-house CLIP in the store)")
    src.add_argument("--clip", default="tiny-factory-clip", help="store CLIP NAME[@VERSION] (default: %(default)s)")
    src.add_argument("--model", help="open_clip architecture, e.g. ViT-B-16-plus-240")
    src.add_argument("--pretrained", help="open_clip pretrained tag, e.g. laion400m_e31 (see fetch-weights)")
    src.add_argument("--weights", help="local weights file for --model (safetensors preferred)")
    t.add_argument("--name", default="default", help="store name to publish under (default: %(default)s)")
    t.add_argument("--version", help="version to publish (default: next vN)")
    t.add_argument("--no-current", action="store_true", help="publish without moving the `current` pointer")
    t.add_argument("--n-pairs", type=int, default=10_000, help="N_p random prompt pairs (default: %(default)s)")
    t.add_argument("--words-min", type=int, default=1)
    t.add_argument("--words-max", type=int, default=3)
    t.add_argument("--word-len-min", type=int, default=3)
    t.add_argument("--word-len-max", type=int, default=10)
    t.add_argument("--no-random-words", action="store_true", help="ablation: plain object word instead of random words")
    t.add_argument("--vocabulary", help="vocabulary JSON (default: service/data/vocabulary.json)")
    t.add_argument("--window-scales", help="heatmap window sizes to recommend in the manifest, e.g. 1,2,3 "
                   "(default: none recorded; the service then uses WinCLIP's 2,3)")
    t.add_argument("--tta-views", type=int, choices=VIEW_COUNTS, default=1,
                   help="test-time augmentation to recommend in the manifest: average the image embedding over this "
                        "many flipped/rotated views; the calibration is fitted with it (default: 1, off)")
    t.add_argument("--calibration-images", nargs="+", metavar="DIR",
                   help="unlabeled normal images (folders or files): record a score calibration so that 0.5 means "
                        "'above 99%% of these normal images' and s_fnn / s_pr share one scale")
    t.add_argument("--calibration-note", help="describe the calibration images in the manifest (default: their paths)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--epochs", type=int, default=60)
    t.add_argument("--patience", type=int, default=5)
    t.add_argument("--device", help="cpu, cuda or auto")
    t.add_argument("--dry-run", action="store_true", help="train and report, publish nothing")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("score", help="score images; print one JSON line per image")
    s.add_argument("images", nargs="+", metavar="IMAGE")
    s.add_argument("--model-ref", help="FNN model NAME[@VERSION] (default: settings / current)")
    s.add_argument("--object", help="object name for the prompt score (default: generic 'object')")
    s.add_argument("--product", type=_name, help="product: its threshold (and few-shot reference memory, if it has "
                   "one: made by POST /v1/calibrate/{product}?reference=true) from the service's database, as the service")
    s.add_argument("--line", type=_name, help="production line: its threshold (and memory, if it has its own), as the "
                   "service")
    s.add_argument("--db", metavar="URL", help="database holding the thresholds (default: $ZSAD_RESULTS_URL, else "
                   "sqlite at $ZSAD_RESULTS_PATH)")
    s.add_argument("--thresholds", metavar="FILE", help="read thresholds from this JSON thresholds file instead")
    s.add_argument("--heatmap", metavar="DIR", help="write <stem>_overlay.png and <stem>_mask.png into DIR")
    s.add_argument("--score", choices=SCORE_NAMES, default=None,
                   help="score the label is decided on, and its map (default: the product threshold's, else settings)")
    s.add_argument("--device", help="cpu, cuda or auto")
    s.set_defaults(func=cmd_score)

    st = sub.add_parser("store", help="inspect the model store")
    st_sub = st.add_subparsers(dest="store_cmd", required=True, metavar="ACTION")
    st_sub.add_parser("list", help="list models and versions (* = current)")
    show = st_sub.add_parser("show", help="print a manifest")
    show.add_argument("ref", metavar="NAME[@VERSION]")
    show.add_argument("--verify", action="store_true", help="also check every file's sha256")
    st.set_defaults(func=cmd_store)

    an = sub.add_parser("anchors", help="compute and cache prompt anchors for object words (for ZSAD_TEXT_TOWER=off)")
    an.add_argument("--object", nargs="*", default=[], metavar="WORD", help="object words (the generic word always)")
    an.add_argument("--model-ref", help="FNN model NAME[@VERSION] (default: settings / current)")
    an.add_argument("--device", help="cpu, cuda or auto: the one the service will use (anchors are per device type)")
    an.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"],
                    help="the precision the service will use (default: $ZSAD_PRECISION)")
    an.set_defaults(func=cmd_anchors)

    f = sub.add_parser("fetch-weights", help="download pretrained CLIP weights into the store's hub cache (needs network)")
    f.add_argument("--model", required=True, help="open_clip architecture, e.g. ViT-B-16-plus-240")
    f.add_argument("--pretrained", required=True, help="pretrained tag, e.g. laion400m_e31")
    f.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds")
    f.set_defaults(func=cmd_fetch_weights)

    sv = sub.add_parser("serve", help="start the REST service (uvicorn)")
    sv.add_argument("--host", help="bind address (default: $ZSAD_HOST or 127.0.0.1)")
    sv.add_argument("--port", type=int, help="port (default: $ZSAD_PORT or 8000)")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sv.add_argument("--allow-open", action="store_true",
                    help="serve on a non-loopback address with no API keys (default: refused; $ZSAD_ALLOW_OPEN)")
    sv.set_defaults(func=cmd_serve)

    db = sub.add_parser("db", help="the database schema (results, thresholds, fleet): migrate or inspect it")
    db_sub = db.add_subparsers(dest="db_cmd", required=True, metavar="ACTION")
    for action, text in (("upgrade", "migrate to this release's schema (idempotent; replicas running it together "
                                     "migrate once)"),
                         ("status", "print the schema revision; exit 1 when it is behind this release")):
        a = db_sub.add_parser(action, help=text)
        a.add_argument("--url", help="SQLAlchemy URL (default: $ZSAD_RESULTS_URL, else SQLite at $ZSAD_RESULTS_PATH)")
    db.set_defaults(func=cmd_db)

    for module in ("service.synthetic.cli", "service.evaluation.cli"):
        try:
            register = __import__(module, fromlist=["register"]).register
        except ImportError:
            continue
        register(sub)
    # `--store` is global, but accept it after the command too (`zsad train --store DIR`).
    def accept_store(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    try:
                        child.add_argument("--store", default=argparse.SUPPRESS, help="model store folder")
                    except argparse.ArgumentError:
                        pass
                    accept_store(child)

    accept_store(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    errors: tuple[type[Exception], ...] = (CliError, ValueError)
    if args.command != "db":  # `zsad db` (run by the container entrypoint at every start) never imports torch
        from .clip_backend import ClipLoadError
        from .db.thresholds import ThresholdFileError
        from .detector import ModelLoadError
        from .store import StoreError

        errors += (ClipLoadError, ModelLoadError, StoreError, ThresholdFileError)
    try:
        return int(args.func(args) or 0)
    except errors as exc:
        print(f"zsad {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
