"""The offline trainer: random-word prompt pairs -> CLIP text embeddings -> FNN -> model store.

`zsad train` is a thin wrapper around `train_fnn_model`. The manifest written here is everything needed to reload
and to reproduce the model: the CLIP it was trained on (with checksum), the FNN layout, the prompt configuration,
the vocabulary itself, the seed and the validation metrics. Training and publishing only: loading lives beside the
FNN (`fnn.load_fnn`) and the score calibration in `calibration.py`, so serving never imports this module.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .calibration import CalibrationFit
from .clip_backend import ClipBackend
from .constants import GENERIC_OBJECT, PIXEL_QUANTILE, VIEW_COUNTS
from .fnn import FNN_FILE, FNNConfig, TrainReport, auroc, fnn_to_bytes, pair_scores, train_fnn
from .prompts import RandomWordConfig, Vocabulary, clean_pairs, random_word_pairs
from .settings import Settings
from .store import ModelStore


@dataclass(frozen=True)
class TrainConfig:
    prompts: RandomWordConfig = field(default_factory=RandomWordConfig)
    fnn: FNNConfig = field(default_factory=FNNConfig)
    random_words: bool = True  # False: the ablation "FNN without random words" (object slot = generic_object)
    generic_object: str = GENERIC_OBJECT
    vocabulary_path: str | None = None
    window_scales: tuple[int, ...] | None = None  # serving recommendation recorded in the manifest
    tta_views: int = 1  # serving recommendation (see tta.py); the calibration is fitted with it

    def __post_init__(self) -> None:
        if self.tta_views not in VIEW_COUNTS:  # refused before training, not when the service loads the model
            raise ValueError(f"tta_views must be one of {VIEW_COUNTS}, got {self.tta_views}")


@dataclass
class TrainResult:
    version: str | None
    manifest: dict[str, Any]
    report: TrainReport
    clean_auroc: float
    seconds: float
    calibration: CalibrationFit | None = None  # with calibration images: their scores as the service computes them


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
    settings: Settings | None = None,
) -> TrainResult:
    """Train an FNN on `backend`'s text tower; publish it to `store` when given.

    With `calibration_images` (unlabeled normal images, e.g. a line's good parts), the manifest also records a score
    calibration so that 0.5 means "above 99% of normal reference images" and s_fnn / s_pr share one scale. It is
    fitted by the detector the service will run, with `settings` (default: `Settings()`) and the views recommended
    in `cfg`, and records them.
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
        "fnn": {"layout": fnn.layout, "activation": "relu",
                "input": "l2-normalised CLIP embedding (centred if the CLIP ships centres)"},
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
    fit = None
    if calibration_images:
        from .calibration import fit_detector_calibration
        from .detector import Detector

        # The views are the model's own recommendation (cfg), not an override the training shell happens to have.
        serving = (settings or Settings()).model_copy(update={"tta_views": None, "generic_object": cfg.generic_object})
        fit = fit_detector_calibration(Detector.from_parts(backend, fnn, serving, manifest, vocab),
                                       list(calibration_images))
        manifest["threshold_advice"] = {**fit.threshold_advice, "basis": "1% false rejects on the calibration images"}
        if fit.pixel_threshold_advice:
            manifest["pixel_threshold_advice"] = {**fit.pixel_threshold_advice,
                                                  "basis": f"{PIXEL_QUANTILE:g} quantile of the heat of the calibration images"}
        manifest["calibration"] = {**fit.entry,
                                   "reference": calibration_reference or f"{len(calibration_images)} normal images"}
    result_version = None
    if store is not None:
        result_version = store.publish(name, {FNN_FILE: fnn_to_bytes(fnn)}, manifest, version, make_current)
        manifest = store.manifest(name, result_version)
    return TrainResult(result_version, manifest, report, clean_auroc, time.perf_counter() - t0, fit)
