"""Prompt anchors cached on disk next to the model, so a serving process needs no CLIP text tower after start-up.

Why: the anchors (mean normal / anomalous prompt-ensemble embeddings of an object word) are the only thing serving
takes from the text tower, which is about 40% of ViT-B-16-plus-240's weights. One file per anchor set, in
`<store>/<model>/.anchors/<version>/` (a dot folder: never taken for a version, outside the verified version folder).

A file is used only when it is exactly what would be computed now: its name is a digest of the key, and the key it
stores must equal the key asked for. The key holds everything the anchors depend on: the CLIP weights' sha256, the
tokenizer, the text centre, precision and device type, the object word and every prompt of its ensemble (so the
vocabulary, the templates and the ensemble code are in it), and a format version. Not the prompt temperature, the
calibration or the FNN: those act after the anchors. The tensors' own sha256 is stored too and checked on read, so
a damaged file is recomputed, never used. Files are private (0600 in a 0700 folder) and written atomically.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch

from .private_files import open_private, private_dir
from .scoring import PromptAnchors

log = logging.getLogger(__name__)

ANCHOR_FORMAT = 1  # bump when the way anchors are computed from the prompts changes
ANCHOR_DIR = ".anchors"

__all__ = ["ANCHOR_FORMAT", "AnchorCache", "anchor_key"]


def anchor_key(clip_identity: dict[str, Any], word: str, normal: list[str], anomalous: list[str]) -> dict[str, Any]:
    """Everything one anchor set depends on (see the module docstring)."""
    return {"format": ANCHOR_FORMAT, "clip": clip_identity, "word": word, "normal": list(normal),
            "anomalous": list(anomalous)}


def _canonical(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def _tensor_digest(normal: torch.Tensor, anomalous: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for t in (normal, anomalous):
        digest.update(t.float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


class AnchorCache:
    """Anchor files in one folder; `get` returns None on a miss or any file that does not verify."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @classmethod
    def for_model(cls, store_root: str | Path, name: str, version: str) -> AnchorCache:
        return cls(Path(store_root) / name / ANCHOR_DIR / version)

    def path(self, key: dict[str, Any]) -> Path:
        return self.folder / f"{hashlib.sha256(_canonical(key).encode()).hexdigest()[:40]}.safetensors"

    def get(self, key: dict[str, Any]) -> PromptAnchors | None:
        from safetensors import SafetensorError
        from safetensors.torch import load

        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("anchor cache %s unreadable (%s): recomputing", path.name, exc)
            return None
        try:
            tensors = load(data)
            meta = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]).get("__metadata__", {})
            normal, anomalous = tensors["normal"], tensors["anomalous"]
            ok = (meta.get("key") == _canonical(key) and meta.get("sha256") == _tensor_digest(normal, anomalous)
                  and normal.shape == anomalous.shape and normal.ndim == 1)
        except (SafetensorError, KeyError, ValueError, UnicodeDecodeError) as exc:
            log.warning("anchor cache %s is damaged (%s): recomputing", path.name, type(exc).__name__)
            return None
        if not ok:
            log.warning("anchor cache %s does not match its key or its checksum: recomputing", path.name)
            return None
        return PromptAnchors(key["word"], normal, anomalous)

    def put(self, key: dict[str, Any], anchors: PromptAnchors) -> bool:
        """Write the anchors (atomically, private). False, with a warning, when the store is not writable: the
        service then keeps them in memory only, and needs the text tower again after a restart."""
        from safetensors.torch import save

        normal = anchors.normal.float().contiguous().cpu()
        anomalous = anchors.anomalous.float().contiguous().cpu()
        blob = save({"normal": normal, "anomalous": anomalous},
                    metadata={"key": _canonical(key), "sha256": _tensor_digest(normal, anomalous)})
        path = self.path(key)
        tmp = path.with_name(f".tmp-{uuid.uuid4().hex}")
        try:
            private_dir(self.folder)
            with open_private(tmp, "wb") as fh:
                fh.write(blob)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("cannot write the anchor cache in %s (%s): anchors kept in memory only", self.folder, exc)
            return False
        return True
