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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from .anchor_cache import AnchorCache, anchor_key
from .clip_backend import ClipBackend, ClipLoadError, ClipSpec, load_clip
from .constants import SCORE_NAMES, WINDOW_SCALES
from .fnn import FNN, load_fnn
from .prompts import Vocabulary, ensemble
from .scoring import Calibration, PromptAnchors, all_logits, all_scores, anchors_from_embeddings
from .settings import Settings
from .store import ModelStore, StoreError
from .timing import lap

if TYPE_CHECKING:
    from .preprocess import Geometry


class ModelLoadError(Exception):
    """The configured model cannot be served (missing, corrupt, mismatched)."""


class TextTowerOff(ModelLoadError):
    """Anchors for an object word are not cached and `ZSAD_TEXT_TOWER=off` forbids loading the text tower."""


class MapsOnDemand(Mapping):
    """`Detection.heat` of a detector with `full_maps=False`: a read-only mapping that makes a score's map at the
    image's size from its patch grid the first time it is read (then keeps it). A detection in flight holds only
    its grids; a caller that reads one score's map pays for one map, not for every score's."""

    def __init__(self, grid: dict[str, np.ndarray], geometry: Geometry):
        self._grid = grid
        self._geometry = geometry
        self._made: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._made:
            self._made[name] = self._geometry.to_original(self._grid[name])
        return self._made[name]

    def __iter__(self):
        return iter(self._grid)

    def __len__(self) -> int:
        return len(self._grid)


@dataclass
class Detection:
    """Result for one image. `heat` maps are float32 [H, W] in [0, 1] at the image's own size.

    With `Detector.full_maps` (the default, what the evaluation uses) every score's map is made at once; the
    service's detector (`full_maps=False`) makes `heat` a `MapsOnDemand` over the patch-level `grid` maps."""

    scores: dict[str, float]
    size: tuple[int, int]  # (width, height) of the input image
    heat: Mapping[str, np.ndarray] = field(default_factory=dict)
    grid: dict[str, np.ndarray] = field(default_factory=dict)  # patch-level maps before upsampling


@dataclass
class ImageEmbedding:
    """One image's CLIP embeddings: what the evaluation cache stores, so FNN versions can be rescored cheaply."""

    global_emb: torch.Tensor  # [D]
    windows: dict[int, torch.Tensor]  # scale -> [n_windows, D]; empty without heatmap
    grid: tuple[int, int]
    geometry: Geometry


@dataclass
class Prepared:
    """One image already resized and normalised for a model input (`Detector.prepare`): lets the service do this
    CPU work in its decode threads instead of on the single inference thread."""

    image: Image.Image
    pixels: torch.Tensor  # [3, S, S]
    geometry: Geometry
    key: tuple  # the input spec it was made for; a reloaded model with another input re-prepares from `image`


