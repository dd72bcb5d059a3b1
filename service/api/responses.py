"""JSON answers of the detect routes, encoded with orjson straight from the dicts the pipeline built.

Why: a route that returns a dict has FastAPI validate it against the response model and dump it again; the detect
pipeline already builds its answers in the schema's shape (`tests/api/test_responses.py` checks that they equal
their validated dump), so one pass in C is enough. The response models still document the routes (OpenAPI).
"""
from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


class FastJSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)
