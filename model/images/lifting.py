"""Lifting per-view 2D feature maps into a voxel volume: project, sample, fuse.

Conventions (those of ``model.render.cameras``): OpenCV camera axes, ``w2c`` world-to-camera in metres,
integer pixel coordinates are pixel centres. A feature map of stride s and size (h, w) covers the image's
first (h·s, w·s) pixels, so image point (u, v) sits at ``grid_sample`` coordinate (align_corners=False)
``x = 2(u + 0.5)/(w·s) - 1``, ``y = 2(v + 0.5)/(h·s) - 1`` — exact when H and W are multiples of s, and the
same formula for every stride (stride 1 reproduces the image's own pixels exactly at pixel centres).

A voxel is *visible* in a view when its centre lies in front of the camera (z > ``NEAR``) and projects inside
the image, [-0.5, W - 0.5) × [-0.5, H - 0.5). Fusion averages the views that see it (masked mean, plus the
masked variance, a photo-consistency cue for surfaces) or weighs them with a small learned score
(``LearnedFusion``, masked softmax). Voxels no view sees get zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NEAR = 1e-3  # metres in front of the camera


def project(points: Tensor, K: Tensor, w2c: Tensor) -> tuple[Tensor, Tensor]:
    """points (P, 3) world metres, K (V, 3, 3), w2c (V, 4, 4) -> pixels (V, P, 2) as (u, v), depth z (V, P)."""
    cam = points @ w2c[:, :3, :3].transpose(1, 2) + w2c[:, None, :3, 3]  # (V, P, 3)
    z = cam[..., 2]
    safe = torch.where(z.abs() < 1e-9, torch.full_like(z, 1e-9), z)
    uv = (cam[..., :2] / safe[..., None]) * torch.stack([K[:, 0, 0], K[:, 1, 1]], -1)[:, None] \
        + torch.stack([K[:, 0, 2], K[:, 1, 2]], -1)[:, None]
    return uv, z


def visible(uv: Tensor, z: Tensor, width: int, height: int) -> Tensor:
    """(V, P) bool: in front of the camera and inside the W x H image."""
    u, v = uv[..., 0], uv[..., 1]
    return (z > NEAR) & (u >= -0.5) & (u < width - 0.5) & (v >= -0.5) & (v < height - 0.5)


def sample_maps(maps: Tensor, uv: Tensor, stride: int) -> Tensor:
    """Bilinear features of maps (V, C, h, w) (stride ``stride``) at pixels uv (V, P, 2) -> (V, P, C)."""
    h, w = maps.shape[-2:]
    grid = torch.stack([2 * (uv[..., 0] + 0.5) / (w * stride) - 1, 2 * (uv[..., 1] + 0.5) / (h * stride) - 1], -1)
    out = F.grid_sample(maps, grid[:, :, None, :].to(maps.dtype), mode="bilinear", padding_mode="border",
                        align_corners=False)  # (V, C, P, 1)
    return out[..., 0].transpose(1, 2)


@dataclass
class Fused:
    mean: Tensor      # (P, C) weighted mean over the views that see each voxel (0 where none does)
    variance: Tensor  # (P, C) weighted variance over those views
    count: Tensor     # (P,) number of views that see each voxel


def fuse_mean(samples: Tensor, mask: Tensor, weights: Tensor | None = None) -> Fused:
    """samples (V, P, C), mask (V, P) bool, optional positive weights (V, P) -> ``Fused``."""
    w = mask.to(samples.dtype) if weights is None else weights * mask.to(samples.dtype)
    total = w.sum(0)  # (P,)
    norm = torch.where(total > 0, total, torch.ones_like(total))[:, None]
    mean = (w[..., None] * samples).sum(0) / norm
    variance = (w[..., None] * (samples - mean[None]) ** 2).sum(0) / norm
    return Fused(mean=mean, variance=variance, count=mask.sum(0))


class LearnedFusion(nn.Module):
    """Per-view scores from (sampled feature, depth in metres): a 2-layer MLP; weights = masked softmax."""

    def __init__(self, dim: int, hidden: int = 16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim + 1, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, samples: Tensor, depth: Tensor, mask: Tensor) -> Fused:
        logits = self.mlp(torch.cat([samples, depth[..., None]], -1))[..., 0]  # (V, P)
        logits = logits.masked_fill(~mask, float("-inf"))
        seen = mask.any(0)
        weights = torch.softmax(torch.where(seen[None], logits, torch.zeros_like(logits)), dim=0)
        return fuse_mean(samples, mask, weights)


def lift_views(maps: list[Tensor], strides: list[int], points: Tensor, K: Tensor, w2c: Tensor, width: int,
               height: int, fusion: LearnedFusion | None = None, chunk: int = 1 << 16) -> Fused:
    """Multi-scale maps (each (V, C, h_s, w_s)) of V views -> features of ``points`` (P, 3) world metres.

    The scales are sampled separately and summed (the maps share one width C). Points are processed
    ``chunk`` at a time so the (V, P, C) temporaries stay bounded.
    """
    parts = []
    for start in range(0, points.shape[0], chunk):
        pts = points[start:start + chunk]
        uv, z = project(pts, K, w2c)
        mask = visible(uv, z, width, height)
        samples = sum(sample_maps(m, uv, s) for m, s in zip(maps, strides))
        parts.append(fuse_mean(samples, mask) if fusion is None else fusion(samples, z, mask))
    return Fused(mean=torch.cat([p.mean for p in parts]), variance=torch.cat([p.variance for p in parts]),
                 count=torch.cat([p.count for p in parts]))
