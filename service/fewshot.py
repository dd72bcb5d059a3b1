"""Few-normal-shot mode (WinCLIP+): a product's good parts become a visual reference memory.

The memory holds, for K normal reference images ("shots"), the embeddings the scoring needs: the window embeddings
at each scale, the grid cells' own tokens (`windows.Embeddings.patches`) and the global embeddings. A new image is
scored as anomalib's WinCLIP few-shot path (`winclip/torch_model.py`, the paper's eq. 4) does:

* visual association score of an embedding f against a bank R: min over r in R of (1 - cos(f, r)) / 2, in [0, 1];
* few-shot map [h, w]: the arithmetic mean over {the cells' association with the cell bank} and, per window scale,
  the harmonic per-cell aggregation (`aggregate.harmonic_patch_map`) of the windows' association with that scale's
  window bank;
* combination with the zero-shot path, for every registered score (s_fnn, s_pr, combined):
      map   = (zero-shot map + few-shot map) / 2
      image = (zero-shot image score + max of the few-shot map) / 2
  For s_pr without calibration this is WinCLIP+ exactly (tests/test_fewshot.py checks it against a slow reference of
  the same formulas to 1e-4); s_fnn and the calibrated scores are combined by the same rule, and `combined` stays
  the weighted mean of the two (the rule is linear).

CNN towers add a **dense bank** (not in anomalib's WinCLIP, which has ViTs only): the shots' mid-level feature map
(`windows.dense_features`: layer2, 3x3-averaged, channels pooled to 64, a finer grid than the final map), compared
as PatchCore compares patches, at most DENSE_MAX_ROWS rows (coreset). Its association d is put on the scale of the
good parts' own spread, tanh(d / (DENSE_SQUASH q)), where q is the 99th percentile of each shot's association with
the other shots (so it needs 2 or more shots; a one-shot memory has no dense bank). A memory records the squash it
was built with (`dense_squash`; memories stored before it was recorded were made with 2), so that its scores keep
agreeing with the thresholds fitted on them. Bank rows remember their cell, so the search can be limited to cells
within DENSE_RADIUS of the query cell's position (Chebyshev distance on the dense grid; every remaining cell when
the coreset or leave-one-out left none there). It is unlimited (inf): radius 2 won on the tuning kinds and lost
badly on the held-out ones (a rotated elongated part leaves its own cells), README "Few-shot mode". With a dense
bank the few-shot map is, on the dense grid,
      few-shot map = (WinCLIP+ few-shot map, bilinearly upsampled + tanh(d / (DENSE_SQUASH q))) / 2
and the zero-shot map is upsampled to that grid before the same combination rule. Chosen on the validation and seen
kinds (tuning seed, never the held-out kinds): README "Few-shot mode". Opt-in (`build_memory(dense=True)`, setting
`ZSAD_REFERENCE_DENSE=true`); without it the memory is WinCLIP+ exactly.

Size is bounded: each bank keeps at most `max_rows` rows; above that a greedy coreset (as PatchCore: repeatedly add
the row farthest from those kept) is kept, and the memory records that it did. Nearest-neighbour search runs on the
memory's device (the model's) in chunks that bound the similarity matrix. Every bank row remembers the shot it came
from, so a calibration can score a shot against the memory without its own rows (leave-one-out).

(De)serialisation is safetensors bytes with a small JSON header (`to_bytes` / `from_bytes`); where the bytes live is
`memory_store.py`'s business.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from .aggregate import harmonic_patch_map, upsample_map
from .memory_store import FORMAT, read_header
from .window_grid import window_indices

FORMAT_VERSION = 2  # 2: the header records dense_squash (so older code refuses a memory it would mis-score)
READABLE_FORMAT_VERSIONS = (1, 2)  # 1: made before the squash was recorded, read as LEGACY_DENSE_SQUASH
MAX_SIM_ELEMENTS = 1 << 24  # similarity entries computed at once by the nearest-neighbour search (64 MB in fp32)
DENSE_QUANTILE = 0.99  # the dense bank's scale: this quantile of the shots' leave-one-out association
DENSE_MAX_ROWS = 2048  # the dense bank's own cap (at most the memory's max_rows): benchmarks/fewshot_dense_cost.py
DENSE_RADIUS = math.inf  # dense cells around its own position a query cell is compared with (inf: all of them)
DENSE_SQUASH = 4.0  # the dense term is tanh(d / (DENSE_SQUASH * q)): 4 won over 2 (and 1) on the tuning worlds
LEGACY_DENSE_SQUASH = 2.0  # what memories stored before the squash was recorded were made (and calibrated) with

__all__ = ["ReferenceMemory", "ReferenceMemoryError", "incompatibility", "read_header", "build_memory",
           "greedy_coreset", "association", "dense_near", "dense_term", "few_shot_map", "combine_few_shot", "model_ref",
           "load_memory"]


class ReferenceMemoryError(ValueError):
    """A reference memory that cannot be built, read or used with this model."""


def model_ref(detector: Any) -> dict[str, str]:
    """What a memory is tied to: the FNN model, its version and the CLIP that made the embeddings."""
    return {"name": str(detector.name), "version": str(detector.version), "clip": detector.backend.spec.label()}


@dataclass
class ReferenceMemory:
    """Banks of unit-norm embeddings of K normal shots; `*_src` give each row's shot index (0..K-1).

    Unit rows are a contract, not a check: scoring skips normalising the banks (`association(unit_bank=True)`), and
    `build_memory` and `from_bytes` are the two ways in that guarantee it. Build a memory by hand with unit rows."""

    windows: dict[int, torch.Tensor]  # scale -> [M_s, D]
    window_src: dict[int, torch.Tensor]  # scale -> [M_s] long
    patches: torch.Tensor  # [M_p, P]
    patch_src: torch.Tensor  # [M_p] long
    global_emb: torch.Tensor  # [K, D]
    grid: tuple[int, int]
    stride: int
    shots: int
    model: dict[str, str]
    meta: dict[str, Any] = field(default_factory=dict)  # created_at, product, line, coreset, ...
    dense: torch.Tensor | None = None  # [M_d, C] CNN mid-level features of the shots (None: WinCLIP+ only)
    dense_src: torch.Tensor | None = None  # [M_d] long
    dense_grid: tuple[int, int] | None = None
    dense_scale: float | None = None  # q: the shots' leave-one-out association quantile (DENSE_QUANTILE)
    dense_pos: torch.Tensor | None = None  # [M_d] long: each dense row's cell (row-major); None: global search
    dense_squash: float | None = None  # DENSE_SQUASH when the memory was built: its thresholds were fitted with it

    @property
    def scales(self) -> tuple[int, ...]:
        return tuple(sorted(self.windows))

    @property
    def rows(self) -> dict[str, int]:
        dense = {"dense": int(self.dense.shape[0])} if self.dense is not None else {}
        return {"patches": int(self.patches.shape[0]), **{f"windows_{s}": int(w.shape[0]) for s, w in self.windows.items()},
                **dense}

    def to(self, device: torch.device | str) -> ReferenceMemory:
        return replace(self, windows={s: w.to(device) for s, w in self.windows.items()},
                       window_src={s: w.to(device) for s, w in self.window_src.items()},
                       patches=self.patches.to(device), patch_src=self.patch_src.to(device),
                       global_emb=self.global_emb.to(device),
                       dense=self.dense.to(device) if self.dense is not None else None,
                       dense_src=self.dense_src.to(device) if self.dense_src is not None else None,
                       dense_pos=self.dense_pos.to(device) if self.dense_pos is not None else None)

    def header(self) -> dict[str, Any]:
        """The JSON header stored with the tensors (and shown by the API): everything but the banks."""
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "shots": self.shots, "grid": list(self.grid),
                "scales": list(self.scales), "stride": self.stride, "model": dict(self.model), "rows": self.rows,
                "patch_dim": int(self.patches.shape[-1]), "embed_dim": int(self.global_emb.shape[-1]),
                "dense_grid": list(self.dense_grid) if self.dense_grid is not None else None,
                "dense_scale": self.dense_scale, "dense_squash": self.dense_squash, **self.meta}

    def incompatibility(self, model: Mapping[str, str], scales: Sequence[int], stride: int,
                        grid: tuple[int, int] | None = None) -> str | None:
        """Why this memory cannot score embeddings of `model` at these window settings (None: it can)."""
        return incompatibility(self.header(), model, scales, stride, grid)

    # --- serialisation ------------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        tensors = {"patches": self.patches, "patch_src": self.patch_src, "global": self.global_emb}
        for s in self.scales:
            tensors[f"w{s}"] = self.windows[s]
            tensors[f"w{s}_src"] = self.window_src[s]
        if self.dense is not None:
            tensors["dense"], tensors["dense_src"] = self.dense, self.dense_src
            if self.dense_pos is not None:
                tensors["dense_pos"] = self.dense_pos
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        return save(tensors, metadata={"zsad": json.dumps(self.header(), sort_keys=True)})

    @classmethod
    def from_bytes(cls, data: bytes) -> ReferenceMemory:
        """Parse and validate; anything malformed raises ReferenceMemoryError (never a half-usable memory)."""
        from safetensors.torch import load

        try:
            header = json.loads(_safetensors_metadata(data).get("zsad", "null"))
            tensors = load(data)
        except Exception as exc:  # noqa: BLE001 - a torn or foreign file is a clean error
            raise ReferenceMemoryError(f"not a readable reference memory ({type(exc).__name__}: {exc})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ReferenceMemoryError("not a zsad reference memory (no header)")
        if header.get("format_version") not in READABLE_FORMAT_VERSIONS:
            raise ReferenceMemoryError(f"reference memory format {header.get('format_version')} is not one of "
                                       f"{READABLE_FORMAT_VERSIONS}")
        try:
            scales = [int(s) for s in header["scales"]]
            # banks are unit rows (scoring relies on it, `association(unit_bank=True)`): made so here, once
            windows = {s: _unit_rows(tensors[f"w{s}"].float()) for s in scales}
            window_src = {s: tensors[f"w{s}_src"].long() for s in scales}
            patches, patch_src = _unit_rows(tensors["patches"].float()), tensors["patch_src"].long()
            glob = tensors["global"].float()
            shots = int(header["shots"])
            grid = (int(header["grid"][0]), int(header["grid"][1]))
            model = {k: str(v) for k, v in header["model"].items()}
            stride = int(header["stride"])
            dense, dense_src, dense_grid, dense_scale, dense_pos, dense_squash = None, None, None, None, None, None
            if header.get("dense_grid") is not None:
                dense, dense_src = _unit_rows(tensors["dense"].float()), tensors["dense_src"].long()
                dense_grid = (int(header["dense_grid"][0]), int(header["dense_grid"][1]))
                dense_scale = float(header["dense_scale"])
                dense_pos = tensors.get("dense_pos")  # older memories have none: their search is unlimited
                squash = header.get("dense_squash")  # format 1 has none: made (and calibrated) with 2
                dense_squash = float(LEGACY_DENSE_SQUASH if squash is None else squash)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise ReferenceMemoryError(f"reference memory is incomplete: {exc!r}") from None
        banks = [(patches, patch_src)] + [(windows[s], window_src[s]) for s in scales]
        if dense is not None:
            banks.append((dense, dense_src))
            if not math.isfinite(dense_scale) or dense_scale <= 0 or not math.isfinite(dense_squash) or dense_squash <= 0:
                raise ReferenceMemoryError("reference memory has a bad dense scale or squash")
        dims = {w.shape[-1] for w in windows.values()} | {glob.shape[-1]}
        if (shots < 1 or glob.shape[0] != shots or len(dims) != 1 or any(
                b.ndim != 2 or src.shape != (b.shape[0],) or b.shape[0] == 0 for b, src in banks)
                or any(int(src.min()) < 0 or int(src.max()) >= shots for _, src in banks)
                or not all(torch.isfinite(b).all() for b, _ in banks)):
            raise ReferenceMemoryError("reference memory tensors are inconsistent")
        if dense_pos is not None:
            if (dense_pos.dtype not in (torch.int32, torch.int64) or dense_pos.shape != dense_src.shape
                    or int(dense_pos.min()) < 0 or int(dense_pos.max()) >= dense_grid[0] * dense_grid[1]):
                raise ReferenceMemoryError("reference memory has bad dense cell positions")
            dense_pos = dense_pos.long()
        meta = {k: v for k, v in header.items() if k not in _HEADER_KEYS}
        return cls(windows, window_src, patches, patch_src, glob, grid, stride, shots, model, meta, dense, dense_src,
                   dense_grid, dense_scale, dense_pos, dense_squash)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as it is when its rows are unit vectors already (what `build_memory` stores: the bytes round-trip
    exactly), else normalised."""
    if x.ndim == 2 and x.shape[0] and bool(((x.norm(dim=-1) - 1).abs() <= 1e-5).all()):
        return x
    return F.normalize(x, dim=-1) if x.ndim >= 1 else x


