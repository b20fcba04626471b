"""Exact IoU of oriented 3D boxes (yaw about z): BEV intersection area × vertical overlap.

The footprints are convex quadrilaterals, so their intersection is clipped exactly with Sutherland–Hodgman
(the subject footprint clipped by the four half-planes of the other), vectorised over all pairs at once with
padded vertex arrays. Convex clipping adds at most one vertex per half-plane, so 4 + 4 = 8 vertices suffice
mathematically; ``_MAX_VERTICES`` leaves room for the duplicate vertices that exact contacts produce.
"""

from __future__ import annotations

import numpy as np

from .boxes import as_boxes, bev_corners

_MAX_VERTICES = 16


def _clip_half_plane(poly: np.ndarray, count: np.ndarray, a: np.ndarray, b: np.ndarray):
    """Keep the part of each polygon left of the directed edge a→b (inside of a CCW clip polygon).

    poly (P, V, 2) with ``count`` (P,) valid vertices; a, b (P, 2). Returns (poly (P, V', 2), count (P,))."""
    num_pairs, slots, _ = poly.shape
    index = np.arange(slots)[None]                                            # (1, V)
    valid = index < count[:, None]
    nxt = np.where(index + 1 < count[:, None], index + 1, 0)                  # cyclic successor
    cur_pt = poly
    nxt_pt = np.take_along_axis(poly, nxt[..., None], axis=1)
    edge = (b - a)[:, None, :]

    def side(p: np.ndarray) -> np.ndarray:  # > 0 left of the edge, 0 on it
        return edge[..., 0] * (p[..., 1] - a[:, None, 1]) - edge[..., 1] * (p[..., 0] - a[:, None, 0])

    d_cur, d_nxt = side(cur_pt), side(nxt_pt)
    in_cur, in_nxt = d_cur >= 0, d_nxt >= 0
    denom = d_cur - d_nxt
    t = d_cur / np.where(denom == 0, 1.0, denom)
    crossing = cur_pt + t[..., None] * (nxt_pt - cur_pt)
    # Each edge emits its start vertex when inside, then the crossing point when the edge crosses the line.
    out = np.stack([cur_pt, crossing], axis=2).reshape(num_pairs, 2 * slots, 2)
    keep = np.stack([in_cur & valid, (in_cur != in_nxt) & valid], axis=2).reshape(num_pairs, 2 * slots)
    order = np.argsort(~keep, axis=1, kind="stable")                           # kept slots first, in order
    out = np.take_along_axis(out, order[..., None], axis=1)[:, :_MAX_VERTICES]
    return out, np.minimum(keep.sum(axis=1), _MAX_VERTICES)


def polygon_area(poly: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Shoelace area (P,) of padded polygons (P, V, 2) with ``count`` valid vertices each."""
    slots = poly.shape[1]
    index = np.arange(slots)[None]
    valid = index < count[:, None]
    nxt = np.where(index + 1 < count[:, None], index + 1, 0)
    nxt_pt = np.take_along_axis(poly, nxt[..., None], axis=1)
    cross = poly[..., 0] * nxt_pt[..., 1] - nxt_pt[..., 0] * poly[..., 1]
    return np.abs(0.5 * np.where(valid, cross, 0.0).sum(axis=1))


def bev_intersection_area(boxes_a, boxes_b) -> np.ndarray:
    """(P,) exact area of the intersection of the footprints of boxes_a[i] and boxes_b[i]."""
    a, b = as_boxes(boxes_a, "boxes_a"), as_boxes(boxes_b, "boxes_b")
    if len(a) != len(b):
        raise ValueError(f"paired boxes need equal counts, got {len(a)} and {len(b)}")
    if len(a) == 0:
        return np.zeros(0)
    subject, clip = bev_corners(a), bev_corners(b)                            # (P, 4, 2) each, CCW
    poly = np.zeros((len(a), _MAX_VERTICES, 2))
    poly[:, :4] = subject
    count = np.full(len(a), 4)
    for k in range(4):
        poly, count = _clip_half_plane(poly, count, clip[:, k], clip[:, (k + 1) % 4])
    return polygon_area(poly, count)


def paired_iou_3d(boxes_a, boxes_b) -> np.ndarray:
    """(P,) IoU of boxes_a[i] with boxes_b[i]."""
    a, b = as_boxes(boxes_a, "boxes_a"), as_boxes(boxes_b, "boxes_b")
    area = bev_intersection_area(a, b)
    top = np.minimum(a[:, 2] + a[:, 5] / 2, b[:, 2] + b[:, 5] / 2)
    bottom = np.maximum(a[:, 2] - a[:, 5] / 2, b[:, 2] - b[:, 5] / 2)
    inter = area * np.clip(top - bottom, 0.0, None)
    union = a[:, 3] * a[:, 4] * a[:, 5] + b[:, 3] * b[:, 4] * b[:, 5] - inter
    return inter / union


def iou_3d(boxes_a, boxes_b) -> np.ndarray:
    """(N, M) IoU of every box in boxes_a with every box in boxes_b.

    Pairs whose footprint circumcircles or height ranges do not meet are 0 without clipping."""
    a, b = as_boxes(boxes_a, "boxes_a"), as_boxes(boxes_b, "boxes_b")
    out = np.zeros((len(a), len(b)))
    if len(a) == 0 or len(b) == 0:
        return out
    radius_a, radius_b = np.hypot(a[:, 3], a[:, 4]) / 2, np.hypot(b[:, 3], b[:, 4]) / 2
    centre_dist = np.linalg.norm(a[:, None, :2] - b[None, :, :2], axis=-1)
    z_gap = np.abs(a[:, None, 2] - b[None, :, 2]) - (a[:, None, 5] + b[None, :, 5]) / 2
    i, j = np.nonzero((centre_dist < radius_a[:, None] + radius_b[None, :]) & (z_gap < 0))
    if len(i):
        out[i, j] = paired_iou_3d(a[i], b[j])
    return out


def bev_iou(boxes_a, boxes_b) -> np.ndarray:
    """(P,) IoU of the footprints of paired boxes (heights ignored)."""
    a, b = as_boxes(boxes_a, "boxes_a"), as_boxes(boxes_b, "boxes_b")
    inter = bev_intersection_area(a, b)
    return inter / (a[:, 3] * a[:, 4] + b[:, 3] * b[:, 4] - inter)
