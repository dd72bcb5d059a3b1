"""The API fuzzed from its own OpenAPI document (schemathesis): every operation, with and without keys.

In process (ASGI) against `create_app` with the fake detector, derandomized and with a bounded number of examples
per operation so it stays well under two minutes on a busy 2-core machine. Fails on any 5xx and on any answer that
breaks the document: undocumented status code or content type, a body or header that does not match its schema.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from service.api.app import create_app

from .helpers import FakeDetector, make_settings

MAX_EXAMPLES = 8
ADMIN_KEY = "fuzz-admin-key"
READ_KEY = "fuzz-read-key"


def make_app(tmp: Path):
    detector = FakeDetector()
    settings = make_settings(tmp, tmp / "no-store", api_keys_read=[READ_KEY], api_keys_admin=[ADMIN_KEY],
                             request_timeout_s=5.0, body_timeout_s=5.0, max_upload_bytes=256 * 1024,
                             calibration_max_bytes=256 * 1024)
    return create_app(settings, loader=lambda s, name=None, version=None: detector)


# The document /openapi.json serves (the same for every app built with these settings).
schema = schemathesis.openapi.from_dict(make_app(Path(tempfile.mkdtemp(prefix="zsad-fuzz-"))).openapi())


@pytest.fixture
def app(tmp_path):
    """A fresh app per operation: schemathesis runs an app's lifespan per test item, and a lifespan runs once."""
    return make_app(tmp_path)


_c = schemathesis.checks
CHECKS = [_c.not_a_server_error, _c.status_code_conformance, _c.content_type_conformance,
          _c.response_headers_conformance, _c.response_schema_conformance]

FUZZ = settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@schema.parametrize()
@FUZZ
@pytest.mark.parametrize("key", [ADMIN_KEY, None], ids=["admin-key", "no-key"])
def test_api_conforms_to_its_openapi_document(app, case, key):
    headers = {"X-API-Key": key} if key else {}
    case.call_and_validate(headers=headers, checks=CHECKS, app=app)
