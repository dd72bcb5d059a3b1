import numpy as np
import pytest
from PIL import Image

from service.clip_backend import load_clip
from service.detector import ModelLoadError, load_detector
from service.fnn import FNN_FILE, FNNConfig
from service.prompts import RandomWordConfig
from service.settings import Settings
from service.store import ModelStore
from service.train import TrainConfig, train_fnn_model
from tests.conftest import publish_tiny_clip


@pytest.fixture(scope="module")
def store_with_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("detstore")
    spec = publish_tiny_clip(root, "tiny-clip")
    backend = load_clip(spec, root, device="cpu")
    cfg = TrainConfig(prompts=RandomWordConfig(n_pairs=120), fnn=FNNConfig(max_epochs=2))
    train_fnn_model(backend, cfg, ModelStore(root), "default")
    return root


def test_detect_returns_scores_and_maps_at_each_image_size(store_with_model):
    det = load_detector(Settings(model_store=store_with_model, device="cpu"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(50, 80), (90, 30)]]
    timings: dict[str, float] = {}
    out = det.detect(images, timings=timings)
    for image, d in zip(images, out):
        assert set(d.scores) == {"fnn", "prompt", "combined"}
        for name in d.scores:
            assert d.heat[name].shape == (image.height, image.width)
            assert 0.0 <= d.heat[name].min() and d.heat[name].max() <= 1.0
        assert d.scores["combined"] == pytest.approx(0.5 * d.scores["fnn"] + 0.5 * d.scores["prompt"], abs=1e-6)
    assert {"preprocess", "windows", "aggregate"} <= set(timings)
    # The global score does not depend on whether heatmaps are computed, nor on the batch it came in.
    alone = det.detect([images[1]], heatmap=False)[0]
    assert alone.scores["fnn"] == pytest.approx(out[1].scores["fnn"], abs=1e-5)


def test_object_name_changes_only_the_prompt_score(store_with_model):
    det = load_detector(Settings(model_store=store_with_model, device="cpu"))
    image = Image.fromarray(np.full((64, 64, 3), 120, np.uint8))
    a = det.detect([image], heatmap=False)[0].scores
    b = det.detect([image], object_name="screw", heatmap=False)[0].scores
    assert a["fnn"] == b["fnn"] and a["prompt"] != b["prompt"]


def test_dimension_mismatch_between_clip_and_fnn_is_refused(store_with_model, tmp_path):
    import shutil

    root = tmp_path / "s"
    shutil.copytree(store_with_model, root)
    store = ModelStore(root)
    folder, manifest = store.verify("default")
    manifest = dict(manifest)
    manifest["fnn"] = {**manifest["fnn"], "layout": [64, 512, 256, 128, 1]}
    manifest["embed_dim"] = 64
    store.publish("default", {FNN_FILE: (folder / FNN_FILE).read_bytes()}, manifest)
    with pytest.raises(ModelLoadError, match="dimension mismatch"):
        load_detector(Settings(model_store=root, device="cpu"))


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no current version"):
        load_detector(Settings(model_store=tmp_path, device="cpu"))


def test_prepared_inputs_give_the_same_result_and_stale_ones_are_redone(store_with_model):
    det = load_detector(Settings(model_store=store_with_model, device="cpu"))
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 70, 3), dtype=np.uint8))
    direct = det.detect([image])[0]
    prepared = det.prepare(image)
    via_prepared = det.detect([prepared])[0]
    assert via_prepared.scores == direct.scores
    assert np.array_equal(via_prepared.heat["combined"], direct.heat["combined"])
    # Made for another model input (e.g. before a reload): rebuilt from the image, same answer.
    from dataclasses import replace

    stale = replace(prepared, pixels=prepared.pixels * 0, key=("other",))
    assert det.detect([stale])[0].scores == direct.scores


def test_maps_on_demand_equal_the_full_maps(store_with_model):
    """The service's detector (full_maps=False) makes a score's map only when read, and the same one."""
    from service.detector import MapsOnDemand

    det = load_detector(Settings(model_store=store_with_model, device="cpu"))
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(50, 80), (90, 30)]]
    full = det.detect(images)
    lazy = det.with_full_maps(False).detect(images)
    for f, g in zip(full, lazy):
        assert isinstance(g.heat, MapsOnDemand) and not g.heat._made  # nothing made yet
        assert set(g.heat) == set(f.heat) and "fnn" in g.heat
        # the same computation, one score at a time: equal up to the rounding of other kernel shapes (6e-8 on an
        # AVX-512 CPU)
        np.testing.assert_allclose(g.heat["fnn"], f.heat["fnn"], rtol=0, atol=1e-6)
        assert list(g.heat._made) == ["fnn"]  # only the map that was read
        assert g.scores == f.scores
    assert det.full_maps and det.detect(images, heatmap=False)[0].heat == {}
