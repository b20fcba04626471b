"""Writing a file so readers never see half of it: write a temporary sibling, then rename it over the target
(atomic on POSIX within one file system), or a folder of files that change together (`new_folder_for`). One
place for checkpoints, exported graphs, CLI outputs and the extraction job's feature files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from model.errors import CommandError


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
        umask = _umask()
        for item in tmp.iterdir():
            if item.is_file():
                item.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
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


def _nearest_existing(path: Path) -> Path:
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _check_can_create_in(path: Path, flag: str) -> None:
    """The folder that will hold ``path`` (created when missing, as the writers do) accepts new files. A probe
    file is created and removed: permission bits say nothing for root, read-only mounts or /proc."""
    import tempfile

    folder = _nearest_existing(path)
    if not folder.is_dir():
        raise CommandError(f"{flag} {path}: {folder} is a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".ponder-write-check-", dir=folder)
    except OSError as exc:
        raise CommandError(f"{flag} {path}: cannot create files in {folder} ({exc.strerror or exc})") from None
    os.close(handle)
    os.unlink(probe)


def check_output_file(path: str | Path, flag: str, suffixes: tuple[str, ...] | None = None,
                      content: str = "") -> Path:
    """Refuse an output path that cannot be written, before any model work (not after minutes of inference, and
    naming the user's path, not our temporary ``.partial`` file). ``suffixes``: the ones that name the format
    written (the first is suggested); ``content`` says what is written, for that message. Every command's
    output files (ponder's -o/--colored/--ply, training's --json) go through this one check."""
    path = Path(path)
    if path.is_dir():
        raise CommandError(f"{flag} {path}: is a folder; give a file name")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise CommandError(f"{flag} {path}: {content} is written as {suffixes[0]}; name the file "
                           f"{path.with_suffix(suffixes[0]) if path.suffix else str(path) + suffixes[0]}")
    _check_can_create_in(path, flag)
    return path
