"""Novel-view rendering with a pre-training (PonderIndoor-v2) checkpoint: point cloud → render volume → images.

The one place the CLI (``ponder render``), training evaluation and the service turn a scene into views:

    volume = scene_volume(model, config, cloud)          # backbone + UNet3D, once per scene
    views = render_views_of(model, volume, cameras)      # any number of cameras, chunked
    views = render_scene(loaded, cloud, cameras)         # both steps

Cameras are in the cloud's own frame (metres, world-to-camera, OpenCV axes; see ``model.render.cameras``).
The cloud goes through the model's input pipeline (``model.prepare``: invalid rows, up axis, CenterShift, first
point per voxel, CenterShift without z); the recorded shift (and the up rotation) map the cameras into the
model's unit cube, so cameras stay in the input's frame whatever ``up`` is.
A model's spconv layers keep per-call state: serialise calls on one model (as ``Predictor`` does).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from model.devices import torch_device
from model.cancel import CancelToken, active, checkpoint
from model.checkpoint import LoadedModel
from model.conditions import resolve_condition
from model.config import ModelConfig
from model.pointcloud.cloud import PointCloud
from model.prepare import InputOptions, prepare
from model.render import Camera, RenderedView, render_views
from model.render.views import ViewDone


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


@torch.no_grad()
def scene_volume(model: nn.Module, config: ModelConfig, cloud: PointCloud, condition: str | None = None,
                 options: InputOptions | None = None) -> SceneVolume:
    """Voxelise the cloud, run the backbone and the projection: the scene's render volume (model in eval mode,
    on the device of its parameters). Checks the active cancel token (model.cancel) between its steps."""
    check_renderable(config, model)
    checkpoint()
    condition = resolve_condition(config.conditions, condition)
    device = next(model.parameters()).device
    prepared, vox = prepare(cloud, config.grid_size, config.input_features, options)
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
    # the model's (z-up) frame -> unit cube; cameras come in world coordinates (world = coord + origin for a
    # georeferenced cloud), so the origin comes off with the CenterShifts, in float64
    origin = np.asarray(prepared.cloud.origin, dtype=np.float64)
    world_to_unit = scenes[0].cube.world_to_unit(np.asarray(vox.shift, dtype=np.float64) + origin)
    return in_input_frame(SceneVolume(volume=volume, world_to_unit=world_to_unit, num_voxels=vox.num_voxels),
                          prepared.rotation)


def in_input_frame(volume: SceneVolume, rotation: np.ndarray | None) -> SceneVolume:
    """The volume addressed from the input's frame, for a cloud that ``model.prepare`` rotated into z-up with
    ``rotation`` (``coord_model = R @ coord_input``): cameras given in the input's frame then render the same
    views whatever its up axis. The service prepares clouds before the model thread and uses this directly."""
    if rotation is None:
        return volume
    to_model = np.eye(4)
    to_model[:3, :3] = rotation
    return replace(volume, world_to_unit=volume.world_to_unit @ to_model)


def render_views_of(model: nn.Module, volume: SceneVolume, cameras: Sequence[Camera], chunk: int = 4096,
                    cancel: CancelToken | None = None, on_view: ViewDone | None = None) -> list[RenderedView]:
    """Render each camera through a scene volume, ``chunk`` rays at a time (memory is bounded by the chunk).
    ``cancel`` (default: the active token) is checked before every chunk: model.cancel.Cancelled stops it.
    ``on_view(i, view)`` runs as each view is done."""
    if not cameras:
        raise ValueError("no cameras to render")
    with active(cancel):  # the renderer calls model.cancel.checkpoint() per chunk
        views = []
        for i, camera in enumerate(cameras):
            checkpoint()
            views += render_views(model.render_head.renderer, volume.volume, volume.world_to_unit, [camera], chunk)
            if on_view is not None:
                on_view(i, views[-1])
        return views


def render_scene(loaded: LoadedModel, cloud: PointCloud, cameras: Sequence[Camera], condition: str | None = None,
                 chunk: int = 4096, device: str | torch.device | None = None,
                 options: InputOptions | None = None, on_view: ViewDone | None = None) -> list[RenderedView]:
    """Views of ``cloud`` from ``cameras`` with a loaded pre-training checkpoint (moved to ``device`` if given);
    ``on_view(i, view)`` runs as each view is done."""
    model = loaded.inference_model  # no spconv: the engine-backed module tree, same weights
    if device is not None:
        model.to(torch_device(device))
    volume = scene_volume(model, loaded.config, cloud, condition, options)
    return render_views_of(model, volume, cameras, chunk, on_view=on_view)
