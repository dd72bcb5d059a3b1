"""Weight-space interpolation of two published CLIPs of one architecture (WiSE-FT, Wortsman et al., CVPR 2022).

A fine-tune on a wider world (v4) learned what v3 lacked (global defects, unseen lighting) and forgot some of what
v3 knew (the seen kinds' ranking). Interpolating the two weight sets, `(1 - alpha) * a + alpha * b`, is the published
remedy: for models fine-tuned from one another the loss is close to convex along that line, and the middle often keeps
both. It costs no training, so the mixing weight can be chosen on validation data at the price of evaluations only.
Integer buffers (BatchNorm's step counter) are taken from `b`; the modality centres are recomputed for the result by
the trainer's own recipe, as they describe the new weights, not either parent. BatchNorm statistics are interpolated
like the weights, not re-estimated on the merged net (REPAIR, Jordan et al. 2023, does that for independently
trained nets; for a fine-tune and its start point, WiSE-FT's setting, the plain interpolation is the published recipe
and the one the README's figures measure).
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import fields

import torch

from ..store import ModelStore, StoreError
from .train_clip import TrainClipConfig, build_model, modality_centres, model_config, tokenizer_spec


def interpolate_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """`(1 - alpha) * a + alpha * b` for every floating tensor; other tensors from `b`. Keys and shapes must match."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    if a.keys() != b.keys():
        raise ValueError(f"the two weight sets have other tensors: {sorted(a.keys() ^ b.keys())[:5]}")
    out = {}
    for key, vb in b.items():
        va = a[key]
        if va.shape != vb.shape:
            raise ValueError(f"{key}: shape {tuple(va.shape)} against {tuple(vb.shape)}")
        out[key] = torch.lerp(va.float(), vb.float(), alpha) if vb.is_floating_point() else vb.clone()
    return out


def _config_from_manifest(manifest: dict) -> TrainClipConfig:
    """The training config a published CLIP records: the centres' recipe and the architecture come from it."""
    stored = (manifest.get("training") or {}).get("config")
    if not stored:
        raise StoreError(f"{manifest['name']}@{manifest['version']} records no training config; only CLIPs made by "
                         "`zsad synth train-clip` can be interpolated")
    known = {f.name for f in fields(TrainClipConfig)}
    return TrainClipConfig(**{k: v for k, v in stored.items() if k in known})


def merge_clips(store_root: str, name: str, version_a: str, version_b: str, alpha: float,
                version: str | None = None, log: Callable[[str], None] | None = None) -> str:
    """Publish `(1 - alpha) * name@version_a + alpha * name@version_b` as a new version of `name`; returns it."""
    from safetensors.torch import load_file

    from ..clip_backend import CLIP_CONFIG_FILE, CLIP_WEIGHTS_FILE, save_store_clip

    log = log or (lambda msg: print(msg, file=sys.stderr))
    store = ModelStore(store_root)
    (folder_a, man_a), (folder_b, man_b) = store.verify(name, version_a), store.verify(name, version_b)
    if man_a.get("kind") != "clip" or man_b.get("kind") != "clip":
        raise StoreError(f"{name} is not a CLIP")
    cfg_a = json.loads((folder_a / CLIP_CONFIG_FILE).read_text())
    cfg_b = json.loads((folder_b / CLIP_CONFIG_FILE).read_text())
    if cfg_a != cfg_b or man_a.get("tower") != man_b.get("tower"):
        raise StoreError(f"{name}@{man_a['version']} and @{man_b['version']} are different architectures")
    cfg = _config_from_manifest(man_b)
    if model_config(cfg) != cfg_b["model_cfg"]:
        raise StoreError(f"{name}@{man_b['version']}: its training config does not rebuild its architecture")
    state_a = load_file(str(folder_a / man_a.get("weights", CLIP_WEIGHTS_FILE)))
    state_b = load_file(str(folder_b / man_b.get("weights", CLIP_WEIGHTS_FILE)))
    model = build_model(cfg)
    model.load_state_dict(interpolate_state(state_a, state_b, alpha), strict=True)
    log(f"interpolated {name}@{man_a['version']} and @{man_b['version']} at alpha {alpha}; computing the centres")
    centres, reference = modality_centres(model, cfg)
    gap = float(torch.nn.functional.cosine_similarity(centres["image"], centres["text"], dim=0))
    parents = [f"{name}@{man_a['version']}", f"{name}@{man_b['version']}"]
    extra = {
        "description": f"weight-space interpolation of {parents[0]} and {parents[1]} (WiSE-FT), alpha {alpha}",
        # `config` is the `to` parent's, kept because it rebuilds the architecture and the centres' recipe
        "training": {"merge": {"from": parents, "alpha": alpha}, "config": man_b["training"]["config"]},
        "synthetic_world": man_b.get("synthetic_world"),
        "preprocess": man_b.get("preprocess"),
        "modality_gap_cosine": round(gap, 4),
    }
    if man_b.get("tower"):
        extra["tower"] = man_b["tower"]
    new = save_store_clip(store, name, model, cfg_b["model_cfg"], tokenizer_spec(cfg), extra, centres, reference,
                          version=version)
    log(f"published {name}@{new} to {store.root} (image/text centre cosine {gap:.3f})")
    return new
