"""``ponder``: one console script in front of the four packages.

Each package contributes its subcommands through an ``add_commands(subparsers)`` function; handlers
import their heavy dependencies lazily so ``ponder --help`` stays quick.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from typing import Callable, Sequence

# Packages whose ``commands`` module adds subcommands, in help order.
COMMAND_MODULES = ("model.commands", "training.commands", "export.commands", "service.commands")


class CommandError(Exception):
    """A user-facing failure: printed without a traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ponder", description="PonderV2 3D foundation model: features, "
                                     "segmentation, detection, rendering, training, export and serving.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a package without commands yet
                continue
            raise
        add: Callable = module.add_commands
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (CommandError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        if args.verbose:
            raise
        print(f"ponder {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
