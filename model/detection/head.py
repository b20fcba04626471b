"""Per-voxel voting head for 3D boxes, in the style of VoteNet.

Every voxel predicts, from its encoder feature: objectness (does it belong to an object of a detection class?),
class logits, the offset from itself to its object's box centre (its *vote*), the box size (log metres) and
the box yaw as (sin 4θ, cos 4θ) of the canonical yaw θ ∈ [-π/4, π/4) (``boxes.canonical_boxes``).
``postprocess.decode`` groups the votes of foreground voxels into clusters and aggregates each cluster's
predictions into one box.

Why this design: all targets are dense per-voxel quantities read off the ground-truth boxes, so training is a
plain supervised loss with no proposal matching; it converges on a CPU in minutes on small generated rooms and
works on any encoder's (N, C) features. The head is a small MLP shared by every voxel.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from model.config import DetectionConfig, DetectionDecodeConfig
from model.config_io import load


# The head's settings are the ``detection`` section of a ModelConfig (typed there, free of torch); these names
# are kept for the detection package's callers.
HeadConfig = DetectionConfig
DecodeConfig = DetectionDecodeConfig


# Layout of the head's output channels: name -> width (num_classes filled in per head).
def _layout(num_classes: int) -> dict[str, int]:
    return {"objectness": 1, "class_logits": num_classes, "offset": 3, "log_size": 3, "yaw": 2}


class DetectionHead(nn.Module):
    """(N, C) voxel features → dict of per-voxel predictions:
    objectness (N,) logits, class_logits (N, K), offset (N, 3) metres, log_size (N, 3), yaw (N, 2)."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        width = cfg.in_channels
        for _ in range(cfg.num_layers):
            layers += [nn.Linear(width, cfg.hidden_channels, bias=False), nn.BatchNorm1d(cfg.hidden_channels),
                       nn.ReLU(inplace=True)]
            width = cfg.hidden_channels
        self.mlp = nn.Sequential(*layers)
        self.layout = _layout(len(cfg.class_names))
        self.out = nn.Linear(width, sum(self.layout.values()))
        with torch.no_grad():  # start near a plausible box: 0.5 m sizes, low objectness
            self.out.weight.mul_(0.1)
            self.out.bias.zero_()
            bias = dict(zip(self.layout, torch.split(self.out.bias, list(self.layout.values()))))
            bias["log_size"].fill_(-0.7)
            bias["objectness"].fill_(-1.0)

    @classmethod
    def from_config(cls, data: DetectionConfig | dict[str, Any]) -> "DetectionHead":
        return cls(load(DetectionConfig, data, "detection"))

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.cfg.class_names

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        if features.dim() != 2 or features.shape[1] != self.cfg.in_channels:
            raise ValueError(f"the detection head takes (N, {self.cfg.in_channels}) features, got "
                             f"{tuple(features.shape)}")
        raw = self.out(self.mlp(features.float()))                        # (N, 1 + K + 3 + 3 + 2)
        out = dict(zip(self.layout, torch.split(raw, list(self.layout.values()), dim=1)))
        out["objectness"] = out["objectness"].squeeze(1)
        return out
