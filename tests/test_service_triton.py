"""The Triton path end to end: ``ponder worker --triton`` (a real Triton server through nvidia-pytriton)
behind a gateway with ``PONDER_WORKER=triton``, compared with the in-process worker (queue + batching loop,
run here), the ``ponder features`` CLI and the Predictor; all must agree within 1e-5. Also the client's retries, circuit breaker and
HTTP protocol. (The in-process gateway over HTTP is covered by test_service_api.py.)"""

from __future__ import annotations

import asyncio
import io
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_service import (PPT, free_port, npz_bytes, require_fixtures, scene, start_gateway,  # noqa: E402
                              start_triton_worker)

MODEL = "ppt_v1m3_seg"  # the fixture's file is checkpoint.pth, so the model is named after its folder


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(Triton worker, gateway in front of it, the same model as a Predictor loaded here meanwhile)."""
    require_fixtures()
    pytest.importorskip("pytriton")
    folder = tmp_path_factory.mktemp("triton")
    triton, grpc_port = start_triton_worker(PPT, folder)
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: exercises retries and the breaker
    via_triton = start_gateway({"PONDER_WORKER": "triton", "PONDER_TRITON_URLS": f"{dead},127.0.0.1:{grpc_port}",
                                "PONDER_TRITON_BACKOFF_S": "0.01", "PONDER_BREAKER_FAILURES": "2"}, folder)
    try:
        from model.inference import load_predictor

        predictor = load_predictor(PPT)
        predictor.features(scene(500))  # warm-up while the servers start
        for server in (triton, via_triton):
            server.wait_ready(240)
        yield triton, via_triton, predictor
    finally:
        for server in (via_triton, triton):  # the gateway first: open clients delay Triton's exit
            server.stop()


def features(server, body: bytes, **params) -> np.ndarray:
    response = httpx.post(server.url + "/v1/features", content=body, params=params, timeout=300,
                          headers={"Accept": "application/x-npy"})
    assert response.status_code == 200, response.text
    return np.load(io.BytesIO(response.content), allow_pickle=False)


def in_process_outputs(predictor, voxels, condition):
    """Features and logits through the in-process worker (bounded queue + batching loop + model thread)."""
    from service.metrics import ServiceMetrics
    from service.settings import ServiceSettings
    from service.workers.base import EncodeJob
    from service.workers.inprocess import InProcessWorker

    async def run():
        worker = InProcessWorker(ServiceSettings(max_wait_ms=0), ServiceMetrics(), predictors={MODEL: predictor})
        await worker.start()
        try:
            return await worker.run(EncodeJob(MODEL, voxels, condition, want_logits=True))
        finally:
            await worker.stop()

    return asyncio.run(run())


def test_triton_gateway_is_ready_and_lists_the_model(servers):
    _, via_triton, _ = servers
    ready = httpx.get(via_triton.url + "/readyz").json()
    assert ready["ready"] and ready["worker"] == "triton" and ready["models"] == [MODEL]
    (entry,) = httpx.get(via_triton.url + "/v1/models").json()["models"]
    assert entry["name"] == MODEL and entry["conditions"] == ["Structured3D", "ScanNet", "S3DIS"]
    assert entry["can_segment"] and len(entry["classes"]["S3DIS"]) == 13


def test_triton_inprocess_cli_and_predictor_agree(servers, tmp_path):
    from model.cli import main as ponder

    _, via_triton, predictor = servers
    cloud = scene(6000, seed=3)
    body = npz_bytes(cloud)
    (tmp_path / "scene.npz").write_bytes(body)
    voxels = predictor.prepare(cloud)
    for condition in ("S3DIS", None):
        params = {"condition": condition} if condition else {}
        expected = predictor.features(cloud, condition=condition).point_features()
        np.testing.assert_allclose(features(via_triton, body, **params), expected, atol=1e-5, rtol=0)
        cli_args = ["--condition", condition] if condition else []
        assert ponder(["features", str(tmp_path / "scene.npz"), "-o", str(tmp_path / "cli.npy"), "--checkpoint",
                       str(PPT), *cli_args]) == 0
        np.testing.assert_allclose(np.load(tmp_path / "cli.npy"), expected, atol=1e-5, rtol=0)
        local = in_process_outputs(predictor, voxels, condition or "ScanNet")
        np.testing.assert_allclose(local.features[voxels.point_to_voxel], expected, atol=1e-5, rtol=0)
    response = httpx.post(via_triton.url + "/v1/segment", content=body, timeout=300,
                          params={"condition": "S3DIS", "logits": "true"}, headers={"Accept": "application/x-npz"})
    expected = predictor.segment(cloud, condition="S3DIS")
    assert response.status_code == 200, response.text
    with np.load(io.BytesIO(response.content)) as got:
        np.testing.assert_allclose(got["logits"], expected.logits, atol=1e-5, rtol=0)
        assert tuple(got["class_names"]) == expected.class_names
    local = in_process_outputs(predictor, voxels, "S3DIS")
    np.testing.assert_allclose(local.logits[voxels.point_to_voxel], expected.logits, atol=1e-5, rtol=0)


def test_dead_endpoint_is_retried_around_and_its_breaker_opens(servers):
    _, via_triton, _ = servers
    body = npz_bytes(scene(1000, seed=4))
    for _ in range(4):  # round-robin lands on the dead endpoint every other call
        features(via_triton, body)
    metrics = httpx.get(via_triton.url + "/metrics").text
    dead_lines = [line for line in metrics.splitlines() if line.startswith("ponder_triton_errors_total{")]
    assert dead_lines and float(dead_lines[0].rsplit(" ", 1)[1]) >= 2
    assert any(line.startswith("ponder_triton_breaker_open{") and line.endswith(" 1.0")
               for line in metrics.splitlines())
    bad = httpx.post(via_triton.url + "/v1/features", content=body, params={"condition": "Mars"}, timeout=60)
    assert bad.status_code == 422 and "Mars" in bad.json()["detail"]


def test_http_protocol_and_unreachable_servers(servers):
    from service.metrics import ServiceMetrics
    from service.settings import ServiceSettings
    from service.workers.base import EncodeJob, WorkerUnavailable
    from service.workers.triton_client import TritonWorker

    triton, _, predictor = servers
    voxels = predictor.prepare(scene(2000, seed=5))

    async def over_http():
        worker = TritonWorker(ServiceSettings(worker="triton", triton_protocol="http",
                                              triton_urls=[f"127.0.0.1:{triton.port}"]), ServiceMetrics())
        await worker.start()
        try:
            return await worker.run(EncodeJob(MODEL, voxels, "ScanNet", want_logits=True))
        finally:
            await worker.stop()

    out = asyncio.run(over_http())
    (expected,) = predictor.encode([voxels], "ScanNet")
    np.testing.assert_allclose(out.features, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.logits, predictor.classify([expected], "ScanNet")[0], atol=1e-5, rtol=0)

    async def nowhere():
        settings = ServiceSettings(worker="triton", triton_urls=[f"127.0.0.1:{free_port()}"], triton_retries=2,
                                   triton_backoff_s=0.01, triton_startup_wait_s=0.2)
        worker = TritonWorker(settings, ServiceMetrics())
        await worker.start()
        try:
            assert worker.models() == {} and not (await worker.ready())[0]
            with pytest.raises(WorkerUnavailable, match="gave up after 3 attempts"):
                await worker.run(EncodeJob(MODEL, voxels, "ScanNet"))
        finally:
            await worker.stop()

    asyncio.run(nowhere())
