"""CPU time of `heatmap.localise` on a camera-sized map, against the previous implementation, in one run.

    python benchmarks/localise_speed.py [--size 640x480] [--grid 12] [--reps 20]

The map is a seeded random `grid`x`grid` patch grid upsampled bilinearly to the image size (what the detector
returns). Two cases: a pixel threshold the hottest area passes (regions as they are), and one above the whole map
(the hottest region is grown to the minimum area, 1% of the map). `previous` is the code before the windowed
search, kept here as the baseline: the growth labelled the whole map at every step of its binary search, and each
region's maximum and mean came from `ndimage.maximum` / `ndimage.mean` over the whole map. Both must return the same
regions and mask. Ends with `RESULT name=localise_speed ...`.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from scipy import ndimage

from service.heatmap import Region, localise, min_area_pixels

_S8 = np.ones((3, 3), dtype=bool)


def previous_localise(heat: np.ndarray, threshold: float, min_area: int) -> tuple[list[Region], np.ndarray]:
    """`localise` before the windowed growth (anomalous image, no region cap)."""
    labels, n = ndimage.label(heat > threshold, structure=_S8)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    keep = [i for i in range(1, n + 1) if areas[i] >= min_area]
    peak = int(np.argmax(heat))
    final = np.zeros(heat.shape, dtype=np.int32)
    offset = 0
    if labels.flat[peak] == 0 or areas[labels.flat[peak]] < min_area:
        values = np.unique(heat)[::-1]
        lo, hi, grown = 0, len(values) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            lab, _ = ndimage.label(heat >= values[mid], structure=_S8)
            component = lab == lab.flat[peak]
            if int(component.sum()) >= min_area:
                grown, hi = component, mid - 1
            else:
                lo = mid + 1
        inside = set(np.unique(labels[grown]).tolist())
        keep = [i for i in keep if i not in inside]
        final[grown] = 1
        offset = 1
    for j, i in enumerate(keep):
        final[labels == i] = offset + j + 1
    count = offset + len(keep)
    ids = np.arange(1, count + 1)
    areas_f = np.bincount(final.ravel(), minlength=count + 1)[1:]
    maxima, means = ndimage.maximum(heat, final, ids), ndimage.mean(heat, final, ids)
    found = [Region(int(xs.start), int(ys.start), int(xs.stop), int(ys.stop), int(areas_f[i]), float(maxima[i]),
                    float(means[i])) for i, (ys, xs) in enumerate(ndimage.find_objects(final, max_label=count))]
    found.sort(key=lambda r: (-r.max_score, -r.area_px))
    return found, np.where(final > 0, 255, 0).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--grid", type=int, default=12)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    w, h = (int(x) for x in args.size.split("x"))
    coarse = torch.tensor(np.random.default_rng(0).random((1, 1, args.grid, args.grid)), dtype=torch.float32)
    heat = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    heat = np.ascontiguousarray(heat * 0.4 + 0.1, dtype=np.float32)
    min_area = min_area_pixels(heat.shape, 0.01)
    cases = {"regions": float(np.quantile(heat, 0.9)), "grown": float(heat.max()) + 0.01}
    fields = []
    for case, threshold in cases.items():
        now, before = localise(heat, threshold, min_area), previous_localise(heat, threshold, min_area)
        assert now[0] == before[0] and np.array_equal(now[1], before[1]), f"{case}: results differ"
        times = {"current": [], "previous": []}
        for _ in range(args.reps):
            for name, fn in (("current", localise), ("previous", previous_localise)):
                t = time.perf_counter()
                fn(heat, threshold, min_area)
                times[name].append(time.perf_counter() - t)
        p50 = {k: statistics.median(v) * 1000 for k, v in times.items()}
        print(f"{case}: {len(now[0])} region(s), previous {p50['previous']:.1f} ms, current {p50['current']:.1f} ms "
              f"(x{p50['previous'] / p50['current']:.1f}); same regions and mask")
        fields += [f"{case}_previous_ms={p50['previous']:.1f}", f"{case}_current_ms={p50['current']:.1f}",
                   f"{case}_speedup={p50['previous'] / p50['current']:.1f}"]
    print(f"RESULT name=localise_speed size={args.size} grid={args.grid} " + " ".join(fields))


if __name__ == "__main__":
    main()
