"""NeuSModel (`render_utils/models/neus.py` + `renderers.py`), spec §5.9–5.13:
collider -> NeuS sampler -> field -> NeuS weights -> accumulated rgb / depth / normal / semantic."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn

from model.cancel import checkpoint
from model.render.collider import collide_aabb
from model.render.config import ColliderConfig, FieldConfig, SamplerConfig
from model.render.field import SDFField
from model.render.samplers import neus_sample
from model.render.trilinear import GridVolume
from model.render.weights import neus_alpha, weights_from_alphas


def accumulate_depth(weights: Tensor, starts: Tensor) -> Tensor:
    """Σ w·t / (Σ w + 1e-10), clipped to the min/max bin start over the **whole chunk** (as the original)."""
    depth = torch.sum(weights * starts, dim=-2) / (torch.sum(weights, -2) + 1e-10)
    return torch.clip(depth, starts.min(), starts.max())


def accumulate_rgb(weights: Tensor, rgb: Tensor, clamp: bool) -> Tensor:
    """Σ w·rgb over a black background; clamped to [0, 1] in eval mode."""
    comp = torch.sum(weights * rgb, dim=-2)
    return comp.clamp(0.0, 1.0) if clamp else comp


class NeuSRenderer(nn.Module):
    """The original's ``renderer``: its only parameters are ``field.*`` (collider and sampler are stateless)."""

    def __init__(self, field: FieldConfig, sampler: SamplerConfig, collider: ColliderConfig):
        super().__init__()
        self.field = SDFField(field)
        self.sampler_cfg = sampler
        self.collider_cfg = collider

    def forward(self, origins: Tensor, directions: Tensor, volume: Tensor | GridVolume, semantic: bool = True,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Render rays (R, 3) in unit-cube coordinates through one scene's volume (C, Z, Y, X).

        Returns rgb (R, 3), depth (R, 1) (distance along the unit ray, unit-cube units), normal (R, 3),
        semantic (R, 512) if asked and available, and per sample weights / sdf (R, S, 1), gradients (R, S, 3),
        z_vals (R, S, 1) = bin starts.
        """
        checkpoint()  # callers render chunk by chunk: a cancelled request (model.cancel) stops here
        grid = volume if isinstance(volume, GridVolume) else GridVolume.from_dense(volume)
        nears, fars = collide_aabb(origins, directions, self.collider_cfg)
        # QUIRK (spec §5.11): the sampler queries the SDF at un-normalised points.
        samples = neus_sample(origins, directions, nears, fars,
                              lambda pts: self.field.get_sdf(pts, grid, sdf_only=True)[0],
                              self.sampler_cfg, self.training, generator)
        dirs = samples.expanded_directions()
        out = self.field(samples.positions(), dirs, grid, semantic=semantic, create_graph=self.training)
        alphas = neus_alpha(out["sdf"], out["gradients"], dirs, samples.deltas,
                            self.field.deviation_network.get_variance())
        weights = weights_from_alphas(alphas)
        starts = samples.starts
        result = {"depth": accumulate_depth(weights, starts), "normal": torch.sum(weights * out["normal"], dim=-2)}
        if "rgb" in out:
            result["rgb"] = accumulate_rgb(weights, out["rgb"], clamp=not self.training)
        if "semantic" in out:
            result["semantic"] = torch.sum(weights * out["semantic"], dim=-2)
        result.update(weights=weights, sdf=out["sdf"], gradients=out["gradients"], z_vals=starts)
        return result

    def render(self, origins: Tensor, directions: Tensor, volume: Tensor, chunk: int, semantic: bool = True,
               generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The original's per-scene ``render_func``: all rays at once in training; in eval, chunks of
        ``chunk`` rays (``val_ray_split``) with detached outputs, so memory stays bounded."""
        if self.training or origins.shape[0] <= chunk:
            out = self(origins, directions, volume, semantic, generator)
            return out if self.training else {k: v.detach() for k, v in out.items()}
        grid = GridVolume.from_dense(volume)
        parts: dict[str, list[Tensor]] = defaultdict(list)
        for o, d in zip(origins.split(chunk, dim=0), directions.split(chunk, dim=0)):
            for k, v in self(o, d, grid, semantic, generator).items():
                parts[k].append(v.detach())
        return {k: torch.cat(v, dim=0) for k, v in parts.items()}
