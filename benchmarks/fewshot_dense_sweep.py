"""The dense bank's two knobs, each chosen on the tuning kinds (seed 1919), then reported once on the held-out kinds:
the search radius (`service.fewshot.dense_near`) and the squash of the dense term (`DENSE_SQUASH`).

    python benchmarks/fewshot_dense_sweep.py --squashes 1,2,4 --shots 4          # the squash (README)
    python benchmarks/fewshot_dense_sweep.py --radii inf,2,4 --squashes 2 --no-coreset \\
        --world product,random --shots 4                                           # the radius (README)
    ZSAD_REFERENCE_DENSE=true python benchmarks/fewshot_dense_sweep.py --script fewshot --squashes 4 --threads 2

Each (radius, squash) runs `benchmarks/fewshot_dense.py` (default; its remaining arguments pass through) or the
held-out `benchmarks/fewshot.py` with that radius (`inf`: every cell, what ships) and squash bound in
`service.fewshot`. `--no-coreset` keeps every dense row, so that a comparison of radii is the radius alone. The rules,
declared before the runs: the largest sum of image + pixel + deformation AUROC of rule F (the shipped rule) over the
worlds at 4 shots, adopted only if it beats the shipped setting by 0.5 or more (for the squash, also not below it on
`product_wide`). Prints each run's output and ends with `RESULT name=fewshot_dense_sweep` (the F sums of
`fewshot_dense` runs, over the worlds and per world; `fewshot` runs print their own RESULT line above it).
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
    ap.add_argument("--radii", default="inf")
    ap.add_argument("--squashes", default=f"{fewshot.DENSE_SQUASH:g}")
    ap.add_argument("--no-coreset", action="store_true", help="keep every dense row (a radius study)")
    ap.add_argument("--script", choices=("fewshot_dense", "fewshot"), default="fewshot_dense")
    args, rest = ap.parse_known_args()
    if args.no_coreset:
        fewshot.DENSE_MAX_ROWS = 1 << 30
    sums: dict[str, float] = {}
    for radius in args.radii.split(","):
        for squash in args.squashes.split(","):
            near = functools.partial(ORIGINAL, radius=math.inf if radius == "inf" else int(radius))
            fewshot.dense_near = fewshot_dense.dense_near = near
            fewshot.DENSE_SQUASH = float(squash)
            sys.argv = [f"{args.script}.py", *rest]
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                (fewshot_dense if args.script == "fewshot_dense" else fewshot_benchmark).main()
            print(f"## radius {radius} squash {squash}\n{out.getvalue()}", flush=True)
            found = re.search(r" F ([\d.]+)", out.getvalue().split("sum of")[-1])
            if found:
                sums[f"r{radius}_s{squash}"] = float(found.group(1))
            # each world's F sum at the largest shot count (the squash rule also looks at product_wide alone)
            per_world = re.findall(r"(\w+)_k(\d+)_F=([\d.]+)/([\d.]+)/([\d.]+)", out.getvalue())
            top = max((int(k) for _, k, *_ in per_world), default=0)
            for world, k, *figures in per_world:
                if int(k) == top:
                    sums[f"r{radius}_s{squash}_{world}"] = sum(float(f) for f in figures)
    print("RESULT name=fewshot_dense_sweep " + " ".join(f"F_sum_{k}={v:.1f}" for k, v in sums.items()))


if __name__ == "__main__":
    main()
