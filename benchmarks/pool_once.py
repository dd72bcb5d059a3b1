"""Benchmark: the attention pool's outputs of a window pass with each pool weight read once (`cnn_pool_outputs`),
against the separate calls it replaced (the baseline, kept here), in one run.

The baseline projected the image's cells (q, k, v), then applied the output projection once for the patches, once
for the global window and once per window scale, and pooled the test-time views through `attnpool_first_token`
(k, v, q and the output projection again): 12 reads of the pool's weights, which are 3.3 M of the embedded model's
6.0 M parameters. `cnn_pool_outputs` projects every image's cells together and applies one output projection to all
rows: 4 reads. Measured on the shipped model, wall p50 with `--threads` torch threads, variants interleaved:

* `pool`: the pool stage alone on one request's final map (1 image + its 3 views);
* `heatmap`: `Detector.detect(heatmap=True)`, one image;
* `few_shot`: `Detector.detect(heatmap=False, memory=...)` with a 16-shot dense memory, one image, and its ratio to
  the zero-shot request without heatmap (`benchmarks/fewshot.py`'s cost ratio).

Both variants must give the same embeddings (max difference printed). Ends with `RESULT name=pool_once ...`.

Usage: .venv/bin/python benchmarks/pool_once.py [--store model_store] [--repeats 40] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _product_sets import write_set

import service.windows as windows
from service.cnn_tower import attnpool_first_token
from service.detector import load_detector
from service.evaluation.readers import list_images
from service.fewshot import build_memory, model_ref
from service.preprocess import load_image
from service.settings import Settings
from service.tta import dihedral_views

CURRENT = windows.cnn_pool_outputs


def previous(visual, fmap, b, indices, chunk, with_global=True) -> windows.PoolOutputs:
    """The window pass's pool stage before `cnn_pool_outputs`: one call per output kind."""
    mine = fmap[:b]
    cells = windows.project_cells(visual, mine)
    patches = windows.cnn_patch_embeddings(visual, mine, cells)
    full = torch.arange(mine.shape[-2] * mine.shape[-1]).view(1, -1)
    glob = windows.cnn_window_embeddings(visual, mine, full, chunk, cells)[:, 0] if with_global else None
    wins = {s: windows.cnn_window_embeddings(visual, mine, idx, chunk, cells) for s, idx in indices.items()}
    views = attnpool_first_token(visual.attnpool, fmap[b:]) if fmap.shape[0] > b else None
    return windows.PoolOutputs(patches=patches, windows=wins, global_emb=glob, view_globals=views)


def p50(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default=str(REPO / "model_store"))
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    det = load_detector(Settings(model_store=Path(args.store), device="cpu", reference_dense=True))
    visual = det.backend.model.visual
    with tempfile.TemporaryDirectory() as tmp:
        write_set(Path(tmp), "product", ("hex_nut",), 20261126, 16, 1, 0)
        train = [load_image(p) for p in sorted(list_images(Path(tmp) / "hex_nut" / "train" / "good"))]
        query = [load_image(sorted(list_images(Path(tmp) / "hex_nut" / "test" / "good"))[0])]
    memory = build_memory(det.embed(train, heatmap=True), model_ref(det), det.settings.window_stride,
                          det.settings.reference_max_rows, dense=True)

    pixels, _ = det._pixels(query)
    x = pixels.to(det.backend.device, det.backend.dtype)
    with torch.inference_mode():
        fmap = windows.cnn_feature_map(visual, torch.cat(dihedral_views(x, det.tta_views)))  # 1 image, its views
        grid = fmap.shape[-2:]
        indices = {s: windows.window_indices(grid[0], grid[1], s, det.settings.window_stride)
                   for s in det.window_scales if s <= min(grid)}
        a, b = (f(visual, fmap, 1, indices, det.settings.window_chunk) for f in (previous, CURRENT))
    diff = max(float((x - y).abs().max()) for x, y in [(a.patches, b.patches), (a.global_emb, b.global_emb),
                                                          (a.view_globals, b.view_globals),
                                                          *[(a.windows[s], b.windows[s]) for s in indices]])

    @torch.inference_mode()
    def pool_stage() -> None:
        windows.cnn_pool_outputs(visual, fmap, 1, indices, det.settings.window_chunk)  # the variant swapped in

    variants = {"previous": previous, "current": CURRENT}
    cases = {"pool": pool_stage, "heatmap": lambda: det.detect(query, heatmap=True),
             "few_shot": lambda: det.detect(query, heatmap=False, memory=memory)}
    times: dict[str, list[float]] = {}
    zero: list[float] = []
    for _ in range(3):  # warm-up
        for fn in variants.values():
            windows.cnn_pool_outputs = fn
            for case in cases.values():
                case()
    for _ in range(max(1, args.repeats // 10)):  # interleaved rounds: load drifts hit every variant alike
        zero.append(p50(lambda: det.detect(query, heatmap=False), 10))
        for name, fn in variants.items():
            windows.cnn_pool_outputs = fn
            for case, call in cases.items():
                times.setdefault(f"{case}_{name}", []).append(p50(call, 10))
    windows.cnn_pool_outputs = CURRENT
    ms = {k: statistics.median(v) for k, v in times.items()}
    zero_ms = statistics.median(zero)
    for case in cases:
        print(f"{case:9s} previous {ms[f'{case}_previous']:7.2f} ms  current {ms[f'{case}_current']:7.2f} ms  "
              f"(x{ms[f'{case}_previous'] / ms[f'{case}_current']:.2f})")
    print(f"zero-shot request without heatmap {zero_ms:.2f} ms; max |difference| of the pool outputs {diff:.2e}")
    print("RESULT name=pool_once " + " ".join(f"{k}_ms={v:.2f}" for k, v in ms.items())
          + f" zero_shot_ms={zero_ms:.2f} few_shot_ratio_previous={ms['few_shot_previous'] / zero_ms:.2f}"
          f" few_shot_ratio_current={ms['few_shot_current'] / zero_ms:.2f} max_diff={diff:.2e}")


if __name__ == "__main__":
    main()
