"""PLY (binary little/big endian and ASCII) through ``plyfile``.

plyfile parses the header; the vertex block is then decoded straight from the input buffer
(``np.frombuffer`` for binary, ``np.loadtxt`` for ASCII). plyfile's own element readers fall back
to a per-row Python loop for in-memory streams and for elements with list properties (mesh faces),
which takes tens of seconds on a 1M-point scan; faces are not needed, so they are never decoded.
Files whose vertex element comes after a list-property element, or itself has list properties,
take the general ``PlyData.read`` path.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from plyfile import PlyData, PlyElement, PlyListProperty, PlyParseError

from model.pointcloud.cloud import PointCloud, PointCloudError
from model.pointcloud.formats.columns import cloud_from_columns
from model.pointcloud.formats.limits import CLOUD_BYTES_PER_POINT, ReadLimits, require_bytes, require_count

_VERTEX = "vertex"
# plyfile keeps each list-property value of each row as its own numpy array (~100 bytes of object).
_LIST_ENTRY_BYTES = 128


def read_ply(data: bytes, source: str, limits: ReadLimits) -> PointCloud:
    stream = io.BytesIO(data)
    try:
        # Private but stable for years (same signature in plyfile 0.7 to 1.1): reads the header lines only.
        header = PlyData._parse_header(stream)
    except (PlyParseError, UnicodeDecodeError, ValueError) as exc:
        raise PointCloudError(f"{source}: not a valid PLY file ({exc})") from exc
    names = [element.name for element in header.elements]
    if _VERTEX not in names:
        raise PointCloudError(f"{source}: PLY file has no 'vertex' element (elements: {', '.join(names) or 'none'})")
    for element in header.elements:
        require_count(source, f"PLY element {element.name!r}", element.count)
    position = names.index(_VERTEX)
    before, vertex = header.elements[:position], header.elements[position]
    available = len(data) - stream.tell()
    if _has_lists(vertex) or any(_has_lists(element) for element in before):
        # plyfile decodes every element, row by row: size them all from the header first.
        elements = header.elements
        require_bytes(source, "PLY file", sum(_min_row_bytes(e, header.text) * e.count for e in elements), available)
        limits.check_points(source, "the PLY vertex element", vertex.count)
        memory = sum(_memory_row_bytes(e) * e.count for e in elements)
        limits.check_bytes(source, "the PLY elements", memory + vertex.count * CLOUD_BYTES_PER_POINT)
        records = _read_general(data, source)
    elif header.text:
        rows = [*before, vertex]
        require_bytes(source, "PLY file", sum(_min_row_bytes(e, True) * e.count for e in rows), available)
        limits.check(source, "the PLY vertex element", vertex.count, 2 * vertex.dtype().itemsize)
        records = _read_ascii(stream, vertex, sum(element.count for element in before), source)
    else:
        offset = stream.tell() + sum(element.count * element.dtype(header.byte_order).itemsize for element in before)
        records = _read_binary(data, offset, vertex, header.byte_order, source)  # a view: nothing allocated yet
        limits.check(source, "the PLY vertex element", vertex.count, vertex.dtype().itemsize)
    columns = {p.name: records[p.name] for p in vertex.properties if not isinstance(p, PlyListProperty)}
    return cloud_from_columns(columns, source, "PLY vertex")


def write_ply(cloud: PointCloud, path: Path) -> None:
    """Binary little-endian PLY: x y z [red green blue] [nx ny nz] [extras]."""
    fields: list[tuple[str, np.ndarray]] = [(axis, cloud.coord[:, i]) for i, axis in enumerate("xyz")]
    if cloud.color is not None:
        fields += [(name, cloud.color[:, i]) for i, name in enumerate(("red", "green", "blue"))]
    if cloud.normal is not None:
        fields += [(name, cloud.normal[:, i]) for i, name in enumerate(("nx", "ny", "nz"))]
    for name, values in cloud.extras.items():
        values = np.asarray(values)
        if values.ndim == 1:
            fields.append((name, _ply_scalar(values)))
        else:
            flat = values.reshape(len(values), -1)
            fields += [(f"{name}_{i}", _ply_scalar(flat[:, i])) for i in range(flat.shape[1])]
    records = np.empty(len(cloud), dtype=[(name, values.dtype) for name, values in fields])
    for name, values in fields:
        records[name] = values
    PlyData([PlyElement.describe(records, _VERTEX)], text=False, byte_order="<").write(str(path))


def _has_lists(element: PlyElement) -> bool:
    return any(isinstance(p, PlyListProperty) for p in element.properties)


def _min_row_bytes(element: PlyElement, text: bool) -> int:
    """The fewest bytes one row can take in the file: a digit and a separator per value in ASCII
    (an empty list is its length "0"); the scalars and list lengths in binary."""
    if text:
        return 2 * len(element.properties)
    return sum(np.dtype(p.len_dtype if isinstance(p, PlyListProperty) else p.val_dtype).itemsize
               for p in element.properties)


def _memory_row_bytes(element: PlyElement) -> int:
    """What plyfile's general reader allocates per row: the record (lists as object pointers) plus
    one small array per list value."""
    lists = sum(isinstance(p, PlyListProperty) for p in element.properties)
    return element.dtype().itemsize + lists * _LIST_ENTRY_BYTES


def _read_binary(data: bytes, offset: int, vertex: PlyElement, byte_order: str, source: str) -> np.ndarray:
    dtype = vertex.dtype(byte_order)
    needed, available = vertex.count * dtype.itemsize, max(len(data) - offset, 0)
    if available < needed:
        raise PointCloudError(
            f"{source}: PLY file is truncated: the header declares {vertex.count} vertices "
            f"({needed} bytes) but only {available} bytes follow"
        )
    return np.frombuffer(data, dtype=dtype, count=vertex.count, offset=offset)


def _read_ascii(stream: io.BytesIO, vertex: PlyElement, skip_rows: int, source: str) -> np.ndarray:
    text = io.TextIOWrapper(stream, encoding="ascii")
    try:
        records = np.loadtxt(text, dtype=vertex.dtype(), skiprows=skip_rows, max_rows=vertex.count, ndmin=1)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PointCloudError(f"{source}: not a valid ASCII PLY vertex block ({exc})") from exc
    if len(records) < vertex.count:
        raise PointCloudError(
            f"{source}: PLY file is truncated: the header declares {vertex.count} vertices, found {len(records)}"
        )
    return records


def _read_general(data: bytes, source: str) -> np.ndarray:
    try:
        return PlyData.read(io.BytesIO(data))[_VERTEX].data
    except (PlyParseError, UnicodeDecodeError, ValueError) as exc:
        raise PointCloudError(f"{source}: not a valid PLY file ({exc})") from exc


def _ply_scalar(values: np.ndarray) -> np.ndarray:
    """Cast to a dtype PLY can store (no 64-bit integers, no bool)."""
    if values.dtype == np.bool_:
        return values.astype(np.uint8)
    if values.dtype.kind in "iu" and values.dtype.itemsize == 8:
        info = np.iinfo(np.int32 if values.dtype.kind == "i" else np.uint32)
        if values.size == 0 or (values.min() >= info.min and values.max() <= info.max):
            return values.astype(info.dtype)
        return values.astype(np.float64)
    if values.dtype.kind == "f" and values.dtype.itemsize < 4:
        return values.astype(np.float32)
    return values
