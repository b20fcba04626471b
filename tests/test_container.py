"""The images, built and run with podman (deploy/check_images.sh): the full gateway image with nothing mounted
serves the bundled default model and answers /v1/features as the in-process gateway does; a public bind without
API keys is refused; the slim gateway image holds no torch, spconv or Triton server. The compose stack
(deploy/check_compose.sh: podman-compose, slim gateway + CPU Triton worker on an exported python-torch
repository + Prometheus) answers a request through the gateway as the in-process model does; the CPU worker image
with nothing mounted serves the default model it was built with.

Slow and needs root + podman/runc/mmdebstrap:  .venv/bin/python -m pytest -m container tests/test_container.py
(first run: ~2 min for the base image, ~6 min for the cold builds on 2 cores; the compose check adds the
worker-cpu image and a Prometheus image from Debian's package)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import time

import httpx
import numpy as np
import pytest

from conftest import REPO
from conftest_service import free_port, gateway, npz_bytes, require_fixtures, scene

pytestmark = [pytest.mark.container, pytest.mark.slow]

SCRIPT = REPO / "deploy" / "check_images.sh"
NPY = "application/x-npy"


def _check(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _podman(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", "--root", "/tmp/ponder-podman/storage", "--runroot", "/tmp/ponder-podman/run",
                           "--storage-driver", "overlay", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "CONTAINERS_CONF": "/tmp/ponder-podman/containers.conf"})


def _require_podman() -> None:
    missing = [tool for tool in ("podman", "runc", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install -y podman buildah runc mmdebstrap)")
    if os.geteuid() != 0:
        pytest.skip("the podman recipe here is rootful (runc); run as root")


@pytest.fixture(scope="module")
def podman_storage():
    """The podman storage of deploy/check_images.sh, removed after this module's tests (images are GBs) unless
    PONDER_KEEP_IMAGES=1 keeps it for a warm rerun."""
    _require_podman()
    yield
    if os.environ.get("PONDER_KEEP_IMAGES") != "1":
        _check("clean", timeout=300)


@pytest.fixture(scope="module")
def images(podman_storage):
    built = _check("build", "gateway", "gateway-full")
    assert built.returncode == 0, built.stderr[-3000:]
    return built.stdout


def test_full_image_serves_the_default_model_like_the_in_process_gateway(images):
    require_fixtures()
    port = free_port()
    started = _check("run", "gateway-full", str(port), "-e", "PONDER_API_KEYS=check-key", timeout=600)
    assert started.returncode == 0, started.stderr[-3000:]
    url, headers = f"http://127.0.0.1:{port}", {"X-API-Key": "check-key", "Accept": NPY,
                                                "Content-Type": "application/octet-stream"}
    assert httpx.get(url + "/readyz", timeout=10).status_code == 200
    models = httpx.get(url + "/v1/models", headers=headers, timeout=10).json()
    assert models["default_model"] == "default"  # empty /models: the bundled default, not an exit
    body = npz_bytes(scene(3000))
    answer = httpx.post(url + "/v1/features", content=body, headers=headers, timeout=120)
    assert answer.status_code == 200, answer.text
    assert httpx.post(url + "/v1/features", content=body, timeout=30).status_code == 401
    with gateway({}) as local:  # the same request to an in-process gateway on this machine
        expected = httpx.post(local.url + "/v1/features", content=body, headers=headers, timeout=120)
    features = np.load(io.BytesIO(answer.content), allow_pickle=False)
    reference = np.load(io.BytesIO(expected.content), allow_pickle=False)
    assert features.shape == reference.shape == (3000, 32)
    np.testing.assert_allclose(features, reference, atol=1e-4)


def test_public_bind_without_api_keys_is_refused_in_the_image(images):
    port = free_port()
    started = _check("run", "gateway-full", str(port), timeout=120)
    assert started.returncode != 0
    deadline = time.monotonic() + 60
    logs = ""
    while time.monotonic() < deadline and "without API keys" not in logs:
        shown = _check("logs", "gateway-full", timeout=60)
        logs = shown.stdout + shown.stderr
        time.sleep(1)
    assert "without API keys" in logs


def test_slim_gateway_image_has_no_torch_spconv_or_triton_server(images):
    probe = ("import importlib.util as u; print(' '.join(m for m in ('torch', 'spconv', 'pytriton', 'fastapi', "
             "'tritonclient') if u.find_spec(m)))")
    result = _podman("run", "--rm", "--network", "host", "localhost/ponder-gateway:check", "python", "-c", probe)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["fastapi", "tritonclient"]


def test_cpu_worker_image_with_nothing_mounted_serves_the_default_model(podman_storage):
    """worker-cpu without a repository at /models: the default model's python-torch repository exported into
    the image, answering through a gateway on this machine as the in-process gateway does."""
    require_fixtures()
    built = _check("build", "worker-cpu")
    assert built.returncode == 0, built.stderr[-3000:]
    http, grpc, metrics = free_port(), free_port(), free_port()
    name = "ponder-check-worker-default"
    _podman("rm", "-f", name)
    started = _podman("run", "-d", "--name", name, "--network", "host", "-e", f"PONDER_TRITON_HTTP_PORT={http}",
                      "-e", f"PONDER_TRITON_GRPC_PORT={grpc}", "-e", f"PONDER_TRITON_METRICS_PORT={metrics}",
                      "localhost/ponder-worker-cpu:check")
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        deadline, ready = time.monotonic() + 300, False
        while time.monotonic() < deadline and not ready:
            try:
                ready = httpx.get(f"http://127.0.0.1:{http}/v2/models/ponder/ready", timeout=5).status_code == 200
            except httpx.HTTPError:
                pass
            time.sleep(1)
        shown = _podman("logs", name)
        logs = shown.stdout + shown.stderr
        assert ready, logs[-3000:]
        assert "serving the bundled default model" in logs
        body = npz_bytes(scene(3000))
        headers = {"Accept": NPY, "Content-Type": "application/octet-stream"}
        with gateway({"PONDER_WORKER": "triton", "PONDER_TRITON_URLS": f"127.0.0.1:{grpc}"}) as through_worker:
            answer = httpx.post(through_worker.url + "/v1/features", content=body, headers=headers, timeout=120)
        with gateway({}) as local:
            expected = httpx.post(local.url + "/v1/features", content=body, headers=headers, timeout=120)
        assert answer.status_code == 200, answer.text
        features = np.load(io.BytesIO(answer.content), allow_pickle=False)
        reference = np.load(io.BytesIO(expected.content), allow_pickle=False)
        assert features.shape == reference.shape == (3000, 32)
        np.testing.assert_allclose(features, reference, atol=1e-4)
    finally:
        _podman("rm", "-f", name)


def test_compose_stack_answers_through_the_cpu_triton_worker_like_the_in_process_model(podman_storage):
    require_fixtures()
    compose = REPO / ".venv" / "bin" / "podman-compose"
    if shutil.which("podman-compose") is None and not compose.exists():
        pytest.skip("podman-compose not installed (pip install podman-compose)")
    env = {**os.environ, "PONDER_CHECK_PORT": str(free_port()), "PONDER_CHECK_PROMETHEUS_PORT": str(free_port())}
    result = subprocess.run([str(REPO / "deploy" / "check_compose.sh")], capture_output=True, text=True,
                            timeout=2400, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = dict(line.removeprefix("compose: ").split(" ", 1) for line in result.stdout.splitlines()
                 if line.startswith("compose: "))
    assert lines["max_abs_diff_vs_in_process"].split()[1] == "(ok,"
    assert lines["default_model"] == "ponder"  # the exported repository's ensemble, learnt from Triton
    assert lines["prometheus_ponder-gateway"] == "up"
