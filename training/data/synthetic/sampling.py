"""Area-uniform sampling of the visible box faces of a room.

A sampled point is kept when a point 1 mm off the face (along its outward normal) is inside the
room interior and not inside any box. That removes exactly the faces a camera inside the room
cannot see: wall backs, faces in contact (a leg on the floor, a mattress on its frame) and the
parts of faces buried in another solid (the wall behind a door).
"""

from __future__ import annotations

import numpy as np

from .shapes import BoxSet, rotate_z

VISIBILITY_OFFSET = 1e-3  # m


def sample_faces(boxes: BoxSet, density: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Poisson(area * density) uniform points on each of the 6 faces of every box.

    Returns points (N, 3), outward normals (N, 3) and box index (N,).
    """
    if density <= 0:
        raise ValueError(f"point density must be positive, got {density}")
    num_boxes = len(boxes)
    size = boxes.half * 2  # (B, 3)
    # face f = 2 * axis + (0: negative side, 1: positive side); its area is the product of the other two extents
    area = np.repeat(np.prod(size, axis=1, keepdims=True) / size, 2, axis=1)  # (B, 6)
    counts = rng.poisson(area * density).reshape(-1)
    box = np.repeat(np.repeat(np.arange(num_boxes), 6), counts)
    face = np.repeat(np.tile(np.arange(6), num_boxes), counts)
    axis, positive = face // 2, face % 2
    rows = np.arange(len(box))

    local = (rng.random((len(box), 3)) - 0.5) * size[box]  # (N, 3) uniform in the box
    sign = np.where(positive == 1, 1.0, -1.0)
    local[rows, axis] = sign * boxes.half[box, axis]  # pushed onto the face
    normal_local = np.zeros((len(box), 3))
    normal_local[rows, axis] = sign
    points = rotate_z(local, boxes.yaw[box]) + boxes.center[box]
    normals = rotate_z(normal_local, boxes.yaw[box])
    return points, normals, box


def visible_mask(points: np.ndarray, normals: np.ndarray, boxes: BoxSet, interior_hi: np.ndarray) -> np.ndarray:
    """(N,) bool: the face point can be seen from inside the room [0, interior_hi]."""
    probe = points + VISIBILITY_OFFSET * normals
    in_room = ((probe >= 0) & (probe <= interior_hi)).all(axis=1)
    keep = in_room.copy()
    keep[in_room] = ~boxes.inside_any(probe[in_room])
    return keep
