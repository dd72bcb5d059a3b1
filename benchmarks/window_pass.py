"""CPU time of the CNN window pass (patches + global window + every window scale) per image, this code against the
two before it, in one run.

    python benchmarks/window_pass.py [--store model_store] [--name default] [--threads 2] [--reps 30] [--batch 1]
                                     [--fine-grid]

`current`: `windows.project_cells` once per image, then the global window and every scale in one masked attention
(`windows.cnn_windows`, what `embed_image_and_windows` runs). `gathered`: the path before it, kept here as a
baseline: the same cell projections, then per scale each window's keys and values gathered from its cells and one
attention call per scale. `previous`: the path before that: each call projected the keys and values of every cell
again, and each window its own query token through the q, k and v projections. All start from the same final
feature map of the shipped model (its CLIP, its window scales, at its input size), timed alternately; the maximum
difference of their window embeddings is printed too. `--fine-grid`: instead of the shipped model, an untrained
CLIP of the embedded architecture with the stride-8 tower (`cnn_tower.FINE_TOWER`, 96 px, a 12x12 map) and scales
(2, 4, 6), the setting where the masked attention's dense scores cost most (timing does not depend on the weights).
Ends with `RESULT name=window_pass ...`.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from service.detector import load_detector
from service.settings import Settings
from service.window_grid import window_indices
from service.windows import (
    _pos_for_grid,
    cnn_feature_map,
    cnn_patch_embeddings,
    cnn_windows,
    project_cells,
    window_membership,
)


def _gather_rows(n_windows: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(start, stop)
    return rows // n_windows, rows % n_windows  # image index, window index


def gathered_windows(visual, fmap: torch.Tensor, indices: torch.Tensor, chunk: int, cells) -> torch.Tensor:
    """The window pass before `cnn_windows`: per scale, each window's projected query averaged from its cells and its
    keys and values gathered, one attention call per chunk of windows."""
    pool = visual.attnpool
    b, c, h, w = fmap.shape
    heads, hd = pool.num_heads, c // pool.num_heads
    keys, values = cells.kv[..., :c], cells.kv[..., c:]
    n = indices.shape[0]
    out = []
    for start in range(0, b * n, max(1, chunk)):
        img, win = _gather_rows(n, start, min(b * n, start + max(1, chunk)))
        widx, rows = indices[win], img[:, None]
        qkv = cells.raw[rows, widx].mean(dim=1) + cells.pos[0]
        m = qkv.shape[0]
        q = qkv[:, :c].reshape(m, heads, 1, hd)
        kk = torch.cat([qkv[:, None, c:2 * c], keys[rows, widx]], dim=1).view(m, -1, heads, hd).transpose(1, 2)
        vv = torch.cat([qkv[:, None, 2 * c:], values[rows, widx]], dim=1).view(m, -1, heads, hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, kk, vv).reshape(m, c)
        out.append(F.linear(o, pool.c_proj.weight, pool.c_proj.bias))
    return torch.cat(out).reshape(b, n, -1)


def previous_windows(visual, fmap: torch.Tensor, indices: torch.Tensor, chunk: int) -> torch.Tensor:
    """The window pass before `project_cells`: keys/values of all cells per call, a q/k/v projection per window."""
    pool = visual.attnpool
    b, c, h, w = fmap.shape
    heads, hd = pool.num_heads, c // pool.num_heads
    cells_all = fmap.reshape(b, c, h * w).transpose(1, 2)
    pos = _pos_for_grid(pool.positional_embedding, (h, w)).to(fmap.dtype)
    keys = F.linear(cells_all + pos[1:], pool.k_proj.weight, pool.k_proj.bias)
    values = F.linear(cells_all + pos[1:], pool.v_proj.weight, pool.v_proj.bias)
    n = indices.shape[0]
    out = []
    for start in range(0, b * n, chunk):
        img, win = _gather_rows(n, start, min(b * n, start + chunk))
        widx, rows = indices[win], img[:, None]
        query = cells_all[rows, widx].mean(dim=1) + pos[0]
        m = query.shape[0]
        q = F.linear(query, pool.q_proj.weight, pool.q_proj.bias).view(m, heads, 1, hd)
        kq = F.linear(query, pool.k_proj.weight, pool.k_proj.bias)[:, None]
        vq = F.linear(query, pool.v_proj.weight, pool.v_proj.bias)[:, None]
        kk = torch.cat([kq, keys[rows, widx]], dim=1).view(m, -1, heads, hd).transpose(1, 2)
        vv = torch.cat([vq, values[rows, widx]], dim=1).view(m, -1, heads, hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, kk, vv).reshape(m, c)
        out.append(F.linear(o, pool.c_proj.weight, pool.c_proj.bias))
    return torch.cat(out).reshape(b, n, -1)


def previous_patches(visual, fmap: torch.Tensor) -> torch.Tensor:
    pool = visual.attnpool
    b, c, h, w = fmap.shape
    pos = _pos_for_grid(pool.positional_embedding, (h, w)).to(fmap.dtype)
    v = F.linear(fmap.reshape(b, c, h * w).transpose(1, 2) + pos[1:], pool.v_proj.weight, pool.v_proj.bias)
    return F.linear(v, pool.c_proj.weight, pool.c_proj.bias)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="model_store")
    ap.add_argument("--name", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--fine-grid", action="store_true", help="an untrained stride-8 tower (12x12 map), scales 2,4,6")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings(model_store=args.store, model_name=args.name, device="cpu", precision="fp32")
    chunk, stride = settings.window_chunk, settings.window_stride
    if args.fine_grid:
        from service.cnn_tower import FINE_TOWER
        from service.synthetic.train_clip import TrainClipConfig, build_model

        torch.manual_seed(0)
        visual, size, want, label = (build_model(TrainClipConfig(image_size=96, render_size=96, tower=FINE_TOWER))
                                     .eval().visual, 96, (2, 4, 6), "untrained-fine-grid")
    else:
        det = load_detector(settings)
        visual, size, want, label = (det.backend.model.visual, det.backend.image_size, det.window_scales,
                                     f"{det.name}@{det.version}")
    with torch.inference_mode():
        fmap = cnn_feature_map(visual, torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0)))
        h, w = fmap.shape[-2:]
        scales = [s for s in want if s <= min(h, w)]
        indices = {s: window_indices(h, w, s, stride) for s in scales}
        full = torch.arange(h * w).view(1, -1)

        sets = [full] + [indices[s] for s in scales]
        sizes = [int(i.shape[0]) for i in sets]

        def current():
            cells = project_cells(visual, fmap)
            member = window_membership(sets, (h, w))  # built per call, as embed_image_and_windows does
            pooled = cnn_windows(visual, fmap, member, chunk, cells)
            return [cnn_patch_embeddings(visual, fmap, cells), *pooled.split(sizes, dim=1)]

        def gathered():
            cells = project_cells(visual, fmap)
            out = [cnn_patch_embeddings(visual, fmap, cells), gathered_windows(visual, fmap, full, chunk, cells)]
            return out + [gathered_windows(visual, fmap, indices[s], chunk, cells) for s in scales]

        def previous():
            out = [previous_patches(visual, fmap), previous_windows(visual, fmap, full, chunk)]
            return out + [previous_windows(visual, fmap, indices[s], chunk) for s in scales]

        now = current()
        diff = max(float((a - b).abs().max()) for other in (previous(), gathered()) for a, b in zip(now, other))
        variants = (("current", current), ("gathered", gathered), ("previous", previous))
        times = {name: [] for name, _ in variants}
        for _ in range(3):
            current(), gathered(), previous()
        for _ in range(args.reps):
            for name, fn in variants:
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    p50 = {k: statistics.median(v) * 1000 / args.batch for k, v in times.items()}
    windows = sum(int(i.shape[0]) for i in indices.values())
    print(f"{label}: {h}x{w} grid, scales {scales} ({windows} windows + global + {h * w} patches), "
          f"batch {args.batch}, {args.threads} thread(s): previous {p50['previous']:.2f} ms/image, gathered "
          f"{p50['gathered']:.2f}, current {p50['current']:.2f} ms/image (x{p50['gathered'] / p50['current']:.2f} "
          f"over gathered); max |difference| {diff:.1e}")
    print(f"RESULT name=window_pass model={label} grid={h}x{w} batch={args.batch} "
          f"threads={args.threads} previous_ms={p50['previous']:.2f} gathered_ms={p50['gathered']:.2f} "
          f"current_ms={p50['current']:.2f} speedup={p50['previous'] / p50['current']:.1f} "
          f"speedup_over_gathered={p50['gathered'] / p50['current']:.2f} max_diff={diff:.1e}")


if __name__ == "__main__":
    main()
