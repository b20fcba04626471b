"""``ponder worker --triton --repo REPO``: a real Triton Inference Server on a repository written by
``ponder export triton-repo`` (the ensemble of `export.triton_repo`: kernel maps, then the exported
encoder). The gateway (``PONDER_WORKER=triton PONDER_TRITON_URLS=HOST:GRPC_PORT``) learns the models from
the repository's configs; see `service.workers.triton_client`.

Default ports 8100 (HTTP), 8101 (gRPC), 8102 (metrics) stay clear of the gateway's 8000. The launcher and
its lifetime rules (own process group, parent-death signal, signals forwarded) are `export.triton_serve`.
"""

from __future__ import annotations

import argparse
import sys

from export.triton_serve import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--triton", action="store_true", help="run a Triton server (the only standalone worker)")
    parser.add_argument("--repo", help="model repository written by `ponder export triton-repo`")
    parser.add_argument("--host", default="127.0.0.1", help="address Triton listens on (0.0.0.0 for remote gateways)")
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT, help=f"default {DEFAULT_GRPC_PORT}")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT, help=f"default {DEFAULT_HTTP_PORT}")
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                        help=f"default {DEFAULT_METRICS_PORT}")
    parser.add_argument("--tritonserver", default=None,
                        help="tritonserver binary (default: PONDER_TRITONSERVER, NVIDIA's image, or nvidia-pytriton's)")
    parser.add_argument("--exit-timeout", type=int, default=5, metavar="S",
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
    from export.triton_serve import serve_repository
    from service.logs import configure_logging

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
