"""ImageRenderModel: posed RGB images -> 2D backbone -> lifted voxel volume -> the point-cloud model's render
head (UNet3D projection, SDF/colour field, NeuS renderer: ``model.render.PonderRenderHead``, reused as is).

Shapes (B scenes, V views of H x W pixels, grid (X, Y, Z) = ``render.grid_shape``, D = ``lift.dim``):

    images (B, V, 3, H, W) in [0, 1], K (B, V, 3, 3), w2c (B, V, 4, 4) world metres, bounds (B, 2, 3) metres
      -> backbone: per stage s (B·V, c_s, H/4·2^-s, W/4·2^-s) -> neck: (B·V, D, ...) per stage
      -> lift (``model.images.lifting``): (B, C_lift, Z, Y, X), C_lift = D [+ D variance] + 1 coverage
      -> head.proj_net (UNet3D): render volume (B, C_out, Z, Y, X) -> head.render / ``render_views``
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.images.backbone import FeatureNeck, ResNet
from model.images.config import ImageModelConfig
from model.images.lifting import LearnedFusion, lift_views
from model.images.volume import cube_from_bounds, unit_to_world, voxel_centres_unit
from model.render.head import PonderRenderHead
from model.render.unit_cube import UnitCube


@dataclass
class LiftedScenes:
    volume: Tensor          # (B, C_lift, Z, Y, X)
    count: Tensor           # (B, Z, Y, X) views that see each voxel
    cubes: list[UnitCube]   # per scene: world metres -> unit cube
    centres: Tensor         # (B, Z·Y·X, 3) voxel centres in world metres


class ImageRenderModel(nn.Module):
    def __init__(self, cfg: ImageModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        b = cfg.backbone
        self.backbone = ResNet(b.depth, b.width, b.stages)
        self.neck = FeatureNeck(self.backbone.channels, cfg.lift.dim)
        self.fusion = LearnedFusion(cfg.lift.dim) if cfg.lift.fusion == "learned" else None
        self.head = PonderRenderHead(cfg.render)

    def lift(self, images: Tensor, K: Tensor, w2c: Tensor, bounds: Tensor) -> LiftedScenes:
        """See the module docstring for the shapes."""
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be (B, V, 3, H, W), got {tuple(images.shape)}")
        n_b, n_v, _, h, w = images.shape
        if K.shape != (n_b, n_v, 3, 3) or w2c.shape != (n_b, n_v, 4, 4) or bounds.shape != (n_b, 2, 3):
            raise ValueError(f"K (B, V, 3, 3), w2c (B, V, 4, 4) and bounds (B, 2, 3) expected for {n_b} scenes of "
                             f"{n_v} views; got {tuple(K.shape)}, {tuple(w2c.shape)}, {tuple(bounds.shape)}")
        maps = self.neck(self.backbone(images.reshape(n_b * n_v, 3, h, w).float()))
        maps = [m.reshape(n_b, n_v, *m.shape[1:]) for m in maps]
        grid_x, grid_y, grid_z = self.cfg.render.grid_shape
        unit = voxel_centres_unit(self.cfg.render.grid_shape, self.cfg.render.field.norm_padding, images.device)
        volumes, counts, cubes, centres = [], [], [], []
        for b in range(n_b):
            cube = cube_from_bounds(bounds[b])
            pts = unit_to_world(cube, unit)
            fused = lift_views([m[b] for m in maps], self.backbone.strides, pts, K[b].float(), w2c[b].float(), w, h,
                               self.fusion)
            chans = [fused.mean] + ([fused.variance] if self.cfg.lift.variance else [])
            chans.append((fused.count.float() / n_v)[:, None])
            feat = torch.cat(chans, 1)  # (Z·Y·X, C_lift)
            volumes.append(feat.T.reshape(-1, grid_z, grid_y, grid_x))
            counts.append(fused.count.reshape(grid_z, grid_y, grid_x))
            cubes.append(cube)
            centres.append(pts)
        return LiftedScenes(torch.stack(volumes), torch.stack(counts), cubes, torch.stack(centres))

    def forward(self, images: Tensor, K: Tensor, w2c: Tensor, bounds: Tensor) -> tuple[Tensor, LiftedScenes]:
        """-> (render volume (B, C_out, Z, Y, X), the lifted scenes)."""
        lifted = self.lift(images, K, w2c, bounds)
        return self.head.proj_net(lifted.volume), lifted
