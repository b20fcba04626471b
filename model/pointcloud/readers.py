"""Read any supported point-cloud file into a validated :class:`PointCloud`, and write a few back.

Input may be a path, the file's bytes, or a binary stream; it is read into memory once and each
format decodes from that buffer (``np.frombuffer`` wherever the layout allows, so a large binary
upload is not copied again). The format comes from ``format=``, else the name's suffix (a PLY file
named ``.xyz``/``.txt`` is still PLY), else the magic bytes. Every failure, including a library's own
exception, surfaces as :class:`PointCloudError` naming the source and the problem. Coordinates wider
than float32 become float32 in one place, :func:`~model.pointcloud.cloud.float32_coords`: at georeferenced
magnitudes (UTM metres) they are shifted near zero first and the shift kept as ``PointCloud.origin``,
whatever the format.

Each reader sizes its allocation from the header and checks it against :class:`ReadLimits` (point
count and memory budget) before decoding; inputs over the limits raise :class:`PointCloudTooLarge`
(a PointCloudError), and so does a MemoryError that still escapes a library.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from model.pointcloud.cloud import PointCloud, PointCloudError, PointCloudTooLarge
from model.pointcloud.formats.kitti import read_kitti_bin
from model.pointcloud.formats.las import read_las
from model.pointcloud.formats.limits import DEFAULT_LIMITS, ReadLimits
from model.pointcloud.formats.numpy_files import read_npy, read_npz, write_npz
from model.pointcloud.formats.pcd import read_pcd
from model.pointcloud.formats.scene_folder import is_scene_folder, read_scene_folder
from model.pointcloud.formats.ply import read_ply, write_ply
from model.pointcloud.formats.text import read_xyz, write_xyz

Reader = Callable[[bytes, str, ReadLimits], PointCloud]
Writer = Callable[[PointCloud, Path], None]

SUPPORTED_FORMATS: tuple[str, ...] = ("ply", "las", "laz", "npy", "npz", "pcd", "xyz", "txt", "bin")
WRITABLE_FORMATS: tuple[str, ...] = ("ply", "npz", "xyz", "txt")

_READERS: dict[str, Reader] = {
    "ply": read_ply,
    "las": read_las,
    "laz": read_las,
    "npy": read_npy,
    "npz": read_npz,
    "pcd": read_pcd,
    "xyz": read_xyz,
    "txt": read_xyz,
    "bin": read_kitti_bin,
}
_WRITERS: dict[str, Writer] = {"ply": write_ply, "npz": write_npz, "xyz": write_xyz, "txt": write_xyz}
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"ply", "ply"),
    (b"LASF", "las"),  # LAZ too: laspy tells them apart from the header
    (b"\x93NUMPY", "npy"),
    (b"PK\x03\x04", "npz"),
    (b"PK\x05\x06", "npz"),  # empty zip
    (b"# .PCD", "pcd"),
    (b"VERSION", "pcd"),
    (b"FIELDS", "pcd"),
)

# Suffixes read by another format's reader: XYZRGB text (x y z r g b rows) is an XYZ table.
_SUFFIX_ALIASES = {"xyzrgb": "xyz"}
# Text tables have no signature, so a file named like one may still be PLY (``ply`` line first).
_TEXT_FORMATS = ("xyz", "txt")
# suffix → (compressor, magic bytes): such files are refused with "decompress it first".
_COMPRESSED = {"gz": ("gzip", b"\x1f\x8b"), "bz2": ("bzip2", b"BZh"), "xz": ("xz", b"\xfd7zXZ"),
               "zst": ("zstd", b"\x28\xb5\x2f\xfd")}
_HOW_TO_NAME = "give the format explicitly (CLI --format, service ?format=)"

_MAX_MESSAGE = 600

Source = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO


def format_from_name(name: str | os.PathLike | None) -> str | None:
    """The format for a file name's suffix (case-insensitive; ``.xyzrgb`` is XYZ text), or None when unknown."""
    if not name:
        return None
    suffix = Path(os.fspath(name)).suffix.lower().lstrip(".")
    suffix = _SUFFIX_ALIASES.get(suffix, suffix)
    return suffix if suffix in _READERS else None


