"""`GET /docs`: the interactive API documentation (Swagger UI), served from the package.

Why not FastAPI's default page: it loads Swagger UI from a CDN, and a factory network usually has no internet, so
`/docs` would be a blank page exactly where the service runs. The two files it needs are vendored in
`service/api/vendor/swagger-ui/` (swagger-ui-dist 5.35.0, Apache-2.0). ReDoc has no offline copy here, so `/redoc`
is off; `/openapi.json` is the machine-readable contract either way.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from .dashboard import static_file

SWAGGER_DIR = Path(__file__).resolve().parent / "vendor" / "swagger-ui"
SWAGGER_UI_VERSION = "5.35.0"
ASSET_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "public, max-age=86400"}

router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")  # behind a path-prefix proxy, links keep the prefix
    return get_swagger_ui_html(
        openapi_url=root + (request.app.openapi_url or "/openapi.json"),
        title=f"{request.app.title} — API",
        swagger_js_url=f"{root}/docs/static/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/docs/static/swagger-ui.css",
        swagger_favicon_url=f"{root}/docs/static/favicon-32x32.png",
    )


@router.get("/docs/static/{name}")
async def swagger_asset(name: str) -> FileResponse:
    return static_file(SWAGGER_DIR, name, "documentation asset", ASSET_HEADERS)
