"""LAS and LAZ through ``laspy`` (LAZ needs the ``lazrs`` backend, installed with ``laspy[lazrs]``).

Coordinates are the scaled float64 values. Georeferenced data is moved near the origin before the float32
conversion by :func:`~model.pointcloud.cloud.float32_coords`, as for every float64 format: the whole-metre
minimum is subtracted and kept as ``PointCloud.origin``, so survey coordinates keep millimetre precision.
"""

from __future__ import annotations

import io
import struct
from typing import TYPE_CHECKING

import numpy as np

from model.pointcloud.cloud import PointCloud, PointCloudError, float32_coords
from model.pointcloud.formats import MAX_EXPANSION
from model.pointcloud.formats.limits import CLOUD_BYTES_PER_POINT, ReadLimits

if TYPE_CHECKING:  # laspy (0.3 s to import) only when a LAS/LAZ file is read
    import laspy

_EXTRAS = ("intensity", "classification")
_VLR_COUNT_OFFSET = 100  # uint32 "number of variable length records" in every LAS 1.x header
_VLR_HEADER_BYTES = 54
_EVLR_START_OFFSET = 235  # LAS 1.4: uint64 start of the first extended VLR, then uint32 count
_EVLR_COUNT_OFFSET = 243
_EVLR_HEADER_BYTES = 60
_HEADER_SIZE_OFFSET = 94  # uint16 header size: the VLRs follow it
_LASZIP_RECORD_ID = 22204
_VARIABLE_CHUNKS = 2**32 - 1  # LASzip's marker for variable-size chunks (sizes in the chunk table)
_MAX_CHUNK_BYTES = 256 << 20
# LAZ 1.4 layered items (LASzip item type -> layers per chunk; 0 = one per byte of the item): point14 has
# 9 (xy+returns, z, classification, flags, intensity, scan angle, user data, point source, gps time).
_LAYERS_PER_ITEM = {10: 9, 11: 1, 12: 2, 13: 1, 14: 0}
# Beyond laspy's record array: scaled float64 x/y/z (24 each, one at a time), the stacked float64
# coordinates and their origin-shifted copy (48), 16-bit colour (6) and extras (3).
_DECODE_BYTES_PER_POINT = 120


def read_las(data: bytes, source: str, limits: ReadLimits) -> PointCloud:
    import laspy

    _check_vlr_count(data, source)
    _check_evlr_count(data, source)
    try:
        with laspy.open(io.BytesIO(data)) as reader:
            header = reader.header
        _check_size(header, len(data), source, limits)
        if header.are_points_compressed:
            _check_chunk_table(data, int(header.offset_to_point_data), int(header.point_count), source)
            vlr = _laszip_vlr(data) or b""
            _check_chunk_size(vlr, header.point_format.size, source)
            _check_layer_sizes(data, vlr, int(header.offset_to_point_data), int(header.point_count), source)
        # lazrs' sequential decoder: its parallel one trusts the chunk table (a corrupt entry makes it
        # allocate gigabytes, and a failed Rust allocation aborts the whole process).
        las = laspy.read(io.BytesIO(data), laz_backend=laspy.LazBackend.Lazrs)
    except PointCloudError:
        raise
    except (laspy.errors.LaspyException, ValueError, RuntimeError, OSError) as exc:
        # RuntimeError covers lazrs.LazrsError (truncated or corrupt LAZ chunks).
        raise PointCloudError(f"{source}: not a valid LAS/LAZ file ({exc})") from exc
    declared, found = int(las.header.point_count), len(las.points)
    if found != declared:
        raise PointCloudError(f"{source}: LAS file is truncated: the header declares {declared} points, found {found}")
    xyz = np.stack([np.asarray(getattr(las, axis), dtype=np.float64) for axis in "xyz"], axis=1)  # (N, 3) m
    coord, origin = float32_coords(xyz, source)
    dimensions = set(las.point_format.dimension_names)
    color = None
    if {"red", "green", "blue"} <= dimensions:
        color = np.stack([np.asarray(las[name]) for name in ("red", "green", "blue")], axis=1)  # uint16
    extras = {name: np.array(las[name]) for name in _EXTRAS if name in dimensions}
    return PointCloud(coord=coord, color=color, extras=extras, source=source, origin=origin)


def _check_size(header: laspy.LasHeader, size: int, source: str, limits: ReadLimits) -> None:
    """Refuse a point count the file cannot hold, or over the limits, before laspy allocates the records."""
    count, record = int(header.point_count), header.point_format.size
    needed = count * record
    available = size - int(header.offset_to_point_data)
    if not header.are_points_compressed and needed > available:
        raise PointCloudError(
            f"{source}: LAS file is truncated: the header declares {header.point_count} points "
            f"({needed} bytes) but only {max(available, 0)} bytes follow"
        )
    if header.are_points_compressed and needed > MAX_EXPANSION * size:
        raise PointCloudError(
            f"{source}: LAZ header declares {header.point_count} points, implausibly many for a {size}-byte file"
        )
    limits.check_points(source, "the LAS header", count)
    per_point = record + _DECODE_BYTES_PER_POINT + CLOUD_BYTES_PER_POINT
    limits.check_bytes(source, f"a LAS file of {count} points", count * per_point)


