"""Shared fixtures: tiny, seeded CLIP models published to a temporary store through the real loading code."""
from __future__ import annotations

import open_clip
import pytest
import torch

from service.clip_backend import ClipSpec, load_clip, save_store_clip
from service.store import ModelStore
from service.tokenizer import CharTokenizer

CHAR_CTX = 64


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


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """A store holding a tiny CNN CLIP `tiny-clip` and a tiny ViT CLIP `tiny-vit`."""
    root = tmp_path_factory.mktemp("store")
    rn = publish_tiny_clip(root, "tiny-clip", "rn")
    vit = publish_tiny_clip(root, "tiny-vit", "vit")
    return root, {"rn": rn, "vit": vit}


@pytest.fixture(scope="session")
def tiny_backend(tiny_store):
    root, specs = tiny_store
    return load_clip(specs["rn"], root, device="cpu")
