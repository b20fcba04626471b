"""Box-aware augmentation: points, normals and boxes move by the same similarity p' = s · R_z(θ) · F · p.

The shared transforms (training/transforms.py) move points only, so the geometric part is done here with one
linear map applied to everything (``model.detection.transform_boxes`` for the boxes); the colour and point
transforms that leave geometry alone (chromatic, dropout, jitter) are the shared ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from model.detection.boxes import transform_boxes
from training.transforms import (ChromaticAutoContrast, ChromaticJitter, ChromaticTranslation, Compose,
                                 RandomDropout, RandomJitter, rotation_matrix)

from .config import AugmentConfig


def similarity(data: dict[str, Any], yaw: float, scale: float, flip_x: bool, flip_y: bool) -> dict[str, Any]:
    """Apply p' = scale · R_z(yaw) · F · p to ``coord``, R_z · F to ``normal`` and the same map to ``boxes``."""
    flip = np.diag([-1.0 if flip_x else 1.0, -1.0 if flip_y else 1.0, 1.0])
    linear = rotation_matrix("z", yaw) @ flip                                   # (3, 3)
    data["coord"] = (data["coord"].astype(np.float64) @ (scale * linear).T).astype(np.float32)
    if data.get("normal") is not None:
        data["normal"] = (data["normal"].astype(np.float64) @ linear.T).astype(np.float32)
    if len(data["boxes"]):
        data["boxes"] = transform_boxes(data["boxes"], yaw=yaw, scale=scale, flip_x=flip_x, flip_y=flip_y)
    return data


class BoxAugment:
    """The training augmentation of one scene dict (coord, color, normal, instance, boxes, ...)."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg
        shared: list = []
        if cfg.dropout > 0:
            shared.append(RandomDropout(cfg.dropout, p=0.5))
        if cfg.jitter > 0:
            shared.append(RandomJitter(cfg.jitter, clip=4 * cfg.jitter))
        if cfg.color:
            shared += [ChromaticAutoContrast(p=0.2), ChromaticTranslation(p=0.95, ratio=0.05),
                       ChromaticJitter(p=0.95, std=0.05)]
        self.shared = Compose(shared)

    def __call__(self, data: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if not self.cfg.enabled:
            return data
        cfg = self.cfg
        flip_x, flip_y = bool(rng.random() < cfg.flip), bool(rng.random() < cfg.flip)
        yaw = np.deg2rad(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg)) if cfg.rotate_deg > 0 else 0.0
        if cfg.quarter_turns:
            yaw += int(rng.integers(0, 4)) * np.pi / 2
        scale = float(rng.uniform(*cfg.scale))
        data = similarity(data, float(yaw), scale, flip_x, flip_y)
        return self.shared(data, rng)
