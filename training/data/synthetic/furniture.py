"""Furniture as boxes and composites of boxes, in the object frame.

Object frame: x = width, y = depth with +y the front (where a person sits or stands), z up;
the footprint is centred on the origin and the object stands on z = 0. Sizes are drawn from
real-world ranges so the rooms look like ScanNet rooms at the voxel sizes the model uses.
"""

from __future__ import annotations

import colorsys

import numpy as np

from .shapes import Material, Part, Pattern

Rng = np.random.Generator


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (r, g, b)


def _darker(color: tuple[float, float, float], factor: float) -> tuple[float, float, float]:
    r, g, b = color
    return (r * factor, g * factor, b * factor)


def wood(rng: Rng) -> Material:
    base = _hsv(rng.uniform(0.05, 0.1), rng.uniform(0.35, 0.7), rng.uniform(0.35, 0.8))
    return Material(
        base, _darker(base, 0.85), Pattern.STRIPES, float(rng.uniform(0.015, 0.05)), int(rng.integers(0, 2)), 0.03
    )


def fabric(rng: Rng) -> Material:
    base = _hsv(rng.random(), rng.uniform(0.2, 0.8), rng.uniform(0.3, 0.85))
    if rng.random() < 0.3:
        return Material(base, _darker(base, 0.7), Pattern.CHECKER, float(rng.uniform(0.04, 0.12)), 0, 0.04)
    return Material(base, noise=0.04)


def paint(rng: Rng, light: bool = True) -> Material:
    value = rng.uniform(0.7, 0.95) if light else rng.uniform(0.2, 0.6)
    return Material(_hsv(rng.random(), rng.uniform(0.0, 0.25), value), noise=0.02)


def metal(rng: Rng) -> Material:
    return Material(_hsv(0.6, rng.uniform(0.0, 0.08), rng.uniform(0.55, 0.95)), noise=0.015)


def any_solid(rng: Rng) -> Material:
    """A random material for small props (more saturated colours)."""
    if rng.random() < 0.25:
        return wood(rng)
    base = _hsv(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0))
    if rng.random() < 0.2:
        return Material(
            base, _darker(base, 0.6), Pattern.STRIPES, float(rng.uniform(0.02, 0.06)), int(rng.integers(0, 3)), 0.03
        )
    return Material(base, noise=0.03)


def box(size: tuple[float, float, float], material: Material) -> list[Part]:
    """A plain box standing on the floor (cabinet, refrigerator, small props)."""
    w, d, h = size
    return [Part((0.0, 0.0, h / 2), (w, d, h), material)]


def _legs(w: float, d: float, h: float, leg: float, inset: float, material: Material) -> list[Part]:
    x, y = w / 2 - inset - leg / 2, d / 2 - inset - leg / 2
    return [Part((sx * x, sy * y, h / 2), (leg, leg, h), material) for sx in (-1, 1) for sy in (-1, 1)]


def table(rng: Rng, coffee: bool = False) -> list[Part]:
    w, d = rng.uniform(0.8, 1.8), rng.uniform(0.6, 1.0)
    h = rng.uniform(0.4, 0.5) if coffee else rng.uniform(0.7, 0.78)
    top, mat = 0.04, wood(rng) if rng.random() < 0.7 else paint(rng)
    legs = metal(rng) if rng.random() < 0.4 else mat
    return [Part((0.0, 0.0, h - top / 2), (w, d, top), mat)] + _legs(w, d, h - top, 0.05, 0.04, legs)


def desk(rng: Rng) -> list[Part]:
    w, d, h, top, side = rng.uniform(1.0, 1.6), rng.uniform(0.55, 0.8), rng.uniform(0.72, 0.76), 0.03, 0.03
    mat = wood(rng) if rng.random() < 0.6 else paint(rng)
    legs_h = h - top
    parts = [
        Part((0.0, 0.0, h - top / 2), (w, d, top), mat),
        Part((-(w / 2 - side / 2), 0.0, legs_h / 2), (side, d, legs_h), mat),
        Part((w / 2 - side / 2, 0.0, legs_h / 2), (side, d, legs_h), mat),
        Part((0.0, -(d / 2 - 0.05), legs_h - 0.2), (w - 2 * side, 0.02, 0.3), mat),  # modesty panel
    ]
    if rng.random() < 0.5:  # drawer block
        bw = min(0.4, w / 3)
        parts.append(
            Part((w / 2 - side - bw / 2, 0.0, legs_h / 2), (bw, d - 0.04, legs_h), paint(rng, light=rng.random() < 0.5))
        )
    return parts


def chair(rng: Rng) -> list[Part]:
    w, d = rng.uniform(0.42, 0.52), rng.uniform(0.42, 0.5)
    seat_h, seat_t, back_h, back_t = rng.uniform(0.42, 0.48), 0.05, rng.uniform(0.35, 0.5), 0.04
    seat, frame = fabric(rng), (metal(rng) if rng.random() < 0.5 else wood(rng))
    parts = [Part((0.0, 0.0, seat_h - seat_t / 2), (w, d, seat_t), seat)]
    parts += _legs(w, d, seat_h - seat_t, 0.035, 0.02, frame)
    parts.append(Part((0.0, -(d / 2 - back_t / 2), seat_h + back_h / 2), (w, back_t, back_h), seat))
    return parts


