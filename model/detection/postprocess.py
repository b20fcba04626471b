"""Per-voxel votes → scored boxes: vote clustering, aggregation, per-class 3D NMS.

1. Voxels with objectness ≥ ``seed_threshold`` cast a vote at ``position + offset``.
2. Cluster seeds come from farthest-point sampling of the votes (as VoteNet samples its vote clusters), started
   at the most confident vote and stopped once every vote lies within ``vote_radius`` of a seed.
3. Each seed moves to the objectness-weighted mean of the votes within ``vote_radius`` (``mean_shift_steps``
   times), and the cluster's members are aggregated into one box: weighted mean centre, mean log size,
   circular mean of the canonical yaw, mean class probabilities.
4. Score = mean member objectness × class probability × support, support = min(1, Σ objectness / min_votes),
   so stray clusters of a few votes rank low. Per-class NMS then removes duplicates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from .head import DecodeConfig
from .nms import batched_nms_3d


@dataclass
class Boxes:
    """Decoded boxes of one scene, highest score first."""

    boxes: np.ndarray    # (K, 7) float64 [cx, cy, cz, dx, dy, dz, yaw]
    scores: np.ndarray   # (K,) float64
    labels: np.ndarray   # (K,) int64 index into the head's class names

    @classmethod
    def empty(cls) -> "Boxes":
        return cls(np.zeros((0, 7)), np.zeros(0), np.zeros(0, dtype=np.int64))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def farthest_point_seeds(points: np.ndarray, first: int, max_seeds: int, radius: float) -> np.ndarray:
    """Indices chosen by farthest-point sampling from ``first``; stops when every point is within ``radius``."""
    chosen = [first]
    dist = np.linalg.norm(points - points[first], axis=1)
    while len(chosen) < max_seeds:
        far = int(np.argmax(dist))
        if dist[far] <= radius:
            break
        chosen.append(far)
        dist = np.minimum(dist, np.linalg.norm(points - points[far], axis=1))
    return np.asarray(chosen, dtype=np.int64)


def decode(positions: np.ndarray, outputs: dict[str, np.ndarray], cfg: DecodeConfig,
           score_threshold: float | None = None, iou_threshold: float | None = None) -> Boxes:
    """Boxes of one scene from the head's per-voxel outputs (numpy, N rows) at voxel ``positions`` (N, 3)."""
    score_threshold = cfg.score_threshold if score_threshold is None else score_threshold
    iou_threshold = cfg.iou_threshold if iou_threshold is None else iou_threshold
    objectness = _sigmoid(outputs["objectness"].astype(np.float64))
    seeds = np.flatnonzero(objectness >= cfg.seed_threshold)
    if len(seeds) == 0:
        return Boxes.empty()
    if len(seeds) > cfg.max_votes:
        seeds = seeds[np.argsort(-objectness[seeds], kind="stable")[:cfg.max_votes]]
    weight = objectness[seeds]
    votes = positions[seeds].astype(np.float64) + outputs["offset"][seeds]          # (V, 3)
    log_size = outputs["log_size"][seeds].astype(np.float64)
    yaw_vec = outputs["yaw"][seeds].astype(np.float64)
    probs = _softmax(outputs["class_logits"][seeds].astype(np.float64))              # (V, K)

    tree = cKDTree(votes)
    centres = votes[farthest_point_seeds(votes, int(np.argmax(weight)), cfg.max_proposals, cfg.vote_radius)]
    for _ in range(cfg.mean_shift_steps):
        for i, members in enumerate(tree.query_ball_point(centres, cfg.vote_radius)):
            if members:
                w = weight[members]
                centres[i] = w @ votes[members] / w.sum()
    boxes, scores, labels = [], [], []
    for centre, members in zip(centres, tree.query_ball_point(centres, cfg.vote_radius)):
        if not members:
            continue
        w = weight[members]
        total = w.sum()
        mean_probs = w @ probs[members] / total
        label = int(np.argmax(mean_probs))
        sin4, cos4 = w @ yaw_vec[members] / total
        # clamp before exp: an undertrained head can predict absurd log-sizes (boxes of 1 mm .. 50 m)
        size = np.exp(np.clip(w @ log_size[members] / total, np.log(1e-3), np.log(50.0)))
        support = min(1.0, total / cfg.min_votes)
        boxes.append(np.concatenate([centre, size, [np.arctan2(sin4, cos4) / 4]]))
        scores.append(total / len(members) * mean_probs[label] * support)
        labels.append(label)
    if not boxes:
        return Boxes.empty()
    boxes_a, scores_a, labels_a = np.array(boxes), np.array(scores), np.array(labels, dtype=np.int64)
    keep = batched_nms_3d(boxes_a, scores_a, labels_a, iou_threshold)
    keep = keep[scores_a[keep] >= score_threshold][:cfg.max_detections]
    return Boxes(boxes_a[keep], scores_a[keep], labels_a[keep])
