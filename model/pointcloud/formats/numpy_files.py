"""NPY arrays and Pointcept-style NPZ archives, always with ``allow_pickle=False``."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from model.pointcloud.cloud import PointCloud, PointCloudError
from model.pointcloud.formats import MAX_EXPANSION
from model.pointcloud.formats.columns import cloud_from_columns, native_copy, structured_columns

_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
_NPZ_FIELDS = ("coord", "color", "normal")


def read_npy(data: bytes, source: str) -> PointCloud:
    """(N, 3) xyz, (N, 6) xyz rgb or (N, 9) xyz rgb normal; a structured array is read by field names."""
    array = _npy_view(data, source)
    if array.dtype.names:
        return cloud_from_columns(structured_columns(array), source, "NPY structured")
    if array.ndim != 2 or array.shape[1] not in (3, 6, 9):
        raise PointCloudError(
            f"{source}: NPY array must have shape (N, 3), (N, 6) or (N, 9) (xyz, rgb, normal), got {array.shape}"
        )
    if array.dtype.kind not in "biuf":
        raise PointCloudError(f"{source}: NPY array must be numeric, got dtype {array.dtype}")
    columns = array.shape[1]
    return PointCloud(
        coord=array[:, 0:3],
        color=array[:, 3:6] if columns >= 6 else None,
        normal=array[:, 6:9] if columns == 9 else None,
        source=source,
    )


def read_npz(data: bytes, source: str) -> PointCloud:
    """Pointcept keys: ``coord`` (required), ``color``, ``normal``; other per-point arrays become extras."""
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
        if "coord" not in archive.files:
            raise PointCloudError(f"{source}: NPZ archive has no 'coord' array (keys: {', '.join(archive.files)})")
        arrays = {key: _npz_member(archive, key, source) for key in archive.files}
    fields = {key: arrays.pop(key) for key in _NPZ_FIELDS if key in arrays}
    extras = {key: native_copy(value) for key, value in arrays.items() if value.ndim >= 1}  # 0-d: metadata
    return PointCloud(**fields, extras=extras, source=source)


def write_npz(cloud: PointCloud, path: Path) -> None:
    arrays = {"coord": cloud.coord}
    if cloud.color is not None:
        arrays["color"] = cloud.color
    if cloud.normal is not None:
        arrays["normal"] = cloud.normal
    arrays.update({key: value for key, value in cloud.extras.items() if key not in arrays})
    with open(path, "wb") as stream:
        np.savez(stream, **arrays)


def _npy_view(data: bytes, source: str) -> np.ndarray:
    """A read-only view of the array in ``data`` (no copy); object dtypes are refused before any decoding."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = _NPY_HEADER_READERS.get(version)
        if read_header is None:  # version 3 (utf-8 field names) is rare: let numpy copy it
            array = np.load(io.BytesIO(data), allow_pickle=False)
            if not isinstance(array, np.ndarray):
                raise ValueError("not a single array")
            return array
        shape, fortran_order, dtype = read_header(stream)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise PointCloudError(f"{source}: NPY holds Python objects; pickled data is refused") from exc
        raise PointCloudError(f"{source}: not a valid NPY file ({exc})") from exc
    if dtype.hasobject:
        raise PointCloudError(f"{source}: NPY holds Python objects (dtype {dtype}); pickled data is refused")
    count = int(np.prod(shape, dtype=np.int64))
    offset = stream.tell()
    needed, available = count * dtype.itemsize, len(data) - offset
    if available < needed:
        raise PointCloudError(
            f"{source}: NPY file is truncated: shape {shape} needs {needed} bytes of data, found {available}"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran_order else "C")


def _npz_member(archive: np.lib.npyio.NpzFile, key: str, source: str) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise PointCloudError(f"{source}: NPZ array {key!r} holds Python objects; pickled data is refused") from exc
        raise PointCloudError(f"{source}: NPZ array {key!r} is unreadable ({exc})") from exc
