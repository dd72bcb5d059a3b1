"""Not a benchmark: a helper for the benchmarks that time a real-sized CLIP without its pretrained weights.

    from _random_clip import random_clip_spec

Why a weights file and not the module: the benchmarks then load the model through `load_clip`, the code path the
service uses (safetensors, dtype and device placement), with seeded random weights instead of downloaded ones.
"""
from __future__ import annotations

from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from service.clip_backend import ClipSpec


def random_clip_spec(folder: str | Path, arch: str = "ViT-B-16-plus-240", seed: int = 0) -> ClipSpec:
    """Write seeded random weights of open_clip `arch` into `folder`; return a `file` spec that loads them."""
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None)
    weights = Path(folder) / f"{arch}-random-{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return ClipSpec("file", arch, path=str(weights))
