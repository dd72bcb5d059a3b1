"""Train the in-house tiny CLIP on the synthetic world and publish it to the model store.

Recipe (see shared/synthetic-world.md): open_clip `CLIP` with a ModifiedResNet image tower (layers 1-1-1-1, width 32,
attention pool) and a 3-layer character-level text tower, contrastive loss on twin batches, AdamW (lr 1e-3, wd 0.1),
linear warm-up then cosine decay by step. Images are rendered at `render_size` and upsampled (bicubic) to
`image_size`: at 192 px the ResNet's final map is 6x6, which the window heatmaps need.

Robustness: data are a pure function of (seed, step); checkpoints hold weights, optimiser state and the step, saved
with torch.save and read back with `torch.load(weights_only=True)`, so `--resume` continues the same run. A wall
budget (`max_minutes`) stops training cleanly and still publishes; with `fit_to_budget` the cosine schedule is
shortened once, early on, to the number of steps the measured speed allows, so the learning rate still anneals.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..clip_backend import resolve_device
from ..constants import CLIP_MEAN, CLIP_STD
from ..tokenizer import CHAR_ALPHABET, CharTokenizer
from ..windows import cnn_feature_map
from .captions import CaptionConfig
from .data import TwinBatches, check_training_kinds, clean_reference_images, reference_captions, worker_init
from .world import DEFECTS, HELD_OUT_KINDS, RANDOM_KINDS, TRAIN_KINDS, WIDE_DEFECTS, WIDE_RANDOM_KINDS


@dataclass
class TrainClipConfig:
    # schedule and optimiser
    steps: int = 1000
    batch: int = 128  # images per step: batch // 2 twins
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 40
    seed: int = 0
    # world and images
    render_size: int = 64
    image_size: int = 192
    crop_prob: float = 0.3
    random_word_prob: float = 0.5
    kinds: tuple[str, ...] = TRAIN_KINDS
    random_kind_prob: float = 0.0  # share of scenes of RANDOM_KINDS (domain randomisation)
    wide: bool = False  # the wide world (v4): more random kinds, fine and global defects, pose and photometric jitter
    # local term: the WinCLIP windows of a twin must tell where its defect is (0 = the global contrastive loss only)
    local_weight: float = 0.0
    local_scales: tuple[int, ...] = (1, 2, 3)  # window sides in cells of the final feature map, as the heatmap's
    # distillation to the starting model (`init_from`): 1 - cos of the image embeddings of named-kind scenes and of
    # every caption's text embedding, so a fine-tune on a new world keeps what it answered on the old one (0 = off)
    distill_weight: float = 0.0
    # model
    embed_dim: int = 128
    vision_width: int = 32
    vision_layers: tuple[int, int, int, int] = (1, 1, 1, 1)
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    context_length: int = 96
    tower: dict[str, int] | None = None  # cnn_tower options, e.g. stride 8: {"stem_stride": 1, "layer4_stride": 1, ...}
    # running
    device: str = "auto"
    workers: int = 2
    amp: bool = True  # bf16 autocast on CUDA only (on CPUs it slowed training down, AVX-512-BF16 included: train_speed.py)
    channels_last: bool = True  # NHWC convolutions on the CPU (oneDNN's fast layout)
    max_minutes: float | None = None
    fit_to_budget: bool = False
    log_every: int = 20
    ckpt_every: int = 500
    # publishing
    out_name: str = "tiny-factory-clip"
    version: str | None = None
    centre_images: int = 2048
    centre_captions: int = 2048
    centre_seed: int = 777

    def __post_init__(self) -> None:
        self.kinds = check_training_kinds(self.kinds)
        self.vision_layers = tuple(self.vision_layers)  # type: ignore[assignment]
        if self.batch < 2 or self.batch % 2:
            raise ValueError("--batch must be an even number >= 2 (clean images and their twins)")
        if self.steps < 1:
            raise ValueError("--steps must be >= 1")
        if self.image_size % 32:
            raise ValueError("--image-size must be a multiple of 32 (the ResNet's attention pool grid)")
        if self.render_size < 16:
            raise ValueError("--render-size must be >= 16")
        if self.lr <= 0:
            raise ValueError("--lr must be > 0")
        self.local_scales = tuple(int(k) for k in self.local_scales)  # type: ignore[assignment]
        if self.local_weight < 0:
            raise ValueError("--local-weight must be >= 0")
        if self.distill_weight < 0:
            raise ValueError("--distill-weight must be >= 0")
        if not self.local_scales or min(self.local_scales) < 1:
            raise ValueError("local_scales must be window sides >= 1")
        for name in ("crop_prob", "random_word_prob", "random_kind_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be between 0 and 1")


def model_config(cfg: TrainClipConfig) -> dict[str, Any]:
    """open_clip `CLIP(**model_cfg)` arguments; also what the store's open_clip_config.json holds."""
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {"image_size": cfg.image_size, "layers": list(cfg.vision_layers), "width": cfg.vision_width},
        "text_cfg": {
            "context_length": cfg.context_length,
            "vocab_size": CharTokenizer(cfg.context_length).vocab_size,
            "width": cfg.text_width,
            "heads": cfg.text_heads,
            "layers": cfg.text_layers,
        },
    }


