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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from .anchor_cache import AnchorCache, anchor_key
from .clip_backend import CLIP_WEIGHTS_FILE, ClipBackend, ClipLoadError, ClipSpec, load_clip
from .constants import WINDOW_SCALES
from .fnn import FNN, load_fnn
from .prompts import Vocabulary, ensemble
from .scoring import Calibration, PromptAnchors, all_logits, all_scores, anchors_from_embeddings
from .settings import Settings
from .store import ModelStore, StoreError
from .timing import lap

if TYPE_CHECKING:
    from .fewshot import ReferenceMemory
    from .preprocess import Geometry


class ModelLoadError(Exception):
    """The configured model cannot be served (missing, corrupt, mismatched)."""


class TextTowerOff(ModelLoadError):
    """Anchors for an object word are not cached and `ZSAD_TEXT_TOWER=off` forbids loading the text tower."""


class MapsOnDemand(Mapping):
    """`Detection.heat` of a detector with `full_maps=False`: a read-only mapping that makes a score's map at the
    image's size from its patch grid the first time it is read (then keeps it). A detection in flight holds only
    its grids; a caller that reads one score's map pays for one map, not for every score's."""

    def __init__(self, grid: dict[str, np.ndarray], geometry: Geometry, made: dict[str, np.ndarray] | None = None):
        self._grid = grid
        self._geometry = geometry
        self._made: dict[str, np.ndarray] = dict(made or {})  # maps made in the batch (`Detector.detect(map_score=)`)

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
    mode: str = "zero_shot"  # or "few_shot": scored against a reference memory (`fewshot.py`)
    shots: int = 0  # reference images in that memory


