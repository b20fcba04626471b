"""PCD (PCL point cloud data) in ASCII, binary and binary_compressed encodings through ``pypcd4``.

pypcd4 parses the header (after its sizes are bounded here); binary_compressed data is decompressed
with pypcd4's LZF codec, binary data is viewed straight from the input buffer and ASCII rows are parsed
with ``np.loadtxt`` into pypcd4's record dtype. Colour comes from a packed ``rgb``/``rgba`` field
(float32 or uint32 bits 0x00RRGGBB) or from ``r``/``g``/``b``. The VIEWPOINT pose is not applied.
"""

from __future__ import annotations

import io
import struct

from typing import TYPE_CHECKING

import numpy as np

from model.pointcloud.cloud import PointCloud, PointCloudError
from model.pointcloud.formats import MAX_EXPANSION
from model.pointcloud.formats.columns import cloud_from_columns
from model.pointcloud.formats.limits import ReadLimits, require_bytes

if TYPE_CHECKING:  # pypcd4 (0.2 s to import) only when a PCD file is read
    from pypcd4 import MetaData

_MAX_HEADER_LINES = 64
_MAX_HEADER_LINE_BYTES = 1 << 16
# Values per point (sum of COUNT): the widest PCL descriptors (SHOT: 352, VFH: 308) fit with room.
# Checked before pypcd4 builds one dtype field per value (COUNT 10^11 would build 10^11 names).
_MAX_VALUES_PER_POINT = 4096
_PADDING_PREFIX = "#$%&~~"  # pypcd4's name for "_" padding fields
_PACKED = ("rgb", "rgba")


def read_pcd(data: bytes, source: str, limits: ReadLimits) -> PointCloud:
    from pypcd4 import Encoding

    metadata, offset = _parse_header(data, source)
    itemsize = metadata.build_dtype().itemsize
    if metadata.data == Encoding.BINARY:
        records = _read_binary(data, offset, metadata, source)  # a view: the columns and the cloud are copies
        limits.check(source, "the PCD header", metadata.points, itemsize)
    elif metadata.data == Encoding.ASCII:
        # Every value takes at least two bytes of text ("0 "); records widen packed colour to float64.
        require_bytes(source, "PCD file", metadata.points * 2 * sum(metadata.count), len(data) - offset)
        limits.check(source, "the PCD header", metadata.points, 2 * itemsize + 8)
        records = _read_ascii(data, offset, metadata, source)
    else:
        # The decompressed buffer, the record array and the columns.
        if metadata.points:
            _check_compressed_sizes(data, offset, metadata.points * itemsize, source)
        limits.check(source, "the PCD header", metadata.points, 3 * itemsize)
        records = _read_compressed(data, offset, metadata, source)
    columns = _columns(records, metadata)
    for packed in _PACKED:
        if packed in columns and columns[packed].ndim == 1:
            bits = _packed_bits(columns.pop(packed))
            columns.update(r=(bits >> 16) & 0xFF, g=(bits >> 8) & 0xFF, b=bits & 0xFF)
            break
    cloud = cloud_from_columns(columns, source, "PCD")
    if metadata.height > 1:  # WIDTH × HEIGHT = POINTS, checked with the header
        cloud.grid_shape = (int(metadata.height), int(metadata.width))  # organised: rows of an image
    return cloud


def _parse_header(data: bytes, source: str) -> tuple[MetaData, int]:
    """Header lines up to DATA → (metadata, byte offset of the point data)."""
    import pydantic
    from pypcd4 import MetaData

    stream = io.BytesIO(data)
    lines: list[str] = []
    while not (lines and lines[-1].upper().startswith("DATA")):
        raw = stream.readline(_MAX_HEADER_LINE_BYTES + 1)
        if not raw or len(lines) >= _MAX_HEADER_LINES:
            raise PointCloudError(f"{source}: not a valid PCD file (no DATA line in the header)")
        if len(raw) > _MAX_HEADER_LINE_BYTES:
            raise PointCloudError(
                f"{source}: not a valid PCD file (a header line is over {_MAX_HEADER_LINE_BYTES} bytes)"
            )
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise PointCloudError(f"{source}: not a valid PCD file (header is not text)") from exc
        if line and not line.startswith("#"):
            lines.append(line)
    try:
        metadata = MetaData.parse_header(lines)
    except pydantic.ValidationError as exc:  # its str() adds a line of errors.pydantic.dev links per error
        problems = "; ".join(f"{'.'.join(map(str, error['loc'])).upper()}: {error['msg']} (got {error['input']!r})"
                             for error in exc.errors(include_url=False))
        raise PointCloudError(f"{source}: not a valid PCD header ({problems})") from exc
    except (ValueError, KeyError) as exc:
        raise PointCloudError(f"{source}: not a valid PCD header ({exc})") from exc
    if metadata.width * metadata.height != metadata.points:
        raise PointCloudError(
            f"{source}: not a valid PCD header (WIDTH {metadata.width} * HEIGHT {metadata.height} = "
            f"{metadata.width * metadata.height}, but POINTS is {metadata.points})"
        )
    counts = {len(metadata.fields), len(metadata.size), len(metadata.type), len(metadata.count)}
    if len(counts) != 1:
        raise PointCloudError(f"{source}: PCD header FIELDS/SIZE/TYPE/COUNT have different lengths")
    if sum(metadata.count) > _MAX_VALUES_PER_POINT:
        raise PointCloudError(
            f"{source}: PCD header COUNT declares {sum(metadata.count)} values per point "
            f"(at most {_MAX_VALUES_PER_POINT} are accepted)"
        )
    try:
        metadata.build_dtype()
    except KeyError as exc:
        raise PointCloudError(f"{source}: PCD header has an unsupported TYPE/SIZE pair {exc}") from exc
    return metadata, stream.tell()


