"""On-disk cache of image and window embeddings, keyed by (image file hash, CLIP model + window settings).

Why: the CLIP pass is nearly all of an evaluation's time, and an N_p ablation or a variant comparison rescored the
same images once per FNN version. With the cache, the second and later runs only run the FNN and the aggregation.
The model key covers everything that changes an embedding (CLIP weights, precision, input size, resize policy,
window scales/stride/mode, test-time views), so a changed model can never be served stale embeddings.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..detector import Detector, ImageEmbedding
from ..preprocess import Geometry
from ..windows import DENSE_DIM


def model_key(detector: Detector, heatmap: bool) -> str:
    s = detector.settings
    backend = detector.backend
    parts = {
        "clip": backend.spec.to_manifest(),
        "dtype": str(backend.dtype),
        "image_size": backend.image_size,
        "resize_policy": s.resize_policy,
        "heatmap": heatmap,
        "scales": list(detector.window_scales) if heatmap else [],
        "stride": s.window_stride if heatmap else 0,
        "cnn_window_mode": s.cnn_window_mode if heatmap else "",
        "centred": backend.image_center is not None,
        "tta_views": detector.tta_views,
        "patches": heatmap,  # grid-cell tokens for the few-shot memory (caches made before them are not reused)
        # the few-shot dense bank's features, made when the settings ask for the bank (`Detector.embed`)
        "dense": f"layer2-avg3-c{DENSE_DIM}" if heatmap and s.reference_dense else "",
        # a CNN tower with its BatchNorms folded at load rounds differently (caches made before it are not reused)
        "batchnorms_folded": backend.info.get("batchnorms_folded", 0),
        # and its global embedding from the one-token attention pool (`cnn_tower.resnet_global`) rounds differently
        "global_pool": "first-token",
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


class EmbeddingCache:
    def __init__(self, root: str | Path, key: str):
        self.folder = Path(root) / key
        self.hits = 0
        self.misses = 0

    def _path(self, digest: str) -> Path:
        return self.folder / digest[:2] / f"{digest}.safetensors"

    def get(self, digest: str) -> ImageEmbedding | None:
        path = self._path(digest)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata()
            tensors = load_file(str(path))
            geometry = Geometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(meta["geometry"]).items()})
            grid = tuple(json.loads(meta["grid"]))
        except Exception:  # noqa: BLE001 - a torn or foreign file is a miss, never an error
            self.misses += 1
            return None
        self.hits += 1
        windows = {int(k[1:]): v for k, v in tensors.items() if k.startswith("w")}
        dense_grid = tuple(json.loads(meta["dense_grid"])) if meta.get("dense_grid") else None
        return ImageEmbedding(tensors["global"], windows, grid, geometry, tensors.get("patches"), tensors.get("dense"),
                              dense_grid)

    def put(self, digest: str, emb: ImageEmbedding) -> None:
        path = self._path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"global": emb.global_emb.float().cpu().contiguous()}
        tensors.update({f"w{k}": v.float().cpu().contiguous() for k, v in emb.windows.items()})
        if emb.patches is not None:
            tensors["patches"] = emb.patches.float().cpu().contiguous()
        if emb.dense is not None:
            tensors["dense"] = emb.dense.float().cpu().contiguous()
        meta = {"geometry": json.dumps(asdict(emb.geometry)), "grid": json.dumps(list(emb.grid))}
        if emb.dense_grid is not None:
            meta["dense_grid"] = json.dumps(list(emb.dense_grid))
        tmp = path.with_name(f".{uuid.uuid4().hex}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)  # atomic: concurrent runs never see half a file


def cached_embed(
    detector: Detector, paths: list[Path], images_loader, cache: EmbeddingCache | None, heatmap: bool
) -> list[ImageEmbedding]:
    """Embeddings for `paths`, from the cache where present; the rest are computed in one batch and stored.

    Each file is read once: its bytes give the cache key and, on a miss, are what `images_loader` decodes."""
    data = [Path(p).read_bytes() for p in paths]
    digests = [hashlib.sha256(d).hexdigest() for d in data]
    found: list[ImageEmbedding | None] = [cache.get(d) if cache else None for d in digests]
    todo = [i for i, e in enumerate(found) if e is None]
    if todo:
        fresh = detector.embed([images_loader(data[i]) for i in todo], heatmap=heatmap)
        for i, emb in zip(todo, fresh):
            emb = emb.cpu()
            found[i] = emb
            if cache:
                cache.put(digests[i], emb)
    return [e for e in found if e is not None]


