"""Which way is up: rotations that bring a scan into the model's frame (z up, metres).

The models were trained on z-up indoor scenes (ScanNet, S3DIS, Structured3D); scans straight from a sensor
are often y-up (many mesh tools), y-down (Kinect, OpenCV cameras), z-forward or simply tilted. ``up`` names the
input's up axis: ``z`` (default, no rotation), ``-z``, ``y``, ``-y``, ``x``, ``-x``, or ``auto``.

A named axis maps onto +z by an exact signed axis permutation (a proper rotation, determinant +1), so an
axis-aligned box stays axis-aligned when rotated back. ``auto`` estimates gravity from the scan itself:

1. take at most ``AUTO_SAMPLE`` points, one per 5 cm cell, and their normals (the cloud's own, else PCA normals);
2. the dominant surface orientation: the normal direction (up to sign) with the most normals within
   ``AUTO_TOLERANCE_DEG`` of it, refined as the principal axis of those normals; then the dominant one among
   the normals perpendicular to it; the third is their cross product: the scene's Manhattan frame;
3. up is the frame axis along which the scene is most lopsided: a wall axis has a wall plane at each end
   and furniture spread between them, while along gravity there is one big plane (the floor) at one end,
   rarely a ceiling at the other, and most points (furniture) in the lower half. The score is the median
   point's offset from the middle of the extent plus the imbalance of the planar points at the two ends;
4. the sign makes most points lie in the lower half of the scene (furniture stands on the floor; ceilings
   are rarely scanned), and the axis is refined as the principal axis of its inlier normals.

One depth frame in its camera's axes (a Kinect/RealSense frame saved as it came) breaks step 3: along the
view axis there is a far wall and nothing near, as lopsided as gravity. Such a cloud is recognised as a single
view from the origin (`single_view_forward`: every point in front along +z or -z, within a field of view, one
depth per ray) and then up is the frame axis closest to the camera's image y axis, signed by the camera
convention: -y for OpenCV axes (z forward, y down), +y for OpenGL axes (z backward, y up).

The rotation returned is the smallest one taking the estimated up onto +z (yaw is left as it was).
"""

from __future__ import annotations

import numpy as np

UP_AXES: tuple[str, ...] = ("z", "-z", "y", "-y", "x", "-x", "auto")
AUTO_SAMPLE = 60_000
AUTO_CELL_M = 0.05
AUTO_TOLERANCE_DEG = 12.0
AUTO_CANDIDATES = 400
# Single-view test: at most this many points, every one of them but `VIEW_OUTLIERS` in front within
# tan(half field of view) `VIEW_MAX_TAN` (127 degrees: wide-angle depth cameras are ~120), and at most
# `VIEW_MAX_OCCLUDED` of the points in viewing directions whose depths differ by more than `VIEW_DEPTH_SPREAD`
# of the cloud's depth range (1st-99th percentile). Measured on 56 ray-cast frames of a furnished room (pitch
# 5 to -45 degrees, with and without ceiling): at most 0.044 of the points; on 20 generated rooms placed anywhere
# in front of the origin (0.6-20 room sizes away) or 100 m above or below it: at least 0.167.
VIEW_SAMPLE = 200_000
VIEW_OUTLIERS = 0.005
VIEW_MAX_TAN = 2.0
VIEW_DEPTH_SPREAD = 0.1
VIEW_MAX_OCCLUDED = 0.1


def named_rotation(up: str) -> np.ndarray:
    """The exact 3x3 rotation (signed permutation, det +1) taking the named input axis onto +z:
    ``coord_model = coord @ R.T``."""
    if up not in UP_AXES or up == "auto":
        raise ValueError(f"unknown up axis {up!r}; choose one of {', '.join(UP_AXES)}")
    axis = {"x": 0, "y": 1, "z": 2}[up[-1]]
    sign = -1.0 if up.startswith("-") else 1.0
    up_vec = np.zeros(3)
    up_vec[axis] = sign
    # new z = up; new x = the next input axis (cyclic), signed so that the frame stays right-handed
    x_vec = np.zeros(3)
    x_vec[(axis + 1) % 3] = 1.0
    y_vec = np.cross(up_vec, x_vec)
    return np.stack([x_vec, y_vec, up_vec]).astype(np.float64)