def _check_chunk_table(data: bytes, offset: int, points: int, source: str) -> None:
    """LAZ point data starts with the offset of the chunk table, whose second uint32 is the chunk count;
    lazrs allocates 16 bytes per declared chunk up front (and aborts the process when that fails). A chunk
    holds at least one point and one byte, which bounds the count."""
    if len(data) < offset + 8:
        return  # laspy reports the missing data itself
    (table,) = struct.unpack_from("<q", data, offset)
    if offset + 8 <= table <= len(data) - 8:
        _, chunks = struct.unpack_from("<II", data, table)
        if chunks > min(points + 1, len(data)):
            raise PointCloudError(
                f"{source}: not a valid LAZ file (its chunk table declares {chunks} chunks for {points} points "
                f"in {len(data)} bytes)"
            )


def _laszip_vlr(data: bytes) -> bytes | None:
    """The payload of the LASzip VLR (compressor, chunk size, item list), or None when absent or cut."""
    at = struct.unpack_from("<H", data, _HEADER_SIZE_OFFSET)[0]
    for _ in range(_vlr_count(data)):
        if at + _VLR_HEADER_BYTES > len(data):
            return None  # laspy reports the truncated VLRs itself
        user_id, record_id, length = struct.unpack_from("<16sHH", data, at + 2)
        at += _VLR_HEADER_BYTES
        if user_id.rstrip(b"\0") == b"laszip encoded" and record_id == _LASZIP_RECORD_ID:
            return data[at : at + length]
        at += length
    return None


def _check_chunk_size(vlr: bytes, record: int, source: str) -> None:
    """lazrs allocates one chunk of points (the LASzip VLR's chunk_size × record size) up front, and
    aborts the process when that fails: refuse sizes no LASzip writer uses (its default is 50,000 points)."""
    if len(vlr) >= 16:
        (chunk,) = struct.unpack_from("<I", vlr, 12)
        if chunk != _VARIABLE_CHUNKS and chunk * record > _MAX_CHUNK_BYTES:
            raise PointCloudError(
                f"{source}: not a valid LAZ file (its LASzip chunk size of {chunk} points of {record} "
                f"bytes exceeds {_MAX_CHUNK_BYTES >> 20} MiB)"
            )


def _check_layer_sizes(data: bytes, vlr: bytes, offset: int, points: int, source: str) -> None:
    """Point formats 6-10 compress each chunk in layers: the chunk's first point raw, its point count, one
    uint32 byte count per layer, then the layers. lazrs allocates (and zero-fills) each layer from its
    declared count, so an 800-byte file could take 4 GB per layer: walk the chunks and refuse layer
    counts that the bytes after them cannot hold."""
    if len(vlr) < 34:
        return
    chunk_size, items = struct.unpack_from("<I", vlr, 12)[0], struct.unpack_from("<H", vlr, 32)[0]
    if len(vlr) < 34 + 6 * items:
        return
    layers = raw = 0
    for i in range(items):
        kind, size, _ = struct.unpack_from("<HHH", vlr, 34 + 6 * i)
        if kind not in _LAYERS_PER_ITEM:
            return  # point formats 0-5: one arithmetic-coded stream, no layer sizes
        layers += _LAYERS_PER_ITEM[kind] or size
        raw += size
    at, left = offset + 8, points  # the point data starts with the chunk table's offset
    while left > 0:
        sizes_at = at + raw + 4
        if sizes_at + 4 * layers > len(data):
            return  # truncated: lazrs reports it
        count = struct.unpack_from("<I", data, at + raw)[0]
        total = sum(struct.unpack_from(f"<{layers}I", data, sizes_at))
        at = sizes_at + 4 * layers + total
        if at > len(data):
            raise PointCloudError(
                f"{source}: not a valid LAZ file (a chunk declares {total} bytes of compressed layers, "
                f"only {max(len(data) - sizes_at - 4 * layers, 0)} follow)"
            )
        left -= max(count if chunk_size == _VARIABLE_CHUNKS else chunk_size, 1)


def _vlr_count(data: bytes) -> int:
    return struct.unpack_from("<I", data, _VLR_COUNT_OFFSET)[0]


def _check_evlr_count(data: bytes, source: str) -> None:
    """LAS 1.4 extended VLRs: laspy reads the declared count from the declared start one header at a time,
    even past the end of the file (gigabytes of empty records for a forged count)."""
    if len(data) < _EVLR_COUNT_OFFSET + 4 or (data[24], data[25]) < (1, 4):
        return
    (start,) = struct.unpack_from("<Q", data, _EVLR_START_OFFSET)
    (count,) = struct.unpack_from("<I", data, _EVLR_COUNT_OFFSET)
    if count and count * _EVLR_HEADER_BYTES > len(data) - start:
        raise PointCloudError(
            f"{source}: not a valid LAS file (the header declares {count} extended VLRs from byte {start}, "
            f"more than fit in {len(data)} bytes)"
        )


def _check_vlr_count(data: bytes, source: str) -> None:
    """laspy walks the declared VLR count one record at a time, for minutes on a corrupt count."""
    if len(data) < _VLR_COUNT_OFFSET + 4:
        return  # laspy reports the short header itself
    (count,) = struct.unpack_from("<I", data, _VLR_COUNT_OFFSET)
    if count * _VLR_HEADER_BYTES > len(data):
        raise PointCloudError(f"{source}: not a valid LAS/LAZ file (the header declares {count} VLRs, more than fit)")
