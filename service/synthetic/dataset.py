"""Write synthetic-world images in the MVTec-AD folder layout, so every MVTec loader and metric runs on them unchanged.

    <out>/<kind>/train/good/000.png
    <out>/<kind>/test/good/000.png
    <out>/<kind>/test/<defect>/000.png
    <out>/<kind>/ground_truth/<defect>/000_mask.png      (0 / 255, same size as the image)
    <out>/synth_manifest.json                             (seed, size, counts: enough to regenerate the set)

Each image comes from its own seed `(seed, stream, kind, split, i)`, so adding kinds, defects or images never
changes the ones already there.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .world import DEFECTS, HELD_OUT_KINDS, KINDS, Defect, Scene, render, render_twins, sample_scene, seeded_rng

STREAM_DATASET = 21
_SPLIT_IDS = {"train": 0, "test_good": 1}  # test/<defect> uses 10 + the defect's index


@dataclass(frozen=True)
class DatasetSpec:
    kinds: tuple[str, ...]
    seed: int = 0
    n_train: int = 20
    n_good: int = 20
    n_defect: int = 10
    size: int = 64
    defects: tuple[str, ...] = DEFECTS

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise ValueError(f"unknown kinds {bad} (known: {', '.join(KINDS)})")
        bad = [d for d in self.defects if d not in DEFECTS]
        if bad:
            raise ValueError(f"unknown defects {bad} (known: {', '.join(DEFECTS)})")
        if not self.kinds:
            raise ValueError("no kinds given")
        if min(self.n_train, self.n_good, self.n_defect) < 0:
            raise ValueError("image counts must be >= 0")
        if self.size < 16:
            raise ValueError("size must be >= 16 pixels")


def _save(img: np.ndarray, path: Path) -> None:
    Image.fromarray(img).save(path, optimize=False, compress_level=1)


def write_mvtec(out: str | Path, spec: DatasetSpec, overwrite: bool = False) -> dict[str, dict[str, int]]:
    """Write the dataset; returns image counts per kind and folder."""
    out = Path(out)
    for kind in spec.kinds:
        if (out / kind).exists() and any((out / kind).iterdir()) and not overwrite:
            raise FileExistsError(f"{out / kind} already exists and is not empty (use --overwrite)")
    counts: dict[str, dict[str, int]] = {}
    for kind in spec.kinds:
        k_id = KINDS.index(kind)
        folders = {"train/good": spec.n_train, "test/good": spec.n_good}
        for name, split, n in (("train/good", "train", spec.n_train), ("test/good", "test_good", spec.n_good)):
            folder = out / kind / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = seeded_rng(spec.seed, STREAM_DATASET, k_id, _SPLIT_IDS[split], i)
                _save(render(sample_scene(rng, kind=kind), spec.size)[0], folder / f"{i:03d}.png")
        for defect in spec.defects:
            folder, gt = out / kind / "test" / defect, out / kind / "ground_truth" / defect
            folder.mkdir(parents=True, exist_ok=True)
            gt.mkdir(parents=True, exist_ok=True)
            for i in range(spec.n_defect):
                rng = seeded_rng(spec.seed, STREAM_DATASET, k_id, 10 + DEFECTS.index(defect), i)
                scene = sample_scene(rng, kind=kind)
                twin = render_twins(scene, Defect(defect, int(rng.integers(2**31))), spec.size)
                _save(twin.defective, folder / f"{i:03d}.png")
                _save(twin.mask.astype(np.uint8) * 255, gt / f"{i:03d}_mask.png")
            folders[f"test/{defect}"] = spec.n_defect
        counts[kind] = folders
    manifest = {
        "generator": "service.synthetic.world",
        "layout": "mvtec-ad",
        "spec": {**asdict(spec), "kinds": list(spec.kinds), "defects": list(spec.defects)},
        "held_out_kinds": [k for k in spec.kinds if k in HELD_OUT_KINDS],
        "counts": counts,
    }
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "synth_manifest.json"
    if manifest_path.exists():  # several calls may fill one folder with different kinds: keep them all
        try:
            old = json.loads(manifest_path.read_text())
            if old.get("spec", {}).get("seed") == spec.seed and old.get("spec", {}).get("size") == spec.size:
                manifest["counts"] = {**old.get("counts", {}), **counts}
                manifest["spec"]["kinds"] = list(manifest["counts"])
                manifest["held_out_kinds"] = [k for k in manifest["counts"] if k in HELD_OUT_KINDS]
        except (OSError, json.JSONDecodeError):
            pass
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return counts


def parse_kinds(values: Sequence[str]) -> tuple[str, ...]:
    """Kinds from CLI words: names, comma lists, or the groups 'all' (the named kinds), 'seen' (training kinds),
    'held-out' and 'random' (the domain-randomisation kinds)."""
    from .world import NAMED_KINDS, RANDOM_KINDS, TRAIN_KINDS

    groups = {"all": NAMED_KINDS, "random": RANDOM_KINDS, "seen": TRAIN_KINDS, "train": TRAIN_KINDS, "held-out": HELD_OUT_KINDS,
              "held_out": HELD_OUT_KINDS}
    out: list[str] = []
    for value in values:
        for word in filter(None, (w.strip() for w in value.split(","))):
            for kind in groups.get(word, (word,)):
                if kind not in KINDS:
                    raise ValueError(f"unknown kind {word!r} (known: {', '.join(KINDS)}, or all / seen / held-out / random)")
                if kind not in out:
                    out.append(kind)
    return tuple(out)


STREAM_FAMILY = 22  # the wide world's evaluation sets (validation family, robustness): their own seed stream


def _family_scene(rng: np.random.Generator, kind: str, setting: str) -> Scene:
    """Random kinds: a reserved validation look; named kinds: their own look. Both in the wide world's jitter."""
    from .data import validation_scene
    from .world import WIDE_RANDOM_KINDS, widen_scene

    if kind in WIDE_RANDOM_KINDS:
        return validation_scene(rng, kind, wide=True, setting=setting)
    return widen_scene(sample_scene(rng, kind=kind), rng, setting)


