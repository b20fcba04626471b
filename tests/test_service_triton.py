"""The one serving path end to end, with real processes: ``ponder export triton-repo --kind python-onnxruntime``
(and ``--kind python-torch``, as ``NAME_torch``) writes an ensemble repository from the fixture checkpoints, ``ponder worker --triton --repo`` runs the
tritonserver binary of nvidia-pytriton on it, and a real uvicorn gateway with ``PONDER_WORKER=triton`` calls
it. Features and logits must equal the in-process worker's (spconv model) within 1e-4. Also: the client's
retries, breaker and HTTP protocol, input errors as 4xx, and losing the worker under load (503 + Retry-After,
no orphan server or stub processes, recovery once it is back)."""

from __future__ import annotations

import asyncio
import io
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_service import (PPT, SPUNET, free_port, npz_bytes, processes_mentioning, require_fixtures,  # noqa: E402
                              scene, start_gateway, start_triton_repo_worker)

MODELS = {"ppt_v1m3_seg": PPT, "spunet_v1m1_seg": SPUNET}  # ensemble name -> checkpoint it was exported from
TORCH_SUFFIX = "_torch"  # the same checkpoints as --kind python-torch ensembles (the torch engine in the stub)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(repository, Triton worker, its ports, gateway in front of it, {name: Predictor} loaded here meanwhile)."""
    require_fixtures()
    pytest.importorskip("pytriton")
    from ponder.cli import main as ponder

    folder = tmp_path_factory.mktemp("triton")
    repo = folder / "repo"
    for name, checkpoint in MODELS.items():
        assert ponder(["export", "triton-repo", str(checkpoint), "-o", str(repo), "--name", name,
                       "--kind", "python-onnxruntime", "--threads", "1"]) == 0
        assert ponder(["export", "triton-repo", str(checkpoint), "-o", str(repo), "--name", name + TORCH_SUFFIX,
                       "--kind", "python-torch", "--threads", "1"]) == 0
    worker, ports = start_triton_repo_worker(repo, folder)
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: exercises retries and the breaker
    gateway = start_gateway({"PONDER_WORKER": "triton", "PONDER_TRITON_URLS": f"{dead},127.0.0.1:{ports[1]}",
                             "PONDER_TRITON_BACKOFF_S": "0.01", "PONDER_BREAKER_FAILURES": "2",
                             "PONDER_BREAKER_RESET_S": "1"}, folder)
    state = {"worker": worker}
    try:
        from model.inference import load_predictor

        predictors = {name: load_predictor(checkpoint) for name, checkpoint in MODELS.items()}
        for server in (worker, gateway):
            server.wait_ready(240)
        yield repo, state, ports, gateway, predictors, folder
    finally:
        gateway.stop()  # the gateway first: open clients delay Triton's exit
        state["worker"].stop()


def post(server, route: str, body: bytes, accept: str = "application/x-npy", timeout: float = 300, **params):
    return httpx.post(server.url + route, content=body, params=params, timeout=timeout, headers={"Accept": accept})


def in_process(predictor, name: str, voxels, condition):
    """Features and logits through the in-process worker (bounded queue + batching loop + model thread)."""
    from service.metrics import ServiceMetrics
    from service.settings import ServiceSettings
    from service.workers.base import EncodeJob
    from service.workers.inprocess import InProcessWorker

    async def run():
        worker = InProcessWorker(ServiceSettings(max_wait_ms=0), ServiceMetrics(), predictors={name: predictor})
        await worker.start()
        try:
            return await worker.run(EncodeJob(name, voxels, condition, want_logits=predictor.has_classifier))
        finally:
            await worker.stop()

    return asyncio.run(run())


def test_gateway_lists_the_repository_models_from_the_ensemble_configs(stack):
    _, _, _, gateway, predictors = stack[:5]
    ready = httpx.get(gateway.url + "/readyz").json()
    assert ready["ready"] and ready["worker"] == "triton"
    assert sorted(ready["models"]) == sorted([*MODELS, *(name + TORCH_SUFFIX for name in MODELS)])
    entries = {e["name"]: e for e in httpx.get(gateway.url + "/v1/models").json()["models"]}
    assert entries["ppt_v1m3_seg"]["conditions"] == ["Structured3D", "ScanNet", "S3DIS"]
    assert entries["ppt_v1m3_seg"]["can_segment"] and len(entries["ppt_v1m3_seg"]["classes"]["S3DIS"]) == 13
    assert entries["spunet_v1m1_seg"]["conditions"] == []
    for name, predictor in predictors.items():
        assert entries[name]["feature_dim"] == entries[name + TORCH_SUFFIX]["feature_dim"] == predictor.info.feature_dim
        assert entries[name + TORCH_SUFFIX]["conditions"] == entries[name]["conditions"]


