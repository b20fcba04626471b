"""Ray samplers (`ray_samplers.py`), spec §5.10–5.11: uniform, PDF, and the NeuS sampler chaining them.

A set of samples is described by its bin edges in "spacing" units ([0, 1] between the ray's near and far);
the Euclidean edges are ``s·far + (1 - s)·near``, sample i spans [edge_i, edge_{i+1}) and is evaluated at
its start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from model.render.config import SamplerConfig
from model.render.weights import fixed_inv_s_alpha, weights_from_alphas


@dataclass
class RaySamples:
    origins: Tensor  # (R, 3)
    directions: Tensor  # (R, 3)
    nears: Tensor  # (R, 1)
    fars: Tensor  # (R, 1)
    edges: Tensor  # (R, S + 1), spacing units

    def __post_init__(self) -> None:
        self.euclidean = self.edges * self.fars + (1 - self.edges) * self.nears  # (R, S + 1)

    @property
    def starts(self) -> Tensor:  # (R, S, 1)
        return self.euclidean[..., :-1, None]

    @property
    def deltas(self) -> Tensor:  # (R, S, 1)
        return self.euclidean[..., 1:, None] - self.euclidean[..., :-1, None]

    def positions(self) -> Tensor:
        """Start positions (R, S, 3)."""
        return self.origins[..., None, :] + self.directions[..., None, :] * self.starts

    def expanded_directions(self) -> Tensor:  # (R, S, 3)
        return self.directions[..., None, :].expand(*self.starts.shape[:-1], 3)

    def with_edges(self, edges: Tensor) -> "RaySamples":
        return RaySamples(self.origins, self.directions, self.nears, self.fars, edges)


def uniform_edges(num_rays: int, num_samples: int, jitter: bool, single_jitter: bool, device: torch.device,
                  generator: torch.Generator | None = None) -> Tensor:
    """(R, n + 1) edges at linspace(0, 1); with ``jitter`` each edge moves uniformly within its half-bins."""
    bins = torch.linspace(0.0, 1.0, num_samples + 1, device=device).expand(size=(num_rays, -1))
    if jitter:
        shape = (num_rays, 1) if single_jitter else (num_rays, num_samples + 1)
        t_rand = torch.rand(shape, dtype=bins.dtype, device=device, generator=generator)
        centers = (bins[..., 1:] + bins[..., :-1]) / 2.0
        upper = torch.cat([centers, bins[..., -1:]], -1)
        lower = torch.cat([bins[..., :1], centers], -1)
        bins = lower + (upper - lower) * t_rand
    return bins


def pdf_edges(edges: Tensor, weights: Tensor, num_samples: int, jitter: bool, single_jitter: bool,
              generator: torch.Generator | None = None, eps: float = 1e-5) -> Tensor:
    """Inverse-CDF sampling of ``num_samples + 1`` new edges from per-bin weights (R, S, 1) over ``edges``."""
    num_bins = num_samples + 1
    w = weights[..., 0]
    w_sum = torch.sum(w, dim=-1, keepdim=True)
    padding = torch.relu(eps - w_sum)  # rays with no weight get a flat pdf instead of NaNs
    w = w + padding / w.shape[-1]
    w_sum = w_sum + padding
    cdf = torch.min(torch.ones_like(w), torch.cumsum(w / w_sum, dim=-1))
    cdf = torch.cat([torch.zeros_like(cdf[..., :1]), cdf], dim=-1)
    u = torch.linspace(0.0, 1.0 - (1.0 / num_bins), steps=num_bins, device=cdf.device)
    if jitter:
        u = u.expand(size=(*cdf.shape[:-1], num_bins))
        shape = (*cdf.shape[:-1], 1) if single_jitter else (*cdf.shape[:-1], num_bins)
        u = u + torch.rand(shape, device=cdf.device, generator=generator) / num_bins
    else:
        u = (u + 1.0 / (2 * num_bins)).expand(size=(*cdf.shape[:-1], num_bins))
    u = u.contiguous()
    inds = torch.searchsorted(cdf, u, right=True)
    below = torch.clamp(inds - 1, 0, edges.shape[-1] - 1)
    above = torch.clamp(inds, 0, edges.shape[-1] - 1)
    cdf_g0, cdf_g1 = torch.gather(cdf, -1, below), torch.gather(cdf, -1, above)
    bins_g0, bins_g1 = torch.gather(edges, -1, below), torch.gather(edges, -1, above)
    denom = cdf_g1 - cdf_g0
    denom = torch.where(denom < 1e-5, torch.ones_like(denom), denom)
    t = torch.clip((u - cdf_g0) / denom, 0, 1)
    return (bins_g0 + t * (bins_g1 - bins_g0)).detach()


def merge_edges(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted union of two sample sets' starts, closed by the larger last edge; also the sort index."""
    ends = torch.maximum(a[..., -1:], b[..., -1:])
    starts, order = torch.sort(torch.cat([a[..., :-1], b[..., :-1]], -1), -1)
    return torch.cat([starts, ends], dim=-1).detach(), order


SdfFn = Callable[[Tensor], Tensor]  # (R, S, 3) unit-cube positions -> (R, S, 1) sdf


def neus_sample(origins: Tensor, directions: Tensor, nears: Tensor, fars: Tensor, sdf_fn: SdfFn,
                cfg: SamplerConfig, training: bool, generator: torch.Generator | None = None) -> RaySamples:
    """Uniform samples, then ``num_upsample_steps`` rounds of PDF upsampling with the fixed-variance NeuS
    weights (inv_s = base_variance · 2^step); returns the merged samples (96 + 36 = 132 by default)."""
    jitter = cfg.train_stratified and training
    samples = RaySamples(origins, directions, nears, fars,
                         uniform_edges(origins.shape[0], cfg.num_samples, jitter, cfg.single_jitter,
                                       origins.device, generator))
    new, sdf, order = samples, None, None
    for step in range(cfg.num_upsample_steps):
        with torch.no_grad():
            new_sdf = sdf_fn(new.positions())
        if order is not None:
            sdf = torch.gather(torch.cat([sdf.squeeze(-1), new_sdf.squeeze(-1)], -1), 1, order).unsqueeze(-1)
        else:
            sdf = new_sdf
        alphas = fixed_inv_s_alpha(sdf.squeeze(-1), samples.deltas[..., 0], cfg.base_variance * 2**step)
        weights = weights_from_alphas(alphas.unsqueeze(-1))
        weights = torch.cat((weights, torch.zeros_like(weights[:, :1])), dim=1)  # (R, S, 1)
        new = samples.with_edges(pdf_edges(samples.edges, weights,
                                           cfg.num_samples_importance // cfg.num_upsample_steps,
                                           jitter, cfg.single_jitter, generator))
        merged, order = merge_edges(samples.edges, new.edges)
        samples = samples.with_edges(merged)
    return samples
