"""GET /docs works with no internet: the page and every file it loads come from the service itself."""
from __future__ import annotations

import re

from fastapi.testclient import TestClient

from service.api.apidocs import SWAGGER_DIR, SWAGGER_UI_VERSION
from service.api.app import create_app

from .helpers import FakeDetector, make_settings, wait_ready


def _client(tmp_path, **overrides) -> TestClient:
    det = FakeDetector()
    app = create_app(make_settings(tmp_path, tmp_path / "no-store", **overrides), loader=lambda s, name=None, version=None: det)
    return TestClient(app)


def test_docs_page_loads_only_local_assets_and_needs_no_key(tmp_path):
    with _client(tmp_path, api_keys_read=["k"]) as c:
        wait_ready(c)
        r = c.get("/docs")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        urls = re.findall(r'(?:src|href)="([^"]+)"', r.text) + re.findall(r"url: '([^']+)'", r.text)
        assert set(urls) == {"/docs/static/swagger-ui.css", "/docs/static/favicon-32x32.png",
                             "/docs/static/swagger-ui-bundle.js", "/openapi.json"}
        assert "cdn" not in r.text.lower() and "http://" not in r.text and "https://" not in r.text
        for url, ctype in (("/docs/static/swagger-ui-bundle.js", "text/javascript"),
                           ("/docs/static/swagger-ui.css", "text/css"), ("/openapi.json", "application/json")):
            asset = c.get(url)
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(ctype), url
        assert len(c.get("/docs/static/swagger-ui-bundle.js").content) > 500_000  # the real bundle, not a stub


def test_only_the_vendored_files_are_served_and_redoc_is_off(tmp_path):
    with _client(tmp_path) as c:
        wait_ready(c)
        for name in ("..%2Fapp.py", "README.md", "LICENSE", "nope.js", ".hidden.js"):
            r = c.get(f"/docs/static/{name}")
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", name
        assert c.get("/redoc").status_code == 404  # it would load ReDoc from a CDN
        assert not [p for p in c.get("/openapi.json").json()["paths"] if p.startswith("/docs")]


def test_vendored_bundle_is_the_recorded_version_with_its_licence():
    bundle = (SWAGGER_DIR / "swagger-ui-bundle.js").read_text(errors="replace")
    assert "SwaggerUIBundle" in bundle
    assert SWAGGER_UI_VERSION in (SWAGGER_DIR / "README.md").read_text()
    assert "Apache License" in (SWAGGER_DIR / "LICENSE").read_text()
