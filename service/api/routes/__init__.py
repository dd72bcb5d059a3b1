"""One router per resource; `ROUTERS` is what `create_app` mounts, in this order."""
from __future__ import annotations

from . import detect, fleet, health, models, results, thresholds, v2

ROUTERS = (health.router, detect.router, thresholds.router, results.router, models.router, fleet.router, v2.router)