@dataclass
class ImageEmbedding:
    """One image's CLIP embeddings: what the evaluation cache stores, so FNN versions can be rescored cheaply."""

    global_emb: torch.Tensor  # [D]
    windows: dict[int, torch.Tensor]  # scale -> [n_windows, D]; empty without heatmap
    grid: tuple[int, int]
    geometry: Geometry
    patches: torch.Tensor | None = None  # [h*w, P] grid-cell tokens (windows.Embeddings.patches); with windows only
    dense: torch.Tensor | None = None  # [h'*w', C] CNN mid-level features (windows.Embeddings.dense); with windows only
    dense_grid: tuple[int, int] | None = None

    def cpu(self) -> ImageEmbedding:
        """The same embedding with every tensor on the host (what caches and the calibration keep)."""
        return replace(self, global_emb=self.global_emb.cpu(), windows={k: w.cpu() for k, w in self.windows.items()},
                       patches=self.patches.cpu() if self.patches is not None else None,
                       dense=self.dense.cpu() if self.dense is not None else None)


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
    maps_in_batch: bool | None = None  # make `map_score`'s map on the model's device in the batch; None: off the CPU
    anchor_cache: AnchorCache | None = None  # anchors on disk next to the model (`load_detector` sets it)

    maps_on_device = True  # the worker may pass `map_score` (fakes in tests do not take it)

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
        self, images: Sequence[Image.Image | Prepared], heatmap: bool = True, timings: dict[str, float] | None = None,
        dense: bool | None = None,
    ) -> list[ImageEmbedding]:
        """CLIP embeddings of a batch: global, plus windows when `heatmap` (one backbone pass either way).

        `dense`: also the few-shot dense bank's features (CNN towers, with `heatmap`); None: when the settings build
        memories with a dense bank (`reference_dense`), so that a memory and the images scored against it agree."""
        from .tta import average_embeddings, encode_global
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
            self.backend, pixels, self.window_scales, s.window_stride, s.window_chunk, s.cnn_window_mode, timings,
            dense=s.reference_dense if dense is None else dense, extra_views=self._views_in_window_pass(pixels),
        )
        glob = emb.global_emb
        if emb.view_globals is not None:  # the views shared the window pass's backbone forward
            glob = average_embeddings([glob, *emb.view_globals.split(len(geoms))]).to(glob.dtype)
        elif self.tta_views > 1:
            t = time.perf_counter()
            glob = encode_global(self.backend, pixels, self.tta_views, identity=glob)
            lap(timings, "embed", t)
        return [
            ImageEmbedding(glob[i], {k: w[i] for k, w in emb.windows.items()}, emb.grid, g,
                           emb.patches[i] if emb.patches is not None else None,
                           emb.dense[i] if emb.dense is not None else None, emb.dense_grid)
            for i, g in enumerate(geoms)
        ]

    def _views_in_window_pass(self, pixels: torch.Tensor) -> torch.Tensor | None:
        """The test-time views (all but the identity) to run in the heatmap pass's backbone forward, or None.

        A CNN tower in attnpool mode pools the views from the same forward as the windows: for one image with 4 views,
        one forward of 4 images instead of 1 and then 3. On the CPU only while that forward stays within
        `tta.CPU_WINDOW_PASS_IMAGES` images (larger forwards get slower per image)."""
        from .cnn_tower import is_resnet
        from .tta import CPU_WINDOW_PASS_IMAGES, dihedral_views

        n, b = self.tta_views, pixels.shape[0]
        visual = getattr(getattr(self.backend, "model", None), "visual", None)
        if n < 2 or self.settings.cnn_window_mode != "attnpool" or visual is None or not is_resnet(visual):
            return None
        if self.backend.device.type == "cpu" and n * b > CPU_WINDOW_PASS_IMAGES:
            return None
        return torch.cat(dihedral_views(pixels, n)[1:])

    @torch.inference_mode()
    def score(
        self,
        embs: Sequence[ImageEmbedding],
        object_name: str | None = None,
        timings: dict[str, float] | None = None,
        memory: ReferenceMemory | None = None,
        exclude: Sequence[int] | None = None,
        maps: bool = True,
        map_score: str | None = None,
    ) -> list[Detection]:
        """Scores (and maps, when the embeddings have windows) for a batch of embeddings from `embed`.

        Everything stays on the model's device for the whole batch: the scores of every registered score, the window
        scores, the harmonic aggregation (all scores stacked into one batch) and the maps at each image's size. What
        crosses to the host: the image scores (one transfer), the patch grids (one transfer), and the final maps
        (all of them with `full_maps`; else only `map_score`'s, when given and `maps_in_batch`; the other maps are
        made from the grid when read, see `MapsOnDemand`).

        With a reference `memory` (few-shot mode, `fewshot.py`) every score and map is combined with the memory's
        few-shot map by WinCLIP+'s rule; `exclude[i]` (a shot index, or -1) leaves that shot's rows out for image i
        (leave-one-out). `maps=False` skips the maps at image resolution (the image scores stay the same; in
        few-shot mode the zero-shot window scores are then not computed at all: the image score needs only the
        few-shot map's maximum)."""
        from .aggregate import winclip_map
        from .window_grid import window_indices

        timings = timings if timings is not None else {}
        t = time.perf_counter()
        device = self.backend.device
        scores = self.score_embeddings(torch.stack([e.global_emb for e in embs]).to(device), object_name)
        names = list(scores)
        fs_map = self._few_shot_map(embs, memory, exclude) if memory is not None else None
        grid_maps = None  # [S, B, gh, gw]: every score's patch grid, on the device
        if fs_map is not None and not maps:  # the image score needs only the few-shot map's maximum
            from .fewshot import combine_few_shot

            zero = torch.zeros_like(fs_map, dtype=torch.float64)
            scores = {name: combine_few_shot(v, zero, fs_map)[0] for name, v in scores.items()}
        elif embs[0].windows:
            b = len(embs)
            grid, stride = embs[0].grid, self.settings.window_stride
            indices = {sc: window_indices(grid[0], grid[1], sc, stride) for sc in embs[0].windows}
            window_scores = {
                sc: self.score_embeddings(torch.stack([e.windows[sc] for e in embs]).to(device), object_name)
                for sc in indices
            }
            # every score's maps in one aggregation: the scores are stacked along the batch ([S * B, ...])
            stacked = {sc: torch.stack([ws[k] for k in names]).flatten(0, 1) for sc, ws in window_scores.items()}
            image_scores = torch.stack([scores[k] for k in names])  # [S, B] on the device
            grid_maps = winclip_map(image_scores.flatten(), stacked, indices, grid).reshape(len(names), b, *grid)
            if fs_map is not None:
                from .fewshot import combine_few_shot

                combined = [combine_few_shot(scores[k], grid_maps[j], fs_map) for j, k in enumerate(names)]
                scores = {k: c[0] for k, c in zip(names, combined)}
                grid_maps = torch.stack([c[1] for c in combined])
        host = torch.stack([scores[k] for k in names]).cpu().tolist()  # one transfer for every score of the batch
        results = [Detection({k: host[j][i] for j, k in enumerate(names)}, (e.geometry.width, e.geometry.height))
                   for i, e in enumerate(embs)]
        if grid_maps is not None:
            grids = grid_maps.cpu().numpy()  # one transfer: the patch grids of every score and image
            in_batch = self.maps_in_batch if self.maps_in_batch is not None else device.type != "cpu"
            for i, (e, det) in enumerate(zip(embs, results)):
                det.grid = {k: grids[j, i] for j, k in enumerate(names)}
                if not maps:  # maps at the image's size only when asked (pixel budget)
                    continue
                if self.full_maps:  # every score's map at the image's size, made on the device, one transfer
                    heat = e.geometry.to_original_tensor(grid_maps[:, i]).cpu().numpy()
                    det.heat = {k: heat[j] for j, k in enumerate(names)}
                else:
                    made = {}
                    if map_score in names and in_batch:  # the answer's map, made on the device
                        made[map_score] = e.geometry.to_original_tensor(
                            grid_maps[names.index(map_score), i]).cpu().numpy()
                    det.heat = MapsOnDemand(det.grid, e.geometry, made)
        if memory is not None:
            for det in results:
                det.mode, det.shots = "few_shot", memory.shots
        lap(timings, "aggregate", t)
        return results

    def _few_shot_map(self, embs: Sequence[ImageEmbedding], memory: ReferenceMemory,
                      exclude: Sequence[int] | None) -> torch.Tensor:
        from .fewshot import ReferenceMemoryError, few_shot_map, model_ref

        if not embs[0].windows or any(e.patches is None for e in embs):
            raise ReferenceMemoryError("few-shot scoring needs window and patch embeddings (embed with heatmap=True)")
        why = memory.incompatibility(model_ref(self), self.window_scales, self.settings.window_stride, embs[0].grid)
        if why:
            raise ReferenceMemoryError(f"the reference memory cannot score this model's embeddings: {why}")
        device = self.backend.device
        windows = {sc: torch.stack([e.windows[sc] for e in embs]).to(device) for sc in embs[0].windows}
        patches = torch.stack([e.patches for e in embs]).to(device)
        dense = (torch.stack([e.dense for e in embs]).to(device)
                 if memory.dense is not None and all(e.dense is not None for e in embs) else None)
        ex = torch.tensor(list(exclude), dtype=torch.long) if exclude is not None else None
        return few_shot_map(windows, patches, memory, ex, dense)

    def detect(
        self,
        images: Sequence[Image.Image | Prepared],
        object_name: str | None = None,
        heatmap: bool = True,
        timings: dict[str, float] | None = None,
        memory: ReferenceMemory | None = None,
        map_score: str | None = None,
    ) -> list[Detection]:
        """Score a batch of RGB images; with `heatmap`, also WinCLIP-style maps at each image's resolution.
        `map_score`: the score whose map the caller will read (the service's answer), made in the batch when
        `maps_in_batch` (see `score`).

        With a reference `memory` the images are scored in few-shot mode (WinCLIP+, `fewshot.py`); the windows are
        then computed even without `heatmap`, since the image score takes the few-shot map's maximum."""
        timings = timings if timings is not None else {}
        if memory is None:
            return self.score(self.embed(images, heatmap, timings, dense=False), object_name, timings,
                              map_score=map_score)
        return self.score(self.embed(images, True, timings, dense=memory.dense is not None), object_name, timings,
                          memory=memory, maps=heatmap, map_score=map_score)

    def with_fnn(self, fnn: FNN, manifest: dict[str, Any]) -> Detector:
        """The same CLIP (and prompt anchors) with another FNN: how an N_p ablation scores many versions cheaply."""
        return replace(self, fnn=fnn.to(self.backend.device), manifest=manifest)


def clip_weights_bytes(settings: Settings, name: str | None = None, version: str | None = None) -> int | None:
    """Size of the weights file of the CLIP that `name@version` (default: the settings') scores with, before loading.

    None for an open_clip pretrained CLIP (its file is in a hub cache, maybe not yet downloaded); 0 when the model
    cannot be resolved (the load will then say why). The start-up uses it to choose the heap policy (service/heap.py).
    """
    store = ModelStore(settings.model_store)
    try:  # manifests only, no checksums: the load verifies everything right after
        manifest = store.manifest(name or settings.model_name, version or settings.model_version)
        spec = ClipSpec.from_manifest(manifest["clip"])
        if spec.source == "store":
            clip_manifest = store.manifest(spec.name, spec.version)
            weights = str(clip_manifest.get("weights", CLIP_WEIGHTS_FILE))
            return (store.path(spec.name, spec.version) / weights).stat().st_size
        if spec.source == "file":
            return Path(spec.path or "").stat().st_size
        return None
    except (StoreError, KeyError, TypeError, OSError):
        return 0


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