def sniff_format(head: bytes) -> str | None:
    """The format from a file's first bytes, for the formats that have a signature (not xyz/bin)."""
    head = head.lstrip() if head[:1].isspace() else head
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    return None


def read_point_cloud(source: Source, format: str | None = None, name: str | None = None,
                     limits: ReadLimits | None = None, keep_invalid: bool = False) -> PointCloud:
    """Decode ``source`` (path, bytes or binary stream) into a validated PointCloud.

    ``name`` labels error messages and, when ``format`` is None, its suffix picks the format
    (an upload's file name, say); a path's own name is used otherwise. ``limits`` bounds the point
    count and decoded memory (:data:`DEFAULT_LIMITS` when None); inputs over them raise
    :class:`PointCloudTooLarge` before the arrays are allocated. ``keep_invalid``: keep rows with NaN/inf
    coordinates or normals (for callers that drop them and answer at the input's length, see
    ``model.prepare``); by default they are refused, naming the first bad row.
    """
    limits = limits or DEFAULT_LIMITS
    if _is_path(source) and Path(source).is_dir():
        return _read_folder(Path(source), limits, keep_invalid)
    data, label, own_name = _load(source, name)
    if not data:
        raise PointCloudError(f"{label}: the file is empty")
    fmt = _resolve_format(format, (name, own_name), data, label)
    try:
        # Coordinates beyond float32 are refused by float32_coords; other fields' overflow becomes inf.
        with np.errstate(over="ignore", invalid="ignore"):
            cloud = _READERS[fmt](data, label, limits)
    except PointCloudError as exc:  # a reader's own message may quote a library's (and its corrupt bytes)
        if len(str(exc)) <= _MAX_MESSAGE:
            raise
        raise type(exc)(_clip(exc, _MAX_MESSAGE)) from exc
    except MemoryError as exc:  # an allocation no header check foresaw: still a clear "too large"
        raise PointCloudTooLarge(f"{label}: decoding this {fmt.upper()} file ran out of memory") from exc
    except Exception as exc:  # a library's own error: keep its text, name the source and format
        raise PointCloudError(f"{label}: not a valid {fmt.upper()} file ({type(exc).__name__}: {_clip(exc)})") from exc
    except BaseException as exc:
        # A Rust library's panic (lazrs through pyo3) derives from BaseException, not Exception.
        if type(exc).__name__ != "PanicException":
            raise
        raise PointCloudError(f"{label}: not a valid {fmt.upper()} file (decoder panic: {_clip(exc)})") from exc
    if len(cloud) > limits.max_points:
        raise PointCloudTooLarge(f"{label}: {len(cloud)} points, more than the limit of {limits.max_points}")
    return cloud.validate(finite=not keep_invalid)


def _read_folder(folder: Path, limits: ReadLimits, keep_invalid: bool = False) -> PointCloud:
    """A Pointcept-style scene folder (coord.npy, color.npy, optional normal.npy) is one scene."""
    if not is_scene_folder(folder):
        raise PointCloudError(f"{folder}: is a folder without coord.npy; pass a point-cloud file or a scene "
                              "folder (coord.npy, color.npy, optional normal.npy)")
    with np.errstate(over="ignore", invalid="ignore"):
        cloud = read_scene_folder(folder, limits)
    return cloud.validate(finite=not keep_invalid)


def write_point_cloud(cloud: PointCloud, path: str | os.PathLike, format: str | None = None) -> Path:
    """Write ``cloud`` as binary PLY, NPZ (Pointcept keys) or XYZ text, coordinates in the source's frame
    (``coord + origin``, float64 when georeferenced); returns the path."""
    path = Path(path)
    fmt = _normalise(format) if format else format_from_name(path)
    writer = _WRITERS.get(fmt or "")
    if writer is None:
        raise PointCloudError(
            f"{path}: cannot write format {fmt or path.suffix or '(none)'}; writable: {', '.join(WRITABLE_FORMATS)}"
        )
    writer(cloud, path)
    return path


