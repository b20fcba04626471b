"""argparse types shared by every command line (``ponder`` fronts model, training, export and service commands,
and each of those packages may use these; model imports nothing from them)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """A count such as ``--max-voxels`` or ``--epochs``: a whole number >= 1 (0 or less would do nothing, or
    train nothing, and still succeed)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
