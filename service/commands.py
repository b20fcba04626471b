"""Service subcommands for the ``ponder`` console script: serve, worker, extract (see service/cli.py)."""

from __future__ import annotations

import argparse

from service.cli import add_extract_arguments, add_serve_arguments, run_extract, run_serve
from service.workers.triton_server import add_worker_arguments, run_worker


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="HTTP gateway with an in-process (or Triton) worker; docs at /docs")
    add_serve_arguments(p)
    p.set_defaults(handler=run_serve)

    p = subparsers.add_parser("worker", help="run a Triton server on an exported model repository (--triton --repo)")
    add_worker_arguments(p)
    p.set_defaults(handler=run_worker)

    p = subparsers.add_parser("extract", help="batch feature extraction through a running gateway")
    add_extract_arguments(p)
    p.set_defaults(handler=run_extract)
