"""PonderRenderHead: everything of PonderIndoor-v2 below the sparse backbone.

Its parameters are exactly the original's ``proj_net.*`` and ``renderer.field.*``; a full model keeps
checkpoint compatibility by registering ``head.proj_net`` and ``head.renderer`` under those names.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from model.render.config import RenderHeadConfig
from model.render.dense import grid_resolution, to_dense
from model.render.losses import render_losses
from model.render.rays import TrainingRays
from model.render.renderer import NeuSRenderer
from model.render.unet3d import UNet3D
from model.render.unit_cube import UnitCubeScene, to_unit_cube

HEAD_PREFIXES = ("proj_net.", "renderer.")


def head_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The ``proj_net.*`` and ``renderer.*`` entries of a full checkpoint state_dict, ``module.`` removed."""
    out = {}
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key.startswith(HEAD_PREFIXES):
            out[key] = value
    return out


def split_offsets(offsets: Sequence[int] | Tensor) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for end in (int(o) for o in offsets):
        if end < start:
            raise ValueError(f"offsets must be non-decreasing cumulative counts, got {list(offsets)}")
        bounds.append((start, end))
        start = end
    return bounds


class PonderRenderHead(nn.Module):
    def __init__(self, cfg: RenderHeadConfig):
        super().__init__()
        self.cfg = cfg
        self.proj_net = UNet3D(cfg.projection)
        self.renderer = NeuSRenderer(cfg.field, cfg.sampler, cfg.collider)

    @staticmethod
    def fit_scenes(coord: Tensor, offsets: Sequence[int] | Tensor) -> list[UnitCubeScene]:
        """``to_unit_cube`` per scene; coord (N, 3) metres as fed to the backbone, offsets cumulative (B,)."""
        return [to_unit_cube(coord[s:e]) for s, e in split_offsets(offsets)]

    def densify(self, backbone_feat: Tensor, scenes: Sequence[UnitCubeScene],
                offsets: Sequence[int] | Tensor) -> Tensor:
        """Backbone features (N, C_in) -> pooled dense grid (B, C_in, Z, Y, X)."""
        coord = torch.cat([s.coord for s in scenes])
        _, resolution = grid_resolution(torch.stack([s.bbox for s in scenes]), self.cfg.grid_size)
        return to_dense(coord, backbone_feat, offsets, resolution, self.cfg.grid_shape, self.cfg.grid_size)

    def forward(self, backbone_feat: Tensor, coord: Tensor, offsets: Sequence[int] | Tensor,
                scenes: Sequence[UnitCubeScene] | None = None) -> Tensor:
        """Render volume (B, C_out, Z, Y, X) of each scene. Pass ``scenes`` (from ``fit_scenes``) when the
        caller already fitted them for its cameras."""
        if backbone_feat.shape[0] != coord.shape[0]:
            raise ValueError(f"{backbone_feat.shape[0]} feature rows for {coord.shape[0]} points")
        if backbone_feat.shape[1] != self.cfg.projection.in_channels:
            raise ValueError(f"backbone features have {backbone_feat.shape[1]} channels; the projection "
                             f"expects {self.cfg.projection.in_channels}")
        scenes = self.fit_scenes(coord, offsets) if scenes is None else scenes
        return self.proj_net(self.densify(backbone_feat, scenes, offsets))

    def render(self, volume: Tensor, origins: Tensor, directions: Tensor, semantic: bool = True,
               generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The original's ``render_func``: per scene b, rays (B, R, 3) through ``volume[b]``; outputs are
        concatenated over scenes (B·R, ...). Eval mode renders ``val_ray_split`` rays at a time."""
        parts = [self.renderer.render(origins[b], directions[b], volume[b], self.cfg.val_ray_split, semantic,
                                      generator) for b in range(volume.shape[0])]
        return {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}

    def losses(self, pred: Mapping[str, Tensor], rays: TrainingRays) -> dict[str, Tensor]:
        target = {"depth": rays.depth, "rgb": rays.rgb}
        if rays.semantic is not None:
            target["semantic"] = rays.semantic
        return render_losses(pred, target, self.cfg.loss)
