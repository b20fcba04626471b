"""Placing model folders in a Triton repository: is the output writable, and an all-or-nothing swap.

`export.triton_repo` decides which folders an export writes (and which steps of its earlier export it
drops); this module only checks the output and moves complete folders into place, so a failure never leaves
a half-written model beside a working one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def creation_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be created (its nearest existing parent is a file, or does not accept new files), or
    None. A probe file is created and removed: permission bits say nothing for root, read-only mounts or /proc."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    try:
        handle, probe = tempfile.mkstemp(prefix=".ponder-write-check-", dir=folder)
    except OSError as exc:
        return f"cannot create files in {folder} ({exc.strerror or exc})"
    os.close(handle)
    os.unlink(probe)
    return None


def check_repository_output(out_dir: str | Path, flag: str = "output") -> Path:
    """Refuse a repository folder that cannot be written (a file, a file among its parents, a folder that
    does not accept new files), before any work; ``flag`` names the option in the messages."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{flag} {out_dir}: is a file; {flag} takes a repository folder")
    problem = creation_problem(out_dir / "x" if out_dir.is_dir() else out_dir)
    if problem:
        raise PermissionError(f"{flag} {out_dir}: {problem}")
    return out_dir


def swap_in(built: Path, out_dir: Path, names: list[str], staging: Path, remove: tuple[str, ...] = ()) -> None:
    """Move the complete repository ``built`` into place: one rename when ``out_dir`` is new, else each model
    folder of ``names`` replaces its namesake and each of ``remove`` (steps the earlier export had and this one
    has not) goes; old folders are moved aside under ``staging`` and all restored if a later rename fails."""
    if not out_dir.exists():
        os.rename(built, out_dir)
        return
    old = staging / "old"
    old.mkdir()
    done: list[tuple[str, bool]] = []  # (model name, had an old folder)
    try:
        for model_name in names:
            target = out_dir / model_name
            had = target.exists() or target.is_symlink()
            if had:
                os.rename(target, old / model_name)
            done.append((model_name, had))
            os.rename(built / model_name, target)
        for model_name in remove:
            os.rename(out_dir / model_name, old / model_name)
            done.append((model_name, True))
    except OSError:
        for model_name, had in reversed(done):
            target = out_dir / model_name
            if target.is_dir() and not (built / model_name).exists():
                os.rename(target, built / model_name)
            if had:
                os.rename(old / model_name, target)
        raise