def rotation_onto_z(up: np.ndarray) -> np.ndarray:
    """The smallest rotation taking unit vector ``up`` onto +z (Rodrigues), 3x3 float64."""
    up = np.asarray(up, dtype=np.float64)
    up = up / np.linalg.norm(up)
    z = np.array([0.0, 0.0, 1.0])
    v = np.cross(up, z)
    s, c = np.linalg.norm(v), float(up @ z)
    if s < 1e-12:
        return np.eye(3) if c > 0 else np.diag([1.0, -1.0, -1.0])
    k = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]]) / s
    return np.eye(3) + s * k + (1 - c) * (k @ k)


def _sample(coord: np.ndarray, normal: np.ndarray | None, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray | None]:
    cells = np.floor((coord - coord.min(axis=0)) / AUTO_CELL_M).astype(np.int64)
    _, first = np.unique(cells, axis=0, return_index=True)
    if len(first) > AUTO_SAMPLE:
        first = rng.choice(first, AUTO_SAMPLE, replace=False)
    first = np.sort(first)
    return coord[first].astype(np.float64), None if normal is None else normal[first].astype(np.float64)


def _dominant(normals: np.ndarray, cos_tol: float, rng: np.random.Generator) -> np.ndarray | None:
    """The axial direction with the most normals within the tolerance, refined by their principal axis."""
    if len(normals) == 0:
        return None
    candidates = normals[rng.choice(len(normals), min(AUTO_CANDIDATES, len(normals)), replace=False)]
    support = (np.abs(normals @ candidates.T) > cos_tol).sum(axis=0)
    best = candidates[int(np.argmax(support))]
    for _ in range(3):
        inliers = normals[np.abs(normals @ best) > cos_tol]
        _, vectors = np.linalg.eigh(inliers.T @ inliers)
        best = vectors[:, -1] * (1 if vectors[:, -1] @ best >= 0 else -1)
    return best / np.linalg.norm(best)


def _asymmetry(coord: np.ndarray, normals: np.ndarray, axis: np.ndarray, cos_tol: float) -> float:
    """How lopsided the scene is along ``axis`` (0 = symmetric, up to 2): the median point's offset from the
    middle of the extent (furniture stands low, ceilings are rarely scanned), plus the imbalance between the
    planes at the two extremes (a floor without a ceiling, where a wall axis has a wall at each end)."""
    heights = coord @ axis
    lo, hi = heights.min(), heights.max()
    if hi - lo < 1e-6:
        return 0.0
    median_offset = 2 * abs((np.median(heights) - lo) / (hi - lo) - 0.5)
    planar = heights[np.abs(normals @ axis) > cos_tol]
    near = 2 * AUTO_CELL_M
    low, high = int((planar < lo + near).sum()), int((planar > hi - near).sum())
    imbalance = abs(low - high) / max(low + high, 1)
    return float(median_offset + imbalance)


