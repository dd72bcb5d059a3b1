"""The built-in dashboard: `GET /dashboard` (one HTML page) and its assets under `/dashboard/static/<file>`.

Static files only, no build step and nothing loaded from outside the service: the page's script polls the API
(`/v1/results`, `/v1/stats`, `/v1/models`, `/v1/thresholds`) and fetches heatmap overlays itself. The page and its
assets need no API key; every data call carries the key the user typed (kept in the tab's `sessionStorage`), so the
dashboard shows nothing an API client could not see. A strict Content-Security-Policy keeps it that way: scripts,
styles and data from this origin only, images from this origin or blob: URLs.
"""
from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from .errors import ApiError

STATIC_DIR = Path(__file__).resolve().parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
_ASSET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag / Last-Modified): a new release shows at the next page load
}

router = APIRouter(include_in_schema=False)


def static_file(folder: Path, name: str, what: str, headers: dict[str, str] = HEADERS) -> FileResponse:
    """A file straight from `folder` (no subfolders, no dotfiles, known types only), or a 404 in the API's shape."""
    suffix = Path(name).suffix
    path = folder / name
    if not _ASSET_NAME.match(name) or suffix not in MEDIA_TYPES or not path.is_file():
        raise ApiError(404, "not_found", f"no {what} {name!r}")
    return FileResponse(path, media_type=MEDIA_TYPES[suffix], headers=headers)


def _file(name: str) -> FileResponse:
    return static_file(STATIC_DIR, name, "dashboard asset")


@router.get("/dashboard")
async def dashboard() -> FileResponse:
    return _file("dashboard.html")


@router.get("/dashboard/static/{name}")
async def dashboard_asset(name: str) -> FileResponse:
    return _file(name)
