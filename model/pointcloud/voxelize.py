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
    kept:           (M,) int64, the input point kept for each voxel (to gather labels in training).
    grid_size:      voxel edge in metres.
    shift:          (3,) float64 total CenterShift subtracted from the input coordinates (``coord`` = input
                    coordinates of the kept points - shift); places cameras in novel views. None if unknown.
    """

    grid_coord: np.ndarray
    feat: np.ndarray
    point_to_voxel: np.ndarray
    coord: np.ndarray
    kept: np.ndarray
    grid_size: float
    shift: np.ndarray | None = None

    @classmethod
    def from_network_input(cls, grid_coord: np.ndarray, feat: np.ndarray, grid_size: float = 0.0) -> "VoxelizedCloud":
        """Only the two tensors the network reads (e.g. received by a remote worker); each voxel stands for
        one point, and coordinates are unknown (zeros)."""
        m = len(grid_coord)
        return cls(grid_coord=np.ascontiguousarray(grid_coord, dtype=np.int32),
                   feat=np.ascontiguousarray(feat, dtype=np.float32), point_to_voxel=np.arange(m),
                   coord=np.zeros((m, 3), np.float32), kept=np.arange(m), grid_size=float(grid_size))

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


def _sorted_voxels(coord: np.ndarray, grid_size: float):
    """Voxel keys in hash order: (grid (N,3), point order, first-of-voxel flags, voxel id of each sorted point)."""
    g = np.floor(coord / np.array(grid_size)).astype(np.int64)  # float64 division, as in the official code
    g -= g.min(axis=0)
    hashes = fnv_hash(g)
    order = np.argsort(hashes, kind="stable")  # voxels in hash order; points of a voxel in input order
    keys = hashes[order]
    first = np.concatenate([[True], keys[1:] != keys[:-1]])
    return g, order, first, np.cumsum(first) - 1


def grid_sample(coord: np.ndarray, grid_size: float,
                rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxelise ``coord`` (N, 3): (kept point index (M,), grid_coord (M, 3) int32, point_to_voxel (N,)).

    Without ``rng`` the first point of each voxel (input order) is kept; with it, a random one (training)."""
    g, order, first, voxel_of_sorted = _sorted_voxels(coord, grid_size)
    starts = np.flatnonzero(first)
    if rng is None:
        kept = order[starts]
    else:
        counts = np.diff(np.append(starts, len(order)))
        kept = order[starts + rng.integers(0, counts.max(), len(counts)) % counts]
    point_to_voxel = np.empty(len(coord), dtype=np.int64)
    point_to_voxel[order] = voxel_of_sorted
    return kept, g[kept].astype(np.int32), point_to_voxel


def count_voxels(coord: np.ndarray, grid_size: float) -> int:
    """How many voxels `grid_sample` would make of ``coord`` (N, 3), without sampling: the cheap check that lets
    a caller refuse a scene before the costly steps (normals, kernel maps, the encoder) scale with it."""
    if len(coord) == 0:
        return 0
    g = np.floor(coord / np.array(grid_size)).astype(np.int64)
    return len(np.unique(fnv_hash(g - g.min(axis=0))))


def grid_fragments(coord: np.ndarray, grid_size: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """The official test mode: ``max(points per voxel)`` fragments; fragment i holds the (i mod count)-th
    point of every voxel, so together they cover every point. Returns [(point index (M,), grid_coord (M,3))]."""
    g, order, first, _ = _sorted_voxels(coord, grid_size)
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, len(order)))
    fragments = []
    for i in range(int(counts.max())):
        kept = order[starts + i % counts]
        fragments.append((kept, g[kept].astype(np.int32)))
    return fragments


def normalize_color(color: np.ndarray) -> np.ndarray:
    """uint8/float 0..255 → [-1, 1] as ``color / 127.5 - 1`` in float32."""
    return color.astype(np.float32) / 127.5 - 1


def complete_cloud(cloud: PointCloud, grid_size: float, feature_keys: tuple[str, ...]) -> PointCloud:
    """Validate the cloud and the settings, and fill missing colours/normals (with a warning)."""
    if not grid_size > 0 or not np.isfinite(grid_size):
        raise PointCloudError(f"{cloud.source}: grid_size must be a positive number of metres, got {grid_size}")
    for key in feature_keys:
        if key not in FEATURE_CHANNELS:
            raise ValueError(f"unsupported input feature {key!r}; choose from {sorted(FEATURE_CHANNELS)}")
    cloud.validate()
    extent = (cloud.coord.max(axis=0) - cloud.coord.min(axis=0)) / grid_size
    if extent.max() > 2**20:
        raise PointCloudError(f"{cloud.source}: the scene spans {extent.max():.0f} voxels of {grid_size} m along one "
                              "axis; check the coordinate units (metres expected) or the grid size")
    if ("normal" in feature_keys and cloud.normal is None) or ("color" in feature_keys and cloud.color is None):
        from model.pointcloud.normals import fill_missing  # scipy import only when needed

        cloud = fill_missing(cloud)
    return cloud


def assemble_features(color: np.ndarray | None, normal: np.ndarray | None, coord: np.ndarray,
                      feature_keys: tuple[str, ...]) -> np.ndarray:
    """The official ``Collect(feat_keys=...)``: concatenate the kept points' channels in the given order."""
    parts = {"coord": coord}
    if "color" in feature_keys:
        parts["color"] = normalize_color(color)
    if "normal" in feature_keys:
        parts["normal"] = normal
    return np.concatenate([parts[k] for k in feature_keys], axis=1).astype(np.float32)


def voxelize(cloud: PointCloud, grid_size: float = 0.02, feature_keys: tuple[str, ...] = ("color", "normal"),
             rng: np.random.Generator | None = None) -> VoxelizedCloud:
    """Decoded point cloud → network input. Missing colours/normals are filled (with a warning).
    ``rng`` picks a random point per voxel (training); without it the first point is kept."""
    cloud = complete_cloud(cloud, grid_size, feature_keys)
    coord, first = center_shift(cloud.coord, apply_z=True)
    kept, grid_coord, point_to_voxel = grid_sample(coord, grid_size, rng)
    kept_coord, second = center_shift(coord[kept], apply_z=False)
    color = cloud.color[kept] if cloud.color is not None else None
    normal = cloud.normal[kept] if cloud.normal is not None else None
    feat = assemble_features(color, normal, kept_coord, feature_keys)
    return VoxelizedCloud(grid_coord=grid_coord, feat=feat, point_to_voxel=point_to_voxel,
                          coord=kept_coord, kept=kept, grid_size=float(grid_size),
                          shift=first.astype(np.float64) + second.astype(np.float64))
