"""Port arguments of `ponder serve` and `ponder worker`: a range check argparse applies (so a typo is one
usage line, not a traceback from ``bind``) and a probe of whether a port is free before a server starts."""

from __future__ import annotations

import argparse
import socket


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1-65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


def port_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (``bind`` error), or None when it can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None
