"""`ponder worker --triton` and `ponder serve` refuse what Triton or uvicorn would fail on, in one line and at once:
ports out of range, the same port twice, a port in use, an unreadable config.pbtxt, an ensemble step with no model
folder, a backend the bundled (nvidia-pytriton) server lacks. Run through the real ``ponder`` script."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import PONDER

ENSEMBLE = """name: "ponder"
platform: "ensemble"
input { name: "feat" data_type: TYPE_FP32 dims: [-1, 6] }
output { name: "backbone_feat" data_type: TYPE_FP32 dims: [-1, 32] }
ensemble_scheduling {
  step { model_name: "ponder_encoder" model_version: -1
         input_map { key: "feat" value: "feat" } output_map { key: "backbone_feat" value: "backbone_feat" } }
}
"""
ENCODER = """name: "ponder_encoder"
backend: "{backend}"
input {{ name: "feat" data_type: TYPE_FP32 dims: [-1, 6] }}
output {{ name: "backbone_feat" data_type: TYPE_FP32 dims: [-1, 32] }}
"""


def ponder(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([PONDER, *map(str, args)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def refused(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "Triton worker on" not in result.stdout  # no banner before failing
    last = result.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, (needle, last)
    return last


def repository(root: Path, backend: str = "python", ensemble: str = ENSEMBLE, encoder: bool = True) -> Path:
    (root / "ponder").mkdir(parents=True)
    (root / "ponder" / "config.pbtxt").write_text(ensemble)
    if encoder:
        (root / "ponder_encoder").mkdir()
        (root / "ponder_encoder" / "config.pbtxt").write_text(ENCODER.format(backend=backend))
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(repo: Path, *ports: int) -> subprocess.CompletedProcess:
    http, grpc, metrics = ports or (free_port(), free_port(), free_port())
    return ponder("worker", "--triton", "--repo", repo, "--http-port", http, "--grpc-port", grpc,
                  "--metrics-port", metrics)


@pytest.mark.parametrize("command", [("serve", "--port", "70000"), ("worker", "--triton", "--repo", ".",
                                                                     "--grpc-port", "0")])
def test_ports_out_of_range_are_usage_errors(command):
    result = ponder(*command)
    assert result.returncode == 2 and "is not a port number (1-65535)" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_worker_refuses_the_same_port_twice_and_a_port_in_use(tmp_path):
    repo = repository(tmp_path / "repo")
    port = free_port()
    refused(worker(repo, port, port, free_port()), "are both", "three different ports")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        refused(worker(repo, busy, free_port(), free_port()), f"--http-port {busy}", "cannot listen")


def test_worker_refuses_a_missing_or_empty_repository_before_its_banner(tmp_path):
    (tmp_path / "empty").mkdir()
    for repo in (tmp_path / "missing", tmp_path / "empty"):
        refused(worker(repo), str(repo), "not a Triton model repository", "ponder export triton-repo")


def test_worker_refuses_an_unreadable_config(tmp_path):
    repo = repository(tmp_path / "repo", ensemble=ENSEMBLE.replace('"ensemble"', '"ensemble'))
    refused(worker(repo), "ponder/config.pbtxt", "not a readable Triton model config")


def test_worker_refuses_an_ensemble_step_without_its_model(tmp_path):
    refused(worker(repository(tmp_path / "repo", encoder=False)), "calls model 'ponder_encoder'", "no folder")


def test_bundled_server_refuses_an_onnxruntime_repository_with_the_kind_to_use(tmp_path):
    """`ponder export triton-repo`'s default --kind onnxruntime is for NVIDIA's image; the bundled server says so."""
    from export.triton_serve import find_tritonserver

    if (find_tritonserver().backend_dir / "onnxruntime").is_dir():
        pytest.skip("this Triton server has the onnxruntime backend")
    refused(worker(repository(tmp_path / "repo", backend="onnxruntime")), "backend 'onnxruntime'",
            "--kind python-torch")


@pytest.mark.parametrize("url, needle", [("http://127.0.0.1:8101", "without a scheme (e.g. '127.0.0.1:8101')"),
                                         ("127.0.0.1", "expected host:port"), ("h:99999", "expected host:port")])
def test_triton_endpoints_are_host_and_port(url, needle):
    from pydantic import ValidationError

    from service.settings import ServiceSettings

    with pytest.raises(ValidationError, match=needle.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        ServiceSettings(worker="triton", triton_urls=[url])
    assert ServiceSettings(triton_urls=["h1:8101", "[::1]:8101"]).triton_urls == ["h1:8101", "[::1]:8101"]


def test_gateway_startup_says_why_no_triton_endpoint_answered(caplog):
    """The startup warning carries each endpoint's last error (here: nothing listens on its port)."""
    import asyncio
    import logging

    from service.metrics import ServiceMetrics
    from service.settings import ServiceSettings
    from service.workers.triton_client import TritonWorker

    port = free_port()
    worker = TritonWorker(ServiceSettings(worker="triton", triton_urls=[f"127.0.0.1:{port}"],
                                          triton_startup_wait_s=1.0), ServiceMetrics())

    readiness = []

    async def start_and_stop() -> None:
        await worker.start()
        readiness.append(await worker.ready())
        await worker.stop()

    with caplog.at_level(logging.WARNING, logger="service.triton"):
        asyncio.run(start_and_stop())
    warning = next(r.getMessage() for r in caplog.records if "no Triton endpoint answered" in r.getMessage())
    assert f"127.0.0.1:{port}: " in warning and "no answer" not in warning, warning
    ready, detail = readiness[0]  # /readyz says the same while the gateway keeps trying
    assert not ready and f"127.0.0.1:{port}: " in detail, detail


def test_serve_names_bad_settings_by_their_environment_variable(tmp_path):
    """One line an operator can act on: the variable they set, the problem and the value, every bad one."""
    import os

    env = {**os.environ, "PONDER_MAX_BATCH": "-1", "PONDER_TRITON_URLS": '["http://a:1"]'}
    result = subprocess.run([PONDER, "serve", "--port", str(free_port())], capture_output=True, text=True,
                            timeout=120, env=env)
    last = refused(result, "PONDER_MAX_BATCH (max_batch)", "greater than or equal to 1", "got '-1'",
                   "PONDER_TRITON_URLS", "without a scheme")
    assert "errors.pydantic.dev" not in last and len(result.stderr.strip().splitlines()) == 1, result.stderr
