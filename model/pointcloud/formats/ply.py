"""PLY (binary little/big endian and ASCII) through ``plyfile``.

plyfile parses the header; the vertex block is then decoded straight from the input buffer
(``np.frombuffer`` for binary, ``np.loadtxt`` for ASCII). plyfile's own element readers fall back
to a per-row Python loop for in-memory streams and for elements with list properties (mesh faces),
which takes tens of seconds on a 1M-point scan; faces are not needed, so they are never decoded.
Binary files whose vertex element comes after a list-property element, and files whose vertex element
itself has list properties, take the general ``PlyData.read`` path. ASCII values are checked against their
declared type (``property uchar z`` holding 300 is refused, where numpy and plyfile would wrap it to 44).
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
from plyfile import PlyData, PlyElement, PlyListProperty, PlyParseError

from model.pointcloud.cloud import FLOAT32_MAX, PointCloud, PointCloudError
from model.pointcloud.formats.columns import COORD_NAMES, cloud_from_columns
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
    listed = [p.name for p in vertex.properties if isinstance(p, PlyListProperty) and p.name in COORD_NAMES]
    if listed:
        raise PointCloudError(f"{source}: PLY vertex property {'/'.join(listed)} is a list property; "
                              "coordinates must be scalar properties")
    available = len(data) - stream.tell()
    skip_rows = sum(element.count for element in before)  # ASCII: one line per row of any element
    if _has_lists(vertex) or (not header.text and any(_has_lists(element) for element in before)):
        # plyfile decodes every element, row by row: size them all from the header first.
        elements = header.elements
        require_bytes(source, "PLY file", sum(_min_row_bytes(e, header.text) * e.count for e in elements), available)
        limits.check_points(source, "the PLY vertex element", vertex.count)
        memory = sum(_memory_row_bytes(e) * e.count for e in elements)
        limits.check_bytes(source, "the PLY elements", memory + vertex.count * CLOUD_BYTES_PER_POINT)
        if header.text:
            _check_ascii_rows(data, stream.tell(), skip_rows, vertex, source)
        records = _read_general(data, source)
    elif header.text:
        rows = [*before, vertex]
        require_bytes(source, "PLY file", sum(_min_row_bytes(e, True) * e.count for e in rows), available)
        # float64 text values, then the declared record.
        row_bytes = 8 * len(vertex.properties) + vertex.dtype().itemsize
        limits.check(source, "the PLY vertex element", vertex.count, row_bytes)
        records = _read_ascii(stream, vertex, skip_rows, source)
    else:
        offset = stream.tell() + sum(element.count * element.dtype(header.byte_order).itemsize for element in before)
        records = _read_binary(data, offset, vertex, header.byte_order, source)  # a view: nothing allocated yet
        limits.check(source, "the PLY vertex element", vertex.count, vertex.dtype().itemsize)
    columns = {p.name: records[p.name] for p in vertex.properties if not isinstance(p, PlyListProperty)}
    return cloud_from_columns(columns, source, "PLY vertex")


def write_ply(cloud: PointCloud, path: Path) -> None:
    """Binary little-endian PLY: x y z [red green blue] [nx ny nz] [extras]; coordinates in the source's frame
    (double when georeferenced, float otherwise)."""
    coord = cloud.world_coord()
    fields: list[tuple[str, np.ndarray]] = [(axis, coord[:, i]) for i, axis in enumerate("xyz")]
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
    """Every value is parsed as float64 (which holds each PLY type exactly; float32 values round as numpy's
    own float32 parsing does), then checked against its declared type and cast: ``np.loadtxt`` straight into
    uint8 would wrap 300 to 44 and truncate 1.5 to 1 without a word."""
    declared = vertex.dtype()
    start = stream.tell()
    text = io.TextIOWrapper(stream, encoding="ascii")
    wide = np.dtype([(name, np.float64) for name in declared.names])
    try:
        if vertex.count == 0 or not stream.getvalue()[start:].strip():  # np.loadtxt would warn "no data"
            values = np.empty(0, dtype=wide)
        else:
            values = np.loadtxt(text, dtype=wide, skiprows=skip_rows, max_rows=vertex.count, ndmin=1)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PointCloudError(f"{source}: not a valid ASCII PLY vertex block ({exc})") from exc
    if len(values) < vertex.count:
        raise PointCloudError(
            f"{source}: PLY file is truncated: the header declares {vertex.count} vertices, found {len(values)}"
        )
    records = np.empty(len(values), dtype=declared)
    for prop in vertex.properties:
        column, kind = values[prop.name], np.dtype(prop.val_dtype)
        bad = _outside(column, kind)
        if bad.any():
            row = int(np.argmax(bad))
            line = _ascii_line(stream.getvalue(), start, skip_rows + row)
            raise PointCloudError(
                f"{source}: PLY property {prop.name!r} is {_type_name(kind)} but line "
                f"{line} holds {column[row]:.10g}, {_range_text(kind)}"
            )
        records[prop.name] = column
    return records


# numpy dtype (without byte order) → the PLY type name a header uses, for messages.
_PLY_TYPE_NAMES = {"i1": "char", "u1": "uchar", "i2": "short", "u2": "ushort", "i4": "int", "u4": "uint",
                   "f4": "float", "f8": "double"}


def _outside(column: np.ndarray, kind: np.dtype) -> np.ndarray:
    """Values the declared type cannot hold: non-integers or out-of-range integers; finite floats beyond
    float32 (inf and nan literals are holes, left to the invalid-point handling)."""
    if kind.kind in "iu":
        info = np.iinfo(kind)
        return ~((column >= info.min) & (column <= info.max) & (column == np.floor(column)))
    if kind.itemsize == 4:
        return np.isfinite(column) & (np.abs(column) > FLOAT32_MAX)
    return np.zeros(len(column), dtype=bool)


def _range_text(kind: np.dtype) -> str:
    if kind.kind in "iu":
        info = np.iinfo(kind)
        return f"not an integer in {info.min}..{info.max}"
    return f"beyond the float32 range (+/-{FLOAT32_MAX:.3g})"


def _check_ascii_rows(data: bytes, start: int, skip_rows: int, vertex: PlyElement, source: str) -> None:
    """The general path's ASCII vertex rows, token by token (list lengths included), against their declared
    types; plyfile would store 300 in a uchar as 44. Costs about what plyfile's own per-row parse costs."""
    lines = (raw.split() for raw in io.BytesIO(data[start:]))
    rows = (tokens for tokens in lines if tokens and not tokens[0].startswith(b"#"))
    for row, tokens in enumerate(itertools.islice(rows, skip_rows, skip_rows + vertex.count)):
        at = 0
        for prop in vertex.properties:
            parts = [(prop.len_dtype, " length")] if isinstance(prop, PlyListProperty) else []
            parts.append((prop.val_dtype, ""))
            count = 1
            for kind, what in parts:
                try:
                    values = np.array([float(token) for token in tokens[at : at + count]])
                except ValueError:
                    return  # not a number: plyfile reports the row
                bad = _outside(values, np.dtype(kind))
                if bad.any():
                    raise PointCloudError(
                        f"{source}: PLY property {prop.name!r}{what} is {_type_name(np.dtype(kind))} but line "
                        f"{_ascii_line(data, start, skip_rows + row)} holds {values[np.argmax(bad)]:.10g}, "
                        f"{_range_text(np.dtype(kind))}"
                    )
                at += count
                count = int(values[0]) if what and len(values) else 1


def _type_name(kind: np.dtype) -> str:
    return _PLY_TYPE_NAMES.get(kind.str[1:], kind.name)


def _ascii_line(data: bytes, start: int, row: int) -> int:
    """1-based file line of the ``row``-th data row after byte ``start`` (blank and ``#`` lines skipped, as
    ``np.loadtxt`` does); for error messages only."""
    line = data[:start].count(b"\n")
    for raw in io.BytesIO(data[start:]):
        line += 1
        stripped = raw.strip()
        if stripped and not stripped.startswith(b"#"):
            if row == 0:
                return line
            row -= 1
    return line


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