def bed(rng: Rng) -> list[Part]:
    w, length = float(rng.choice([0.95, 1.2, 1.45, 1.65, 1.85])), rng.uniform(1.95, 2.1)
    frame_h, mattress_h, head_t, head_h = rng.uniform(0.25, 0.35), rng.uniform(0.18, 0.25), 0.06, rng.uniform(0.8, 1.1)
    frame = wood(rng) if rng.random() < 0.6 else fabric(rng)
    sheet = fabric(rng)
    body_len = length - head_t
    y0 = -length / 2 + head_t  # headboard at the back (-y)
    return [
        Part((0.0, y0 + body_len / 2, frame_h / 2), (w, body_len, frame_h), frame),
        Part((0.0, y0 + body_len / 2, frame_h + mattress_h / 2), (w - 0.04, body_len - 0.04, mattress_h), sheet),
        Part((0.0, -length / 2 + head_t / 2, head_h / 2), (w, head_t, head_h), frame),
    ]


def sofa(rng: Rng) -> list[Part]:
    w, d = rng.uniform(1.5, 2.4), rng.uniform(0.8, 1.0)
    base_h, back_t, back_h, arm_w, arm_h = (
        rng.uniform(0.38, 0.45),
        rng.uniform(0.15, 0.25),
        rng.uniform(0.75, 0.9),
        rng.uniform(0.12, 0.2),
        rng.uniform(0.55, 0.65),
    )
    mat = fabric(rng)
    inner = w - 2 * arm_w
    return [
        Part((0.0, back_t / 2, base_h / 2), (inner, d - back_t, base_h), mat),
        Part((0.0, -(d / 2 - back_t / 2), back_h / 2), (inner, back_t, back_h), mat),
        Part((-(w / 2 - arm_w / 2), 0.0, arm_h / 2), (arm_w, d, arm_h), mat),
        Part((w / 2 - arm_w / 2, 0.0, arm_h / 2), (arm_w, d, arm_h), mat),
    ]


def cabinet(rng: Rng, tall: bool | None = None) -> list[Part]:
    tall = bool(rng.random() < 0.4) if tall is None else tall
    size = (rng.uniform(0.6, 1.2), rng.uniform(0.4, 0.6), rng.uniform(1.6, 2.0) if tall else rng.uniform(0.7, 1.0))
    mat = wood(rng) if rng.random() < 0.5 else paint(rng, light=rng.random() < 0.7)
    return box(size, mat)


def bookshelf(rng: Rng) -> list[Part]:
    w, d, h, t = rng.uniform(0.6, 1.2), rng.uniform(0.28, 0.4), rng.uniform(1.4, 2.0), 0.025
    mat = wood(rng)
    parts = [
        Part((-(w / 2 - t / 2), 0.0, h / 2), (t, d, h), mat),
        Part((w / 2 - t / 2, 0.0, h / 2), (t, d, h), mat),
        Part((0.0, 0.0, h - t / 2), (w - 2 * t, d, t), mat),
        Part((0.0, 0.0, 0.05), (w - 2 * t, d, 0.1), mat),  # plinth
        Part((0.0, -(d / 2 - 0.005), h / 2), (w - 2 * t, 0.01, h - 0.1 - t), mat),  # back panel
    ]
    shelves = int(rng.integers(2, 5))
    for k in range(1, shelves + 1):
        z = 0.1 + k * (h - 0.1 - t) / (shelves + 1)
        parts.append(Part((0.0, 0.005, z), (w - 2 * t, d - 0.01, t), mat))
    return parts


def counter(rng: Rng) -> list[Part]:
    w, d, h = rng.uniform(1.2, 2.4), rng.uniform(0.55, 0.65), rng.uniform(0.88, 0.92)
    top = Material(_hsv(rng.random(), rng.uniform(0.0, 0.2), rng.uniform(0.3, 0.9)), noise=0.05)
    return [
        Part((0.0, -0.02, (h - 0.04) / 2), (w, d - 0.04, h - 0.04), paint(rng, light=rng.random() < 0.7)),
        Part((0.0, 0.0, h - 0.02), (w, d, 0.04), top),
    ]


def sink(rng: Rng) -> list[Part]:
    """A basin block (rim + bowl as one box) that sits on a counter or stands on a pedestal."""
    return box((rng.uniform(0.4, 0.6), rng.uniform(0.35, 0.45), rng.uniform(0.12, 0.18)), metal(rng))


def pedestal_sink(rng: Rng) -> list[Part]:
    basin_w, basin_d, h = rng.uniform(0.45, 0.6), rng.uniform(0.38, 0.48), rng.uniform(0.8, 0.88)
    mat = Material(_hsv(0.0, 0.0, rng.uniform(0.85, 0.97)), noise=0.015)
    return [
        Part((0.0, -basin_d / 2 + 0.1, (h - 0.18) / 2), (0.18, 0.18, h - 0.18), mat),
        Part((0.0, 0.0, h - 0.09), (basin_w, basin_d, 0.18), mat),
    ]