def tokenizer_spec(cfg: TrainClipConfig) -> dict[str, Any]:
    return {"type": "char", "context_length": cfg.context_length, "alphabet": CHAR_ALPHABET}


def build_model(cfg: TrainClipConfig) -> nn.Module:
    from open_clip.model import CLIP

    from ..cnn_tower import apply_tower

    return apply_tower(CLIP(**model_config(cfg)), cfg.tower)


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to zero at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No decay on gains, biases, norms and the logit scale (as open_clip's trainer)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def preprocess(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> normalised float [B, 3, image_size, image_size] (bicubic upsampling, as the service)."""
    x = images.float() / 255.0
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False).clamp_(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (features already L2-normalised)."""
    logits = scale * img @ txt.t()
    labels = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


@torch.no_grad()
def twin_accuracy(img: torch.Tensor, txt: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Share of visible twins where each image prefers its own caption over its twin's: is the state learned?

    A 0-d tensor on the features' device (NaN when no twin is visible), so the loop need not synchronise.
    """
    p = len(img) // 2
    sim = img.float() @ txt.float().t()
    idx = torch.arange(p, device=img.device)
    ok = (sim[idx, idx] > sim[idx, idx + p]) & (sim[idx + p, idx + p] > sim[idx + p, idx])
    vis = visible.to(img.device).float()
    return (ok.float() * vis).sum() / vis.sum()


# Where a window counts as defective: it holds this share of the defect's pixels, or the defect covers this share
# of it. Windows that touch the defect less are left out of the local term (neither label is right for them).
LOCAL_HOLD = 0.5
LOCAL_COVER = 0.1


def window_targets(masks: torch.Tensor, grid: tuple[int, int], indices: torch.Tensor) -> torch.Tensor:
    """Labels [P, n_windows] of the defective twins' windows: 1 defective, 0 clean, NaN left out.

    `masks` [P, S, S] are the defect pixels; a window is the square of cells `indices` [n, k] of the `grid`. A small
    flaw makes every window that holds most of it defective, a large one every window it covers a tenth of."""
    h, w = grid
    m = F.interpolate(masks[:, None].float(), size=(h * 8, w * 8), mode="area")  # cells of 8x8 sub-pixels
    cells = F.avg_pool2d(m, 8).reshape(len(masks), h * w)  # share of each cell the defect covers
    inside = cells[:, indices].sum(-1)  # [P, n] in cell units
    total = cells.sum(-1, keepdim=True)
    cover = inside / indices.shape[1]
    held = inside / total.clamp_min(1e-8)
    target = torch.full_like(cover, float("nan"))
    target[inside <= 0] = 0.0
    target[(held >= LOCAL_HOLD) | (cover >= LOCAL_COVER)] = 1.0
    return target


def local_loss(visual: nn.Module, fmap: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, masks: torch.Tensor,
               visible: torch.Tensor, scales: tuple[int, ...]) -> torch.Tensor:
    """Class-balanced BCE on the windows of each twin pair: does a window look like its pair's defect caption?

    Why: the global loss matches whole images to captions and never asks a window where the defect is; the service
    scores WinCLIP windows, so the windows are trained as the service reads them (the attention pool over the
    window's cells, `cnn_windows`). A window's logit is scale * (cos(w, t_defect) - cos(w, t_clean)) with
    the pair's own captions. The clean twin's windows are all clean; the defective twin's follow `window_targets`.
    Pairs whose defect a close-up left out, or whose mask is empty, are skipped (nothing to localise)."""
    from ..window_grid import window_indices
    from ..windows import cnn_windows, project_cells, window_membership

    p = len(masks)
    # A defect drawn visible can still leave an empty mask (the world keeps its last redraw): nothing to localise.
    keep = (visible.bool() & masks.flatten(1).any(1)).to(fmap.device)
    if not bool(keep.any()):
        return fmap.sum() * 0.0
    rows = torch.cat([keep, keep])  # each kept pair's clean and defective twin
    fmap = fmap.float()
    h, w = fmap.shape[-2:]
    cells = project_cells(visual, fmap)
    gap = (txt[p:] - txt[:p]).float()  # [P, D]: defect caption minus clean caption
    sets = [window_indices(h, w, k, 1).to(fmap.device) for k in scales if k <= min(h, w)]
    # every scale in one pooling, as the service pools them (`embed_image_and_windows`)
    pooled = cnn_windows(visual, fmap, window_membership(sets, (h, w)), chunk=1 << 30, cells=cells)
    logits, targets = [], []
    for idx, emb in zip(sets, pooled.split([len(i) for i in sets], dim=1)):
        emb = F.normalize(emb.float(), dim=-1)
        logit = scale * torch.einsum("bnd,bd->bn", emb, torch.cat([gap, gap]))  # [2P, n]
        t = torch.cat([torch.zeros(p, len(idx), device=fmap.device), window_targets(masks.to(fmap.device), (h, w), idx)])
        logits.append(logit[rows].reshape(-1))
        targets.append(t[rows].reshape(-1))
    logit, target = torch.cat(logits), torch.cat(targets)
    pos, neg = target == 1, target == 0
    loss = F.binary_cross_entropy_with_logits(logit[neg], target[neg])
    if bool(pos.any()):
        loss = 0.5 * (loss + F.binary_cross_entropy_with_logits(logit[pos], target[pos]))
    return loss


def distill_loss(img_f: torch.Tensor, txt_f: torch.Tensor, teacher: nn.Module, images: torch.Tensor,
                 tokens: torch.Tensor, named: torch.Tensor) -> torch.Tensor:
    """Learning without Forgetting for a CLIP (Li & Hoiem, 2016): 1 - cos between the student's unit embeddings and
    the frozen starting model's, for the images of `named` scenes (the old world's kinds; [B] bool) and for every
    caption. Why: a fine-tune on a wider world otherwise drifts on the kinds it already knew (the seen-kind image AUROC
    fell by 1-2 points in every such candidate), and merging weights afterwards only trades one for the other."""
    with torch.no_grad():  # the whole batch, so the teacher's BatchNorm sees the batch the student's does
        t_img = F.normalize(teacher.encode_image(images), dim=-1)
        t_txt = F.normalize(teacher.encode_text(tokens), dim=-1)
    text = (1 - (txt_f.float() * t_txt.float()).sum(-1)).mean()
    gap = 1 - (img_f.float() * t_img.float()).sum(-1)  # [B]; the mean over the named images (0 when none)
    w = named.to(gap.dtype)
    return text + (gap * w).sum() / w.sum().clamp_min(1.0)


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _jsonable(cfg: TrainClipConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg)))


