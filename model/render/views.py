"""Novel-view rendering of a scene's render volume for the serving API."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from model.render.cameras import Camera, CameraError
from model.render.collider import collide_aabb
from model.render.rays import get_rays
from model.render.renderer import NeuSRenderer
from model.render.trilinear import GridVolume


@dataclass
class RenderedView:
    rgb: Tensor  # (H, W, 3) float32 in [0, 1]; black where the ray misses the scene box
    depth: Tensor  # (H, W) float32 z-depth in metres along the camera's optical axis; 0 where it misses
    hit: Tensor  # (H, W) bool, the ray crosses the renderer's ±0.55 unit-cube box


def similarity_scale(world_to_unit: np.ndarray) -> float:
    """The uniform scale of a similarity transform (unit-cube units per metre); errors if not a similarity."""
    m = np.asarray(world_to_unit, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)) or not np.allclose(m[3], (0, 0, 0, 1)):
        raise ValueError("world_to_unit must be a finite 4x4 affine matrix")
    a = m[:3, :3]
    gram = a.T @ a
    scale2 = float(np.trace(gram) / 3)
    if scale2 <= 0 or not np.allclose(gram, scale2 * np.eye(3), rtol=1e-4, atol=1e-8 * scale2):
        raise ValueError("world_to_unit must be a similarity (rotation and uniform scale)")
    return float(np.sqrt(scale2))


ViewDone = Callable[[int, "RenderedView"], None]  # (index of the camera, its view): called as each view is done


@torch.no_grad()
def render_views(renderer: NeuSRenderer, volume: Tensor, world_to_unit: np.ndarray, cameras: Sequence[Camera],
                 chunk: int = 4096, on_view: ViewDone | None = None) -> list[RenderedView]:
    """Render one scene from each camera.

    volume: the scene's render volume (C, Z, Y, X) (``proj_net`` output). world_to_unit: the 4x4 similarity
    from the cameras' world frame (metres) to the unit cube, e.g. ``UnitCube.world_to_unit(pre_shift)``.
    Rays are rendered ``chunk`` at a time without keeping graphs (the field differentiates the SDF locally),
    so memory is bounded by the chunk. The rendered unit-cube ray distance t becomes metric z-depth as
    t / scale · cos(angle to the optical axis). ``on_view(i, view)`` runs as each view is done (a caller
    writes it and shows progress, so a long run keeps what it finished).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    if volume.dim() != 4:
        raise ValueError(f"volume must be (C, Z, Y, X), got shape {tuple(volume.shape)}")
    if renderer.field.rgb_decoder is None:
        raise ValueError("this render head has no RGB decoder, so it cannot render views")
    scale = similarity_scale(world_to_unit)
    unit_to_world = np.linalg.inv(np.asarray(world_to_unit, dtype=np.float64))
    device = volume.device
    grid = GridVolume.from_dense(volume)
    was_training = renderer.training
    renderer.eval()
    try:
        views = []
        for i, cam in enumerate(cameras):
            if not isinstance(cam, Camera):
                raise CameraError(f"camera {i} is a {type(cam).__name__}, not a Camera")
            h, w = int(cam.height), int(cam.width)
            w2c_unit = torch.from_numpy(cam.w2c @ unit_to_world).float().to(device)
            origins, dirs = get_rays(h, w, torch.from_numpy(cam.K).float().to(device), w2c_unit)
            origins, dirs = origins.reshape(-1, 3), dirs.reshape(-1, 3)
            rgb = torch.zeros((h * w, 3), device=device)
            t = torch.zeros((h * w,), device=device)
            for start in range(0, h * w, chunk):
                sl = slice(start, min(start + chunk, h * w))
                out = renderer(origins[sl], dirs[sl], grid, semantic=False)
                rgb[sl] = out["rgb"]
                t[sl] = out["depth"][:, 0]
            hit = collide_aabb(origins, dirs, renderer.collider_cfg)[1][:, 0] > 0
            xs, ys = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
            cam_dirs = np.stack([xs, ys, np.ones_like(xs)], -1) @ np.linalg.inv(cam.K).T  # (H, W, 3), z = 1
            cos = torch.from_numpy(1.0 / np.linalg.norm(cam_dirs, axis=-1)).float().to(device).reshape(-1)
            depth = torch.where(hit, t / scale * cos, torch.zeros_like(t))
            rgb = torch.where(hit[:, None], rgb, torch.zeros_like(rgb))
            views.append(RenderedView(rgb=rgb.reshape(h, w, 3), depth=depth.reshape(h, w), hit=hit.reshape(h, w)))
            if on_view is not None:
                on_view(i, views[-1])
        return views
    finally:
        renderer.train(was_training)
