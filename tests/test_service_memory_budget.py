"""What bounds the gateway's memory when many large requests come at once:

- the bytes of request bodies held by all requests in flight (``PONDER_MAX_INFLIGHT_UPLOAD_BYTES``: counted as
  they arrive, declared or chunked; 503 + Retry-After past it, given back once the request is answered) — real
  uvicorn on loopback, raw sockets for stalled uploads;
- the voxels of one batched forward (``PONDER_MAX_BATCH_VOXELS``): a request that would pass it waits for the
  next batch, and every request is still answered with its own features — the in-process worker, real model.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_service import gateway, npz_bytes, require_fixtures, scene  # noqa: E402
from test_service_hostile import read_until_closed, stalled_upload  # noqa: E402

from model.inference import load_predictor
from model.pointcloud.cloud import PointCloud
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings
from service.workers.base import EncodeJob
from service.workers.inprocess import InProcessWorker
from tests.conftest import random_room

MAX_UPLOAD, IN_FLIGHT = 2_000_000, 3_000_000


@pytest.fixture(scope="module")
def server():
    require_fixtures()
    env = {"PONDER_MAX_UPLOAD_BYTES": str(MAX_UPLOAD), "PONDER_MAX_INFLIGHT_UPLOAD_BYTES": str(IN_FLIGHT),
           "PONDER_UPLOAD_IDLE_TIMEOUT_S": "8", "PONDER_TORCH_THREADS": "1"}
    with gateway(env) as srv:
        yield srv


def post(server, body, request_id: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/features", content=body, params={"format": "npz"},
                      headers={"Accept": "application/x-npy", "X-Request-ID": request_id}, timeout=120)


def upload_then_stall(server, request_id: str, sent: int) -> socket.socket:
    """A raw features upload that sends ``sent`` bytes of a body declared 100 kB longer, then nothing."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall((f"POST /v1/features?format=npz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {sent + 100_000}"
                  f"\r\nContent-Type: application/octet-stream\r\nX-Request-ID: {request_id}\r\n\r\n").encode()
                 + b"\x00" * sent)
    return sock


def test_uploads_in_flight_share_one_byte_budget(server):
    liar = stalled_upload(server, "declares-1.9MB-sends-10B", declared=1_900_000)  # declared bytes hold nothing
    big = upload_then_stall(server, "holding-1.9MB", sent=1_900_000)
    try:
        time.sleep(0.5)  # the server has read what was sent
        small = post(server, npz_bytes(scene(1500)), "small-beside")
        assert small.status_code == 200, small.text  # 1.9 MB + a small body fit the 3 MB budget
        refused = post(server, b"\x00" * 1_500_000, "sends-1.5MB")  # 1.9 + 1.5 MB do not
        assert refused.status_code == 503, refused.text
        assert refused.headers.get("retry-after") == "2"
        assert "PONDER_MAX_INFLIGHT_UPLOAD_BYTES" in refused.json()["detail"]

        def chunked():  # no Content-Length: the same count
            for _ in range(12):
                yield b"\x00" * 100_000

        streamed = post(server, chunked(), "chunked-1.2MB")
        assert streamed.status_code == 503, streamed.text
        for sock in (big, liar):  # idle: dropped, their bytes given back
            assert read_until_closed(sock).startswith("HTTP/1.1 408")
    finally:
        big.close()
        liar.close()
    after = post(server, b"\x00" * 1_500_000, "sends-1.5MB-after")  # now it fits: refused only as bad data
    assert after.status_code in (400, 415, 422), after.text
    assert "PONDER_MAX_INFLIGHT_UPLOAD_BYTES" not in after.text


def test_the_budget_must_fit_one_largest_upload():
    with pytest.raises(ValidationError, match="max_inflight_upload_bytes"):
        ServiceSettings(max_upload_bytes=10_000, max_inflight_upload_bytes=5_000)


def _batches(caplog) -> list[int]:
    """Sizes of the encode batches the worker ran, in order (its "encode batch of N for ..." debug lines)."""
    return [int(r.getMessage().split()[3]) for r in caplog.records
            if r.name == "service.worker" and r.getMessage().startswith("encode batch of")]


@pytest.mark.parametrize("budget_scenes, expected", [(2, [2, 2]), (0.5, [1, 1, 1, 1]), (10, [4])])
def test_a_batch_stays_within_its_voxel_budget_and_answers_everyone(caplog, budget_scenes, expected):
    predictor = load_predictor()  # the bundled default model
    scenes = [predictor.prepare(PointCloud(**random_room(3000, seed=s))) for s in range(4)]
    largest = max(s.num_voxels for s in scenes)
    solo = predictor.encode(scenes)  # one forward of all four: each scene's own rows are its features
    settings = ServiceSettings(max_batch=8, max_wait_ms=500, max_batch_voxels=int(budget_scenes * largest))

    async def run() -> list:
        worker = InProcessWorker(settings, ServiceMetrics(), predictors={"default": predictor})
        await worker.start()
        try:
            return await asyncio.gather(*(worker.run(EncodeJob("default", v)) for v in scenes))
        finally:
            await worker.stop()

    with caplog.at_level(logging.DEBUG, logger="service.worker"):
        outputs = asyncio.run(run())
    assert _batches(caplog) == expected
    for out, reference in zip(outputs, solo):
        np.testing.assert_allclose(out.features, reference, atol=1e-5)