@dataclass
class Detector:
    backend: ClipBackend
    fnn: FNN
    manifest: dict[str, Any]
    vocab: Vocabulary
    settings: Settings
    _anchors: dict[str, PromptAnchors] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    full_maps: bool = True  # False: Detection.heat makes each map when it is read (`MapsOnDemand`)
    anchor_cache: AnchorCache | None = None  # anchors on disk next to the model (`load_detector` sets it)

    MAX_CACHED_WORDS = 256  # object words come from requests: the anchor cache is bounded

    @classmethod
    def from_parts(
        cls,
        clip: ClipBackend,
        fnn: FNN,
        settings: Settings | None = None,
        manifest: dict[str, Any] | None = None,
        vocab: Vocabulary | None = None,
        anchors: Mapping[str, PromptAnchors] | None = None,
    ) -> Detector:
        """A detector from a loaded CLIP and an FNN, without a model store (tests, benchmarks, reference checks).

        `manifest` carries the serving recommendations and calibration a store model would have (default: none, so
        WinCLIP's window scales, one view, uncalibrated scores); `anchors` supplies ready prompt anchors by object
        word, so s_pr can be checked against text embeddings computed elsewhere."""
        det = cls(clip, fnn.to(clip.device), {"name": "parts", "version": "v0", **(manifest or {})},
                  vocab or Vocabulary.load(), settings or Settings())
        return det.with_anchors(anchors) if anchors else det

    def with_anchors(self, anchors: Mapping[str, PromptAnchors]) -> Detector:
        """The same detector with these prompt anchors (by object word) in place of ones from the text tower."""
        cache = {word.strip().lower(): a.to(self.backend.device) for word, a in anchors.items()}
        return replace(self, _anchors=cache, _lock=threading.Lock())

    def with_full_maps(self, full_maps: bool) -> Detector:
        """The same detector; with False, a detection's `heat` makes each score's map when it is first read
        instead of all of them at once (the service reads one per answer; the evaluation reads them all)."""
        return replace(self, full_maps=full_maps)

    def with_calibration(self, calibration: Mapping[str, Any] | None) -> Detector:
        """The same detector scoring with another calibration (a manifest `calibration` entry, or None for raw)."""
        manifest = {k: v for k, v in self.manifest.items() if k != "calibration"}
        if calibration:
            manifest["calibration"] = dict(calibration)
        return replace(self, manifest=manifest)

    @property
    def window_scales(self) -> tuple[int, ...]:
        """Settings first, then the model's own recommendation (its manifest), then WinCLIP's."""
        from_model = self.manifest.get("windows", {}).get("scales")
        return tuple(self.settings.window_scales or from_model or WINDOW_SCALES)

    @property
    def tta_views(self) -> int:
        """Settings first, then the model's manifest (`tta.views`, fitted with its calibration), then 1 (off)."""
        return int(self.settings.tta_views or self.manifest.get("tta", {}).get("views") or 1)

    @property
    def name(self) -> str:
        return self.manifest.get("name", "?")

    @property
    def version(self) -> str:
        return self.manifest.get("version", "?")

    def anchors(self, object_name: str | None = None) -> PromptAnchors:
        """Prompt-ensemble anchors for an object word, cached in memory and (with a store) on disk: the text tower
        runs once per word and CLIP, ever. `settings.text_tower` says whether the tower may be loaded for a miss
        ('off' raises `TextTowerOff`) and whether it is dropped again afterwards ('release')."""
        word = (object_name or self.settings.generic_object).strip().lower()[:64] or self.settings.generic_object
        with self._lock:
            if word not in self._anchors:
                self._anchors[word] = self._compute_anchors(word).to(self.backend.device)
                if len(self._anchors) > self.MAX_CACHED_WORDS:
                    self._anchors.pop(next(iter(self._anchors)))
            return self._anchors[word]

    def _compute_anchors(self, word: str) -> PromptAnchors:
        normal, anomalous = ensemble(self.vocab, word)
        key = anchor_key(self.backend.identity(), word, normal, anomalous) if self.anchor_cache else None
        if self.anchor_cache is not None and key is not None:
            cached = self.anchor_cache.get(key)
            if cached is not None:
                return cached
        mode = self.settings.text_tower
        if not self.backend.text_loaded:
            if mode == "off":
                raise TextTowerOff(
                    f"no cached prompt anchors for object word {word!r} and ZSAD_TEXT_TOWER=off: compute them once "
                    "with the text tower (`zsad anchors --object WORD`, or serve with ZSAD_TEXT_TOWER=release)")
            self.backend.load_text()
        emb = self.backend.encode_text(normal + anomalous)
        found = anchors_from_embeddings(word, emb[: len(normal)], emb[len(normal) :])
        if self.anchor_cache is not None and key is not None:
            self.anchor_cache.put(key, found)
        if mode != "keep":
            self.backend.release_text()
        return found

    def score_embeddings(self, emb: torch.Tensor, object_name: str | None = None) -> dict[str, torch.Tensor]:
        """Every registered score of embeddings [..., D], with the temperature, weight and calibration in effect."""
        s = self.settings
        return all_scores(emb, self.fnn, self.anchors(object_name), s.prompt_temperature, s.combine_weight,
                          self.calibration)

    @torch.inference_mode()
    def logits(self, embs: Sequence[ImageEmbedding], object_name: str | None = None) -> dict[str, torch.Tensor]:
        """Uncalibrated logits [B] of the global embeddings: what `calibration.fit_detector_calibration` fits."""
        glob = torch.stack([e.global_emb for e in embs]).to(self.backend.device)
        return {k: v.cpu() for k, v in
                all_logits(glob, self.fnn, self.anchors(object_name), self.settings.prompt_temperature).items()}

    @property
    def calibration(self) -> Calibration:
        return Calibration.from_manifest(self.manifest.get("calibration"))

    SCORING_SETTINGS = ("prompt_temperature", "combine_weight", "resize_policy", "generic_object")

    def scoring_settings(self) -> dict[str, Any]:
        """The settings that change a global image score: recorded with a calibration fitted under them."""
        return {**{k: getattr(self.settings, k) for k in self.SCORING_SETTINGS}, "tta_views": self.tta_views}

    def calibration_drift(self) -> dict[str, tuple[Any, Any]]:
        """{setting: (fitted with, in effect)} where this detector scores with other settings than its calibration
        was fitted with: its threshold advice then no longer means the false-reject rate it was fitted for."""
        fitted = (self.manifest.get("calibration") or {}).get("fitted_with") or {}
        now = self.scoring_settings()
        return {k: (v, now[k]) for k, v in fitted.items() if k in now and v != now[k]}

    def input_key(self) -> tuple:
        b = self.backend
        return (b.image_size, tuple(b.mean), tuple(b.std), self.settings.resize_policy)

    def prepare(self, image: Image.Image) -> Prepared:
        from .preprocess import to_pixels

        b = self.backend
        pixels, geoms = to_pixels([image], b.image_size, b.mean, b.std, self.settings.resize_policy)
        return Prepared(image, pixels[0], geoms[0], self.input_key())

    def _pixels(self, images: Sequence[Image.Image | Prepared]) -> tuple[torch.Tensor, list[Geometry]]:
        key = self.input_key()
        items = [im if isinstance(im, Prepared) and im.key == key
                 else self.prepare(im.image if isinstance(im, Prepared) else im) for im in images]
        return torch.stack([p.pixels for p in items]), [p.geometry for p in items]

    @torch.inference_mode()
    def embed(
        self, images: Sequence[Image.Image | Prepared], heatmap: bool = True, timings: dict[str, float] | None = None
    ) -> list[ImageEmbedding]:
        """CLIP embeddings of a batch: global, plus windows when `heatmap` (one backbone pass either way)."""
        from .tta import encode_global
        from .windows import embed_image_and_windows

        s = self.settings
        timings = timings if timings is not None else {}
        t = time.perf_counter()
        pixels, geoms = self._pixels(images)
        t = lap(timings, "preprocess", t)
        if not heatmap:
            glob = encode_global(self.backend, pixels, self.tta_views)
            lap(timings, "embed", t)
            return [ImageEmbedding(glob[i], {}, (0, 0), g) for i, g in enumerate(geoms)]
        emb = embed_image_and_windows(
            self.backend, pixels, self.window_scales, s.window_stride, s.window_chunk, s.cnn_window_mode, timings
        )
        glob = emb.global_emb
        if self.tta_views > 1:
            t = time.perf_counter()
            glob = encode_global(self.backend, pixels, self.tta_views, identity=glob)
            lap(timings, "embed", t)
        return [
            ImageEmbedding(glob[i], {k: w[i] for k, w in emb.windows.items()}, emb.grid, g)
            for i, g in enumerate(geoms)
        ]

    @torch.inference_mode()
    def score(
        self,
        embs: Sequence[ImageEmbedding],
        object_name: str | None = None,
        timings: dict[str, float] | None = None,
    ) -> list[Detection]:
        """Scores (and maps, when the embeddings have windows) for a batch of embeddings from `embed`."""
        from .aggregate import winclip_map
        from .window_grid import window_indices

        timings = timings if timings is not None else {}
        t = time.perf_counter()
        device = self.backend.device
        scores = self.score_embeddings(torch.stack([e.global_emb for e in embs]).to(device), object_name)
        results = [Detection({k: float(v[i]) for k, v in scores.items()}, (e.geometry.width, e.geometry.height))
                   for i, e in enumerate(embs)]
        if embs[0].windows:
            grid, stride = embs[0].grid, self.settings.window_stride
            indices = {sc: window_indices(grid[0], grid[1], sc, stride) for sc in embs[0].windows}
            window_scores = {
                sc: self.score_embeddings(torch.stack([e.windows[sc] for e in embs]).to(device), object_name)
                for sc in indices
            }
            for name in SCORE_NAMES:
                maps = winclip_map(scores[name], {sc: ws[name] for sc, ws in window_scores.items()}, indices, grid)
                for i, (e, det) in enumerate(zip(embs, results)):
                    det.grid[name] = maps[i].cpu().numpy()
                    if self.full_maps:
                        det.heat[name] = e.geometry.to_original(maps[i])
            if not self.full_maps:
                for e, det in zip(embs, results):
                    det.heat = MapsOnDemand(det.grid, e.geometry)
        lap(timings, "aggregate", t)
        return results

    def detect(
        self,
        images: Sequence[Image.Image | Prepared],
        object_name: str | None = None,
        heatmap: bool = True,
        timings: dict[str, float] | None = None,
    ) -> list[Detection]:
        """Score a batch of RGB images; with `heatmap`, also WinCLIP-style maps at each image's resolution."""
        timings = timings if timings is not None else {}
        return self.score(self.embed(images, heatmap, timings), object_name, timings)

    def with_fnn(self, fnn: FNN, manifest: dict[str, Any]) -> Detector:
        """The same CLIP (and prompt anchors) with another FNN: how an N_p ablation scores many versions cheaply."""
        return replace(self, fnn=fnn.to(self.backend.device), manifest=manifest)


