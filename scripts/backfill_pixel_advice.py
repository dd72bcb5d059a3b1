"""Add `pixel_threshold_advice` to a published model that predates it (default@v3), from its own reference images.

Why: `zsad train --calibration-images` writes the advice since issue #13, but `default@v3` was published before, so
an uncalibrated product fell back to a pixel threshold of 0.5 that no calibration chose. This rebuilds the manifest's
recorded reference set (`zsad synth dataset --kinds seen --seed 777 --n-train 30 --n-good 0 --n-defect 0`, train/good),
refits the calibration through the serving detector, checks that the refitted image calibration agrees with the one the
manifest already holds (to `TOLERANCE` in the logit offsets: the model was published from a bf16 machine, this may run
in fp32), so the advice belongs to that calibration, and writes only `pixel_threshold_advice`.
The model's weights and files (and their sha256) are untouched.

    python scripts/backfill_pixel_advice.py [--store model_store] [--model default] [--version v3] [--dry-run]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.calibration import fit_detector_calibration  # noqa: E402
from service.constants import PIXEL_QUANTILE  # noqa: E402
from service.detector import load_detector  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.store import ModelStore, _write_json_durable  # noqa: E402
from service.synthetic.dataset import DatasetSpec, write_mvtec  # noqa: E402
from service.synthetic.world import TRAIN_KINDS  # noqa: E402

TOLERANCE = 0.05  # logit offsets are ~6 and ~3.6; 0.05 moves a calibrated score by < 0.01


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=str(REPO / "model_store"))
    ap.add_argument("--model", default="default")
    ap.add_argument("--version", default="v3")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    store = ModelStore(args.store)
    manifest = store.manifest(args.model, args.version)
    if "seed 777" not in manifest.get("calibration", {}).get("reference", ""):
        sys.exit(f"{args.model}@{args.version}: its calibration reference is not the seed-777 seen-kind set")
    settings = Settings(model_store=args.store, model_name=args.model, model_version=args.version, tta_views=None)
    detector = load_detector(settings)
    with tempfile.TemporaryDirectory() as tmp:
        write_mvtec(Path(tmp), DatasetSpec(kinds=tuple(TRAIN_KINDS), seed=777, n_train=30, n_good=0, n_defect=0))
        images = sorted(Path(tmp).glob("*/train/good/*.png"))
        fit = fit_detector_calibration(detector, images)
    drift = max(abs(a - b) for score in ("fnn", "prompt") for a, b in zip(manifest["calibration"][score],
                                                                           fit.entry[score]))
    if drift > TOLERANCE:
        sys.exit(f"refitted calibration {fit.entry} differs from the manifest's by {drift:.3g}: not the same reference")
    advice = {**fit.pixel_threshold_advice,
              "basis": f"{PIXEL_QUANTILE:g} quantile of the heat of the calibration images (backfilled by "
                       f"scripts/backfill_pixel_advice.py; refitted offsets within {drift:.3f} of the manifest's)"}
    print(f"{args.model}@{args.version} on {len(images)} images: pixel_threshold_advice {json.dumps(advice)}")
    if not args.dry_run:
        path = store.path(args.model, args.version) / "manifest.json"
        _write_json_durable(path, {**manifest, "pixel_threshold_advice": advice})


if __name__ == "__main__":
    main()