def refrigerator(rng: Rng) -> list[Part]:
    return box((rng.uniform(0.6, 0.8), rng.uniform(0.6, 0.72), rng.uniform(1.6, 1.9)), metal(rng))


def toilet(rng: Rng) -> list[Part]:
    mat = Material(_hsv(0.0, 0.0, rng.uniform(0.88, 0.98)), noise=0.015)
    bowl_w, bowl_d, bowl_h = rng.uniform(0.36, 0.42), rng.uniform(0.45, 0.55), rng.uniform(0.38, 0.42)
    tank_d, tank_h = rng.uniform(0.16, 0.2), rng.uniform(0.3, 0.4)
    total_d = bowl_d + tank_d
    return [
        Part((0.0, -total_d / 2 + tank_d / 2, bowl_h / 2 + tank_h / 2), (bowl_w + 0.05, tank_d, bowl_h + tank_h), mat),
        Part((0.0, total_d / 2 - bowl_d / 2, bowl_h / 2), (bowl_w, bowl_d, bowl_h), mat),
    ]


def bathtub(rng: Rng) -> list[Part]:
    """An open-topped shell: bottom plus four walls, so the inside is visible."""
    w, d, h, t = rng.uniform(1.5, 1.75), rng.uniform(0.7, 0.8), rng.uniform(0.5, 0.6), 0.06
    mat = Material(_hsv(0.0, 0.0, rng.uniform(0.85, 0.97)), noise=0.01)
    return [
        Part((0.0, 0.0, 0.05), (w, d, 0.1), mat),
        Part((0.0, -(d / 2 - t / 2), h / 2), (w, t, h), mat),
        Part((0.0, d / 2 - t / 2, h / 2), (w, t, h), mat),
        Part((-(w / 2 - t / 2), 0.0, h / 2), (t, d - 2 * t, h), mat),
        Part((w / 2 - t / 2, 0.0, h / 2), (t, d - 2 * t, h), mat),
    ]


def nightstand(rng: Rng) -> list[Part]:
    """Labelled otherfurniture (ScanNet-20 folds nightstands and bins into it or ignores them)."""
    return box(
        (rng.uniform(0.4, 0.55), rng.uniform(0.35, 0.45), rng.uniform(0.5, 0.62)),
        wood(rng) if rng.random() < 0.6 else paint(rng),
    )


def trash_bin(rng: Rng) -> list[Part]:
    return box((rng.uniform(0.22, 0.35), rng.uniform(0.22, 0.35), rng.uniform(0.3, 0.5)), any_solid(rng))


def small_prop(rng: Rng, max_w: float, max_d: float) -> list[Part]:
    """Books, boxes, a monitor: a small box for table and shelf tops (otherprop)."""
    w = rng.uniform(0.08, max(0.09, min(0.45, max_w)))
    d = rng.uniform(0.06, max(0.07, min(0.35, max_d)))
    return box((w, d, rng.uniform(0.03, 0.35)), any_solid(rng))


def pillow(rng: Rng, width: float) -> list[Part]:
    return box((width, rng.uniform(0.3, 0.4), rng.uniform(0.1, 0.15)), fabric(rng))


def picture(rng: Rng) -> list[Part]:
    """Thin panel; its back (-y) goes against a wall."""
    w, h = rng.uniform(0.3, 1.0), rng.uniform(0.3, 0.8)
    art = Material(
        _hsv(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.3, 0.9)),
        _hsv(rng.random(), 0.7, 0.7),
        Pattern(int(rng.integers(0, 3))),
        float(rng.uniform(0.05, 0.2)),
        2,
        0.05,
    )
    return [Part((0.0, 0.0, h / 2), (w, 0.02, h), art)]


def door(rng: Rng, width: float, height: float) -> list[Part]:
    mat = wood(rng) if rng.random() < 0.6 else paint(rng, light=rng.random() < 0.6)
    return [Part((0.0, 0.0, height / 2), (width, 0.05, height), mat)]


def window(rng: Rng, width: float, height: float) -> list[Part]:
    glass = Material(
        _hsv(0.55, rng.uniform(0.1, 0.35), rng.uniform(0.75, 0.95)),
        (0.95, 0.95, 0.95),
        Pattern.STRIPES,
        float(width / 2),
        0,
        0.02,
    )
    return [Part((0.0, 0.0, height / 2), (width, 0.04, height), glass)]


def curtain(rng: Rng, width: float, height: float) -> list[Part]:
    base = _hsv(rng.random(), rng.uniform(0.1, 0.6), rng.uniform(0.4, 0.9))
    return [
        Part(
            (0.0, 0.0, height / 2),
            (width, 0.04, height),
            Material(base, _darker(base, 0.85), Pattern.STRIPES, 0.06, 0, 0.03),
        )
    ]
