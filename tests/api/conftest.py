"""API fixtures: one tiny real model (tiny seeded CLIP + an FNN trained for 3 epochs) in a session temp store."""
from __future__ import annotations

import pytest

from tests.conftest import publish_tiny_clip


@pytest.fixture(scope="session")
def api_store(tmp_path_factory):
    from service.clip_backend import load_clip
    from service.fnn import FNNConfig
    from service.prompts import RandomWordConfig
    from service.store import ModelStore
    from service.train import TrainConfig, train_fnn_model

    root = tmp_path_factory.mktemp("api-store")
    spec = publish_tiny_clip(root, "tiny-clip", "rn")
    backend = load_clip(spec, root, device="cpu", precision="fp32")
    cfg = TrainConfig(prompts=RandomWordConfig(n_pairs=200), fnn=FNNConfig(max_epochs=3))
    train_fnn_model(backend, cfg, ModelStore(root), name="default")
    return root