def _clip(exc: BaseException, limit: int = 300) -> str:
    """A library's message, shortened: some quote the corrupt bytes they met."""
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_path(source: Source) -> bool:
    return isinstance(source, (str, os.PathLike))


def _load(source: Source, name: str | None) -> tuple[bytes, str, str | None]:
    """(the whole input as bytes, a label for messages, the path's or stream's own name).

    bytes are used as they are (no copy); bytearray/memoryview are copied once into bytes.
    """
    if _is_path(source):
        path = Path(source)
        try:
            return path.read_bytes(), name or str(path), str(path)
        except OSError as exc:
            raise PointCloudError(f"{name or path}: cannot read the file ({exc.strerror or exc})") from exc
    if isinstance(source, bytes):
        return source, name or "<bytes>", None
    if isinstance(source, (bytearray, memoryview)):
        return bytes(source), name or "<bytes>", None
    read = getattr(source, "read", None)
    if read is None:
        raise TypeError(f"read_point_cloud takes a path, bytes or a binary stream, not {type(source).__name__}")
    stream_name = getattr(source, "name", None)
    own_name = os.fspath(stream_name) if isinstance(stream_name, (str, os.PathLike)) else None
    label = name or own_name or "<stream>"
    try:
        data = read()
    except OSError as exc:
        raise PointCloudError(f"{label}: cannot read the stream ({exc})") from exc
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PointCloudError(f"{label}: the stream must be opened in binary mode")
    return (data if isinstance(data, bytes) else bytes(data)), label, own_name


def _normalise(format: str) -> str:
    fmt = format.lower().lstrip(".")
    fmt = _SUFFIX_ALIASES.get(fmt, fmt)
    if fmt not in _READERS:
        raise PointCloudError(f"unknown point-cloud format {format!r}; supported: {', '.join(SUPPORTED_FORMATS)}")
    return fmt


def guess_format(names: tuple[str | None, ...], head: bytes, hinted: str | None = None) -> str | None:
    """The format from the first name with a known suffix (else ``hinted``, e.g. a request's Content-Type), a PLY
    file under a text name (.xyz/.txt) read as PLY, else the content's magic bytes; None when nothing tells.
    One rule for files and uploads (``head``: the first 64 bytes or more)."""
    fmt = next((f for f in map(format_from_name, names) if f), None) or hinted
    if fmt in _TEXT_FORMATS and _is_ply(head):
        return "ply"  # a PLY file saved as .xyz/.txt: the content decides
    return fmt or sniff_format(head[:64])


def _resolve_format(format: str | None, names: tuple[str | None, ...], data: bytes, label: str) -> str:
    fmt = _normalise(format) if format else guess_format(names, data)
    compressed = compression(names, data, format_known=fmt is not None)
    if compressed:
        raise PointCloudError(f"{label}: the file is {compressed}-compressed; decompress it first")
    if fmt is None:
        raise PointCloudError(
            f"{label}: cannot tell the point-cloud format from the name or the content; "
            f"{_HOW_TO_NAME}: one of {', '.join(SUPPORTED_FORMATS)}"
        )
    return fmt


def _is_ply(data: bytes) -> bool:
    """PLY's first line is exactly ``ply`` (a text table's header line might merely start with it)."""
    return data[:64].lstrip().startswith((b"ply\n", b"ply\r"))


def compression(names: tuple[str | None, ...], data: bytes, format_known: bool = False) -> str | None:
    """gzip/bzip2/xz/zstd, from the content's magic bytes (whatever a name or format says: compressed bytes reach
    a reader as garbage), or from a name's last suffix when no format is known; None otherwise."""
    for suffix, (compressor, magic) in _COMPRESSED.items():
        if data.startswith(magic) or (not format_known and any(name and os.fspath(name).lower().endswith("." + suffix)
                                                                 for name in names)):
            return compressor
    return None
