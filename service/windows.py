"""Window embeddings for WinCLIP-style heatmaps, by token selection rather than cropping.

Why token selection: encoding every window as its own resized crop costs one full image pass per window (365 passes
for ViT-B-16-plus-240 at scales 2 and 3). Selecting tokens instead runs the patch embedding once and then sends each
window's few tokens (class token + its patches, each with its own positional embedding) through the transformer: the
whole map then costs about 12x the tokens of one image pass.

Two tower types are supported, both read straight from the open_clip modules (no forward hooks, no monkey-patching):

* ViT (`open_clip.transformer.VisionTransformer`): one pass of conv1 + class token + positional embedding + ln_pre
  gives tokens [B, 1+N, W]. Each window is `[cls, patches...]`, run through the model's blocks, then `ln_post` /
  pooling / `proj` exactly as the tower does. The block forward is our own but reuses the module weights and equals
  the module forward up to float rounding: the global sequence and every window of every scale share one token
  matrix per call (LayerNorm and linears are per token; attention per group with SDPA), and on CPU the linears are
  oneDNN calls with bias, GELU and the residual add fused and the weights pre-packed once. With class-token pooling
  the last block computes keys/values for all tokens and everything else for the class token only (about 6% fewer
  FLOPs, same result). Other blocks or pooling types fall back to the module's own forward.
* CNN (`open_clip.modified_resnet.ModifiedResNet`): the stem and layers run once to the final feature map
  [B, C, h, w]. Each window of cells is pooled through the model's own attention pool: a query token that is the
  mean of the window's cells plus the window's cells, with the matching slice of the pool's positional embedding
  (index 0 for the query, 1 + cell index for each cell), exactly as `AttentionPool2d.forward` treats the full map.
  A `crop` mode (crop the window's pixel box, resize to the model input, encode as an image) is kept as the
  reference approach.

Grids come from the model (patch size / total CNN stride) and the actual input size. When the input is larger than
the model's native size (e.g. a CNN run on an upsampled image to get a finer feature map), the positional embedding
grid is resized bicubically, as open_clip does when it loads weights for another resolution. At the native size
nothing is interpolated, and a window covering the whole grid reproduces `model.encode_image` exactly.

Every embedding returned by `embed_image_and_windows` has gone through `backend.finish_image`.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .cnn_tower import attnpool_first_token, cnn_stride
from .fast_transformer import block_forward, block_ok
from .timing import lap
from .window_grid import incidence_matrix, window_boxes, window_indices

if TYPE_CHECKING:  # pragma: no cover
    from .clip_backend import ClipBackend

CnnWindowMode = Literal["attnpool", "crop"]

CNN_STRIDE = 32  # every ModifiedResNet: stem conv1 (2) x stem avgpool (2) x layer2/3/4 (2 each)
DENSE_DIM = 64  # few-shot dense features' width (channel groups averaged): chosen for cost, benchmarks/fewshot_dense_cost.py

__all__ = [
    "Embeddings",
    "tower_kind",
    "feature_grid",
    "vit_tokens",
    "vit_encode_groups",
    "vit_embed",
    "cnn_feature_map",
    "cnn_feature_maps",
    "dense_features",
    "DENSE_DIM",
    "cnn_window_embeddings",
    "cnn_windows",
    "window_membership",
    "project_cells",
    "CellProjections",
    "cnn_patch_embeddings",
    "vit_encode_full",
    "crop_window_embeddings",
    "embed_image_and_windows",
]


# --- tower inspection ----------------------------------------------------------------------------------------------
def tower_kind(visual: nn.Module) -> Literal["vit", "cnn"]:
    """'vit' for open_clip VisionTransformer-like towers, 'cnn' for ModifiedResNet with an attention pool."""
    if hasattr(visual, "conv1") and hasattr(visual, "transformer") and hasattr(visual, "class_embedding"):
        return "vit"
    if hasattr(visual, "attnpool") and hasattr(visual, "layer4"):
        return "cnn"
    raise NotImplementedError(
        f"window embeddings support open_clip VisionTransformer and ModifiedResNet towers, not {type(visual).__name__}"
    )


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def feature_grid(visual: nn.Module, image_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the patch grid (ViT) or final feature map (CNN) for an input of `image_hw` pixels."""
    h, w = image_hw
    if tower_kind(visual) == "vit":
        ph, pw = _pair(visual.patch_size) if hasattr(visual, "patch_size") else _pair(visual.conv1.stride)
        return h // ph, w // pw
    stride = cnn_stride(visual) if hasattr(visual, "conv1") else CNN_STRIDE  # 8 for a finer tower (cnn_tower)
    return h // stride, w // stride


