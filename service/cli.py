"""Command-line handlers for ``ponder serve``, ``ponder worker`` and ``ponder extract``. The top-level
parser (ponder/cli.py) adds each subcommand with ``add_*_arguments`` and calls ``run_*`` with the
parsed namespace; each ``run_*`` returns the process exit code."""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import os
import socket
import sys
from pathlib import Path

from service.ports import port_number

# = the Literal of ServiceSettings.backend (service/settings.py; tests/test_cli_hardening.py checks), spelled out
# so that `ponder --help` need not import pydantic.
SERVE_BACKENDS: tuple[str, ...] = ("auto", "spconv", "torch", "onnxruntime", "tensorrt")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--checkpoint", type=Path, help="checkpoint file or folder to serve (default: bundled model)")
    group.add_argument("--models", type=Path, dest="models_dir",
                       help="serve every checkpoint in this directory, named by file/folder stem")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--trust-checkpoint", action="store_true", default=None,
                        help="allow full unpickling of the checkpoint (only for files you made yourself)")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; another address needs API keys or "
                             "PONDER_ALLOW_ANONYMOUS_PUBLIC=true)")
    parser.add_argument("--port", type=port_number, default=os.environ.get("PONDER_PORT", "8000"),
                        help="port to listen on (default: PONDER_PORT or 8000)")
    parser.add_argument("--config", type=Path, dest="config_file", help="YAML/JSON settings file (PONDER_* vars win)")
    parser.add_argument("--default-model", default=None, help="model used when a request names none")
    parser.add_argument("--worker", choices=("inprocess", "triton"), default=None,
                        help="run the models in process (default) or call Triton servers")
    parser.add_argument("--triton-url", action="append", dest="triton_urls", default=None,
                        help="Triton endpoint host:port (repeat for several; used round-robin)")
    parser.add_argument("--triton-protocol", choices=("grpc", "http"), default=None)
    parser.add_argument("--api-key", action="append", dest="api_keys", default=None,
                        help="accepted API key (repeat for several); none = no authentication")
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), default=None)
    parser.add_argument("--backend", choices=SERVE_BACKENDS, default=None,
                        help="encoder of the in-process worker (PONDER_BACKEND): auto = the fastest exact one for "
                             "the device (the torch engine), torch = the spconv-free engine, spconv = the model's "
                             "spconv layers, onnxruntime = the exported graph, tensorrt = onnxruntime's TensorRT "
                             "provider (default: PONDER_BACKEND, else auto)")


_SETTINGS_ARGS = ("checkpoint", "models_dir", "device", "trust_checkpoint", "config_file", "default_model",
                  "worker", "triton_urls", "triton_protocol", "api_keys", "log_level", "backend")


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from service.app import create_app
    from service.settings import ServiceSettings, settings_problems

    overrides = {name: getattr(args, name) for name in _SETTINGS_ARGS if getattr(args, name, None) is not None}
    try:
        settings = ServiceSettings(**overrides)
    except (ValidationError, ValueError) as exc:
        print(f"ponder serve: invalid settings: {settings_problems(exc)}", file=sys.stderr)
        return 2
    problem = _check_exposure(args.host, settings) or _check_models(settings)
    if problem:
        print(f"ponder serve: error: {problem}", file=sys.stderr)
        return 2
    try:
        sock = _bind(args.host, args.port)
    except OSError as exc:
        reason = f"port {args.port} is in use" if exc.errno == errno.EADDRINUSE else f"cannot listen ({exc})"
        print(f"ponder serve: error: {args.host}:{args.port}: {reason}", file=sys.stderr)
        return 2
    url = f"http://{args.host}:{args.port}"

    def announce() -> None:
        print(f"PonderV2 gateway serving at {url}  (API docs: {url}/docs)", flush=True)

    app = create_app(settings, on_started=announce)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    server.run(sockets=[sock])
    return 0 if server.started else 3


