"""Property-based checks of the live gateway against its own OpenAPI schema (schemathesis): generated
requests never get a 5xx, and answers match the documented status codes, media types and schemas.
Bounded: 20 examples per operation and mode, derandomized."""

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


OPERATIONS = ("POST /v1/features", "POST /v1/segment", "GET /v1/models", "GET /healthz", "GET /readyz", "GET /metrics")


@pytest.mark.parametrize("label", OPERATIONS)
def test_generated_requests_get_documented_answers_and_no_5xx(api_schema, server, label):
    from hypothesis import given

    from schemathesis.specs.openapi.checks import positive_data_acceptance

    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, f"{label} missing from the OpenAPI schema"

    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    @given(case=operation.as_strategy())
    def check(case):
        # Schema-valid is not content-valid: random bytes are no point cloud, so 415/422 are right answers.
        case.call_and_validate(base_url=server.url, timeout=60, excluded_checks=[positive_data_acceptance])

    check()


@pytest.mark.parametrize("label", OPERATIONS[:2])
def test_invalid_requests_are_refused_without_5xx(api_schema, server, label):
    from hypothesis import given
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode

    operation = api_schema.find_operation_by_label(label)

    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    @given(case=operation.as_strategy(GenerationMode.NEGATIVE))
    def check(case):
        case.call_and_validate(base_url=server.url, timeout=60, checks=[not_a_server_error])

    check()
