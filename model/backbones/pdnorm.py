"""PDNorm (prompt-driven normalisation) of SpUNet-v1m3: one BatchNorm per dataset condition, modulated
by a context vector. ``shift`` comes first in the modulation output, then ``scale``."""

from __future__ import annotations

import torch
from torch import nn

from model.conditions import condition_index


class PDBatchNorm(nn.Module):
    def __init__(self, num_features: int, context_channels: int = 256,
                 conditions: tuple[str, ...] = ("ScanNet", "S3DIS", "Structured3D"),
                 decouple: bool = True, adaptive: bool = True, affine: bool = True):
        super().__init__()
        self.conditions = tuple(conditions)
        self.decouple, self.adaptive = decouple, adaptive
        if decouple:
            self.bns = nn.ModuleList(nn.BatchNorm1d(num_features, eps=1e-3, momentum=0.01, affine=affine)
                                     for _ in self.conditions)
        else:
            self.bn = nn.BatchNorm1d(num_features, eps=1e-3, momentum=0.01, affine=affine)
        if adaptive:
            self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(context_channels, 2 * num_features, bias=True))

    def condition_index(self, condition: str) -> int:
        """The BN bank of ``condition`` (the backbone's own condition order; model.conditions' one rule)."""
        return condition_index(self.conditions, condition)

    def forward(self, feat: torch.Tensor, condition: str, context: torch.Tensor | None) -> torch.Tensor:
        # feat (N, C); context (1, context_channels)
        h = self.bns[self.condition_index(condition)](feat) if self.decouple else self.bn(feat)
        if self.adaptive:
            if context is None:
                raise ValueError("an adaptive PDNorm backbone needs a context vector")
            shift, scale = self.modulation(context).chunk(2, dim=1)  # (1, C) each
            h = h * (1.0 + scale) + shift
        return h
