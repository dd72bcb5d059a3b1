"""The FNN of the paper: four linear layers that tell normal from anomalous *text* embeddings.

It is trained on prompt embeddings only and then applied unchanged to image embeddings, which live in the same
CLIP space. Inputs are L2-normalised inside `forward`, so callers cannot forget it. Training holds out whole prompt
pairs for validation (both prompts of a pair on the same side), early-stops on the validation loss and is
deterministic for a seed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load, save
from torch import nn
from tqdm.auto import tqdm

from .store import ModelStore, StoreError

FNN_FILE = "fnn.safetensors"  # the weights file of an FNN model in the store


@dataclass(frozen=True)
class FNNConfig:
    hidden: tuple[int, ...] = (512, 256, 128)
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 256
    max_epochs: int = 60
    patience: int = 5
    val_fraction: float = 0.2
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class FNN(nn.Module):
    def __init__(self, in_dim: int, hidden: tuple[int, ...] = (512, 256, 128)):
        super().__init__()
        dims = [in_dim, *hidden, 1]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.in_dim = in_dim

    @property
    def layout(self) -> list[int]:
        return [self.in_dim] + [layer.out_features for layer in self.layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N] (anomalous > 0) for embeddings [N, D]."""
        x = F.normalize(x.float(), dim=-1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x).squeeze(-1)

    @torch.inference_mode()
    def score(self, x: torch.Tensor) -> torch.Tensor:
        """s_fnn = sigmoid(logit), in [0, 1]."""
        return torch.sigmoid(self(x))


@dataclass
class TrainReport:
    epochs: int
    best_epoch: int
    train_loss: float
    val_loss: float
    val_auroc: float
    n_train_pairs: int
    n_val_pairs: int


def auroc(labels: torch.Tensor, scores: torch.Tensor) -> float:
    """Area under the ROC curve from ranks (ties share their mean rank: equal to scikit-learn's roc_auc_score).

    Rank-based here rather than scikit-learn's, so that training and serving need no scikit-learn."""
    from scipy.stats import rankdata

    y = labels.numpy().astype(bool)
    ranks = rankdata(scores.double().numpy())
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both normal and anomalous examples")
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pair_scores(fnn: FNN, normal: torch.Tensor, anomalous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, scores) for embeddings of normal and anomalous prompts: the input of a validation AUROC."""
    x = torch.cat([normal, anomalous])
    y = torch.cat([torch.zeros(len(normal)), torch.ones(len(anomalous))])
    return y, fnn.score(x).cpu()


def train_fnn(
    normal: torch.Tensor, anomalous: torch.Tensor, cfg: FNNConfig = FNNConfig(), progress: bool = False
) -> tuple[FNN, TrainReport]:
    """Train on paired embeddings [N, D] (row i of each is one prompt pair)."""
    if normal.shape != anomalous.shape or normal.ndim != 2:
        raise ValueError(f"normal and anomalous embeddings must be paired [N, D]: {normal.shape} vs {anomalous.shape}")
    n = normal.shape[0]
    if n < 4:
        raise ValueError("need at least 4 prompt pairs to train with a validation split")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    perm = torch.randperm(n, generator=gen)
    n_val = max(1, int(round(n * cfg.val_fraction)))
    val_idx, train_idx = perm[:n_val], perm[n_val:]

    def stack(idx):
        x = torch.cat([normal[idx], anomalous[idx]]).float()
        y = torch.cat([torch.zeros(len(idx)), torch.ones(len(idx))])
        return x, y

    x_tr, y_tr = stack(train_idx)
    x_va, y_va = stack(val_idx)
    fnn = FNN(normal.shape[1], cfg.hidden)
    opt = torch.optim.AdamW(fnn.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best = (float("inf"), 0, None)
    train_loss = float("nan")
    bar = tqdm(range(cfg.max_epochs), desc="train FNN", unit="epoch", disable=not progress, leave=False)
    epoch = 0
    for epoch in bar:
        fnn.train()
        order = torch.randperm(len(x_tr), generator=gen)
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            loss = F.binary_cross_entropy_with_logits(fnn(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        train_loss = total / len(order)
        fnn.eval()
        with torch.no_grad():
            val_loss = F.binary_cross_entropy_with_logits(fnn(x_va), y_va).item()
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
        if val_loss < best[0] - 1e-5:
            best = (val_loss, epoch, {k: v.clone() for k, v in fnn.state_dict().items()})
        elif epoch - best[1] >= cfg.patience:
            break
    bar.close()
    fnn.load_state_dict(best[2])
    fnn.eval()
    labels, scores = pair_scores(fnn, normal[val_idx], anomalous[val_idx])
    report = TrainReport(
        epochs=epoch + 1,
        best_epoch=best[1] + 1,
        train_loss=train_loss,
        val_loss=best[0],
        val_auroc=auroc(labels, scores),
        n_train_pairs=len(train_idx),
        n_val_pairs=len(val_idx),
    )
    return fnn, report


def fnn_to_bytes(fnn: FNN) -> bytes:
    return save({k: v.contiguous() for k, v in fnn.state_dict().items()}, metadata={"layout": ",".join(map(str, fnn.layout))})


def fnn_from_bytes(data: bytes, layout: list[int]) -> FNN:
    """Rebuild an FNN of `layout` ([in, h1, h2, h3, 1]) from safetensors bytes; shape mismatches raise ValueError."""
    state = load(data)
    fnn = FNN(layout[0], tuple(layout[1:-1]))
    try:
        fnn.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"FNN weights do not match layout {layout}: {exc}") from exc
    return fnn.eval()


def load_fnn(store: ModelStore, name: str, version: str | None, embed_dim: int) -> tuple[FNN, dict[str, Any]]:
    """(FNN, manifest) of the store's `name@version`, after checksum and dimension checks.

    Lives beside the FNN, not in the trainer, so that serving never imports training code. Raises StoreError on any
    mismatch (wrong kind, wrong dimension, weights that do not fit the recorded layout).
    """
    folder, manifest = store.verify(name, version)
    label = f"{name}@{Path(folder).name}"
    if manifest.get("kind") != "fnn":
        raise StoreError(f"{label} is not an FNN model (kind={manifest.get('kind')!r})")
    if FNN_FILE not in manifest["files"]:
        raise StoreError(f"{label}: the manifest does not list {FNN_FILE}")
    try:
        layout = [int(n) for n in manifest["fnn"]["layout"]]
    except (KeyError, TypeError, ValueError):
        raise StoreError(f"{label}: the manifest has no valid fnn.layout") from None
    if len(layout) < 2 or layout[0] != embed_dim or manifest.get("embed_dim") != embed_dim:
        raise StoreError(f"dimension mismatch: FNN {label} expects {layout[0]}-d embeddings, CLIP gives {embed_dim}-d")
    try:
        fnn = fnn_from_bytes((Path(folder) / FNN_FILE).read_bytes(), layout)
    except Exception as exc:  # safetensors, torch and OS errors alike mean "these weights are unusable"
        raise StoreError(f"{label}: {FNN_FILE} cannot be loaded ({type(exc).__name__}: {str(exc)[:200]})") from exc
    return fnn, manifest
