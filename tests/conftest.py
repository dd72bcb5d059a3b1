"""Shared fixtures: tiny, seeded CLIP models published to a temporary store through the real loading code."""
from __future__ import annotations

import open_clip
import pytest
import torch

from service.clip_backend import ClipSpec, load_clip, save_store_clip
from service.store import ModelStore
from service.tokenizer import CharTokenizer

CHAR_CTX = 64


@pytest.fixture(autouse=True, scope="session")
def _exact_cpu_precision():
    """Tests compare against fp32 references to 1e-5: keep precision 'auto' at fp32 on AMX CPUs too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("service.clip_backend.cpu_bf16_is_fast", lambda: False)
        yield


def tiny_cfg(tower: str = "rn", image_size: int = 64) -> dict:
    """A small open_clip config: CNN (ModifiedResNet + attention pool) or ViT image tower, char text tower."""
    vocab = CharTokenizer(CHAR_CTX).vocab_size
    if tower == "rn":
        vision = {"image_size": image_size, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None}
    else:
        vision = {"image_size": image_size, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32}
    return {
        "embed_dim": 32,
        "vision_cfg": vision,
        "text_cfg": {"context_length": CHAR_CTX, "vocab_size": vocab, "width": 64, "heads": 2, "layers": 2},
    }


def publish_tiny_clip(root, name: str = "tiny-clip", tower: str = "rn", seed: int = 0, fp16: bool = False) -> ClipSpec:
    torch.manual_seed(seed)
    cfg = tiny_cfg(tower)
    model = open_clip.model.CLIP(**cfg).eval()
    store = ModelStore(root)
    version = save_store_clip(store, name, model, cfg, {"type": "char", "context_length": CHAR_CTX}, fp16=fp16)
    manifest = store.manifest(name, version)
    return ClipSpec("store", name=name, version=version, sha256=manifest["files"]["open_clip_model.safetensors"])


def publish_tiny_model(root, name: str = "default", n_pairs: int = 200, epochs: int = 3, seed: int = 0,
                       clip_seed: int = 0) -> str:
    """A tiny CLIP (`tiny-clip`, published if absent) plus an FNN trained on it as `name`; returns the FNN version."""
    from service.fnn import FNNConfig
    from service.prompts import RandomWordConfig
    from service.train import TrainConfig, train_fnn_model

    store = ModelStore(root)
    if store.current("tiny-clip") is None:
        spec = publish_tiny_clip(root, "tiny-clip", "rn", seed=clip_seed)
    else:
        manifest = store.manifest("tiny-clip")
        spec = ClipSpec("store", name="tiny-clip", version=manifest["version"],
                        sha256=manifest["files"]["open_clip_model.safetensors"])
    backend = load_clip(spec, root, device="cpu", precision="fp32")
    cfg = TrainConfig(prompts=RandomWordConfig(n_pairs=n_pairs, seed=seed), fnn=FNNConfig(max_epochs=epochs, seed=seed))
    return train_fnn_model(backend, cfg, store, name=name).version


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """A store holding a tiny CNN CLIP `tiny-clip` and a tiny ViT CLIP `tiny-vit`."""
    root = tmp_path_factory.mktemp("store")
    rn = publish_tiny_clip(root, "tiny-clip", "rn")
    vit = publish_tiny_clip(root, "tiny-vit", "vit")
    return root, {"rn": rn, "vit": vit}


@pytest.fixture(scope="session")
def _tiny_backend(tiny_store):
    root, specs = tiny_store
    return load_clip(specs["rn"], root, device="cpu")


@pytest.fixture
def tiny_backend(_tiny_backend):
    """The session's tiny CLIP with its text tower loaded: a detector built on it earlier may have released the tower
    (`ZSAD_TEXT_TOWER=release`), and tests here call the text encoder directly, not through `encode_text`."""
    _tiny_backend.load_text()
    return _tiny_backend
