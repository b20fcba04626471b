"""Property-based checks of the live gateway against its own OpenAPI schema (schemathesis): generated
requests never get a 5xx, and answers match the documented status codes, media types and schemas."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_service import SPUNET, gateway, require_fixtures  # noqa: E402


@pytest.fixture(scope="module")
def server():
    require_fixtures()
    env = {"PONDER_CHECKPOINT": str(SPUNET), "PONDER_MAX_POINTS": "20000", "PONDER_REQUEST_TIMEOUT_S": "30"}
    with gateway(env) as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_generated_requests_get_documented_answers_and_no_5xx(case, server):
    case.call_and_validate(base_url=server.url, timeout=60)