@dataclass
class TrainResult:
    steps_done: int
    total_steps: int
    losses: list[float]
    twin_acc: list[float]
    wall_time_s: float
    device: str
    stopped_by_budget: bool
    version: str | None = None
    model: nn.Module | None = field(default=None, repr=False)


def train(
    cfg: TrainClipConfig,
    ckpt_path: str | Path | None = None,
    resume: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    init_from: tuple[str | Path, str, str | None] | None = None,
) -> TrainResult:
    """Train; returns the model (on the CPU, fp32) and the curve. Publishing is `publish`.

    `stop_after` ends the run after that step with a checkpoint, as an interruption would (for `resume`).
    `init_from` = (store root, name, version) starts from a published CLIP's weights (a fresh optimiser and schedule):
    how a later, longer run builds on the shipped model when its checkpoint is gone.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    model = build_model(cfg)
    if init_from is not None and not resume:
        _load_published(model, cfg, *init_from)
        log(f"initialised from {init_from[1]}@{init_from[2] or 'current'} in {init_from[0]}")
    model = model.to(device)
    nhwc = cfg.channels_last and device.type == "cpu"
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    teacher = None
    if cfg.distill_weight > 0:
        if init_from is None:
            raise ValueError("--distill-weight needs --init-from: the model to stay close to")
        teacher = build_model(cfg)
        _load_published(teacher, cfg, *init_from)  # the published weights, also when resuming
        # in training mode like the student (BatchNorm on batch statistics: equal outputs at step 0), its running
        # statistics frozen (momentum 0), as it never learns
        teacher = teacher.to(device).train().requires_grad_(False)
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.0
        if nhwc:
            teacher = teacher.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
                                  fused=device.type == "cuda")
    start, total = 0, cfg.steps
    if resume:
        ckpt = torch.load(resume, map_location="cpu", weights_only=True)
        if ckpt.get("model_cfg") != model_config(cfg):
            raise ValueError(f"checkpoint {resume} was made for another model config: {ckpt.get('model_cfg')}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start, total = int(ckpt["step"]), int(ckpt["total_steps"])
        log(f"resumed from {resume} at step {start} of {total}")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f} M parameters; device {device}; {cfg.batch} images/step; steps {start}->{total}; "
        f"kinds {', '.join(cfg.kinds)} (+ random kinds {cfg.random_kind_prob:g})")

    data = TwinBatches(cfg.seed, cfg.batch // 2, cfg.render_size, cfg.steps, cfg.kinds, cfg.crop_prob,
                       CaptionConfig(random_word_prob=cfg.random_word_prob), cfg.context_length,
                       cfg.random_kind_prob, cfg.wide)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=None,
        sampler=range(start, cfg.steps),
        num_workers=cfg.workers,
        worker_init_fn=worker_init if cfg.workers else None,
        prefetch_factor=4 if cfg.workers else None,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    use_amp = cfg.amp and device.type == "cuda"
    losses: list[float] = []
    accs: list[float] = []
    locals_: list[float] = []  # the local term alone (0 without it), for the log
    distills: list[float] = []  # the distillation term alone (0 without it), for the log
    pending: list[torch.Tensor] = []  # (loss, twin acc, local, distill) still on the device: read back at log time
    t0 = time.time()
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
    stopped = False
    fitted = False
    probe: tuple[int, float] | None = None
    step = start
    model.train()
    bar = tqdm(total=total - start, desc="train clip", unit="step", disable=not progress, dynamic_ncols=True)
    for batch in loader:
        step = int(batch["step"])
        if step >= total:
            break
        lr = lr_at(step, cfg.lr, cfg.warmup, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images = preprocess(batch["images"].to(device, non_blocking=True), cfg.image_size)
        if nhwc:
            images = images.contiguous(memory_format=torch.channels_last)
        tokens = batch["tokens"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            local = torch.zeros((), device=device)
            if cfg.local_weight > 0:  # the tower's final map is needed for the windows: the forward in two parts
                fmap = cnn_feature_map(model.visual, images)
                img_f = F.normalize(model.visual.attnpool(fmap), dim=-1)
                txt_f = F.normalize(model.encode_text(tokens), dim=-1)
                scale = model.logit_scale.exp()
                local = local_loss(model.visual, fmap, txt_f, scale.float(), batch["masks"], batch["visible"],
                                   cfg.local_scales)
            else:
                img_f, txt_f, scale = model(images, tokens)
            loss = clip_loss(img_f.float(), txt_f.float(), scale.float()) + cfg.local_weight * local
            distill = torch.zeros((), device=device)
            if teacher is not None:
                named = batch["named"].to(device).repeat(2)  # clean images, then their twins
                distill = distill_loss(img_f, txt_f, teacher, images, tokens, named)
                loss = loss + cfg.distill_weight * distill
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        pending.append(torch.stack([loss.detach().float(), twin_accuracy(img_f.detach(), txt_f.detach(), batch["visible"]),
                                    local.detach().float(), distill.detach().float()]))
        bar.update(1)
        done = step + 1
        elapsed = time.time() - t0
        if done % cfg.log_every == 0 or done >= total or (budget_s and elapsed > budget_s):
            for loss_v, acc_v, local_v, distill_v in torch.stack(pending).cpu().tolist():
                losses.append(loss_v)
                accs.append(acc_v)
                locals_.append(local_v)
                distills.append(distill_v)
            pending.clear()
            k = cfg.log_every
            extra = {"local": round(float(np.mean(locals_[-k:])), 4)} if cfg.local_weight > 0 else {}
            if teacher is not None:
                extra["distill"] = round(float(np.mean(distills[-k:])), 5)
            log(json.dumps({"step": done, "loss": round(float(np.mean(losses[-k:])), 4), **extra,
                            "twin_acc": round(float(np.nanmean(accs[-k:])), 4), "lr": round(lr, 6),
                            "logit_scale": round(float(model.logit_scale.detach().exp()), 2), "elapsed_s": round(elapsed, 1),
                            "steps_per_s": round((done - start) / max(elapsed, 1e-6), 2)}))
        if budget_s and cfg.fit_to_budget and not fitted:
            # Measure speed once the loader is warm, then shorten the cosine to what the budget allows.
            if done - start == 5:
                probe = (done, elapsed)
            elif probe and done - start == 25:
                sec_per_step = (elapsed - probe[1]) / (done - probe[0])
                affordable = done + int(max(0.0, budget_s * 0.92 - elapsed) / sec_per_step)
                if affordable < total:
                    log(f"fit to budget: {sec_per_step * 1000:.1f} ms/step -> schedule shortened to {affordable} steps")
                    total = max(affordable, done + 1)
                    bar.total = total - start
                fitted = True
        if ckpt_path and (done % cfg.ckpt_every == 0):
            _save_ckpt(ckpt_path, model, optimizer, done, total, cfg)
        if budget_s and elapsed > budget_s and done < total:
            log(f"wall budget of {cfg.max_minutes} min reached at step {done}: stopping")
            stopped = True
            break
        if done >= total or (stop_after is not None and done >= stop_after):
            break
    bar.close()
    for loss_v, acc_v, _, _ in (torch.stack(pending).cpu().tolist() if pending else []):
        losses.append(loss_v)
        accs.append(acc_v)
    steps_done = step + 1 if losses else start
    if ckpt_path:
        _save_ckpt(ckpt_path, model, optimizer, steps_done, total, cfg)
    wall = time.time() - t0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    model = model.float().cpu().eval()
    return TrainResult(steps_done, total, losses, accs, wall, name, stopped, model=model)


def _load_published(model: nn.Module, cfg: TrainClipConfig, store_root: str | Path, name: str,
                    version: str | None) -> None:
    """Copy a published CLIP's (fp16) weights into `model`; the architectures must match exactly."""
    from safetensors.torch import load_file

    from ..clip_backend import CLIP_CONFIG_FILE, CLIP_WEIGHTS_FILE
    from ..cnn_tower import resize_attnpool
    from ..store import ModelStore

    folder, manifest = ModelStore(store_root).verify(name, version)
    stored = json.loads((folder / CLIP_CONFIG_FILE).read_text()).get("model_cfg")
    ours = model_config(cfg)
    # Another input size or tower is fine (same parameter shapes): the attention pool's grid is resized below.
    same = json.loads(json.dumps(stored))
    same["vision_cfg"]["image_size"] = ours["vision_cfg"]["image_size"]
    if same != ours:
        raise ValueError(f"{name}@{manifest['version']} has another model config than this run: {stored}")
    state = {k: v.float() for k, v in load_file(str(folder / manifest.get("weights", CLIP_WEIGHTS_FILE))).items()}
    key = "visual.attnpool.positional_embedding"
    target = model.state_dict()[key]
    if state[key].shape != target.shape:
        state[key] = resize_attnpool(state[key], int(round((target.shape[0] - 1) ** 0.5)))
    model.load_state_dict(state, strict=True)


