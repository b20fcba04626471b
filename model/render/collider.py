"""AABBBoxCollider (`scene_colliders.py`), spec §5.9: near/far of each ray against the ±0.55 box."""

from __future__ import annotations

import torch
from torch import Tensor

from model.render.config import ColliderConfig


def collide_aabb(origins: Tensor, directions: Tensor, cfg: ColliderConfig) -> tuple[Tensor, Tensor]:
    """Slab test. origins, directions (R, 3) -> nears, fars (R, 1); rays that miss get near = far = 0.

    1e-6 is added to the direction whatever its sign (as the original), and near is at least ``near_plane``.
    """
    box = cfg.bbox
    inv = 1.0 / (directions + 1e-6)
    t = [((box[a] - origins[:, a:a + 1]) * inv[:, a:a + 1], (box[a + 3] - origins[:, a:a + 1]) * inv[:, a:a + 1])
         for a in range(3)]
    nears = torch.max(torch.cat([torch.minimum(lo, hi) for lo, hi in t], dim=1), dim=1).values
    fars = torch.min(torch.cat([torch.maximum(lo, hi) for lo, hi in t], dim=1), dim=1).values
    nears = torch.clamp(nears, min=cfg.near_plane)
    hit = nears < fars
    nears = torch.where(hit, nears, torch.zeros_like(nears))
    fars = torch.where(hit, fars, torch.zeros_like(fars))
    return nears[:, None], fars[:, None]
