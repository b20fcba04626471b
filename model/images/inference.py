"""Inference from posed images: per-voxel features with their centres, and rendered novel views.

    views, bounds = read_image_folder(folder, cameras_json)
    result = image_features(model, views, bounds)          # voxels seen by at least one view
    rendered = render_from_images(model, views, cameras, bounds)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from model.images.inputs import PosedImages, check_coverage, estimate_bounds
from model.images.model import ImageRenderModel
from model.images.volume import unit_to_world, voxel_centres_unit
from model.render.cameras import Camera
from model.render.views import RenderedView, ViewDone, render_views


@dataclass
class ImageFeatures:
    features: np.ndarray       # (M, C_out) float32 render-volume features of the voxels some view sees
    centres: np.ndarray        # (M, 3) float32 voxel centres, world metres
    views_seeing: np.ndarray   # (M,) int32 how many input views see each voxel
    grid_index: np.ndarray     # (M, 3) int32 (x, y, z) index in the (X, Y, Z) grid
    grid_shape: tuple[int, int, int]
    world_to_unit: np.ndarray  # (4, 4) float64 similarity world metres -> the renderer's unit cube
    bounds: np.ndarray         # (2, 3) the lifted box, metres

    def arrays(self) -> dict[str, np.ndarray]:
        return {"features": self.features, "centres": self.centres, "views_seeing": self.views_seeing,
                "grid_index": self.grid_index, "lifted_grid_shape": np.asarray(self.grid_shape, dtype=np.int32),
                "world_to_unit": self.world_to_unit, "bounds": self.bounds}


def _device(model: ImageRenderModel) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def scene_volume_from_images(model: ImageRenderModel, views: PosedImages, bounds: np.ndarray | None = None):
    """(render volume (C, Z, Y, X), lifted scene, bounds) after the coverage check."""
    device = _device(model)
    bounds = estimate_bounds(views.cameras) if bounds is None else np.asarray(bounds, dtype=np.float64)
    b = torch.tensor(bounds, dtype=torch.float32, device=device)
    from model.images.volume import cube_from_bounds

    cube = cube_from_bounds(b)
    unit = voxel_centres_unit(model.cfg.render.grid_shape, model.cfg.render.field.norm_padding, device)
    check_coverage(unit_to_world(cube, unit), views)
    model.eval()
    images, K, w2c = views.tensors(device)
    volume, lifted = ImageRenderModel.forward(model, images, K, w2c, b[None])  # subclasses (training) too
    return volume[0], lifted, bounds


def image_features(model: ImageRenderModel, views: PosedImages, bounds: np.ndarray | None = None) -> ImageFeatures:
    volume, lifted, bounds = scene_volume_from_images(model, views, bounds)
    gx, gy, gz = model.cfg.render.grid_shape
    count = lifted.count[0].reshape(-1)
    keep = torch.nonzero(count > 0)[:, 0]
    feats = volume.permute(1, 2, 3, 0).reshape(-1, volume.shape[0])[keep]
    zi, rem = keep // (gy * gx), keep % (gy * gx)
    index = torch.stack([rem % gx, rem // gx, zi], 1)
    return ImageFeatures(features=feats.cpu().numpy().astype(np.float32),
                         centres=lifted.centres[0][keep].cpu().numpy().astype(np.float32),
                         views_seeing=count[keep].cpu().numpy().astype(np.int32),
                         grid_index=index.cpu().numpy().astype(np.int32), grid_shape=(gx, gy, gz),
                         world_to_unit=lifted.cubes[0].world_to_unit(), bounds=bounds)


def render_from_images(model: ImageRenderModel, views: PosedImages, cameras: Sequence[Camera],
                       bounds: np.ndarray | None = None, chunk: int = 4096,
                       on_view: ViewDone | None = None) -> list[RenderedView]:
    """Novel views (colour + metric z-depth) of the scene the images show, from ``cameras`` (world metres);
    ``on_view(i, view)`` runs as each view is done."""
    volume, lifted, _ = scene_volume_from_images(model, views, bounds)
    return render_views(model.head.renderer, volume, lifted.cubes[0].world_to_unit(), cameras, chunk, on_view)
