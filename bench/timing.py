"""Shared by the bench scripts (run as files, so this folder is on sys.path): best-of-n wall time."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def timed(fn: Callable[[], T], repeats: int) -> tuple[float, T]:
    """(best wall time in seconds over ``repeats`` calls, the last call's result)."""
    best, out = float("inf"), None
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out
