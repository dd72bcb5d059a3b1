"""The detector: the whole pipeline as one object, loaded once from the model store and shared by CLI and service.

    images -> preprocess.to_pixels -> windows.embed_image_and_windows (global + windows, one CLIP pass)
           -> scoring (s_fnn, s_pr, combined per image and per window) -> aggregate (harmonic maps)
           -> maps at each image's own resolution

`Detector.detect` takes a *batch* of decoded images: the service's micro-batcher and the evaluation loop both feed it
batches; a single image is a batch of one.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .clip_backend import ClipBackend, ClipLoadError, ClipSpec, load_clip
from .fnn import FNN
from .prompts import Vocabulary, ensemble
from .scoring import SCORE_NAMES, PromptAnchors, all_scores, anchors_from_embeddings
from .settings import Settings
from .store import ModelStore, StoreError
from .train import load_fnn_from_store


class ModelLoadError(Exception):
    """The configured model cannot be served (missing, corrupt, mismatched)."""


@dataclass
class Detection:
    """Result for one image. `heat` maps are float32 [H, W] in [0, 1] at the image's own size."""

    scores: dict[str, float]
    size: tuple[int, int]  # (width, height) of the input image
    heat: dict[str, np.ndarray] = field(default_factory=dict)
    grid: dict[str, np.ndarray] = field(default_factory=dict)  # patch-level maps before upsampling


@dataclass
class Detector:
    backend: ClipBackend
    fnn: FNN
    manifest: dict[str, Any]
    vocab: Vocabulary
    settings: Settings
    _anchors: dict[str, PromptAnchors] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.manifest.get("name", "?")

    @property
    def version(self) -> str:
        return self.manifest.get("version", "?")

    def anchors(self, object_name: str | None = None) -> PromptAnchors:
        """Prompt-ensemble anchors for an object word, cached: the text tower runs once per word."""
        word = (object_name or self.settings.generic_object).strip().lower()[:64] or self.settings.generic_object
        with self._lock:
            if word not in self._anchors:
                normal, anomalous = ensemble(self.vocab, word)
                emb = self.backend.encode_text(normal + anomalous)
                self._anchors[word] = anchors_from_embeddings(word, emb[: len(normal)], emb[len(normal) :]).to(
                    self.backend.device
                )
                if len(self._anchors) > 256:  # bounded: object names come from requests
                    self._anchors.pop(next(iter(self._anchors)))
            return self._anchors[word]

    def score_embeddings(self, emb: torch.Tensor, object_name: str | None = None) -> dict[str, torch.Tensor]:
        s = self.settings
        return all_scores(emb, self.fnn, self.anchors(object_name), s.prompt_temperature, s.combine_weight)

    @torch.inference_mode()
    def detect(
        self,
        images: Sequence[Image.Image],
        object_name: str | None = None,
        heatmap: bool = True,
        timings: dict[str, float] | None = None,
    ) -> list[Detection]:
        """Score a batch of RGB images; with `heatmap`, also WinCLIP-style maps at each image's resolution."""
        from .aggregate import winclip_map
        from .preprocess import to_pixels
        from .windows import embed_image_and_windows

        s = self.settings
        timings = timings if timings is not None else {}

        def lap(stage: str, t0: float) -> float:
            now = time.perf_counter()
            timings[stage] = timings.get(stage, 0.0) + now - t0
            return now

        t = time.perf_counter()
        pixels, geoms = to_pixels(images, self.backend.image_size, self.backend.mean, self.backend.std, s.resize_policy)
        t = lap("preprocess", t)
        if not heatmap:
            glob = self.backend.encode_image(pixels)
            t = lap("embed", t)
            scores = self.score_embeddings(glob, object_name)
            lap("aggregate", t)
            return [Detection({k: float(v[i]) for k, v in scores.items()}, im.size) for i, im in enumerate(images)]

        emb = embed_image_and_windows(
            self.backend, pixels, s.window_scales, s.window_stride, s.window_chunk, s.cnn_window_mode
        )
        t = lap("windows", t)
        scores = self.score_embeddings(emb.global_emb, object_name)
        window_scores = {scale: self.score_embeddings(w, object_name) for scale, w in emb.windows.items()}
        grids = {
            name: winclip_map(scores[name], {sc: ws[name] for sc, ws in window_scores.items()}, emb.indices, emb.grid)
            for name in SCORE_NAMES
        }
        results = []
        for i, image in enumerate(images):
            det = Detection({k: float(v[i]) for k, v in scores.items()}, image.size)
            for name in SCORE_NAMES:
                det.grid[name] = grids[name][i].cpu().numpy()
                det.heat[name] = geoms[i].to_original(grids[name][i])
            results.append(det)
        lap("aggregate", t)
        return results


def load_detector(
    settings: Settings, name: str | None = None, version: str | None = None, device: str | None = None
) -> Detector:
    """Load CLIP + FNN for the store model `name@version` (default: settings, then `current`)."""
    store = ModelStore(settings.model_store)
    name = name or settings.model_name
    version = version or settings.model_version
    try:
        manifest = store.manifest(name, version)
        spec = ClipSpec.from_manifest(manifest["clip"])
        backend = load_clip(
            spec, settings.model_store, device or settings.device, settings.precision, settings.hub_cache
        )
        fnn, manifest = load_fnn_from_store(store, name, manifest["version"], backend.embed_dim)
        vocab = Vocabulary(**{k: tuple(v) for k, v in manifest["training"]["vocabulary"].items()})
    except (StoreError, ClipLoadError, KeyError) as exc:
        raise ModelLoadError(f"cannot load model {name!r}{'@' + version if version else ''}: {exc}") from exc
    return Detector(backend, fnn.to(backend.device), manifest, vocab, settings)
