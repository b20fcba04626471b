"""Room shell (floor, walls, optional ceiling, doors, windows) and collision-free object placement.

The room interior is [0, W] x [0, D] x [0, H] with the floor top at z = 0; the shell boxes lie
outside it. Placement is rejection sampling of oriented footprints (separating-axis test in 2D
plus a z-interval test), so nothing interpenetrates and every object stands on the floor, on
another object's top, or hangs on a wall.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..classes import NYU40_CEILING, VALID_CLASS_IDS_20
from . import furniture as fur
from .shapes import Material, Part, Pattern, SceneObject, rotate_z

SHELL = 0.1  # m: thickness of floor, walls and ceiling
WALL_YAW = (0.0, np.pi / 2, np.pi, -np.pi / 2)  # object yaw that makes local +y point into the room, walls S, E, N, W
NYU = {  # nyu40 ids of the objects the generator makes
    "wall": 1,
    "floor": 2,
    "cabinet": 3,
    "bed": 4,
    "chair": 5,
    "sofa": 6,
    "table": 7,
    "door": 8,
    "window": 9,
    "bookshelf": 10,
    "picture": 11,
    "counter": 12,
    "desk": 14,
    "curtain": 16,
    "pillow": 18,
    "ceiling": NYU40_CEILING,
    "refrigerator": 24,
    "shower curtain": 28,
    "toilet": 33,
    "sink": 34,
    "bathtub": 36,
    "otherfurniture": 39,
    "otherprop": 40,
}


def label_of(nyu40: int) -> int:
    return VALID_CLASS_IDS_20.index(nyu40) if nyu40 in VALID_CLASS_IDS_20 else -1


def make_object(
    name: str, parts: list[Part], origin: np.ndarray | tuple = (0.0, 0.0, 0.0), yaw: float = 0.0
) -> SceneObject:
    """An object whose name is a key of NYU (the name fixes its NYU40 id and ScanNet-20 label)."""
    nyu = NYU[name]
    return SceneObject(name, nyu, label_of(nyu), parts, np.asarray(origin, dtype=np.float64), float(yaw))


@dataclass
class _Solids:
    """Occupied oriented boxes for collision tests: footprint corners (S, 4, 2) and z ranges (S,).

    Objects are tested part by part, so a pillow may lie on a mattress next to the headboard and a
    bin may stand under a desk top."""

    corners: np.ndarray
    zlo: np.ndarray
    zhi: np.ndarray

    @classmethod
    def empty(cls) -> "_Solids":
        return cls(np.zeros((0, 4, 2)), np.zeros(0), np.zeros(0))

    def __add__(self, other: "_Solids") -> "_Solids":
        return _Solids(
            np.concatenate([self.corners, other.corners]),
            np.concatenate([self.zlo, other.zlo]),
            np.concatenate([self.zhi, other.zhi]),
        )

    def edge_normals(self) -> np.ndarray:
        edges = self.corners[:, 1:3] - self.corners[:, 0:2]  # (S, 2, 2): two edges per rectangle
        return np.stack([-edges[..., 1], edges[..., 0]], axis=-1)

    def overlaps(self, other: "_Solids") -> bool:
        """Does any box here overlap any box of other? (separating-axis test in xy, interval test in z;
        touching does not count)."""
        if not len(self.zlo) or not len(other.zlo):
            return False
        na, nb = self.edge_normals(), other.edge_normals()
        shape = (len(na), len(nb), 2, 2)
        axes = np.concatenate(
            [np.broadcast_to(na[:, None], shape), np.broadcast_to(nb[None], shape)], axis=2
        )  # (A, B, 4, 2)
        pa = np.einsum("ikd,ijad->ijak", self.corners, axes)  # (A, B, 4 axes, 4 corners)
        pb = np.einsum("jkd,ijad->ijak", other.corners, axes)
        separated = ((pa.max(-1) <= pb.min(-1) + 1e-9) | (pb.max(-1) <= pa.min(-1) + 1e-9)).any(-1)
        z_overlap = (self.zhi[:, None] > other.zlo[None] + 1e-6) & (other.zhi[None] > self.zlo[:, None] + 1e-6)
        return bool((z_overlap & ~separated).any())


def _part_solids(obj: SceneObject, grow: float = 0.0) -> _Solids:
    """The parts of obj as solids; grow widens the footprints only, so objects may rest on each other."""
    centers = np.array([p.center for p in obj.parts], dtype=np.float64)
    halves = np.array([p.size for p in obj.parts], dtype=np.float64) / 2 + np.array([grow, grow, 0.0])
    signs = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    local = centers[:, None, :2] + signs[None] * halves[:, None, :2]  # (P, 4, 2)
    corners = (
        rotate_z(np.concatenate([local, np.zeros(local.shape[:2] + (1,))], axis=-1), obj.yaw)[..., :2] + obj.origin[:2]
    )
    return _Solids(corners, obj.origin[2] + centers[:, 2] - halves[:, 2], obj.origin[2] + centers[:, 2] + halves[:, 2])


class Placer:
    """Keeps the occupied solids of a room and places new objects by rejection sampling."""

    def __init__(self, rng: np.random.Generator, size: np.ndarray, tries: int = 40):
        self.rng, self.size, self.tries = rng, size, tries
        self.objects: list[SceneObject] = []
        self.solids = _Solids.empty()

    def wall_point(self, wall: int, s: float, e: float) -> np.ndarray:
        """World xy of along-wall coordinate s (in the direction of local +x) at distance e into the room."""
        w, d = self.size[0], self.size[1]
        return np.array([(s, e), (w - e, s), (w - s, d - e), (e, d - s)][wall], dtype=np.float64)

    def wall_length(self, wall: int) -> float:
        return float(self.size[wall % 2])

    def fits(self, obj: SceneObject, margin: float, embed: float = 0.0) -> bool:
        """Inside the room (up to embed metres into the walls) and clear of every solid by margin."""
        inner = _part_solids(obj)
        tol = embed + 1e-6
        if (
            (inner.corners < -tol).any()
            or (inner.corners > self.size[:2] + tol).any()
            or inner.zhi.max() > self.size[2]
        ):
            return False
        return not _part_solids(obj, margin).overlaps(self.solids)

    def add(self, obj: SceneObject, solid: bool = True) -> SceneObject:
        self.objects.append(obj)
        if solid:
            self.solids = self.solids + _part_solids(obj)
        return obj

    def keep_out(self, corners: np.ndarray, zlo: float, zhi: float) -> None:
        """Reserve free space (in front of doors) that nothing may occupy."""
        self.solids = self.solids + _Solids(corners[None], np.array([zlo]), np.array([zhi]))

    def try_at(self, obj: SceneObject, margin: float = 0.02, embed: float = 0.0) -> SceneObject | None:
        return self.add(obj) if self.fits(obj, margin, embed) else None

    def try_wall(
        self,
        name: str,
        parts: list[Part],
        z: float = 0.0,
        gap: float = 0.02,
        margin: float = 0.03,
        wall: int | None = None,
        s: float | None = None,
    ) -> SceneObject | None:
        """Back (local -y) against a wall at distance gap; random wall / position unless given."""
        lo, hi = make_object(name, parts).local_bounds()
        for _ in range(self.tries if s is None else 1):
            k = int(self.rng.integers(0, 4)) if wall is None else wall
            length = self.wall_length(k)
            half_w = (hi[0] - lo[0]) / 2
            if length < 2 * half_w + 0.02:
                continue
            at = float(self.rng.uniform(half_w + 0.01, length - half_w - 0.01)) if s is None else s
            xy = self.wall_point(k, at - (lo[0] + hi[0]) / 2, gap - lo[1])
            obj = make_object(name, parts, (xy[0], xy[1], z), WALL_YAW[k])
            if self.try_at(obj, margin, embed=max(0.0, -gap)) is not None:
                return obj
        return None

    def try_free(
        self, name: str, parts: list[Part], margin: float = 0.05, wall_clear: float = 0.4
    ) -> SceneObject | None:
        """Anywhere on the floor at least wall_clear from the walls; mostly wall-aligned yaw."""
        for _ in range(self.tries):
            xy = self.rng.uniform(wall_clear, np.maximum(self.size[:2] - wall_clear, wall_clear + 1e-3))
            yaw = float(self.rng.integers(0, 4)) * np.pi / 2 + (
                self.rng.uniform(-0.3, 0.3) if self.rng.random() < 0.5 else 0.0
            )
            obj = self.try_at(make_object(name, parts, (xy[0], xy[1], 0.0), yaw), margin)
            if obj is not None:
                return obj
        return None

    def try_facing(
        self, name: str, parts: list[Part], xy: np.ndarray, target: np.ndarray, margin: float = 0.02
    ) -> SceneObject | None:
        """Stand at xy with the front (+y) towards target (chairs at tables and desks)."""
        dx, dy = target[:2] - xy[:2]
        yaw = float(np.arctan2(-dx, dy)) + float(self.rng.uniform(-0.15, 0.15))
        return self.try_at(make_object(name, parts, (xy[0], xy[1], 0.0), yaw), margin)

    def props_on(self, support: SceneObject, count: int) -> None:
        """Small boxes on the top face of support, inside its footprint, not overlapping each other."""
        lo, hi = support.local_bounds()
        span = hi[:2] - lo[:2] - 0.1
        if (span < 0.1).any():
            return
        top = support.origin[2] + hi[2]
        for _ in range(count):
            for _ in range(10):
                parts = fur.small_prop(self.rng, span[0], span[1])
                size = np.array(parts[0].size)
                local_yaw = float(self.rng.uniform(-0.4, 0.4))
                reach = np.abs(
                    rotate_z(np.array([[size[0] / 2, size[1] / 2, 0], [size[0] / 2, -size[1] / 2, 0]]), local_yaw)[
                        :, :2
                    ]
                ).max(axis=0)
                room = (hi[:2] - lo[:2]) / 2 - 0.03 - reach
                if (room <= 0).any():
                    continue
                local = np.append((lo[:2] + hi[:2]) / 2 + self.rng.uniform(-room, room), 0.0)
                origin = support.origin + rotate_z(local, support.yaw)
                origin[2] = top
                if self.try_at(make_object("otherprop", parts, origin, support.yaw + local_yaw), 0.01):
                    break


def build_shell(rng: np.random.Generator, placer: Placer, ceiling: bool) -> None:
    """Floor, four walls, optional ceiling, 1-2 doors, 0-3 windows (some with curtains)."""
    w, d, h = placer.size
    t = SHELL
    if rng.random() < 0.5:  # planks
        plank = fur.wood(rng)
        floor_mat = Material(plank.color, plank.color2, Pattern.STRIPES, float(rng.uniform(0.1, 0.2)), plank.axis, 0.04)
    else:  # tiles
        tile = fur.paint(rng, light=rng.random() < 0.7)
        floor_mat = Material(
            tile.color, tuple(c * 0.85 for c in tile.color), Pattern.CHECKER, float(rng.uniform(0.3, 0.6)), 0, 0.03
        )
    placer.add(
        make_object("floor", [Part((0.0, 0.0, 0.0), (w + 2 * t, d + 2 * t, t), floor_mat)], (w / 2, d / 2, -t / 2)),
        solid=False,
    )
    wall_mat = fur.paint(rng)
    for cx, cy, sx, sy in [
        (w / 2, -t / 2, w + 2 * t, t),
        (w + t / 2, d / 2, t, d + 2 * t),
        (w / 2, d + t / 2, w + 2 * t, t),
        (-t / 2, d / 2, t, d + 2 * t),
    ]:
        mat = fur.paint(rng) if rng.random() < 0.15 else wall_mat  # an accent wall now and then
        placer.add(
            make_object("wall", [Part((0.0, 0.0, 0.0), (sx, sy, h + t), mat)], (cx, cy, (h - t) / 2)), solid=False
        )
    if ceiling:
        placer.add(
            make_object(
                "ceiling", [Part((0.0, 0.0, 0.0), (w + 2 * t, d + 2 * t, t), fur.paint(rng))], (w / 2, d / 2, h + t / 2)
            ),
            solid=False,
        )

    for _ in range(1 if rng.random() < 0.85 else 2):
        dw, dh = rng.uniform(0.8, 1.0), min(rng.uniform(2.0, 2.1), h - 0.15)
        obj = placer.try_wall("door", fur.door(rng, dw, dh), gap=-0.02, margin=0.15)
        if obj is not None:  # keep the swing area in front of the door free
            k = WALL_YAW.index(obj.yaw)
            s = _along(placer, k, obj.origin)
            corners = np.array(
                [
                    placer.wall_point(k, s + a, e)
                    for a, e in [(-dw / 2 - 0.1, 0), (dw / 2 + 0.1, 0), (dw / 2 + 0.1, 1.0), (-dw / 2 - 0.1, 1.0)]
                ]
            )
            placer.keep_out(corners, 0.0, h)
    for _ in range(int(rng.integers(0, 4))):
        ww, wh = rng.uniform(0.6, 1.6), rng.uniform(0.8, 1.4)
        sill = rng.uniform(0.7, 1.0)
        if sill + wh > h - 0.2:
            wh = h - 0.2 - sill
        obj = placer.try_wall("window", fur.window(rng, ww, wh), z=sill, gap=-0.02, margin=0.15)
        if obj is not None and rng.random() < 0.4:
            k = WALL_YAW.index(obj.yaw)
            s = _along(placer, k, obj.origin)
            ch = min(sill + wh + 0.15, h - 0.05) - 0.02
            for side in (-1, 1):
                cw = rng.uniform(0.3, 0.5)
                placer.try_wall(
                    "curtain", fur.curtain(rng, cw, ch), z=0.02, gap=0.06, margin=0.01, wall=k, s=s + side * ww / 2
                )


def _along(placer: Placer, wall: int, origin: np.ndarray) -> float:
    """Inverse of wall_point for the along-wall coordinate."""
    w, d = placer.size[0], placer.size[1]
    x, y = origin[0], origin[1]
    return float([x, y, w - x, d - y][wall])
