"""Shaping model outputs for the caller: voxel rows → every input point, in the input's length and order.

The one place ``Predictor.segment``/``features``, the service's fast segment path and the official precise
mode (TTA) turn voxel logits/features into per-point answers. Points the model never saw (NaN/inf rows dropped
by ``model.prepare``) get NaN features/logits and label -1. Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

IGNORED_LABEL = -1


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str
    conditions: tuple[str, ...]
    class_names: dict[str, tuple[str, ...]]
    feature_dim: int
    grid_size: float
    input_features: tuple[str, ...]
    version: str


@dataclass
class SegmentResult:
    logits: np.ndarray | None    # (N, K) float32 (None when not asked for); NaN rows for dropped points
    labels: np.ndarray           # (N,) int32; -1 for dropped points
    class_names: tuple[str, ...]
    prepared: Any = None         # model.prepare.PreparedCloud: dropped rows, up rotation, organised shape


def to_input_rows(values: np.ndarray, valid: np.ndarray | None, fill: float | int = np.nan) -> np.ndarray:
    """Rows of the valid points (in order) → rows of every input point; dropped rows get ``fill``."""
    if valid is None:
        return values
    out = np.full((len(valid),) + values.shape[1:], fill, dtype=values.dtype)
    out[valid] = values
    return out


def point_values(voxel_values: np.ndarray, point_to_voxel: np.ndarray, valid: np.ndarray | None = None
                 ) -> np.ndarray:
    """(M, C) voxel rows → (N_input, C) rows of every input point (NaN for dropped points)."""
    return to_input_rows(np.take(voxel_values, point_to_voxel, axis=0), valid)


def input_point_to_voxel(point_to_voxel: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """The point → voxel index over every input point; -1 for dropped points."""
    return to_input_rows(point_to_voxel, valid, fill=-1)


def class_names_for(names: tuple[str, ...], num_classes: int) -> tuple[str, ...]:
    """The model's class names, or ``class0..`` when they do not match the head's width."""
    return tuple(names) if len(names) == num_classes else tuple(f"class{i}" for i in range(num_classes))


def segment_from_voxels(voxel_logits: np.ndarray, point_to_voxel: np.ndarray, class_names: tuple[str, ...],
                        valid: np.ndarray | None = None, logits: bool = True) -> SegmentResult:
    """Fast mode: each point takes its voxel's logits (labels from the voxel argmax, the same values)."""
    labels = voxel_logits.argmax(axis=1).astype(np.int32)[point_to_voxel]
    point_logits = point_values(voxel_logits, point_to_voxel, valid) if logits else None
    return SegmentResult(logits=point_logits, labels=to_input_rows(labels, valid, IGNORED_LABEL),
                         class_names=class_names_for(class_names, voxel_logits.shape[1]))


def segment_from_votes(summed: np.ndarray, class_names: tuple[str, ...], valid: np.ndarray | None = None
                       ) -> SegmentResult:
    """Precise mode: summed per-point probabilities → labels and log mean probabilities as logits."""
    logits = np.log(np.maximum(summed / summed.sum(axis=1, keepdims=True), 1e-12)).astype(np.float32)
    labels = logits.argmax(axis=1).astype(np.int32)
    return SegmentResult(logits=to_input_rows(logits, valid), labels=to_input_rows(labels, valid, IGNORED_LABEL),
                         class_names=class_names_for(class_names, logits.shape[1]))


def organised(values: np.ndarray, grid_shape: tuple[int, int] | None) -> np.ndarray:
    """Per-point rows of an organised cloud as an image: (H*W, ...) → (H, W, ...); unorganised as they are."""
    if grid_shape is None:
        return values
    return values.reshape(tuple(grid_shape) + values.shape[1:])


def detections_to_input_frame(document: dict, rotation: np.ndarray | None) -> dict:
    """A ``ponder-detections/1`` document found in the z-up model frame, told in the input's frame: ``center``
    and ``corners`` rotated back (so they overlay the input cloud); ``size`` and ``yaw`` stay the box's own
    extents and heading about the gravity axis (the model frame's +z), and ``up_rotation`` (3x3 row-major,
    input → z-up) says how to get there. Unchanged when no rotation was applied."""
    if rotation is None:
        return document
    back = np.asarray(rotation, dtype=np.float64)  # row vectors: p_input = p_model @ R
    for det in document.get("detections", []):
        det["center"] = [round(float(v), 6) for v in np.asarray(det["center"]) @ back]
        det["corners"] = np.round(np.asarray(det["corners"], dtype=np.float64) @ back, 6).tolist()
    document["up_rotation"] = [[round(float(v), 9) for v in row] for row in back]
    document["box_convention"] = (document.get("box_convention", "") + "; the input was rotated into z-up by "
                                  "up_rotation: center and corners are in the input's frame, size and yaw are about "
                                  "the gravity axis (+z after up_rotation)")
    return document
