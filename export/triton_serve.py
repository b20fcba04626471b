"""Run a real ``tritonserver`` on a model repository written by `export.triton_repo` (``ponder worker
--triton --repo REPO`` is a thin front for `serve_repository`).

Which server: ``--tritonserver PATH`` / ``PONDER_TRITONSERVER``, else NVIDIA's image layout
(``/opt/tritonserver``: every backend, including onnxruntime and tensorrt), else the binary inside
nvidia-pytriton, which has only the Python backend (so ``--kind python-torch`` and ``python-onnxruntime``
repositories). The
pytriton binary needs a backend folder holding the Python backend plus the stub built for this Python, the
Python LIBDIR and the wheel's bundled libraries on ``LD_LIBRARY_PATH``; every server gets this interpreter's
``bin`` first on ``PATH`` (the stub's embedded Python finds its prefix, hence the venv's packages, there)
and the folder holding the ponder packages on ``PYTHONPATH`` (the kernel-map step imports them).

Lifetime: the server runs in its own process group (its Python stubs are forked into it) with a
parent-death signal, so it stops when this process dies for any reason, SIGKILL included; SIGTERM/SIGINT
are forwarded, and whatever is left of the group after the exit timeout is killed (with the shared-memory
regions its Python stubs used, which a killed server or stub cannot remove).

Supervision (`export.triton_supervise`): a Python stub that dies stops the server and the worker exits
with ``EXIT_STUB_DIED`` to be restarted; Triton's log is relayed and a failed start ends with its first error.

Python stubs get ``STUB_TIMEOUT_S`` to start instead of Triton's 30 s: on a loaded machine importing torch /
onnxruntime took longer, and the python backend of Triton 2.51 then waits forever for the stub it gave up on.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.triton_supervise import WATCH_INTERVAL_S, Supervisor, kill_group, shm_regions

LOG = logging.getLogger("export.triton")
DEFAULT_HTTP_PORT, DEFAULT_GRPC_PORT, DEFAULT_METRICS_PORT = 8100, 8101, 8102  # the gateway keeps 8000
NVIDIA_IMAGE_SERVER = Path("/opt/tritonserver/bin/tritonserver")
STUB_TIMEOUT_S = 300
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class TritonInstall:
    """A tritonserver binary, the backend folder it loads backends from, and extra library folders."""

    binary: Path
    backend_dir: Path
    library_dirs: tuple[Path, ...] = ()


def find_tritonserver(binary: str | Path | None = None) -> TritonInstall:
    """The server to run (see the module docstring for the order). FileNotFoundError when none is found."""
    binary = binary or os.environ.get("PONDER_TRITONSERVER")
    if binary:
        return explicit_install(Path(binary))
    if NVIDIA_IMAGE_SERVER.is_file():
        return TritonInstall(NVIDIA_IMAGE_SERVER, NVIDIA_IMAGE_SERVER.parent.parent / "backends")
    return pytriton_install()


def explicit_install(path: Path) -> TritonInstall:
    """A binary named by --tritonserver / PONDER_TRITONSERVER: a Triton install (``<root>/bin/tritonserver``
    beside ``<root>/backends``, NVIDIA's layout) or nvidia-pytriton's, which needs the same backend-folder
    preparation as the default. Anything else is refused here, in one line, before Triton starts."""
    flag = "--tritonserver / PONDER_TRITONSERVER"
    if not path.is_file() or not os.access(path, os.X_OK):
        raise FileNotFoundError(f"{flag} {path}: no executable tritonserver binary there")
    root = path.resolve().parent.parent
    if (root / "python_backend_stubs").is_dir():  # nvidia-pytriton's layout
        return _pytriton_layout(root)
    if not (root / "backends").is_dir():
        raise FileNotFoundError(f"{flag} {path}: not a Triton install (expected its backends in {root / 'backends'}, "
                                "as in /opt/tritonserver/{bin,backends}); leave it unset for nvidia-pytriton's server")
    return TritonInstall(path, root / "backends")


def pytriton_install() -> TritonInstall:
    """The tritonserver inside nvidia-pytriton, with a backend folder prepared for this Python."""
    try:
        import pytriton
    except ImportError as exc:
        raise FileNotFoundError("no tritonserver found: install nvidia-pytriton, run in NVIDIA's Triton image, or "
                                "pass --tritonserver / PONDER_TRITONSERVER") from exc
    return _pytriton_layout(Path(pytriton.__file__).resolve().parent / "tritonserver")


def _pytriton_layout(root: Path) -> TritonInstall:
    """``root`` = nvidia-pytriton's ``tritonserver`` folder; its libraries sit beside the package."""
    libs = root.parent.parent / "nvidia_pytriton.libs"
    return TritonInstall(root / "bin" / "tritonserver", _python_backend_dir(root), (libs,) if libs.is_dir() else ())


def _python_backend_dir(root: Path) -> Path:
    """``<dir>/python/`` = pytriton's Python backend + the stub for this Python version, as symlinks in a
    folder keyed by the install and the version (made once, atomically, reused by later workers)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise FileNotFoundError(f"nvidia-pytriton has no Python-backend stub for Python {version} ({stub})")
    key = hashlib.sha256(f"{root}|{version}".encode()).hexdigest()[:12]
    target = Path(tempfile.gettempdir()) / f"ponder-triton-backends-{os.getuid()}" / key
    if not (target / "python" / "triton_python_backend_stub").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent))
        (staging / "python").mkdir()
        for item in (root / "backends" / "python").iterdir():
            if item.name != "__pycache__":
                (staging / "python" / item.name).symlink_to(item)
        (staging / "python" / stub.name).symlink_to(stub)
        try:
            staging.rename(target)
        except OSError:  # another worker made it meanwhile
            shutil.rmtree(staging, ignore_errors=True)
    return target


def server_environment(install: TritonInstall, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the server (and the Python stubs it forks) needs; see the module docstring."""
    env = dict(os.environ if base is None else base)

    def prepend(var: str, *paths: Path | str) -> None:
        current = [p for p in env.get(var, "").split(os.pathsep) if p]
        first = [str(p) for p in paths if p and str(p) not in current]
        env[var] = os.pathsep.join(first + current)

    prepend("LD_LIBRARY_PATH", sysconfig.get_config_var("LIBDIR") or "", *install.library_dirs)
    prepend("PATH", Path(sys.executable).parent)
    import model  # the folder holding the ponder packages, for the kernel-map step's imports

    prepend("PYTHONPATH", Path(model.__file__).resolve().parent.parent)
    return env


def server_command(install: TritonInstall, repo: Path, host: str = "127.0.0.1", http_port: int = DEFAULT_HTTP_PORT,
                   grpc_port: int = DEFAULT_GRPC_PORT, metrics_port: int = DEFAULT_METRICS_PORT,
                   exit_timeout_s: int = 5, extra: tuple[str, ...] = ()) -> list[str]:
    return [str(install.binary), f"--model-repository={repo}", f"--backend-directory={install.backend_dir}",
            f"--http-address={host}", f"--http-port={http_port}", f"--grpc-address={host}",
            f"--grpc-port={grpc_port}", f"--metrics-address={host}", f"--metrics-port={metrics_port}",
            f"--exit-timeout-secs={exit_timeout_s}", "--strict-readiness=true",
            f"--backend-config=python,stub-timeout-seconds={STUB_TIMEOUT_S}", *extra]


def _die_with_parent(parent: int) -> None:
    """preexec_fn: SIGTERM when the parent dies (checked after setting, in case it already has). SIGPIPE is
    ignored: the server logs into our pipe, and after our death it must shut down, not die mid-sentence."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    libc.signal(signal.SIGPIPE, ctypes.c_void_p(1))  # SIG_IGN
    if os.getppid() != parent:
        os._exit(1)


def start_server(command: list[str], env: dict[str, str], **popen: Any) -> subprocess.Popen:
    """The server in a new process group (session) that receives SIGTERM when this process dies."""
    parent = os.getpid()
    return subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=lambda: _die_with_parent(parent),
                            **popen)


def stop_server(process: subprocess.Popen, grace_s: float = 15.0, sig: int = signal.SIGTERM,
                regions: set[str] = frozenset()) -> int:
    """Ask the server to stop, wait ``grace_s``, then kill its whole group (stubs included) and remove the
    shared-memory regions its stubs used: ``regions`` (recorded while they lived) and those of live stubs."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            LOG.warning("tritonserver did not stop within %g s; killing its process group", grace_s)
    regions = set(regions) | shm_regions(process.pid)
    kill_group(process.pid)
    code = process.wait()
    for name in regions:  # a clean server removed its own; a killed server or stub cannot
        Path("/dev/shm", name).unlink(missing_ok=True)
    return code


def serve_repository(repo: str | Path, host: str = "127.0.0.1", http_port: int = DEFAULT_HTTP_PORT,
                     grpc_port: int = DEFAULT_GRPC_PORT, metrics_port: int = DEFAULT_METRICS_PORT,
                     tritonserver: str | Path | None = None, exit_timeout_s: int = 5,
                     extra_args: tuple[str, ...] = (), watch_interval_s: float = WATCH_INTERVAL_S) -> int:
    """Run tritonserver on ``repo`` until it exits, this process gets SIGTERM/SIGINT (forwarded; status 0), or
    one of its Python stubs dies (server stopped; ``EXIT_STUB_DIED``). Otherwise the server's status, 128 +
    signal when it was killed. FileNotFoundError for a missing repository or server."""
    repo = Path(repo).resolve()
    if not repo.is_dir() or not any(repo.glob("*/config.pbtxt")):
        raise FileNotFoundError(f"{repo}: not a Triton model repository (no <model>/config.pbtxt); write one with "
                                "`ponder export triton-repo`")
    install = find_tritonserver(tritonserver)
    command = server_command(install, repo, host, http_port, grpc_port, metrics_port, exit_timeout_s, extra_args)
    LOG.info("starting %s", " ".join(command))
    process = start_server(command, server_environment(install), stderr=subprocess.PIPE)
    supervisor = Supervisor(process, host, http_port, stop_wait_s=exit_timeout_s + 10, interval_s=watch_interval_s)
    previous = {s: signal.signal(s, supervisor.request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = supervisor.run()
    finally:
        stop_server(process, grace_s=exit_timeout_s + 10, regions=supervisor.watch.regions)
        supervisor.log.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return supervisor.outcome(code, repo)

