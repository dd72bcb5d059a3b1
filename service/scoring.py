"""Scores of an embedding: the FNN score, the prompt score s_pr, and their combination.

All three take embeddings [..., D] in the backend's shared space (see clip_backend.ClipBackend.finish_*) and return
scores in [0, 1], anomalous high, with the leading shape kept. So the same functions score a batch of global image
embeddings [B, D] and a batch of window embeddings [B, n_windows, D].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fnn import FNN

SCORE_NAMES = ("fnn", "prompt", "combined")


@dataclass(frozen=True)
class PromptAnchors:
    """Mean normal and mean anomalous prompt-ensemble embeddings for one object word (WinCLIP's t_n, t_a)."""

    object_name: str
    normal: torch.Tensor  # [D]
    anomalous: torch.Tensor  # [D]

    def to(self, device: torch.device) -> "PromptAnchors":
        return PromptAnchors(self.object_name, self.normal.to(device), self.anomalous.to(device))


def anchors_from_embeddings(object_name: str, normal: torch.Tensor, anomalous: torch.Tensor) -> PromptAnchors:
    return PromptAnchors(object_name, F.normalize(normal.mean(0), dim=-1), F.normalize(anomalous.mean(0), dim=-1))


def s_fnn(emb: torch.Tensor, fnn: FNN) -> torch.Tensor:
    shape = emb.shape[:-1]
    fnn = fnn.to(emb.device)
    return fnn.score(emb.reshape(-1, emb.shape[-1])).reshape(shape)


def s_pr(emb: torch.Tensor, anchors: PromptAnchors, temperature: float = 0.07) -> torch.Tensor:
    """softmax([cos(f, t_n), cos(f, t_a)] / T)[anomalous]."""
    anchors = anchors.to(emb.device)
    f = F.normalize(emb.float(), dim=-1)
    logits = torch.stack([f @ anchors.normal, f @ anchors.anomalous], dim=-1) / temperature
    return logits.softmax(dim=-1)[..., 1]


def combine(fnn_score: torch.Tensor, prompt_score: torch.Tensor, weight: float = 0.5) -> torch.Tensor:
    """Weighted mean: `weight` on s_fnn, the rest on s_pr ("CLIP + FNN" of the paper)."""
    return weight * fnn_score + (1.0 - weight) * prompt_score


def all_scores(
    emb: torch.Tensor, fnn: FNN, anchors: PromptAnchors, temperature: float = 0.07, weight: float = 0.5
) -> dict[str, torch.Tensor]:
    f, p = s_fnn(emb, fnn), s_pr(emb, anchors, temperature)
    return {"fnn": f, "prompt": p, "combined": combine(f, p, weight)}
