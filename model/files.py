"""Writing a file so readers never see half of it: write a temporary sibling, then rename it over the target
(atomic on POSIX within one file system). One helper for checkpoints, exported graphs, CLI outputs and the
extraction job's feature files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_on_success(path: str | Path, tmp: str | Path | None = None, fsync: bool = False) -> Iterator[Path]:
    """Yield the temporary path to write (default ``<name>.partial`` beside ``path``); when the block ends
    without an error it replaces ``path`` (after an fsync when asked), otherwise it is removed."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        if fsync:
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

