"""Oriented 3D boxes: the one convention every detection module uses.

A box is 7 numbers ``[cx, cy, cz, dx, dy, dz, yaw]`` in metres and radians:

* ``(cx, cy, cz)`` is the centre of the box (not the bottom face), in the point cloud's frame (z up);
* ``(dx, dy, dz)`` are the full edge lengths along the box's own x, y and z axes (all > 0);
* ``yaw`` rotates the box's own axes about +z, counter-clockwise seen from above: the box's x axis points
  along ``(cos yaw, sin yaw, 0)`` in the world. ``yaw = 0`` is axis-aligned.

This is the layout of the generated scenes' ``boxes.npy`` (training.data.synthetic) and of ``ponder detect``'s
JSON output. One solid has several descriptions (yaw + π, or yaw + π/2 with dx and dy swapped);
``canonical_boxes`` picks the one with yaw in [-π/4, π/4), which is what the detection head regresses.
"""

from __future__ import annotations

import numpy as np

BOX_DIM = 7
# Corner signs: bottom face then top face, each counter-clockwise seen from above.
_CORNER_SIGNS = np.array([[1, 1, -1], [-1, 1, -1], [-1, -1, -1], [1, -1, -1],
                          [1, 1, 1], [-1, 1, 1], [-1, -1, 1], [1, -1, 1]], dtype=np.float64) / 2


def as_boxes(boxes, name: str = "boxes") -> np.ndarray:
    """(K, 7) float64 copy of ``boxes``; raises ValueError naming ``name`` when the shape or values are invalid."""
    array = np.asarray(boxes, dtype=np.float64)
    if array.ndim == 1 and array.size == 0:
        array = array.reshape(0, BOX_DIM)
    if array.ndim != 2 or array.shape[1] != BOX_DIM:
        raise ValueError(f"{name} must have shape (K, 7) [cx, cy, cz, dx, dy, dz, yaw], got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    if (array[:, 3:6] <= 0).any():
        row = int(np.argmax((array[:, 3:6] <= 0).any(axis=1)))
        raise ValueError(f"{name}: box sizes (dx, dy, dz) must be positive; row {row} is {array[row].tolist()}")
    return array


def rotate_z(xy: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """Rotate (..., 2) vectors counter-clockwise by ``yaw`` (broadcast over the leading axes)."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.stack([c * xy[..., 0] - s * xy[..., 1], s * xy[..., 0] + c * xy[..., 1]], axis=-1)


def box_corners(boxes) -> np.ndarray:
    """(K, 8, 3) corners: bottom face (z = cz - dz/2) then top face, each counter-clockwise from above,
    starting at the box's (+x, +y) corner."""
    b = as_boxes(boxes)
    local = _CORNER_SIGNS[None] * b[:, None, 3:6]                       # (K, 8, 3)
    xy = rotate_z(local[..., :2], b[:, None, 6]) + b[:, None, :2]
    return np.concatenate([xy, local[..., 2:] + b[:, None, 2:3]], axis=-1)


def bev_corners(boxes) -> np.ndarray:
    """(K, 4, 2) footprint seen from above, counter-clockwise (the polygon the IoU clips)."""
    return box_corners(boxes)[:, :4, :2]


def box_volume(boxes) -> np.ndarray:
    b = as_boxes(boxes)
    return b[:, 3] * b[:, 4] * b[:, 5]


def wrap_angle(angle: np.ndarray, period: float = 2 * np.pi) -> np.ndarray:
    """Angle(s) in [-period/2, period/2)."""
    return (np.asarray(angle) + period / 2) % period - period / 2


def canonical_boxes(boxes) -> np.ndarray:
    """The same solids with yaw in [-π/4, π/4): each quarter turn taken out of yaw swaps dx and dy."""
    b = as_boxes(boxes).copy()
    quarters = np.floor((b[:, 6] + np.pi / 4) / (np.pi / 2))          # whole quarter turns to remove
    b[:, 6] -= quarters * (np.pi / 2)
    b[:, 6] = np.clip(b[:, 6], -np.pi / 4, np.pi / 4 - 1e-12)          # rounding at the boundary
    odd = (quarters.astype(np.int64) % 2) == 1
    b[odd, 3], b[odd, 4] = b[odd, 4].copy(), b[odd, 3].copy()
    return b


def points_in_boxes(points: np.ndarray, boxes) -> np.ndarray:
    """(N, K) bool: point n lies inside (or on the surface of) box k."""
    b = as_boxes(boxes)
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {p.shape}")
    rel = p[:, None, :] - b[None, :, :3]                                 # (N, K, 3)
    local_xy = rotate_z(rel[..., :2], -b[None, :, 6])
    local = np.concatenate([local_xy, rel[..., 2:]], axis=-1)
    return (np.abs(local) <= b[None, :, 3:6] / 2 + 1e-9).all(axis=-1)


def transform_boxes(boxes, yaw: float = 0.0, scale: float = 1.0, flip_x: bool = False, flip_y: bool = False,
                    translation=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Boxes moved with their points by p' = T + s · R_z(yaw) · F · p (F flips x and/or y first).

    A mirror reverses the sense of rotation, so a flip of x maps yaw to π - yaw and a flip of y to -yaw;
    sizes scale with ``s`` (isotropic only: an anisotropic scale of a rotated box is not a box)."""
    b = as_boxes(boxes).copy()
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if flip_x:
        b[:, 0], b[:, 6] = -b[:, 0], np.pi - b[:, 6]
    if flip_y:
        b[:, 1], b[:, 6] = -b[:, 1], -b[:, 6]
    b[:, :2] = rotate_z(b[:, :2], np.float64(yaw))
    b[:, 6] = wrap_angle(b[:, 6] + yaw)
    b[:, :6] *= scale
    b[:, :3] += np.asarray(translation, dtype=np.float64)
    return b