def _check_exposure(host: str, settings) -> str | None:
    """An open gateway on a public interface is refused: listening beyond loopback needs API keys, or the
    operator's explicit ``allow_anonymous_public`` (e.g. a container whose port is published on loopback only)."""
    if settings.api_keys or settings.allow_anonymous_public or _is_loopback(host):
        return None
    return (f"--host {host} listens beyond this machine without API keys; set PONDER_API_KEYS (or --api-key), "
            "or PONDER_ALLOW_ANONYMOUS_PUBLIC=true if something else guards the port")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: resolve it
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def _check_models(settings) -> str | None:
    """A missing checkpoint, an empty --models folder or a file that is no PyTorch checkpoint, found before
    uvicorn starts (a failing lifespan would print a traceback). Only names and magic bytes are looked at;
    reading the weights stays with the workers."""
    if settings.models_dir is None and settings.checkpoint is None:
        return None
    from service.workers.loading import discover_checkpoints

    from model.checkpoint import CheckpointError, check_torch_header

    try:
        found = discover_checkpoints(settings.checkpoint, settings.models_dir)
        for path in found.values():  # a text file named .pth: one sentence now, not a traceback from the lifespan
            if path is not None and path.is_file() and path.suffix.lower() != ".safetensors":
                check_torch_header(path)
    except (ValueError, CheckpointError) as exc:
        return str(exc)
    return None


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything is announced; uvicorn serves on it (no bind race)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="input directory, glob, list file (.txt/.lst) or files")
    parser.add_argument("--server", required=True, help="gateway URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("-o", "--output-dir", type=Path, required=True, help="where the feature files go")
    parser.add_argument("--concurrency", type=int, default=4, help="uploads in flight (default 4)")
    parser.add_argument("--format", choices=("npy", "parquet"), default="npy", dest="out_format")
    parser.add_argument("--model", default=None)
    parser.add_argument("--condition", default=None)
    parser.add_argument("--grid-size", type=float, default=None)
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--api-key", default=None, help="API key (or PONDER_API_KEY)")
    parser.add_argument("--retries", type=int, default=3, help="retries on 5xx/429/connection errors")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo every output in -o, adopting these options (default: skip outputs made from the "
                             "same unchanged input with the same options; refuse a folder made with other options)")


def run_extract(args: argparse.Namespace) -> int:
    import os

    from service.extract import ExtractOptions, extract
    from service.extract_inputs import expand_inputs

    if args.concurrency < 1:
        print("ponder extract: --concurrency must be at least 1", file=sys.stderr)
        return 2
    try:
        inputs = expand_inputs(args.inputs)
    except ValueError as exc:
        print(f"ponder extract: {exc}", file=sys.stderr)
        return 2
    opts = ExtractOptions(server=args.server, out_dir=args.output_dir, concurrency=args.concurrency,
                          out_format=args.out_format, model=args.model, condition=args.condition,
                          grid_size=args.grid_size, dtype=args.dtype,
                          api_key=args.api_key or os.environ.get("PONDER_API_KEY"), retries=args.retries,
                          timeout_s=args.timeout, progress=not args.no_progress, overwrite=args.overwrite)
    try:
        report = asyncio.run(extract(inputs, opts))
    except ValueError as exc:  # refused before any file: URL, gateway, model, options of the folder, name clashes
        print(f"ponder extract: error: {exc}", file=sys.stderr)
        return 2
    print(report.summary(), flush=True)
    if report.interrupted is not None:
        return 130  # the shell's status for a run stopped by SIGINT
    return 1 if report.failed else 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m service.cli serve|worker|extract ...``) without the composition root (ponder/cli.py)."""
    from service.workers.triton_server import add_worker_arguments, run_worker

    parser = argparse.ArgumentParser(prog="ponder")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, add, run in (("serve", add_serve_arguments, run_serve), ("worker", add_worker_arguments, run_worker),
                           ("extract", add_extract_arguments, run_extract)):
        add(sub.add_parser(name))
    args = parser.parse_args(argv)
    return {"serve": run_serve, "worker": run_worker, "extract": run_extract}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
