"""Camera rays and training-ray sampling (spec §5.14, §5.15).

Cameras follow OpenCV: x right, y down, z forward; a pixel (x, y) sits at integer coordinates (no +0.5).
Extrinsics are world-to-camera.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def get_rays(height: int, width: int, K: Tensor, w2c: Tensor) -> tuple[Tensor, Tensor]:
    """Origins and unit directions (H, W, 3) of every pixel, indexed [y, x], in the world of ``w2c``."""
    R = w2c[:3, :3].float()
    T = w2c[:3, 3].float()[:, None]
    pose = torch.eye(4, device=R.device).float()
    pose[:3, :4] = torch.cat([R, T], dim=1)
    pose = torch.linalg.inv(pose)  # camera-to-world
    tx = torch.linspace(0, width - 1, width, device=pose.device)
    ty = torch.linspace(0, height - 1, height, device=pose.device)
    pixels_x, pixels_y = torch.meshgrid(tx, ty, indexing="ij")
    p = torch.stack([pixels_x, pixels_y, torch.ones_like(pixels_y)], dim=-1)  # (W, H, 3)
    p = torch.matmul(torch.linalg.inv(K.float())[None, None, :, :], p[:, :, :, None])[..., 0]
    rays_v = p / torch.linalg.norm(p, ord=2, dim=-1, keepdim=True)
    rays_v = torch.matmul(pose[None, None, :3, :3], rays_v[:, :, :, None])[..., 0]
    rays_o = pose[None, None, :3, 3].expand(rays_v.shape)
    return rays_o.transpose(0, 1), F.normalize(rays_v, dim=-1).transpose(0, 1)


def mask_at_box(origins: np.ndarray, directions: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Rays (sharing the first ray's origin) that cross the box [lo, hi]³ beyond distance 0.1. (R,) bool."""
    viewdir = directions / np.linalg.norm(directions, axis=-1, keepdims=True)
    viewdir[(viewdir < 1e-5) & (viewdir > -1e-10)] = 1e-5
    viewdir[(viewdir > -1e-5) & (viewdir < 1e-10)] = -1e-5
    inv_dir = 1.0 / viewdir
    tmin = ([[lo] * 3] - origins[:1]) * inv_dir
    tmax = ([[hi] * 3] - origins[:1]) * inv_dir
    near = np.maximum(np.max(np.minimum(tmin, tmax), axis=-1), 0.1)
    far = np.min(np.maximum(tmin, tmax), axis=-1)
    return near < far


def plane_to_ray_depth(depth: Tensor, directions: Tensor, origin: Tensor, w2c: Tensor) -> Tensor:
    """z-depth -> distance along each unit ray: divide by the cosine to the camera's optical axis."""
    c2w = torch.linalg.inv(w2c)
    axis = (c2w @ torch.tensor([0.0, 0.0, 1.0, 1.0], device=w2c.device)[:, None])[:3, 0] - origin
    axis = axis / torch.linalg.norm(axis)
    return depth / (directions @ axis)


@dataclass
class TrainingRays:
    """Rays of a batch (spec §5.15 step 8): origins/directions (B, V·n, 3) in unit-cube coordinates;
    targets flattened in (b, v, ray) order: rgb (B·V·n, 3), depth (B·V·n, 1) (unit-cube ray distance, -0.001
    where the ray misses the box), semantic (B·V·n, D) or None."""

    origins: Tensor
    directions: Tensor
    rgb: Tensor
    depth: Tensor
    semantic: Tensor | None = None


