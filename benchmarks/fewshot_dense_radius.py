"""The dense bank's search radius, chosen on the tuning kinds (seed 1919), never the held-out ones.

    python benchmarks/fewshot_dense_radius.py [--radii inf,2,4] [fewshot_dense.py's arguments, e.g. --shots 4]

For each radius, `benchmarks/fewshot_dense.py` runs with `service.fewshot.dense_near` bound to that radius (`inf`:
every cell, the search before positions were kept) and no coreset on the dense bank (so no variant loses rows and
the comparison is the radius alone). The choice: the largest sum of image + pixel + deformation AUROC of rule F (the
shipped rule) over both worlds at 4 shots, and only if it beats `inf` by 0.5 or more (declared before the run).
Prints each run's table and ends with `RESULT name=fewshot_dense_radius`.
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

import fewshot_dense

import service.fewshot as fewshot

ORIGINAL = fewshot.dense_near


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--radii", default="inf,2,4")
    args, rest = ap.parse_known_args()
    fewshot.DENSE_MAX_ROWS = 1 << 30
    sums: dict[str, float] = {}
    for radius in args.radii.split(","):
        near = functools.partial(ORIGINAL, radius=math.inf if radius == "inf" else int(radius))
        fewshot.dense_near = fewshot_dense.dense_near = near
        sys.argv = ["fewshot_dense.py", *rest]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            fewshot_dense.main()
        print(f"## radius {radius}\n{out.getvalue()}")
        sums[radius] = float(re.search(r" F ([\d.]+)", out.getvalue().split("sum of")[-1]).group(1))
    print("RESULT name=fewshot_dense_radius " + " ".join(f"F_sum_r{r}={v:.1f}" for r, v in sums.items()))


if __name__ == "__main__":
    main()
