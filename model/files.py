"""Writing a file so readers never see half of it: write a temporary sibling, then rename it over the target
(atomic on POSIX within one file system), or a folder of files that change together (`new_folder_for`). One
place for checkpoints, exported graphs, CLI outputs and the extraction job's feature files."""

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


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (setting and restoring it would race
    with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def new_folder_for(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path`` to fill; when the block ends without an error it becomes
    ``path`` (files and folder get the umask's permissions, as plain writes would), otherwise it is removed.
    An existing ``path`` is moved aside first and its files that the new folder lacks are carried over, so the
    files written together (weights and their config) change together and a crash leaves the old folder whole
    (beside it as ``.<name>.old-<pid>`` in the instant between the two renames)."""
    import shutil

    path = Path(path)
    if path.is_symlink():  # replace the folder it points to, and keep the link
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        mode = 0o666 & ~_umask()
        for item in tmp.iterdir():
            if item.is_file():
                item.chmod(mode)
        tmp.chmod(0o777 & ~_umask())
        if not path.exists():
            os.rename(tmp, path)
            return
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
        os.rename(tmp, path)
        for item in old.iterdir():  # what the old folder held besides the files just written
            if not (path / item.name).exists():
                os.rename(item, path / item.name)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
