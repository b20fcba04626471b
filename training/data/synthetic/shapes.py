"""Oriented boxes (yaw about +z), their materials, and the one colour function.

Every solid in a synthetic room is a box. Composites (a chair, a bed) are several boxes that
share an object. The colour of a surface is a pure function of the position on the face of a
box (pattern + hash noise + simple shading), so the sampled point cloud and the ray-cast frames
see the same colours wherever they look at the same spot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

NOISE_CELL = 0.01  # m: the colour noise is constant inside 1 cm cells of a face
LIGHT_DIR = np.array([0.3, 0.5, 1.0]) / np.linalg.norm([0.3, 0.5, 1.0])


class Pattern(IntEnum):
    PLAIN = 0
    STRIPES = 1  # bands of `period` along one axis of the part's frame
    CHECKER = 2  # squares of `period` on every face


@dataclass(frozen=True)
class Material:
    """Surface appearance. Colours are RGB in [0, 1]."""

    color: tuple[float, float, float]
    color2: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pattern: Pattern = Pattern.PLAIN
    period: float = 0.1
    axis: int = 0
    noise: float = 0.03


@dataclass(frozen=True)
class Part:
    """One box of an object, in the object's frame (x width, y depth with +y = front, z up)."""

    center: tuple[float, float, float]
    size: tuple[float, float, float]
    material: Material


