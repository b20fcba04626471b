"""What ``ponder extract`` reads: the inputs named by folders, globs, list files or paths, and where each
one's output goes.

A Pointcept scene folder (``coord.npy`` beside ``color.npy``/``normal.npy``/labels) is one scene, uploaded as
one NPZ; a ``.npy`` that is not a float (N, 3), (N, 6) or (N, 9) cloud (labels, a lone colour array, another
run's features) is left out with the reason, and files of other types under a folder or glob are listed as
left out.
"""

from __future__ import annotations

import glob
import io
import os
from pathlib import Path

import numpy as np

from model.pointcloud.readers import SUPPORTED_FORMATS, format_from_name

SCENE_PARTS = ("coord", "color", "normal")  # the Pointcept arrays a scene folder's upload carries
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip", ".7z", ".tar", ".tgz", ".rar")


class InputList(list):
    """The inputs to extract, plus ``ignored``: files left out and why (shown in the run's summary)."""

    def __init__(self, paths: list[Path], ignored: dict[Path, str],
                 unsupported: dict[Path, str] | None = None) -> None:
        super().__init__(paths)
        self.ignored = ignored
        self.unsupported = unsupported or {}  # files of no point-cloud type under a folder or glob




def is_scene_folder(path: Path) -> bool:
    """A Pointcept-layout scene: a folder holding coord.npy (with color.npy, normal.npy, labels beside it)."""
    return path.is_dir() and (path / "coord.npy").is_file()


def not_a_cloud(path: Path) -> str | None:
    """Why a .npy file is no point cloud (None when it is one, or when only the server can tell): the server
    reads (N, 3), (N, 6) or (N, 9) arrays and structured ones; of those, integer arrays are labels or colours."""
    if path.suffix.lower() != ".npy":
        return None
    try:
        with path.open("rb") as handle:
            if handle.read(6) != b"\x93NUMPY":
                return None  # not an NPY file at all: uploaded, and the server says what is wrong
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        return None if "pickle" not in str(exc) else "an object array, not a point cloud"  # the server reports
    if array.dtype.names:
        return None  # fields by name (x, y, z, ...): the server reads those
    if array.ndim != 2 or array.shape[1] < 3:
        return f"shape {array.shape} is not an (N, >=3) point cloud"
    if array.shape[1] not in (3, 6, 9):
        return (f"shape {array.shape} is not an (N, 3), (N, 6) or (N, 9) point cloud (xyz, rgb, normal); "
                f"features of another run?")
    if not np.issubdtype(array.dtype, np.floating):
        return f"{array.dtype} values (labels or colours?) are not an (N, >=3) float point cloud"
    return None


def unsupported_reason(path: Path) -> str:
    """The note shown beside a left-out file of no point-cloud type ('' when there is nothing to add)."""
    if path.suffix.lower() in COMPRESSED:
        return "compressed: decompress it first"
    return ""


def _walk(folder: Path, ignored: dict[Path, str], unsupported: dict[Path, str]) -> list[Path]:
    """Scene folders and point-cloud files under ``folder``; the arrays inside scene folders are parts of
    their scene, not inputs of their own. Other files (not hidden ones) go to ``unsupported``."""
    if is_scene_folder(folder):
        return [folder]
    scenes = sorted(p.parent for p in folder.rglob("coord.npy") if is_scene_folder(p.parent))
    found: list[Path] = list(scenes)
    scene_set = set(scenes)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if not scene_set.isdisjoint(path.parents):  # an array inside a scene folder
            continue
        if not format_from_name(path.name):
            if not path.name.startswith("."):
                unsupported[path.resolve()] = unsupported_reason(path)
            continue
        reason = not_a_cloud(path)
        if reason:
            ignored[path.resolve()] = reason
        else:
            found.append(path)
    return found


def expand_inputs(specs: list[str]) -> InputList:
    """Files and scene folders named by directories, globs, list files (.txt/.lst with one path a line) or
    paths; ``.ignored`` lists the .npy files left out because they are not point clouds."""
    files: list[Path] = []
    ignored: dict[Path, str] = {}
    unsupported: dict[Path, str] = {}
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            files += _walk(path, ignored, unsupported)
        elif any(ch in spec for ch in "*?["):
            for match in sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()):
                if format_from_name(match.name):
                    files.append(match)
                else:
                    unsupported[match.resolve()] = unsupported_reason(match)
        elif path.is_file() and (path.suffix.lower() in (".lst", ".list")
                                 or (path.suffix.lower() == ".txt" and _looks_like_list(path))):
            base = path.parent
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    entry = Path(line)
                    files.append(entry if entry.is_absolute() else base / entry)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"input {spec!r} is not a file, directory, glob or list file")
    unique = list(dict.fromkeys(p.resolve() for p in files))
    if not unique:
        raise ValueError(f"no point-cloud files found in {', '.join(specs)} "
                         f"(supported suffixes: {', '.join(SUPPORTED_FORMATS)})"
                         + (f"; {len(ignored)} .npy file(s) are not (N, >=3) clouds" if ignored else "")
                         + (f"; {len(unsupported)} file(s) of other types" if unsupported else ""))
    return InputList(unique, ignored, unsupported)


def scene_npz(folder: Path) -> bytes:
    """A scene folder's coord/color/normal arrays as one NPZ upload (Pointcept keys)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.load(folder / f"{name}.npy", allow_pickle=False) for name in SCENE_PARTS
                        if (folder / f"{name}.npy").is_file()})
    return buffer.getvalue()


def _looks_like_list(path: Path) -> bool:
    """A .txt input is a list of paths when its first non-empty line names an existing file."""
    with path.open(errors="replace") as handle:
        for line in handle:
            line = line.strip()
            if line and not line.startswith("#"):
                entry = Path(line)
                return (entry if entry.is_absolute() else path.parent / entry).is_file()
    return False


def output_paths(inputs: list[Path], out_dir: Path, suffix: str) -> dict[Path, Path]:
    """Each input's output: its path relative to the inputs' common folder, suffix replaced. Two inputs that
    would share one (a.ply and a.las; a.ply and a.ply.npy) are a ValueError naming both: the name of an output
    must not depend on which other files a run was given."""
    root = Path(os.path.commonpath([p.parent for p in inputs]))
    targets: dict[Path, Path] = {}
    owner: dict[Path, Path] = {}
    for path in inputs:
        target = out_dir / path.relative_to(root).with_suffix(suffix)
        if target in owner:
            raise ValueError(f"{owner[target]} and {path} would both be written to {target}; rename one, or "
                             f"extract them in separate runs with different -o folders")
        owner[target], targets[path] = path, target
    return targets
