"""REST service (FastAPI + uvicorn) over `service.detector`.

`zsad serve` runs `uvicorn.run("service.api.app:create_app", factory=True)`; see docs/service.md. HTTP concerns
(auth, limits, error shape, metrics, batching, persistence of results) live in this package; the method itself
lives in `service.detector` and the modules it uses.
"""
