"""API fixtures: one tiny real model (tiny seeded CLIP + an FNN trained for 3 epochs) in a session temp store."""
from __future__ import annotations

import pytest

from tests.conftest import publish_tiny_model


@pytest.fixture(scope="session")
def api_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("api-store")
    publish_tiny_model(root)
    return root
