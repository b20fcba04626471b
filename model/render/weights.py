"""NeuS alphas and volume-rendering weights (spec §5.10 step 3 and §5.12)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def weights_from_alphas(alphas: Tensor) -> Tensor:
    """(R, S, 1) alphas -> weights α_i · Π_{j<i} (1 - α_j + 1e-7)."""
    transmittance = torch.cumprod(
        torch.cat([torch.ones((*alphas.shape[:1], 1, 1), device=alphas.device, dtype=alphas.dtype),
                   1.0 - alphas + 1e-7], 1), 1)
    return alphas * transmittance[:, :-1, :]


def neus_alpha(sdf: Tensor, gradients: Tensor, directions: Tensor, deltas: Tensor, inv_s: Tensor) -> Tensor:
    """The field's NeuS alpha with cos_anneal_ratio = 1 (nothing anneals it in the original).

    sdf (R, S, 1) at the bin starts, gradients/directions (R, S, 3), deltas (R, S, 1) -> alphas (R, S, 1) in [0, 1].
    """
    true_cos = (directions * gradients).sum(-1, keepdim=True)
    iter_cos = -F.relu(-true_cos)  # always non-positive
    next_sdf = sdf + iter_cos * deltas * 0.5
    prev_sdf = sdf - iter_cos * deltas * 0.5
    prev_cdf = torch.sigmoid(prev_sdf * inv_s)
    next_cdf = torch.sigmoid(next_sdf * inv_s)
    return ((prev_cdf - next_cdf + 1e-5) / (prev_cdf + 1e-5)).clip(0.0, 1.0)


def fixed_inv_s_alpha(sdf: Tensor, deltas: Tensor, inv_s: float) -> Tensor:
    """The sampler's alpha between consecutive samples (``rendering_sdf_with_fixed_inv_s``).

    sdf (R, S), deltas (R, S) -> (R, S - 1); not clipped. The slope used is min(previous, current), in [-1e3, 0].
    """
    prev_sdf, next_sdf = sdf[:, :-1], sdf[:, 1:]
    dist = deltas[:, :-1]
    mid_sdf = (prev_sdf + next_sdf) * 0.5
    cos_val = (next_sdf - prev_sdf) / (dist + 1e-5)
    prev_cos = torch.cat([torch.zeros([sdf.shape[0], 1], device=sdf.device, dtype=sdf.dtype), cos_val[:, :-1]], dim=-1)
    cos_val = torch.min(torch.stack([prev_cos, cos_val], dim=-1), dim=-1).values.clip(-1e3, 0.0)
    prev_esti = mid_sdf - cos_val * dist * 0.5
    next_esti = mid_sdf + cos_val * dist * 0.5
    prev_cdf = torch.sigmoid(prev_esti * inv_s)
    next_cdf = torch.sigmoid(next_esti * inv_s)
    return (prev_cdf - next_cdf + 1e-5) / (prev_cdf + 1e-5)
