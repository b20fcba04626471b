"""``ponder worker --triton --repo REPO``: a real Triton Inference Server on a repository written by
``ponder export triton-repo`` (the ensemble of `export.triton_repo`: kernel maps, then the exported
encoder). The gateway (``PONDER_WORKER=triton PONDER_TRITON_URLS=HOST:GRPC_PORT``) learns the models from
the repository's configs; see `service.workers.triton_client`.

Default ports 8100 (HTTP), 8101 (gRPC), 8102 (metrics) stay clear of the gateway's 8000. The launcher and
its lifetime rules (own process group, parent-death signal, signals forwarded, the watch on its Python stubs)
are `export.triton_serve`.

Exit status, for whatever restarts the worker: 0 stopped on request (SIGTERM/SIGINT); 2 refused before Triton
started (one line); 75 (``EXIT_STUB_DIED``) a Python stub died and the server was stopped, since Triton would
fail every request while still reporting healthy; 128 + N tritonserver was killed by signal N; otherwise
Triton's own status (1: the repository did not load; the last line names the first error).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.triton_serve import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT
from model.arguments import non_negative_int
from service.ports import port_in_use, port_number


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--triton", action="store_true", help="run a Triton server (the only standalone worker)")
    parser.add_argument("--repo", help="model repository written by `ponder export triton-repo`")
    parser.add_argument("--host", default="127.0.0.1", help="address Triton listens on (0.0.0.0 for remote gateways)")
    parser.add_argument("--grpc-port", type=port_number, default=DEFAULT_GRPC_PORT, help=f"default {DEFAULT_GRPC_PORT}")
    parser.add_argument("--http-port", type=port_number, default=DEFAULT_HTTP_PORT, help=f"default {DEFAULT_HTTP_PORT}")
    parser.add_argument("--metrics-port", type=port_number, default=DEFAULT_METRICS_PORT,
                        help=f"default {DEFAULT_METRICS_PORT}")
    parser.add_argument("--tritonserver", default=None,
                        help="tritonserver binary of a Triton install (<root>/bin beside <root>/backends) or "
                             "nvidia-pytriton's (default: PONDER_TRITONSERVER, NVIDIA's image, or nvidia-pytriton's)")
    parser.add_argument("--exit-timeout", type=non_negative_int, default=5, metavar="S",
                        help="seconds Triton waits for in-flight requests and its models when stopping (default 5)")


def run_worker(args: argparse.Namespace) -> int:
    if not args.triton:
        print("ponder worker: only Triton workers run standalone (pass --triton --repo REPO); the in-process "
              "worker runs inside `ponder serve`", file=sys.stderr)
        return 2
    if not args.repo:
        print("ponder worker: --repo REPO is required (write one with `ponder export triton-repo MODEL.onnx -o REPO`)",
              file=sys.stderr)
        return 2
    from export.triton_serve import find_tritonserver, serve_repository
    from service.logs import configure_logging

    try:
        install = find_tritonserver(args.tritonserver)
    except FileNotFoundError as exc:
        print(f"ponder worker: error: {exc}", file=sys.stderr)
        return 2
    problem = check_ports(args.host, {"--http-port": args.http_port, "--grpc-port": args.grpc_port,
                                      "--metrics-port": args.metrics_port}) or check_repository(
        Path(args.repo), install.backend_dir)
    if problem:
        print(f"ponder worker: error: {problem}", file=sys.stderr)
        return 2
    configure_logging("INFO")
    print(f"Triton worker on {args.repo}: gRPC {args.host}:{args.grpc_port}, HTTP {args.host}:{args.http_port}; "
          f"point the gateway at it with PONDER_WORKER=triton PONDER_TRITON_URLS=HOST:{args.grpc_port}", flush=True)
    try:
        return serve_repository(args.repo, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                                metrics_port=args.metrics_port, tritonserver=args.tritonserver,
                                exit_timeout_s=args.exit_timeout)
    except FileNotFoundError as exc:
        print(f"ponder worker: {exc}", file=sys.stderr)
        return 2


def check_ports(host: str, ports: dict[str, int]) -> str | None:
    """Why Triton could not listen on these ports (the same one twice, or one in use), found before it loads
    every model and buries the cause in its log; None when all are free."""
    seen: dict[int, str] = {}
    for flag, port in ports.items():
        if port in seen:
            return f"{flag} and {seen[port]} are both {port}: Triton needs three different ports"
        seen[port] = flag
        busy = port_in_use(host, port)
        if busy:
            return f"{flag} {port}: cannot listen on {host}:{port} ({busy}); pick another port or stop what uses it"
    return None


def check_repository(repo: Path, backend_dir: Path) -> str | None:
    """What in ``repo`` this Triton server cannot load: an unreadable ``config.pbtxt``, an ensemble step with no
    model folder, or a backend the server does not have (nvidia-pytriton's server has only the Python backend:
    a repository exported with ``--kind onnxruntime`` or ``tensorrt`` needs NVIDIA's Triton image). None when
    it looks loadable; Triton itself still has the last word."""
    from google.protobuf.text_format import ParseError

    from export.triton_repo import read_model_config

    if not repo.is_dir() or not any(repo.glob("*/config.pbtxt")):
        return (f"{repo}: not a Triton model repository (no <model>/config.pbtxt); write one with "
                "`ponder export triton-repo CHECKPOINT -o REPO --kind python-torch`")
    configs = {}
    for path in sorted(repo.glob("*/config.pbtxt")):
        try:
            configs[path.parent.name] = read_model_config(path)
        except (ParseError, UnicodeDecodeError, OSError) as exc:
            return f"{path}: not a readable Triton model config ({' '.join(str(exc).split())})"
    for name, config in configs.items():
        for step in config.ensemble_scheduling.step:
            if step.model_name not in configs:
                return (f"{repo}: the ensemble {name!r} calls model {step.model_name!r}, which has no folder with a "
                        "config.pbtxt in the repository")
        backend = config.backend or ("onnxruntime" if config.platform == "onnxruntime_onnx" else
                                     "tensorrt" if config.platform == "tensorrt_plan" else "")
        if backend and not (backend_dir / backend).is_dir():
            return (f"{repo / name}: backend {backend!r} is not in this Triton server ({backend_dir} has "
                    f"{', '.join(sorted(p.name for p in backend_dir.iterdir() if p.is_dir())) or 'none'}); "
                    "re-export with `ponder export triton-repo ... --kind python-torch` (or python-onnxruntime) for this server, "
                    "or run NVIDIA's Triton image (docker compose) for onnxruntime/tensorrt repositories")
    return None
