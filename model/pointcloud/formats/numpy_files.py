"""NPY arrays and Pointcept-style NPZ archives, always with ``allow_pickle=False``."""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from model.pointcloud.cloud import PointCloud, PointCloudError, float32_coords
from model.pointcloud.formats import MAX_EXPANSION
from model.pointcloud.formats.limits import CLOUD_BYTES_PER_POINT, ReadLimits
from model.pointcloud.formats.columns import cloud_from_columns, native_copy, structured_columns

_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
_NPZ_FIELDS = ("coord", "color", "normal")


def read_npy(data: bytes, source: str, limits: ReadLimits) -> PointCloud:
    """(N, 3) xyz, (N, 6) xyz rgb or (N, 9) xyz rgb normal; a structured array is read by field names."""
    array = _npy_view(data, source, limits)
    if array.dtype.names:
        return cloud_from_columns(structured_columns(array), source, "NPY structured")
    if array.ndim != 2 or array.shape[1] not in (3, 6, 9):
        raise PointCloudError(
            f"{source}: NPY array must have shape (N, 3), (N, 6) or (N, 9) (xyz, rgb, normal), got {array.shape}"
        )
    if array.dtype.kind not in "biuf":
        raise PointCloudError(f"{source}: NPY array must be numeric, got dtype {array.dtype}")
    columns = array.shape[1]
    coord, origin = float32_coords(array[:, 0:3], source)
    return PointCloud(
        coord=coord,
        color=array[:, 3:6] if columns >= 6 else None,
        normal=array[:, 6:9] if columns == 9 else None,
        source=source,
        origin=origin,
    )


