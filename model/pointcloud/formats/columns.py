"""Named per-point columns (PLY properties, PCD fields, structured arrays) → PointCloud.

Formats that carry fields by name share one convention for which names mean colour and normals,
so the same file content gives the same cloud whichever container it came in."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from model.pointcloud.cloud import PointCloud, PointCloudError, float32_coords

COORD_NAMES = ("x", "y", "z")
COLOR_NAMES = (("red", "green", "blue"), ("r", "g", "b"), ("diffuse_red", "diffuse_green", "diffuse_blue"))
NORMAL_NAMES = (("nx", "ny", "nz"), ("normal_x", "normal_y", "normal_z"))


def cloud_from_columns(columns: Mapping[str, np.ndarray], source: str, kind: str) -> PointCloud:
    """Build a cloud from 1-D (or (N, k)) columns; names not used for coord/colour/normal become extras.

    Every returned array is a fresh native-byte-order copy, so nothing keeps the input buffer alive.
    Coordinates wider than float32 (float64, int32) go through :func:`float32_coords` (georeferenced origin).
    """
    missing = [axis for axis in COORD_NAMES if axis not in columns]
    if missing:
        raise PointCloudError(
            f"{source}: {kind} data has no {'/'.join(missing)} field (fields: {', '.join(columns) or 'none'})"
        )
    for axis in COORD_NAMES:
        if columns[axis].ndim != 1 or columns[axis].dtype.kind not in "biuf":
            raise PointCloudError(
                f"{source}: {kind} field {axis!r} must be one number per point, got dtype "
                f"{columns[axis].dtype} with shape {columns[axis].shape}"
            )
    used = set(COORD_NAMES)
    wide = not all(np.can_cast(columns[axis].dtype, np.float32, "safe") for axis in COORD_NAMES)
    coord, origin = float32_coords(stack_columns(columns, COORD_NAMES, np.float64 if wide else np.float32), source)
    color = normal = None
    for names in COLOR_NAMES:
        if all(name in columns for name in names):
            color = stack_columns(columns, names, None)
            used.update(names)
            break
    for names in NORMAL_NAMES:
        if all(name in columns for name in names):
            normal = stack_columns(columns, names, np.float32)
            used.update(names)
            break
    extras = {name: native_copy(values) for name, values in columns.items() if name not in used}
    return PointCloud(coord=coord, color=color, normal=normal, extras=extras, source=source, origin=origin)


def stack_columns(columns: Mapping[str, np.ndarray], names: Sequence[str], dtype: np.dtype | None) -> np.ndarray:
    """(N,) × k → (N, k) in one allocation (no float64 detour for float32 output)."""
    parts = [columns[name] for name in names]
    out_dtype = np.result_type(*parts) if dtype is None else np.dtype(dtype)
    out = np.empty((len(parts[0]), len(parts)), dtype=out_dtype.newbyteorder("="))
    for i, part in enumerate(parts):
        out[:, i] = part
    return out


def native_copy(values: np.ndarray) -> np.ndarray:
    """A contiguous native-byte-order copy (PLY/PCD views may be big-endian or point into the input)."""
    values = np.asarray(values)
    return np.array(values, dtype=values.dtype.newbyteorder("="), order="C")


def structured_columns(records: np.ndarray) -> dict[str, np.ndarray]:
    """Field views of a structured array, in field order."""
    return {name: records[name] for name in records.dtype.names or ()}