def load_detector(
    settings: Settings, name: str | None = None, version: str | None = None, device: str | None = None
) -> Detector:
    """Load CLIP + FNN for the store model `name@version` (default: settings, then `current`)."""
    store = ModelStore(settings.model_store)
    name = name or settings.model_name
    version = version or settings.model_version
    try:
        # Resolve the folder once and load exactly that one: the manifest inside must say it is this version
        # (`store.verify`), so a copied folder whose manifest names another version is refused, not served.
        version = store.path(name, version).name
        manifest = store.verify(name, version)[1]
        spec = ClipSpec.from_manifest(manifest["clip"])
        backend = load_clip(spec, settings.model_store, device or settings.device, settings.precision,
                            settings.hub_cache, text_tower=settings.text_tower == "keep")
        fnn, manifest = load_fnn(store, name, version, backend.embed_dim)
        vocab = Vocabulary(**{k: tuple(v) for k, v in manifest["training"]["vocabulary"].items()})
        detector = Detector(backend, fnn.to(backend.device), manifest, vocab, settings,
                            anchor_cache=AnchorCache.for_model(settings.model_store, name, version))
        detector.anchors()  # the generic word's anchors: from the cache, or computed (text tower loaded and released)
    except (StoreError, ClipLoadError, KeyError, TypeError, ValueError, ModelLoadError) as exc:
        what = f"{exc.args[0]!r} missing from the manifest" if isinstance(exc, KeyError) else str(exc)
        raise ModelLoadError(f"cannot load model {name!r}{'@' + version if version else ''}: {what}") from exc
    return detector