@pytest.mark.parametrize("name, condition", [("ppt_v1m3_seg", "S3DIS"), ("ppt_v1m3_seg", None),
                                             ("spunet_v1m1_seg", None), ("ppt_v1m3_seg_torch", "S3DIS"),
                                             ("spunet_v1m1_seg_torch", None)])
def test_features_and_logits_equal_the_inprocess_worker(stack, name, condition):
    _, _, _, gateway, predictors = stack[:5]
    predictor = predictors[name.removesuffix(TORCH_SUFFIX)]
    cloud = scene()  # the whole fixture room
    body = npz_bytes(cloud)
    voxels = predictor.prepare(cloud)
    local = in_process(predictor, name.removesuffix(TORCH_SUFFIX), voxels, predictor.resolve_condition(condition))
    params = {"model": name, **({"condition": condition} if condition else {})}
    response = post(gateway, "/v1/features", body, **params)
    assert response.status_code == 200, response.text
    features = np.load(io.BytesIO(response.content), allow_pickle=False)
    np.testing.assert_allclose(features, local.features[voxels.point_to_voxel], atol=1e-4, rtol=0)
    response = post(gateway, "/v1/segment", body, accept="application/x-npz", logits="true", **params)
    assert response.status_code == 200, response.text
    with np.load(io.BytesIO(response.content)) as got:
        np.testing.assert_allclose(got["logits"], local.logits[voxels.point_to_voxel], atol=1e-4, rtol=0)
        expected = predictor.segment(cloud, condition=condition)
        assert tuple(got["class_names"]) == expected.class_names


def test_bad_input_is_a_client_error_not_a_hang(stack):
    import tritonclient.http as client

    _, _, ports, gateway, _ = stack[:5]
    body = npz_bytes(scene(1000, seed=4))
    bad = post(gateway, "/v1/features", body, timeout=60, condition="Mars")
    assert bad.status_code == 422 and "Mars" in bad.json()["detail"]
    # straight to Triton, both kinds (python-torch checks in its one step): rows that do not match, an
    # out-of-range condition and duplicate voxels are INVALID_ARG (HTTP 400)
    triton = client.InferenceServerClient(f"127.0.0.1:{ports[0]}", network_timeout=60)
    grid = np.array([[0, 0, 0], [0, 0, 1], [5, 5, 5]], np.int32)

    def call(model: str, feat_rows: int, condition: int, coords: np.ndarray = grid):
        tensors = [("grid_coord", coords, "INT32"), ("batch", np.zeros(3, np.int32), "INT32"),
                   ("feat", np.zeros((feat_rows, 6), np.float32), "FP32"),
                   ("condition", np.array([condition]), "INT64")]
        inputs = []
        for n, a, t in tensors:
            inputs.append(client.InferInput(n, list(a.shape), t))
            inputs[-1].set_data_from_numpy(a)
        return triton.infer(model, inputs)

    try:
        for model in ("ppt_v1m3_seg", "ppt_v1m3_seg" + TORCH_SUFFIX):
            assert call(model, 3, 1).as_numpy("backbone_feat").shape == (3, 24)
            for rows, condition, coords, text in ((2, 1, grid, "feat must have shape (3, 6)"),
                                                  (3, 9, grid, "condition index 9"),
                                                  (3, 1, grid[[0, 1, 0]], "duplicate")):
                with pytest.raises(Exception) as info:
                    call(model, rows, condition, coords)
                assert info.value.status() == "400" and text in info.value.message(), (model, info.value.message())
    finally:
        triton.close()


def _triton_inputs(client, grid: np.ndarray) -> list:
    inputs = []
    for name, array, dtype in (("grid_coord", grid.astype(np.int32), "INT32"), ("batch", np.zeros(len(grid), np.int32),
                                                                                "INT32"),
                               ("feat", np.random.default_rng(0).random((len(grid), 6), np.float32), "FP32")):
        inputs.append(client.InferInput(name, list(array.shape), dtype))
        inputs[-1].set_data_from_numpy(array)
    return inputs


