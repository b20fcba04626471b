"""LAS and LAZ through ``laspy`` (LAZ needs the ``lazrs`` backend, installed with ``laspy[lazrs]``).

Coordinates are the scaled float64 values. Georeferenced data (any |coordinate| above 10 km) is moved
near the origin before the float32 conversion: the whole-metre minimum is subtracted and kept as
``PointCloud.origin``, so survey coordinates keep millimetre precision.
"""

from __future__ import annotations

import io
import struct

import laspy
import numpy as np

from model.pointcloud.cloud import PointCloud, PointCloudError
from model.pointcloud.formats import MAX_EXPANSION

_EXTRAS = ("intensity", "classification")
_GEOREFERENCED = 1e4  # metres
_VLR_COUNT_OFFSET = 100  # uint32 "number of variable length records" in every LAS 1.x header
_VLR_HEADER_BYTES = 54


def read_las(data: bytes, source: str) -> PointCloud:
    _check_vlr_count(data, source)
    try:
        with laspy.open(io.BytesIO(data)) as reader:
            header = reader.header
        _check_size(header, len(data), source)
        las = laspy.read(io.BytesIO(data))
    except (laspy.errors.LaspyException, ValueError, RuntimeError, OSError) as exc:
        # RuntimeError covers lazrs.LazrsError (truncated or corrupt LAZ chunks).
        raise PointCloudError(f"{source}: not a valid LAS/LAZ file ({exc})") from exc
    declared, found = int(las.header.point_count), len(las.points)
    if found != declared:
        raise PointCloudError(f"{source}: LAS file is truncated: the header declares {declared} points, found {found}")
    xyz = np.stack([np.asarray(getattr(las, axis), dtype=np.float64) for axis in "xyz"], axis=1)  # (N, 3) m
    origin = np.zeros(3)
    if found and np.isfinite(xyz).all() and np.abs(xyz).max() > _GEOREFERENCED:
        origin = np.floor(xyz.min(axis=0))
    coord = (xyz - origin).astype(np.float32)
    dimensions = set(las.point_format.dimension_names)
    color = None
    if {"red", "green", "blue"} <= dimensions:
        color = np.stack([np.asarray(las[name]) for name in ("red", "green", "blue")], axis=1)  # uint16
    extras = {name: np.array(las[name]) for name in _EXTRAS if name in dimensions}
    return PointCloud(coord=coord, color=color, extras=extras, source=source, origin=origin)


def _check_size(header: laspy.LasHeader, size: int, source: str) -> None:
    """Refuse a point count the file cannot hold before laspy allocates the records."""
    needed = int(header.point_count) * header.point_format.size
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


def _check_vlr_count(data: bytes, source: str) -> None:
    """laspy walks the declared VLR count one record at a time, for minutes on a corrupt count."""
    if len(data) < _VLR_COUNT_OFFSET + 4:
        return  # laspy reports the short header itself
    (count,) = struct.unpack_from("<I", data, _VLR_COUNT_OFFSET)
    if count * _VLR_HEADER_BYTES > len(data):
        raise PointCloudError(f"{source}: not a valid LAS/LAZ file (the header declares {count} VLRs, more than fit)")
