"""argparse types shared by every command line (``ponder`` fronts model, training, export and service commands,
and each of those packages may use these; model imports nothing from them)."""

from __future__ import annotations

import argparse


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """A count such as ``--max-voxels`` or ``--epochs``: a whole number >= 1 (0 or less would do nothing, or
    train nothing, and still succeed)."""
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """A duration or count where 0 means "none", such as ``--exit-timeout``: a whole number >= 0."""
    return _whole_number(text, 0)
