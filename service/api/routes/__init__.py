"""One router per resource; `ROUTERS` is what `create_app` mounts, in this order."""
from __future__ import annotations

from . import detect, fleet, health, models, results, thresholds

ROUTERS = (health.router, detect.router, thresholds.router, results.router, models.router, fleet.router)