def _save_ckpt(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, total: int,
               cfg: TrainClipConfig) -> None:
    _atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                  "total_steps": total, "model_cfg": model_config(cfg), "config": _jsonable(cfg)}, Path(path))


@torch.no_grad()
def modality_centres(model: nn.Module, cfg: TrainClipConfig, device: str | torch.device = "cpu",
                     batch: int = 256) -> tuple[dict[str, torch.Tensor], str]:
    """Mean normalised embeddings of unlabeled clean training-kind images and of training-style captions.

    Never computed from test data: both sets come from their own seed streams of the world.
    """
    from ..text_encoding import encode_prompts

    device = resolve_device(device) if isinstance(device, str) else device  # "auto" is a valid --device
    model = model.to(device).eval()
    images = clean_reference_images(cfg.centre_seed, cfg.centre_images, cfg.render_size, cfg.kinds)
    feats = []
    for i in range(0, len(images), batch):
        x = preprocess(torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).to(device), cfg.image_size)
        feats.append(F.normalize(model.encode_image(x).float(), dim=-1).cpu())
    texts = reference_captions(cfg.centre_seed, cfg.centre_captions, cfg.kinds,
                               CaptionConfig(random_word_prob=cfg.random_word_prob))
    txt = F.normalize(encode_prompts(model, CharTokenizer(cfg.context_length), texts, device), dim=-1)
    centres = {"image": torch.cat(feats).mean(0), "text": txt.mean(0)}
    reference = (
        f"image: mean of {cfg.centre_images} unlabeled clean renders of training kinds {list(cfg.kinds)} "
        f"(service.synthetic world, seed {cfg.centre_seed}, stream image-centre, {cfg.render_size} px); "
        f"text: mean of {cfg.centre_captions} training-style captions (seed {cfg.centre_seed}, stream text-centre). "
        "No test data."
    )
    model.cpu()
    return centres, reference


