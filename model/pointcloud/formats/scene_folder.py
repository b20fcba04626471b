"""Pointcept-style scene folders (``coord.npy``, ``color.npy``, optional ``normal.npy``) read as one scene:
the layout of preprocessed ScanNet / S3DIS / Structured3D data, which people already have on disk.

Each file's npy header is read and sized against the limits before its data is loaded, as for NPY uploads."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from model.pointcloud.cloud import PointCloud, PointCloudError, float32_coords
from model.pointcloud.formats.limits import CLOUD_BYTES_PER_POINT, ReadLimits
from model.pointcloud.formats.numpy_files import _npy_header

SCENE_FILES = ("coord", "color", "normal")


def is_scene_folder(path: Path) -> bool:
    return path.is_dir() and (path / "coord.npy").is_file()


def read_scene_folder(folder: Path, limits: ReadLimits) -> PointCloud:
    """coord (N, 3) required; color (N, 3) 0..255 and normal (N, 3) when present."""
    label = str(folder)
    headers: dict[str, tuple[Path, tuple[int, ...], np.dtype]] = {}
    for key in SCENE_FILES:
        path = folder / f"{key}.npy"
        if not path.is_file():
            continue
        what = f"{key}.npy"
        try:
            with open(path, "rb") as stream:
                shape, _, dtype = _npy_header(stream, label, what)
                data_start = stream.tell()
        except OSError as exc:
            raise PointCloudError(f"{label}: cannot read {what} ({exc.strerror or exc})") from exc
        if len(shape) != 2 or shape[1] != 3:
            raise PointCloudError(f"{label}: {what} must have shape (N, 3), got {shape}")
        if dtype.kind not in "biuf":
            raise PointCloudError(f"{label}: {what} must be numeric, got dtype {dtype}")
        needed, available = math.prod(shape) * dtype.itemsize, path.stat().st_size - data_start
        if available < needed:
            raise PointCloudError(f"{label}: {what} is truncated: shape {shape} needs {needed} bytes of data, "
                                  f"found {available}")
        headers[key] = (path, shape, dtype)
    points = headers["coord"][1][0]
    for key, (_, shape, _) in headers.items():
        if shape[0] != points:
            raise PointCloudError(f"{label}: {key}.npy has {shape[0]} rows but coord.npy has {points}")
    limits.check_points(label, "coord.npy", points)
    limits.check_bytes(label, f"a scene folder of {points} points",
                       sum(shape[0] * 3 * dtype.itemsize for _, shape, dtype in headers.values())
                       + points * CLOUD_BYTES_PER_POINT)
    arrays = {}
    for key, (path, _, _) in headers.items():
        try:
            arrays[key] = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise PointCloudError(f"{label}: {key}.npy is not a valid NPY array ({exc})") from exc
    coord, origin = float32_coords(arrays.pop("coord"), label)
    return PointCloud(coord=coord, **arrays, source=label, origin=origin)
