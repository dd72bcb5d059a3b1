"""The scoring stages on the model's device (issue #17's GPU pipeline), checked on every device this machine has.

`Detector.score` keeps the scores, the harmonic aggregation and the map resize on the model's device for the whole
batch; only the scores, the patch grids and the final maps cross to the host. These tests pin that the device path
gives the host path's numbers, and that it really runs where the embeddings are.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from service.clip_backend import load_clip
from service.detector import MapsOnDemand, load_detector
from service.fnn import FNNConfig
from service.preprocess import to_pixels
from service.prompts import RandomWordConfig
from service.settings import Settings
from service.store import ModelStore
from service.train import TrainConfig, train_fnn_model
from tests.conftest import publish_tiny_clip

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("devstore")
    spec = publish_tiny_clip(root, "tiny-clip")
    backend = load_clip(spec, root, device="cpu")
    cfg = TrainConfig(prompts=RandomWordConfig(n_pairs=120), fnn=FNNConfig(max_epochs=2))
    train_fnn_model(backend, cfg, ModelStore(root), "default")
    return root


def _images(seed: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(50, 80), (90, 30), (64, 64)]]


@pytest.mark.parametrize("device", DEVICES)
def test_the_answers_map_made_in_the_batch_equals_the_map_made_on_demand(store, device):
    det = load_detector(Settings(model_store=store, device=device)).with_full_maps(False)
    images = _images()
    on_demand = det.detect(images)
    det.maps_in_batch = True
    in_batch = det.detect(images, map_score="prompt")
    full = det.with_full_maps(True).detect(images)
    for a, b, f, im in zip(on_demand, in_batch, full, images):
        assert isinstance(b.heat, MapsOnDemand) and list(b.heat._made) == ["prompt"]  # made before anyone read it
        assert isinstance(b.heat._made["prompt"], np.ndarray)  # on the host: the final map crossed
        assert b.heat["prompt"].shape == (im.height, im.width)
        np.testing.assert_allclose(b.heat["prompt"], a.heat["prompt"], atol=1e-6)
        np.testing.assert_allclose(f.heat["prompt"], a.heat["prompt"], atol=1e-6)
        for k in a.grid:
            np.testing.assert_allclose(b.grid[k], a.grid[k], atol=1e-6)
        assert b.scores == pytest.approx(a.scores, abs=1e-9)
    det.maps_in_batch = False  # the CPU default: the map is made when read, in the caller's thread
    assert not det.detect(images, map_score="prompt")[0].heat._made


def test_maps_in_batch_defaults_to_off_the_cpu_only(store):
    det = load_detector(Settings(model_store=store, device="cpu")).with_full_maps(False)
    assert det.maps_in_batch is None  # None: on when the model is not on the CPU
    assert not det.detect(_images()[:1], map_score="combined")[0].heat._made


@pytest.mark.parametrize("device", DEVICES)
def test_the_resize_runs_on_the_maps_device_and_matches_the_host_path(store, device):
    det = load_detector(Settings(model_store=store, device=device))
    _, geoms = to_pixels(_images(), det.backend.image_size, det.backend.mean, det.backend.std, "letterbox")
    _, crop = to_pixels(_images(), det.backend.image_size, det.backend.mean, det.backend.std, "center_crop")
    rng = np.random.default_rng(0)
    for g in [*geoms, *crop]:
        maps = torch.from_numpy(rng.random((3, 7, 7), dtype=np.float32)).to(device)
        out = g.to_original_tensor(maps)
        assert out.device.type == torch.device(device).type and out.shape == (3, g.height, g.width)
        for j in range(3):
            np.testing.assert_allclose(out[j].cpu().numpy(), g.to_original(maps[j].cpu()), atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_scores_and_aggregation_run_on_the_embeddings_device(store, device, monkeypatch):
    """Every tensor the aggregation sees is on the model's device (none is moved to the host half-way)."""
    import service.aggregate as aggregate

    det = load_detector(Settings(model_store=store, device=device))
    seen: list[str] = []
    calls: list[int] = []
    original = aggregate.winclip_map

    def spy(image_scores, window_scores, indices, grid, eps=aggregate.EPS):
        calls.append(image_scores.shape[0])
        seen.append(image_scores.device.type)
        seen.extend(w.device.type for w in window_scores.values())
        out = original(image_scores, window_scores, indices, grid, eps)
        seen.append(out.device.type)
        return out

    monkeypatch.setattr(aggregate, "winclip_map", spy)
    det.detect(_images()[:2])
    assert seen and set(seen) == {torch.device(device).type}
    assert calls == [3 * 2]  # one aggregation for the three scores of both images
