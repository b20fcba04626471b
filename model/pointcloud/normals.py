"""Surface normals by local PCA, and filling of the fields a scan may lack (normals, colours).

The model takes xyz + rgb + normal. Sources without normals get PCA normals over the k nearest
neighbours; sources without colour get a constant grey. Both are announced with a
:class:`MissingFieldWarning` naming the source, because they change what the model sees.

Orientation rule (deterministic, meant for indoor scans): every normal is flipped to face the
viewpoint, by default the centre of the scene's axis-aligned bounding box. Inside a room that is
inside the room, so floors point up, ceilings down and walls inwards, the same convention as
ScanNet's mesh normals. For an outdoor or single-object scan pass the sensor position instead.
A point whose tangent plane contains the viewpoint has no preferred side and keeps the solver's sign.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.spatial import cKDTree

from model.pointcloud.cloud import PointCloud, PointCloudError

DEFAULT_K = 16
# Filled colour: the model normalises colour as rgb / 127.5 - 1, so 128 maps to 0.004, i.e. "no colour".
FILL_COLOR = 128
FALLBACK_NORMAL = np.array([0.0, 0.0, 1.0], dtype=np.float32)
# A neighbourhood is degenerate (coincident or collinear points, no plane) when its middle
# eigenvalue is this small relative to the largest.
_DEGENERATE_RATIO = 1e-6
# Points per batch: 65536 × k=16 neighbours × 3 × float64 ≈ 25 MB of gathered coordinates.
_CHUNK = 65536


class MissingFieldWarning(UserWarning):
    """A field the model needs was absent from the source and has been filled in."""


def estimate_normals(coord: np.ndarray, k: int = DEFAULT_K, viewpoint: np.ndarray | None = None) -> np.ndarray:
    """(N, 3) coordinates → (N, 3) float32 unit normals, oriented towards ``viewpoint``.

    PCA over each point's k nearest neighbours (itself included): the normal is the eigenvector of
    the smallest eigenvalue of the neighbourhood covariance. Fewer than 3 points, or a degenerate
    neighbourhood, gives +z (unoriented). ``viewpoint`` defaults to the bounding-box centre.
    """
    points = np.asarray(coord, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise PointCloudError(f"coord must have shape (N, 3), got {points.shape}")
    if k < 3:
        raise ValueError(f"k must be at least 3 to fit a plane, got {k}")
    n = len(points)
    if n < 3:
        return np.tile(FALLBACK_NORMAL, (n, 1))
    if not np.isfinite(points).all():
        raise PointCloudError("coord contains NaN or infinite values; cannot estimate normals")
    if viewpoint is None:
        target = (points.min(axis=0) + points.max(axis=0)) / 2
    else:
        target = np.asarray(viewpoint, dtype=np.float64).reshape(3)
    tree = cKDTree(points)
    k = min(k, n)
    normals = np.empty((n, 3), dtype=np.float32)
    # Visit points in the tree's leaf order: spatially close queries share cache, ~3x faster than input order.
    order = tree.indices
    for start in range(0, n, _CHUNK):
        rows = order[start : start + _CHUNK]  # (C,)
        block = points[rows]  # (C, 3)
        _, index = tree.query(block, k=k, workers=-1)  # (C, k)
        normals[rows] = _pca_normals(points[index], block, target)
    return normals


def fill_missing(cloud: PointCloud, k: int = DEFAULT_K) -> PointCloud:
    """A new cloud with normals estimated and colours set to grey where the source had none.

    The input is not modified; arrays that need no filling are shared with it, not copied.
    """
    normal, color = cloud.normal, cloud.color
    if normal is None:
        warnings.warn(
            f"{cloud.source}: no normals in the input; estimated by PCA over {k} nearest neighbours",
            MissingFieldWarning,
            stacklevel=2,
        )
        normal = estimate_normals(cloud.coord, k=k)
    if color is None:
        warnings.warn(
            f"{cloud.source}: no colours in the input; filled with grey ({FILL_COLOR}, {FILL_COLOR}, {FILL_COLOR})",
            MissingFieldWarning,
            stacklevel=2,
        )
        color = np.full((len(cloud), 3), FILL_COLOR, dtype=np.uint8)
    return PointCloud(coord=cloud.coord, color=color, normal=normal, extras=dict(cloud.extras), source=cloud.source,
                      origin=cloud.origin)


def _pca_normals(neighbours: np.ndarray, points: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(C, k, 3) neighbourhoods of (C, 3) points → (C, 3) normals facing ``target``."""
    centred = neighbours - neighbours.mean(axis=1, keepdims=True)  # (C, k, 3)
    covariance = np.matmul(centred.transpose(0, 2, 1), centred)  # (C, 3, 3); scale does not matter
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending eigenvalues
    normals = eigenvectors[:, :, 0]  # (C, 3) column of the smallest eigenvalue
    flip = np.einsum("ci,ci->c", normals, target - points) < 0
    normals[flip] *= -1
    degenerate = eigenvalues[:, 1] <= _DEGENERATE_RATIO * eigenvalues[:, 2]
    normals[degenerate] = FALLBACK_NORMAL
    return normals
