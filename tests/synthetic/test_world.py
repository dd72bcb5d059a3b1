"""The synthetic world: determinism, exact defect masks, held-out kinds kept out of training, caption rules."""
from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest

from service.prompts import Vocabulary
from service.synthetic.captions import DEFECT_ADJECTIVES, EXTRA_ANOMALOUS, CaptionConfig, caption
from service.synthetic.data import (
    HeldOutKindError,
    TwinBatches,
    clean_reference_images,
    make_twin_pair,
    reference_captions,
)
from service.synthetic.world import (
    DEFECTS,
    HELD_OUT_KINDS,
    KINDS,
    MASK_THRESHOLD,
    NAMED_KINDS,
    RANDOM_KINDS,
    TRAIN_KINDS,
    WIDE_RANDOM_KINDS,
    Defect,
    min_defect_area,
    render,
    render_twins,
    sample_scene,
    seeded_rng,
)

SIZE = 48


def _twin(kind: str, defect: str, i: int, size: int = SIZE):
    rng = seeded_rng(5, KINDS.index(kind), DEFECTS.index(defect), i)
    return render_twins(sample_scene(rng, kind=kind), Defect(defect, int(rng.integers(2**31))), size)


def test_held_out_kinds_are_disjoint_from_training_kinds():
    assert set(HELD_OUT_KINDS) == {"hex_nut", "pill", "leather"}
    assert not set(HELD_OUT_KINDS) & set(TRAIN_KINDS)
    assert set(HELD_OUT_KINDS) | set(TRAIN_KINDS) == set(NAMED_KINDS) and len(NAMED_KINDS) == 10
    assert set(KINDS) == set(NAMED_KINDS) | set(WIDE_RANDOM_KINDS) and not set(WIDE_RANDOM_KINDS) & set(TRAIN_KINDS)
    assert set(RANDOM_KINDS) < set(WIDE_RANDOM_KINDS)
    assert KINDS[:10] == NAMED_KINDS  # dataset seeds use a kind's index: new kinds only append


