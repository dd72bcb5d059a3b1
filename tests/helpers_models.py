"""Tiny seeded CLIPs (ViT and ModifiedResNet towers) published to a temporary store and loaded the normal way.

Why through the store: the window code must work on what `load_clip` returns (fp16-stored weights, char tokenizer,
eval mode), not on a hand-built module that production never sees.
"""
from __future__ import annotations

from pathlib import Path

import torch

from service.clip_backend import ClipBackend, ClipSpec, load_clip, save_store_clip
from service.store import ModelStore
from service.tokenizer import CharTokenizer

CONTEXT = 16


def _text_cfg() -> dict:
    return {"context_length": CONTEXT, "vocab_size": CharTokenizer(CONTEXT).vocab_size, "width": 32, "heads": 2, "layers": 1}


TINY_VIT_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 48, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16},
    "text_cfg": _text_cfg(),
}

TINY_RN_CFG = {
    "embed_dim": 24,
    # width 8 -> feature dim 256, 4 heads; 128 px -> a 4x4 final feature map
    "vision_cfg": {"image_size": 128, "layers": [1, 1, 1, 1], "width": 8, "head_width": 64},
    "text_cfg": _text_cfg(),
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Seeded random weights everywhere, including BatchNorm statistics (CLIP zero-inits some BN scales)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")) or (
                ".bn" in name and name.endswith("weight")
            ) or name.endswith("downsample.1.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / max(1, p.shape[-1]) ** 0.5 if p.ndim > 1 else 0.1))
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))
            elif name.endswith("running_var"):
                buf.copy_(1.0 + 0.5 * torch.rand(buf.shape, generator=gen))


def tiny_backend(
    store_root: Path, kind: str = "vit", seed: int = 0, vision: dict | None = None, quick_gelu: bool = False
) -> ClipBackend:
    """A ClipBackend (CPU, fp32) for a tiny seeded CLIP with a ViT (`kind="vit"`) or ModifiedResNet tower.

    `vision` overrides vision_cfg entries (pooling, layer scale, custom blocks...) to cover tower variants.
    """
    import copy

    import open_clip

    cfg = copy.deepcopy(TINY_VIT_CFG if kind == "vit" else TINY_RN_CFG)
    cfg["vision_cfg"].update(vision or {})
    if quick_gelu:
        cfg["quick_gelu"] = True
    model = open_clip.model.CLIP(**cfg).eval()
    _randomise(model, seed)
    name = f"tiny-{kind}-{abs(hash((repr(sorted((vision or {}).items())), quick_gelu))) % 10**8}"
    store = ModelStore(store_root)
    version = save_store_clip(
        store, name, model, cfg, tokenizer_spec={"type": "char", "context_length": CONTEXT}, fp16=False
    )
    return load_clip(ClipSpec(source="store", name=name, version=version), store_root, device="cpu", precision="fp32")