def single_view_forward(coord: np.ndarray, seed: int = 0) -> int:
    """+1 if ``coord`` looks like one depth frame seen from the origin along +z (OpenCV camera axes), -1 along -z
    (OpenGL), 0 otherwise. A single view holds one surface per viewing direction; a whole scan seen from any
    origin holds surfaces behind others (furniture on a floor, both sides of a room), a world frame's origin on
    a floor or wall sees it edge-on (outside any field of view), and an origin inside the scan has points behind
    it."""
    coord = np.asarray(coord, dtype=np.float64)
    if len(coord) > VIEW_SAMPLE:
        coord = coord[np.random.default_rng(seed).choice(len(coord), VIEW_SAMPLE, replace=False)]
    for sign in (1, -1):
        depth = sign * coord[:, 2]
        front = depth > 0
        if front.mean() < 1 - VIEW_OUTLIERS:
            continue
        u, v = coord[front, 0] / depth[front], coord[front, 1] / depth[front]
        inside = (np.abs(u) <= VIEW_MAX_TAN) & (np.abs(v) <= VIEW_MAX_TAN)
        if inside.sum() < (1 - VIEW_OUTLIERS) * len(coord):
            return 0
        u, v, d = u[inside], v[inside], depth[front][inside]
        near_all, far_all = np.percentile(d, [1, 99])
        # directions binned so that a frame's pixels fall ~2 to a cell: the area its points cover / (n / 2)
        cell = np.sqrt(max(np.ptp(u) * np.ptp(v), 1e-12) / max(len(u) / 2, 1))
        keys = np.floor(u / cell).astype(np.int64) * 1_000_003 + np.floor(v / cell).astype(np.int64)
        order = np.argsort(keys, kind="stable")
        keys, d = keys[order], d[order]
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        near, far = np.minimum.reduceat(d, starts), np.maximum.reduceat(d, starts)
        counts = np.diff(np.r_[starts, len(keys)])
        occluded = counts[(far - near) > VIEW_DEPTH_SPREAD * (far_all - near_all)].sum()
        return sign if occluded <= VIEW_MAX_OCCLUDED * len(d) else 0
    return 0


def estimate_up(coord: np.ndarray, normal: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Unit vector of the scan's up direction (against gravity), in the input's frame. See the module text."""
    from model.pointcloud.normals import estimate_normals  # scipy only when auto is asked for

    rng = np.random.default_rng(seed)
    coord = np.asarray(coord)
    if len(coord) < 10:
        return np.array([0.0, 0.0, 1.0])
    forward = single_view_forward(coord, seed)
    points, normals = _sample(coord, normal, rng)
    if normals is None:
        normals = estimate_normals(points).astype(np.float64)
    norms = np.linalg.norm(normals, axis=1)
    good = np.isfinite(norms) & (norms > 0.5)
    points, normals = points[good], normals[good] / norms[good, None]
    cos_tol = np.cos(np.radians(AUTO_TOLERANCE_DEG))
    first = _dominant(normals, cos_tol, rng)
    if first is None:
        return np.array([0.0, 0.0, 1.0])
    sin_tol = np.sin(np.radians(AUTO_TOLERANCE_DEG))
    second = _dominant(normals[np.abs(normals @ first) < sin_tol], cos_tol, rng)
    if second is None:
        axes = [first]
    else:
        second = second - (second @ first) * first
        second /= np.linalg.norm(second)
        axes = [first, second, np.cross(first, second)]
    if forward:  # one depth frame: the axis nearest the image's y, up = -y (OpenCV) or +y (OpenGL)
        camera_up = np.array([0.0, -float(forward), 0.0])
        up = max(axes, key=lambda a: abs(a @ camera_up))
        if abs(up @ camera_up) < 0.5:  # no frame axis near the image's vertical: trust the camera
            up = camera_up
    else:
        scores = [_asymmetry(points, normals, a, cos_tol) for a in axes]
        up = axes[int(np.argmax(scores))]
    inliers = normals[np.abs(normals @ up) > cos_tol]
    if len(inliers) >= 3:
        _, vectors = np.linalg.eigh(inliers.T @ inliers)
        up = vectors[:, -1] * (1 if vectors[:, -1] @ up >= 0 else -1)
    if forward:
        return up * np.sign(up @ camera_up) / np.linalg.norm(up)
    heights = points @ up
    lo, hi = heights.min(), heights.max()
    if np.median(heights) > (lo + hi) / 2:  # most points in the upper half: the axis points down
        up = -up
    return up / np.linalg.norm(up)


def up_rotation(up: str, coord: np.ndarray | None = None, normal: np.ndarray | None = None) -> np.ndarray:
    """3x3 rotation R taking the input frame into the model's z-up frame (``coord_model = coord @ R.T``)."""
    if up == "auto":
        if coord is None:
            raise ValueError("up='auto' needs the coordinates")
        return rotation_onto_z(estimate_up(coord, normal))
    return named_rotation(up)