@torch.no_grad()
def sample_training_rays(rgb: Tensor, depth: Tensor, intrinsic: Tensor, extrinsic: Tensor, depth_scale: Tensor,
                         ray_nsample: int, bounds: tuple[float, float] = (-0.55, 0.55),
                         semantic: Tensor | None = None, index2semantic: Tensor | None = None,
                         plane_to_ray: bool = True, generator: torch.Generator | None = None) -> TrainingRays:
    """The original's ``ray_sample``: ``ray_nsample`` random valid-depth pixels per view.

    rgb (B, V, H, W, 3) in [0, 1]; depth (B, V, H, W) sensor units; intrinsic (B, V, 3|4, 3|4) or (B, 3|4, 3|4);
    extrinsic (B, V, 4, 4) world-to-camera **after** ``UnitCube.transform_extrinsics``; depth_scale (B,) after
    ``to_unit_cube`` (sensor units -> unit cube). semantic (B, V, H, W) labels (-1 = none) with
    index2semantic (L, D) target embeddings in label order: label 0 gets a zero target (QUIRK).
    ``plane_to_ray=False`` keeps z-depth as the ray distance (the code before commit bd8cda8).
    """
    if (semantic is None) != (index2semantic is None):
        raise ValueError("semantic labels and index2semantic must be given together")
    if rgb.dim() != 5 or rgb.shape[-1] != 3 or depth.shape != rgb.shape[:4]:
        raise ValueError(f"rgb must be (B, V, H, W, 3) and depth (B, V, H, W); got {tuple(rgb.shape)}, "
                         f"{tuple(depth.shape)}")
    if intrinsic.dim() not in (3, 4) or intrinsic.shape[0] != rgb.shape[0]:
        raise ValueError(f"intrinsic must be (B, V, 3|4, 3|4) or (B, 3|4, 3|4), got {tuple(intrinsic.shape)}")
    if extrinsic.shape != (*rgb.shape[:2], 4, 4):
        raise ValueError(f"extrinsic must be (B, V, 4, 4), got {tuple(extrinsic.shape)}")
    colors, depths = rgb.float(), depth.float()
    intrinsic, extrinsic, depth_scale = intrinsic.float(), extrinsic.float(), depth_scale.float()
    out: dict[str, list[Tensor]] = {"ray_o": [], "ray_d": [], "rgb": [], "depth": [], "semantic": []}
    for b in range(colors.shape[0]):
        per_view: dict[str, list[Tensor]] = {k: [] for k in out}
        for v in range(colors.shape[1]):
            mask = depths[b, v] > 0
            d_img = depths[b, v] * mask
            K = intrinsic[b][:3, :3] if intrinsic[b].dim() == 2 else intrinsic[b, v, :3, :3]
            w2c = extrinsic[b, v]
            ray_o, ray_d = get_rays(d_img.shape[0], d_img.shape[1], K, w2c)
            py, px = torch.where(mask)
            if len(px) < ray_nsample:
                raise ValueError(f"scene {b} view {v} has {len(px)} pixels with depth, fewer than "
                                 f"ray_nsample={ray_nsample}")
            keep = torch.randperm(len(px), generator=generator)[:ray_nsample].to(px.device)
            px, py = px[keep], py[keep]
            color = colors[b, v][py, px, :]
            dist = d_img[py, px] * depth_scale[b]
            o, d = ray_o[py, px, :], ray_d[py, px, :]
            if plane_to_ray:
                dist = plane_to_ray_depth(dist, d, o[0], w2c)
            inside = torch.from_numpy(mask_at_box(o.cpu().numpy(), d.cpu().numpy(), *bounds)).to(o.device)
            color[~inside, :] = 0.0
            dist[~inside] = -0.001
            per_view["ray_o"].append(o)
            per_view["ray_d"].append(d)
            per_view["rgb"].append(color)
            per_view["depth"].append(dist)
            if semantic is not None:
                labels = semantic[b, v][py, px].clone()
                labels[~inside] = -1
                if labels.max() >= index2semantic.shape[0]:
                    raise ValueError(f"semantic label {int(labels.max())} has no embedding "
                                     f"(only {index2semantic.shape[0]} classes)")
                target = torch.zeros(*labels.shape, index2semantic.shape[-1], device=labels.device)
                target[labels > 0] = index2semantic[labels[labels > 0].long()].float()
                per_view["semantic"].append(target)
        for k, items in per_view.items():
            if items:
                out[k].append(torch.stack(items, dim=0))
    n_scenes, n_views = colors.shape[:2]
    stack = {k: torch.stack(v, dim=0) for k, v in out.items() if v}  # (B, V, n, ...)
    return TrainingRays(
        origins=stack["ray_o"].view(n_scenes, -1, 3), directions=stack["ray_d"].view(n_scenes, -1, 3),
        rgb=stack["rgb"].view(-1, 3), depth=stack["depth"].view(-1, 1),
        semantic=stack["semantic"].view(-1, stack["semantic"].shape[-1]) if "semantic" in stack else None)
