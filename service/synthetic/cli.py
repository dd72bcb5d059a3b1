"""`zsad synth ...`: the synthetic world's commands (dataset, train-clip, merge-clip).

`register(subparsers)` adds them to the main `zsad` parser; `python -m service.synthetic.cli synth ...` runs them
alone (handy on a machine without the service's dependencies). Wrong arguments exit 2 with one clear line, as
argparse does; failures while running exit 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _fail(args: argparse.Namespace, message: str) -> None:
    args._synth_parser.error(message)  # prints usage + message, exits 2


def _store_root(args: argparse.Namespace) -> Path:
    if getattr(args, "store", None):
        return Path(args.store)
    try:
        from ..settings import Settings

        return Path(Settings().model_store)
    except ImportError:  # the service's settings need pydantic-settings; the trainer alone does not
        return Path(os.environ.get("ZSAD_MODEL_STORE", Path(__file__).resolve().parents[2] / "model_store"))


def _check_new_version(args: argparse.Namespace, store_root: Path, name: str, version: str | None) -> None:
    """Refuse (exit 2, before any work) a bad store name or version, or a version that exists: they are immutable."""
    from ..store import ModelStore, StoreError, validate_name

    try:
        validate_name(name)
        if version:
            validate_name(version, "version")
            if version in ModelStore(store_root).versions(name):
                _fail(args, f"{name}@{version} already exists in {store_root}; versions are immutable")
    except StoreError as exc:
        _fail(args, str(exc))


# --- dataset ---------------------------------------------------------------------------------------------------
def cmd_dataset(args: argparse.Namespace) -> int:
    from .dataset import DatasetSpec, parse_kinds, write_mvtec
    from .world import DEFECTS

    try:
        kinds = parse_kinds(args.kinds)
        defects = tuple(args.defects) if args.defects else DEFECTS
        spec = DatasetSpec(kinds, args.seed, args.n_train, args.n_good, args.n_defect, args.size, defects)
    except ValueError as exc:
        _fail(args, str(exc))
    try:
        counts = write_mvtec(args.out, spec, overwrite=args.overwrite)
    except FileExistsError as exc:
        _fail(args, str(exc))
    total = sum(sum(c.values()) for c in counts.values())
    print(json.dumps({"out": str(args.out), "images": total, "kinds": list(counts)}))
    return 0


def _add_dataset(sub: argparse._SubParsersAction) -> None:
    from .world import DEFECTS, HELD_OUT_KINDS, KINDS

    d = sub.add_parser(
        "dataset",
        help="write a synthetic dataset in the MVTec-AD layout",
        description="Render a synthetic dataset in the MVTec-AD folder layout (train/good, test/good, test/<defect>, "
        f"ground_truth/<defect>/<stem>_mask.png). Kinds: {', '.join(KINDS)}; held out from all training: "
        f"{', '.join(HELD_OUT_KINDS)}.",
    )
    d.add_argument("--out", required=True, type=Path, help="output folder")
    d.add_argument("--kinds", nargs="+", default=["all"], metavar="KIND",
                   help="kinds (names or comma lists), or the groups all (the ten named kinds) / seen / held-out / "
                        "random (widget, pattern) (default: all)")
    d.add_argument("--seed", type=int, default=0, help="dataset seed (default: %(default)s)")
    d.add_argument("--n-train", type=int, default=20, help="train/good images per kind (default: %(default)s)")
    d.add_argument("--n-good", type=int, default=20, help="test/good images per kind (default: %(default)s)")
    d.add_argument("--n-defect", type=int, default=10, help="test images per kind and defect (default: %(default)s)")
    d.add_argument("--size", type=int, default=64, help="image side in pixels (default: %(default)s)")
    d.add_argument("--defects", nargs="+", choices=DEFECTS, metavar="DEFECT",
                   help=f"defect types (default: all of {', '.join(DEFECTS)})")
    d.add_argument("--overwrite", action="store_true", help="write into kind folders that already exist")
    d.set_defaults(func=cmd_dataset, _synth_parser=d)


# --- train-clip ------------------------------------------------------------------------------------------------
def cmd_train_clip(args: argparse.Namespace) -> int:
    from ..cnn_tower import FINE_TOWER
    from .dataset import parse_kinds
    from .train_clip import TrainClipConfig, publish, train

    try:
        cfg = TrainClipConfig(
            kinds=parse_kinds(args.kinds),
            steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, seed=args.seed,
            render_size=args.render_size, image_size=args.image_size, device=args.device, workers=args.workers,
            max_minutes=args.max_minutes, fit_to_budget=args.fit_to_budget, out_name=args.out_name,
            version=args.version, log_every=args.log_every, ckpt_every=args.ckpt_every,
            random_word_prob=args.random_word_prob, crop_prob=args.crop_prob, random_kind_prob=args.random_kind_prob,
            wide=args.wide, tower=FINE_TOWER if args.fine_grid else None, channels_last=not args.no_channels_last,
            centre_images=args.centre_images, local_weight=args.local_weight, distill_weight=args.distill_weight,
        )
    except ValueError as exc:
        _fail(args, str(exc))
    if args.resume and not Path(args.resume).is_file():
        _fail(args, f"--resume: checkpoint {args.resume} does not exist")
    if args.distill_weight > 0 and not args.init_from:
        _fail(args, "--distill-weight needs --init-from (the model to stay close to; also when resuming)")
    if args.max_minutes is not None and args.max_minutes <= 0:
        _fail(args, "--max-minutes must be > 0")
    from ..store import ModelStore, StoreError

    store_root = _store_root(args)
    init, lineage = None, None
    _check_new_version(args, store_root, cfg.out_name, None if args.no_publish else cfg.version)
    if args.init_from:  # checked now, not after the data workers have started
        name, _, version = args.init_from.partition("@")
        try:
            version = ModelStore(store_root).verify(name, version or None)[1]["version"]
        except StoreError as exc:
            _fail(args, f"--init-from: {exc}")
        init, lineage = (store_root, name, version), f"{name}@{version}"

    log_file = open(args.log_file, "a") if args.log_file else None

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        if log_file:
            log_file.write(message + "\n")
            log_file.flush()

    ckpt = args.ckpt or Path("runs") / cfg.out_name / "ckpt.pt"
    try:
        config = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "func"}
        log(f"train-clip config: {json.dumps(config, default=str)}")
        result = train(cfg, ckpt_path=ckpt, resume=args.resume, log=log, progress=not args.quiet, init_from=init)
        log(f"trained {result.steps_done}/{result.total_steps} steps in {result.wall_time_s:.0f} s on {result.device}")
        out = {"steps": result.steps_done, "wall_time_s": round(result.wall_time_s, 1), "checkpoint": str(ckpt)}
        if not args.no_publish:
            out["version"] = publish(result, cfg, store_root, device=args.centre_device or cfg.device, log=log,
                                     init_from=lineage)
            out["name"] = cfg.out_name
            out["store"] = str(store_root)
        print(json.dumps(out))
    finally:
        if log_file:
            log_file.close()
    return 0


def _add_train_clip(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train-clip",
        help="train the in-house tiny CLIP on the synthetic world and publish it to the store",
        description="Train a tiny CLIP (ResNet image tower, character-level text tower) from scratch on twin batches "
        "of the synthetic world, generated on the fly from the training kinds only, then publish it to the model "
        "store with its modality centres.",
    )
    t.add_argument("--steps", type=int, default=1000, help="optimiser steps (default: %(default)s)")
    t.add_argument("--batch", type=int, default=128, help="images per step, half clean and half twins (default: %(default)s)")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    t.add_argument("--warmup", type=int, default=40, help="linear warm-up steps (default: %(default)s)")
    t.add_argument("--image-size", type=int, default=192, help="model input side, multiple of 32 (default: %(default)s)")
    t.add_argument("--render-size", type=int, default=64, help="side the world is rendered at (default: %(default)s)")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    t.add_argument("--centre-device", default=None, help="device for the modality centres (default: --device)")
    t.add_argument("--seed", type=int, default=0, help="seed of the weights and the data (default: %(default)s)")
    t.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader worker processes rendering batches (default: %(default)s)")
    t.add_argument("--random-word-prob", type=float, default=0.5, help="captions with random strings (default: %(default)s)")
    t.add_argument("--kinds", nargs="+", default=["seen"], metavar="KIND",
                   help="training kinds: names or 'seen' (default: the seven seen kinds); held-out kinds are "
                        "refused. Leave one seen kind out to use it as a validation kind for model selection")
    t.add_argument("--random-kind-prob", type=float, default=0.0,
                   help="share of scenes of the random-shape kinds widget/pattern (default: %(default)s)")
    t.add_argument("--crop-prob", type=float, default=0.3, help="close-up crops (default: %(default)s)")
    t.add_argument("--wide", action="store_true",
                   help="the wide world (v4): random kinds + weave/label, fine and global defects, pose and "
                        "photometric jitter; the reserved validation looks are never drawn")
    t.add_argument("--fine-grid", action="store_true",
                   help="CNN tower at stride 8 (stem conv stride 1, layer4 dilated): a 12x12 map at 96 px; "
                        "render at --image-size (no upsampling)")
    t.add_argument("--local-weight", type=float, default=0.0,
                   help="weight of the local term: each WinCLIP window of a twin must match its pair's defect "
                        "caption where the defect mask is and its clean caption elsewhere (CNN towers; default: "
                        "%(default)s, the global contrastive loss only)")
    t.add_argument("--distill-weight", type=float, default=0.0,
                   help="with --init-from: keep the image embeddings of the training kinds' scenes and every caption's "
                        "text embedding close to the starting model's (1 - cos, Learning without Forgetting; default: "
                        "%(default)s, off)")
    t.add_argument("--no-channels-last", action="store_true", help="keep NCHW convolutions on the CPU")
    t.add_argument("--centre-images", type=int, default=2048,
                   help="clean training-kind renders averaged for the image centre (default: %(default)s)")
    t.add_argument("--max-minutes", type=float, default=None, help="wall budget: stop cleanly and still publish")
    t.add_argument("--fit-to-budget", action="store_true",
                   help="with --max-minutes: shorten the cosine schedule to the steps the measured speed allows")
    t.add_argument("--out-name", default="tiny-factory-clip", help="store name to publish under (default: %(default)s)")
    t.add_argument("--version", default=None, help="store version (default: the next vN)")
    t.add_argument("--resume", default=None, metavar="CKPT", help="continue from a checkpoint")
    t.add_argument("--init-from", default=None, metavar="NAME[@VERSION]",
                   help="start from a published CLIP's weights in the store (fresh optimiser and schedule), "
                        "e.g. tiny-factory-clip@v1 when its checkpoint is gone")
    t.add_argument("--ckpt", type=Path, default=None, help="checkpoint path (default: runs/<out-name>/ckpt.pt)")
    t.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every N steps (default: %(default)s)")
    t.add_argument("--log-every", type=int, default=20, help="log a JSON line every N steps (default: %(default)s)")
    t.add_argument("--log-file", default=None, help="also append the log lines to this file")
    t.add_argument("--no-publish", action="store_true", help="train and checkpoint only")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--store", default=argparse.SUPPRESS, help="model store folder (default: $ZSAD_MODEL_STORE or ./model_store)")
    t.set_defaults(func=cmd_train_clip, _synth_parser=t)


# --- merge-clip ------------------------------------------------------------------------------------------------
def cmd_merge_clip(args: argparse.Namespace) -> int:
    from ..store import StoreError
    from .merge_clip import merge_clips

    if not 0.0 <= args.alpha <= 1.0:
        _fail(args, "--alpha must be between 0 and 1")
    name, _, version_a = args.base.partition("@")
    name_b, _, version_b = args.to.partition("@")
    if not version_a or not version_b or name_b != name:
        _fail(args, "--base and --to must be versions of one CLIP: NAME@VERSION")
    store_root = _store_root(args)
    _check_new_version(args, store_root, name, args.version)
    try:
        version = merge_clips(str(store_root), name, version_a, version_b, args.alpha, args.version)
    except (StoreError, ValueError, OSError, RuntimeError) as exc:  # RuntimeError: torch refusing the tensors
        print(f"zsad synth merge-clip: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"name": name, "version": version, "alpha": args.alpha}))
    return 0


def _add_merge_clip(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser(
        "merge-clip",
        help="publish a weight-space interpolation of two versions of an in-house CLIP (WiSE-FT)",
        description="Publish (1 - alpha) * BASE + alpha * TO, two versions of one in-house CLIP architecture (a "
        "fine-tune and the model it started from), with modality centres recomputed for the result. No training: "
        "choose alpha on validation data.",
    )
    m.add_argument("--base", required=True, metavar="NAME@VERSION", help="alpha = 0 end, e.g. tiny-factory-clip@v3")
    m.add_argument("--to", required=True, metavar="NAME@VERSION", help="alpha = 1 end, e.g. tiny-factory-clip@v4")
    m.add_argument("--alpha", type=float, required=True, help="mixing weight of --to, between 0 and 1")
    m.add_argument("--version", default=None, help="store version (default: the next vN)")
    m.add_argument("--store", default=argparse.SUPPRESS, help="model store folder (default: $ZSAD_MODEL_STORE or ./model_store)")
    m.set_defaults(func=cmd_merge_clip, _synth_parser=m)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `synth dataset`, `synth train-clip` and `synth merge-clip` to the main `zsad` parser."""
    s = subparsers.add_parser("synth", help="synthetic factory world: datasets and the in-house tiny CLIP",
                              description="Synthetic factory world: render datasets, train the in-house tiny CLIP.")
    sub = s.add_subparsers(dest="synth_cmd", required=True, metavar="ACTION")
    _add_dataset(sub)
    _add_train_clip(sub)
    _add_merge_clip(sub)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zsad")
    parser.add_argument("--store", default=None, help="model store folder")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as exc:
        print(f"zsad {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
