"""Synthetic few-shot sets in the MVTec layout, in two worlds (shared by benchmarks/fewshot.py and fewshot_weights.py):

* `random`: the generator's own datasets (`service.synthetic.dataset.write_mvtec`): every image of a kind is a new
  scene: its own colour, background, size, tooth count, texture scale, lighting and (widget, pattern) its own shape.
  A "kind" there is a category of products, not a product.
* `product`: what a production line sees, and what few-shot mode is for: per kind ONE product variant (a scene drawn
  once: colour, second colours, background, size, parts, shape parameter, lighting; for widget and pattern also the
  shape, which their `detail_seed` draws), and every image of it (train/good, test/good, test/<defect>) is that
  variant with pose jitter only: centre +-0.03 of the image, rotation +-0.3 rad, size +-3%, brightness +-3%, and its
  own sensor noise and texture detail (named kinds; widget and pattern keep the variant's detail seed, which also
  draws their shape). Defects, masks and seeds as the generator makes them (`render_twins`).
* `product_wide`: the same product variants (the same base scene per kind and seed), each image with that pose jitter
  plus the camera variation a line sees: sensor noise sigma U(0.002, 0.04), light strength U(0, 0.25), brightness
  x U(0.9, 1.1), and the wide world's specular highlight and JPEG draw (`sample_photometric`; never its evaluation-only
  "robust" setting). The product world of the tuning kinds is near 100 AUROC, too easy to rank small changes; this
  one is not (README "Few-shot mode").

Both use the generator as a library (nothing in service/synthetic changes); a set is fixed by (world, kind, seed).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from service.synthetic.dataset import DatasetSpec, write_mvtec
from service.synthetic.world import (
    DEFECTS,
    KINDS,
    RANDOM_KINDS,
    Defect,
    Photometric,
    Scene,
    render,
    render_twins,
    sample_photometric,
    sample_scene,
    seeded_rng,
)

WORLDS = ("product", "product_wide", "random")
STREAM = 77  # this module's seed stream (the generator's dataset stream is 21)


def _save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, compress_level=1)


def variant_image(base, rng: np.random.Generator):
    """One image's scene of the product variant `base`: pose jitter, its own noise and detail."""
    detail = base.detail_seed if base.kind in RANDOM_KINDS else int(rng.integers(2**31))
    return replace(base, cx=base.cx + float(rng.uniform(-0.03, 0.03)), cy=base.cy + float(rng.uniform(-0.03, 0.03)),
                   angle=base.angle + float(rng.uniform(-0.3, 0.3)), scale=base.scale * float(rng.uniform(0.97, 1.03)),
                   brightness=base.brightness * float(rng.uniform(0.97, 1.03)), detail_seed=detail)


def camera_variation(scene: Scene, rng: np.random.Generator) -> tuple[Scene, Photometric]:
    """`product_wide`: one image's noise, light and brightness on top of its pose jitter, and its camera extras."""
    scene = replace(scene, noise_sigma=float(rng.uniform(0.002, 0.04)), light_strength=float(rng.uniform(0.0, 0.25)),
                    brightness=scene.brightness * float(rng.uniform(0.9, 1.1)))
    return scene, sample_photometric(rng)


def write_set(root: Path, world: str, kinds: tuple[str, ...], seed: int, n_train: int, n_good: int, n_defect: int,
              size: int = 64) -> None:
    if world == "random":
        write_mvtec(root, DatasetSpec(kinds=kinds, seed=seed, n_train=n_train, n_good=n_good, n_defect=n_defect,
                                      size=size))
        return
    if world not in WORLDS:
        raise ValueError(f"world must be one of {WORLDS}, got {world!r}")
    wide = world == "product_wide"
    stream = STREAM + 1 if wide else STREAM  # the base scene comes from STREAM in both: the same product

    def image_scene(base: Scene, rng: np.random.Generator) -> tuple[Scene, Photometric | None]:
        scene = variant_image(base, rng)
        return camera_variation(scene, rng) if wide else (scene, None)

    for kind in kinds:
        k = KINDS.index(kind)
        base = sample_scene(seeded_rng(seed, STREAM, k, 0), kind=kind)
        for split, folder, n in ((1, "train/good", n_train), (2, "test/good", n_good)):
            for i in range(n):
                scene, extras = image_scene(base, seeded_rng(seed, stream, k, split, i))
                _save(render(scene, size, extras=extras)[0], root / kind / folder / f"{i:03d}.png")
        for d, defect in enumerate(DEFECTS):
            for i in range(n_defect):
                rng = seeded_rng(seed, stream, k, 10 + d, i)
                scene, extras = image_scene(base, rng)
                twin = render_twins(scene, Defect(defect, int(rng.integers(2**31))), size, extras)
                _save(twin.defective, root / kind / "test" / defect / f"{i:03d}.png")
                _save(twin.mask.astype(np.uint8) * 255, root / kind / "ground_truth" / defect / f"{i:03d}_mask.png")