_HEADER_KEYS = {"format", "format_version", "shots", "grid", "scales", "stride", "model", "rows", "patch_dim",
                "embed_dim", "dense_grid", "dense_scale", "dense_squash"}


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or n > len(data) - 8 or n > 100_000_000:
        raise ValueError("bad safetensors header length")
    return json.loads(data[8:8 + n]).get("__metadata__") or {}


def incompatibility(header: Mapping[str, Any], model: Mapping[str, str], scales: Sequence[int], stride: int,
                    grid: tuple[int, int] | None = None) -> str | None:
    """Why a memory with this header cannot score embeddings of `model` at these window settings (None: it can).

    A memory is tied to the FNN model name and version and the CLIP that made it: after a reload to another model
    it is stale (its embeddings live in another space, or were fitted against other scores)."""
    mine = header.get("model") or {}
    if tuple(mine.get(k) for k in ("name", "version", "clip")) != tuple(model.get(k) for k in ("name", "version", "clip")):
        return (f"made by model {mine.get('name')}@{mine.get('version')} (CLIP {mine.get('clip')}), the service runs "
                f"{model.get('name')}@{model.get('version')} (CLIP {model.get('clip')})")
    own_grid = tuple(header.get("grid") or (0, 0))
    side = min(grid) if grid is not None else min(own_grid)
    fitting = sorted(s for s in set(int(x) for x in scales) if s <= side)
    if fitting != sorted(header.get("scales") or []) or int(stride) != int(header.get("stride", -1)):
        return (f"made with window scales {header.get('scales')} stride {header.get('stride')}, the service uses "
                f"{fitting} stride {stride}")
    if grid is not None and tuple(grid) != own_grid:
        return f"made on a {own_grid[0]}x{own_grid[1]} grid, this input gives {grid[0]}x{grid[1]}"
    return None