def publish(result: TrainResult, cfg: TrainClipConfig, store_root: str | Path, device: str = "cpu",
            log: Callable[[str], None] | None = None, init_from: str | None = None) -> str:
    """Compute the modality centres and publish the model (fp16 safetensors) as `cfg.out_name`.

    `init_from` ("name@version") records the published model this run started from, so the manifest tells the
    whole lineage (steps and wall time add up over it).
    """
    import open_clip

    from ..clip_backend import CLIP_WEIGHTS_FILE, save_store_clip
    from ..store import ModelStore

    log = log or (lambda msg: print(msg, file=sys.stderr))
    assert result.model is not None
    centres, reference = modality_centres(result.model, cfg, device)
    gap = float(F.cosine_similarity(centres["image"], centres["text"], dim=0))
    k = min(50, len(result.losses)) or 1
    extra = {
        "description": "in-house tiny CLIP trained from scratch on the synthetic factory world (service.synthetic)",
        "training": {
            "config": _jsonable(cfg),
            "init_from": init_from,
            "steps_done": result.steps_done,
            "total_steps": result.total_steps,
            "stopped_by_budget": result.stopped_by_budget,
            "wall_time_s": round(result.wall_time_s, 1),
            "device": result.device,
            "final_loss": round(float(np.mean(result.losses[-k:])), 4) if result.losses else None,
            "final_twin_acc": round(float(np.nanmean(result.twin_acc[-k:])), 4) if result.twin_acc else None,
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
        },
        "synthetic_world": {
            "render_size": cfg.render_size,
            "train_kinds": list(cfg.kinds),
            "random_kinds": list(WIDE_RANDOM_KINDS if cfg.wide else RANDOM_KINDS) if cfg.random_kind_prob > 0 else [],
            "wide_world": cfg.wide,
            "random_kind_prob": cfg.random_kind_prob,
            "held_out_kinds": list(HELD_OUT_KINDS),
            "defects": list(WIDE_DEFECTS if cfg.wide else DEFECTS),
        },
        "preprocess": {"resize": "bicubic", "image_size": cfg.image_size, "mean": CLIP_MEAN, "std": CLIP_STD},
        "modality_gap_cosine": round(gap, 4),
    }
    if cfg.tower:
        extra["tower"] = dict(cfg.tower)
    store = ModelStore(store_root)
    version = save_store_clip(store, cfg.out_name, result.model, model_config(cfg), tokenizer_spec(cfg), extra,
                              centres, reference, version=cfg.version)
    size_mb = (store.path(cfg.out_name, version) / CLIP_WEIGHTS_FILE).stat().st_size / 2**20
    log(f"published {cfg.out_name}@{version} to {store.root} ({size_mb:.1f} MB weights, image/text centre cosine {gap:.3f})")
    return version
