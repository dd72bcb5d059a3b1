"""Training data for the tiny CLIP: twin batches generated on the fly, one whole batch per step.

Why twins: with independent images the contrastive loss is satisfied by kind and colour alone and the defect state is
never learned. Every clean image therefore sits in the same batch as the same scene with a defect, under a caption
that differs in its state words.

Why one item per step: `TwinBatches[step]` builds the whole batch from seeds `(seed, stream, step * pairs + j)`, so
the data of a step never depends on which DataLoader worker made it, on the number of workers, or on a resume.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..tokenizer import CharTokenizer
from .captions import CaptionConfig, caption
from .world import (
    DEFECTS,
    HELD_OUT_KINDS,
    KINDS,
    RANDOM_KINDS,
    TRAIN_KINDS,
    VALIDATION_LOOK_MODULUS,
    WIDE_DEFECTS,
    WIDE_RANDOM_KINDS,
    Crop,
    Scene,
    apply_crop,
    crop_mask,
    is_validation_look,
    location_words,
    random_defect,
    render,
    render_twins,
    sample_crop,
    sample_photometric,
    sample_scene,
    seeded_rng,
    widen_scene,
)

# Seed streams: each use of the world draws from its own, so no two ever share a sample.
STREAM_TRAIN = 11
STREAM_IMAGE_CENTRE = 12
STREAM_TEXT_CENTRE = 13
STREAM_VALIDATION = 14


class HeldOutKindError(ValueError):
    """A training or tuning sampler was asked for a held-out kind."""


def check_training_kinds(kinds: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown kinds {unknown} (known: {', '.join(KINDS)})")
    leaked = [k for k in kinds if k in HELD_OUT_KINDS]
    if leaked:
        raise HeldOutKindError(f"kinds {leaked} are held out: no training or tuning may see them")
    if not kinds:
        raise ValueError("no training kinds")
    return kinds


@dataclass(frozen=True)
class TwinPair:
    clean: np.ndarray  # [S, S, 3] uint8
    defective: np.ndarray
    clean_caption: str
    defective_caption: str
    defect_visible: bool  # False when a close-up crop left the defect out (its caption is then a normal one)
    kind: str
    defect: str
    mask: np.ndarray  # [S, S] bool: the pixels the defect changed in `defective` (empty when not visible)


def training_look(scene: Scene) -> Scene:
    """Move a random-kind scene off the reserved validation looks (detail seed 0 mod 16): training never draws them."""
    if scene.kind in WIDE_RANDOM_KINDS and is_validation_look(scene.detail_seed):
        return replace(scene, detail_seed=scene.detail_seed + 1)
    return scene


def validation_scene(rng: np.random.Generator, kind: str, wide: bool = True, setting: str = "train") -> Scene:
    """A scene of the validation family: a random kind with a reserved look (never drawn in CLIP or FNN training)."""
    if kind not in WIDE_RANDOM_KINDS:
        raise ValueError(f"the validation family has the random kinds {WIDE_RANDOM_KINDS}, not {kind!r}")
    scene = sample_scene(rng, kind=kind)
    scene = replace(scene, detail_seed=(scene.detail_seed // VALIDATION_LOOK_MODULUS) * VALIDATION_LOOK_MODULUS)
    return widen_scene(scene, rng, setting) if wide else scene


def make_twin_pair(seed: int, index: int, size: int, kinds: tuple[str, ...] = TRAIN_KINDS, crop_prob: float = 0.3,
                   captions: CaptionConfig = CaptionConfig(), random_kind_prob: float = 0.0,
                   wide: bool = False) -> TwinPair:
    """Training sample `index`: a twin with captions, ~`crop_prob` of them as close-ups.

    ~`random_kind_prob` of the scenes are of `RANDOM_KINDS` (a new shape or texture each); at 0 no draw is made, so
    the samples are exactly those of a run without random kinds. `wide` draws from the wide world (v4): the random
    kinds + weave and label, the fine and global defects too, pose/light jitter, specular highlights and JPEG; the
    reserved validation looks are never drawn.
    """
    rng = seeded_rng(seed, STREAM_TRAIN, index)
    random_kinds = WIDE_RANDOM_KINDS if wide else RANDOM_KINDS
    if random_kind_prob > 0 and rng.uniform() < random_kind_prob:
        scene = sample_scene(rng, random_kinds)
    else:
        scene = sample_scene(rng, kinds)
    extras = None
    if wide:
        scene = widen_scene(training_look(scene), rng, "train")
        extras = sample_photometric(rng)
    twin = render_twins(scene, random_defect(rng, WIDE_DEFECTS if wide else DEFECTS), size, extras)
    clean, defective, mask = twin.clean, twin.defective, twin.mask
    crop: Crop | None = None
    visible = True
    if rng.uniform() < crop_prob:
        total = int(mask.sum())
        for _ in range(4):
            cand = sample_crop(rng, size)
            inside = int(mask[cand.y0 : cand.y0 + cand.side, cand.x0 : cand.x0 + cand.side].sum())
            if inside == 0:
                crop, visible = cand, False
                break
            if inside >= 0.3 * total or inside >= 12 * (size / 64) ** 2:
                crop = cand
                break
        if crop is not None:
            clean, defective = apply_crop(clean, crop, size), apply_crop(defective, crop, size)
            mask = crop_mask(mask, crop, size)
    closeup = crop is not None
    where = location_words(mask) if visible else None
    return TwinPair(
        clean=clean,
        defective=defective,
        clean_caption=caption(rng, scene.kind, scene.colour, None, None, closeup, captions),
        defective_caption=caption(rng, scene.kind, scene.colour, twin.defect.type if visible else None, where,
                                  closeup, captions),
        defect_visible=visible,
        kind=scene.kind,
        defect=twin.defect.type,
        mask=mask if visible else np.zeros_like(mask),
    )


@dataclass
class TwinBatches(torch.utils.data.Dataset):
    """Item `step` = one training batch: `pairs` clean images, then their `pairs` defective twins."""

    seed: int
    pairs: int
    size: int
    n_steps: int
    kinds: tuple[str, ...] = TRAIN_KINDS
    crop_prob: float = 0.3
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    context_length: int = 96
    random_kind_prob: float = 0.0
    wide: bool = False

    def __post_init__(self) -> None:
        self.kinds = check_training_kinds(self.kinds)
        self.tokenizer = CharTokenizer(self.context_length)

    def __len__(self) -> int:
        return self.n_steps

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        items = [make_twin_pair(self.seed, step * self.pairs + j, self.size, self.kinds, self.crop_prob, self.captions,
                                self.random_kind_prob, self.wide)
                 for j in range(self.pairs)]
        images = np.stack([p.clean for p in items] + [p.defective for p in items])
        texts = [p.clean_caption for p in items] + [p.defective_caption for p in items]
        return {
            "images": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),  # uint8 [2P, 3, S, S]
            "tokens": self.tokenizer(texts),
            "visible": torch.tensor([p.defect_visible for p in items]),
            "named": torch.tensor([p.kind in self.kinds for p in items]),  # a training kind's scene (not a random kind)
            "masks": torch.from_numpy(np.stack([p.mask for p in items])),  # bool [P, S, S]: the twins' defect pixels
            "step": torch.tensor(step),
        }


def clean_reference_images(seed: int, n: int, size: int, kinds: tuple[str, ...] = TRAIN_KINDS) -> np.ndarray:
    """`n` unlabeled clean renders of training kinds [n, S, S, 3] from their own seed stream (for the image centre)."""
    kinds = check_training_kinds(kinds)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        rng = seeded_rng(seed, STREAM_IMAGE_CENTRE, i)
        out[i] = render(sample_scene(rng, kinds), size)[0]
    return out


def reference_captions(seed: int, n: int, kinds: tuple[str, ...] = TRAIN_KINDS,
                       captions: CaptionConfig = CaptionConfig()) -> list[str]:
    """`n` training-style captions, half normal and half anomalous (for the text centre)."""
    kinds = check_training_kinds(kinds)
    out = []
    for i in range(n):
        rng = seeded_rng(seed, STREAM_TEXT_CENTRE, i)
        scene = sample_scene(rng, kinds)
        defect = random_defect(rng).type if i % 2 else None
        out.append(caption(rng, scene.kind, scene.colour, defect, None, bool(rng.uniform() < 0.3), captions))
    return out


def worker_init(_: int) -> None:
    """DataLoader workers render with numpy on one core each; keep torch from spawning threads inside them."""
    torch.set_num_threads(1)
