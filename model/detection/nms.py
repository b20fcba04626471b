"""Greedy non-maximum suppression with exact oriented 3D IoU, per class."""

from __future__ import annotations

import numpy as np

from .boxes import as_boxes
from .iou import iou_3d


def nms_3d(boxes, scores, iou_threshold: float) -> np.ndarray:
    """Indices of the kept boxes, highest score first: a box is dropped when its IoU with an already kept
    box is greater than ``iou_threshold``. Ties in score keep the earlier row."""
    b = as_boxes(boxes)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(s) != len(b):
        raise ValueError(f"{len(b)} boxes but {len(s)} scores")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must lie in [0, 1], got {iou_threshold}")
    order = np.argsort(-s, kind="stable")
    overlap = iou_3d(b[order], b[order])                                     # (K, K) in score order
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(order[i])
        suppressed |= overlap[i] > iou_threshold
    return np.asarray(keep, dtype=np.int64)


def batched_nms_3d(boxes, scores, labels, iou_threshold: float) -> np.ndarray:
    """``nms_3d`` within each label; boxes of different labels never suppress each other.
    Returns the kept indices sorted by descending score."""
    b = as_boxes(boxes)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    lab = np.asarray(labels).reshape(-1)
    if not len(b) == len(s) == len(lab):
        raise ValueError(f"{len(b)} boxes, {len(s)} scores and {len(lab)} labels: counts must match")
    kept = [np.flatnonzero(lab == c)[nms_3d(b[lab == c], s[lab == c], iou_threshold)] for c in np.unique(lab)]
    keep = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    return keep[np.argsort(-s[keep], kind="stable")]