@dataclass
class SceneObject:
    """A labelled object: parts in its own frame, placed by a yaw about +z and a translation.

    ``center``/``size``/``yaw`` describe the tight box around the parts in the object frame,
    expressed in the world (the detection box).
    """

    name: str
    nyu40: int
    label: int  # ScanNet-20 index or -1
    parts: list[Part]
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))  # world position of the object frame
    yaw: float = 0.0
    instance: int = -1

    def local_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) of the parts in the object frame (parts are axis-aligned there)."""
        centers = np.array([p.center for p in self.parts], dtype=np.float64)
        halves = np.array([p.size for p in self.parts], dtype=np.float64) / 2
        return (centers - halves).min(axis=0), (centers + halves).max(axis=0)

    @property
    def size(self) -> np.ndarray:
        lo, hi = self.local_bounds()
        return hi - lo

    @property
    def center(self) -> np.ndarray:
        lo, hi = self.local_bounds()
        return self.origin + rotate_z((lo + hi) / 2, self.yaw)

    def box7(self) -> np.ndarray:
        """(7,) cx, cy, cz, dx, dy, dz, yaw."""
        return np.concatenate([self.center, self.size, [self.yaw]])


def rotate_z(v: np.ndarray, yaw: float | np.ndarray) -> np.ndarray:
    """Rotate vectors (..., 3) by yaw (scalar or broadcastable (...)) about +z."""
    v = np.asarray(v, dtype=np.float64)
    c, s = np.cos(yaw), np.sin(yaw)
    return np.stack([c * v[..., 0] - s * v[..., 1], s * v[..., 0] + c * v[..., 1], v[..., 2]], axis=-1)


@dataclass
class BoxSet:
    """All boxes of a scene as flat arrays (B boxes), the form ray casting and sampling use."""

    center: np.ndarray  # (B, 3) world
    half: np.ndarray  # (B, 3) half extents
    yaw: np.ndarray  # (B,)
    obj: np.ndarray  # (B,) index into the scene's object list
    color: np.ndarray  # (B, 3)
    color2: np.ndarray  # (B, 3)
    pattern: np.ndarray  # (B,) Pattern values
    period: np.ndarray  # (B,)
    axis: np.ndarray  # (B,)
    noise: np.ndarray  # (B,)

    def __len__(self) -> int:
        return len(self.center)

    @classmethod
    def from_objects(cls, objects: list[SceneObject]) -> "BoxSet":
        rows = [(i, o, p) for i, o in enumerate(objects) for p in o.parts]
        if not rows:
            raise ValueError("a scene needs at least one box")
        center = np.array([o.origin + rotate_z(np.array(p.center), o.yaw) for _, o, p in rows])
        return cls(
            center=center,
            half=np.array([p.size for _, _, p in rows], dtype=np.float64) / 2,
            yaw=np.array([o.yaw for _, o, _ in rows], dtype=np.float64),
            obj=np.array([i for i, _, _ in rows], dtype=np.int64),
            color=np.array([p.material.color for _, _, p in rows], dtype=np.float64),
            color2=np.array([p.material.color2 for _, _, p in rows], dtype=np.float64),
            pattern=np.array([int(p.material.pattern) for _, _, p in rows], dtype=np.int64),
            period=np.array([p.material.period for _, _, p in rows], dtype=np.float64),
            axis=np.array([p.material.axis for _, _, p in rows], dtype=np.int64),
            noise=np.array([p.material.noise for _, _, p in rows], dtype=np.float64),
        )

    def to_local(self, points: np.ndarray, box: np.ndarray) -> np.ndarray:
        """World points (N, 3) into the frames of boxes box (N,) (origin at each box centre)."""
        return rotate_z(points - self.center[box], -self.yaw[box])

    def inside_any(self, points: np.ndarray, chunk: int = 1 << 21) -> np.ndarray:
        """(N,) bool: the point lies strictly inside at least one box."""
        out = np.zeros(len(points), dtype=bool)
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        step = max(1, chunk // max(1, len(self)))
        for a in range(0, len(points), step):
            d = points[a : a + step, None, :] - self.center[None]  # (n, B, 3)
            lx = c * d[..., 0] + s * d[..., 1]
            ly = -s * d[..., 0] + c * d[..., 1]
            inside = (
                (np.abs(lx) < self.half[:, 0]) & (np.abs(ly) < self.half[:, 1]) & (np.abs(d[..., 2]) < self.half[:, 2])
            )
            out[a : a + step] = inside.any(axis=1)
        return out


def _hash01(cells: np.ndarray, salt: np.ndarray) -> np.ndarray:
    """Deterministic pseudo-random value in [0, 1) per integer cell (N, 3) and salt (N,)."""
    with np.errstate(over="ignore"):
        h = salt.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        for k, prime in enumerate((0x85EBCA77C2B2AE63, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9)):
            h ^= cells[:, k].astype(np.int64).astype(np.uint64) * np.uint64(prime)
            h ^= h >> np.uint64(29)
            h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(32)
    return (h & np.uint64(0xFFFFFF)).astype(np.float64) / float(1 << 24)


def surface_color(boxes: BoxSet, box: np.ndarray, points: np.ndarray, normals: np.ndarray, shading: bool) -> np.ndarray:
    """Colour (N, 3) uint8 of surface points (N, 3) lying on faces of boxes box (N,) with outward
    normals (N, 3).

    The coordinate along the face normal is dropped before patterns and noise are evaluated, so a
    point's colour does not depend on float round-off in its distance to the face plane.
    """
    local = boxes.to_local(points, box) + boxes.half[box]  # (N, 3), origin at the box's min corner
    n_local = rotate_z(normals, -boxes.yaw[box])
    face_axis = np.abs(n_local).argmax(axis=1)
    rows = np.arange(len(box))
    local[rows, face_axis] = 0.0
    face_id = face_axis * 2 + (n_local[rows, face_axis] > 0)

    period = boxes.period[box][:, None]
    bands = np.floor(local / period).astype(np.int64)  # (N, 3)
    stripe = bands[rows, boxes.axis[box]] % 2
    checker = bands.sum(axis=1) % 2
    pattern = boxes.pattern[box]
    use2 = np.where(pattern == Pattern.STRIPES, stripe, np.where(pattern == Pattern.CHECKER, checker, 0)).astype(bool)
    rgb = np.where(use2[:, None], boxes.color2[box], boxes.color[box])

    cells = np.floor(local / NOISE_CELL).astype(np.int64)
    noise = (_hash01(cells, box * 8 + face_id) * 2 - 1) * boxes.noise[box]
    rgb = rgb + noise[:, None]
    if shading:
        rgb = rgb * (0.78 + 0.22 * (normals @ LIGHT_DIR))[:, None]
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)
