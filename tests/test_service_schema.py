"""Property-based checks of the live gateway against its own OpenAPI schema (schemathesis): generated
requests never get a 5xx, and answers match the documented status codes, media types and schemas.
Bounded: 20 examples per operation and mode, derandomized; plus PONDER_SCHEMA_CLOUD_CASES (default 500)
cases per model route whose bodies are valid small clouds, so the fuzzed parameters reach the model."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

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


def sane_deadline(case) -> None:
    """A fuzzed ?timeout_s=1e-224 is answered 504 (documented, and correct), which the no-5xx check would
    count as a failure; keep generated deadlines at 60 s or more."""
    if case.query and "timeout_s" in case.query:
        try:
            case.query = {**case.query, "timeout_s": max(float(case.query["timeout_s"]), 60.0)}
        except (TypeError, ValueError):
            pass


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
        sane_deadline(case)
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


BINARY = "application/octet-stream"  # with ?format=npz (schemathesis serialises octet-stream bodies as bytes)
CLOUD_CASES = int(os.environ.get("PONDER_SCHEMA_CLOUD_CASES", "500"))


@st.composite
def small_clouds(draw) -> bytes:
    """A valid NPZ cloud of 8-64 points (coord, colour, unit normals), seeded by hypothesis."""
    n = draw(st.integers(8, 64))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    coord = rng.uniform(-2, 2, (n, 3)).astype(np.float32)
    normal = rng.normal(size=(n, 3)).astype(np.float32)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-6
    buffer = io.BytesIO()
    np.savez(buffer, coord=coord, color=rng.integers(0, 256, (n, 3)).astype(np.uint8), normal=normal)
    return buffer.getvalue()


@pytest.mark.parametrize("label", OPERATIONS[:2])
def test_fuzzed_parameters_on_valid_clouds_reach_the_model_without_5xx(api_schema, server, label):
    from hypothesis import given

    from schemathesis.specs.openapi.checks import positive_data_acceptance

    operation = api_schema.find_operation_by_label(label)
    calls = {"ok": 0}

    @settings(max_examples=CLOUD_CASES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    @given(case=operation.as_strategy(media_type=BINARY), body=small_clouds())
    def check(case, body):
        case.body, case.media_type = body, BINARY
        query = dict(case.query or {})
        query.pop("filename", None)
        query["format"] = "npz"  # the body is an NPZ cloud: let nothing claim otherwise
        case.query = query
        sane_deadline(case)
        response = case.call_and_validate(base_url=server.url, timeout=60, excluded_checks=[positive_data_acceptance])
        calls["ok"] += response.status_code == 200

    check()
    assert calls["ok"] > CLOUD_CASES // 4, f"only {calls['ok']} of {CLOUD_CASES} valid clouds were answered 200"
