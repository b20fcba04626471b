"""SDFField (`render_utils/fields/sdf_field.py`), spec §5.8: features sampled from the render volume are
decoded into an SDF (plus geometry features), colour and a 512-d semantic embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.render.config import FieldConfig
from model.render.decoders import rgb_decoder, sdf_decoder, semantic_decoder
from model.render.trilinear import GridVolume, sample


def normalize_3d_coordinate(p: Tensor, padding: float = 0.1) -> Tensor:
    """Unit-cube points -> [0, 1): p / 1.101 + 0.5, values >= 1 set to 0.999 and < 0 set to 0."""
    p_nor = p / (1 + padding + 10e-4) + 0.5
    p_nor = torch.where(p_nor >= 1, torch.full_like(p_nor, 1 - 10e-4), p_nor)
    return torch.where(p_nor < 0, torch.zeros_like(p_nor), p_nor)


class LaplaceDensity(nn.Module):
    """VolSDF density; kept for the checkpoint layout (NeuS weights do not use it)."""

    def __init__(self, init_val: float, beta_min: float = 0.0001):
        super().__init__()
        self.register_parameter("beta_min", nn.Parameter(beta_min * torch.ones(1), requires_grad=False))
        self.register_parameter("beta", nn.Parameter(init_val * torch.ones(1), requires_grad=True))

    def get_beta(self) -> Tensor:
        return self.beta.abs() + self.beta_min

    def forward(self, sdf: Tensor) -> Tensor:
        beta = self.get_beta()
        return (1.0 / beta) * (0.5 + 0.5 * sdf.sign() * torch.expm1(-sdf.abs() / beta))


class SingleVarianceNetwork(nn.Module):
    """NeuS' learned sharpness: inv_s = clip(exp(10 · variance), 1e-6, 1e6)."""

    def __init__(self, init_val: float):
        super().__init__()
        self.register_parameter("variance", nn.Parameter(init_val * torch.ones(1), requires_grad=True))

    def get_variance(self) -> Tensor:
        return torch.exp(self.variance * 10.0).clip(1e-6, 1e6)


class SDFField(nn.Module):
    def __init__(self, cfg: FieldConfig):
        super().__init__()
        self.cfg = cfg
        self.sdf_decoder = sdf_decoder(cfg.sdf_decoder)
        self.rgb_decoder = rgb_decoder(cfg.rgb_decoder) if cfg.rgb_decoder is not None else None
        self.semantic_decoder = semantic_decoder(cfg.semantic_decoder) if cfg.semantic_decoder is not None else None
        self.laplace_density = LaplaceDensity(cfg.beta_init)
        self.deviation_network = SingleVarianceNetwork(cfg.beta_init)

    def get_sdf(self, points: Tensor, volume: GridVolume, sdf_only: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """SDF (..., 1), geometry features and sampled features at ``points`` in grid units ([0, 1] inside).

        Points are used as given: the field normalises before calling, the importance sampler does not
        (spec §5.11). With ``sdf_only`` only the channels the SDF decoder reads are sampled.
        """
        sliced = sdf_only and not self.cfg.share_volume
        if sliced:
            volume = volume.channel_slice((volume.channels + 1) // 2)
        feats = sample(volume, points)
        sdf_in = feats if self.cfg.share_volume or sliced else torch.chunk(feats, 2, dim=-1)[0]
        h = self.sdf_decoder(points, sdf_in)
        return h[..., :1], h[..., 1:], feats

    def forward(self, positions: Tensor, directions: Tensor, volume: GridVolume, semantic: bool = True,
                create_graph: bool = False) -> dict[str, Tensor]:
        """Evaluate the field at sample positions (R, S, 3) (unit cube) seen along ``directions`` (R, S, 3).

        ``gradients`` is d sdf / d (normalised point); ``create_graph`` keeps it differentiable (training).
        """
        points = normalize_3d_coordinate(positions, self.cfg.norm_padding) if self.cfg.norm_pts else positions
        points = points.detach().requires_grad_(True)
        keep_graph = create_graph or torch.is_grad_enabled()  # the caller may still backpropagate through sdf
        with torch.enable_grad():
            sdf, geo, feats = self.get_sdf(points, volume)
            gradients = torch.autograd.grad(sdf, points, torch.ones_like(sdf), create_graph=create_graph,
                                            retain_graph=keep_graph)[0]
        color_feats = feats if self.cfg.share_volume else torch.chunk(feats, 2, dim=-1)[1]
        inputs = ([gradients] if self.cfg.use_gradient else []) + [color_feats, geo, directions]
        out = {"sdf": sdf, "gradients": gradients, "normal": F.normalize(gradients, dim=-1)}
        if self.rgb_decoder is not None:
            out["rgb"] = self.rgb_decoder(points, torch.cat(inputs, dim=-1))
        if semantic and self.semantic_decoder is not None:
            out["semantic"] = self.semantic_decoder(points, torch.cat(inputs[:-1], dim=-1))
        return out
