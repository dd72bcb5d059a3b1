"""The offline trainer: random-word prompt pairs -> CLIP text embeddings -> FNN -> model store.

`zsad train` is a thin wrapper around `train_fnn_model`. The manifest written here is everything needed to reload
and to reproduce the model: the CLIP it was trained on (with checksum), the FNN layout, the prompt configuration,
the vocabulary itself, the seed and the validation metrics.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .clip_backend import ClipBackend
from .fnn import FNNConfig, TrainReport, auroc, fnn_to_bytes, pair_scores, train_fnn
from .prompts import RandomWordConfig, Vocabulary, clean_pairs, random_word_pairs
from .store import ModelStore

FNN_FILE = "fnn.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    prompts: RandomWordConfig = field(default_factory=RandomWordConfig)
    fnn: FNNConfig = field(default_factory=FNNConfig)
    random_words: bool = True  # False: the ablation "FNN without random words" (object slot = generic_object)
    generic_object: str = "object"
    vocabulary_path: str | None = None
    window_scales: tuple[int, ...] | None = None  # serving recommendation recorded in the manifest
    tta_views: int = 1  # serving recommendation (see tta.py); the calibration is fitted with it

    def __post_init__(self) -> None:
        from .tta import VIEW_COUNTS

        if self.tta_views not in VIEW_COUNTS:  # refused before training, not when the service loads the model
            raise ValueError(f"tta_views must be one of {VIEW_COUNTS}, got {self.tta_views}")


@dataclass
class TrainResult:
    version: str | None
    manifest: dict[str, Any]
    report: TrainReport
    clean_auroc: float
    seconds: float


def calibrate_on_images(
    backend: ClipBackend, fnn, vocab: Vocabulary, paths: list[Path], generic_object: str = "object",
    temperature: float = 0.07, quantile: float = 0.99, batch_size: int = 64, combine_weight: float = 0.5,
    tta_views: int = 1,
) -> dict[str, Any]:
    """Score calibration (see scoring.Calibration) from unlabeled *normal* reference images.

    The embeddings are made as the service will make them (`tta_views`): averaging views narrows the spread of the
    logits, so a calibration fitted without them would not hold with them."""
    from .preprocess import load_image, to_pixels
    from .prompts import ensemble
    from .scoring import (Calibration, anchors_from_embeddings, calibrated_score, combine, fit_calibration, fnn_logit,
                          prompt_logit)
    from .tta import encode_global

    if not paths:
        raise ValueError("no calibration images given")
    normal, anomalous = ensemble(vocab, generic_object)
    text = backend.encode_text(normal + anomalous)
    anchors = anchors_from_embeddings(generic_object, text[: len(normal)], text[len(normal) :])
    f_logits, p_logits = [], []
    for start in range(0, len(paths), batch_size):
        images = [load_image(p) for p in paths[start : start + batch_size]]
        pixels, _ = to_pixels(images, backend.image_size, backend.mean, backend.std)
        emb = encode_global(backend, pixels, tta_views)
        f_logits.append(fnn_logit(emb, fnn.to(emb.device)).cpu())
        p_logits.append(prompt_logit(emb, anchors, temperature).cpu())
    f_all, p_all = torch.cat(f_logits), torch.cat(p_logits)
    fitted = fit_calibration(f_all, p_all, quantile)
    cal = Calibration.from_manifest(fitted)
    f, p = calibrated_score(f_all, cal.fnn), calibrated_score(p_all, cal.prompt)
    scores = {"fnn": f, "prompt": p, "combined": combine(f, p, combine_weight)}
    # The service's default threshold: the same false-reject rate on the reference images, for every score.
    fitted["threshold_advice"] = {k: float(torch.quantile(v, quantile)) for k, v in scores.items()}
    return fitted


def train_fnn_model(
    backend: ClipBackend,
    cfg: TrainConfig,
    store: ModelStore | None = None,
    name: str = "default",
    version: str | None = None,
    make_current: bool = True,
    progress: bool = False,
    calibration_images: list[Path] | None = None,
    calibration_reference: str | None = None,
) -> TrainResult:
    """Train an FNN on `backend`'s text tower; publish it to `store` when given.

    With `calibration_images` (unlabeled normal images, e.g. a line's good parts), the manifest also records a score
    calibration so that 0.5 means "above 99% of normal reference images" and s_fnn / s_pr share one scale.
    """
    t0 = time.perf_counter()
    vocab = Vocabulary.load(cfg.vocabulary_path)
    pairs = random_word_pairs(vocab, cfg.prompts, None if cfg.random_words else cfg.generic_object)
    texts = [p.normal for p in pairs] + [p.anomalous for p in pairs]
    emb = backend.encode_text(texts, progress=progress)
    normal, anomalous = emb[: len(pairs)], emb[len(pairs) :]
    fnn, report = train_fnn(normal, anomalous, cfg.fnn, progress=progress)

    clean = clean_pairs(vocab, cfg.generic_object)
    clean_emb = backend.encode_text([p.normal for p in clean] + [p.anomalous for p in clean])
    labels, scores = pair_scores(fnn, clean_emb[: len(clean)], clean_emb[len(clean) :])
    clean_auroc = auroc(labels, scores)

    manifest: dict[str, Any] = {
        "kind": "fnn",
        "zsad_version": __version__,
        "clip": backend.spec.to_manifest(),
        "embed_dim": backend.embed_dim,
        "fnn": {"layout": fnn.layout, "activation": "relu", "input": "l2-normalised CLIP embedding (centred if the CLIP ships centres)"},
        "training": {
            "n_pairs": cfg.prompts.n_pairs,
            "random_words": cfg.random_words,
            "prompts": asdict(cfg.prompts),
            "fnn": cfg.fnn.to_dict(),
            "generic_object": cfg.generic_object,
            "vocabulary": vocab.to_dict(),
        },
        "metrics": {
            "val_auroc_random_word": report.val_auroc,
            "val_auroc_clean": clean_auroc,
            "val_loss": report.val_loss,
            "epochs": report.epochs,
            "best_epoch": report.best_epoch,
        },
    }
    if cfg.window_scales:
        manifest["windows"] = {"scales": list(cfg.window_scales)}
    if cfg.tta_views > 1:
        manifest["tta"] = {"views": cfg.tta_views}
    if calibration_images:
        calibration = calibrate_on_images(backend, fnn, vocab, list(calibration_images), cfg.generic_object,
                                          tta_views=cfg.tta_views)
        manifest["threshold_advice"] = {**calibration.pop("threshold_advice"),
                                        "basis": "1% false rejects on the calibration images"}
        manifest["calibration"] = {**calibration,
                                   "reference": calibration_reference or f"{len(calibration_images)} normal images"}
    result_version = None
    if store is not None:
        result_version = store.publish(name, {FNN_FILE: fnn_to_bytes(fnn)}, manifest, version, make_current)
        manifest = store.manifest(name, result_version)
    return TrainResult(result_version, manifest, report, clean_auroc, time.perf_counter() - t0)


def load_fnn_from_store(store: ModelStore, name: str, version: str | None, embed_dim: int):
    """(FNN, manifest) after checksum and dimension checks; raises StoreError on any mismatch."""
    from .fnn import fnn_from_bytes
    from .store import StoreError

    folder, manifest = store.verify(name, version)
    if manifest.get("kind") != "fnn":
        raise StoreError(f"{name}@{manifest.get('version')} is not an FNN model (kind={manifest.get('kind')!r})")
    layout = manifest["fnn"]["layout"]
    if layout[0] != embed_dim or manifest.get("embed_dim") != embed_dim:
        raise StoreError(
            f"dimension mismatch: FNN {name}@{manifest['version']} expects {layout[0]}-d embeddings, CLIP gives {embed_dim}-d"
        )
    try:
        fnn = fnn_from_bytes((Path(folder) / FNN_FILE).read_bytes(), layout)
    except ValueError as exc:
        raise StoreError(str(exc)) from exc
    return fnn, manifest
