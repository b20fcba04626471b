"""Room types: which furniture a room gets and how the pieces relate (chairs at tables, pillows on
beds, a sink on a counter). Free-standing pieces stay below 1.1 m so the camera loop can pass over
them; tall pieces stand against walls.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Callable

import numpy as np

from . import furniture as fur
from .layout import WALL_YAW, Placer, make_object
from .shapes import SceneObject, rotate_z


class RoomType(IntEnum):
    BEDROOM = 0
    LIVING_ROOM = 1
    OFFICE = 2
    KITCHEN = 3
    BATHROOM = 4


def _n(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(rng.integers(lo, hi + 1))


def _local_to_world(obj: SceneObject, local_xy: tuple[float, float]) -> np.ndarray:
    return obj.origin + rotate_z(np.array([local_xy[0], local_xy[1], 0.0]), obj.yaw)


def _table_with_chairs(p: Placer, max_chairs: int) -> None:
    table = p.try_free("table", fur.table(p.rng))
    if table is None:
        return
    p.props_on(table, _n(p.rng, 0, 3))
    lo, hi = table.local_bounds()
    half = (hi - lo) / 2
    slots = [(0.0, -1), (0.0, 1), (-1, 0.0), (1, 0.0)]
    if half[0] > 0.6:
        slots += [(-0.5, -1), (0.5, -1), (-0.5, 1), (0.5, 1)]
    p.rng.shuffle(slots)
    for sx, sy in slots[:max_chairs]:
        parts = fur.chair(p.rng)
        reach = max(parts[0].size[0], parts[0].size[1]) / 2 + p.rng.uniform(0.08, 0.3)
        local = (sx * half[0] + np.sign(sx) * reach * (sy == 0), sy * half[1] + np.sign(sy) * reach)
        target = _local_to_world(table, (local[0] if sy != 0 else 0.0, 0.0))
        p.try_facing("chair", parts, _local_to_world(table, local), target)


def _desk_with_chair(p: Placer) -> None:
    desk = p.try_wall("desk", fur.desk(p.rng))
    if desk is None:
        return
    p.props_on(desk, _n(p.rng, 1, 3))
    if p.rng.random() < 0.85:
        lo, hi = desk.local_bounds()
        parts = fur.chair(p.rng)
        y = hi[1] + parts[0].size[1] / 2 + p.rng.uniform(0.1, 0.35)
        x = p.rng.uniform(-0.25, 0.25) * (hi[0] - lo[0])
        p.try_facing("chair", parts, _local_to_world(desk, (x, y)), _local_to_world(desk, (x, 0.0)))


def _bed_group(p: Placer) -> None:
    bed = p.try_wall("bed", fur.bed(p.rng), margin=0.05)
    if bed is None:
        return
    mattress = bed.parts[1]
    top = mattress.center[2] + mattress.size[2] / 2
    width = mattress.size[0]
    count = 1 if width < 1.3 else 2
    lo, _ = bed.local_bounds()
    for i in range(count):
        parts = fur.pillow(p.rng, width / count - 0.12)
        x = (i - (count - 1) / 2) * width / count
        y = lo[1] + 0.1 + parts[0].size[1] / 2
        origin = _local_to_world(bed, (x, y)) + np.array([0.0, 0.0, top])
        p.try_at(make_object("pillow", parts, origin, bed.yaw), margin=0.005)
    wall = WALL_YAW.index(bed.yaw)
    s = float(rotate_z(bed.origin - np.append(p.wall_point(wall, 0.0, 0.0), 0.0), -bed.yaw)[0])
    for side in (-1, 1):
        if p.rng.random() < 0.7:
            parts = fur.nightstand(p.rng)
            at = s + side * (width / 2 + 0.04 + parts[0].size[0] / 2 + p.rng.uniform(0.02, 0.1))
            stand = p.try_wall("otherfurniture", parts, wall=wall, s=at)
            if stand is not None:
                p.props_on(stand, _n(p.rng, 0, 2))


def _bathtub_group(p: Placer) -> None:
    tub = p.try_wall("bathtub", fur.bathtub(p.rng), gap=0.0)
    if tub is None or p.rng.random() < 0.3:
        return
    lo, hi = tub.local_bounds()
    height = 2.0 - hi[2] - 0.1
    parts = fur.curtain(p.rng, hi[0] - lo[0], height)
    origin = _local_to_world(tub, (0.0, hi[1] - 0.04)) + np.array([0.0, 0.0, hi[2] + 0.1])
    p.try_at(make_object("shower curtain", parts, origin, tub.yaw), margin=0.005)


def _wall_items(p: Placer, name: str, build: Callable[[np.random.Generator], list], count: int, props: int = 0) -> None:
    for _ in range(count):
        obj = p.try_wall(name, build(p.rng))
        if obj is not None and props and obj.size[2] < 1.3:
            p.props_on(obj, _n(p.rng, 0, props))


def _pictures(p: Placer, count: int) -> None:
    for _ in range(count):
        parts = fur.picture(p.rng)
        z = p.rng.uniform(1.2, 1.6)
        if z + parts[0].size[2] < p.size[2] - 0.1:
            p.try_wall("picture", parts, z=z, gap=0.0, margin=0.05)


def _counter(p: Placer, with_sink: bool) -> None:
    counter = p.try_wall("counter", fur.counter(p.rng))
    if counter is None:
        return
    if with_sink:
        parts = fur.sink(p.rng)
        top = counter.local_bounds()[1][2]
        x = p.rng.uniform(-0.3, 0.3) * (counter.size[0] - parts[0].size[0])
        origin = _local_to_world(counter, (x, 0.0)) + np.array([0.0, 0.0, top])
        p.try_at(make_object("sink", parts, origin, counter.yaw), margin=0.01)
    p.props_on(counter, _n(p.rng, 0, 3))


def _sofa_corner(p: Placer) -> None:
    sofa = p.try_wall("sofa", fur.sofa(p.rng))
    if sofa is None or p.rng.random() < 0.2:
        return
    parts = fur.table(p.rng, coffee=True)
    depth = max(q.center[1] + q.size[1] / 2 for q in parts) * 2
    at = _local_to_world(sofa, (0.0, sofa.size[1] / 2 + p.rng.uniform(0.3, 0.5) + depth / 2))
    table = p.try_at(make_object("table", parts, at, sofa.yaw), 0.05)
    if table is not None:
        p.props_on(table, _n(p.rng, 0, 2))


def _low_cabinet(rng: np.random.Generator) -> list:
    """A waist-high cabinet (props fit on top), for the small rooms."""
    return fur.cabinet(rng, tall=False)


def _storage_and_decor(p: Placer, shelves: tuple[int, int] | None, cabinets: tuple[int, int], bins: tuple[int, int],
                       pictures: tuple[int, int], cabinet: Callable[[np.random.Generator], list] = fur.cabinet) -> None:
    """The wall pieces every room but the kitchen ends with: bookshelves (None: none, and no draw), cabinets with
    up to two props on top, trash bins, pictures; counts are inclusive (lo, hi) ranges. One fixed order of draws,
    so each room's random stream, and so every generated dataset, stays what it was."""
    if shelves is not None:
        _wall_items(p, "bookshelf", fur.bookshelf, _n(p.rng, *shelves))
    _wall_items(p, "cabinet", cabinet, _n(p.rng, *cabinets), props=2)
    _wall_items(p, "otherfurniture", fur.trash_bin, _n(p.rng, *bins))
    _pictures(p, _n(p.rng, *pictures))


