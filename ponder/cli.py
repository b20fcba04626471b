"""``ponder``: one console script in front of the four packages.

Each package's ``commands`` module contributes its subcommands through ``add_commands(subparsers)``; they are
imported here by name, and their handlers import heavy dependencies lazily so ``ponder --help`` stays quick.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from types import ModuleType
from typing import Sequence

from export import commands as export_commands
from model import commands as model_commands
from model.engine.memory import reuse_freed_memory
from model.errors import CommandError
from ponder import detect_commands, image_commands, inference_commands, render_commands
from service import commands as service_commands
from training import commands as training_commands

# In help order.
COMMAND_MODULES: tuple[ModuleType, ...] = (inference_commands, model_commands, training_commands, render_commands,
                                           detect_commands, image_commands, export_commands, service_commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ponder", description="PonderV2 3D foundation model: features, "
                                     "segmentation, detection, rendering, training, export and serving.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_commands(subparsers)
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
    reuse_freed_memory()  # before any heavy work: see model/engine/memory.py
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
