"""API keys (401/403), the per-key rate limit (429) and the bounded queue (503), each with Retry-After
where it applies, against a real uvicorn process with a one-slot queue."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_service import SPUNET, gateway, npz_bytes, require_fixtures, scene  # noqa: E402

KEYS = ("key-auth", "key-rate", "key-queue")


@pytest.fixture(scope="module")
def server():
    require_fixtures()
    env = {"PONDER_CHECKPOINT": str(SPUNET), "PONDER_API_KEYS": ",".join(KEYS), "PONDER_RATE_LIMIT_PER_S": "0.5",
           "PONDER_RATE_LIMIT_BURST": "12", "PONDER_QUEUE_SIZE": "1", "PONDER_MAX_BATCH": "1",
           "PONDER_MAX_WAIT_MS": "0"}
    with gateway(env) as srv:
        yield srv


def test_health_metrics_and_docs_need_no_key(server):
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert httpx.get(server.url + path).status_code == 200, path


def test_missing_key_is_401_and_wrong_key_is_403(server):
    missing = httpx.get(server.url + "/v1/models")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "missing API key" in missing.json()["detail"]
    wrong = httpx.get(server.url + "/v1/models", headers={"X-API-Key": "nope"})
    assert wrong.status_code == 403 and "not valid" in wrong.json()["detail"]
    assert wrong.headers["content-type"].startswith("application/problem+json")
    assert httpx.get(server.url + "/v1/models", headers={"X-API-Key": "key-auth"}).status_code == 200
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer key-auth"}).status_code == 200


def test_rate_limit_is_429_with_retry_after_per_key(server):
    statuses = [httpx.get(server.url + "/v1/models", headers={"X-API-Key": "key-rate"}) for _ in range(20)]
    limited = [r for r in statuses if r.status_code == 429]
    assert sum(r.status_code == 200 for r in statuses) >= 12 and limited
    assert int(limited[0].headers["retry-after"]) >= 1 and "rate limit" in limited[0].json()["detail"]
    # another key has its own bucket
    assert httpx.get(server.url + "/v1/models", headers={"X-API-Key": "key-auth"}).status_code == 200


def test_full_queue_is_503_with_retry_after(server):
    body = npz_bytes(scene())

    def call(_: int) -> httpx.Response:
        return httpx.post(server.url + "/v1/features", content=body, timeout=300,
                          headers={"X-API-Key": "key-queue", "Accept": "application/x-npy"})

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(call, range(8)))
    busy = [r for r in responses if r.status_code == 503]
    assert busy, [r.status_code for r in responses]
    assert all(r.status_code in (200, 503) for r in responses)
    assert int(busy[0].headers["retry-after"]) >= 1 and "queue is full" in busy[0].json()["detail"]
    assert "ponder_queue_rejected_total" in httpx.get(server.url + "/metrics").text