def write_wide_family(out: str | Path, kinds: Sequence[str], seed: int, n_good: int, n_defect: int, size: int,
                      defects: Sequence[str] = DEFECTS, setting: str = "train", overwrite: bool = False,
                      ) -> dict[str, dict[str, int]]:
    """An MVTec-layout test set of wide-world scenes (pose and photometric jitter, specular, JPEG).

    Random kinds (widget, pattern, weave, label) get reserved validation looks: the validation family, never drawn
    in CLIP or FNN training. Named kinds get their own look. `setting="robust"` draws the evaluation-only
    photometric setting (brighter light, more noise than any training draw).
    """
    from .world import WIDE_DEFECTS, sample_photometric

    out = Path(out)
    bad = [d for d in defects if d not in WIDE_DEFECTS]
    if bad:
        raise ValueError(f"unknown defects {bad} (known: {', '.join(WIDE_DEFECTS)})")
    counts: dict[str, dict[str, int]] = {}
    for kind in kinds:
        if (out / kind).exists() and any((out / kind).iterdir()) and not overwrite:
            raise FileExistsError(f"{out / kind} already exists and is not empty (use --overwrite)")
        k_id = KINDS.index(kind)

        folder = out / kind / "test" / "good"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_good):
            rng = seeded_rng(seed, STREAM_FAMILY, k_id, 1, i)
            scene = _family_scene(rng, kind, setting)
            _save(render(scene, size, extras=sample_photometric(rng))[0], folder / f"{i:03d}.png")
        folders = {"test/good": n_good}
        for defect in defects:
            folder, gt = out / kind / "test" / defect, out / kind / "ground_truth" / defect
            folder.mkdir(parents=True, exist_ok=True)
            gt.mkdir(parents=True, exist_ok=True)
            for i in range(n_defect):
                rng = seeded_rng(seed, STREAM_FAMILY, k_id, 10 + WIDE_DEFECTS.index(defect), i)
                scene = _family_scene(rng, kind, setting)
                extras = sample_photometric(rng)
                twin = render_twins(scene, Defect(defect, int(rng.integers(2**31))), size, extras)
                _save(twin.defective, folder / f"{i:03d}.png")
                _save(twin.mask.astype(np.uint8) * 255, gt / f"{i:03d}_mask.png")
            folders[f"test/{defect}"] = n_defect
        counts[kind] = folders
    out.mkdir(parents=True, exist_ok=True)
    (out / "synth_manifest.json").write_text(json.dumps({
        "generator": "service.synthetic.world (wide)", "layout": "mvtec-ad", "seed": seed, "size": size,
        "setting": setting, "kinds": list(kinds), "defects": list(defects), "counts": counts}, indent=2) + "\n")
    return counts
