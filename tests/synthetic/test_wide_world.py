"""The wide world (v4): new kinds and defects render with honest masks, the held-out kinds and the reserved validation
looks never reach training, and the robustness setting lies outside every training draw."""
import numpy as np
import pytest

from service.synthetic.data import make_twin_pair, training_look, validation_scene
from service.synthetic.dataset import write_wide_family
from service.synthetic.world import (
    FINE_DEFECTS,
    GLOBAL_DEFECTS,
    HELD_OUT_KINDS,
    WIDE_DEFECTS,
    WIDE_RANDOM_KINDS,
    Defect,
    is_validation_look,
    render_twins,
    sample_photometric,
    sample_scene,
    seeded_rng,
    widen_scene,
)

SIZE = 96


@pytest.mark.parametrize("defect", FINE_DEFECTS + GLOBAL_DEFECTS)
@pytest.mark.parametrize("kind", ("widget", "weave", "label", "gear"))
def test_new_defects_change_exactly_their_mask(kind, defect):
    scene = sample_scene(seeded_rng(3, WIDE_RANDOM_KINDS.index(kind) if kind in WIDE_RANDOM_KINDS else 9), kind=kind)
    twin = render_twins(scene, Defect(defect, 11), SIZE)
    diff = np.abs(twin.clean.astype(int) - twin.defective.astype(int)).max(-1)
    assert twin.mask.sum() >= 2
    if (~twin.mask).any():  # outside the mask only rounding differs (shared noise); a cast texture is all mask
        assert diff[~twin.mask].max() <= 0.05 * 255 + 1
    area = twin.mask.mean()
    if defect in FINE_DEFECTS:
        assert area < 0.01  # a few pixels
    elif defect in ("colour_cast", "wrong_material"):
        assert area > 0.1  # the whole part


def test_photometric_extras_leave_the_mask_and_twins_aligned():
    scene = widen_scene(sample_scene(seeded_rng(1, 2), kind="widget"), seeded_rng(1, 3))
    extras = sample_photometric(seeded_rng(4, 5))
    plain = render_twins(scene, Defect("hole", 7), SIZE)
    lit = render_twins(scene, Defect("hole", 7), SIZE, extras)
    assert (plain.mask == lit.mask).all()


def test_wide_training_never_draws_held_out_kinds_or_validation_looks():
    kinds, defects = set(), set()
    for i in range(300):
        pair = make_twin_pair(0, i, 32, random_kind_prob=0.5, wide=True, crop_prob=0.0)
        kinds.add(pair.kind)
        defects.add(pair.defect)
    assert not kinds & set(HELD_OUT_KINDS)
    assert set(WIDE_RANDOM_KINDS) <= kinds
    assert len(defects) > 10 and defects <= set(WIDE_DEFECTS)
    for i in range(200):  # the look every random-kind training scene gets is never a reserved one
        scene = sample_scene(seeded_rng(9, i), WIDE_RANDOM_KINDS)
        assert not is_validation_look(training_look(scene).detail_seed)


def test_validation_family_uses_reserved_looks_only():
    for i, kind in enumerate(WIDE_RANDOM_KINDS * 5):
        assert is_validation_look(validation_scene(seeded_rng(2, i), kind).detail_seed)
    with pytest.raises(ValueError):
        validation_scene(seeded_rng(0), "pill")


def test_robust_setting_lies_outside_every_training_draw():
    base = sample_scene(seeded_rng(0), kind="gear")
    train = [widen_scene(base, seeded_rng(1, i), "train") for i in range(300)]
    robust = [widen_scene(base, seeded_rng(2, i), "robust") for i in range(300)]
    assert max(s.brightness for s in train) < min(s.brightness for s in robust)
    assert max(s.noise_sigma for s in train) < min(s.noise_sigma for s in robust)


def test_wide_family_writes_an_mvtec_layout(tmp_path):
    counts = write_wide_family(tmp_path, ("weave", "pill"), seed=1, n_good=2, n_defect=1, size=48,
                               defects=("hole", "blur"), setting="robust")
    assert counts["weave"] == {"test/good": 2, "test/hole": 1, "test/blur": 1}
    assert (tmp_path / "pill" / "ground_truth" / "blur" / "000_mask.png").is_file()
