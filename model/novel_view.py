"""Novel-view rendering with a pre-training (PonderIndoor-v2) checkpoint: point cloud → render volume → images.

The one place the CLI (``ponder render``), training evaluation and the service turn a scene into views:

    volume = scene_volume(model, config, cloud)          # backbone + UNet3D, once per scene
    views = render_views_of(model, volume, cameras)      # any number of cameras, chunked
    views = render_scene(loaded, cloud, cameras)         # both steps

Cameras are in the cloud's own frame (metres, world-to-camera, OpenCV axes; see ``model.render.cameras``).
The cloud goes through the inference pipeline of ``model.pointcloud.voxelize`` (CenterShift, first point per
voxel, CenterShift without z); the recorded shifts map the cameras into the model's unit cube.
A model's spconv layers keep per-call state: serialise calls on one model (as ``Predictor`` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from model.cancel import CancelToken, active, checkpoint
from model.checkpoint import LoadedModel
from model.config import ModelConfig
from model.pointcloud.cloud import PointCloud
from model.pointcloud.voxelize import center_shift, voxelize
from model.render import Camera, RenderedView, render_views


@dataclass
class SceneVolume:
    volume: Tensor              # (C, Z, Y, X) render volume of the scene
    world_to_unit: np.ndarray   # (4, 4) float64 similarity: the cloud's frame (metres) -> unit cube
    num_voxels: int


def check_renderable(config: ModelConfig, model: nn.Module) -> None:
    if config.kind != "pretrain" or not hasattr(model, "render_head"):
        raise ValueError(f"model {config.name!r} is a {config.kind!r} model; rendering needs a pre-training "
                         "checkpoint (kind 'pretrain') with a render head")
    if model.render_head.renderer.field.rgb_decoder is None:
        raise ValueError(f"model {config.name!r} has no RGB decoder, so it cannot render views")


def resolve_condition(config: ModelConfig, condition: str | None) -> str | None:
    if not config.conditions:
        return None
    if condition in (None, ""):
        return config.default_condition()
    if condition not in config.conditions:
        raise ValueError(f"unknown condition {condition!r}; this model supports {list(config.conditions)}")
    return condition


@torch.no_grad()
def scene_volume(model: nn.Module, config: ModelConfig, cloud: PointCloud, condition: str | None = None) -> SceneVolume:
    """Voxelise the cloud, run the backbone and the projection: the scene's render volume (model in eval mode,
    on the device of its parameters). Checks the active cancel token (model.cancel) between its steps."""
    check_renderable(config, model)
    checkpoint()
    condition = resolve_condition(config, condition)
    device = next(model.parameters()).device
    vox = voxelize(cloud, config.grid_size, config.input_features)
    # The two CenterShifts voxelize applied (same calls, same float32 arithmetic), to place the cameras.
    shifted, first = center_shift(cloud.coord, apply_z=True)
    _, second = center_shift(shifted[vox.kept], apply_z=False)
    pre_shift = first.astype(np.float64) + second.astype(np.float64)
    model.eval()
    feat = torch.from_numpy(vox.feat).to(device)
    grid = torch.from_numpy(vox.grid_coord).to(device)
    coord = torch.from_numpy(vox.coord).to(device)
    batch = torch.zeros(len(feat), dtype=torch.long, device=device)
    features = model.features(feat, grid, batch, condition)  # (M, C)
    checkpoint()
    offsets = torch.tensor([len(feat)], device=device)
    scenes = model.render_head.fit_scenes(coord, offsets)
    volume = model.volume(features, coord, offsets, scenes)[0]  # (C', Z, Y, X)
    return SceneVolume(volume=volume, world_to_unit=scenes[0].cube.world_to_unit(pre_shift),
                       num_voxels=vox.num_voxels)


def render_views_of(model: nn.Module, volume: SceneVolume, cameras: Sequence[Camera],
                    chunk: int = 4096, cancel: CancelToken | None = None) -> list[RenderedView]:
    """Render each camera through a scene volume, ``chunk`` rays at a time (memory is bounded by the chunk).
    ``cancel`` (default: the active token) is checked before every chunk: model.cancel.Cancelled stops it."""
    if not cameras:
        raise ValueError("no cameras to render")
    with active(cancel):  # the renderer calls model.cancel.checkpoint() per chunk
        views = []
        for camera in cameras:
            checkpoint()
            views += render_views(model.render_head.renderer, volume.volume, volume.world_to_unit, [camera], chunk)
        return views


def render_scene(loaded: LoadedModel, cloud: PointCloud, cameras: Sequence[Camera], condition: str | None = None,
                 chunk: int = 4096, device: str | torch.device | None = None) -> list[RenderedView]:
    """Views of ``cloud`` from ``cameras`` with a loaded pre-training checkpoint (moved to ``device`` if given)."""
    model = loaded.model
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA GPU is available")
        model.to(device)
    volume = scene_volume(model, loaded.config, cloud, condition)
    return render_views_of(model, volume, cameras, chunk)
