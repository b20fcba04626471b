"""`ponder worker --triton` supervises the real tritonserver it runs (export/triton_supervise.py): a Python stub killed
mid-request makes the worker stop the server and exit with ``EXIT_STUB_DIED`` (Triton itself would answer health
200 and fail every request forever), leaving no shared-memory region of its group behind; a killed server is
named in the log; a repository Triton refuses ends with a line naming the first real error; ``--tritonserver``
accepts nvidia-pytriton's own binary and refuses anything that is not a Triton install in one line."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_service import SPUNET, Server, free_port, processes_mentioning, require_fixtures  # noqa: E402

from export.triton_supervise import EXIT_STUB_DIED  # noqa: E402

pytestmark = pytest.mark.slow  # several Triton workers started and killed, ~60 s: run with -m slow
SHM = Path("/dev/shm")
PONDER_BIN = str(Path(sys.executable).parent / "ponder")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The spunet fixture exported as a python-onnxruntime ensemble ``ponder`` (what nvidia-pytriton serves)."""
    require_fixtures()
    pytest.importorskip("pytriton")
    from ponder.cli import main as ponder

    repo = tmp_path_factory.mktemp("supervision") / "repo"
    assert ponder(["export", "triton-repo", str(SPUNET), "-o", str(repo), "--kind", "python-onnxruntime",
                   "--threads", "1"]) == 0
    return repo


