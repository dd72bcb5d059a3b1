"""The dense bank's search radius: chosen on the tuning kinds (seed 1919), then reported once on the held-out kinds.

    python benchmarks/fewshot_dense_radius.py [--radii inf,2,4] [fewshot_dense.py's arguments, e.g. --shots 4]
    ZSAD_REFERENCE_DENSE=true python benchmarks/fewshot_dense_radius.py --script fewshot --radii 2 --threads 2

For each radius, `benchmarks/fewshot_dense.py` (default) or the held-out `benchmarks/fewshot.py` runs with
`service.fewshot.dense_near` bound to that radius (`inf`: every cell, what ships). For `fewshot_dense` the dense bank
keeps every row (no coreset), so the comparison is the radius alone. The rule, declared before the run: the largest
sum of image + pixel + deformation AUROC of rule F (the shipped rule) over both worlds at 4 shots, only if it beats
`inf` by 0.5 or more. Prints each run's output and ends with `RESULT name=fewshot_dense_radius` (the F sums of
`fewshot_dense` runs; `fewshot` runs print their own RESULT line above it).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fewshot as fewshot_benchmark
import fewshot_dense

import service.fewshot as fewshot

ORIGINAL = fewshot.dense_near


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--radii", default="inf,2,4")
    ap.add_argument("--script", choices=("fewshot_dense", "fewshot"), default="fewshot_dense")
    args, rest = ap.parse_known_args()
    if args.script == "fewshot_dense":
        fewshot.DENSE_MAX_ROWS = 1 << 30
    sums: dict[str, float] = {}
    for radius in args.radii.split(","):
        near = functools.partial(ORIGINAL, radius=math.inf if radius == "inf" else int(radius))
        fewshot.dense_near = fewshot_dense.dense_near = near
        sys.argv = [f"{args.script}.py", *rest]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            (fewshot_dense if args.script == "fewshot_dense" else fewshot_benchmark).main()
        print(f"## radius {radius}\n{out.getvalue()}")
        found = re.search(r" F ([\d.]+)", out.getvalue().split("sum of")[-1])
        if found:
            sums[radius] = float(found.group(1))
    print("RESULT name=fewshot_dense_radius " + " ".join(f"F_sum_r{r}={v:.1f}" for r, v in sums.items()))


if __name__ == "__main__":
    main()