def test_render_is_deterministic_per_seed_and_differs_across_seeds():
    a = render(sample_scene(seeded_rng(1, 2, 3), KINDS), SIZE)[0]
    b = render(sample_scene(seeded_rng(1, 2, 3), KINDS), SIZE)[0]
    c = render(sample_scene(seeded_rng(1, 2, 4), KINDS), SIZE)[0]
    assert a.dtype == np.uint8 and a.shape == (SIZE, SIZE, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_training_sample_does_not_depend_on_batch_composition():
    """Sample i is a function of (seed, i): batches of 2 and of 4 pairs contain the very same twins."""
    by4 = TwinBatches(seed=3, pairs=4, size=32, n_steps=2, crop_prob=0.5)[1]  # indices 4..7
    by2 = TwinBatches(seed=3, pairs=2, size=32, n_steps=4, crop_prob=0.5)[3]  # indices 6, 7
    assert by4["images"].shape == (8, 3, 32, 32)
    assert np.array_equal(by4["images"][2:4].numpy(), by2["images"][0:2].numpy())  # clean 6, 7
    assert np.array_equal(by4["images"][6:8].numpy(), by2["images"][2:4].numpy())  # twins 6, 7
    assert np.array_equal(by4["tokens"][6:8].numpy(), by2["tokens"][2:4].numpy())
    single = make_twin_pair(3, 7, 32, crop_prob=0.5)
    assert np.array_equal(single.defective, by2["images"][3].permute(1, 2, 0).numpy())


@pytest.mark.parametrize("kind", KINDS)
def test_mask_is_exactly_the_changed_pixels(kind):
    """Outside the mask the twins are identical up to rounding; inside, nearly every pixel really changed."""
    limit = MASK_THRESHOLD * 255 + 1.0  # the threshold plus one grey level of rounding
    for defect in DEFECTS:
        for i in range(2):
            twin = _twin(kind, defect, i)
            diff = np.abs(twin.clean.astype(int) - twin.defective.astype(int)).max(axis=-1)
            assert twin.mask.sum() >= min_defect_area(SIZE), (kind, defect, i)
            assert diff[~twin.mask].max(initial=0) <= limit, (kind, defect, i)
            changed = (diff[twin.mask] > 2).mean()  # > 2 levels: more than noise rounding
            assert changed >= 0.7, (kind, defect, i, changed)


def test_defect_stays_local():
    for defect in DEFECTS:
        twin = _twin("gear", defect, 0, size=64)
        assert 0 < twin.mask.mean() < 0.25, defect


def test_twins_share_scene_noise_and_lighting():
    twin = _twin("wood", "scratch", 0)
    clean_again = render(twin.scene, SIZE)[0]
    assert np.array_equal(twin.clean, clean_again)
    defective, mask = render(twin.scene, SIZE, twin.defect)
    assert np.array_equal(defective, twin.defective) and np.array_equal(mask, twin.mask)


def test_render_size_is_a_parameter():
    scene = sample_scene(seeded_rng(0, 1), kind="cable")
    for size in (32, 64, 96):
        img, mask = render(scene, size, Defect("hole", 4))
        assert img.shape == (size, size, 3) and mask.shape == (size, size) and mask.any()


def test_training_sampler_never_yields_held_out_kinds():
    kinds = {make_twin_pair(0, i, 24, crop_prob=0.0).kind for i in range(300)}
    assert kinds == set(TRAIN_KINDS)
    with pytest.raises(HeldOutKindError):
        TwinBatches(seed=0, pairs=2, size=24, n_steps=1, kinds=("gear", "pill"))
    with pytest.raises(HeldOutKindError):
        clean_reference_images(0, 2, 24, kinds=("leather",))
    with pytest.raises(HeldOutKindError):
        reference_captions(0, 2, kinds=("hex_nut",))


def test_random_kinds_draw_a_new_shape_per_scene():
    """Each widget has its own silhouette and each pattern its own texture: that is what makes them randomisation."""
    for kind in RANDOM_KINDS:
        scenes = [sample_scene(seeded_rng(3, i), kind=kind) for i in range(6)]
        if kind == "widget":  # same colour, place and light: only the drawn shape may differ
            scenes = [replace(scenes[0], detail_seed=s.detail_seed) for s in scenes]
            looks = [_silhouette(s) for s in scenes]
        else:
            scenes = [replace(scenes[0], detail_seed=s.detail_seed, noise_sigma=0.0) for s in scenes]
            looks = [render(s, SIZE)[0].astype(int) for s in scenes]
        for i in range(len(looks)):
            for j in range(i):
                assert np.abs(looks[i] - looks[j]).mean() > 0.02 * (255 if kind == "pattern" else 1), (kind, i, j)


def _silhouette(scene) -> np.ndarray:
    from service.synthetic.world import _layers

    return _layers(scene, SIZE).support


def test_random_kind_share_follows_the_setting_and_zero_changes_nothing():
    off = [make_twin_pair(4, i, 24, crop_prob=0.0) for i in range(40)]
    zero = [make_twin_pair(4, i, 24, crop_prob=0.0, random_kind_prob=0.0) for i in range(40)]
    assert all(np.array_equal(a.defective, b.defective) and a.clean_caption == b.clean_caption for a, b in zip(off, zero))
    kinds = [make_twin_pair(4, i, 24, crop_prob=0.0, random_kind_prob=0.5).kind for i in range(300)]
    share = np.mean([k in RANDOM_KINDS for k in kinds])
    assert 0.4 < share < 0.6 and set(kinds) == set(TRAIN_KINDS) | set(RANDOM_KINDS)
    assert not set(kinds) & set(HELD_OUT_KINDS)


def test_training_configuration_refuses_held_out_kinds():
    from service.synthetic.train_clip import TrainClipConfig

    with pytest.raises(HeldOutKindError):
        TrainClipConfig(kinds=("gear", "hex_nut"))


_ANOMALY_WORDS = {w.split()[0] for a in DEFECT_ADJECTIVES.values() for w in a} | {
    "damaged", "defective", "broken", "faulty", "abnormal", "flawed", "bad"}
_ANOMALY_PHRASES = ("with flaw", "with defect", "with damage", "with an anomaly", "with a ")


def _is_anomalous(text: str) -> bool:
    words = set(re.findall(r"[a-z-]+", text))
    return bool(words & _ANOMALY_WORDS) or any(p in text for p in _ANOMALY_PHRASES)


def test_captions_state_words_follow_the_label_and_random_words_are_common():
    rng = np.random.default_rng(0)
    normal = [caption(rng, "gear", "red", None) for _ in range(400)]
    anomalous = [caption(rng, "gear", "red", "crack", "top left") for _ in range(400)]
    assert not any(_is_anomalous(t) for t in normal), [t for t in normal if _is_anomalous(t)][:3]
    assert all(_is_anomalous(t) for t in anomalous), [t for t in anomalous if not _is_anomalous(t)][:3]
    # Random letter strings (tokens in no caption vocabulary) in about half the captions, in several positions.
    with_random = [t for t in normal + anomalous if any(len(w) >= 3 and w not in _KNOWN for w in re.findall(r"[a-z]+", t))]
    assert 0.35 < len(with_random) / 800 < 0.65
    assert any(t.startswith(("a ", "an ", "there")) is False for t in with_random)  # a prefix position occurs
    # The detector's own state vocabulary is used.
    vocab = Vocabulary.load()
    for state in ("flawless", "unblemished", "without defect"):
        assert any(state in t for t in normal)
    for state in ("damaged", "with defect"):
        assert any(state in t for t in anomalous)
    assert any("top left" in t for t in anomalous)
    assert vocab.anomalous_states


def test_captions_without_random_words_when_disabled():
    rng = np.random.default_rng(1)
    texts = [caption(rng, "wood", None, None, cfg=CaptionConfig(random_word_prob=0.0)) for _ in range(200)]
    assert not any(w not in _KNOWN for t in texts for w in re.findall(r"[a-z]+", t) if len(w) >= 3)


def test_closeup_crop_that_misses_the_defect_gets_a_normal_caption():
    hidden = [p for p in (make_twin_pair(9, i, 48, crop_prob=1.0) for i in range(120)) if not p.defect_visible]
    shown = [p for p in (make_twin_pair(9, i, 48, crop_prob=0.0) for i in range(40))]
    assert hidden, "some crops should miss the defect"
    assert not any(_is_anomalous(p.defective_caption) for p in hidden)
    assert all(_is_anomalous(p.defective_caption) for p in shown)
    assert all(not _is_anomalous(p.clean_caption) for p in shown + hidden)


def _known_words() -> set[str]:
    from service.synthetic import captions as c

    vocab = Vocabulary.load()
    text = " ".join(
        list(vocab.normal_states) + list(vocab.anomalous_states) + list(vocab.templates) + list(c.EXTRA_NORMAL)
        + list(EXTRA_ANOMALOUS) + list(c.CLOSEUP_TEMPLATES) + list(c.EXTRA_TEMPLATES) + list(c.LOCATION_PHRASES)
        + list(c.GENERIC_NOUNS) + [w for v in c.KIND_NOUNS.values() for w in v]
        + [w for v in c.DEFECT_NOUNS.values() for w in v] + [w for v in DEFECT_ADJECTIVES.values() for w in v]
        + [w for v in c.COLOUR_WORDS.values() for w in v]
        + ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "gold",
           "top", "bottom", "left", "right", "center"]
    )
    return set(re.findall(r"[a-z]+", text))


_KNOWN = _known_words()
