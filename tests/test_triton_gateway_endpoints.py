"""The Triton gateway against misbehaving endpoints, with real processes: two ``ponder worker --triton``
servers whose repositories hold different models under the same name ``ponder`` (the bundled default model,
32 features, and the SpUNet fixture, 24 features: what a rolling upgrade looks like), and uvicorn gateways in
front of them. Covers: /readyz answering promptly while a server is stalled (SIGSTOP), an endpoint with other
model cards being excluded and named instead of answering 200 with the wrong width, a worker redeployed with
another model (every answer checked against the card; the new cards served once every endpoint agrees), and
503s carrying the underlying error once the circuit breakers are open."""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_service import (SPUNET, npz_bytes, processes_mentioning, require_fixtures, scene,  # noqa: E402
                              start_gateway, start_triton_repo_worker)

pytestmark = pytest.mark.slow  # two Triton workers and two gateways, ~60 s: run with -m slow
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "model" / "default_model"
BREAKER = {"PONDER_TRITON_BACKOFF_S": "0.01", "PONDER_BREAKER_FAILURES": "2", "PONDER_BREAKER_RESET_S": "1"}


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory):
    """Workers A (default model, 32-d) and B (SpUNet, 24-d), both serving ``ponder``; a gateway on A alone and a
    gateway on A then B. Yields a dict; the last test replaces A's worker."""
    require_fixtures()
    pytest.importorskip("pytriton")
    from ponder.cli import main as ponder

    folder = tmp_path_factory.mktemp("triton-endpoints")
    repos = {"a": folder / "repo_default", "b": folder / "repo_spunet"}
    for repo, source in ((repos["a"], DEFAULT_MODEL), (repos["b"], SPUNET)):
        assert ponder(["export", "triton-repo", str(source), "-o", str(repo), "--kind", "python-onnxruntime",
                       "--threads", "1"]) == 0
    started = []
    try:
        (worker_a, ports_a), (worker_b, ports_b) = (start_triton_repo_worker(repos[k], folder) for k in "ab")
        started += [worker_a, worker_b]
        urls = {"a": f"127.0.0.1:{ports_a[1]}", "b": f"127.0.0.1:{ports_b[1]}"}
        for worker in (worker_a, worker_b):
            worker.wait_ready(240)
        single = start_gateway({"PONDER_WORKER": "triton", "PONDER_TRITON_URLS": urls["a"], **BREAKER}, folder)
        mixed = start_gateway({"PONDER_WORKER": "triton", "PONDER_TRITON_URLS": f"{urls['a']},{urls['b']}",
                               **BREAKER}, folder)
        started[:0] = [single, mixed]  # gateways stop first: open clients delay Triton's exit
        for gateway in (single, mixed):
            gateway.wait_ready(120)
        yield {"repos": repos, "ports_a": ports_a, "urls": urls, "single": single, "mixed": mixed,
               "workers": started, "folder": folder}
    finally:
        for server in started:
            server.stop()


def features(gateway, body: bytes) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/features", content=body, timeout=120,
                      headers={"Accept": "application/x-npy"})


def served_width(gateway) -> int:
    (entry,) = httpx.get(gateway.url + "/v1/models", timeout=10).json()["models"]
    return entry["feature_dim"]


def tritonserver_pid(repo: Path) -> int:
    (pid,) = [pid for pid, cmdline in processes_mentioning(str(repo)) if "bin/tritonserver" in cmdline.split()[0]]
    return pid


def test_readyz_answers_promptly_while_the_triton_server_is_stopped(endpoints):
    single, mixed, url_a = endpoints["single"], endpoints["mixed"], endpoints["urls"]["a"]
    pid = tritonserver_pid(endpoints["repos"]["a"])
    os.kill(pid, signal.SIGSTOP)
    try:
        for gateway in (single, mixed):  # mixed: B is excluded for "ponder", so A stalled = nothing ready
            start = time.monotonic()
            response = httpx.get(gateway.url + "/readyz", timeout=30)
            elapsed = time.monotonic() - start
            assert response.status_code == 503 and elapsed < 6, (elapsed, response.text)
            assert url_a in response.json()["detail"], response.text
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while httpx.get(single.url + "/readyz", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "the gateway did not become ready again after SIGCONT"
        time.sleep(0.5)


def test_an_endpoint_serving_another_model_under_the_same_name_is_excluded_and_named(endpoints):
    mixed, url_b = endpoints["mixed"], endpoints["urls"]["b"]
    assert served_width(mixed) == 32  # the first listed endpoint (A) sets the cards
    body = npz_bytes(scene(1000, seed=3))
    for _ in range(6):  # round-robin would alternate A and B
        response = features(mixed, body)
        assert response.status_code == 200, response.text
        assert np.load(io.BytesIO(response.content)).shape == (1000, 32)
    ready = httpx.get(mixed.url + "/readyz", timeout=30)
    detail = ready.json()["detail"]
    assert ready.status_code == 200 and url_b in detail and "'ponder'" in detail and "feature_dim 24" in detail
    warnings = [line for line in mixed.log.read_text().splitlines() if "is not used for model" in line]
    assert len(warnings) == 1 and url_b in warnings[0], warnings  # logged once, not per request or probe


def test_a_worker_redeployed_with_another_model_is_never_answered_with_its_old_card(endpoints):
    """Replace A's worker by one serving B's model on the same ports. The gateway on A alone, idle meanwhile,
    meets the new server on its next call: the answer's width contradicts the card, so 503 naming A (never a
    200 with 24 columns under a 32-column card, never a 422), then the new card is served. The mixed gateway,
    asked during the outage, names A's underlying error behind its open breaker, and once A and B agree it
    serves their new card and uses both."""
    single, mixed, urls, workers = endpoints["single"], endpoints["mixed"], endpoints["urls"], endpoints["workers"]
    body = npz_bytes(scene(1000, seed=4))
    old = next(w for w in workers if w.port == endpoints["ports_a"][0])
    old.stop()
    answers = [features(mixed, body) for _ in range(4)]
    assert {r.status_code for r in answers} == {503}, [r.text for r in answers]
    opened = [r.json()["detail"] for r in answers if "circuit breaker is open" in r.json()["detail"]]
    assert opened and all(f"last: {urls['a']}: " in d and "connect" in d for d in opened), opened

    new, _ = start_triton_repo_worker(endpoints["repos"]["b"], endpoints["folder"], endpoints["ports_a"])
    workers[workers.index(old)] = new
    new.wait_ready(240)
    statuses, details = [], []
    for _ in range(20):
        response = features(single, body)
        statuses.append(response.status_code)
        details.append(response.text)
        if response.status_code == 200:
            assert np.load(io.BytesIO(response.content)).shape == (1000, served_width(single)) == (1000, 24)
            break
        assert response.status_code == 503 and urls["a"] in response.json()["detail"], response.text
        time.sleep(0.5)
    assert statuses[0] == 503 and statuses[-1] == 200, statuses
    assert "feature_dim 24, expected 32" in details[0], details[0]  # the cause, not "your input is wrong"

    deadline = time.monotonic() + 30
    while (ready := httpx.get(mixed.url + "/readyz", timeout=30)).status_code != 200 or served_width(mixed) != 24:
        assert time.monotonic() < deadline, ready.text
        time.sleep(0.5)
    assert "not used" not in ready.json()["detail"] and urls["a"] in ready.json()["detail"], ready.text
    for _ in range(4):  # both endpoints now take "ponder"
        response = features(mixed, body)
        assert response.status_code == 200 and np.load(io.BytesIO(response.content)).shape == (1000, 24)
