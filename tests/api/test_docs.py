"""docs/service.md stays complete: every setting and every route is documented."""
from __future__ import annotations

from service.settings import Settings

from .helpers import REPO


def test_every_setting_and_route_is_in_docs(tmp_path):
    text = (REPO / "docs" / "service.md").read_text()
    missing = [f"ZSAD_{name.upper()}" for name in Settings.model_fields if f"`ZSAD_{name.upper()}`" not in text]
    assert not missing, f"add these settings to the table in docs/service.md: {missing}"
    from service.api.app import create_app

    app = create_app(Settings(model_store=tmp_path, results_path=tmp_path / "r.sqlite",
                              thresholds_path=tmp_path / "t.json"))
    # the OpenAPI document's paths: app.routes holds included routers, not their routes, on recent FastAPI versions
    routes = set(app.openapi()["paths"])
    assert {"/v1/detect", "/metrics", "/v2/models/{model_name}/infer"} <= routes, routes
    undocumented = [p for p in routes if p.replace("{result_id}", "{id}") not in text]
    assert not undocumented, undocumented
