"""KITTI Velodyne scans (``.bin``): raw little-endian float32 records x, y, z, intensity."""

from __future__ import annotations

import numpy as np

from model.pointcloud.cloud import PointCloud, PointCloudError
from model.pointcloud.formats.limits import ReadLimits

_RECORD = np.dtype("<f4")
_RECORD_BYTES = 4 * _RECORD.itemsize


def read_kitti_bin(data: bytes, source: str, limits: ReadLimits) -> PointCloud:
    if len(data) % _RECORD_BYTES:
        raise PointCloudError(
            f"{source}: KITTI .bin size {len(data)} bytes is not a multiple of {_RECORD_BYTES} "
            "(float32 x, y, z, intensity per point)"
        )
    limits.check(source, "KITTI .bin scan", len(data) // _RECORD_BYTES, _RECORD_BYTES)
    scan = np.frombuffer(data, dtype=_RECORD).reshape(-1, 4)  # (N, 4) view, no copy
    return PointCloud(coord=scan[:, 0:3], extras={"intensity": scan[:, 3].copy()}, source=source)