def test_a_scene_whose_deadline_passed_in_the_queue_is_skipped_not_computed(stack):
    """The gateway sends its deadline with each call (export/scene_request.py). A scene still queued in Triton
    once it has passed (behind a large scene sent straight to Triton; the gateway has answered 504) is skipped
    by the step, not computed for nobody, and the worker serves the next request."""
    import tritonclient.http as client

    from export.scene_request import DEADLINE_GRACE_S

    _, state, ports, gateway, _ = stack[:5]
    worker = state["worker"]
    url, model = f"127.0.0.1:{ports[0]}", "spunet_v1m1_seg" + TORCH_SUFFIX  # python-torch: one step, no check between
    side = 89
    block = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)  # 704,969 voxels
    triton = client.InferenceServerClient(url, network_timeout=300)
    body = npz_bytes(scene(1000, seed=5))

    def counts() -> tuple[int, int]:
        stats = triton.get_inference_statistics(model + "_encoder")["model_stats"][0]["inference_stats"]
        return int(stats["success"]["count"]), int(stats["fail"]["count"])

    def busy(done: list) -> None:
        other = client.InferenceServerClient(url, network_timeout=300)
        start = time.perf_counter()
        try:
            done.append(other.infer(model, _triton_inputs(client, block)).as_numpy("backbone_feat").shape)
        finally:
            done.append(time.perf_counter() - start)
            other.close()

    try:
        before = counts()
        skipped_before = worker.log.read_text().count(f"{model}_encoder: request ")
        done: list = []
        thread = threading.Thread(target=busy, args=(done,))
        thread.start()
        time.sleep(0.5)  # the large scene is running; the next one waits behind it
        late = post(gateway, "/v1/features", body, model=model, timeout_s=1)
        assert late.status_code == 504, late.text
        thread.join(120)
        assert done[0] == (len(block), 24)
        assert done[1] > 0.5 + 1 + DEADLINE_GRACE_S + 1, f"the large scene took {done[1]:.1f} s: too short a queue"
        after = post(gateway, "/v1/features", body, model=model)
        assert after.status_code == 200, after.text
        # the 504'd scene reached the step after the large one and was skipped there (Triton counts an answered
        # error as a success of the step, so the worker's log says which)
        assert counts()[0] - before[0] == 3
        skipped = [line for line in worker.log.read_text().splitlines()
                   if f"{model}_encoder: request " in line and "skipped: the caller's deadline passed" in line]
        assert len(skipped) == skipped_before + 1, skipped
        assert f"request {late.headers['x-request-id']}: skipped" in skipped[-1]  # the gateway's id, in the worker
    finally:
        triton.close()


def test_a_passed_or_malformed_deadline_is_answered_by_every_kind(stack):
    """Straight to Triton: a request whose deadline passed is skipped (CANCELLED), a deadline that is not an
    integer is a client error, a future one is served (python-onnxruntime: checked by both steps; python-torch: its one)."""
    import tritonclient.http as client

    from export.scene_request import DEADLINE_PARAMETER

    ports = stack[2]
    triton = client.InferenceServerClient(f"127.0.0.1:{ports[0]}", network_timeout=60)
    inputs = _triton_inputs(client, np.array([[0, 0, 0], [0, 0, 1], [5, 5, 5]]))
    try:
        for model in ("spunet_v1m1_seg", "spunet_v1m1_seg" + TORCH_SUFFIX):
            now_ms = int(time.time() * 1000)
            answer = triton.infer(model, inputs, parameters={DEADLINE_PARAMETER: now_ms + 60_000})
            assert answer.as_numpy("backbone_feat").shape == (3, 24)
            # a skip is CANCELLED, which Triton 2.51's HTTP endpoint answers with 400 (gRPC: CANCELLED); the
            # gateway reads the text and treats it as transient (service/workers/triton_endpoint.py)
            for deadline, text in ((now_ms - 5000, "skipped: the caller's deadline passed"),
                                   ("soon", f"{DEADLINE_PARAMETER} must be an integer")):
                with pytest.raises(Exception) as info:
                    triton.infer(model, inputs, parameters={DEADLINE_PARAMETER: deadline})
                assert text in info.value.message(), (model, info.value.message())
                assert info.value.status() == "400", (model, info.value.status(), info.value.message())
    finally:
        triton.close()


def test_dead_endpoint_is_retried_around_and_its_breaker_opens(stack):
    gateway = stack[3]
    body = npz_bytes(scene(1000, seed=4))
    for _ in range(4):  # round-robin lands on the dead endpoint every other call
        assert post(gateway, "/v1/features", body).status_code == 200
    metrics = httpx.get(gateway.url + "/metrics").text
    dead_lines = [line for line in metrics.splitlines() if line.startswith("ponder_triton_errors_total{")]
    assert dead_lines and float(dead_lines[0].rsplit(" ", 1)[1]) >= 2


