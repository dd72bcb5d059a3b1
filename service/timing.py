"""Stage timings: the service reports how long each pipeline stage of a batch took."""
from __future__ import annotations

import time


def lap(timings: dict[str, float], stage: str, t0: float) -> float:
    """Add the time since `t0` to `timings[stage]`; returns now, the start of the next stage."""
    now = time.perf_counter()
    timings[stage] = timings.get(stage, 0.0) + now - t0
    return now