def read_npz(data: bytes, source: str, limits: ReadLimits) -> PointCloud:
    """Pointcept keys: ``coord`` (required), ``color``, ``normal``; other per-point arrays become extras.
    Members that are not ``.npy`` arrays (a readme, say) are ignored.

    Every member's npy header is read and sized (against its zip-declared size, the point limit and
    the memory budget) before any array is decompressed."""
    try:
        archive = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise PointCloudError(f"{source}: not a valid NPZ archive ({exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise PointCloudError(f"{source}: expected an NPZ archive, got a single array")
    with archive:
        declared = sum(info.file_size for info in archive.zip.infolist())
        if declared > MAX_EXPANSION * len(data):
            raise PointCloudError(f"{source}: NPZ members claim {declared} bytes, implausibly many for its size")
        keys = [info.filename[:-4] for info in archive.zip.infolist() if info.filename.endswith(".npy")]
        if "coord" not in keys:
            raise PointCloudError(f"{source}: NPZ archive has no 'coord' array (arrays: {', '.join(keys) or 'none'})")
        _check_npz_members(archive, source, limits)
        arrays = {key: _npz_member(archive, key, source) for key in keys}
    fields = {key: arrays.pop(key) for key in _NPZ_FIELDS if key in arrays}
    coord, origin = float32_coords(fields.pop("coord"), source)
    extras = {key: native_copy(value) for key, value in arrays.items() if value.ndim >= 1}  # 0-d: metadata
    return PointCloud(coord=coord, **fields, extras=extras, source=source, origin=origin)


def write_npz(cloud: PointCloud, path: Path) -> None:
    """Pointcept keys; ``coord`` in the source's frame (float64 when georeferenced, float32 otherwise)."""
    arrays = {"coord": cloud.world_coord()}
    if cloud.color is not None:
        arrays["color"] = cloud.color
    if cloud.normal is not None:
        arrays["normal"] = cloud.normal
    arrays.update({key: value for key, value in cloud.extras.items() if key not in arrays})
    with open(path, "wb") as stream:
        np.savez(stream, **arrays)


def _npy_header(stream: BinaryIO, source: str, what: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the npy stream's header, validated; the data is not read."""
    try:
        version = np.lib.format.read_magic(stream)
        read_header = _NPY_HEADER_READERS.get(version)
        if read_header is None and version == (3, 0):  # 3.0 only adds utf-8 field names; numpy's private parser
            read_header = getattr(np.lib.format, "_read_array_header", None)
            read_header = read_header and (lambda fp, read=read_header: read(fp, version))
        if read_header is None:
            raise ValueError(f"unsupported npy format version {version}")
        shape, fortran_order, dtype = read_header(stream)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise PointCloudError(f"{source}: {what} holds Python objects; pickled data is refused") from exc
        if "malformed node" in str(exc):  # ast.literal_eval's text quotes a node's repr (<ast.Call object at 0x…>)
            raise PointCloudError(
                f"{source}: {what} is not a valid NPY array (its header is not a valid NPY header literal: "
                "a dict of 'descr', 'fortran_order' and 'shape' constants)"
            ) from exc
        raise PointCloudError(f"{source}: {what} is not a valid NPY array ({exc})") from exc
    if dtype.hasobject:
        raise PointCloudError(f"{source}: {what} holds Python objects (dtype {dtype}); pickled data is refused")
    if any(not isinstance(dim, int) or dim < 0 for dim in shape):
        raise PointCloudError(f"{source}: {what} declares an invalid shape {shape}")
    return tuple(shape), fortran_order, dtype


def _row_sizes(shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, int]:
    """(rows, bytes per row) of an array with this header (a 0-d array is one row)."""
    rows = shape[0] if shape else 1
    return rows, math.prod(shape[1:]) * dtype.itemsize


def _npy_view(data: bytes, source: str, limits: ReadLimits) -> np.ndarray:
    """A read-only view of the array in ``data`` (no copy); sized and checked from the header first."""
    stream = io.BytesIO(data)
    shape, fortran_order, dtype = _npy_header(stream, source, "NPY file")
    rows, row_bytes = _row_sizes(shape, dtype)
    offset = stream.tell()
    needed, available = rows * row_bytes, len(data) - offset
    if available < needed:
        raise PointCloudError(
            f"{source}: NPY file is truncated: shape {shape} needs {needed} bytes of data, found {available}"
        )
    # The array is a view; the cloud's float32/uint8 copies and colour scaling cost up to ~2 rows each.
    limits.check(source, f"an NPY array of shape {shape}", rows, 2 * row_bytes)
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
    return flat.reshape(shape, order="F" if fortran_order else "C")


def _check_npz_members(archive: np.lib.npyio.NpzFile, source: str, limits: ReadLimits) -> None:
    """Size every member from its npy header: it must fit the member's declared size, coord's rows the
    point limit, and all of them (loaded, then copied into the cloud) the memory budget."""
    total, points = 0, 0
    for info in archive.zip.infolist():
        if not info.filename.endswith(".npy"):
            continue  # not an array (a readme, say): never read
        key = info.filename[:-4]
        what = f"NPZ array {key!r}"
        with archive.zip.open(info) as member:
            shape, _, dtype = _npy_header(member, source, what)
            header_bytes = member.tell()
        if key in _NPZ_FIELDS and dtype.kind not in "biuf":
            raise PointCloudError(f"{source}: {what} must be numeric (integer or real), got dtype {dtype}")
        rows, row_bytes = _row_sizes(shape, dtype)
        if rows * row_bytes > info.file_size - header_bytes:
            raise PointCloudError(
                f"{source}: {what} declares shape {shape} ({rows * row_bytes} bytes) but the archive "
                f"member holds {max(info.file_size - header_bytes, 0)}"
            )
        if key == "coord":
            points = rows
        total += 2 * rows * row_bytes
    limits.check_points(source, "the NPZ 'coord' array", points)
    limits.check_bytes(source, f"an NPZ archive of {points} points", total + points * CLOUD_BYTES_PER_POINT)


def _npz_member(archive: np.lib.npyio.NpzFile, key: str, source: str) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise PointCloudError(f"{source}: NPZ array {key!r} holds Python objects; pickled data is refused") from exc
        raise PointCloudError(f"{source}: NPZ array {key!r} is unreadable ({exc})") from exc
