"""Scores of an embedding: the FNN score, the prompt score s_pr, and their combination.

All three take embeddings [..., D] in the backend's shared space (see clip_backend.ClipBackend.finish_*) and return
scores in [0, 1], anomalous high, with the leading shape kept. So the same functions score a batch of global image
embeddings [B, D] and a batch of window embeddings [B, n_windows, D].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .constants import CALIBRATION_QUANTILE, COMBINE_WEIGHT, PROMPT_TEMPERATURE, SCORE_NAMES
from .fnn import FNN

__all__ = ["SCORE_NAMES", "PromptAnchors", "Calibration", "anchors_from_embeddings", "all_logits", "all_scores",
           "fit_calibration", "fnn_logit", "prompt_logit", "s_fnn", "s_pr", "combine", "calibrated_score"]


@dataclass(frozen=True)
class PromptAnchors:
    """Mean normal and mean anomalous prompt-ensemble embeddings for one object word (WinCLIP's t_n, t_a)."""

    object_name: str
    normal: torch.Tensor  # [D]
    anomalous: torch.Tensor  # [D]

    def to(self, device: torch.device) -> PromptAnchors:
        return PromptAnchors(self.object_name, self.normal.to(device), self.anomalous.to(device))


def anchors_from_embeddings(object_name: str, normal: torch.Tensor, anomalous: torch.Tensor) -> PromptAnchors:
    return PromptAnchors(object_name, F.normalize(normal.mean(0), dim=-1), F.normalize(anomalous.mean(0), dim=-1))


@dataclass(frozen=True)
class Calibration:
    """Per-score affine maps of the logit, fitted on *normal* reference images (never on test data).

    Why: the FNN is trained on text, so its logit scale on images is arbitrary (it saturates at 1.0 on the tiny model,
    which both ties scores and makes "combined" just s_pr). With z = (logit - offset) / scale, where `offset` is the
    reference images' `quantile` logit and `scale` their spread, a score of 0.5 means "as anomalous as the top
    (1 - quantile) of normal reference images", and both scores live on one scale before they are combined.
    """

    fnn: tuple[float, float] | None = None  # (offset, scale)
    prompt: tuple[float, float] | None = None

    @classmethod
    def from_manifest(cls, data: dict | None) -> Calibration:
        data = data or {}
        return cls(*(tuple(data[k]) if data.get(k) else None for k in ("fnn", "prompt")))


def calibrated_score(logit: torch.Tensor, affine: tuple[float, float] | None) -> torch.Tensor:
    # float64: sigmoid of large logits rounds to exactly 1.0 in float32, which ties scores
    logit = logit.double()
    return torch.sigmoid(logit if affine is None else (logit - affine[0]) / affine[1])


def fnn_logit(emb: torch.Tensor, fnn: FNN) -> torch.Tensor:
    shape = emb.shape[:-1]
    if next(fnn.parameters()).device != emb.device:  # `Module.to` walks every module even when nothing moves
        fnn = fnn.to(emb.device)
    with torch.inference_mode():
        return fnn(emb.reshape(-1, emb.shape[-1])).reshape(shape)


def prompt_logit(emb: torch.Tensor, anchors: PromptAnchors, temperature: float = PROMPT_TEMPERATURE) -> torch.Tensor:
    """(cos(f, t_a) - cos(f, t_n)) / T: the logit of WinCLIP's two-class softmax."""
    anchors = anchors.to(emb.device)
    f = F.normalize(emb.float(), dim=-1)
    return (f @ anchors.anomalous - f @ anchors.normal) / temperature


def s_fnn(emb: torch.Tensor, fnn: FNN, calibration: Calibration | None = None) -> torch.Tensor:
    return calibrated_score(fnn_logit(emb, fnn), calibration.fnn if calibration else None)


def s_pr(emb: torch.Tensor, anchors: PromptAnchors, temperature: float = PROMPT_TEMPERATURE,
         calibration: Calibration | None = None) -> torch.Tensor:
    """softmax([cos(f, t_n), cos(f, t_a)] / T)[anomalous] (= sigmoid of `prompt_logit`), optionally calibrated."""
    return calibrated_score(prompt_logit(emb, anchors, temperature), calibration.prompt if calibration else None)


def combine(fnn_score: torch.Tensor, prompt_score: torch.Tensor, weight: float = COMBINE_WEIGHT) -> torch.Tensor:
    """Weighted mean: `weight` on s_fnn, the rest on s_pr ("CLIP + FNN" of the paper)."""
    return weight * fnn_score + (1.0 - weight) * prompt_score


def all_logits(emb: torch.Tensor, fnn: FNN, anchors: PromptAnchors,
               temperature: float = PROMPT_TEMPERATURE) -> dict[str, torch.Tensor]:
    """The raw logits that the calibration is fitted on (one per calibrated score)."""
    return {"fnn": fnn_logit(emb, fnn), "prompt": prompt_logit(emb, anchors, temperature)}


def all_scores(
    emb: torch.Tensor, fnn: FNN, anchors: PromptAnchors, temperature: float = PROMPT_TEMPERATURE,
    weight: float = COMBINE_WEIGHT, calibration: Calibration | None = None,
) -> dict[str, torch.Tensor]:
    """Every score of the registry (`constants.SCORES`), keyed by its name, in the registry's order."""
    logits = all_logits(emb, fnn, anchors, temperature)
    cal = calibration or Calibration()
    f, p = calibrated_score(logits["fnn"], cal.fnn), calibrated_score(logits["prompt"], cal.prompt)
    return {"fnn": f, "prompt": p, "combined": combine(f, p, weight)}


def fit_calibration(fnn_logits: torch.Tensor, prompt_logits: torch.Tensor,
                    quantile: float = CALIBRATION_QUANTILE) -> dict:
    """Manifest entry: for each score, (logit at `quantile` of the normal reference images, their std)."""
    def fit(x: torch.Tensor) -> list[float]:
        x = x.double().flatten()
        return [float(torch.quantile(x, quantile)), max(float(x.std()), 1e-6)]

    return {"quantile": quantile, "n_images": int(fnn_logits.numel()), "fnn": fit(fnn_logits),
            "prompt": fit(prompt_logits)}
