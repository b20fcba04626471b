"""The field's decoder MLPs (`render_utils/decoders.py`), spec §5.8.

x = points_factor · fc_p(points); for each layer l: x = lin_l(x + fc_c[l](feat)), activation between layers.
Registration order is part of the checkpoint layout: ``lin*`` first, then ``fc_c`` before ``fc_p`` for the
SDF decoder but ``fc_p`` before ``fc_c`` for the RGB and semantic decoders.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.render.config import DecoderConfig


class FieldDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, activation: nn.Module, fc_p_first: bool, sigmoid_output: bool = False):
        super().__init__()
        dims = [cfg.hidden_size] * (cfg.n_blocks + 1) + [cfg.out_dim]
        self.num_layers = len(dims)
        for layer in range(self.num_layers - 1):
            setattr(self, f"lin{layer}", nn.Linear(dims[layer], dims[layer + 1]))
        fc_c = nn.ModuleList(nn.Linear(cfg.in_dim, cfg.hidden_size) for _ in range(self.num_layers - 1))
        fc_p = nn.Linear(3, cfg.hidden_size)
        if fc_p_first:
            self.fc_p, self.fc_c = fc_p, fc_c
        else:
            self.fc_c, self.fc_p = fc_c, fc_p
        self.activation = activation
        self.points_factor = cfg.points_factor
        self.sigmoid_output = sigmoid_output
        self.in_dim = cfg.in_dim

    def forward(self, points: Tensor, feat: Tensor) -> Tensor:
        # With points_factor 0 the original adds 0·fc_p(points): no value changes, so eval skips it; training
        # keeps it so fc_p gets the original's zero gradient (and hence its weight decay).
        x = self.fc_p(points) * self.points_factor if self.points_factor != 0 or self.training else None
        for layer in range(self.num_layers - 1):
            h = self.fc_c[layer](feat)
            x = h if x is None else x + h
            x = getattr(self, f"lin{layer}")(x)
            if layer < self.num_layers - 2:
                x = self.activation(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


def sdf_decoder(cfg: DecoderConfig) -> FieldDecoder:
    """Softplus(beta=100) between layers; output = [sdf, geometry features]."""
    return FieldDecoder(cfg, nn.Softplus(beta=100), fc_p_first=False)


def rgb_decoder(cfg: DecoderConfig) -> FieldDecoder:
    return FieldDecoder(cfg, nn.ReLU(), fc_p_first=True, sigmoid_output=True)


def semantic_decoder(cfg: DecoderConfig) -> FieldDecoder:
    return FieldDecoder(cfg, nn.ReLU(), fc_p_first=True)