def _bedroom(p: Placer) -> None:
    r = p.rng
    _bed_group(p)
    _wall_items(p, "cabinet", lambda g: fur.cabinet(g, tall=True), _n(r, 0, 1))
    if r.random() < 0.6:
        _desk_with_chair(p)
    _storage_and_decor(p, shelves=(0, 1), cabinets=(0, 1), bins=(0, 1), pictures=(0, 2), cabinet=_low_cabinet)


def _living_room(p: Placer) -> None:
    r = p.rng
    _sofa_corner(p)
    for _ in range(_n(r, 0, 2)):
        p.try_free("chair", fur.chair(r))
    if r.random() < 0.4:
        _table_with_chairs(p, _n(r, 2, 4))
    _storage_and_decor(p, shelves=(0, 2), cabinets=(0, 2), bins=(0, 1), pictures=(1, 3))


def _office(p: Placer) -> None:
    r = p.rng
    for _ in range(_n(r, 1, 3)):
        _desk_with_chair(p)
    if r.random() < 0.5:
        _table_with_chairs(p, _n(r, 2, 6))
    _storage_and_decor(p, shelves=(0, 2), cabinets=(0, 2), bins=(0, 2), pictures=(0, 2))


def _kitchen(p: Placer) -> None:
    r = p.rng
    for i in range(_n(r, 1, 2)):
        _counter(p, with_sink=i == 0)
    _wall_items(p, "refrigerator", fur.refrigerator, 1)
    _wall_items(p, "cabinet", fur.cabinet, _n(r, 0, 2), props=2)
    if r.random() < 0.7:
        _table_with_chairs(p, _n(r, 2, 4))
    _wall_items(p, "otherfurniture", fur.trash_bin, _n(r, 0, 1))
    _pictures(p, _n(r, 0, 1))


def _bathroom(p: Placer) -> None:
    r = p.rng
    _bathtub_group(p)
    _wall_items(p, "toilet", fur.toilet, 1)
    if r.random() < 0.5:
        _wall_items(p, "sink", fur.pedestal_sink, 1)
    else:
        _counter(p, with_sink=True)
    _storage_and_decor(p, shelves=None, cabinets=(0, 1), bins=(0, 1), pictures=(0, 1), cabinet=_low_cabinet)


FURNISH: dict[RoomType, Callable[[Placer], None]] = {
    RoomType.BEDROOM: _bedroom,
    RoomType.LIVING_ROOM: _living_room,
    RoomType.OFFICE: _office,
    RoomType.KITCHEN: _kitchen,
    RoomType.BATHROOM: _bathroom,
}


def furnish(p: Placer, room: RoomType) -> None:
    """Place the furniture of one room type (groups first: they need the most space)."""
    FURNISH[room](p)