def test_http_protocol_input_check_and_unreachable_servers(stack):
    from service.metrics import ServiceMetrics
    from service.settings import ServiceSettings
    from service.workers.base import EncodeJob, WorkerInputError, WorkerUnavailable
    from service.workers.triton_client import TritonWorker

    _, _, ports, _, predictors = stack[:5]
    predictor = predictors["ppt_v1m3_seg"]
    voxels = predictor.prepare(scene(2000, seed=5))

    async def over_http():
        worker = TritonWorker(ServiceSettings(worker="triton", triton_protocol="http",
                                              triton_urls=[f"127.0.0.1:{ports[0]}"]), ServiceMetrics())
        await worker.start()
        try:
            out = await worker.run(EncodeJob("ppt_v1m3_seg", voxels, "ScanNet", want_logits=True))
            wrong = voxels.__class__.from_network_input(voxels.grid_coord, voxels.feat[:, :3])
            with pytest.raises(WorkerInputError, match=r"feat \(M, 6\)"):
                await worker.run(EncodeJob("ppt_v1m3_seg", wrong, "ScanNet"))
            return out
        finally:
            await worker.stop()

    out = asyncio.run(over_http())
    (expected,) = predictor.encode([voxels], "ScanNet")
    np.testing.assert_allclose(out.features, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.logits, predictor.classify([expected], "ScanNet")[0], atol=1e-4, rtol=0)

    async def nowhere():
        settings = ServiceSettings(worker="triton", triton_urls=[f"127.0.0.1:{free_port()}"], triton_retries=2,
                                   triton_backoff_s=0.01, triton_startup_wait_s=0.2)
        worker = TritonWorker(settings, ServiceMetrics())
        await worker.start()
        try:
            assert worker.models() == {} and not (await worker.ready())[0]
            with pytest.raises(WorkerUnavailable):
                await worker.run(EncodeJob("ppt_v1m3_seg", voxels, "ScanNet"))
        finally:
            await worker.stop()

    asyncio.run(nowhere())


def _load(gateway, body: bytes, stop: threading.Event, log: list) -> None:
    """Post features requests until ``stop``; record (time sent, time answered, status, Retry-After)."""
    while not stop.is_set():
        sent = time.monotonic()
        try:
            response = post(gateway, "/v1/features", body, timeout=15)
            log.append((sent, time.monotonic(), response.status_code, response.headers.get("retry-after")))
        except httpx.TimeoutException:
            log.append((sent, time.monotonic(), "timeout", None))


def test_losing_the_worker_under_load_gives_503_then_recovers(stack):
    """SIGKILL ``ponder worker`` while requests flow: the gateway answers 503 + Retry-After (never 4xx/5xx
    otherwise, never a hang), the server and its stubs die with the worker, and a worker restarted on the same
    ports is used again without restarting the gateway. Runs last: it replaces the module's worker."""
    repo, state, ports, gateway, _, folder = stack
    body = npz_bytes(scene(1500, seed=6))
    assert processes_mentioning(str(repo)), "the tritonserver and its stubs should be running"
    stop, log = threading.Event(), []
    threads = [threading.Thread(target=_load, args=(gateway, body, stop, log)) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 120
        while not any(entry[2] == 200 for entry in log) and time.monotonic() < deadline:
            time.sleep(0.2)
        killed_at = time.monotonic()
        state["worker"].process.send_signal(signal.SIGKILL)
        state["worker"].process.wait()
        while not any(e[2] == 503 and e[0] > killed_at for e in log) and time.monotonic() < killed_at + 60:
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    after = [e for e in log if e[0] > killed_at]
    assert after and all(e[2] == 503 and e[3] for e in after), after  # no 422, no 500/502, no timeout
    assert {e[2] for e in log if e[0] <= killed_at} <= {200, 503}, log  # in flight at the kill: done or 503

    leftovers = processes_mentioning(str(repo))
    for _ in range(60):  # the server gets SIGTERM from the kernel and stops its stubs (exit timeout 5 s)
        if not leftovers:
            break
        time.sleep(0.5)
        leftovers = processes_mentioning(str(repo))
    assert not leftovers, leftovers

    worker, _ = start_triton_repo_worker(repo, folder, ports)
    state["worker"] = worker
    worker.wait_ready(240)
    for _ in range(120):  # the breaker lets a trial call through after 1 s; gRPC reconnects within a second
        response = post(gateway, "/v1/features", body, timeout=60)
        if response.status_code == 200:
            break
        assert response.status_code == 503, response.text
        time.sleep(0.5)
    assert response.status_code == 200
