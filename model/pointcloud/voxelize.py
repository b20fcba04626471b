"""Official PonderV2 input pipeline for inference: CenterShift → GridSample(fnv) → NormalizeColor →
feature assembly, plus the point→voxel map that brings voxel outputs back to every input point.

Order of steps (checked against the fixtures): ``coord -= [(xmin+xmax)/2, (ymin+ymax)/2, zmin]`` in
float32; ``g = floor(coord / grid_size)`` (float64 division, as numpy does with the official
``np.array(grid_size)``); ``grid_coord = g - g.min(0)``; rows ordered by the FNV-1 64-bit hash of
``grid_coord``; one point per voxel; ``color / 127.5 - 1``; ``feat = concat(feature_keys)``.
The official training mode keeps a *random* point per voxel; inference keeps the first point in input
order so results are deterministic (identical when every voxel holds one point, as in the fixtures).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.pointcloud.cloud import PointCloud, PointCloudError

FNV_OFFSET = np.uint64(14695981039346656037)
FNV_PRIME = np.uint64(1099511628211)
FEATURE_CHANNELS = {"color": 3, "normal": 3, "coord": 3}


@dataclass
class VoxelizedCloud:
    """Network input for one scene. Rows are voxels in the official (FNV-sorted) order.

    grid_coord:     (M, 3) int32 voxel indices, each axis starting at 0.
    feat:           (M, C) float32 network input features.
    point_to_voxel: (N,) int64, the voxel row of every input point (input order).
    coord:          (M, 3) float32 centre-shifted coordinates of the kept points (metres).
    grid_size:      voxel edge in metres.
    """

    grid_coord: np.ndarray
    feat: np.ndarray
    point_to_voxel: np.ndarray
    coord: np.ndarray
    grid_size: float

    @property
    def num_voxels(self) -> int:
        return len(self.grid_coord)

    @property
    def num_points(self) -> int:
        return len(self.point_to_voxel)


def fnv_hash(grid_coord: np.ndarray) -> np.ndarray:
    """FNV-1 64-bit hash of each row (multiply, then XOR), as the official GridSample computes it."""
    keys = grid_coord.astype(np.uint64)
    hashed = np.full(len(keys), FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(keys.shape[1]):
            hashed *= FNV_PRIME
            hashed ^= keys[:, j]
    return hashed


def center_shift(coord: np.ndarray, apply_z: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Shift x, y to the bounding-box centre and (apply_z) z to its minimum. Returns (coord, shift)."""
    lo, hi = coord.min(axis=0), coord.max(axis=0)
    shift = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2] if apply_z else 0], dtype=coord.dtype)
    return coord - shift, shift


def grid_sample(coord: np.ndarray, grid_size: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxelise ``coord`` (N, 3). Returns (kept point index (M,), grid_coord (M, 3) int32, point_to_voxel (N,))."""
    g = np.floor(coord / np.array(grid_size)).astype(np.int64)  # float64 division, as in the official code
    g -= g.min(axis=0)
    order = np.argsort(fnv_hash(g), kind="stable")  # voxels in hash order; points of a voxel in input order
    keys = fnv_hash(g)[order]
    first = np.concatenate([[True], keys[1:] != keys[:-1]])
    voxel_of_sorted = np.cumsum(first) - 1
    kept = order[first]
    point_to_voxel = np.empty(len(coord), dtype=np.int64)
    point_to_voxel[order] = voxel_of_sorted
    return kept, g[kept].astype(np.int32), point_to_voxel


def normalize_color(color: np.ndarray) -> np.ndarray:
    """uint8/float 0..255 → [-1, 1] as ``color / 127.5 - 1`` in float32."""
    return color.astype(np.float32) / 127.5 - 1


def voxelize(cloud: PointCloud, grid_size: float = 0.02,
             feature_keys: tuple[str, ...] = ("color", "normal")) -> VoxelizedCloud:
    """Decoded point cloud → network input. Missing colours/normals are filled (with a warning)."""
    if grid_size <= 0 or not np.isfinite(grid_size):
        raise PointCloudError(f"{cloud.source}: grid_size must be a positive number of metres, got {grid_size}")
    for key in feature_keys:
        if key not in FEATURE_CHANNELS:
            raise ValueError(f"unsupported input feature {key!r}; choose from {sorted(FEATURE_CHANNELS)}")
    cloud.validate()
    if ("normal" in feature_keys and cloud.normal is None) or ("color" in feature_keys and cloud.color is None):
        from model.pointcloud.normals import fill_missing  # scipy import only when needed

        cloud = fill_missing(cloud)
    coord, _ = center_shift(cloud.coord, apply_z=True)
    extent = coord.max(axis=0) / grid_size
    if extent.max() > 2**20:
        raise PointCloudError(f"{cloud.source}: the scene spans {extent.max():.0f} voxels of {grid_size} m along one "
                              "axis; check the coordinate units (metres expected) or the grid size")
    kept, grid_coord, point_to_voxel = grid_sample(coord, grid_size)
    kept_coord, _ = center_shift(coord[kept], apply_z=False)
    parts = {"coord": kept_coord}
    if "color" in feature_keys:
        parts["color"] = normalize_color(cloud.color[kept])
    if "normal" in feature_keys:
        parts["normal"] = cloud.normal[kept]
    feat = np.concatenate([parts[k] for k in feature_keys], axis=1).astype(np.float32)
    return VoxelizedCloud(grid_coord=grid_coord, feat=feat, point_to_voxel=point_to_voxel,
                          coord=kept_coord, grid_size=float(grid_size))
