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
from typing import Sequence, TextIO

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

# Options whose values may start with "-": argparse takes "--up -y" for two options (exit 2, "expected one
# argument"), so the README's spaced form is rewritten to "--up=-y" before parsing.
DASH_VALUES: dict[str, frozenset[str]] = {"--up": frozenset({"-x", "-y", "-z"})}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ponder", description="PonderV2 3D foundation model: features, "
                                     "segmentation, detection, rendering, training, export and serving.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_commands(subparsers)
    return parser


def join_dash_values(argv: Sequence[str]) -> list[str]:
    """``[... "--up", "-y" ...]`` -> ``[... "--up=-y" ...]`` for the options in DASH_VALUES (every command's
    ``--up`` at once); tokens after a bare ``--`` are left alone."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            return out + list(argv[i:])
        if token in DASH_VALUES and i + 1 < len(argv) and argv[i + 1] in DASH_VALUES[token]:
            out.append(f"{token}={argv[i + 1]}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
    """``warning: <message>`` on one line of stderr: the default format adds our source file and line, which
    mean nothing to a user of the command."""
    text = " ".join(str(message).split())
    try:
        print(f"warning: {text}", file=file or sys.stderr)
    except OSError:  # stderr closed: a warning must not fail the command
        pass


USER_ERRORS: tuple[type[BaseException], ...] = (CommandError, ValueError, FileNotFoundError, PermissionError,
                                                IsADirectoryError, FileExistsError, NotADirectoryError)
# Errors of libraries a command may have imported, as (module, class): a bad input file or an invalid export
# (one line, exit 2, not a traceback). Looked up in sys.modules, so ``ponder --help`` imports none of them.
LAZY_USER_ERRORS: tuple[tuple[str, str], ...] = (
    ("export.onnx_export", "ExportError"),         # exported graph invalid, ONNX file without ponder metadata
    ("google.protobuf.message", "DecodeError"),    # a truncated or non-ONNX .onnx file
    ("onnx.checker", "ValidationError"),           # an ONNX model that fails the checker
)


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types shown as ``ponder X: error: ...`` (exit 2) instead of a traceback."""
    lazy = []
    for module_name, name in LAZY_USER_ERRORS:
        cls = getattr(sys.modules.get(module_name), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            lazy.append(cls)
    return USER_ERRORS + tuple(lazy)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(join_dash_values(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    reuse_freed_memory()  # before any heavy work: see model/engine/memory.py
    shown = warnings.showwarning
    if not args.verbose:  # -v keeps Python's format, with the source line
        warnings.showwarning = show_warning
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose or not isinstance(exc, user_errors()):
            raise
        text = str(exc) if isinstance(exc, USER_ERRORS) else " ".join(str(exc).split()) or type(exc).__name__
        print(f"ponder {args.command}: error: {text}", file=sys.stderr)  # library errors: on one line
        return 2
    finally:
        warnings.showwarning = shown  # main() also runs inside other programs (tests)


if __name__ == "__main__":
    sys.exit(main())