def _read_binary(data: bytes, offset: int, metadata: MetaData, source: str) -> np.ndarray:
    dtype = metadata.build_dtype()
    needed, available = metadata.points * dtype.itemsize, len(data) - offset
    if available < needed:
        raise PointCloudError(
            f"{source}: PCD file is truncated: the header declares {metadata.points} points "
            f"({needed} bytes) but only {available} bytes follow"
        )
    return np.frombuffer(data, dtype=dtype, count=metadata.points, offset=offset)


def _read_ascii(data: bytes, offset: int, metadata: MetaData, source: str) -> np.ndarray:
    """Any whitespace between values (pypcd4's own reader refuses trailing spaces, which some tools write)."""
    dtype = metadata.build_dtype()
    # Packed colour is read as float64 text and decoded by _packed_bits (PCL writes it as an integer).
    dtype = np.dtype([(name, np.float64 if name in _PACKED else dtype[name]) for name in dtype.names])
    if not data[offset:].strip():  # no rows: np.loadtxt would warn "input contained no data"
        records = np.empty(0, dtype=dtype)
    else:
        records = _loadtxt(data, offset, dtype, metadata.points, source)
    if len(records) != metadata.points:
        raise PointCloudError(
            f"{source}: PCD file is truncated: the header declares {metadata.points} points, found {len(records)}"
        )
    return records


def _loadtxt(data: bytes, offset: int, dtype: np.dtype, rows: int, source: str) -> np.ndarray:
    stream = io.BytesIO(data)
    stream.seek(offset)
    try:
        return np.loadtxt(io.TextIOWrapper(stream, encoding="ascii"), dtype=dtype, max_rows=rows, ndmin=1)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PointCloudError(f"{source}: not a valid ASCII PCD point block ({exc})") from exc


def _read_compressed(data: bytes, offset: int, metadata: MetaData, source: str) -> np.ndarray:
    """Decompressed here rather than by pypcd4, which re-reads the header its own way (10 lines at most)
    and trusts the block's declared size: the sizes are checked first, then each field's column is laid
    out from the buffer (binary_compressed stores the points field by field)."""
    import lzf

    dtype = metadata.build_dtype()
    if metadata.points == 0:
        return np.empty(0, dtype=dtype)
    expected = metadata.points * dtype.itemsize
    _check_compressed_sizes(data, offset, expected, source)
    compressed, _ = struct.unpack_from("<II", data, offset)
    try:
        buffer = lzf.decompress(data[offset + 8 : offset + 8 + compressed], expected)
    except ValueError as exc:
        raise PointCloudError(f"{source}: not a valid binary_compressed PCD file ({exc})") from exc
    if buffer is None or len(buffer) != expected:
        raise PointCloudError(
            f"{source}: not a valid binary_compressed PCD file (the block decompresses to "
            f"{0 if buffer is None else len(buffer)} bytes, the header needs {expected})"
        )
    records = np.empty(metadata.points, dtype=dtype)
    start = 0
    for name in dtype.names:
        field = dtype[name]
        records[name] = np.frombuffer(buffer, dtype=field, count=metadata.points, offset=start)
        start += field.itemsize * metadata.points
    return records


def _check_compressed_sizes(data: bytes, offset: int, expected: int, source: str) -> None:
    """binary_compressed data starts with uint32 compressed and uncompressed sizes; check both
    before the uncompressed buffer is allocated."""
    if len(data) < offset + 8:
        raise PointCloudError(f"{source}: PCD file is truncated: no compressed data block")
    compressed, uncompressed = struct.unpack_from("<II", data, offset)
    if uncompressed != expected:
        raise PointCloudError(
            f"{source}: not a valid PCD file (the header needs {expected} bytes of points, "
            f"the compressed block holds {uncompressed})"
        )
    if compressed > len(data) - offset - 8:
        raise PointCloudError(
            f"{source}: PCD file is truncated: the compressed block is {compressed} bytes, "
            f"{len(data) - offset - 8} follow"
        )
    if uncompressed > MAX_EXPANSION * max(compressed, 1):
        raise PointCloudError(f"{source}: PCD compressed block claims an implausible {uncompressed} bytes")


def _columns(records: np.ndarray, metadata: MetaData) -> dict[str, np.ndarray]:
    """Field views; COUNT > 1 fields become (N, count) arrays; padding fields are dropped."""
    columns: dict[str, np.ndarray] = {}
    for name, count in zip(metadata.fields, metadata.count):
        if name.startswith(_PADDING_PREFIX):
            continue
        if count == 1:
            columns[name] = records[name]
        else:
            columns[name] = np.stack([records[f"{name}__{i:04d}"] for i in range(count)], axis=1)
    return columns


def _packed_bits(values: np.ndarray) -> np.ndarray:
    """Packed colour → uint32 0xAARRGGBB. Binary fields hold the bits (as float32 or uint32). ASCII
    text holds either the integer (PCL's writer) or the float whose bits they are: an integral value
    is taken as the integer, anything else as the float (float-packed colours are tiny non-integers)."""
    if values.dtype != np.float64:
        return values.view(np.uint32) if values.dtype.itemsize == 4 else values.astype(np.uint32)
    integral = (values == np.floor(values)) & (values >= 0) & (values < 2**32)
    as_int = np.where(integral, values, 0).astype(np.uint32)
    as_float = np.where(integral, 0, values).astype(np.float32).view(np.uint32)
    return np.where(integral, as_int, as_float)
