"""Errors shared by every package's command handlers (kept in ``model`` so that nothing imports the CLI root)."""

from __future__ import annotations


class CommandError(Exception):
    """A user-facing failure: the ``ponder`` console script prints it without a traceback and exits with 2."""