def start_worker(repo: Path, folder: Path, *extra: str) -> Server:
    """``ponder worker --triton`` on free loopback ports; ``server.url`` is Triton's HTTP endpoint."""
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    command = [PONDER_BIN, "worker", "--triton", "--repo", str(repo), "--http-port", str(http_port),
               "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), *extra]
    return Server(command, {"OMP_NUM_THREADS": "1"}, "/v2/health/ready", http_port,
                  folder / f"worker-{http_port}.log")


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: [state, ppid, pgrp, ..., utime at 11, stime at 12, ...]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def server_and_stubs(worker: Server) -> tuple[int, dict[str, int]]:
    """(tritonserver pid, {model: stub pid}) of a ready worker, read from /proc."""
    server = next(int(p.name) for p in Path("/proc").glob("[0-9]*")
                  if _quiet(lambda: int(stat_fields(int(p.name))[1])) == worker.process.pid)
    stubs = {}
    for entry in Path("/proc").glob("[0-9]*"):
        args = _quiet(lambda: (entry / "cmdline").read_bytes().split(b"\0")) or []
        if args and args[0].endswith(b"triton_python_backend_stub") and _quiet(
                lambda: int(stat_fields(int(entry.name))[2])) == server:
            stubs[Path(args[1].decode()).parent.parent.name] = int(entry.name)
    return server, stubs


def shm_regions(server: int, stubs: dict[str, int]) -> set[str]:
    """Shared-memory regions of this server: those it maps and those on its stubs' command lines."""
    maps = Path(f"/proc/{server}/maps").read_text()
    names = {word.rsplit("/", 1)[1] for word in maps.split() if word.startswith("/dev/shm/triton_python_backend")}
    for pid in stubs.values():
        names |= {a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                  if a.startswith(b"triton_python_backend_shm_region_")}
    return names


def _quiet(read):
    try:
        return read()
    except (OSError, ValueError, IndexError):
        return None


def cpu_ticks(pid: int) -> int:
    fields = stat_fields(pid)
    return int(fields[11]) + int(fields[12])


def infer_large_scene(http_port: int, outcome: list) -> None:
    """One 200k-voxel request straight to Triton's ensemble (seconds of encoder work on this machine)."""
    import tritonclient.http as client

    rng = np.random.default_rng(0)
    grid = np.unique(rng.integers(0, 400, (200_000, 3)).astype(np.int32), axis=0)
    tensors = [("grid_coord", grid, "INT32"), ("batch", np.zeros(len(grid), np.int32), "INT32"),
               ("feat", rng.random((len(grid), 6), dtype=np.float32), "FP32")]
    inputs = []
    for name, array, dtype in tensors:
        inputs.append(client.InferInput(name, list(array.shape), dtype))
        inputs[-1].set_data_from_numpy(array)
    triton = client.InferenceServerClient(f"127.0.0.1:{http_port}", network_timeout=120)
    try:
        outcome.append(triton.infer("ponder", inputs).as_numpy("backbone_feat").shape)
    except Exception as exc:  # noqa: BLE001 - the failure itself is what is recorded
        outcome.append(exc)
    finally:
        triton.close()


def wait_exit(worker: Server, timeout: float) -> tuple[int, float]:
    started = time.monotonic()
    code = worker.process.wait(timeout=timeout)
    return code, time.monotonic() - started


def test_a_stub_killed_mid_request_stops_the_worker_and_cleans_its_shared_memory(repo, tmp_path):
    """H1 + M1: kill -9 the encoder's stub while it computes. Without supervision Triton stays 'ready' and fails
    every request; killed mid-request, Triton's stop overruns its exit timeout and leaves the stub's region."""
    worker = start_worker(repo, tmp_path)
    try:
        worker.wait_ready(240)
        server, stubs = server_and_stubs(worker)
        assert set(stubs) == {"ponder_encoder", "ponder_kernel_maps"}, stubs
        regions = shm_regions(server, stubs)
        assert len(regions) >= 2 and all((SHM / name).exists() for name in regions), regions
        encoder = stubs["ponder_encoder"]
        idle = cpu_ticks(encoder)
        outcome: list = []
        request = threading.Thread(target=infer_large_scene, args=(worker.port, outcome))
        request.start()
        deadline = time.monotonic() + 120
        while cpu_ticks(encoder) - idle < os.sysconf("SC_CLK_TCK") // 2:  # the encoder has worked 0.5 s
            assert time.monotonic() < deadline and request.is_alive(), ("the encoder never started", outcome)
            time.sleep(0.05)
        os.kill(encoder, signal.SIGKILL)
        code, took = wait_exit(worker, 60)
        request.join(60)
    finally:
        worker.stop()
    log = worker.log.read_text()
    assert code == EXIT_STUB_DIED == 75, log[-3000:]
    assert took < 30, took  # noticed within ~1 s, then Triton's 5 s exit timeout and the group's kill
    died = [line for line in log.splitlines() if "Python stub of model 'ponder_encoder'" in line]
    assert len(died) == 1 and f"pid {encoder}" in died[0] and "status 75" in died[0], log[-3000:]
    assert outcome and isinstance(outcome[0], Exception) and "not healthy" in str(outcome[0]), outcome
    assert not [name for name in regions if (SHM / name).exists()], "shared-memory regions left behind"
    assert not processes_mentioning(str(repo)), "tritonserver or a stub outlived the worker"


def test_a_killed_tritonserver_is_named_and_an_explicit_pytriton_binary_runs(repo, tmp_path):
    """M4: ``--tritonserver`` = nvidia-pytriton's own binary gets the same backend folder as the default (it used
    to fail: stub not found). L1: kill -9 of the server is one log line and status 128 + 9."""
    import pytriton

    binary = Path(pytriton.__file__).resolve().parent / "tritonserver" / "bin" / "tritonserver"
    worker = start_worker(repo, tmp_path, "--tritonserver", str(binary))
    try:
        worker.wait_ready(240)
        server, stubs = server_and_stubs(worker)
        regions = shm_regions(server, stubs)
        os.kill(server, signal.SIGKILL)
        code, _ = wait_exit(worker, 60)
    finally:
        worker.stop()
    log = worker.log.read_text()
    assert code == 128 + signal.SIGKILL, log[-3000:]
    assert "tritonserver died (signal 9, SIGKILL)" in log.strip().splitlines()[-1], log[-3000:]
    assert not [name for name in regions if (SHM / name).exists()], "shared-memory regions left behind"
    deadline = time.monotonic() + 30  # the stubs were killed with the group; only zombies may linger
    while processes_mentioning(str(repo)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not processes_mentioning(str(repo))


def test_a_repository_triton_refuses_ends_with_its_first_error(repo, tmp_path):
    """M6: not Triton's generic 'failed to load all models' after 100 lines of tables, but why."""
    broken = tmp_path / "broken"
    shutil.copytree(repo, broken)
    (broken / "ponder_encoder" / "1" / "model.onnx").unlink()
    worker = start_worker(broken, tmp_path)
    try:
        code, _ = wait_exit(worker, 240)
    finally:
        worker.stop()
    last = worker.log.read_text().strip().splitlines()[-1]
    assert code == 1, last
    assert "tritonserver exited with status 1" in last and "failed to load 'ponder_encoder'" in last, last
    assert "model.onnx" in last and "File doesn't exist" in last, last


def test_a_stub_that_crashes_while_models_load_ends_the_worker_instead_of_a_silent_wait(repo, tmp_path):
    """A model folder whose name has a space (renamed by hand: the export refuses it) makes both Python stubs die at
    start ('stol'); Triton 2.51 then waits for them for ever, no port open, no error. The worker stops it."""
    spaced = tmp_path / "spaced"
    shutil.copytree(repo, spaced)
    for folder in ("ponder", "ponder_kernel_maps", "ponder_encoder"):
        config = spaced / folder / "config.pbtxt"
        config.write_text(config.read_text().replace("ponder", "my ponder"))
        (spaced / folder).rename(spaced / folder.replace("ponder", "my ponder"))
    worker = start_worker(spaced, tmp_path)
    try:
        code, _ = wait_exit(worker, 120)
    finally:
        worker.stop()
    lines = worker.log.read_text().strip().splitlines()
    assert code == 1, lines[-3:]
    assert "a Python stub crashed at start" in lines[-1], lines[-1]
    assert any("crashed while tritonserver loaded the repository" in line for line in lines)


@pytest.mark.parametrize("setting", ["flag", "environment"])
def test_a_tritonserver_path_that_is_no_triton_install_is_refused_in_one_line(tmp_path, setting):
    """M4: not '[Errno 2] No such file or directory: /usr/backends' but what was expected, naming the setting."""
    (tmp_path / "repo" / "m").mkdir(parents=True)
    (tmp_path / "repo" / "m" / "config.pbtxt").write_text('name: "m"\nbackend: "python"\n')
    command = [PONDER_BIN, "worker", "--triton", "--repo", str(tmp_path / "repo"), "--http-port", str(free_port()),
               "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    env = dict(os.environ)
    if setting == "flag":
        command += ["--tritonserver", "/bin/true"]
    else:
        env["PONDER_TRITONSERVER"] = "/bin/true"
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "--tritonserver / PONDER_TRITONSERVER /bin/true: not a Triton install" in lines[0]
    assert "backends" in lines[0] and "Errno" not in lines[0]