# --- building ----------------------------------------------------------------------------------------------------
def greedy_coreset(x: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of `m` rows of x [N, D] chosen greedily, each the farthest (Euclidean) from those chosen so far,
    starting from row 0 (PatchCore's k-center greedy). Deterministic; returns all rows when m >= N."""
    n = x.shape[0]
    if m >= n:
        return torch.arange(n, device=x.device)
    x = x.float()
    chosen = torch.empty(m, dtype=torch.long, device=x.device)
    chosen[0] = 0
    dist = (x - x[0]).pow(2).sum(-1)
    for i in range(1, m):
        j = int(torch.argmax(dist))
        chosen[i] = j
        dist = torch.minimum(dist, (x - x[j]).pow(2).sum(-1))
    return chosen


def _bank(rows: list[torch.Tensor], max_rows: int, name: str, coreset: dict[str, Any]
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of all shots as one bank, each row's shot index, and which of the concatenated rows were kept."""
    bank = torch.cat(rows)
    src = torch.cat([torch.full((r.shape[0],), i, dtype=torch.long) for i, r in enumerate(rows)])
    keep = torch.arange(bank.shape[0])
    if bank.shape[0] > max_rows:
        keep = greedy_coreset(bank, max_rows).cpu()
        coreset[name] = {"rows_before": int(bank.shape[0]), "rows_after": int(max_rows)}
        bank, src = bank[keep], src[keep]
    return bank, src, keep


def build_memory(embs: Sequence[Any], model: Mapping[str, str], stride: int, max_rows: int,
                 meta: Mapping[str, Any] | None = None, dense: bool = False) -> ReferenceMemory:
    """A memory from `detector.embed(..., heatmap=True)` embeddings of K normal images (each with windows and
    patches). Banks above `max_rows` rows are reduced by `greedy_coreset`; `meta["coreset"]` says which.

    With `dense`, embeddings that carry dense features (CNN towers) and K >= 2 shots, the memory also gets the dense
    bank and its scale (module docstring); `meta["dense"]` says why it has none otherwise."""
    if not embs:
        raise ReferenceMemoryError("no reference images")
    if max_rows < 1:
        raise ReferenceMemoryError(f"max_rows must be >= 1, got {max_rows}")
    first = embs[0]
    if not first.windows or getattr(first, "patches", None) is None:
        raise ReferenceMemoryError("reference embeddings need windows and patch tokens (embed with heatmap=True, attnpool or "
                          "ViT windows)")
    scales = sorted(first.windows)
    for e in embs:
        if tuple(e.grid) != tuple(first.grid) or sorted(e.windows) != scales or e.patches is None:
            raise ReferenceMemoryError("reference images were embedded with different grids or window scales")
    coreset: dict[str, Any] = {}
    patches, patch_src, _ = _bank([F.normalize(e.patches.detach().float().cpu(), dim=-1) for e in embs], max_rows,
                                  "patches", coreset)
    windows, window_src = {}, {}
    for s in scales:
        windows[s], window_src[s], _ = _bank([F.normalize(e.windows[s].detach().float().cpu(), dim=-1) for e in embs],
                                             max_rows, f"windows_{s}", coreset)
    glob = torch.stack([F.normalize(e.global_emb.detach().float().cpu(), dim=-1) for e in embs])
    info = {**(meta or {}), "coreset": coreset, "max_rows": int(max_rows)}
    memory = ReferenceMemory(windows, window_src, patches, patch_src, glob, tuple(first.grid), int(stride), len(embs),
                             dict(model), info)
    has_dense = all(getattr(e, "dense", None) is not None for e in embs)
    if not dense or not has_dense:
        info["dense"] = "off" if not dense else "the embeddings have no dense features (not a CNN tower)"
    elif len(embs) < 2:
        info["dense"] = "needs 2 or more shots (its scale is the shots' association with one another)"
    else:
        if len({tuple(e.dense_grid) for e in embs}) != 1:
            raise ReferenceMemoryError("reference images were embedded with different dense grids")
        rows = [F.normalize(e.dense.detach().float().cpu(), dim=-1) for e in embs]
        memory.dense, memory.dense_src, keep = _bank(rows, min(max_rows, DENSE_MAX_ROWS), "dense", coreset)
        memory.dense_pos = torch.arange(rows[0].shape[0]).repeat(len(rows))[keep]
        memory.dense_grid = tuple(embs[0].dense_grid)
        own = association(torch.stack(rows), memory.dense, memory.dense_src, torch.arange(len(embs)),
                          near=dense_near(memory))
        memory.dense_scale = max(float(torch.quantile(own.flatten(), DENSE_QUANTILE)), 1e-6)
        memory.dense_squash = float(DENSE_SQUASH)  # read when built: the memory keeps it, with its thresholds
    return memory


# --- scoring -----------------------------------------------------------------------------------------------------
def dense_near(memory: ReferenceMemory, radius: float | None = None) -> torch.Tensor | None:
    """[n, M_d] bool: which dense bank rows each query cell may be compared with (within `radius` cells of it,
    default DENSE_RADIUS, Chebyshev distance on the dense grid). None (every row) for an unlimited radius or a memory
    without cell positions (made before they were kept)."""
    radius = DENSE_RADIUS if radius is None else radius
    if math.isinf(radius) or memory.dense_pos is None or memory.dense_grid is None:
        return None
    h, w = memory.dense_grid
    cells = torch.arange(h * w, device=memory.dense_pos.device)
    dy = (cells[:, None] // w - memory.dense_pos[None, :] // w).abs()
    dx = (cells[:, None] % w - memory.dense_pos[None, :] % w).abs()
    return (dy <= radius) & (dx <= radius)


def association(query: torch.Tensor, bank: torch.Tensor, bank_src: torch.Tensor | None = None,
                exclude: torch.Tensor | None = None, near: torch.Tensor | None = None,
                unit_bank: bool = False) -> torch.Tensor:
    """Visual association scores [B, n]: min over bank rows of (1 - cos) / 2 for queries [B, n, D].

    `exclude` [B] (shot index, or -1 for none) leaves out the bank rows of that shot for each query image
    (leave-one-out). `near` [n, M] (bool) limits query row i to the bank rows near[i] allows; a query row with none
    of them left falls back to every row. Runs on the bank's device in chunks of at most MAX_SIM_ELEMENTS similarities.
    `unit_bank`: the bank's rows are unit vectors already (a `ReferenceMemory`'s are), so they are not normalised
    again on every call.
    """
    b, n, _ = query.shape
    q = F.normalize(query.to(bank.device, torch.float32), dim=-1)
    bank = bank.float() if unit_bank else F.normalize(bank.float(), dim=-1)
    m = bank.shape[0]
    best = torch.full((b, n), -2.0, device=bank.device)
    if near is not None and tuple(near.shape) != (n, m):
        raise ValueError(f"near must be [{n}, {m}] (query rows x bank rows), got {tuple(near.shape)}")
    best_near = best.clone() if near is not None else None
    rows_per_chunk = max(1, MAX_SIM_ELEMENTS // max(1, b * n))
    for start in range(0, m, rows_per_chunk):
        sims = q @ bank[start:start + rows_per_chunk].T  # [B, n, c]
        if exclude is not None and bank_src is not None:
            own = bank_src[start:start + rows_per_chunk].to(bank.device)[None, :] == exclude.to(bank.device)[:, None]
            sims = sims.masked_fill(own[:, None, :], -2.0)
        best = torch.maximum(best, sims.amax(dim=-1))
        if best_near is not None:
            allowed = near[:, start:start + rows_per_chunk].to(bank.device)[None]
            best_near = torch.maximum(best_near, sims.masked_fill(~allowed, -2.0).amax(dim=-1))
    if best_near is not None:
        best = torch.where(best_near > -2.0, best_near, best)
    if bool((best <= -2.0).any()):
        raise ReferenceMemoryError("a query has no reference rows left to compare with (leave-one-out of a one-shot memory)")
    return (1.0 - best.clamp(-1.0, 1.0)) / 2.0


def dense_term(d: torch.Tensor, scale: float, squash: float) -> torch.Tensor:
    """The dense association d on the good parts' own spread q, squashed into [0, 1): tanh(d / (squash q)), with
    the memory's squash (DENSE_SQUASH when it was built). A larger squash keeps the term below saturation for more
    of the range (README "Few-shot mode")."""
    return torch.tanh(d / (squash * scale))


def few_shot_map(windows: Mapping[int, torch.Tensor], patches: torch.Tensor, memory: ReferenceMemory,
                 exclude: torch.Tensor | None = None, dense: torch.Tensor | None = None) -> torch.Tensor:
    """Few-shot map: the mean of the cells' association map and each scale's harmonic window map [B, h, w]; with a
    dense bank, averaged with the scaled dense association on the dense grid [B, h', w'] (module docstring).

    `windows[scale]` [B, n_windows, D] (in `window_grid.window_indices` order), `patches` [B, h*w, P] and `dense`
    [B, h'*w', C] of the query images, from the same model and window settings as the memory."""
    h, w = memory.grid
    b = patches.shape[0]
    maps = [association(patches, memory.patches, memory.patch_src, exclude, unit_bank=True).reshape(b, h, w)]
    for s in memory.scales:
        if s not in windows:
            raise ReferenceMemoryError(f"query embeddings lack window scale {s} of the memory")
        idx = window_indices(h, w, s, memory.stride)
        scores = association(windows[s], memory.windows[s], memory.window_src[s], exclude, unit_bank=True)
        maps.append(harmonic_patch_map(scores, idx, (h, w)))
    winclip = torch.stack(maps).mean(dim=0)
    if memory.dense is None:
        return winclip
    if dense is None:
        raise ReferenceMemoryError("the memory has a dense bank and the query embeddings have no dense features")
    dh, dw = memory.dense_grid
    if dense.shape[1] != dh * dw or dense.shape[-1] != memory.dense.shape[-1]:
        raise ReferenceMemoryError(f"the memory's dense bank is {dh}x{dw} cells of width {memory.dense.shape[-1]}, "
                                   f"the query's {dense.shape[1]} cells of width {dense.shape[-1]}")
    d = association(dense, memory.dense, memory.dense_src, exclude, near=dense_near(memory),
                    unit_bank=True).reshape(b, dh, dw)
    squash = memory.dense_squash if memory.dense_squash is not None else LEGACY_DENSE_SQUASH
    return (upsample_map(winclip, (dh, dw)) + dense_term(d, memory.dense_scale, squash)) / 2


def combine_few_shot(zero_image: torch.Tensor, zero_map: torch.Tensor, fs_map: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """WinCLIP+'s rule: image = (zero-shot image score + max few-shot map) / 2, map = (zero-shot + few-shot) / 2.
    A zero-shot map on a coarser grid than the few-shot map (a dense bank) is upsampled to it first."""
    fs_map = fs_map.to(zero_map.device)
    if zero_map.shape[-2:] != fs_map.shape[-2:]:
        zero_map = upsample_map(zero_map, tuple(fs_map.shape[-2:])).to(zero_map.dtype)
    image = (zero_image.double() + fs_map.amax(dim=(-2, -1)).to(zero_image.device).double()) / 2  # scores stay fp64
    return image, (zero_map + fs_map.to(zero_map.dtype)) / 2


def load_memory(store: Any, product: str, line: str | None = None) -> ReferenceMemory | None:
    """The memory `store` (a `memory_store.MemoryStore`) holds for `product` on `line` (else the product's), parsed;
    None when there is none. The CLI's `zsad score --product` reads memories through this."""
    stored = store.get(product, line)
    if stored is None:
        return None
    memory = ReferenceMemory.from_bytes(stored.data)
    memory.meta["stored_line"] = stored.line
    return memory