def _resize_grid_embed(grid_embed: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a [old_h*old_w, C] positional grid to [new_h*new_w, C] (computed in float32)."""
    if old == new:
        return grid_embed
    c = grid_embed.shape[-1]
    g = grid_embed.float().reshape(1, old[0], old[1], c).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=new, mode="bicubic", align_corners=False, antialias=True)
    return g.permute(0, 2, 3, 1).reshape(new[0] * new[1], c).to(grid_embed.dtype)


def _split_pos(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    side = int(round(math.sqrt(pos.shape[0] - 1)))
    if side * side != pos.shape[0] - 1:
        raise NotImplementedError("positional embeddings of non-square native grids are not supported")
    return pos[:1], pos[1:], (side, side)


def _pos_for_grid(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[1 + h*w, C] positional embedding for `grid`: the model's own at its native grid, bicubic-resized otherwise."""
    first, rest, native = _split_pos(pos)
    return torch.cat([first, _resize_grid_embed(rest, native, grid)], dim=0)


# --- ViT -------------------------------------------------------------------------------------------------------------
def vit_tokens(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Tokens [B, 1+N, W] after patch embedding, class token, positional embedding and ln_pre (no patch dropout)."""
    x = visual.conv1(pixels)  # [B, W, gh, gw]
    b, w, gh, gw = x.shape
    x = x.reshape(b, w, gh * gw).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, w).expand(b, 1, w)
    x = torch.cat([cls, x], dim=1)
    x = x + _pos_for_grid(visual.positional_embedding, (gh, gw)).to(x.dtype)
    return visual.ln_pre(x)


def _vit_pool_project(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled, projected features [N, D] from transformer output x [N, L, W], as the tower's own `_pool` + proj."""
    if getattr(visual, "attn_pool", None) is not None:
        raise NotImplementedError("ViT towers with an attentional pooler (CoCa) are not supported for windows")
    pool_type = getattr(visual, "pool_type", "tok")
    if pool_type not in ("tok", "avg"):
        raise NotImplementedError(f"ViT pool_type {pool_type!r} gives no single embedding per window")

    def pool(t: torch.Tensor) -> torch.Tensor:
        return t[:, 0] if pool_type == "tok" else t[:, 1:].mean(dim=1)

    if getattr(visual, "final_ln_after_pool", False):
        pooled = visual.ln_post(pool(x))
    elif pool_type == "tok":
        pooled = visual.ln_post(x[:, 0])  # LayerNorm is per token: normalising token 0 alone is the same
    else:
        pooled = pool(visual.ln_post(x))
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled


def vit_encode_groups(visual: nn.Module, groups: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Raw embeddings [n_g, D] for each group of token sequences [n_g, L_g, W] (class token first, after ln_pre).

    All groups go through each block together (one token matrix, see `_block_forward`), so window scales of
    different lengths and the global sequence share every matmul. Towers with non-standard blocks or pooling run
    the module's own blocks group by group.
    """
    blocks = visual.transformer.resblocks
    tok_pool = getattr(visual, "pool_type", "tok") == "tok" and getattr(visual, "attn_pool", None) is None
    if not all(block_ok(blk) for blk in blocks) or not tok_pool:
        outs = []
        for g in groups:
            x = g
            for blk in blocks:
                if block_ok(blk):
                    x = block_forward(blk, x.reshape(-1, x.shape[-1]), [(g.shape[0], g.shape[1])], False).view_as(g)
                else:
                    x = blk(x)
            outs.append(_vit_pool_project(visual, x))
        return outs
    shapes = [(int(g.shape[0]), int(g.shape[1])) for g in groups]
    x = torch.cat([g.reshape(-1, g.shape[-1]) for g in groups])
    for i, blk in enumerate(blocks):
        x = block_forward(blk, x, shapes, first_only=i == len(blocks) - 1)
    pooled = _vit_pool_project(visual, x[:, None])  # [sum n_g, D]: class tokens only
    return list(pooled.split([n for n, _ in shapes]))


def _vit_tokens_out(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patch tokens [n, L-1, W] of the transformer output x [n, L, W], as open_clip's `output_tokens` gives them
    (after `ln_post` unless the tower normalises after pooling; not projected, as WinCLIP's few-shot path uses them)."""
    if getattr(visual, "final_ln_after_pool", False):
        return x[:, 1:]
    return visual.ln_post(x[:, 1:])  # LayerNorm is per token


def vit_encode_full(visual: nn.Module, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw pooled embeddings [n, D] and patch tokens [n, L-1, W] of full sequences [n, L, W] (class token first).

    The last block runs on every token (not only the class token), so the patch tokens come out of the same pass
    that gives the global embedding: what `encode_image` with `output_tokens` computes, without hooks.
    """
    x = seqs
    n, length, width = seqs.shape
    for blk in visual.transformer.resblocks:
        x = block_forward(blk, x.reshape(-1, width), [(n, length)], False).view(n, length, width) if block_ok(blk) \
            else blk(x)
    return _vit_pool_project(visual, x), _vit_tokens_out(visual, x)


def _sequence_index(n_patches: int, indices: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """[n, L] positions into the [1+N] token axis: class token (0) then the window's patches (or all patches)."""
    if indices is None:
        return torch.arange(n_patches + 1, device=device)[None]
    idx = indices.to(device)
    return torch.cat([torch.zeros(idx.shape[0], 1, dtype=torch.long, device=device), idx + 1], dim=1)


def vit_embed(
    visual: nn.Module, tokens: torch.Tensor, indices: dict[int, torch.Tensor], chunk: int, with_global: bool = True,
    patches: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
    """Raw global [B, D] and window embeddings {scale: [B, n_windows, D]} from ViT tokens [B, 1+N, W].

    Every sequence (each image's global sequence, then each scale's windows, image-major) is cut into calls of at
    most `chunk` sequences; each call sends all its groups through the transformer together. When `patches` is a
    list, the global sequences run as their own full pass instead and their patch tokens [B, N, W] are appended to it.
    """
    b, n_tok, _ = tokens.shape
    full_pass = with_global and patches is not None
    plan: list[tuple[int | None, torch.Tensor]] = ([(None, _sequence_index(n_tok - 1, None, tokens.device))]
                                                   if with_global and not full_pass else [])
    plan += [(s, _sequence_index(n_tok - 1, idx, tokens.device)) for s, idx in indices.items()]
    results: dict[int | None, list[torch.Tensor]] = {key: [] for key, _ in plan}
    pending: list[tuple[int | None, torch.Tensor]] = []
    budget = max(1, chunk)

    def flush() -> None:
        if pending:
            outs = vit_encode_groups(visual, [seqs for _, seqs in pending])
            for (key, _), out in zip(pending, outs):
                results[key].append(out)
            pending.clear()

    left = budget  # walk the concatenated sequence list in calls of `chunk` sequences that may span groups
    for key, seq_idx in plan:
        n = seq_idx.shape[0]
        start = 0
        while start < b * n:
            stop = min(b * n, start + left)
            rows = torch.arange(start, stop, device=tokens.device)
            pending.append((key, tokens[(rows // n)[:, None], seq_idx[rows % n]]))
            left -= stop - start
            start = stop
            if left == 0:
                flush()
                left = budget
    flush()
    if full_pass:
        pooled, toks = zip(*(vit_encode_full(visual, tokens[i : i + budget]) for i in range(0, b, budget)))
        results[None] = list(pooled)
        patches.append(torch.cat(toks))
    glob = torch.cat(results[None]) if with_global else None
    windows = {s: torch.cat(results[s]).reshape(b, indices[s].shape[0], -1) for s in indices}
    return glob, windows


# --- CNN -------------------------------------------------------------------------------------------------------------
def cnn_feature_map(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Final ModifiedResNet feature map [B, C, h, w] (stem + layer1..4), before the attention pool."""
    return cnn_feature_maps(visual, pixels)[1]


def cnn_feature_maps(visual: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(`layer2`'s output, the final map) of a ModifiedResNet: one pass, the mid-level map kept on the way.

    The mid-level map is what PatchCore compares between images (`dense_features`): local structure at a finer
    grid than the final map, before the tower becomes specific to the joint embedding space."""
    from .preprocess import cnn_layout

    x = visual.stem(cnn_layout(pixels, visual))
    x = visual.layer1(x)
    mid = visual.layer2(x)
    x = visual.layer3(mid)
    return mid, visual.layer4(x)


def dense_features(mid: torch.Tensor, width: int = DENSE_DIM) -> tuple[torch.Tensor, tuple[int, int]]:
    """Few-shot dense features [B, h*w, min(C, width)] (float32, unit norm) of a mid-level map [B, C, h, w], and its
    grid.

    Each cell is averaged with its 3x3 neighbourhood first (PatchCore's local aggregation), so that a feature
    describes a small patch of the part rather than one cell, and a shift by a cell changes it little. Channels are
    then averaged in groups down to `width` (PatchCore's adaptive pooling of the feature dimension): the nearest-
    neighbour search is the cost of the dense bank. Both are averages, so when `width` divides C the channels are
    averaged first, and the 3x3 average runs on `width` channels instead of C (the same result, a quarter of the work
    on the embedded model)."""
    b, c, h, w = mid.shape
    x = mid.float()
    if c > width and c % width == 0:
        x, c = x.reshape(b, width, c // width, h, w).mean(dim=2), width
    x = F.avg_pool2d(x, 3, stride=1, padding=1)
    rows = x.reshape(b, c, h * w).transpose(1, 2)
    if c > width:
        rows = F.adaptive_avg_pool1d(rows.reshape(b * h * w, 1, c), width).reshape(b, h * w, width)
    return F.normalize(rows, dim=-1), (h, w)


def _attnpool_sequences(pool: nn.Module, cells: torch.Tensor, pos_q: torch.Tensor, pos_cells: torch.Tensor) -> torch.Tensor:
    """Attention-pool output [N, D] for cell sets [N, K, C] with positional slices pos_q [C], pos_cells [N, K, C].

    As `AttentionPool2d.forward`: the sequence is [mean(cells), cells] + positional embedding, multi-head attention
    with the pool's q/k/v/c projections, output at the query position. Only that position is computed.
    """
    n, k, c = cells.shape
    heads = pool.num_heads
    hd = c // heads
    query = cells.mean(dim=1) + pos_q  # [N, C]
    seq = torch.cat([query[:, None], cells + pos_cells], dim=1)  # [N, 1+K, C]
    # The projections are called as modules (the same F.linear for nn.Linear) so a quantised pool runs here too.
    q = pool.q_proj(query).view(n, heads, 1, hd)
    kk = pool.k_proj(seq).view(n, 1 + k, heads, hd).transpose(1, 2)
    vv = pool.v_proj(seq).view(n, 1 + k, heads, hd).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, kk, vv).reshape(n, c)
    return pool.c_proj(o)


@dataclass
class CellProjections:
    """A feature map's cells through the attention pool's query/key/value weights, once per image.

    The pool's projections are linear, so the projection of a window's query token (the mean of its cells plus the
    query's positional row) is the mean of its cells' projections plus the projected positional row: no window needs
    a projection of its own. `raw` holds the cells alone (no position, no bias), `pos` the positional rows with the
    biases; a cell's key is raw[k] + pos[1 + cell][k], a window's query raw[window].mean() + pos[0]."""

    raw: torch.Tensor  # [B, h*w, 3C]: q | k | v of each cell, no bias, no position
    pos: torch.Tensor  # [1 + h*w, 3C]: q | k | v of each positional row, plus the biases
    kv: torch.Tensor  # [B, h*w, 2C]: each cell's key | value as a sequence token (raw + its positional row)


def _projected_positions(pool: nn.Module, grid: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The pool's positional rows for `grid` through the stacked q/k/v projections, biases included [1 + h*w, 3C].

    They depend on the weights only, so they are cached on the pool: for one image they were half of the window
    pass's projection work. The key holds every weight's storage and version counter, so weights changed in place
    are never served stale rows (weights without a version counter, made under inference mode, are not cached).
    Nor are rows that carry a gradient (training): rows made without one would cut the positional embedding and the
    biases off the graph, and rows made with one would keep a step's graph alive on the module."""
    params = (pool.q_proj.weight, pool.k_proj.weight, pool.v_proj.weight, pool.q_proj.bias, pool.k_proj.bias,
              pool.v_proj.bias, pool.positional_embedding)
    try:
        key = (grid, dtype, params[0].device, torch.is_autocast_enabled(params[0].device.type),
               tuple((t.data_ptr(), t._version) for t in params))
    except RuntimeError:
        key = None
    if torch.is_grad_enabled() and any(t.requires_grad for t in params):
        key = None
    cached = pool.__dict__.get("_zsad_positions")
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    pos = _pos_for_grid(pool.positional_embedding, grid).to(dtype)
    rows = torch.cat([F.linear(pos, w, b) for w, b in zip(params[:3], params[3:6])], dim=-1)
    if key is not None:
        pool.__dict__["_zsad_positions"] = (key, rows)
    return rows


def project_cells(visual: nn.Module, fmap: torch.Tensor) -> CellProjections:
    """`CellProjections` of a final feature map [B, C, h, w]: every cell through the q, k and v weights once."""
    pool = visual.attnpool
    b, c, h, w = fmap.shape
    cells = fmap.reshape(b, c, h * w).transpose(1, 2)  # [B, h*w, C]
    raw = torch.cat([F.linear(cells, proj.weight) for proj in (pool.q_proj, pool.k_proj, pool.v_proj)], dim=-1)
    pos = _projected_positions(pool, (h, w), fmap.dtype)
    return CellProjections(raw=raw, pos=pos, kv=raw[..., c:] + pos[1:, c:])  # keys/values once, for every scale


def window_membership(indices: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """[n, h*w] float 0/1: which cells each window holds, for the windows of every index set [n_s, K_s] in turn
    (window sizes may differ: the global window, then each scale). The aggregation's incidence matrices, stacked."""
    return torch.cat([incidence_matrix(grid[0], grid[1], i.long().cpu()).T for i in indices])


def cnn_windows(visual: nn.Module, fmap: torch.Tensor, member: torch.Tensor, chunk: int,
                cells: CellProjections | None = None) -> torch.Tensor:
    """Raw window embeddings [B, n, D] pooling each window's cells of `fmap` [B, C, h, w] via `attnpool`, the
    windows given by their cells `member` [n, h*w] (`window_membership`): all scales and the global window at once.

    Equal to `_attnpool_sequences` per window up to float rounding (tested), for a fraction of its work. Every cell is
    projected once per image (`project_cells`, shared with the patches); a window's query token is the mean of its
    cells, so its projected q, k and v are the sum over `member`'s cells of their projections (one matmul for every
    window) divided by the count. Each window query then attends to its own token and to every cell, the cells
    outside the window masked out: dense [n, h*w] scores per head instead of a gather of each window's keys and
    values, and one output projection for all windows. That is about 5 C (h*w) n multiply-adds beside the cells'
    3 C^2 (h*w) projection: on the 6x6 map (78 windows) and on a 12x12 map with scales (2, 4, 6) it measured faster
    than gathering per scale (docs/service.md). At most `chunk` (image, window) pairs are pooled at once: images
    `chunk // n` at a time, or windows `chunk` at a time within an image when n > chunk.
    """
    pool = visual.attnpool
    b, c, h, w = fmap.shape
    heads = pool.num_heads
    hd = c // heads
    cells = cells if cells is not None else project_cells(visual, fmap)
    n = member.shape[0]
    member = member.to(fmap.device, cells.raw.dtype)  # 0/1: exact in any float type
    count = member.sum(dim=1, keepdim=True)
    chunk = max(1, chunk)
    img_step, win_step = (max(1, chunk // n), n) if n <= chunk else (1, chunk)
    out: list[torch.Tensor] = []
    for i in range(0, b, img_step):
        raw, kv = cells.raw[i:i + img_step], cells.kv[i:i + img_step]
        m = raw.shape[0]
        keys = kv[..., :c].reshape(m, h * w, heads, hd).transpose(1, 2)  # [m, H, h*w, hd]
        values = kv[..., c:].reshape(m, h * w, heads, hd).transpose(1, 2)
        parts = []
        for j in range(0, n, win_step):
            sub, cnt = member[j:j + win_step], count[j:j + win_step]
            k = sub.shape[0]
            tok = torch.matmul(sub, raw) / cnt + cells.pos[0]  # [m, k, 3C]: each window's query token, projected
            q = tok[..., :c].reshape(m, k, heads, hd).transpose(1, 2) * hd ** -0.5  # [m, H, k, hd]
            own_k = tok[..., c:2 * c].reshape(m, k, heads, hd).transpose(1, 2)
            own_v = tok[..., 2 * c:].reshape(m, k, heads, hd).transpose(1, 2)
            outside = (sub == 0)[None, None]  # [1, 1, k, h*w]
            scores = torch.cat([(q * own_k).sum(dim=-1, keepdim=True),
                                torch.matmul(q, keys.transpose(-1, -2)).masked_fill(outside, float("-inf"))], dim=-1)
            attn = scores.float().softmax(dim=-1).to(q.dtype)  # [m, H, k, 1 + h*w]
            o = attn[..., :1] * own_v + torch.matmul(attn[..., 1:], values)  # [m, H, k, hd]
            parts.append(F.linear(o.transpose(1, 2).reshape(m, k, c), pool.c_proj.weight, pool.c_proj.bias))
        out.append(torch.cat(parts, dim=1))
    return torch.cat(out)


def cnn_window_embeddings(visual: nn.Module, fmap: torch.Tensor, indices: torch.Tensor, chunk: int,
                          cells: CellProjections | None = None) -> torch.Tensor:
    """Raw window embeddings [B, n_windows, D] of one index set [n_windows, K] (`window_grid.window_indices`):
    `cnn_windows` for those windows."""
    h, w = fmap.shape[-2:]
    return cnn_windows(visual, fmap, window_membership([indices], (h, w)), chunk, cells)


def cnn_patch_embeddings(visual: nn.Module, fmap: torch.Tensor, cells: CellProjections | None = None) -> torch.Tensor:
    """Raw patch embeddings [B, h*w, D] of a final feature map [B, C, h, w]: each cell (plus its positional slice)
    through the attention pool's value and output projections, the dense value path of the pool (as MaskCLIP reads
    dense CLIP features from a ResNet). It is what the pool returns for a cell that attends only to itself."""
    pool = visual.attnpool
    c = fmap.shape[1]
    cells = cells if cells is not None else project_cells(visual, fmap)
    return F.linear(cells.kv[..., c:], pool.c_proj.weight, pool.c_proj.bias)


# --- crop mode (any tower) ---------------------------------------------------------------------------------------------
def crop_window_embeddings(
    model: nn.Module,
    pixels: torch.Tensor,
    boxes: torch.Tensor,
    grid: tuple[int, int],
    image_size: int,
    chunk: int,
) -> torch.Tensor:
    """Raw embeddings [B, n, D] of windows cropped from `pixels` and encoded as whole images.

    Window (row0, col0, row1, col1) in cells maps to the pixel box of those cells (cell = input size / grid);
    the crop is resized to `image_size` (bicubic, antialias) and sent through `model.encode_image`. This is the
    slow reference approach (one full image pass per window); `chunk // 8` crops (at least 1) go per call.
    """
    b, _, hp, wp = pixels.shape
    ch, cw = hp / grid[0], wp / grid[1]
    per_call = max(1, chunk // 8)
    pending: list[torch.Tensor] = []
    out: list[torch.Tensor] = []

    def flush() -> None:
        if pending:
            out.append(model.encode_image(torch.cat(pending, dim=0)))
            pending.clear()

    for i in range(b):
        for r0, c0, r1, c1 in boxes.tolist():
            y0, y1 = int(round(r0 * ch)), int(round(r1 * ch))
            x0, x1 = int(round(c0 * cw)), int(round(c1 * cw))
            crop = pixels[i : i + 1, :, y0:y1, x0:x1]
            if crop.shape[-2:] != (image_size, image_size):
                crop = F.interpolate(crop.float(), size=(image_size, image_size), mode="bicubic", align_corners=False,
                                     antialias=True).to(pixels.dtype)
            pending.append(crop)
            if len(pending) >= per_call:
                flush()
    flush()
    return torch.cat(out, dim=0).reshape(b, boxes.shape[0], -1)


# --- entry point -----------------------------------------------------------------------------------------------------------
@dataclass
class Embeddings:
    """Global and window embeddings of a batch, all through `backend.finish_image` (float32, unit norm).

    `windows[scale]` is [B, n_windows, D] in the order of `indices[scale]` ([n_windows, scale*scale] patch indices,
    row-major over the `grid`). Scales larger than the grid are left out (they would be a single whole-image
    window at best).

    `patches` [B, h*w, P] are the grid cells' own tokens, L2-normalised and not centred (ViT: the transformer's
    width after `ln_post`, P = W, as WinCLIP's few-shot path compares them; CNN: the attention pool's value path, in
    the joint space): what the few-shot memory compares cell by cell (`fewshot.py`). None in crop mode.
    `dense` [B, h'*w', C] (CNN towers in attnpool mode, when asked) are mid-level features on the finer `dense_grid`
    (`dense_features`), the few-shot memory's dense bank.
    `view_globals` [V*B, D] are the global embeddings of further views passed as `extra_views` (CNN towers in
    attnpool mode; None otherwise), in the order given.
    """

    global_emb: torch.Tensor
    windows: dict[int, torch.Tensor]
    grid: tuple[int, int]
    indices: dict[int, torch.Tensor] = field(default_factory=dict)
    patches: torch.Tensor | None = None
    dense: torch.Tensor | None = None  # [B, h'*w', C] CNN mid-level features (`dense_features`); None otherwise
    dense_grid: tuple[int, int] | None = None
    view_globals: torch.Tensor | None = None  # [V*B, D] global embeddings of `extra_views` (CNN attnpool mode)


@torch.inference_mode()
def embed_image_and_windows(
    backend: ClipBackend,
    pixels: torch.Tensor,
    scales: Sequence[int] = (2, 3),
    stride: int = 1,
    chunk: int = 1024,
    cnn_mode: CnnWindowMode = "attnpool",
    timings: dict[str, float] | None = None,
    global_pixels: torch.Tensor | None = None,
    dense: bool = False,
    extra_views: torch.Tensor | None = None,
) -> Embeddings:
    """Global + window embeddings of preprocessed `pixels` [B, 3, H, W] (H, W multiples of the patch / CNN stride).

    ViT: token selection (one patch-embedding pass, one batched transformer call per scale, `chunk` sequences per
    call at most). CNN: `cnn_mode="attnpool"` pools feature-map windows through the attention pool (one backbone
    pass); `"crop"` crops each window's pixels, resizes them to the model input and encodes them as images.

    The global embedding is the whole grid pooled like a window (equal to `encode_image` at the native size). When
    `pixels` is an upsampled copy (for a finer CNN grid), pass the native-size image as `global_pixels` to take the
    global embedding from `encode_image` on it instead. `timings`, when given, accumulates seconds per stage.
    `dense` (CNN attnpool mode): also the mid-level features of the few-shot dense bank, only made when asked.
    `extra_views` [V*B, 3, H, W] (CNN attnpool mode; ignored otherwise): further images, e.g. the test-time views,
    that share the backbone pass and get only a global embedding (`view_globals`): one forward of B(1 + V) images
    costs less than a forward of B and another of V*B (batch 1 runs the convolutions least efficiently).
    """
    if cnn_mode not in ("attnpool", "crop"):
        raise ValueError(f"unknown cnn window mode {cnn_mode!r} (use 'attnpool' or 'crop')")
    model = backend.model
    visual = model.visual
    x = pixels.to(backend.device, backend.dtype)
    kind = tower_kind(visual)
    grid = feature_grid(visual, (x.shape[-2], x.shape[-1]))
    fitting = [s for s in dict.fromkeys(int(s) for s in scales) if s <= min(grid)]
    indices = {s: window_indices(grid[0], grid[1], s, stride) for s in fitting}
    raw: dict[int, torch.Tensor] = {}
    timings = timings if timings is not None else {}
    t0 = time.perf_counter()
    own_global = global_pixels is None
    glob = torch.empty(0)
    view_globals = None
    patch_out: list[torch.Tensor] = []
    want_dense, dense, dense_grid = dense, None, None
    if kind == "vit":
        tokens = vit_tokens(visual, x)
        t0 = lap(timings, "embed", t0)
        vit_glob, raw = vit_embed(visual, tokens, indices, chunk, with_global=own_global,
                                  patches=patch_out if own_global else None)
        if vit_glob is not None:
            glob = vit_glob
    elif cnn_mode == "attnpool":
        b = x.shape[0]
        if extra_views is not None:
            mid, fmap = cnn_feature_maps(visual, torch.cat([x, extra_views.to(x.device, x.dtype)]))
            view_globals = backend.finish_image(attnpool_first_token(visual.attnpool, fmap[b:]))
            mid, fmap = mid[:b], fmap[:b]
        else:
            mid, fmap = cnn_feature_maps(visual, x)
        if want_dense:
            dense, dense_grid = dense_features(mid)
        cells = project_cells(visual, fmap)  # once for the patches, the global and every scale
        patch_out.append(cnn_patch_embeddings(visual, fmap, cells))
        # the global window (every cell, when this pass makes the global embedding) and every scale in one pooling
        sets = ([torch.arange(grid[0] * grid[1]).view(1, -1)] if own_global else []) + [indices[s] for s in fitting]
        t0 = lap(timings, "embed", t0)
        pooled = cnn_windows(visual, fmap, window_membership(sets, grid), chunk, cells) if sets else None
        if own_global:
            glob = pooled[:, 0]
        start = 1 if own_global else 0
        for s in fitting:
            raw[s] = pooled[:, start:start + indices[s].shape[0]]
            start += indices[s].shape[0]
    else:  # crop
        size = backend.image_size
        whole = x if x.shape[-2:] == (size, size) else F.interpolate(
            x.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True).to(x.dtype)
        if own_global:
            glob = model.encode_image(whole)
        t0 = lap(timings, "embed", t0)
        for s in fitting:
            raw[s] = crop_window_embeddings(model, x, window_boxes(grid[0], grid[1], s, stride), grid, size, chunk)
    if not own_global:
        gp = global_pixels.to(backend.device, backend.dtype)
        glob = torch.cat([model.encode_image(gp[i : i + chunk]) for i in range(0, gp.shape[0], chunk)])
    windows = {s: backend.finish_image(r.reshape(-1, r.shape[-1])).reshape(r.shape[0], r.shape[1], -1) for s, r in raw.items()}
    lap(timings, "windows", t0)
    patches = F.normalize(patch_out[0].float(), dim=-1) if patch_out else None
    return Embeddings(global_emb=backend.finish_image(glob), windows=windows, grid=grid, indices=indices,
                      patches=patches, dense=dense, dense_grid=dense_grid, view_globals=view_globals)

